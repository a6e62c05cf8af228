"""The evaluate stage: lm-eval tasks, sliding-window perplexity, and speed/memory of one model.

Everything runs in-process on an already-loaded model (lm-eval's `HFLM(pretrained=model)`), so exported
native folders evaluate exactly as they load, and the collaborative prompt reaches every task input through
lm-eval's `system_instruction`. Each evaluated model gets one results JSON; the source model's results are
cached across runs (keyed by model identity, evaluation settings, prompt, hardware and library versions)
because the source never changes while recipes are tuned.

Not distributed: the executor calls these functions on rank 0 only (lm-eval returns nothing on other ranks).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .errors import StageError, UserError
from .lm_tasks import PAPER_GROUPS, primary_metric, task_specs
from .plan import evaluation_gpus
from .prompts import COLLABORATIVE, COLLABORATIVE_EVAL, resolve_prompt
from .recipe import EvalSection, PerplexitySection, Recipe, SpeedSection

EventFn = Callable[[dict[str, Any]], None]
CACHE_ENV = "COMPRESSO_OPS_CACHE"
# Files whose size and mtime identify a model folder's content (hashing multi-GB weights would take minutes).
_IDENTITY_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                      "tokenizer*.json", "tokenizer.model")


# ----------------------------------------------------------------------------------------------- loading

def device_for_eval() -> torch.device:
    """The current CUDA device (the one a launcher assigned to this process) or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _placement(device: torch.device, gpus: int) -> dict[str, Any]:
    """Load straight onto this process's GPU, or spread the layers evenly over the first `gpus` GPUs (the
    plan says so when the model does not fit one; accelerate moves activations between them)."""
    if device.type != "cuda":
        return {}
    gpus = min(gpus, torch.cuda.device_count())
    if gpus <= 1:
        return {"device_map": str(device)}
    gc.collect()
    torch.cuda.empty_cache()  # what training left in this process's allocator cache counts as used otherwise
    return {"device_map": "balanced", "max_memory": {i: torch.cuda.mem_get_info(i)[0] for i in range(gpus)}}


def load_model(path: str | Path, *, revision: str | None = None, dtype: str = "auto",
               trust_remote_code: bool = False, tokenizer_path: str | Path | None = None,
               gpus: int = 1) -> tuple[Any, Any]:
    """Model and tokenizer in eval mode on the evaluation device (or `gpus` GPUs, see `_placement`).

    CPU always uses float32 (half precision on CPU is slow and inexact); on GPU `dtype` "auto" keeps the
    checkpoint's dtype. Exported folders without a tokenizer fall back to `tokenizer_path` (the source's).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device_for_eval()
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    if device.type == "cpu":
        torch_dtype = torch.float32
    placement = _placement(device, gpus)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), revision=revision, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code, **placement)
    except OSError as exc:
        raise UserError(f"cannot load model '{path}' for evaluation: {str(exc).splitlines()[0]}") from exc
    tok_source = path
    if tokenizer_path is not None and Path(path).is_dir() and not any(Path(path).glob("tokenizer*")):
        tok_source = tokenizer_path
    tok = AutoTokenizer.from_pretrained(str(tok_source), revision=revision if tok_source == path else None,
                                        trust_remote_code=trust_remote_code)
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------- lm-eval

def _hflm(**kwargs: Any) -> Any:
    """lm-eval's HFLM, honouring TQDM_DISABLE (set by `apply`, whose own progress display is the run's one
    voice): HFLM passes `disable=False` to its per-request bars explicitly, which overrides the variable."""
    from lm_eval.models.huggingface import HFLM

    quiet = os.environ.get("TQDM_DISABLE") == "1"

    class QuietHFLM(HFLM):
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return QuietHFLM(**kwargs)


def system_instruction(prompt_text: str | None) -> str | None:
    """lm-eval's `system_instruction` for a prompt text.

    lm-eval renders a non-chat context as system text immediately followed by the task text (no delimiter),
    so the prompt gets the same blank-line separator training uses (`prompts.with_prompt`).
    """
    if not prompt_text or not prompt_text.strip():
        return None
    return prompt_text.rstrip() + "\n\n"


def run_lm_eval(model: Any, tok: Any, section: EvalSection, prompt_text: str | None) -> dict[str, Any] | None:
    """lm-eval's results structure (JSON-serialisable, per-sample logs dropped), or None without tasks."""
    specs = task_specs(section)
    if not specs:
        return None
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    # backend="causal": lm-eval cannot tell from a native export's model_type that it is a causal LM
    lm = _hflm(pretrained=model, tokenizer=tok, backend="causal", batch_size=section.batch_size,
              max_length=section.max_length)
    # Indexing lm-eval's thousands of YAML tasks takes many seconds; local-only suites skip it.
    manager = TaskManager(include_defaults=bool(section.tasks))
    results = simple_evaluate(model=lm, tasks=specs, num_fewshot=section.num_fewshot, limit=section.limit,
                              task_manager=manager, system_instruction=system_instruction(prompt_text),
                              log_samples=False)
    if results is None:
        raise StageError("lm-eval returned no results: evaluation must run on rank 0 only")
    results.pop("samples", None)
    return json.loads(json.dumps(results, default=handle_non_serializable))


def _metric_entry(entry: dict[str, Any]) -> dict[str, Any] | None:
    metric = primary_metric(entry)
    if metric is None:
        return None
    keys = [k for k in entry if k.split(",", 1)[0] == metric]
    key = f"{metric},none" if f"{metric},none" in keys else min(keys)
    stderr = entry.get(key.replace(",", "_stderr,", 1))
    return {"metric": metric, "filter": key.split(",", 1)[1], "value": float(entry[key]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}


def summarize_tasks(lm_results: dict[str, Any], section: EvalSection) -> dict[str, dict[str, Any]]:
    """{task: {metric, value, stderr, n, groups}} for each requested task (tags expand to their tasks)."""
    table = {**lm_results.get("results", {}), **lm_results.get("groups", {})}
    children = {c for subs in lm_results.get("group_subtasks", {}).values() for c in subs}
    requested = [*section.tasks, *(t.name for t in section.local_tasks)]
    names = [n for n in requested if n in table]
    if len(names) < len(requested):  # a tag such as ai2_arc: report the tasks it expanded to
        names += [n for n in table if n not in names and n not in children and n not in requested]
    local_groups = {t.name: t.group for t in section.local_tasks}
    n_samples = lm_results.get("n-samples", {})
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        entry = _metric_entry(table[name])
        if entry is None:
            continue
        if name in local_groups:
            groups = [local_groups[name]] if local_groups[name] else []
        else:
            groups = [g for g, members in PAPER_GROUPS.items() if name in members]
        n = n_samples.get(name, {}).get("effective")
        out[name] = {**entry, "n": n, "groups": groups}
    return out


def group_averages(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean primary metric per report group, with how many of the paper's tasks it covers."""
    members: dict[str, list[str]] = {}
    for name, entry in tasks.items():
        for group in entry["groups"]:
            members.setdefault(group, []).append(name)
    return {g: {"tasks": names, "average": statistics.fmean(tasks[n]["value"] for n in names),
                "paper_tasks": list(PAPER_GROUPS.get(g, ()))}
            for g, names in members.items()}


# ----------------------------------------------------------------------------------------------- perplexity

@torch.inference_mode()
def perplexity(model: Any, tok: Any, spec: PerplexitySection) -> dict[str, Any]:
    """Sliding-window perplexity: each window holds `window` tokens and scores only the tokens it adds.

    The first window scores all its tokens (but the first); each later window ends `stride` tokens further
    and scores those `stride` new tokens with `window - stride` tokens of context, so every token is scored
    exactly once. A BOS token (when the tokenizer has one) starts the text, as in training.
    """
    if spec.stride >= spec.window:
        raise UserError(f"eval.perplexity.stride ({spec.stride}) must be smaller than window ({spec.window}): "
                        "each window scores its last `stride` tokens and uses the rest as context")
    path = Path(spec.path)
    if not path.is_file():
        raise UserError(f"eval.perplexity.path: {path} does not exist; point it at a plain text file")
    ids = tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    has_bos = tok.bos_token_id is not None
    if has_bos:
        ids = [tok.bos_token_id, *ids]
    if spec.max_tokens is not None:
        ids = ids[: spec.max_tokens + 1]
    if len(ids) < 2:
        raise UserError(f"eval.perplexity.path: {path} has too little text to score")
    device = next(model.parameters()).device
    all_ids = torch.tensor(ids, device=device)
    nll, scored, end, windows = 0.0, 1, 0, 0
    while scored < len(ids):
        end = min(len(ids), spec.window if windows == 0 else end + spec.stride)
        begin = max(0, end - spec.window)
        x = all_ids[begin:end]
        logp = torch.log_softmax(model(x[None]).logits[0, :-1].float(), dim=-1)
        first = scored - begin - 1  # local index of the logit that predicts the first new token
        nll -= logp[first:].gather(-1, x[first + 1:, None]).sum().item()
        scored, windows = end, windows + 1
    tokens = len(ids) - 1
    return {"file": str(path), "window": spec.window, "stride": spec.stride, "tokens_scored": tokens,
            "windows": windows, "bos": has_bos, "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens)}


# ----------------------------------------------------------------------------------------------- speed

def _kv_width(model: Any) -> int:
    """Sum over layers of the K and V projection widths: per-token KV-cache elements (per-layer aware)."""
    return sum(m.out_features for name, m in model.named_modules()
               if name.endswith(("k_proj", "v_proj")) and hasattr(m, "out_features"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that only timestamps: generate calls it once per new token, right after that
    token's forward pass, so one generate yields both the prefill time and the decode steps' times."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _synchronize(scores.device)  # the logits come last, on the last GPU when layers are spread
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def measure_speed(model: Any, spec: SpeedSection) -> dict[str, Any]:
    """Prefill and decode throughput (median of `repeats`) and peak memory at a stated batch and length.

    One greedy `generate` of `new_tokens` tokens (forced with min_new_tokens, KV cache on) per repeat:
    prefill is the time to the first token's logits (the prompt's forward pass), decode the time of the
    remaining new_tokens - 1 cached steps. Peak memory is CUDA's max_memory_allocated on GPU (summed over
    the GPUs a spread model uses); on CPU it is the analytic weights + KV-cache bytes (activations
    excluded), because process RSS on CPU mixes in the allocator's and other libraries' memory.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    b, p, n = spec.batch_size, spec.prompt_length, spec.new_tokens
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (b, p),
                        generator=torch.Generator().manual_seed(0)).to(device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                           pad_token_id=pad, eos_token_id=model.config.eos_token_id)

    def run() -> tuple[float, float]:
        clock = _StepClock()
        _synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                             logits_processor=LogitsProcessorList([clock]))
        if out.shape[1] != p + n or len(clock.times) != n:
            raise StageError(f"speed: generate returned {out.shape[1] - p} new tokens, expected {n}")
        return clock.times[0] - start, clock.times[-1] - clock.times[0]

    run()  # warm-up: kernels, allocator, lazy initialisation
    gpus = sorted({q.device.index for q in model.parameters() if q.device.type == "cuda"})
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    timings = [run() for _ in range(spec.repeats)]
    prefill_s = statistics.median(t[0] for t in timings)
    decode_s = statistics.median(t[1] for t in timings) if n > 1 else None
    elt = next(model.parameters()).element_size()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    kv = b * (p + n) * _kv_width(model) * elt
    memory = {"weights_bytes": weights, "kv_cache_bytes": kv}
    if device.type == "cuda":
        memory.update(peak_bytes=sum(torch.cuda.max_memory_allocated(gpu) for gpu in gpus),
                      method="cuda_max_memory_allocated")
    else:
        memory.update(peak_bytes=weights + kv, method="weights_plus_kv_cache")
    return {
        "batch_size": b, "prompt_length": p, "new_tokens": n, "repeats": spec.repeats,
        "prefill_s": prefill_s, "prefill_tokens_per_s": b * p / prefill_s,
        "decode_s": decode_s, "decode_tokens_per_s": b * (n - 1) / decode_s if decode_s else None,
        "memory": memory,
    }


# ----------------------------------------------------------------------------------------------- results

def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("compresso-ops", "torch", "transformers", "lm_eval", "peft", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def hardware() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def prompt_name(prompt_text: str | None) -> str:
    if not prompt_text:
        return "none"
    return "collaborative" if prompt_text in (COLLABORATIVE_EVAL, COLLABORATIVE) else "custom"


def evaluate_model(model: Any, tok: Any, section: EvalSection, *, prompt_text: str | None, label: str,
                   on_event: EventFn | None = None) -> dict[str, Any]:
    """The results dict of an already-loaded model (everything but its `model` identity block)."""
    wanted = {"lm_eval": bool(section.tasks or section.local_tasks), "perplexity": section.perplexity is not None,
              "speed": section.speed.enabled}
    phases = [phase for phase, on in wanted.items() if on]
    out: dict[str, Any] = {"prompt": {"text": prompt_text or None, "name": prompt_name(prompt_text)},
                           "lm_eval": None, "tasks": {}, "groups": {}, "perplexity": None, "speed": None,
                           "timing_s": {}}
    for step, phase in enumerate(phases, 1):
        if on_event:
            on_event({"stage": "evaluate", "model": label, "phase": phase, "step": step, "total_steps": len(phases)})
        start = time.perf_counter()
        if phase == "lm_eval":
            out["lm_eval"] = run_lm_eval(model, tok, section, prompt_text)
            out["tasks"] = summarize_tasks(out["lm_eval"], section)
            out["groups"] = group_averages(out["tasks"])
        elif phase == "perplexity":
            assert section.perplexity is not None
            out["perplexity"] = perplexity(model, tok, section.perplexity)
        else:
            out["speed"] = measure_speed(model, section.speed)
        out["timing_s"][phase] = time.perf_counter() - start
    out["versions"] = versions()
    out["hardware"] = hardware()
    return out


def _model_block(model: Any, path: str | Path, revision: str | None, label: str) -> dict[str, Any]:
    return {"label": label, "path": str(path), "revision": revision, "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device)}


def _prompt_for(recipe: Recipe, prompt_text: str | None) -> str:
    return resolve_prompt(recipe.prompt, "evaluate") if prompt_text is None else prompt_text


def run_evaluate(recipe: Recipe, model_dir: str | Path, out_file: str | Path, *, label: str,
                 prompt_text: str | None = None, on_event: EventFn | None = None) -> dict[str, Any]:
    """Evaluate the model in `model_dir` with the recipe's eval suite and write `out_file` (atomically).

    `prompt_text` None uses the recipe's evaluation prompt; "" evaluates without a prompt (the ablation).
    """
    prompt_text = _prompt_for(recipe, prompt_text)
    model, tok = load_model(model_dir, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                            tokenizer_path=recipe.model.path, gpus=evaluation_gpus(recipe))
    results = {"model": _model_block(model, model_dir, None, label),
               **evaluate_model(model, tok, recipe.eval, prompt_text=prompt_text, label=label, on_event=on_event)}
    atomic.write_json(out_file, results)
    return results


# ----------------------------------------------------------------------------------------------- source cache

def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compresso-ops")


def _file_fingerprints(folder: Path) -> list[tuple[str, int, int]]:
    files = sorted({f for pattern in _IDENTITY_PATTERNS for f in folder.glob(pattern) if f.is_file()})
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def model_identity(path: str, revision: str | None) -> dict[str, Any]:
    """What identifies a model's content: its folder's weight/config files (sizes and mtimes), or for a hub id
    the locally cached snapshot (its folder name is the commit)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(path, revision=revision, local_files_only=True))
        except (OSError, ValueError):  # not cached (or not a valid id): the id and revision are all we know
            return {"path": path, "revision": revision, "files": None}
    return {"path": str(folder.resolve()), "revision": revision, "files": _file_fingerprints(folder)}


def source_cache_key(recipe: Recipe, prompt_text: str | None) -> str:
    """Hash of everything a source evaluation depends on; any change re-runs it."""
    section = recipe.eval.model_dump(mode="json", exclude={"compare_source"})
    data_files = [Path(t.data) for t in recipe.eval.local_tasks]
    if recipe.eval.perplexity is not None:
        data_files.append(Path(recipe.eval.perplexity.path))
    payload = {
        "model": model_identity(recipe.model.path, recipe.model.revision),
        "dtype": recipe.model.dtype,
        "eval": section,
        "data": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) if f.is_file() else (str(f), None, None)
                 for f in data_files],
        "prompt": prompt_text or None,
        "hardware": hardware(),
        "versions": versions(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def run_source_evaluate(recipe: Recipe, out_file: str | Path, *, prompt_text: str | None = None,
                        on_event: EventFn | None = None) -> dict[str, Any]:
    """Evaluate the recipe's source model once per (model, settings, prompt, hardware, versions).

    The cached results are copied to `out_file` with a `cache` block saying whether this call hit the cache.
    `prompt_text` as in `run_evaluate`.
    """
    prompt_text = _prompt_for(recipe, prompt_text)
    key = source_cache_key(recipe, prompt_text)
    cached = cache_dir() / "source-eval" / f"{key}.json"
    results = atomic.read_json(cached)
    hit = results is not None
    if results is None:
        model, tok = load_model(recipe.model.path, revision=recipe.model.revision, dtype=recipe.model.dtype,
                                trust_remote_code=recipe.model.trust_remote_code, gpus=evaluation_gpus(recipe))
        results = {"model": _model_block(model, recipe.model.path, recipe.model.revision, "source"),
                   **evaluate_model(model, tok, recipe.eval, prompt_text=prompt_text, label="source",
                                    on_event=on_event)}
        atomic.write_json(cached, results)
    results["cache"] = {"hit": hit, "key": key, "file": str(cached)}
    atomic.write_json(out_file, results)
    return results

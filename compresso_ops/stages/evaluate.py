"""The evaluate stage: lm-eval tasks, sliding-window perplexity, and speed/memory of one model.

Everything runs in-process on an already-loaded model (lm-eval's `HFLM(pretrained=model)`), so exported
native folders evaluate exactly as they load, and the collaborative prompt reaches every task input through
lm-eval's `system_instruction`. Each evaluated model gets one results JSON; the source model's results are
cached across runs (keyed by model identity, evaluation settings, prompt, hardware and library versions)
because the source never changes while recipes are tuned.

Several processes: when the model fits one GPU (the plan's `evaluate.parallel` is "data"), every rank of a
torchrun job loads it and the ranks share the lm-eval requests and the perplexity windows; rank 0 gathers
the results, measures speed alone and alone writes files. When it does not fit ("layers"), rank 0
alone evaluates with the layers spread over its node's GPUs while the other ranks have left.
"""


from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from compresso_ops.evaluation.harness import group_averages, load_model, run_lm_eval, summarize_tasks
from compresso_ops.evaluation.measures import hardware, measure_speed, perplexity, versions
from compresso_ops.infra import atomic
from compresso_ops.infra.cache import cache_dir
from compresso_ops.infra.fingerprint import digest, path_identity
from compresso_ops.method.prompts import COLLABORATIVE, COLLABORATIVE_EVAL, resolve_prompt
from compresso_ops.models.card import write_card
from compresso_ops.models.export import MANIFEST_FILE
from compresso_ops.models.resolve import locate_model
from compresso_ops.recipe.schema import EvalSection, ModelSection, Recipe
from compresso_ops.stages.plan import evaluation_gpus, evaluation_parallel
from compresso_ops.training.distributed import SINGLE, DistContext, init_distributed
from compresso_ops.ui.progress import EventFn

# Files whose size and mtime identify a model folder's content (hashing multi-GB weights would take minutes).
_IDENTITY_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json",
                      "tokenizer*.json", "tokenizer.model")


def prompt_name(prompt_text: str | None) -> str:
    if not prompt_text:
        return "none"
    return "collaborative" if prompt_text in (COLLABORATIVE_EVAL, COLLABORATIVE) else "custom"


def evaluate_model(model: Any, tok: Any, section: EvalSection, *, prompt_text: str | None, label: str,
                   on_event: EventFn | None = None, dist: DistContext = SINGLE) -> dict[str, Any]:
    """The results dict of an already-loaded model (everything but its `model` identity block).

    Under an active `dist` every rank calls this and shares the lm-eval and perplexity work; only rank 0's
    dict holds the lm-eval results and speed, which rank 0 measures alone (the others would compete for
    the host and the interconnect)."""
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
            out["lm_eval"] = run_lm_eval(model, tok, section, prompt_text, dist)
            if out["lm_eval"] is not None:  # None on the ranks other than 0
                out["tasks"] = summarize_tasks(out["lm_eval"], section)
                out["groups"] = group_averages(out["tasks"])
        elif phase == "perplexity":
            assert section.perplexity is not None
            out["perplexity"] = perplexity(model, tok, section.perplexity, dist)
        elif dist.is_main:
            out["speed"] = measure_speed(model, section.speed)
        out["timing_s"][phase] = time.perf_counter() - start
    out["versions"] = versions()
    out["hardware"] = hardware()
    gpus = len({p.device for p in model.parameters() if p.device.type == "cuda"})
    out["parallel"] = {"mode": "data" if dist.active else "layers" if gpus > 1 else "none",
                       "processes": dist.world_size, "gpus_per_process": gpus}
    return out


def _model_block(model: Any, path: str | Path, revision: str | None, label: str) -> dict[str, Any]:
    return {"label": label, "path": str(path), "revision": revision, "class": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device)}


def _prompt_for(recipe: Recipe, prompt_text: str | None) -> str:
    return resolve_prompt(recipe.prompt, "evaluate") if prompt_text is None else prompt_text


def evaluation_context(recipe: Recipe) -> DistContext:
    """The processes that evaluate together: every rank of the job when the plan evaluates data-parallel,
    else this process alone (rank 0, with the layers spread when the model does not fit one GPU)."""
    return init_distributed() if evaluation_parallel(recipe) == "data" else SINGLE


def _load(recipe: Recipe, path: str | Path, dist: DistContext, **kwargs: Any) -> tuple[Any, Any]:
    """The model to evaluate on this process: whole on its own GPU under data parallelism, else placed as
    the plan says."""
    return load_model(path, dtype=recipe.model.dtype, trust_remote_code=recipe.model.trust_remote_code,
                      gpus=1 if dist.active else evaluation_gpus(recipe), **kwargs)


def run_evaluate(recipe: Recipe, model_dir: str | Path, out_file: str | Path, *, label: str,
                 prompt_text: str | None = None, on_event: EventFn | None = None) -> dict[str, Any]:
    """Evaluate the model in `model_dir` with the recipe's eval suite and write `out_file` (atomically).

    `prompt_text` None uses the recipe's evaluation prompt; "" evaluates without a prompt (the ablation).
    """
    prompt_text, dist = _prompt_for(recipe, prompt_text), evaluation_context(recipe)
    model, tok = _load(recipe, model_dir, dist, tokenizer_path=recipe.model.path)
    results = {"model": _model_block(model, model_dir, None, label),
               **evaluate_model(model, tok, recipe.eval, prompt_text=prompt_text, label=label, on_event=on_event,
                                dist=dist)}
    if dist.is_main:
        atomic.write_json(out_file, results)
    return results


def model_identity(model: ModelSection) -> dict[str, Any]:
    """What identifies a model's content: its folder's config, weight and tokenizer files (sizes and mtimes);
    a hub id resolves to its cached snapshot (whose folder name is the commit)."""
    folder = locate_model(model).folder
    if folder is None:  # not here: its name and revision are all we know
        return {"path": model.path, "revision": model.revision, "files": None}
    return {"path": str(folder.resolve()), "revision": model.revision,
            "files": path_identity(folder, _IDENTITY_PATTERNS)}


def source_cache_key(recipe: Recipe, prompt_text: str | None) -> str:
    """Hash of everything a source evaluation depends on; any change re-runs it."""
    section = recipe.eval.model_dump(mode="json", exclude={"compare_source"})
    data_files = [Path(t.data) for t in recipe.eval.local_tasks]
    if recipe.eval.perplexity is not None:
        data_files.append(Path(recipe.eval.perplexity.path))
    payload = {
        "model": model_identity(recipe.model),
        "dtype": recipe.model.dtype,
        "eval": section,
        "data": [(str(f), path_identity(f)) for f in data_files],
        "prompt": prompt_text or None,
        "hardware": hardware(),
        "versions": versions(),
    }
    return digest(payload, length=20)


def run_source_evaluate(recipe: Recipe, out_file: str | Path, *, prompt_text: str | None = None,
                        on_event: EventFn | None = None) -> dict[str, Any]:
    """Evaluate the recipe's source model once per (model, settings, prompt, hardware, versions).

    The cached results are copied to `out_file` with a `cache` block saying whether this call hit the cache.
    `prompt_text` as in `run_evaluate`. Data-parallel as `run_evaluate`: rank 0 looks the results up and
    tells the others, who evaluate with it only on a miss.
    """
    prompt_text, dist = _prompt_for(recipe, prompt_text), evaluation_context(recipe)
    key = source_cache_key(recipe, prompt_text)
    cached = cache_dir() / "source-eval" / f"{key}.json"
    results = dist.broadcast_object(atomic.read_json(cached) if dist.is_main else None)
    hit = results is not None
    if results is None:
        model, tok = _load(recipe, recipe.model.path, dist, revision=recipe.model.revision)
        results = {"model": _model_block(model, recipe.model.path, recipe.model.revision, "source"),
                   **evaluate_model(model, tok, recipe.eval, prompt_text=prompt_text, label="source",
                                    on_event=on_event, dist=dist)}
        if dist.is_main:
            atomic.write_json(cached, results)
    results["cache"] = {"hit": hit, "key": key, "file": str(cached)}
    if dist.is_main:
        atomic.write_json(out_file, results)
    return results


def final_model_dir(recipe: Recipe, run_dir: Path) -> Path:
    """The model the run ships: the fine-tuned one, or the sliced one when fine-tuning is off."""
    tuned = run_dir / "finetune" / "model"
    return tuned if recipe.finetune.enabled and tuned.is_dir() else run_dir / "slice" / "model"


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The evaluate stage: `evaluate/pruned.json`, and `evaluate/source.json` when the recipe compares."""
    folder, model_dir = run_dir / "evaluate", final_model_dir(recipe, run_dir)
    pruned = run_evaluate(recipe, model_dir, folder / "pruned.json", label="pruned", on_event=on_event)
    source = run_source_evaluate(recipe, folder / "source.json", on_event=on_event) \
        if recipe.eval.compare_source else None
    if evaluation_context(recipe).is_main and (manifest := atomic.read_json(model_dir / MANIFEST_FILE)) is not None:
        write_card(model_dir, manifest, pruned, source)  # the shipped folder's card gains the evaluation
    return f"{len(pruned.get('tasks', {}))} task(s)"

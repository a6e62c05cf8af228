"""lm-eval on an already-loaded model: loading for evaluation, the collaborative prompt as lm-eval's
`system_instruction`, the per-task and per-group summaries the report reads, and data-parallel scoring.

Data-parallel evaluation splits the model calls, not the tasks. lm-eval's own split (HFLM under accelerate)
hands rank r the documents r, r + world, ... and builds their few-shot contexts from one sampler per rank,
so with num_fewshot > 0 the examples a question gets depend on the number of processes (lm-eval marks it
a TODO in `Task.build_all_requests`); it also needs an accelerate launch. Here every rank builds every
request, exactly as one process does, scores the requests of its share of the documents, and the scores are
gathered to every rank, so lm-eval's metrics and aggregation run on the same inputs as in one process
(lm-eval then returns its results on rank 0).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from compresso_ops.errors import StageError
from compresso_ops.evaluation.tasks import PAPER_GROUPS, primary_metric, task_specs
from compresso_ops.models.resolve import readable_model
from compresso_ops.recipe.schema import EvalSection
from compresso_ops.training.distributed import SINGLE, DistContext


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

    import compresso_ops.models.modeling_compresso  # noqa: F401  (registers the native export class)

    device = device_for_eval()
    torch_dtype: Any = "auto" if dtype == "auto" else getattr(torch, dtype)
    if device.type == "cpu":
        torch_dtype = torch.float32
    placement = _placement(device, gpus)
    with readable_model(path, "evaluate"):
        model = AutoModelForCausalLM.from_pretrained(str(path), revision=revision, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code, **placement)
    tok_source = path
    if tokenizer_path is not None and Path(path).is_dir() and not any(Path(path).glob("tokenizer*")):
        tok_source = tokenizer_path
    tok = AutoTokenizer.from_pretrained(str(tok_source), revision=revision if tok_source == path else None,
                                        trust_remote_code=trust_remote_code)
    return model.eval(), tok


def share(requests: list[Any], dist: DistContext) -> list[int]:
    """Indices of the lm-eval requests this rank scores: whole documents (every choice of a question on one
    rank, so lm-eval's cache of a shared context still applies), dealt round-robin in request order."""
    docs: dict[tuple[Any, Any], int] = {}
    keys = [docs.setdefault((r.task_name, r.doc_id), len(docs)) for r in requests]
    return [i for i, key in enumerate(keys) if key % dist.world_size == dist.rank]


def _scored_by_all(score: Any, requests: list[Any], dist: DistContext, disable_tqdm: bool) -> list[Any]:
    """`score(requests)` (an HFLM method) computed data-parallel: each rank scores its share, and every rank
    gets every result back in the order of `requests`."""
    if not dist.active:
        return score(requests, disable_tqdm=disable_tqdm)
    mine = share(requests, dist)
    scores = score([requests[i] for i in mine], disable_tqdm=disable_tqdm or not dist.is_main) if mine else []
    out: list[Any] = [None] * len(requests)
    for indices, values in dist.all_gather_object((mine, scores)):
        for i, value in zip(indices, values, strict=True):
            out[i] = value
    return out


def _hflm(dist: DistContext = SINGLE, **kwargs: Any) -> Any:
    """lm-eval's HFLM, scoring data-parallel over `dist` (see the module docstring) and honouring
    TQDM_DISABLE (set by `apply`, whose own progress display is the run's one voice): HFLM passes
    `disable=False` to its per-request bars explicitly, which overrides the variable."""
    from lm_eval.models.huggingface import HFLM

    quiet = os.environ.get("TQDM_DISABLE") == "1"

    class SharedHFLM(HFLM):
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return _scored_by_all(super().loglikelihood, requests, dist, disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            return _scored_by_all(super().loglikelihood_rolling, requests, dist, disable_tqdm or quiet)

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            return _scored_by_all(super().generate_until, requests, dist, disable_tqdm or quiet)

    return SharedHFLM(**kwargs)


def system_instruction(prompt_text: str | None) -> str | None:
    """lm-eval's `system_instruction` for a prompt text.

    lm-eval renders a non-chat context as system text immediately followed by the task text (no delimiter),
    so the prompt gets the same blank-line separator training uses (`prompts.with_prompt`).
    """
    if not prompt_text or not prompt_text.strip():
        return None
    return prompt_text.rstrip() + "\n\n"


def run_lm_eval(model: Any, tok: Any, section: EvalSection, prompt_text: str | None,
                dist: DistContext = SINGLE) -> dict[str, Any] | None:
    """lm-eval's results structure (JSON-serialisable, per-sample logs dropped), or None without tasks.

    Under an active `dist` every rank calls this with the same model and the ranks share the model calls;
    rank 0 gets the results, the other ranks None."""
    specs = task_specs(section)
    if not specs:
        return None
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    # backend="causal": lm-eval cannot tell from a native export's model_type that it is a causal LM
    lm = _hflm(dist, pretrained=model, tokenizer=tok, backend="causal", batch_size=section.batch_size,
               max_length=section.max_length)
    # Indexing lm-eval's thousands of YAML tasks takes many seconds; local-only suites skip it.
    manager = TaskManager(include_defaults=bool(section.tasks))
    results = simple_evaluate(model=lm, tasks=specs, num_fewshot=section.num_fewshot, limit=section.limit,
                              task_manager=manager, system_instruction=system_instruction(prompt_text),
                              log_samples=False)
    if not dist.is_main:  # lm-eval hands its results to LOCAL_RANK 0 alone; rank 0 is the one that writes
        return None
    if results is None:
        raise StageError("lm-eval returned no results: start compresso-ops with torchrun, not accelerate")
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

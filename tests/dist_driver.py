"""Run one stage under torchrun, for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_driver.py CONFIG.json

CONFIG holds {"jobs": [{"stage": "prune" | "finetune" | "load" | "evaluate", "recipe": <Recipe as JSON>,
"stage_dir", "sliced_dir" (finetune), "run_dir" and "cache_dir" (evaluate)}, ...], "out_dir",
"pause_after_checkpoint"}; the jobs run one after the other in the same processes (one launch costs tests less
than two). Every rank writes its pid to out_dir/rank<r>.pid at start (so a test can SIGKILL the whole job) and
each job's return value to out_dir/result<job>_<r>.json. An evaluate job returns the stage's note and the work
this rank did: the lm-eval requests it scored and the perplexity windows it ran.
With pause_after_checkpoint, rank 0 touches out_dir/paused after its first checkpoint and sleeps, so a test
can kill the job at a known point.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from compresso_ops.recipe.schema import Recipe
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.distributed import init_distributed, shutdown_distributed


def _pause_after_first_checkpoint(out_dir: Path) -> None:
    real_save = CheckpointStore.save

    def save(self: CheckpointStore, state: dict) -> None:
        real_save(self, state)
        (out_dir / "paused").touch()
        time.sleep(600)  # the test kills the job here

    CheckpointStore.save = save  # type: ignore[method-assign]


def _load(recipe: Recipe, dist, out_file: Path) -> dict:
    """Load the source and prepare it for pruning as the prune stage does; rank 0 writes every parameter,
    gathered whole, to `out_file`. Returns how the base was held and this process's peak RSS."""
    import resource

    from safetensors.torch import save_file

    from compresso_ops.models.adapter import unwrap
    from compresso_ops.training.setup import load_source, prepare_for_training
    from compresso_ops.training.sharding import weights_held

    model, _, precision = load_source(recipe, dist)
    model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
    tensors = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().contiguous()
               for name, p in unwrap(model).named_parameters()}
    if dist.is_main:
        save_file(tensors, str(out_file))
    return {"weights": weights_held(model, precision),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _evaluate(recipe: Recipe, run_dir: Path) -> dict:
    """The evaluate stage as the executor runs it on every rank, counting this rank's share of the work."""
    from lm_eval.models.huggingface import HFLM

    from compresso_ops.stages import evaluate

    work = {"requests": 0, "windows": 0}
    score = HFLM._loglikelihood_tokens

    def counted_score(self: HFLM, requests: list, *args: object, **kwargs: object) -> list:
        work["requests"] += len(requests)
        return score(self, requests, *args, **kwargs)

    perplexity = evaluate.perplexity

    def counted_perplexity(model: torch.nn.Module, *args: object) -> dict:
        hook = model.register_forward_hook(lambda *_: work.__setitem__("windows", work["windows"] + 1))
        try:
            return perplexity(model, *args)
        finally:
            hook.remove()

    HFLM._loglikelihood_tokens = counted_score  # type: ignore[method-assign]
    evaluate.perplexity = counted_perplexity  # type: ignore[assignment]
    try:
        note = evaluate.run(recipe, run_dir, lambda event: None)
    finally:
        HFLM._loglikelihood_tokens = score  # type: ignore[method-assign]
        evaluate.perplexity = perplexity  # type: ignore[assignment]
    return {"note": note, "work": work}


def main() -> None:
    config = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    out_dir = Path(config["out_dir"])
    dist = init_distributed()
    (out_dir / f"rank{dist.rank}.pid").write_text(str(os.getpid()))
    if config.get("pause_after_checkpoint"):
        _pause_after_first_checkpoint(out_dir)
    for i, job in enumerate(config["jobs"]):
        recipe = Recipe.model_validate(job["recipe"])
        if job["stage"] == "load":
            result = _load(recipe, dist, out_dir / f"load{i}.safetensors")
        elif job["stage"] == "prune":
            from compresso_ops.stages.prune import run_prune

            result = run_prune(recipe, job["stage_dir"])
        elif job["stage"] == "finetune":
            from compresso_ops.stages.finetune import run_finetune

            result = run_finetune(recipe, job["sliced_dir"], job["stage_dir"])
        else:
            from compresso_ops.infra.cache import CACHE_ENV

            os.environ[CACHE_ENV] = job["cache_dir"]
            result = _evaluate(recipe, Path(job["run_dir"]))
        (out_dir / f"result{i}_{dist.rank}.json").write_text(json.dumps(result, sort_keys=True, default=str))
    shutdown_distributed()


if __name__ == "__main__":
    main()

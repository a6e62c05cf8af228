"""Checks before any heavy work: model and data on disk, room for checkpoints, GPUs and dtype support.

Each failure is one line saying what is wrong and what to do; all are reported together.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from compresso_ops.errors import UserError
from compresso_ops.infra.units import human_bytes
from compresso_ops.models.resolve import locate_model
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.plan import compute_dtype, host_fix, make_plan

# Logs, tokenizers, configs, evaluation results and the report's charts, whatever the model's size.
DISK_FLOOR = 64 * 2**20


# A training checkpoint holds each trainable parameter in fp32 with its two AdamW moments.
CHECKPOINT_BYTES_PER_TRAINABLE = 12


def disk_needed(recipe: Recipe, plan: dict, stages: list[str]) -> int:
    """Bytes the stages about to run write at their peak: each exported model (the slice's and the
    fine-tune's) plus one more while an export replaces the previous one, three training checkpoints per
    training stage (the last two kept and the next being written), and the floor."""
    finetune = "finetune" in stages and recipe.finetune.enabled
    exports = ("slice" in stages) + finetune
    trainings = ("prune" in stages and recipe.method == "compresso") + finetune
    export_bytes = plan["params"]["export"][recipe.export.mode]["checkpoint_bytes"]
    checkpoint_bytes = plan["trainable"]["total"] * CHECKPOINT_BYTES_PER_TRAINABLE
    return DISK_FLOOR + (exports + (exports > 0)) * export_bytes + 3 * trainings * checkpoint_bytes


def run_preflight(recipe: Recipe, run_dir: Path, stages: list[str]) -> None:
    problems: list[str] = []
    if (missing := locate_model(recipe.model).problem(need_weights=True)) is not None:
        problems.append(missing)
    needs_data = ("prune" in stages and recipe.prune_reads_data) or (
        "finetune" in stages and recipe.finetune.enabled)
    if needs_data and (recipe.data.path is None or not Path(recipe.data.path).is_file()):
        problems.append(f"data.path: training data not found at {recipe.data.path}")
    if "evaluate" in stages:
        if recipe.eval.perplexity and not Path(recipe.eval.perplexity.path).is_file():
            problems.append(f"eval.perplexity.path: file not found: {recipe.eval.perplexity.path}")
        for i, task in enumerate(recipe.eval.local_tasks):
            if not Path(task.data).is_file():
                problems.append(f"eval.local_tasks[{i}].data: file not found: {task.data}")

    plan = make_plan(recipe)
    need = disk_needed(recipe, plan, stages)
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        problems.append(f"run_dir: {human_bytes(free)} free at {run_dir}, the run needs about "
                        f"{human_bytes(need)}; free space or set run_dir elsewhere")

    problems += _host_problems(recipe, plan, stages)
    if recipe.hardware.gpu != "cpu":
        problems += _gpu_problems(recipe, plan)
    if problems:
        raise UserError(problems[0], lines=problems)


# The host peak each pipeline stage reaches (prune and fine-tune start by loading a model).
HOST_PEAKS = {"prune": "load", "finetune": "load", "slice": "slice", "evaluate": "evaluate"}


def _host_problems(recipe: Recipe, plan: dict, stages: list[str]) -> list[str]:
    """One line per host peak of the stages to run that does not fit the node's RAM, with the smallest fix."""
    host = plan["memory"]["host"]
    ram = host["node_ram_bytes"]
    out = []
    for peak in dict.fromkeys(HOST_PEAKS[s] for s in stages if s in HOST_PEAKS):
        if not host["fits"][peak]:
            need = human_bytes(host["peaks"][peak])
            out.append(f"hardware.host_memory: the {peak} peak needs about {need} per node, "
                       f"the node has {human_bytes(ram)} ({host['node_ram_from']}); {host_fix(recipe, plan, peak)}")
    return out


def _gpu_problems(recipe: Recipe, plan: dict) -> list[str]:
    import torch

    out: list[str] = []
    if not torch.cuda.is_available():
        return [(f"hardware.gpu: the recipe asks for {recipe.hardware.gpu} but no CUDA GPU is visible; "
                 "set hardware.gpu: cpu or run on a GPU machine")]
    visible = torch.cuda.device_count()
    if visible < recipe.hardware.gpus_per_node:
        out.append(f"hardware.gpus_per_node: {recipe.hardware.gpus_per_node} GPUs asked for, {visible} visible; "
                   "lower it or check CUDA_VISIBLE_DEVICES")
    have = torch.cuda.get_device_properties(0).total_memory
    for stage, entry in plan["memory"]["stages"].items():
        if entry["per_gpu_bytes"] > have:
            hint = entry.get("suggestion") or "use a larger GPU"
            out.append(f"hardware.gpu: the {stage} stage needs about {human_bytes(entry['per_gpu_bytes'])} per GPU, "
                       f"the GPU has {human_bytes(have)}; {hint}")
    if compute_dtype(recipe) == "bfloat16" and not torch.cuda.is_bf16_supported():
        out.append("model.dtype: this GPU has no bfloat16 support; use float16")
    return out

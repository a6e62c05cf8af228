"""Other levers on the quality gap at the matrix's budget: one-shot criteria that read activations, a
least-squares repair of the sliced model before recovery, Compresso's gates on other structures, and other
distillation settings (issue 14).

Everything runs at the quality matrix's settings (`benchmarks/quality.py`: stories260K, 600 optimizer steps of
4 x 128 TinyStories tokens, full_kd recovery, perplexity on tinystories/dev.txt) and is compared with the dense
reference trained the same way, so its rows sit beside the matrix's magnitude/full_kd cells.

Criteria (each ranks KV groups and FFN channels for the library's budgeted mask selection, hidden dims kept,
as the one-shot methods do):
- magnitude: the library's L2 criterion (the matrix's best method at 0.20);
- activation: the library's `method: activation` (compresso_ops/method/baselines.py), what each structure adds
  to the residual stream on calibration text (the first CALIBRATION training examples): an FFN channel's summed
  squared output ||a_j||^2 ||W_down[:, j]||^2, a KV group's summed squared o_proj output of its query heads;
  square-rooted, so heads and channels compete on one scale (the activation-based importance of Minitron,
  measured at each structure's output);
- activation-uniform: the same method with `prune.one_shot_allocation: uniform`, the ranking within each layer,
  every layer pruned to the same width.

Repair (`+repair`): after slicing, each layer's down_proj over its kept channels is refitted by ridge
least squares so the layer's FFN output on calibration text matches the unpruned FFN's on the same input,
layer after layer through the repaired model (the weight update of ZipLM / SlimGPT, restricted to
down_proj; no heads are pruned by these criteria at these sparsities).

Compresso's gates: compresso-full-kd (the matrix's best Compresso variant), seed 42, with its gates on heads and
FFN channels (the matrix's), on FFN channels alone, and on hidden dims as well.

Distillation settings: magnitude and the reference at 0.20, seed 42, with full_kd's distillation weight or
temperature changed (the reference trained with the same change).

    .venv/bin/python -m benchmarks.quality_criteria [--jobs 2] [--out DIR]

Writes benchmarks/results/quality_criteria.json (--out DIR: DIR/quality_criteria.json). Quality numbers are
load-independent (one thread per run, fixed seeds), so a rerun writes the same file.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from benchmarks.quality import (
    FULL,
    MODEL,
    RESULTS,
    SEEDS,
    STRUCTURES,
    Job,
    bench_parser,
    check_fair,
    prune_and_slice,
    recipe,
    require_assets,
    score,
    tokens_used,
    worker_pool,
)
from compresso_ops.evaluation.harness import load_model
from compresso_ops.infra import atomic
from compresso_ops.method.baselines import calibration_examples, run_one_shot
from compresso_ops.method.masks import MASKS_FILE
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.finetune import run_finetune
from compresso_ops.stages.plan import with_overrides
from compresso_ops.stages.prune import run_prune
from compresso_ops.stages.slice import run_slice
from compresso_ops.training.setup import load_source

RECOVERY = "full_kd"
CALIBRATION = 64  # training examples (of 128 tokens) the activation criteria and the repair read
RIDGE = 1e-2  # the repair's ridge, relative to the mean diagonal of its Gram matrix
CRITERIA = ("magnitude", "activation", "activation-uniform")
DISTILL_VARIANTS = ({"weight": 0.25}, {"weight": 0.75}, {"weight": 1.0}, {"temperature": 2.0})


@dataclass(frozen=True)
class Variant:
    criterion: str  # a CRITERIA entry, "compresso-full-kd" (the matrix's method) or "reference" (the source)
    sparsity: float
    seed: int
    repair: bool = False
    structures: tuple[str, ...] = tuple(STRUCTURES)  # compresso-full-kd only: what its gates prune
    distill: dict[str, float] = field(default_factory=dict)  # changes to full_kd's distillation

    @property
    def name(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.distill.items())
        gates = "" if self.structures == tuple(STRUCTURES) else " gates=" + "+".join(self.structures)
        return self.criterion + ("+repair" if self.repair else "") + gates + extra


def variants() -> list[Variant]:
    out = [Variant("reference", 0.0, seed) for seed in (42, 43)]
    for sparsity, seeds in SEEDS.items():
        for seed in seeds:
            out += [Variant(c, sparsity, seed) for c in CRITERIA]
            out += [Variant(c, sparsity, seed, repair=True) for c in ("activation", "activation-uniform")]
        out += [Variant("compresso-full-kd", sparsity, 42, structures=gates)
                for gates in (tuple(STRUCTURES), ("ffn",), (*STRUCTURES, "hidden"))]
    for change in DISTILL_VARIANTS:
        out += [Variant("reference", 0.0, 42, distill=change), Variant("magnitude", 0.2, 42, distill=change)]
    return out


def criterion_recipe(v: Variant, r: Recipe) -> Recipe:
    """`r` set to rank as criterion `v.criterion` does: the library's activation method on the first
    CALIBRATION training examples, allocated globally or uniformly."""
    return with_overrides(r, {"method": "activation", "prune.calibration_examples": CALIBRATION,
                              "prune.one_shot_allocation": "uniform" if v.criterion == "activation-uniform" else
                              "global"})


def calibration_ids(r: Recipe, tokenizer: Any) -> torch.Tensor:
    """The calibration examples of `r`, as one [n, seq] batch of token ids (the repair reads every position)."""
    examples = calibration_examples(r, tokenizer, 1 << 30)
    if len({len(e.input_ids) for e in examples}) != 1:
        raise SystemExit("calibration examples differ in length; the repair expects full text chunks")
    return torch.tensor([e.input_ids for e in examples])


@torch.no_grad()
def repair(sliced: Path, prune_dir: Path, r: Recipe) -> None:
    """Refit every layer's down_proj over its kept channels (ridge least squares, layer by layer) so its FFN
    output matches the unpruned FFN's on the same input; rewrites the sliced folder's weights in place."""
    source, tokenizer = load_model(MODEL)
    model, _ = load_model(sliced, tokenizer_path=MODEL)
    ids = calibration_ids(r, tokenizer)
    kept = load_file(str(prune_dir / MASKS_FILE))["ffn"].bool()
    weights_file = sliced / "model.safetensors"
    weights = load_file(str(weights_file))
    for layer, (src, dst) in enumerate(zip(source.model.layers, model.model.layers, strict=True)):
        inputs: list[torch.Tensor] = []
        handle = dst.mlp.register_forward_pre_hook(
            lambda _m, a, seen=inputs: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        try:
            model(ids)
        finally:
            handle.remove()
        x = torch.cat(inputs).double()
        act = src.mlp.act_fn(x @ src.mlp.gate_proj.weight.double().T) * (x @ src.mlp.up_proj.weight.double().T)
        target = act @ src.mlp.down_proj.weight.double().T
        a = act[:, kept[layer]]
        gram = a.T @ a
        ridge = RIDGE * gram.diagonal().mean()
        w0 = dst.mlp.down_proj.weight.double()
        w = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), a.T @ target + ridge * w0.T).T
        dst.mlp.down_proj.weight.copy_(w.float())
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        if key not in weights:
            raise SystemExit(f"{weights_file}: no {key}")
        weights[key] = w.float().contiguous()
    atomic.write_with(weights_file, lambda p: save_file(weights, str(p), metadata={"format": "pt"}))


def run_variant(v: Variant, root: str) -> dict[str, Any]:
    """Prune (or not), repair if asked, recover with full_kd (changed as `v.distill` says), score."""
    torch.set_num_threads(1)
    work = Path(root) / v.name.replace(" ", "_").replace("=", "") / f"{v.sparsity}-{v.seed}"
    method = "reference" if v.criterion == "reference" else "magnitude"
    job = Job(method, v.sparsity, v.seed, (RECOVERY,))
    prune_tokens = 0
    if v.criterion in ("reference", "magnitude"):
        sliced, _ = prune_and_slice(job, FULL, work)
    elif v.criterion == "compresso-full-kd":
        job = Job(v.criterion, v.sparsity, v.seed, (RECOVERY,))
        r = with_overrides(recipe(job, FULL), {"target.structures": list(v.structures)})
        run_prune(r, work / "prune")
        run_slice(r, work / "prune", work / "slice")
        sliced, prune_tokens = work / "slice" / "model", tokens_used(work / "prune")
    else:
        r = criterion_recipe(v, recipe(job, FULL))
        model, tokenizer, _ = load_source(r)
        run_one_shot(r, model, tokenizer, work / "prune")
        run_slice(r, work / "prune", work / "slice")
        sliced = work / "slice" / "model"
        if v.repair:
            repair(sliced, work / "prune", r)
    ppl_sliced, params = score(sliced)
    masks = work / "prune" / MASKS_FILE
    kept = load_file(str(masks)) if masks.is_file() else None
    r = with_overrides(recipe(job, FULL, RECOVERY), {f"finetune.distill.{k}": x for k, x in v.distill.items()})
    run_finetune(r, sliced, work / "finetune")
    ppl, _ = score(work / "finetune" / "model")
    return {"variant": v.name, "criterion": v.criterion, "repair": v.repair, "distill": r.finetune.distill.model_dump(),
            "sparsity": v.sparsity, "seed": v.seed, "params": params,
            "kept": {k: kept[k].sum(-1).int().tolist() for k in ("heads", "ffn", "hidden")} if kept else None,
            "budget_tokens": prune_tokens + tokens_used(work / "finetune"), "ppl": ppl, "ppl_before_recovery": ppl_sliced}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean perplexity over seeds per (sparsity, variant), as a ratio to the reference with the same
    distillation settings."""
    refs: dict[str, list[float]] = {}
    for r in rows:
        if r["criterion"] == "reference":
            refs.setdefault(str(r["distill"]), []).append(r["ppl"])
    cells: dict[str, Any] = {}
    for r in rows:
        if r["criterion"] != "reference":
            cells.setdefault(f"{r['sparsity']}/{r['variant']}", []).append(r)
    out = {}
    for key, group in cells.items():
        ppls = [r["ppl"] for r in group]
        ref = statistics.mean(refs[str(group[0]["distill"])])
        out[key] = {"ppl": round(statistics.mean(ppls), 4), "seeds": len(ppls), "spread": round(max(ppls) - min(ppls), 4),
                    "reference_ppl": round(ref, 4), "ratio_to_reference": round(statistics.mean(ppls) / ref, 4)}
    return out


def main() -> None:
    args = bench_parser(__doc__, "quality_criteria.json").parse_args()
    require_assets()
    t0 = time.perf_counter()
    with worker_pool(args.jobs) as (pool, tmp):
        rows = [f.result() for f in [pool.submit(run_variant, v, tmp) for v in variants()]]
    for r in rows:
        print(f"{r['sparsity']:<4} seed {r['seed']} {r['variant']:28s} params {r['params']:,}: "
              f"{r['ppl_before_recovery']:.3f} -> {r['ppl']:.3f}")
    check_fair(rows)
    cells = summarize(rows)
    for key, c in cells.items():
        print(f"{key:36s} {c['ppl']:.3f} ({c['seeds']} seeds, spread {c['spread']:.3f}) = "
              f"{c['ratio_to_reference']:.3f}x its reference {c['reference_ppl']:.3f}")
    data = {"settings": {"recovery": RECOVERY, "budget_steps": FULL.total, "calibration_examples": CALIBRATION,
                         "ridge": RIDGE}, "rows": rows, "cells": cells}
    out = args.out or RESULTS
    atomic.write_json(out / "quality_criteria.json", data)
    print(f"{time.perf_counter() - t0:.0f} s -> {out / 'quality_criteria.json'}")


if __name__ == "__main__":
    main()

"""Quality benchmark: which pruning method and which recovery give the best small model, at equal budget.

On the real stories260K model (../shared/assets/models/stories260K) with TinyStories text, it runs the whole
pipeline through the library's stage functions for a matrix of

- method: compresso (prune stage: LoRA q/v + gates + Lagrangian), magnitude (one-shot L2, LLM-Pruner's
  criterion), random (one-shot, a floor), compresso-full (the prune stage trains every weight,
  prune.train: full; scored with full-weight recovery only) and compresso-full-kd (the same, distilling from
  the source while it prunes, prune.distill; scored with full_kd only);
- recovery (the fine-tune stage): lora_qv (LoRA r=8 on q_proj, v_proj: the reference recipe), lora_all (LoRA
  r=8 on all seven projections), full (every weight, finetune.train: full), full_kd (every weight, the loss
  half distillation from the source, finetune.distill);
- prunable sparsity 0.20 (seeds 42 and 43) and 0.35 (seed 42);

plus the dense reference: the unpruned source trained with each recovery for the same budget (seeds 42 and
43), since training on this text helps the source too. Every score is sliding-window perplexity on
tinystories/dev.txt, text none of this training sees.

Fairness is enforced, not assumed: every run spends the same number of optimizer steps of the same examples
(compresso: prune + recovery; the others: recovery alone), and the benchmark sums the loss-carrying tokens each
run consumed (from the stages' events.jsonl) and fails unless they agree within one example; parameter counts
are read back from each exported folder and must agree within one KV group per sparsity.

The quality numbers do not depend on the machine's load: one torch thread per run, fixed seeds, so a rerun
writes the same quality.json (timings go to the console and quality.md only).

    .venv/bin/python -m benchmarks.quality [--quick] [--jobs 2] [--out DIR]

Without --out: benchmarks/results/quality.json and quality.md (--quick: quality-quick.json / .md). With
--out DIR: DIR/quality.json and DIR/quality.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compresso_ops.evaluation.harness import load_model
from compresso_ops.evaluation.measures import perplexity
from compresso_ops.infra import atomic
from compresso_ops.method.baselines import run_one_shot
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import export_pruned
from compresso_ops.recipe.schema import PerplexitySection, Recipe
from compresso_ops.stages.finetune import run_finetune
from compresso_ops.stages.prune import run_prune
from compresso_ops.stages.slice import run_slice
from compresso_ops.training.setup import load_source

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "tinystories"
RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = {0.2: (42, 43), 0.35: (42,)}
REFERENCE_SEEDS = (42, 43)
SEQ_LEN = 128
MICRO_BATCH = 4
PPL = {"window": 256, "stride": 128, "max_tokens": 16384}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("compresso", "compresso-full", "compresso-full-kd", "magnitude", "random")
# Methods whose prune stage trains every weight, and the one recovery each is scored with.
FULL_PRUNE = {"compresso-full": "full", "compresso-full-kd": "full_kd"}
DISTILL = {"weight": 0.5, "temperature": 1.0}
# The fine-tune section of each recovery; every method and the dense reference use the same one.
RECOVERIES: dict[str, dict[str, Any]] = {
    "lora_qv": {"train": "lora", "lr": 1e-3, "lora": {"r": 8, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    "lora_all": {"train": "lora", "lr": 1e-3, "lora": {"r": 8, "alpha": 8, "target_modules": ALL_LINEAR}},
    "full": {"train": "full", "lr": 1e-3},
    "full_kd": {"train": "full", "lr": 1e-3, "distill": DISTILL},
}
FINETUNE = {"unit": "steps", "schedule": "cosine", "warmup_ratio": 0.03, "micro_batch_size": MICRO_BATCH,
            "gradient_accumulation": 1, "checkpoint_every": 100_000}
# The prune stage of compresso (explicit rates: these are what a 200-step ramp needs; see gate_lr.json).
PRUNE_LR = {"lora": 1e-3, "gates": 0.5, "lagrangian": 0.3}
FULL_PRUNE_LR = {"lora": 1e-3, "gates": 0.5, "lagrangian": 0.3}
STRUCTURES = ["heads", "ffn"]
UNUSED_TARGET = 0.2  # the dense reference prunes nothing, but a recipe names a target


@dataclass(frozen=True)
class Budget:
    """Optimizer steps of one run; every run spends `total` steps of MICRO_BATCH examples."""

    lora_only: int
    ramp: int
    hold: int
    recovery: int  # compresso's fine-tune after its prune stage

    @property
    def prune(self) -> int:
        return self.lora_only + self.ramp + self.hold

    @property
    def total(self) -> int:
        return self.prune + self.recovery


FULL = Budget(lora_only=20, ramp=200, hold=180, recovery=200)
QUICK = Budget(lora_only=5, ramp=40, hold=35, recovery=40)


@dataclass(frozen=True)
class Job:
    """One pruned model (or the dense source) and the recoveries it is scored with."""

    method: str  # a METHODS entry, or "reference"
    sparsity: float
    seed: int
    recoveries: tuple[str, ...]


def recipe(job: Job, budget: Budget, recovery: str | None = None) -> Recipe:
    trained = job.method.startswith("compresso")
    steps = budget.recovery if trained else budget.total
    finetune = {**FINETUNE, **RECOVERIES[recovery or "lora_qv"], "duration": steps, "seed": job.seed}
    return Recipe(
        name="quality", method="compresso" if trained else ("magnitude" if job.method == "reference" else job.method),
        model={"path": str(MODEL)}, target={"sparsity": job.sparsity or UNUSED_TARGET, "structures": STRUCTURES},
        prompt={"text": "none"}, data={"path": str(DATA / "train.txt"), "format": "text", "max_seq_length": SEQ_LEN},
        prune={"train": "full" if job.method in FULL_PRUNE else "lora",
               "schedule": {"unit": "steps", "lora_only": budget.lora_only, "ramp": budget.ramp, "hold": budget.hold},
               "lr": FULL_PRUNE_LR if job.method in FULL_PRUNE else PRUNE_LR,
               "distill": DISTILL if job.method == "compresso-full-kd" else {"weight": 0.0},
               "micro_batch_size": MICRO_BATCH, "gradient_accumulation": 1, "seed": job.seed,
               "checkpoint_every": 100_000},
        finetune=finetune, export={"mode": "native", "dtype": "float32"},
    )


def tokens_used(stage_dir: Path) -> int:
    """Loss-carrying tokens a training stage consumed, from its per-step events."""
    path = stage_dir / "events.jsonl"
    return sum(json.loads(line)["tokens"] for line in path.read_text().splitlines() if line.strip())


def score(model_dir: Path) -> tuple[float, int]:
    """Perplexity of an exported folder and its parameter count read back from disk (checked against the
    manifest the export wrote)."""
    model, tok = load_model(model_dir, tokenizer_path=MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = json.loads((model_dir / "compresso_manifest.json").read_text())
    if n_params != manifest["params"]["exported"]["total"]:
        raise SystemExit(f"{model_dir}: reloaded {n_params} parameters, manifest says "
                         f"{manifest['params']['exported']['total']}")
    with torch.no_grad():
        ppl = perplexity(model, tok, PerplexitySection(path=DATA / "dev.txt", **PPL))["perplexity"]
    return round(ppl, 4), n_params


def prune_and_slice(job: Job, budget: Budget, work: Path, r: Recipe | None = None) -> tuple[Path, int]:
    """The sliced model of `job` and the tokens its prune stage consumed (0 for one-shot and the source);
    `r`: the pruning recipe when it is not `recipe(job, budget)`."""
    r = r or recipe(job, budget)
    if job.method == "reference":  # the source itself, as a native export of all its structures
        model, tok, _ = load_source(r)
        export_pruned(model.eval(), tok, Masks.full(ArchSpec.from_hf_config(model.config)), "native",
                      work / "slice" / "model", source_info={"path": str(MODEL), "revision": None,
                                                             "dtype": "float32"})
        return work / "slice" / "model", 0
    if job.method in ("magnitude", "random", "activation"):
        model, tok, _ = load_source(r)
        run_one_shot(r, model, tok, work / "prune")
        prune_tokens = 0
    else:
        run_prune(r, work / "prune")
        prune_tokens = tokens_used(work / "prune")
    run_slice(r, work / "prune", work / "slice")
    return work / "slice" / "model", prune_tokens


def run_job(job: Job, budget: Budget, root: str) -> dict[str, Any]:
    """Prune (or not), then every recovery of `job`; the rows it contributes. Runs in a worker process."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = Path(root) / f"{job.method}-{job.sparsity}-{job.seed}"
    sliced, prune_tokens = prune_and_slice(job, budget, work)
    ppl_sliced, params = score(sliced)
    rows = []
    for recovery in job.recoveries:
        run_finetune(recipe(job, budget, recovery), sliced, work / f"finetune-{recovery}")
        ppl, params_ft = score(work / f"finetune-{recovery}" / "model")
        if params_ft != params:
            raise SystemExit(f"{job}: recovery {recovery} changed the parameter count ({params} -> {params_ft})")
        rows.append({"method": job.method, "sparsity": job.sparsity, "recovery": recovery, "seed": job.seed,
                     "params": params, "budget_tokens": prune_tokens + tokens_used(work / f"finetune-{recovery}"),
                     "ppl": ppl, "ppl_before_recovery": ppl_sliced})
    return {"rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def jobs() -> list[Job]:
    out = [Job("reference", 0.0, seed, tuple(RECOVERIES)) for seed in REFERENCE_SEEDS]
    for sparsity, seeds in SEEDS.items():
        for seed in seeds:
            out += [Job(m, sparsity, seed, (FULL_PRUNE[m],) if m in FULL_PRUNE else tuple(RECOVERIES)) for m in METHODS]
    return out


def check_fair(rows: list[dict[str, Any]]) -> None:
    """Same budget (within one example's tokens) everywhere, same size (within one KV group of the source)
    per sparsity."""
    arch = ArchSpec.from_pretrained_dir(MODEL)
    group_cost = arch.hidden_size * arch.head_dim * 2 * (arch.group_size + 1)
    tokens = [r["budget_tokens"] for r in rows]
    if max(tokens) - min(tokens) > MICRO_BATCH * SEQ_LEN:
        raise SystemExit(f"training budgets differ: {sorted(set(tokens))}")
    for s in SEEDS:
        params = [r["params"] for r in rows if r["sparsity"] == s]
        if max(params) - min(params) > group_cost:
            raise SystemExit(f"sparsity {s}: parameter counts differ by more than one KV group ({group_cost}): {params}")


def summarize(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean perplexity over seeds per (sparsity, method, recovery), its ratio to the dense reference trained
    with the same recovery, and the best combination per sparsity."""
    ref = {rec: statistics.mean(r["ppl"] for r in reference if r["recovery"] == rec) for rec in RECOVERIES}
    cells: dict[str, Any] = {}
    for s in SEEDS:
        for m in METHODS:
            for rec in RECOVERIES:
                ppls = [r["ppl"] for r in rows if (r["sparsity"], r["method"], r["recovery"]) == (s, m, rec)]
                if ppls:
                    cells[f"{s}/{m}/{rec}"] = seed_cell(ppls, ref[rec], min(ref.values()))
    return {"reference_ppl": {k: round(v, 4) for k, v in ref.items()}, "best_reference_ppl": round(min(ref.values()), 4),
            "cells": cells, "best": best_cells(cells, SEEDS)}


def seed_cell(ppls: list[float], reference: float, best_reference: float) -> dict[str, Any]:
    """One cell over its seeds: the mean perplexity, the seeds' spread, and its ratios to the dense reference
    trained the same way and to the best dense reference."""
    mean = statistics.mean(ppls)
    return {"ppl": round(mean, 4), "seeds": len(ppls), "spread": round(max(ppls) - min(ppls), 4),
            "ratio_to_reference": round(mean / reference, 4), "ratio_to_best_reference": round(mean / best_reference, 4)}


def best_cells(cells: dict[str, Any], sparsities: Iterable[float]) -> dict[str, Any]:
    """Per sparsity, the cell ("sparsity/...") with the lowest perplexity."""
    best = {}
    for s in sparsities:
        key = min((k for k in cells if k.startswith(f"{s}/")), key=lambda k: cells[k]["ppl"])
        best[str(s)] = {"cell": key, **cells[key]}
    return best


def table(summary: dict[str, Any], source_ppl: float) -> str:
    lines = [f"Dense reference (the source, {source_ppl:.3f} untrained), after each recovery: "
             + ", ".join(f"{rec} {ppl:.3f}" for rec, ppl in summary["reference_ppl"].items()) + ".", "",
             "| sparsity | method | " + " | ".join(f"{rec}: ppl (x ref)" for rec in RECOVERIES) + " |",
             "|---|---|" + "---|" * len(RECOVERIES)]
    for s in SEEDS:
        for m in METHODS:
            cells = [summary["cells"].get(f"{s}/{m}/{rec}") for rec in RECOVERIES]
            if not any(cells):
                continue
            text = [f"{c['ppl']:.3f} ({c['ratio_to_reference']:.2f}x)" + (f" ±{c['spread'] / 2:.3f}" if c["seeds"] > 1 else "")
                    if c else "—" for c in cells]
            lines.append(f"| {s} | {m} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def bench_parser(doc: str, output: str) -> argparse.ArgumentParser:
    """The quality scripts' command line: --jobs, and --out for the folder of `output`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--out", type=Path, default=None, help=f"folder for {output}")
    return parser


@contextmanager
def worker_pool(jobs: int) -> Iterator[tuple[ProcessPoolExecutor, str]]:
    """`jobs` spawned worker processes (each run sets one torch thread) and a scratch folder for their runs."""
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool, tmp


def require_assets() -> None:
    """Exit with one line when the shared model or text is not beside the repository."""
    if not MODEL.is_dir() or not (DATA / "train.txt").is_file():
        sys.exit(f"{MODEL} or {DATA} is absent: this benchmark needs the shared assets folder (../shared)")


def main() -> None:
    parser = bench_parser(__doc__, "quality.json / quality.md")
    parser.add_argument("--quick", action="store_true", help="short schedules (a fifth of the budget)")
    args = parser.parse_args()
    require_assets()
    torch.set_num_threads(1)
    budget = QUICK if args.quick else FULL
    name = "quality" if args.out or not args.quick else "quality-quick"
    out = args.out or RESULTS
    t0 = time.perf_counter()
    source_ppl, source_params = score_source()
    results = []
    with worker_pool(args.jobs) as (pool, tmp):
        futures = {pool.submit(run_job, job, budget, tmp): job for job in jobs()}
        for future, job in futures.items():
            result = future.result()
            results.append(result)
            for r in result["rows"]:
                print(f"{r['method']:14s} {r['sparsity']:<4} seed {r['seed']} {r['recovery']:8s}: params "
                      f"{r['params']:,}  ppl {r['ppl_before_recovery']:.3f} -> {r['ppl']:.3f}", flush=True)
            print(f"  ({job.method} {job.sparsity} seed {job.seed}: {result['seconds']} s)", flush=True)
    all_rows = [r for result in results for r in result["rows"]]
    reference = [{"recovery": r["recovery"], "seed": r["seed"], "ppl": r["ppl"], "budget_tokens": r["budget_tokens"]}
                 for r in all_rows if r["method"] == "reference"]
    rows = [r for r in all_rows if r["method"] != "reference"]
    check_fair(all_rows)
    summary = summarize(rows, reference)
    settings = {"mode": "quick" if args.quick else "full", "budget_steps": budget.total, "seq_len": SEQ_LEN,
                "micro_batch": MICRO_BATCH, "prune_schedule": {"lora_only": budget.lora_only, "ramp": budget.ramp,
                                                               "hold": budget.hold, "recovery": budget.recovery},
                "prune_lr": PRUNE_LR, "full_prune_lr": FULL_PRUNE_LR, "recoveries": RECOVERIES,
                "structures": STRUCTURES, "perplexity": {**PPL, "file": "tinystories/dev.txt"}, "prompt": "none"}
    data = {"settings": settings, "source": {"params": source_params, "ppl": source_ppl}, "rows": rows,
            "reference": reference, "summary": summary}
    atomic.write_json(out / f"{name}.json", data)
    elapsed = time.perf_counter() - t0
    text = table(summary, source_ppl)
    print(text)
    write_markdown(out / f"{name}.md", text, summary, settings, elapsed, args.jobs)
    print(f"{elapsed:.0f} s -> {out / name}.json")


def score_source() -> tuple[float, int]:
    model, tok = load_model(MODEL)
    with torch.no_grad():
        ppl = perplexity(model, tok, PerplexitySection(path=DATA / "dev.txt", **PPL))["perplexity"]
    return round(ppl, 4), sum(p.numel() for p in model.parameters())


def write_markdown(path: Path, text: str, summary: dict[str, Any], settings: dict[str, Any], seconds: float,
                   jobs: int) -> None:
    """The matrix plus how it was made; keeps a hand-written section from "## What it shows" on if the file
    has one."""
    kept = ""
    if path.is_file() and "## What it shows" in path.read_text():
        old = path.read_text()
        kept = old[old.index("## What it shows"):]
    quick = settings["mode"] == "quick"
    best = "; ".join(f"at {s}: {b['cell'].split('/', 1)[1]} ({b['ppl']:.3f}, {b['ratio_to_reference']:.2f}x the "
                     f"reference with the same recovery, {b['ratio_to_best_reference']:.2f}x the best reference)"
                     for s, b in summary["best"].items())
    body = (
        f"# Quality: method x recovery at equal budget on stories260K ({settings['mode']} run)\n\n"
        f"Produced by `python -m benchmarks.quality{' --quick' if quick else ''}` in {seconds:.0f} s ({jobs} runs "
        "in parallel, one torch thread each).\n\n"
        f"{text}\n\n"
        f"Best: {best}.\n\n"
        "- Perplexity: `tinystories/dev.txt`, sliding window {window} tokens, stride {stride}, first {max_tokens} "
        "tokens, no prompt. Rows with two seeds show the mean and ± half the spread.\n".format(**PPL)
        + f"- Budget: every run trains {settings['budget_steps']} optimizer steps of {MICRO_BATCH} x {SEQ_LEN}-token "
        f"examples (checked from the events). Compresso spends {settings['budget_steps'] - settings['prune_schedule']['recovery']} "
        f"of them pruning and {settings['prune_schedule']['recovery']} recovering; magnitude, random and the dense "
        "reference spend all of them recovering.\n"
        "- Recoveries: lora_qv = LoRA r=8 on q_proj/v_proj, lora_all = LoRA r=8 on all seven projections, full = "
        "every weight, full_kd = every weight with the loss (1 - 0.5) LM + 0.5 KL to the untrained source "
        "(temperature 1); lr 1e-3 for all, cosine, 3% warm-up. Prune rates: LoRA (or every weight) 1e-3, gates "
        "0.5, multipliers 0.3; compresso-full-kd distils from the source while pruning, with the same weight. "
        "Structures: heads and FFN channels for every method.\n"
        "- `x ref` is the ratio to the dense source trained with the same recovery and budget (mean of its seeds); "
        "the best reference is the lowest of those over all recoveries.\n\n"
    )
    atomic.write_text(path, body + kept)


if __name__ == "__main__":
    main()

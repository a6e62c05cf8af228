"""How the gap to the dense reference closes with the training budget (the quality benchmark's best recovery).

`benchmarks/quality.py` compares methods and recoveries at one budget (600 optimizer steps). This script
takes its best recovery, full_kd (every weight, half the loss distillation from the source), and runs the dense
reference, magnitude pruning and compresso-full-kd (full-weight pruning that distils too) at 1x and 4x that
budget, at prunable sparsity 0.20 and 0.35, seed 42, with the same settings and the same checks (equal tokens
per budget, parameter counts read back from the exports). The prune stage's phases and the recovery scale
with the budget, so the 1x rows are the quality matrix's seed-42 full_kd cells.

    .venv/bin/python -m benchmarks.quality_budget [--quick] [--jobs 2] [--out DIR]

Writes benchmarks/results/quality_budget.json (--quick: quality_budget-quick.json; --out DIR: DIR/quality_budget.json).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.quality import (
    FULL,
    QUICK,
    RESULTS,
    SEQ_LEN,
    Budget,
    Job,
    bench_parser,
    check_fair,
    require_assets,
    run_job,
    worker_pool,
)
from compresso_ops.infra import atomic

SCALES = (1, 4)
SPARSITIES = (0.2, 0.35)
RECOVERY = "full_kd"
METHODS = {"magnitude": RECOVERY, "compresso-full-kd": RECOVERY}
SEED = 42


def scaled(budget: Budget, factor: int) -> Budget:
    return Budget(budget.lora_only * factor, budget.ramp * factor, budget.hold * factor, budget.recovery * factor)


def jobs() -> list[Job]:
    out = [Job("reference", 0.0, SEED, (RECOVERY,))]
    out += [Job(method, s, SEED, (rec,)) for s in SPARSITIES for method, rec in METHODS.items()]
    return out


def main() -> None:
    parser = bench_parser(__doc__, "quality_budget.json")
    parser.add_argument("--quick", action="store_true", help="scale the quick benchmark's budget instead")
    args = parser.parse_args()
    require_assets()
    torch.set_num_threads(1)
    base = QUICK if args.quick else FULL
    name = "quality_budget" if args.out or not args.quick else "quality_budget-quick"
    t0 = time.perf_counter()
    work = [(factor, job) for factor in sorted(SCALES, reverse=True) for job in jobs()]  # longest first
    rows: list[dict[str, Any]] = []
    with worker_pool(args.jobs) as (pool, tmp):
        futures = [(factor, pool.submit(run_job, job, scaled(base, factor), f"{tmp}/x{factor}")) for factor, job in work]
        for factor, future in futures:
            for r in future.result()["rows"]:
                rows.append({**r, "steps": scaled(base, factor).total})
                print(f"x{factor} {r['method']:18s} {r['sparsity']:<4}: ppl {r['ppl']:.3f}", flush=True)
    by_steps: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_steps.setdefault(r["steps"], []).append(r)
    summary = []
    for steps, group in sorted(by_steps.items()):
        check_fair(group)
        reference = next(r["ppl"] for r in group if r["method"] == "reference")
        summary += [{"steps": steps, "method": r["method"], "sparsity": r["sparsity"], "ppl": r["ppl"],
                     "reference_ppl": reference, "ratio_to_reference": round(r["ppl"] / reference, 4)}
                    for r in group if r["method"] != "reference"]
    summary.sort(key=lambda c: (c["sparsity"], c["method"], c["steps"]))
    data = {"settings": {"mode": "quick" if args.quick else "full", "recovery": RECOVERY, "seed": SEED,
                         "scales": list(SCALES), "base_steps": base.total, "seq_len": SEQ_LEN},
            "rows": [{k: r[k] for k in ("method", "sparsity", "steps", "params", "budget_tokens", "ppl")}
                     for r in rows],
            "summary": summary}
    out = args.out or RESULTS
    atomic.write_json(out / f"{name}.json", data)
    for c in summary:
        print(f"{c['steps']:5d} steps  {c['method']:18s} {c['sparsity']:<4}: {c['ppl']:.3f} / {c['reference_ppl']:.3f}"
              f" = {c['ratio_to_reference']:.3f}x")
    print(f"{time.perf_counter() - t0:.0f} s -> {out / name}.json")


if __name__ == "__main__":
    main()

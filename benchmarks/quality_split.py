"""How Compresso should split the quality benchmark's budget between pruning and recovery.

`benchmarks/quality.py` gives compresso 400 of its 600 optimizer steps for pruning (20 adapter-only, a
200-step ramp, 180 steps holding the target) and 200 for recovery, while the one-shot methods spend all 600
at their final shape. This script runs compresso-full-kd (every weight trains and distils while pruning; the
same in recovery, full_kd) with the pruning phases shrunk in proportion and the steps given to recovery, at
prunable sparsity 0.20 and 0.35, seed 42, against the dense reference of the same budget and recovery and
against magnitude pruning with it. Same checks as the quality matrix (equal tokens, parameter counts read
back from the exports).

    .venv/bin/python -m benchmarks.quality_split [--jobs 2] [--out DIR]

Writes benchmarks/results/quality_split.json (--out DIR: DIR/quality_split.json).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.quality import (
    FULL,
    RESULTS,
    Budget,
    Job,
    bench_parser,
    check_fair,
    require_assets,
    run_job,
    worker_pool,
)
from compresso_ops.infra import atomic

RECOVERY = "full_kd"
SEED = 42
SPARSITIES = (0.2, 0.35)
PRUNE_SHARES = (1.0, 0.5, 0.25)  # of the quality matrix's 400 pruning steps; the rest of the 600 recovers


def split(share: float) -> Budget:
    """FULL's phases scaled by `share`, the steps they give up added to recovery (the total stays FULL's)."""
    lora_only, ramp, hold = (round(n * share) for n in (FULL.lora_only, FULL.ramp, FULL.hold))
    return Budget(lora_only, ramp, hold, FULL.total - lora_only - ramp - hold)


def main() -> None:
    args = bench_parser(__doc__, "quality_split.json").parse_args()
    require_assets()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    work = [(None, Job("reference", 0.0, SEED, (RECOVERY,)))]
    work += [(None, Job("magnitude", s, SEED, (RECOVERY,))) for s in SPARSITIES]
    work += [(share, Job("compresso-full-kd", s, SEED, (RECOVERY,))) for share in PRUNE_SHARES for s in SPARSITIES]
    rows: list[dict[str, Any]] = []
    with worker_pool(args.jobs) as (pool, tmp):
        futures = [(share, pool.submit(run_job, job, split(share or 1.0), f"{tmp}/share{share}"))
                   for share, job in work]
        for share, future in futures:
            for r in future.result()["rows"]:
                budget = split(share) if share is not None else None
                rows.append({k: r[k] for k in ("method", "sparsity", "params", "budget_tokens", "ppl")}
                            | {"prune_steps": budget.prune if budget else 0,
                               "recovery_steps": budget.recovery if budget else FULL.total})
                print(f"{r['method']:18s} {r['sparsity']:<4} prune {rows[-1]['prune_steps']:3d}: ppl {r['ppl']:.3f}",
                      flush=True)
    check_fair(rows)
    reference = next(r["ppl"] for r in rows if r["method"] == "reference")
    for r in rows:
        r["ratio_to_reference"] = round(r["ppl"] / reference, 4)
    data = {"settings": {"recovery": RECOVERY, "seed": SEED, "budget_steps": FULL.total,
                         "prune_shares": list(PRUNE_SHARES)}, "reference_ppl": reference, "rows": rows}
    out = args.out or RESULTS
    atomic.write_json(out / "quality_split.json", data)
    for r in rows:
        print(f"{r['method']:18s} {r['sparsity']:<4} prune {r['prune_steps']:3d} + recover {r['recovery_steps']:3d}: "
              f"{r['ppl']:.3f} = {r['ratio_to_reference']:.3f}x")
    print(f"{time.perf_counter() - t0:.0f} s -> {out / 'quality_split.json'}")


if __name__ == "__main__":
    main()

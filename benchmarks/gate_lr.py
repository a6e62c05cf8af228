"""Do the gates reach the target by the end of the ramp? The paper's learning rates against "auto".

The paper trains the gates and the Lagrange multipliers at 0.1 over a 1,628-step ramp. On a short, steps-based
schedule the same rates leave the expected sparsity far below the target when the ramp ends, and the final
masks are then cut from barely trained gates. `prune.lr.gates` / `prune.lr.lagrangian: auto` keep the
travel lr x ramp steps of a long ramp (method/rates.py). This runs the prune stage on the real stories260K
(../shared/assets) with TinyStories text at target prunable sparsity 0.2 (heads and FFN channels), for ramps
of 40, 200 and 800 steps, each with the paper's rates and with auto, and reads the expected sparsity at the
last ramp step from the stage's events.jsonl. Writes benchmarks/results/gate_lr.json.

    .venv/bin/python -m benchmarks.gate_lr [--out benchmarks/results/gate_lr.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from compresso_ops.infra import atomic
from compresso_ops.method.rates import gate_learning_rates
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.prune import run_prune

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "tinystories" / "train.txt"
TARGET = 0.2
RAMPS = (40, 200, 800)
RATES = {"paper": {"gates": 0.1, "lagrangian": 0.1}, "auto": {"gates": "auto", "lagrangian": "auto"}}


def run(ramp: int, rates: dict, work: Path) -> dict:
    lora_only = max(1, ramp // 10)
    recipe = Recipe(
        name="gate-lr", model={"path": str(MODEL)}, target={"sparsity": TARGET, "structures": ["heads", "ffn"]},
        prompt={"text": "none"}, data={"path": str(DATA), "format": "text", "max_seq_length": 128},
        prune={"schedule": {"unit": "steps", "lora_only": lora_only, "ramp": ramp, "hold": 0},
               "lr": {"lora": 1e-3, **rates}, "micro_batch_size": 4, "gradient_accumulation": 1, "seed": 42,
               "checkpoint_every": 100_000})
    t0 = time.perf_counter()
    result = run_prune(recipe, work)
    events = [json.loads(line) for line in (work / "events.jsonl").read_text().splitlines() if line.strip()]
    end = events[lora_only + ramp - 1]
    gates, lagrangian = gate_learning_rates(rates["gates"], rates["lagrangian"], ramp)
    return {"ramp_steps": ramp, "rates": "paper" if rates == RATES["paper"] else "auto", "lr_gates": gates,
            "lr_lagrangian": lagrangian, "expected_sparsity_at_ramp_end": round(end["expected_sparsity"], 4),
            "target": TARGET, "achieved_sparsity": round(result["achieved_sparsity"], 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gate_lr.json")
    args = parser.parse_args()
    if not MODEL.is_dir() or not DATA.is_file():
        sys.exit(f"{MODEL} or {DATA} is absent: this benchmark needs the shared assets folder (../shared)")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ramp in RAMPS:
            for name, rates in RATES.items():
                row = run(ramp, rates, Path(tmp) / f"{ramp}-{name}")
                rows.append(row)
                print(f"ramp {ramp:4d} {name:5s}: lr gates {row['lr_gates']:.3g}, lambdas {row['lr_lagrangian']:.3g} "
                      f"-> expected sparsity {row['expected_sparsity_at_ramp_end']:.3f} at the ramp's end "
                      f"(target {TARGET}) [{row['seconds']} s]", flush=True)
    atomic.write_json(args.out, {"model": "stories260K", "data": "tinystories/train.txt", "rows": rows})


if __name__ == "__main__":
    main()

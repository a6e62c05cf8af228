"""Peak host memory of loading a model under FSDP: 2 gloo processes, sharded loading against today's loader.

The source is `benchmarks/slice_memory.py`'s random LLaMA of about 1B parameters in fp16 safetensors shards
of at most 500 MB (made when missing). Two processes (torchrun, gloo, CPU) prepare it for pruning as the
prune stage does under FSDP, with the base held in fp16 as on a V100 node:
- sharded: `training/sharded_load.py` (placeholders, meta, each rank reads only its rows);
- whole: `from_pretrained` in every process, then `fully_shard` (the loader before sharded loading);
- replica: `from_pretrained` in every process and every weight read, no sharding (DDP's load before the
  copy moves to a GPU): with the source stored in the compute dtype the weights stay views of the mmap'd
  files, so the node's page cache holds one copy; `private_bytes` (anonymous memory grown) shows no process
  holds its own.
Each process reports its peak RSS above its RSS after the imports; the node's figure is the sum over the
two processes, set against the fp16 model size (`node_peak_over_model`; the goal is at most 1.3). On CPU the
shards themselves stay in RAM (on GPUs they would leave it), so the figure errs high.

    python -m benchmarks.load_memory [--work DIR] [--out benchmarks/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.slice_memory import current_rss_bytes, peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("sharded", "whole", "replica")


def _anonymous_bytes() -> int:
    """Memory of this process that no file backs (its private copies), from /proc/self/smaps_rollup."""
    with open("/proc/self/smaps_rollup") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Anonymous:"))


def _worker(source: Path, variant: str, out: Path) -> None:
    """One rank: load and shard as the prune stage does; write this rank's memory numbers."""
    import peft  # noqa: F401  (imports count as the interpreter, not as the load)
    import torch
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from compresso_ops.recipe.schema import PruneSection
    from compresso_ops.training.distributed import init_distributed, shutdown_distributed
    from compresso_ops.training.precision import Precision
    from compresso_ops.training.setup import freeze_for_training, prepare_for_training
    from compresso_ops.training.sharded_load import placeholder_model
    from compresso_ops.training.sharding import weights_held

    torch.set_num_threads(1)
    dist = init_distributed()
    precision = Precision(torch.device("cpu"), torch.float16, dist=dist, shard_base=True)
    before, private_before = current_rss_bytes(), _anonymous_bytes()
    if variant == "replica":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16)
        with torch.no_grad():
            for p in model.parameters():
                p.float().sum()  # fault every page in, as the copy to a GPU does
        result = {"rank": dist.rank, "peak_above_imports_bytes": peak_rss_bytes() - before,
                  "private_bytes": _anonymous_bytes() - private_before}
        (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
        shutdown_distributed()
        return
    if variant == "sharded":
        model = placeholder_model(source, AutoConfig.from_pretrained(source), torch.float16)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16)
    freeze_for_training(model, precision)
    section = PruneSection(lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    model = prepare_for_training(model, section, "prune.lora.target_modules", precision)
    held = weights_held(model, precision)
    result = {"rank": dist.rank, "rss_after_imports_bytes": before, "peak_rss_bytes": peak_rss_bytes(),
              "peak_above_imports_bytes": peak_rss_bytes() - before, "frozen_bytes_held": held}
    (out / f"rank{dist.rank}.json").write_text(json.dumps(result))
    shutdown_distributed()


def _launch(source: Path, variant: str, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "benchmarks.load_memory", "--worker", str(source), variant, str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="slice_memory's folder (the source is made when missing)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    parser.add_argument("--worker", nargs=3, metavar=("SOURCE", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(Path(args.worker[0]), args.worker[1], Path(args.worker[2]))
        return
    from compresso_ops.models.architecture import ArchSpec
    from compresso_ops.models.sizes import count_params

    work = Path(args.work or tempfile.mkdtemp(prefix="load-memory-"))
    if not (work / "source").is_dir():
        subprocess.run([sys.executable, "-m", "benchmarks.slice_memory", "--make", str(work), "full"], check=True,
                       cwd=ROOT)
    fp16_bytes = count_params(ArchSpec.from_pretrained_dir(work / "source")).total * 2
    result: dict = {"source": "benchmarks/slice_memory.py full model, fp16 safetensors shards of 500MB",
                    "fp16_model_bytes": fp16_bytes, "processes": 2, "goal_node_peak_over_model": 1.3}
    for variant in VARIANTS:
        ranks = _launch(work / "source", variant, work / f"load-{variant}")
        node = sum(r["peak_above_imports_bytes"] for r in ranks)
        result[variant] = {"ranks": ranks, "node_peak_above_imports_bytes": node,
                           "node_private_bytes": sum(r.get("private_bytes", 0) for r in ranks),
                           "per_process_peak_over_model": [r["peak_above_imports_bytes"] / fp16_bytes for r in ranks],
                           "node_peak_over_model": node / fp16_bytes}
        print(f"{variant}: per process {[f'{x:.2f}' for x in result[variant]['per_process_peak_over_model']]}, "
              f"node {node / 2**20:,.0f} MiB = {result[variant]['node_peak_over_model']:.2f}x the fp16 model")
    result["node_peak_over_model"] = result["sharded"]["node_peak_over_model"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

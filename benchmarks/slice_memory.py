"""Peak host memory of the slice stage's export, with and without releasing the source first.

The slice stage loads the source in fp32, slices it, writes the export and reloads it from disk to check it.
Holding the source through the write and the reload puts three models in memory at once (for LLaMA-7B at
20% sparsity: 27 + 22 + 22 GB); `export_pruned(..., release_source=True)`, which the stage uses, frees the
source once the sliced model is checked. Each variant runs in a fresh process (the peak resident set of a
process only grows), on the same random LLaMA and masks, and reports its peak RSS above the RSS after
loading the source; the ratio of the two is the saving, measured in one run. The released run's peak above
the process's RSS before loading (Python, torch, transformers) is also set against what `plan` states for
the slice stage: the fp32 source plus the sliced model.

    python -m benchmarks.slice_memory [--quick] [--out benchmarks/results/slice_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "full": {"hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8,
             "intermediate_size": 2816, "vocab_size": 32000, "max_position_embeddings": 512},
    "quick": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 704, "vocab_size": 8000, "max_position_embeddings": 256},
}
SPARSITY = 0.2


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _child(source: Path, out: Path, release: bool) -> None:
    """One export in this process; prints its memory numbers as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    from compresso_ops.method.masks import select_final_masks_from_scores
    from compresso_ops.models.architecture import ArchSpec
    from compresso_ops.models.export import export_pruned

    torch.set_num_threads(1)
    before_load = _current_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    arch = ArchSpec.from_hf_config(model.config)
    gen = torch.Generator().manual_seed(0)
    scores = {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=gen),
              "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=gen),
              "hidden": torch.rand(arch.hidden_size, generator=gen)}
    masks = select_final_masks_from_scores(scores, arch, SPARSITY, "native", ("heads", "ffn"))
    source_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = _current_rss_bytes()
    manifest = export_pruned(model, None, masks, "native", out, source_info={"path": str(source), "dtype": "float32"},
                             dtype="float32", release_source=release)
    print(json.dumps({"release_source": release, "source_weights_bytes": source_bytes,
                      "export_weights_bytes": manifest["weights_bytes"], "rss_before_load_bytes": before_load,
                      "rss_after_load_bytes": loaded, "peak_above_runtime_bytes": _peak_rss_bytes() - before_load,
                      "peak_rss_bytes": _peak_rss_bytes(), "peak_above_load_bytes": _peak_rss_bytes() - loaded,
                      "checks_passed": manifest["checks"]["passed"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model: checks the script")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slice_memory.json"))
    parser.add_argument("--child", nargs=3, metavar=("SOURCE", "OUT", "RELEASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]), args.child[2] == "1")
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    work = Path(tempfile.mkdtemp(prefix="slice-memory-"))
    torch.manual_seed(0)
    shape = SHAPES["quick" if args.quick else "full"]
    LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(work / "source")
    runs = []
    for release in (False, True):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.slice_memory", "--child", str(work / "source"), str(work / f"out{release:d}"),
                               str(int(release))], capture_output=True, text=True, check=True, cwd=ROOT)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"release_source={release}: peak {runs[-1]['peak_above_load_bytes'] / 2**20:,.0f} MiB above the loaded "
              f"source ({runs[-1]['source_weights_bytes'] / 2**20:,.0f} MiB of weights)")
    kept, released = runs
    result = {"model": shape, "sparsity": SPARSITY, "runs": runs,
              "peak_above_load_released_over_kept": released["peak_above_load_bytes"] / kept["peak_above_load_bytes"],
              "peak_released_over_kept": released["peak_rss_bytes"] / kept["peak_rss_bytes"]}
    planned = released["source_weights_bytes"] + released["export_weights_bytes"]  # fp32 export: its params
    result["plan_slice_bytes"] = planned
    result["plan_over_measured"] = planned / released["peak_above_runtime_bytes"]
    print(f"peak above load: released / kept = {result['peak_above_load_released_over_kept']:.2f}; "
          f"whole-process peak: {result['peak_released_over_kept']:.2f}; plan's slice estimate / measured "
          f"peak above the runtime: {result['plan_over_measured']:.2f}")
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

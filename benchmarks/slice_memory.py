"""Peak host memory of the slice stage: streamed from safetensors against loading the model whole.

A random LLaMA of about 1B parameters is saved in fp16 safetensors shards of at most 500 MB with a LoRA
adapter on q_proj and v_proj (as the prune stage leaves it) and random masks at 20% sparsity. Each path runs
in a fresh process (the peak resident set of a process only grows) and reports its peak RSS above the RSS
after the imports (the interpreter, torch, transformers); that peak over the fp32 model size is the figure:
- stream: `models/streaming_slice.stream_export`, output shards of at most 500 MB;
- in_memory: the fp32 source loaded, the LoRA merged with peft, `export_pruned(release_source=True)`.
Both write the same export (the script checks the weight files are identical). The goal for the stream is
a peak of at most 0.25x the fp32 model size.

    python -m benchmarks.slice_memory [--quick] [--out benchmarks/results/slice_memory.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "full": {"hidden_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 16, "num_key_value_heads": 16,
             "intermediate_size": 5504, "vocab_size": 32000, "max_position_embeddings": 512},
    "quick": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 704, "vocab_size": 8000, "max_position_embeddings": 256},
}
SOURCE_SHARD = {"full": "500MB", "quick": "1MB"}
SPARSITY = 0.2


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def make_source(work: Path, shape: dict, shard: str) -> None:
    """The random source (fp16 safetensors shards), its LoRA adapter and masks, in `work`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from compresso_ops.method.masks import select_final_masks_from_scores
    from compresso_ops.models.architecture import ArchSpec

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.float16)
    model.save_pretrained(work / "source", max_shard_size=shard)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(work / "lora")
    arch = ArchSpec.from_hf_config(model.config)
    gen = torch.Generator().manual_seed(0)
    scores = {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=gen),
              "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=gen),
              "hidden": torch.rand(arch.hidden_size, generator=gen)}
    select_final_masks_from_scores(scores, arch, SPARSITY, "native", ("heads", "ffn")).save(work / "prune", arch)


def _child(work: Path, path: str, out_shard: str) -> None:
    """One export in this process; prints its memory numbers as JSON."""
    import peft  # noqa: F401  (imports count as the interpreter, not as the export)
    import torch
    import transformers.modeling_utils  # noqa: F401
    from huggingface_hub import split_torch_state_dict_into_shards  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, MistralForCausalLM  # noqa: F401

    import compresso_ops.models.modeling_compresso  # noqa: F401
    from compresso_ops.method.masks import Masks
    from compresso_ops.models.architecture import ArchSpec
    from compresso_ops.models.export import export_pruned
    from compresso_ops.models.slicing import merge_lora
    from compresso_ops.models.streaming_slice import stream_export

    torch.set_num_threads(1)
    config = AutoConfig.from_pretrained(work / "source")
    arch = ArchSpec.from_hf_config(config)
    masks = Masks.load(work / "prune")
    info = {"path": str(work / "source"), "dtype": "float16"}
    out = work / f"out-{path}"
    before = current_rss_bytes()
    start = time.perf_counter()
    if path == "stream":
        manifest = stream_export(work / "source", work / "lora", masks, "native", out, source_config=config,
                                 tokenizer=None, source_info=info, max_shard_size=out_shard)
    else:
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(work / "source", dtype=torch.float32)
        model = merge_lora(PeftModel.from_pretrained(model, work / "lora"))
        manifest = export_pruned(model, None, masks, "native", out, source_info=info, max_shard_size=out_shard,
                                 release_source=True)
    from compresso_ops.models.sizes import count_params

    fp32_bytes = count_params(arch).total * 4
    print(json.dumps({"path": path, "fp32_model_bytes": fp32_bytes, "rss_after_imports_bytes": before,
                      "peak_rss_bytes": peak_rss_bytes(), "peak_above_imports_bytes": peak_rss_bytes() - before,
                      "peak_over_model": (peak_rss_bytes() - before) / fp32_bytes,
                      "seconds": time.perf_counter() - start, "checks_passed": manifest["checks"]["passed"],
                      "export_weights_bytes": manifest["weights_bytes"]}))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors*")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model: checks the script")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slice_memory.json"))
    parser.add_argument("--work", help="reuse this folder (the source is made when missing)")
    parser.add_argument("--child", nargs=3, metavar=("WORK", "PATH", "SHARD"), help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("WORK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), args.child[1], args.child[2])
        return
    if args.make:
        make_source(Path(args.make[0]), SHAPES[args.make[1]], SOURCE_SHARD[args.make[1]])
        return
    size = "quick" if args.quick else "full"
    work = Path(args.work or tempfile.mkdtemp(prefix="slice-memory-"))
    if not (work / "prune").is_dir():  # in its own process, so this one holds no model while the runs do
        subprocess.run([sys.executable, "-m", "benchmarks.slice_memory", "--make", str(work), size], check=True,
                       cwd=ROOT)
    runs = {}
    for path in ("stream", "in_memory"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.slice_memory", "--child", str(work), path,
                               SOURCE_SHARD[size]], check=False, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{path}: {proc.stderr.strip().splitlines()[-1]}")
        runs[path] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{path}: peak {runs[path]['peak_above_imports_bytes'] / 2**20:,.0f} MiB above the imports = "
              f"{runs[path]['peak_over_model']:.3f}x the fp32 model ({runs[path]['seconds']:.0f} s)")
    same = _digest(work / "out-stream") == _digest(work / "out-in_memory")
    result = {"model": SHAPES[size], "source_shards": SOURCE_SHARD[size], "export_shards": SOURCE_SHARD[size],
              "sparsity": SPARSITY, "lora": "r 8 on q_proj, v_proj", "runs": runs,
              "stream_peak_over_model": runs["stream"]["peak_over_model"],
              "in_memory_peak_over_model": runs["in_memory"]["peak_over_model"],
              "same_weight_files": same, "goal_stream_peak_over_model": 0.25}
    print(f"stream {result['stream_peak_over_model']:.3f}x, in memory {result['in_memory_peak_over_model']:.3f}x "
          f"the fp32 model; identical weight files: {same}")
    if not args.quick:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

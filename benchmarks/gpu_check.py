"""The GPU check of the fp16 training path: one prune step and one fine-tune step on a random ~1B LLaMA.

Frozen base in fp16, LoRA / gates / multipliers in fp32 under autocast with a gradient scaler (the V100
path; add --dtype bfloat16 for Ampere and later). For each stage: the peak of
`torch.cuda.max_memory_allocated` over a step against the planner's prediction for the same configuration
(its breakdown without the CUDA-context/fragmentation overhead, which max_memory_allocated does not see),
and the median step time. The fine-tune steps run on a native export of the model sliced with random masks
at the recipe's sparsity, as the real pipeline does: LoRA, every weight (`finetune.train: full`: fp32 master
weights under autocast) and LoRA distilled from the source (`finetune.distill`: a frozen fp16 teacher). A
further measurement repeats the prune step with the base under FSDP2 on a mesh of this one process: nothing is
split, but the sharded CUDA path runs (the base loaded on CPU and moved shard by shard, fp16 DTensors,
replicated fp32 LoRA, autocast, the scaler). Last, fp16 GEMMs at the shapes of a pruned LLaMA-7B: FFN widths
aligned to 64 (`target.multiple_of`) against unaligned ones of nearly the same size, for a training
micro-batch and for one decoded token. Writes benchmarks/results/gpu_check.json.

    python -m benchmarks.gpu_check --gpu H200             # on a GPU machine
    python -m benchmarks.gpu_check --tiny                 # a smoke run of the same code on CPU (no memory numbers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "intermediate_size": 5504, "vocab_size": 32000, "max_position_embeddings": 2048}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 259, "max_position_embeddings": 512}


def _recipe(model_dir: Path, args: argparse.Namespace):
    from compresso_ops.recipe.schema import Recipe

    section = {"micro_batch_size": args.micro_batch, "gradient_accumulation": 1,
               "gradient_checkpointing": args.checkpointing}
    return Recipe(name="gpu-check", model={"path": str(model_dir), "dtype": args.dtype},
                  target={"sparsity": args.sparsity}, prompt={"text": "none"},
                  data={"path": str(model_dir / "data.txt"), "format": "text", "max_seq_length": args.seq},
                  prune={**section, "schedule": {"unit": "steps", "lora_only": 0, "ramp": 100, "hold": 0}},
                  finetune={**section, "unit": "steps", "duration": 100},
                  hardware={"gpu": args.gpu, "gpus_per_node": 1})


def _measure(trainer, steps: int) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    trainer.step(0)  # warm-up: kernels, optimizer states
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        trainer.step(step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_step_s": statistics.median(times), "step_times_s": times,
            "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def _fsdp_prune_step(recipe, examples: list, tok, work: Path, steps: int) -> dict:
    """The prune step with the frozen base sharded by FSDP2 over a one-process group."""
    import dataclasses
    import os

    import torch
    import torch.distributed as tdist
    from transformers import AutoModelForCausalLM

    from compresso_ops.stages.prune import PruneTrainer
    from compresso_ops.training.batching import Collator, pad_token_id
    from compresso_ops.training.checkpoints import CheckpointStore
    from compresso_ops.training.distributed import DistContext
    from compresso_ops.training.precision import choose_precision
    from compresso_ops.training.setup import freeze_for_training, prepare_for_training

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    try:
        precision = dataclasses.replace(choose_precision(recipe), dist=DistContext(0, 1, 0), shard_base=True)
        base = AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=precision.base_dtype)
        freeze_for_training(base, precision)  # stays on CPU: FSDP moves it
        model = prepare_for_training(base, recipe.prune, "prune.lora.target_modules", precision)
        trainer = PruneTrainer(recipe, model, examples, Collator(pad_token_id(tok)), precision,
                               CheckpointStore(work / "prune_fsdp"))
        return _measure(trainer, steps)
    finally:
        tdist.destroy_process_group()


# A pruned LLaMA-7B's FFN: hidden 4096, FFN widths aligned to 64 against the unaligned widths next to them.
GEMM_HIDDEN = 4096
GEMM_WIDTHS = {"aligned": (8896, 7680), "unaligned": (8917, 7701)}


def _gemm_alignment(dtype_name: str, tiny: bool) -> dict:
    """Seconds per up_proj-like ([tokens, d] x [d, f]) and down_proj-like ([tokens, f] x [f, d]) matmul at
    aligned and unaligned FFN widths f, for a micro-batch of 4 x 512 tokens and for one token, and the
    aligned / unaligned throughput ratio per FLOP."""
    import torch

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", getattr(torch, dtype_name)) if cuda else ("cpu", torch.float32)
    d, widths, repeat = (64, {"aligned": (128,), "unaligned": (131,)}, 2) if tiny else (GEMM_HIDDEN, GEMM_WIDTHS, 50)
    out: dict = {}
    for tokens in (1, 2048 if not tiny else 16):
        for kind, fs in widths.items():
            for f in fs:
                x, h = torch.randn(tokens, d, device=device, dtype=dtype), torch.randn(tokens, f, device=device, dtype=dtype)
                up, down = torch.randn(d, f, device=device, dtype=dtype), torch.randn(f, d, device=device, dtype=dtype)
                for _ in range(3):  # warm-up: kernel choice
                    x @ up, h @ down
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(repeat):
                    x @ up
                    h @ down
                if cuda:
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - t0) / repeat
                out[f"tokens{tokens}/{kind}/f{f}"] = {"seconds": seconds,
                                                      "tflops": 2 * 2 * tokens * d * f / seconds / 1e12}
        for aligned, unaligned in zip(widths["aligned"], widths["unaligned"], strict=True):
            out[f"tokens{tokens}/aligned_over_unaligned_flops_per_s/f{aligned}"] = (
                out[f"tokens{tokens}/aligned/f{aligned}"]["tflops"] / out[f"tokens{tokens}/unaligned/f{unaligned}"]["tflops"])
    return out


def _finetune_step(recipe, sliced: Path, work: Path, steps: int) -> dict:
    """One fine-tune configuration: its measured step against the plan of the same recipe."""
    import torch

    from compresso_ops.stages.finetune import FinetuneTrainer, load_sliced
    from compresso_ops.stages.plan import make_plan
    from compresso_ops.training.batching import Collator, pad_token_id
    from compresso_ops.training.checkpoints import CheckpointStore
    from compresso_ops.training.data import build_dataset
    from compresso_ops.training.setup import prepare_for_training

    planned = make_plan(recipe)["memory"]["stages"]["finetune"]
    model, tok, precision = load_sliced(recipe, sliced)
    model = prepare_for_training(model, recipe.finetune, "finetune.lora.target_modules", precision)
    examples = build_dataset(recipe.data, tok, "", int(model.config.max_position_embeddings))
    trainer = FinetuneTrainer(recipe, model, examples, Collator(pad_token_id(tok)), precision, CheckpointStore(work))
    result = {**_measure(trainer, steps), "predicted_bytes": _predicted(planned),
              "plan_per_gpu_bytes": planned["per_gpu_bytes"]}
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _predicted(stage: dict) -> int:
    return sum(v for k, v in stage["breakdown"].items()
               if not k.startswith("activations_") and k != "framework_overhead")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="H200", help="the planner's GPU type (hardware.gpu)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on CPU: checks the script, not the GPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    if args.tiny:
        args.gpu, args.dtype, args.seq, args.steps = "cpu", "float32", 64, 2

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compresso_ops.method.masks import select_final_masks_from_scores
    from compresso_ops.models.architecture import ArchSpec
    from compresso_ops.models.export import export_pruned
    from compresso_ops.stages.plan import make_plan, with_overrides
    from compresso_ops.stages.prune import PruneTrainer
    from compresso_ops.training.batching import Collator, pad_token_id
    from compresso_ops.training.checkpoints import CheckpointStore
    from compresso_ops.training.data import build_dataset
    from compresso_ops.training.setup import load_source, prepare_for_training
    from tests.tiny import byte_tokenizer

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    source, sliced = work / "source", work / "sliced"
    torch.manual_seed(0)
    shape = TINY if args.tiny else FULL
    model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=256, eos_token_id=257, pad_token_id=258))
    model.save_pretrained(source)
    tokenizer = byte_tokenizer()
    tokenizer.save_pretrained(source)
    (source / "data.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4000)
    recipe = _recipe(source, args)
    plan = make_plan(recipe)
    result = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "dtype": args.dtype, "model": {**shape, "params": sum(p.numel() for p in model.parameters())},
              "micro_batch": args.micro_batch, "seq": args.seq, "gradient_checkpointing": args.checkpointing}

    # Prune step on the source.
    base, tok, precision = load_source(recipe)
    examples = build_dataset(recipe.data, tok, "", shape["max_position_embeddings"])
    peft_model = prepare_for_training(base, recipe.prune, "prune.lora.target_modules", precision)
    trainer = PruneTrainer(recipe, peft_model, examples, Collator(pad_token_id(tok)), precision,
                           CheckpointStore(work / "prune"))
    result["prune"] = {**_measure(trainer, args.steps),
                       "predicted_bytes": _predicted(plan["memory"]["stages"]["prune"]),
                       "plan_per_gpu_bytes": plan["memory"]["stages"]["prune"]["per_gpu_bytes"]}
    del trainer, peft_model, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    result["prune_fsdp_one_process"] = _fsdp_prune_step(recipe, examples, tok, work, args.steps)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # Fine-tune step on a native export sliced with random masks at the target sparsity.
    arch = ArchSpec.from_hf_config(model.config)
    gen = torch.Generator().manual_seed(0)
    scores = {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=gen),
              "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=gen),
              "hidden": torch.rand(arch.hidden_size, generator=gen)}
    masks = select_final_masks_from_scores(scores, arch, args.sparsity, "native", ("heads", "ffn"))
    manifest = export_pruned(model.float(), tokenizer, masks, "native", sliced,
                             source_info={"path": str(source), "dtype": "float32"}, dtype=args.dtype)
    del model
    finetunes = {"finetune": recipe, "finetune_full": with_overrides(recipe, {"finetune.train": "full"}),
                 "finetune_distill": with_overrides(recipe, {"finetune.distill.weight": 0.5})}
    for name, variant in finetunes.items():
        result[name] = {**_finetune_step(variant, sliced, work / name, args.steps),
                        "sliced_params": manifest["params"]["exported"]["total"]}
    for stage in ("prune", *finetunes):
        r = result[stage]
        if r["peak_allocated_bytes"]:
            r["predicted_over_measured"] = r["predicted_bytes"] / r["peak_allocated_bytes"]
        print(f"{stage}: median step {r['median_step_s']:.3f} s; peak allocated "
              f"{(r['peak_allocated_bytes'] or 0) / 2**30:.2f} GiB; predicted {r['predicted_bytes'] / 2**30:.2f} GiB")
    fsdp = result["prune_fsdp_one_process"]
    print(f"prune under FSDP2 (one process): median step {fsdp['median_step_s']:.3f} s; peak allocated "
          f"{(fsdp['peak_allocated_bytes'] or 0) / 2**30:.2f} GiB")
    result["gemm_alignment"] = _gemm_alignment(args.dtype, args.tiny)
    for key, ratio in result["gemm_alignment"].items():
        if "over" in key:
            print(f"GEMM {key}: {ratio:.3f}")
    if not args.tiny:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

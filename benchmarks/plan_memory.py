"""How close is the planner's memory model to a measured peak? Measured on CPU (fp32), one run.

For a random LLaMA of about 30M parameters, each configuration (gradient checkpointing off/on) runs one
prune step (LoRA + gates + Lagrangian, optimizer states allocated) in a fresh subprocess. The measured
number is the rise of the process's peak resident memory over the step (Linux: VmHWM after resetting it via
/proc/self/clear_refs), with glibc told to return large blocks to the OS at once so RSS follows live
tensors. The planner's matching number is the same stage's breakdown without the frozen weights (already
resident before the step) and without GPU framework overhead: trainable + grads + optimizer states,
activations, logits. Writes benchmarks/results/plan_memory.json.

    .venv/bin/python -m benchmarks.plan_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 1376, "vocab_size": 8000, "max_position_embeddings": 1024}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(model_dir: str, checkpointing: bool, micro_batch: int, seq: int) -> None:
    """Runs inside the subprocess: one prune step, print the measured rise and the plan's prediction."""
    import torch

    from compresso_ops.recipe.schema import Recipe
    from compresso_ops.stages.plan import make_plan
    from compresso_ops.stages.prune import PruneTrainer
    from compresso_ops.training.batching import Collator, pad_token_id
    from compresso_ops.training.checkpoints import CheckpointStore
    from compresso_ops.training.data import build_dataset
    from compresso_ops.training.setup import add_lora, enable_gradient_checkpointing, load_source

    torch.set_num_threads(2)
    data = Path(model_dir) / "data.txt"
    recipe = Recipe(name="mem", model={"path": model_dir}, target={"sparsity": 0.3},
                    prompt={"text": "none"}, data={"path": str(data), "format": "text", "max_seq_length": seq},
                    prune={"micro_batch_size": micro_batch, "gradient_accumulation": 1,
                           "gradient_checkpointing": checkpointing,
                           "schedule": {"unit": "steps", "lora_only": 0, "ramp": 10, "hold": 0}})
    model, tok, precision = load_source(recipe)
    examples = build_dataset(recipe.data, tok, "", MODEL["max_position_embeddings"])
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = add_lora(model, recipe.prune.lora, "prune.lora.target_modules")
    trainer = PruneTrainer(recipe, model, examples, Collator(pad_token_id(tok)), precision,
                           CheckpointStore(tempfile.mkdtemp()))
    with torch.no_grad():  # touch every weight page before the baseline
        for p in model.parameters():
            p.sum()
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    trainer.step(0)
    peak = _rss_kib("VmHWM")
    plan = make_plan(recipe)["memory"]["stages"]["prune"]["breakdown"]
    predicted = plan["trainable_grads_optimizer"] + plan["activations"] + plan["logits"]
    print(json.dumps({"measured_bytes": (peak - before) * 1024, "predicted_bytes": predicted,
                      "breakdown": plan}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_memory.json"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.micro_batch, args.seq)
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import byte_tokenizer

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, bos_token_id=256, eos_token_id=257, pad_token_id=258))
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    (tmp / "data.txt").write_text("a quick brown fox jumps over the lazy dog. " * 2000)
    n_params = sum(p.numel() for p in model.parameters())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    rows = {}
    for ckpt in (False, True):
        out = subprocess.run([sys.executable, __file__, "--child", str(tmp), "1" if ckpt else "0",
                              "--micro-batch", str(args.micro_batch), "--seq", str(args.seq)],
                             capture_output=True, text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["predicted_over_measured"] = row["predicted_bytes"] / row["measured_bytes"]
        rows["gradient_checkpointing" if ckpt else "no_checkpointing"] = row
        print(f"checkpointing={ckpt}: measured {row['measured_bytes'] / 2**20:.1f} MiB, predicted "
              f"{row['predicted_bytes'] / 2**20:.1f} MiB, ratio {row['predicted_over_measured']:.2f}")
    result = {"benchmark": "plan_memory", "device": "cpu (fp32)", "model": {**MODEL, "params": n_params},
              "micro_batch": args.micro_batch, "seq": args.seq, "results": rows,
              "method": "rise of peak RSS over one prune step vs the plan's trainable+activations+logits"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

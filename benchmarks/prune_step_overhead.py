"""Cost of one prune-stage optimizer step relative to a plain LoRA fine-tuning step.

Both steps run on the same random LLaMA (50-100M parameters), the same LoRA targets and the same
micro-batches, in one process on CPU. The prune step is `PruneTrainer.step` in its ramp phase (gate
sampling, gate hooks, expected size, Lagrangian, three optimizers); the plain step is forward, backward,
clip and AdamW on the LoRA only. Repetitions alternate between the two so machine load hits both alike;
the ratio of medians is reported. Goal: <= 1.10. One thread by default: on a machine shared with other
jobs, multi-threaded steps stall on busy cores and the noise swamps a few-percent difference.

    .venv/bin/python -m benchmarks.prune_step_overhead [--reps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compresso_ops.infra import atomic
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.prune import PruneTrainer
from compresso_ops.training.batching import (
    BatchLayout,
    Collator,
    DataOrder,
    label_count,
    micro_batches,
    step_label_tokens,
)
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.data import Example
from compresso_ops.training.loop import lm_loss_sum
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import add_lora, seed_all

RESULT = Path(__file__).resolve().parent / "results" / "prune_step_overhead.json"


def build_model(seed: int, max_positions: int = 512) -> LlamaForCausalLM:
    """The random 58.5M-parameter LLaMA of the CPU benchmarks, frozen (LoRA goes on top)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1408, vocab_size=32000, max_position_embeddings=max_positions,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="timed steps of each kind (after 2 warm-up steps)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = Recipe(name="bench", model={"path": "unused"}, target={"sparsity": 0.3},
                    prune={"schedule": {"unit": "steps", "lora_only": 0, "ramp": 10_000, "hold": 0},
                           "micro_batch_size": args.micro_batch, "gradient_accumulation": args.accumulation})
    gen = torch.Generator().manual_seed(0)
    examples = [Example(ids := torch.randint(0, 32000, (args.seq,), generator=gen).tolist(), ids) for _ in range(256)]
    collate, precision = Collator(0), Precision(torch.device("cpu"), torch.float32)
    lora = recipe.prune.lora

    seed_all(0)
    prune_model = add_lora(build_model(1), lora, "prune.lora.target_modules")
    n_params = sum(p.numel() for p in prune_model.parameters() if not p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = PruneTrainer(recipe, prune_model, examples, collate, precision, CheckpointStore(tmp))

        seed_all(0)
        plain_model = add_lora(build_model(1), lora, "prune.lora.target_modules")
        plain_params = [p for p in plain_model.parameters() if p.requires_grad]
        plain_opt = torch.optim.AdamW(plain_params, lr=recipe.prune.lr.lora, weight_decay=0.0)
        order = DataOrder(len(examples), recipe.prune.seed)
        layout, counts = BatchLayout(args.micro_batch, args.accumulation), [label_count(e) for e in examples]

        def plain_step(step: int) -> None:
            tokens = step_label_tokens(counts, order, step, layout)
            for _, batch in micro_batches(examples, order, collate, step, layout):
                precision.backward(lm_loss_sum(plain_model, batch, precision) / tokens)
            precision.step([plain_opt], (plain_params, recipe.prune.max_grad_norm))

        times: dict[str, list[float]] = {"prune": [], "lora": []}
        for step in range(args.reps + 2):
            for kind, run in (("prune", trainer.step), ("lora", plain_step)):
                t0 = time.perf_counter()
                run(step)
                if step >= 2:
                    times[kind].append(time.perf_counter() - t0)

    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "ratio": medians["prune"] / medians["lora"],
        "goal": 1.10,
        "median_step_s": medians,
        "step_times_s": times,
        "model": {"params": n_params, "hidden": 512, "layers": 8, "heads": 8, "ffn": 1408, "vocab": 32000},
        "batch": {"micro_batch": args.micro_batch, "seq": args.seq, "accumulation": args.accumulation},
        "lora_targets": list(lora.target_modules),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    atomic.write_json(RESULT, result)
    print(f"prune step {medians['prune']:.3f}s, LoRA step {medians['lora']:.3f}s, ratio {result['ratio']:.3f} "
          f"({n_params / 1e6:.1f}M params) -> {RESULT}")


if __name__ == "__main__":
    main()

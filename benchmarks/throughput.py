"""Training throughput with and without length-grouped batching (`group_by_length`), on Alpaca-style data.

The data is `../shared/assets/data/instruct/alpaca_libre.json` (relative to the repository root) with the
collaborative prompt on every row, tokenized with the shared stories260K tokenizer (the only LLaMA tokenizer
available offline; its 512-token vocabulary makes rows longer than LLaMA's would, 335 to 930 tokens, so
`max_seq_length` is 1024 and no row is cut, as Alpaca rows are not at 512 with LLaMA's tokenizer). Two fine-tune trainers (`FinetuneTrainer`, the
stage's own step: LoRA q/v on a random 58.5M-parameter LLaMA, fp32, CPU) differ only in `group_by_length`;
their optimizer steps alternate (and alternate which goes first), so machine load hits both alike. Time is
process CPU time at one torch thread: other jobs on a shared machine slow the wall clock, not this.

Reported: loss-carrying (response) tokens per CPU second of each and their ratio (after / before), measured on
the first `--steps` steps after one warm-up step, and the padded fraction of the micro-batches: over a whole
epoch of the data (exact, no model needed) and over the timed steps. Writes benchmarks/results/throughput.json.

    .venv/bin/python -m benchmarks.throughput [--steps 16] [--micro-batch 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.prune_step_overhead import build_model
from compresso_ops.infra import atomic
from compresso_ops.method.prompts import resolve_prompt
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.finetune import FinetuneTrainer
from compresso_ops.training.batching import BatchLayout, Collator, DataOrder
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.data import Example, build_dataset
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import add_lora, seed_all

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "assets" / "data" / "instruct" / "alpaca_libre.json"
TOKENIZER = REPO_ROOT.parent / "shared" / "assets" / "models" / "stories260K"
RESULT = Path(__file__).resolve().parent / "results" / "throughput.json"
SEQ_LEN = 1024
KINDS = ("before", "after")  # group_by_length off, on


def recipe_for(grouped: bool, args: argparse.Namespace) -> Recipe:
    return Recipe(name="throughput", model={"path": "unused"}, target={"sparsity": 0.2},
                  data={"path": str(DATA), "format": "alpaca", "max_seq_length": SEQ_LEN},
                  finetune={"unit": "steps", "duration": args.steps + 1, "micro_batch_size": args.micro_batch,
                            "gradient_accumulation": args.accumulation, "group_by_length": grouped})


def padded_fraction(examples: list[Example], order: DataOrder, layout: BatchLayout, steps: range) -> float:
    """Padded positions over all positions of the right-padded micro-batches of `steps`."""
    padded = total = 0
    for step in steps:
        for k in range(layout.micros):
            lengths = [len(examples[i].input_ids) for i in layout.indices(order, step, k)]
            total += max(lengths) * len(lengths)
            padded += max(lengths) * len(lengths) - sum(lengths)
    return padded / total


def trainer_for(recipe: Recipe, examples: list[Example], pad_id: int, store: Path) -> FinetuneTrainer:
    seed_all(0)
    model = add_lora(build_model(1, SEQ_LEN), recipe.finetune.lora, "finetune.lora.target_modules").train()
    return FinetuneTrainer(recipe, model, examples, Collator(pad_id), Precision(torch.device("cpu"), torch.float32),
                           CheckpointStore(store))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps of each kind")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per micro-batch (the 7B recipes')")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULT, help="where the JSON goes")
    args = parser.parse_args()
    if not DATA.is_file() or not (TOKENIZER / "tokenizer.json").is_file():
        print(f"skipped: {DATA} or {TOKENIZER} not found (the shared assets are not on this machine)", file=sys.stderr)
        return
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    recipes = {kind: recipe_for(kind == "after", args) for kind in KINDS}
    examples = build_dataset(recipes["before"].data, tokenizer, resolve_prompt(recipes["before"].prompt, "finetune"),
                             SEQ_LEN)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    timed = range(1, args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {kind: trainer_for(recipes[kind], examples, pad_id, Path(tmp) / kind) for kind in KINDS}
        cpu_s = dict.fromkeys(KINDS, 0.0)
        wall_s = dict.fromkeys(KINDS, 0.0)
        tokens = dict.fromkeys(KINDS, 0)
        for step in range(args.steps + 1):
            for kind in KINDS if step % 2 else KINDS[::-1]:
                c0, w0 = time.process_time(), time.perf_counter()
                out = trainers[kind].step(step)
                if step in timed:
                    cpu_s[kind] += time.process_time() - c0
                    wall_s[kind] += time.perf_counter() - w0
                    tokens[kind] += out["tokens"]
        layout = trainers["before"].layout
        epoch = range(layout.steps_per_epoch(len(examples)))
        fractions = {kind: {"epoch": padded_fraction(examples, trainers[kind].order, layout, epoch),
                            "timed_steps": padded_fraction(examples, trainers[kind].order, layout, timed)}
                     for kind in KINDS}
        n_params = sum(p.numel() for p in trainers["before"].model.parameters() if not p.requires_grad)
    speed = {kind: tokens[kind] / cpu_s[kind] for kind in KINDS}
    lengths = sorted(len(e.input_ids) for e in examples)
    result = {
        "padded_fraction_before": fractions["before"]["epoch"],
        "padded_fraction_after": fractions["after"]["epoch"],
        "tokens_per_s_ratio": speed["after"] / speed["before"],
        "goal": 1.3,
        "tokens_per_cpu_s": speed,
        "padded_fraction_of_timed_steps": {kind: fractions[kind]["timed_steps"] for kind in KINDS},
        "timed": {"steps": args.steps, "loss_tokens": tokens, "cpu_s": cpu_s, "wall_s": wall_s},
        "data": {"path": "../shared/assets/data/instruct/alpaca_libre.json", "examples": len(examples),
                 "tokenizer": "stories260K", "max_seq_length": SEQ_LEN, "prompt": "collaborative",
                 "tokens_min_median_max": [lengths[0], lengths[len(lengths) // 2], lengths[-1]]},
        "batch": {"micro_batch": args.micro_batch, "accumulation": args.accumulation},
        "model": {"params": n_params, "lora": list(recipes["before"].finetune.lora.target_modules)},
        "threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
    }
    atomic.write_json(args.out, result)
    print(f"padded fraction {result['padded_fraction_before']:.3f} -> {result['padded_fraction_after']:.3f}; "
          f"loss tokens per CPU second {speed['before']:.1f} -> {speed['after']:.1f}, "
          f"ratio {result['tokens_per_s_ratio']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()

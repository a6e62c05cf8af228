"""Training throughput of length-grouped batching (`group_by_length`) and the shared-prefix forward, on
Alpaca-style data.

The data is `../shared/assets/data/instruct/alpaca_libre.json` (relative to the repository root) with the
collaborative prompt on every row, tokenized with the shared stories260K tokenizer (the only LLaMA tokenizer
available offline; its 512-token vocabulary makes rows longer than LLaMA's would, 335 to 930 tokens, so
`max_seq_length` is 1024 and no row is cut, as Alpaca rows are not at 512 with LLaMA's tokenizer). Three
fine-tune trainers (`FinetuneTrainer`, the stage's own step: LoRA q/v on a random 58.5M-parameter LLaMA, fp32,
CPU) run the same data: `before` in random order with one forward per micro-batch (the shared-prefix forward
switched off), `grouped` length-grouped with one forward, `after` length-grouped with the shared prefix
forwarded once per micro-batch (`training/shared_prefix.py`, as training runs). Their optimizer steps
interleave (in a rotating order), so machine load hits all alike. Time is process CPU time at one torch
thread: other jobs on a shared machine slow the wall clock, not this.

Reported: loss-carrying (response) tokens per CPU second of each and the ratio after / before, measured on the
first `--steps` steps after one warm-up step; the padded fraction of the micro-batches and the fraction of
their positions that lie in a shared prefix: over a whole epoch of the data (exact, no model needed) and over
the timed steps. Writes benchmarks/results/throughput.json.

    .venv/bin/python -m benchmarks.throughput [--steps 16] [--micro-batch 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from benchmarks.prune_step_overhead import build_model
from compresso_ops.infra import atomic
from compresso_ops.method.prompts import resolve_prompt
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.finetune import FinetuneTrainer
from compresso_ops.training import loop
from compresso_ops.training.batching import BatchLayout, Collator, DataOrder, pad_token_id
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.data import Example, build_dataset
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import add_lora, seed_all
from compresso_ops.training.shared_prefix import MIN_SHARED_PREFIX, shared_prefix_length

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "assets" / "data" / "instruct" / "alpaca_libre.json"
TOKENIZER = REPO_ROOT.parent / "shared" / "assets" / "models" / "stories260K"
RESULT = Path(__file__).resolve().parent / "results" / "throughput.json"
SEQ_LEN = 1024
KINDS = ("before", "grouped", "after")
SHARES_PREFIX = {"before": False, "grouped": False, "after": True}


@contextmanager
def prefix_sharing(on: bool) -> Iterator[None]:
    """Training always shares prefixes it can; `before` and `grouped` measure the forward without it."""
    saved = loop.MIN_SHARED_PREFIX
    loop.MIN_SHARED_PREFIX = saved if on else math.inf
    try:
        yield
    finally:
        loop.MIN_SHARED_PREFIX = saved


def recipe_for(grouped: bool, args: argparse.Namespace) -> Recipe:
    return Recipe(name="throughput", model={"path": "unused"}, target={"sparsity": 0.2},
                  data={"path": str(DATA), "format": "alpaca", "max_seq_length": SEQ_LEN},
                  finetune={"unit": "steps", "duration": args.steps + 1, "micro_batch_size": args.micro_batch,
                            "gradient_accumulation": args.accumulation, "group_by_length": grouped})


def position_shares(examples: list[Example], order: DataOrder, layout: BatchLayout, steps: range,
                    collate: Collator) -> dict[str, float]:
    """Of all positions of the right-padded micro-batches of `steps`: the padded share, and the share in a
    prefix the rows share (counted when long enough to be forwarded once, as `lm_loss_sum` decides)."""
    padded = shared = total = 0
    for step in steps:
        for k in range(layout.micros):
            rows = [examples[i] for i in layout.indices(order, step, k)]
            batch = collate(rows)
            size = batch["input_ids"].numel()
            prefix = shared_prefix_length(batch["input_ids"], batch["labels"], batch["attention_mask"])
            total += size
            padded += size - sum(len(e.input_ids) for e in rows)
            shared += len(rows) * prefix if prefix >= MIN_SHARED_PREFIX else 0
    return {"padded": padded / total, "shared_prefix": shared / total}


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
    recipes = {kind: recipe_for(kind != "before", args) for kind in KINDS}
    examples = build_dataset(recipes["before"].data, tokenizer, resolve_prompt(recipes["before"].prompt, "finetune"),
                             SEQ_LEN)
    pad_id = pad_token_id(tokenizer)
    timed = range(1, args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {kind: trainer_for(recipes[kind], examples, pad_id, Path(tmp) / kind) for kind in KINDS}
        cpu_s = dict.fromkeys(KINDS, 0.0)
        wall_s = dict.fromkeys(KINDS, 0.0)
        tokens = dict.fromkeys(KINDS, 0)
        for step in range(args.steps + 1):
            for kind in KINDS[step % 3:] + KINDS[:step % 3]:
                c0, w0 = time.process_time(), time.perf_counter()
                with prefix_sharing(SHARES_PREFIX[kind]):
                    out = trainers[kind].step(step)
                if step in timed:
                    cpu_s[kind] += time.process_time() - c0
                    wall_s[kind] += time.perf_counter() - w0
                    tokens[kind] += out["tokens"]
        layout = trainers["before"].layout
        epoch = range(layout.steps_per_epoch(len(examples)))
        collate = Collator(pad_id)
        shares = {kind: {"epoch": position_shares(examples, trainers[kind].order, layout, epoch, collate),
                         "timed_steps": position_shares(examples, trainers[kind].order, layout, timed, collate)}
                  for kind in ("before", "after")}
        n_params = sum(p.numel() for p in trainers["before"].model.parameters() if not p.requires_grad)
    speed = {kind: tokens[kind] / cpu_s[kind] for kind in KINDS}
    lengths = sorted(len(e.input_ids) for e in examples)
    result = {
        "padded_fraction_before": shares["before"]["epoch"]["padded"],
        "padded_fraction_after": shares["after"]["epoch"]["padded"],
        "tokens_per_s_ratio": speed["after"] / speed["before"],
        "goal": 1.3,
        "tokens_per_cpu_s": speed,
        "ratios": {"grouped_over_before": speed["grouped"] / speed["before"],
                   "after_over_grouped": speed["after"] / speed["grouped"]},
        "shared_prefix_fraction_after": shares["after"]["epoch"]["shared_prefix"],
        "min_shared_prefix": MIN_SHARED_PREFIX,
        "timed_step_fractions": {kind: shares[kind]["timed_steps"] for kind in ("before", "after")},
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
    print(f"padded fraction {result['padded_fraction_before']:.3f} -> {result['padded_fraction_after']:.3f}, "
          f"shared prefix {result['shared_prefix_fraction_after']:.3f} of the positions; loss tokens per CPU second "
          f"{speed['before']:.1f} -> {speed['grouped']:.1f} (grouped) -> {speed['after']:.1f} (+ shared prefix), "
          f"ratio {result['tokens_per_s_ratio']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()

"""Which examples each optimizer step sees, and how they become tensors.

`BatchLayout` / `micro_batches` / `micro_rng`: an optimizer step takes micro_batch_size *
gradient_accumulation * hardware.world_size examples of the seeded stream, cut into global micro-batches dealt
round-robin to the processes actually running. Each global micro-batch draws its randomness (gate noise, LoRA
dropout) from a seed of (seed, step, micro index), so any number of processes follows the trajectory the
recipe defines, the same one the planner counts steps for. `DataOrder` is the seeded example order
(length-grouped when the recipe asks: `group_by_length`), `Collator` pads a micro-batch."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch

from compresso_ops.errors import UserError
from compresso_ops.recipe.schema import DataSection, HardwareSection, TrainingSection, micro_batch_problem
from compresso_ops.training.data import IGNORE, Example
from compresso_ops.training.distributed import SINGLE, DistContext


@dataclass(frozen=True)
class BatchLayout:
    """The examples of one optimizer step: `micros` global micro-batches of `micro_batch` examples.

    `micros` = gradient_accumulation * the recipe's world (hardware.world_size), as the planner counts
    it; the processes actually launched share them round-robin, so the global batch (and with it the step
    count, the LR schedule and the sparsity ramp) depends on the recipe alone.
    """

    micro_batch: int
    micros: int

    @classmethod
    def of(cls, section: TrainingSection, hardware: HardwareSection) -> BatchLayout:
        return cls(section.micro_batch_size, section.gradient_accumulation * hardware.world_size)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micros

    def require_fits(self, num_examples: int, stage: str) -> None:
        """Refuse a micro-batch larger than the dataset: it would only hold repeated examples in memory."""
        if (why := micro_batch_problem(self.micro_batch, num_examples)) is not None:
            raise UserError(f"{stage}.micro_batch_size: {why}")

    def steps_per_epoch(self, num_examples: int) -> int:
        return max(1, math.ceil(num_examples / self.global_batch))

    def indices(self, order: DataOrder, step: int, micro: int) -> list[int]:
        """Example indices of global micro-batch `micro` of optimizer step `step`."""
        return order.indices(step * self.global_batch + micro * self.micro_batch, self.micro_batch)


def to_steps(amount: float, unit: str, per_epoch: int) -> int:
    """A phase length in optimizer steps, counted as the planner counts it (partial epochs round up)."""
    return math.ceil(amount * per_epoch) if unit == "epochs" else int(amount)


def micro_batches(examples: list[Example], order: DataOrder, collate: Collator, step: int, layout: BatchLayout,
                  dist: DistContext = SINGLE) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(global micro index, batch) for this rank's share of step `step`: micro-batch k goes to rank
    k % world_size."""
    return [(k, collate([examples[i] for i in layout.indices(order, step, k)]))
            for k in range(dist.rank, layout.micros, dist.world_size)]


def label_count(example: Example) -> int:
    """Tokens of `example` that carry a loss (the next-token shift drops position 0)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def step_label_tokens(counts: list[int], order: DataOrder, step: int, layout: BatchLayout) -> int:
    """Loss-carrying tokens of the whole global batch of `step` (`counts[i]` = label_count(examples[i])).
    Computed identically on every rank from the seeded order, so the loss normaliser needs no collective."""
    return sum(counts[i] for k in range(layout.micros) for i in layout.indices(order, step, k))


def _micro_seed(seed: int, step: int, micro: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def micro_rng(seed: int, step: int, micro: int, device: torch.device) -> Iterator[None]:
    """Seed torch's default generators for one global micro-batch (gate noise, LoRA dropout) and restore
    them afterwards: whichever rank runs micro-batch `micro` of `step`, it draws the same random numbers,
    and a resumed run needs no saved RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(_micro_seed(seed, step, micro))
        yield


MEGABATCH_MICROS = 50  # micro-batches per length-sorted megabatch, at most (transformers' group_by_length)


class DataOrder:
    """An endless stream of example indices: a fresh seeded permutation every epoch.

    With `lengths` (tokens per example) the permutation is length-grouped, the idea of transformers'
    `group_by_length`: each epoch's permutation is cut into megabatches of up to `MEGABATCH_MICROS`
    micro-batches, each megabatch is sorted by length and poured into its micro-batch slots in a seeded random
    slot order. A micro-batch then holds examples of similar length (little padding), while an optimizer
    step, which takes several consecutive slots, still mixes long and short ones. Every epoch is still a
    permutation (each example once), and the order is a function of (seed, epoch, lengths, micro_batch)
    alone, so it is resumable from any position and the same on every rank. Slots are aligned to the
    stream's micro-batch boundaries, which do not restart at an epoch boundary when the epoch size is not a
    multiple of `micro_batch`.
    """

    def __init__(self, num_examples: int, seed: int, *, lengths: Sequence[int] | None = None,
                 micro_batch: int = 1) -> None:
        if lengths is not None and len(lengths) != num_examples:
            raise ValueError(f"{len(lengths)} lengths for {num_examples} examples")
        self.n = num_examples
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.micro_batch = micro_batch
        self._cache: tuple[int, list[int]] | None = None

    @classmethod
    def of(cls, examples: list[Example], section: TrainingSection, data: DataSection) -> DataOrder:
        """The order a stage trains in. Grouping applies to Alpaca rows only: plain-text chunks all have
        `max_seq_length` tokens (only the file's last one is shorter), so grouping them saves nothing."""
        grouped = section.group_by_length and data.format == "alpaca"
        return cls(len(examples), section.seed, lengths=[len(e.input_ids) for e in examples] if grouped else None,
                   micro_batch=section.micro_batch_size)

    def _epoch(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=gen).tolist()
            self._cache = (epoch, perm if self.lengths is None else self._grouped(perm, self.lengths, epoch, gen))
        return self._cache[1]

    def _slots(self, epoch: int) -> list[tuple[int, int]]:
        """(start, end) of the micro-batch slots of `epoch` within its permutation, on the stream's
        micro-batch boundaries (the first and last may be partial)."""
        m = self.micro_batch
        first = (-epoch * self.n) % m or m
        bounds = [0, *range(first, self.n, m), self.n]
        return [(a, b) for a, b in pairwise(bounds) if b > a]

    def _grouped(self, perm: list[int], lengths: list[int], epoch: int, gen: torch.Generator) -> list[int]:
        slots = self._slots(epoch)
        per_mega = max(1, min(MEGABATCH_MICROS, self.n // (4 * self.micro_batch)))
        out = list(perm)
        for g in range(0, len(slots), per_mega):
            mega = slots[g:g + per_mega]
            start, end = mega[0][0], mega[-1][1]
            by_length = sorted(perm[start:end], key=lambda i: -lengths[i])  # stable: ties keep perm order
            pos = 0
            for s in torch.randperm(len(mega), generator=gen).tolist():
                a, b = mega[s]
                out[a:b] = by_length[pos:pos + b - a]
                pos += b - a
        return out

    def indices(self, start: int, count: int) -> list[int]:
        """Stream positions [start, start + count)."""
        return [self._epoch(p // self.n)[p % self.n] for p in range(start, start + count)]


class Collator:
    """Right-pads a list of examples into tensors (labels padded with -100)."""

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad = pad_token_id if pad_token_id is not None else 0

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer: Any) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

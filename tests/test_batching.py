"""Length-grouped batching: less padding, with the guarantees of the plain order (every example once per
epoch, deterministic, resumable, the same micro-batches whichever number of processes runs them)."""

from __future__ import annotations

import random

import pytest
import torch

from compresso_ops.recipe.schema import DataSection, FinetuneSection, PruneSection
from compresso_ops.training.batching import (
    BatchLayout,
    Collator,
    DataOrder,
    label_count,
    micro_batches,
    step_label_tokens,
)
from compresso_ops.training.data import IGNORE, Example
from compresso_ops.training.distributed import DistContext


def _examples(n: int, seed: int = 0) -> list[Example]:
    """Alpaca-like rows: a fixed prompt head (no loss) and a response of 5 to 200 tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        response = [rng.randrange(1, 250) for _ in range(rng.randint(5, 200))]
        out.append(Example([0] * 20 + response, [IGNORE] * 20 + response))
    return out


def _grouped(examples: list[Example], micro_batch: int, seed: int = 7) -> DataOrder:
    return DataOrder(len(examples), seed, lengths=[len(e.input_ids) for e in examples], micro_batch=micro_batch)


def _padded_fraction(examples: list[Example], order: DataOrder, layout: BatchLayout, steps: int) -> float:
    padded = total = 0
    collate = Collator(0)
    for step in range(steps):
        for _, batch in micro_batches(examples, order, collate, step, layout):
            total += batch["attention_mask"].numel()
            padded += int((batch["attention_mask"] == 0).sum())
    return padded / total


@pytest.mark.parametrize(("n", "micro_batch"), [(403, 4), (400, 4), (37, 3)])
def test_every_example_once_per_epoch_even_when_epochs_split_micro_batches(n, micro_batch):
    order = _grouped(_examples(n), micro_batch)
    for epoch in range(3):  # n % micro_batch != 0 moves the micro-batch boundaries in every epoch
        assert sorted(order.indices(epoch * n, n)) == list(range(n))
    assert order.indices(0, n) != order.indices(n, n)


def test_grouped_order_is_deterministic_and_resumable_from_any_position():
    examples = _examples(403)
    whole = _grouped(examples, 4).indices(0, 3 * 403)
    assert _grouped(examples, 4).indices(0, 3 * 403) == whole
    for start in (0, 1, 402, 403, 811):  # a fresh order, as a resumed run builds it, from any position
        assert _grouped(examples, 4).indices(start, 50) == whole[start:start + 50]
    assert _grouped(examples, 4, seed=8).indices(0, 403) != whole[:403]


def test_grouping_cuts_padding_while_steps_still_mix_lengths():
    examples = _examples(800)
    layout = BatchLayout(micro_batch=4, micros=8)
    steps = layout.steps_per_epoch(len(examples))
    plain = _padded_fraction(examples, DataOrder(len(examples), 7), layout, steps)
    grouped = _padded_fraction(examples, _grouped(examples, 4), layout, steps)
    assert plain > 0.25 and grouped < plain / 4
    order = _grouped(examples, 4)
    spreads = []  # the longest over the shortest micro-batch of each step
    for step in range(steps):
        widths = [max(len(examples[i].input_ids) for i in layout.indices(order, step, k)) for k in range(8)]
        spreads.append(max(widths) / min(widths))
    assert sorted(spreads)[len(spreads) // 2] > 2  # not sorted into all-long and all-short steps


@pytest.mark.parametrize("grouped", [False, True])
def test_two_simulated_ranks_run_the_micro_batches_of_one(grouped):
    examples = _examples(203)
    order = _grouped(examples, 2) if grouped else DataOrder(len(examples), 7)
    layout, collate = BatchLayout(micro_batch=2, micros=5), Collator(0)
    counts = [label_count(e) for e in examples]
    for step in (0, 1, 19, 20, 21):  # 20 steps a epoch: 20 and 21 cross into the second epoch
        single = dict(micro_batches(examples, order, collate, step, layout))
        ranks = [dict(micro_batches(examples, _grouped(examples, 2) if grouped else DataOrder(len(examples), 7),
                                    collate, step, layout, DistContext(rank, 2, rank))) for rank in (0, 1)]
        assert sorted(ranks[0]) == [0, 2, 4] and sorted(ranks[1]) == [1, 3]
        for k, batch in {**ranks[0], **ranks[1]}.items():
            assert all(torch.equal(batch[key], single[k][key]) for key in batch)
        # the loss normaliser: every label of the global batch, the same on every rank
        labels = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in single.values())
        assert step_label_tokens(counts, order, step, layout) == labels


def test_the_recipe_groups_alpaca_rows_but_not_text_chunks():
    examples = _examples(100)
    alpaca, text = DataSection(format="alpaca"), DataSection(format="text")
    assert DataOrder.of(examples, FinetuneSection(), alpaca).lengths == [len(e.input_ids) for e in examples]
    assert DataOrder.of(examples, PruneSection(micro_batch_size=2), alpaca).micro_batch == 2
    assert DataOrder.of(examples, FinetuneSection(), text).lengths is None
    off = DataOrder.of(examples, PruneSection(group_by_length=False), alpaca)
    assert off.lengths is None and off.indices(0, 100) == DataOrder(100, 42).indices(0, 100)

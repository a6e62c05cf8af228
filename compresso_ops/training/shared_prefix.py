"""Forward the prefix that every row of a micro-batch shares once, not once per row.

Every training row starts with the same collaborative prompt and task template, none of which carries loss
(0.575 of the positions of `benchmarks/throughput.py`'s micro-batches). `forward_with_shared_prefix` runs
the decoder on that prefix once (batch 1), keeps its keys and values per attention layer, and runs the
rows' suffixes with them as the past: positions continue at the prefix length and the attention mask spans
prefix + suffix, so every suffix token attends to exactly the keys and values a full forward would give it.
Loss and gradients equal the full forward's up to float rounding, for LoRA and full-weight training, with
gate hooks (they hold one gate sample per micro-batch, so both forwards see the same gates) and under FSDP.

Gradient checkpointing replays each decoder layer's forward in backward. transformers drops a cache from a
checkpointed layer unless the layer declares `_can_checkpoint_with_cache`, because an appending cache would
be appended to a second time by the replay. Both caches here answer the replay as they answered the
forward (`_RecordOnce` keeps the first call's keys and values and returns each call's own; `_ReadPrefix`
never stores), so the decoder layers declare it while these two forwards run.

With dropout (LoRA dropout > 0, attention dropout) the prefix forward draws one dropout mask that all rows
of the micro-batch share, where a full forward draws one per row. Each row still sees the prefix through a
dropout mask of the configured rate, so this is a different, equally valid noise draw (still seeded per
micro-batch, so runs repeat and resume exactly); only the rows of one micro-batch are correlated on the
prefix. Sharing stays on with dropout rather than falling back to the full forward: the 7B recipes fine-tune
with LoRA dropout 0.05, and a fall-back would give up the speed-up exactly there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

MIN_SHARED_PREFIX = 16
"""Shorter shared prefixes run as one full forward: the (rows - 1) x prefix positions they would save are
judged (not measured) to be worth less than a second forward call's fixed costs (per-layer kernel launches;
under FSDP a second gather of every layer). Any prompt of a sentence or more clears it."""


def shared_prefix_length(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading positions where every row holds a real (unmasked) token with the same id and the same label,
    capped so that every row keeps at least one real token after them; 0 for a single row.

    Comparing labels too means the prefix's loss-carrying positions (text rows, a labelled prompt) are the same
    for every row, so one row's logits score them for all. Padding is never part of a prefix, whichever side
    it is on."""
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (labels == labels[:1]).all(0) & attention_mask.bool().all(0)
    run = int(same.int().cumprod(0).sum())
    return max(0, min(run, int(attention_mask.sum(1).min()) - 1))


class _RecordOnce(DynamicLayer):
    """One attention layer's keys and values of the prefix forward: kept from the first call, which is the
    forward itself; a checkpointing replay gets its own states back, as the forward did, and changes nothing."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.device = key_states.device
            self.keys, self.values = key_states, value_states
            self.is_initialized = True
        return key_states, value_states


class _ReadPrefix(DynamicLayer):
    """One attention layer's past for the suffix forward: the prefix's keys and values (batch 1) in front of
    each call's own, broadcast to its rows. Nothing is stored, so a checkpointing replay gets the same answer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.keys, self.values, self.is_initialized = keys.device, keys, values, True
        self.read = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self.read = True
        rows = key_states.shape[0]
        return (torch.cat([self.keys.expand(rows, -1, -1, -1), key_states], dim=-2),
                torch.cat([self.values.expand(rows, -1, -1, -1), value_states], dim=-2))


@contextmanager
def _cache_kept_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let checkpointed decoder layers keep the (replay-safe) cache they are given while the block runs;
    the backward replay reuses the arguments the forward was called with, so it needs nothing after that."""
    layers = [m for m in model.modules()
              if isinstance(m, GradientCheckpointingLayer) and not m._can_checkpoint_with_cache]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def forward_with_shared_prefix(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                               prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a right- or un-padded micro-batch whose rows share their first `prefix` tokens (see
    `shared_prefix_length`): ([1, prefix, vocab] for the prefix, from its first row; [rows, length - prefix,
    vocab] for the rows' suffixes). Together they are the full forward's logits, the prefix's repeated per row."""
    recorder = Cache(layer_class_to_replicate=_RecordOnce)
    with _cache_kept_under_checkpointing(model):
        head = model(input_ids=input_ids[:1, :prefix], attention_mask=attention_mask[:1, :prefix], cache=recorder,
                     use_cache=False).logits
        past = Cache(layers=[_ReadPrefix(layer.keys, layer.values) for layer in recorder.layers])
        positions = torch.arange(prefix, input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        tail = model(input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=positions,
                     cache=past, use_cache=False).logits
    if not past.layers or not all(layer.read for layer in past.layers):  # else the suffixes never saw the prefix
        raise RuntimeError("the model did not pass the shared prefix's keys and values to every attention layer; "
                           "the installed transformers drops a cache that training/shared_prefix.py expects its "
                           "decoder layers to keep")
    return head, tail

"""Forward hooks that apply gate values inside a stock LLaMA-family model.

- head gate [L, G]: multiplies the input of o_proj (HF layout [B, T, H*h]; query head i is in KV group
  i // (H/G)), so each KV group's heads are switched on or off together;
- FFN gate [L, f]: multiplies the input of down_proj;
- hidden gate [d]: multiplies the output of embed_tokens, o_proj and down_proj;
- optional block gates [L] scale a layer's whole head / FFN vector;
- a block whose gates are all zero outputs zero, bias included (docs/method.md §2): the size formulas and
  the native export drop such a block with its o_proj / down_proj bias, so the masked model must too.

Hooks sit on the outermost module at each path (a peft LoRA wrapper where there is one), so the LoRA delta
is gated too. The gate values are expanded once per `set()` (once per micro-step) and each hook does a
single multiply, which keeps the training overhead to a few elementwise ops per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from compresso_ops.method.masks import Masks
from compresso_ops.models.adapter import ModelAdapter


class GateHooks:
    """Hooks installed on a model; `set(values)` chooses what they multiply by (None: pass through)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.arch = adapter.arch
        self._head_vecs: torch.Tensor | None = None  # [L, H*h]
        self._ffn_vecs: torch.Tensor | None = None  # [L, f]
        self._hidden: torch.Tensor | None = None  # [d]
        self._alive: dict[str, torch.Tensor | None] = {"o_proj": None, "down_proj": None}  # [L]: block kept
        self._handles: list[RemovableHandle] = []
        self._handles.append(adapter.embed_tokens().register_forward_hook(self._scale_hidden_output))
        for layer in range(self.arch.num_layers):
            o_proj = adapter.projection(layer, "o_proj")
            down_proj = adapter.projection(layer, "down_proj")
            self._handles.append(o_proj.register_forward_pre_hook(self._input_hook("_head_vecs", layer)))
            self._handles.append(down_proj.register_forward_pre_hook(self._input_hook("_ffn_vecs", layer)))
            self._handles.append(o_proj.register_forward_hook(self._output_hook("o_proj", layer)))
            self._handles.append(down_proj.register_forward_hook(self._output_hook("down_proj", layer)))

    def set(self, values: dict[str, torch.Tensor] | None) -> None:
        """Gate values by structure name (heads, ffn, hidden, attention_blocks, ffn_blocks); missing ones
        stay open. None turns every hook into a pass-through."""
        if values is None:
            self._head_vecs = self._ffn_vecs = self._hidden = None
            self._alive = {"o_proj": None, "down_proj": None}
            return
        heads = values.get("heads")
        if "attention_blocks" in values:
            block = values["attention_blocks"][:, None]
            heads = block.expand(-1, self.arch.num_kv_heads) if heads is None else heads * block
        width = self.arch.group_size * self.arch.head_dim
        self._head_vecs = None if heads is None else heads.repeat_interleave(width, dim=1)
        ffn = values.get("ffn")
        if "ffn_blocks" in values:
            block = values["ffn_blocks"][:, None]
            ffn = block.expand(-1, self.arch.intermediate_size) if ffn is None else ffn * block
        self._ffn_vecs = ffn
        self._hidden = values.get("hidden")
        # Only a bias survives a zero input: without biases an all-zero block already outputs zero.
        self._alive = {"o_proj": _any_open(heads) if self.arch.o_bias else None,
                       "down_proj": _any_open(ffn) if self.arch.mlp_bias else None}

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Pass-through for the duration (the source model's forward, as a distillation teacher), then the
        gate values set before, unchanged."""
        saved = (self._head_vecs, self._ffn_vecs, self._hidden, self._alive)
        self.set(None)
        try:
            yield
        finally:
            self._head_vecs, self._ffn_vecs, self._hidden, self._alive = saved

    def _input_hook(self, attr: str, layer: int):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            vecs = getattr(self, attr)
            if vecs is None:
                return None
            x = args[0]
            return (x * vecs[layer].to(x.dtype),) + tuple(args[1:])
        return hook

    def _scale_hidden_output(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        if self._hidden is None:
            return None
        return output * self._hidden.to(output.dtype)

    def _output_hook(self, projection: str, layer: int):
        """o_proj / down_proj output: the hidden gate, and zero when the layer's block kept nothing."""
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            alive = self._alive[projection]
            scaled = self._scale_hidden_output(module, args, output)
            if alive is None:
                return scaled
            return (output if scaled is None else scaled) * alive[layer].to(output.dtype)
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _any_open(gates: torch.Tensor | None) -> torch.Tensor | None:
    """[L] 1.0 where a layer has a non-zero gate (a step function: gradients reach the gates elsewhere)."""
    return None if gates is None else (gates != 0).any(dim=1).float()


def masks_as_values(masks: Masks, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    return {"heads": masks.heads.to(device), "ffn": masks.ffn.to(device), "hidden": masks.hidden.to(device)}


@contextmanager
def masked(model: nn.Module, masks: Masks, device: torch.device | str | None = None) -> Iterator[GateHooks]:
    """The masked model: `model` with fixed 0/1 masks applied until the block exits. `device`: where the
    activations will be (default: where the model's weights are; a model whose weights are on the meta device
    until each layer runs, as the streamed export check has, names it)."""
    hooks = GateHooks(ModelAdapter(model))
    device = device or next(model.parameters()).device
    hooks.set(masks_as_values(masks, device))
    try:
        yield hooks
    finally:
        hooks.remove()

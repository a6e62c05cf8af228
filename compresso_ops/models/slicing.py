"""Physically remove pruned structures (docs/method.md §7): from a masked model to smaller tensors.

The masked model is the source model (LoRA merged) whose head, FFN-channel and hidden-dim gates are fixed 0/1
masks. Slicing keeps only the rows and columns that the masks keep, so the small model computes the same
logits with fewer parameters. The one non-trivial step is RMSNorm: the masked model still divides by the full
hidden size d, so the sliced norms get w * sqrt(d/|D|) and eps * d/|D| to stay exact. Qwen3's per-head
q_norm / k_norm (over head_dim, one weight shared by all heads) are kept whole; they read the config's one
rms_norm_eps, so the sliced q and k projections are scaled by sqrt(d/|D|) as well: RMSNorm is scale-invariant
up to eps, and that scale turns eps * d/|D| back into the source's eps exactly.

`slice_state_dict` returns every layer's tensors, including zero-sized ones for a block that keeps nothing:
the `native` builder drops those blocks, the `pad` builder pads them with zeros, so both start from one slice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec


@dataclass(frozen=True)
class SliceShape:
    """Sizes of a sliced model: per-layer KV heads and FFN channels, kept hidden dims, and the norm eps."""

    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]
    hidden: int
    group_size: int
    head_dim: int
    rms_norm_eps: float

    @property
    def query_heads(self) -> tuple[int, ...]:
        return tuple(g * self.group_size for g in self.kv_heads)


def merge_lora(model: Any) -> nn.Module:
    """Fold a peft LoRA adapter into the base weights (W += B A * alpha/r) and return the plain model.

    Slicing must see merged weights: the gates multiplied the adapted projections' outputs while pruning.
    A model without an adapter is returned unchanged.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def _rows(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return weight.index_select(0, idx)


def _cols(weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return weight.index_select(1, idx)


def head_rows(groups: torch.Tensor, group_size: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of q (all query heads of the kept KV groups) and of k/v (the kept groups).

    HF's repeat_kv layout: query head i reads KV head i // group_size, so group g owns query heads
    g*group_size .. g*group_size + group_size - 1, each `head_dim` consecutive rows.
    """
    offsets = torch.arange(head_dim)
    kv = (groups[:, None] * head_dim + offsets).flatten()
    q_heads = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    q = (q_heads[:, None] * head_dim + offsets).flatten()
    return q, kv


def _kept(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).flatten()


def _norm_scale(arch: ArchSpec, kept_hidden: int) -> float:
    return math.sqrt(arch.hidden_size / kept_hidden)


def slice_shape(arch: ArchSpec, masks: Masks) -> SliceShape:
    """The sizes `slice_state_dict` produces for `masks` (known before any weight is read)."""
    kept = masks.kept()
    return SliceShape(
        kv_heads=kept.groups,
        channels=kept.channels,
        hidden=kept.hidden,
        group_size=arch.group_size,
        head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps * arch.hidden_size / kept.hidden,
    )


@torch.no_grad()
def slice_outer(weights: Mapping[str, torch.Tensor], arch: ArchSpec, masks: Masks,
                tied: bool) -> dict[str, torch.Tensor]:
    """The embeddings, final norm and LM head, sliced to the kept hidden dims. `weights` maps stock HF names
    to the merged tensors; only those present are sliced (the streamed export reads them one at a time).
    With `tied`, `lm_head.weight` is the sliced embedding itself."""
    hidden = _kept(masks.hidden).to(next(iter(weights.values())).device)
    sd: dict[str, torch.Tensor] = {}
    if (embed := weights.get("model.embed_tokens.weight")) is not None:
        sd["model.embed_tokens.weight"] = _cols(embed, hidden)
        if tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    if not tied and (head := weights.get("lm_head.weight")) is not None:
        sd["lm_head.weight"] = _cols(head, hidden)
    if (norm := weights.get("model.norm.weight")) is not None:
        sd["model.norm.weight"] = norm.index_select(0, hidden) * _norm_scale(arch, len(hidden))
    return sd


@torch.no_grad()
def slice_layer(weights: Mapping[str, torch.Tensor], i: int, arch: ArchSpec, masks: Masks) -> dict[str, torch.Tensor]:
    """Decoder layer `i`, sliced: `weights` maps its stock HF names (`model.layers.{i}.self_attn.q_proj.weight`,
    ...; biases where the model has them) to the merged tensors. Every key is returned, zero-sized for a
    block that keeps nothing."""
    p = f"model.layers.{i}."
    device = weights[f"{p}self_attn.q_proj.weight"].device
    hidden = _kept(masks.hidden).to(device)
    scale = _norm_scale(arch, len(hidden))
    q_rows, kv_rows = head_rows(_kept(masks.heads[i]), arch.group_size, arch.head_dim)
    q_rows, kv_rows = q_rows.to(device), kv_rows.to(device)
    channels = _kept(masks.ffn[i]).to(device)
    sd: dict[str, torch.Tensor] = {}
    qk_scale = scale if arch.qk_norm else 1.0
    for name, rows, factor in (("q_proj", q_rows, qk_scale), ("k_proj", kv_rows, qk_scale),
                               ("v_proj", kv_rows, 1.0)):
        weight = weights[f"{p}self_attn.{name}.weight"]
        sd[f"{p}self_attn.{name}.weight"] = _cols(_rows(weight, rows), hidden) * factor
        if (bias := weights.get(f"{p}self_attn.{name}.bias")) is not None:
            sd[f"{p}self_attn.{name}.bias"] = bias.index_select(0, rows) * factor
    if arch.qk_norm:
        for norm in ("q_norm", "k_norm"):
            sd[f"{p}self_attn.{norm}.weight"] = weights[f"{p}self_attn.{norm}.weight"].clone()
    sd[f"{p}self_attn.o_proj.weight"] = _cols(_rows(weights[f"{p}self_attn.o_proj.weight"], hidden), q_rows)
    if (bias := weights.get(f"{p}self_attn.o_proj.bias")) is not None:
        sd[f"{p}self_attn.o_proj.bias"] = bias.index_select(0, hidden)
    for name in ("gate_proj", "up_proj"):
        sd[f"{p}mlp.{name}.weight"] = _cols(_rows(weights[f"{p}mlp.{name}.weight"], channels), hidden)
        if (bias := weights.get(f"{p}mlp.{name}.bias")) is not None:
            sd[f"{p}mlp.{name}.bias"] = bias.index_select(0, channels)
    sd[f"{p}mlp.down_proj.weight"] = _cols(_rows(weights[f"{p}mlp.down_proj.weight"], hidden), channels)
    if (bias := weights.get(f"{p}mlp.down_proj.bias")) is not None:
        sd[f"{p}mlp.down_proj.bias"] = bias.index_select(0, hidden)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        sd[f"{p}{norm}.weight"] = weights[f"{p}{norm}.weight"].index_select(0, hidden) * scale
    return sd


@torch.no_grad()
def slice_state_dict(model: nn.Module, masks: Masks) -> tuple[dict[str, torch.Tensor], SliceShape]:
    """Slice a merged LLaMA/Mistral/Qwen2/Qwen3 causal LM to the kept structures.

    Keys follow the stock HF layout (`model.layers.{i}.self_attn.q_proj.weight`, ...). Every layer has all its
    keys; a block that keeps nothing has zero-sized weights. With tied embeddings `lm_head.weight` is the same
    tensor object as `model.embed_tokens.weight`. The tensors are new (the source model is not modified).
    """
    arch = ArchSpec.from_hf_config(model.config)
    masks.validate(arch)
    weights = dict(model.named_parameters(remove_duplicate=False))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    sd = slice_outer(weights, arch, masks, tied)
    for i in range(arch.num_layers):
        sd.update(slice_layer(weights, i, arch, masks))
    return sd, slice_shape(arch, masks)


def drop_empty_blocks(sd: dict[str, torch.Tensor], shape: SliceShape) -> dict[str, torch.Tensor]:
    """The `native` layout: a layer's attention (FFN) block and its norm are absent when it keeps no head
    (no channel)."""
    out = dict(sd)
    for i, (g, c) in enumerate(zip(shape.kv_heads, shape.channels, strict=True)):
        p = f"model.layers.{i}."
        prefixes: list[str] = []
        if g == 0:
            prefixes += [f"{p}self_attn.", f"{p}input_layernorm."]
        if c == 0:
            prefixes += [f"{p}mlp.", f"{p}post_attention_layernorm."]
        for key in [k for k in out if prefixes and k.startswith(tuple(prefixes))]:
            del out[key]
    return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)


def pad_state_dict(
    sd: dict[str, torch.Tensor], shape: SliceShape
) -> tuple[dict[str, torch.Tensor], SliceShape]:
    """The `pad` layout: every layer padded with zero heads / channels to the largest layer, so one stock
    config fits all layers. A zero head has zero o_proj columns and a zero channel a zero down_proj column, so
    padding adds exactly nothing to the residual stream."""
    g_max, c_max = max(shape.kv_heads), max(shape.channels)
    h, rep = shape.head_dim, shape.group_size
    sizes = {
        "q_proj": g_max * rep * h,
        "k_proj": g_max * h,
        "v_proj": g_max * h,
        "o_proj": g_max * rep * h,
        "gate_proj": c_max,
        "up_proj": c_max,
        "down_proj": c_max,
    }
    out = {}
    for key, t in sd.items():
        name = key.split(".")[-2]
        if name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            t = _pad(t, 0, sizes[name])  # output rows (and their biases)
        elif name in ("o_proj", "down_proj") and key.endswith(".weight"):
            t = _pad(t, 1, sizes[name])  # input columns; their biases live on the hidden dims
        out[key] = t  # untouched tensors keep their identity, so tied embeddings stay tied
    n = len(shape.kv_heads)
    return out, SliceShape(
        kv_heads=(g_max,) * n,
        channels=(c_max,) * n,
        hidden=shape.hidden,
        group_size=rep,
        head_dim=h,
        rms_norm_eps=shape.rms_norm_eps,
    )



"""One-shot baselines for the prune stage: `magnitude` (LLM-Pruner's "L2" criterion) and `random` (a floor).

They skip pruning training and hand the slice stage the same kind of masks the Compresso run does, chosen
by the same budgeted selection, so the reports of the three methods compare side by side at equal size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compresso_ops.method.masks import Masks, select_final_masks_from_scores
from compresso_ops.models.adapter import ModelAdapter
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params, prunable_sparsity, target_sparsity
from compresso_ops.recipe.schema import Recipe
from compresso_ops.ui.progress import EventFn


def _sq(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum of squares of `w` along `dim` (what each structure owns of a weight matrix)."""
    return w.detach().float().pow(2).sum(dim=dim)


@torch.no_grad()
def magnitude_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """L2 norm of all the weights each structure owns: a KV group's q/k/v rows and o_proj columns, an FFN
    channel's gate/up rows and down_proj column, a hidden dim's columns and rows across the whole model."""
    ad = ModelAdapter(model)
    arch = ad.arch
    L, G, rep, h = arch.num_layers, arch.num_kv_heads, arch.group_size, arch.head_dim
    heads = torch.zeros(L, G)
    ffn = torch.zeros(L, arch.intermediate_size)
    hidden = _sq(ad.embed_tokens().weight, 0)
    if not arch.tie_embeddings:
        hidden += _sq(ad.base.get_output_embeddings().weight, 0)
    for layer in range(L):
        q, k, v, o = (ad.projection(layer, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        per_query_head = _sq(q, 1).view(G, rep, h).sum((1, 2)) + _sq(o, 0).view(G, rep, h).sum((1, 2))
        heads[layer] = (per_query_head + _sq(k, 1).view(G, h).sum(1) + _sq(v, 1).view(G, h).sum(1)).sqrt()
        gate, up, down = (ad.projection(layer, n).weight for n in ("gate_proj", "up_proj", "down_proj"))
        ffn[layer] = (_sq(gate, 1) + _sq(up, 1) + _sq(down, 0)).sqrt()
        hidden += _sq(q, 0) + _sq(k, 0) + _sq(v, 0) + _sq(gate, 0) + _sq(up, 0) + _sq(o, 1) + _sq(down, 1)
    return {"heads": heads, "ffn": ffn, "hidden": hidden.sqrt()}


def random_scores(arch: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=g),
            "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=g),
            "hidden": torch.rand(arch.hidden_size, generator=g)}


def run_one_shot(recipe: Recipe, model: torch.nn.Module, stage_dir: str | Path, *,
                 on_event: EventFn | None = None) -> dict[str, Any]:
    """Rank the structures of the source `model` once and write `masks.safetensors` / `masks.json` as the
    prune stage does (no LoRA).

    Hidden dims are kept unless the target cannot be met otherwise: one-shot structured pruning in the
    LLM-Pruner style removes heads and channels, and the selection takes only as many hidden dims as the
    budget forces.
    """
    arch = ModelAdapter(model).arch
    scores = magnitude_scores(model) if recipe.method == "magnitude" else random_scores(arch, recipe.prune.seed)
    masks, summary = save_ranked_masks(recipe, arch, scores, stage_dir, recipe.method)
    if on_event is not None:
        on_event({"step": 1, "total_steps": 1, "expected_sparsity": summary["achieved_sparsity"],
                  "target_sparsity": summary["target_sparsity"]})
    return {"completed": True, **summary, "params": count_params(arch, masks.kept()).as_dict()}


def save_ranked_masks(recipe: Recipe, arch: ArchSpec, scores: dict[str, torch.Tensor], stage_dir: str | Path,
                      method: str) -> tuple[Masks, dict[str, Any]]:
    """The one-shot selection: masks meeting the recipe's target from `scores` (hidden dims kept unless the
    target forces fewer), written to stage_dir with a summary naming `method`; returns both."""
    sparsity = target_sparsity(recipe, arch)
    masks = select_final_masks_from_scores(scores, arch, sparsity, recipe.export.mode, recipe.target.structures,
                                           hidden_kept=arch.hidden_size, multiple_of=recipe.target.multiple_of)
    summary = {"method": method, "target_sparsity": sparsity, "achieved_sparsity": prunable_sparsity(arch, masks.kept())}
    masks.save(stage_dir, arch, extra={"prune": summary})
    return masks, summary

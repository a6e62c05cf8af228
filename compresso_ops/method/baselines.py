"""One-shot baselines for the prune stage: `magnitude` (LLM-Pruner's "L2" criterion), `activation` (Minitron's
activation importance, read on calibration text) and `random` (a floor).

They skip pruning training and hand the slice stage the same kind of masks the Compresso run does, chosen
by the same budgeted selection, so the reports of the methods compare side by side at equal size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from compresso_ops.errors import UserError
from compresso_ops.method.masks import Masks, select_final_masks_from_scores
from compresso_ops.method.prompts import resolve_prompt
from compresso_ops.models.adapter import ModelAdapter
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params, prunable_sparsity, target_sparsity
from compresso_ops.recipe.schema import Recipe
from compresso_ops.training.batching import Collator, pad_token_id
from compresso_ops.training.data import Example, build_dataset
from compresso_ops.ui.progress import EventFn

Batch = dict[str, torch.Tensor]


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


def calibration_examples(recipe: Recipe, tokenizer: Any, max_positions: int) -> list[Example]:
    """The first `prune.calibration_examples` training examples, built as the prune stage builds its data
    (the prune stage's prompt first), so the activations are those of the text the model is pruned for."""
    examples = build_dataset(recipe.data, tokenizer, resolve_prompt(recipe.prompt, "prune"), max_positions)
    wanted = recipe.prune.calibration_examples
    if len(examples) < wanted:
        raise UserError(f"prune.calibration_examples: {wanted:,} is more than the {len(examples):,} examples "
                        f"data.path {recipe.data.path} yields; lower prune.calibration_examples or give more data")
    return examples[:wanted]


def calibration_batches(examples: list[Example], micro_batch: int, pad_id: int | None,
                        device: torch.device) -> Iterator[Batch]:
    """`examples` in order, as padded micro-batches (input_ids, attention_mask) on `device`."""
    collate = Collator(pad_id)
    for start in range(0, len(examples), micro_batch):
        batch = collate(examples[start:start + micro_batch])
        yield {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def activation_scores(model: torch.nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """What each KV group and FFN channel adds to the residual stream on calibration `batches`, square-rooted.

    Minitron's activation-based importance, measured at each structure's output rather than its input: an FFN
    channel's summed squared contribution ||a_j||^2 * ||W_down[:, j]||^2 (a_j: its input to down_proj over all
    tokens), a KV group's summed squared o_proj output of its query heads. The square root puts heads and
    channels on one scale so the budgeted selection can trade one for the other. Only the positions the
    attention mask marks as tokens are summed, so padding adds nothing. Runs the decoder layers only (no LM
    head), in the model's dtype on its device, and accumulates in fp32; returns `heads` [L, G] and `ffn`
    [L, f] on the CPU.
    """
    ad = ModelAdapter(model)
    arch = ad.arch
    device = next(ad.base.parameters()).device
    heads = torch.zeros(arch.num_layers, arch.num_kv_heads, device=device)
    ffn = torch.zeros(arch.num_layers, arch.intermediate_size, device=device)
    n_query, h = arch.num_kv_heads * arch.group_size, arch.head_dim
    real: list[torch.Tensor] = []  # which positions of the current micro-batch are tokens (not padding)

    def tokens(x: torch.Tensor) -> torch.Tensor:
        """A projection's input at the real tokens, [tokens, width] in fp32 (padding never enters a sum)."""
        return x.reshape(-1, x.shape[-1])[real[0]].float()

    def on_o_proj(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = tokens(args[0]).view(-1, n_query, h)  # per-head attention outputs
            w = module.weight.float().view(-1, n_query, h)  # o_proj columns per head
            per_head = torch.stack([(x[:, q] @ w[:, q].T).pow(2).sum() for q in range(n_query)])
            heads[layer] += per_head.view(arch.num_kv_heads, arch.group_size).sum(1)
        return hook

    def on_down_proj(layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            ffn[layer] += tokens(args[0]).pow(2).sum(0) * module.weight.float().pow(2).sum(0)
        return hook

    handles = [ad.projection(i, "o_proj").register_forward_pre_hook(on_o_proj(i)) for i in range(arch.num_layers)]
    handles += [ad.projection(i, "down_proj").register_forward_pre_hook(on_down_proj(i))
                for i in range(arch.num_layers)]
    decoder, training = ad.module("model"), ad.base.training
    ad.base.eval()  # no dropout while measuring
    try:
        for batch in batches:
            real[:] = [batch["attention_mask"].reshape(-1).bool()]
            decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        ad.base.train(training)
    return {"heads": heads.sqrt().cpu(), "ffn": ffn.sqrt().cpu()}


def one_shot_scores(recipe: Recipe, model: torch.nn.Module, tokenizer: Any) -> dict[str, torch.Tensor]:
    """The ranking scores of the recipe's one-shot method. Activation ranks hidden dims by magnitude: they are
    kept unless the target forces fewer, as for magnitude."""
    arch = ModelAdapter(model).arch
    if recipe.method == "random":
        return random_scores(arch, recipe.prune.seed)
    magnitude = magnitude_scores(model)
    if recipe.method == "magnitude":
        return magnitude
    examples = calibration_examples(recipe, tokenizer, arch.max_position_embeddings)
    device = next(model.parameters()).device
    batches = calibration_batches(examples, recipe.prune.micro_batch_size, pad_token_id(tokenizer), device)
    return {**activation_scores(model, batches), "hidden": magnitude["hidden"]}


def run_one_shot(recipe: Recipe, model: torch.nn.Module, tokenizer: Any, stage_dir: str | Path, *,
                 on_event: EventFn | None = None) -> dict[str, Any]:
    """Rank the structures of the source `model` once and write `masks.safetensors` / `masks.json` as the
    prune stage does (no LoRA).

    Hidden dims are kept unless the target cannot be met otherwise: one-shot structured pruning in the
    LLM-Pruner style removes heads and channels, and the selection takes only as many hidden dims as the
    budget forces.
    """
    arch = ModelAdapter(model).arch
    masks, summary = save_ranked_masks(recipe, arch, one_shot_scores(recipe, model, tokenizer), stage_dir,
                                       recipe.method)
    if on_event is not None:
        on_event({"step": 1, "total_steps": 1, "expected_sparsity": summary["achieved_sparsity"],
                  "target_sparsity": summary["target_sparsity"]})
    return {"completed": True, **summary, "params": count_params(arch, masks.kept()).as_dict()}


def allocate(scores: dict[str, torch.Tensor], allocation: str) -> dict[str, torch.Tensor]:
    """Scores that spread the cut as `prune.one_shot_allocation` says. uniform: FFN channels by their rank
    within their layer, so every layer keeps the same width (to one channel), and heads above every channel
    in their own order, so none is pruned unless the target forces it; global: `scores` as they are."""
    if allocation == "global":
        return scores
    ranks = scores["ffn"].argsort(1).argsort(1).float()
    return {**scores, "ffn": ranks, "heads": scores["heads"] + ranks.max() + 1}


def save_ranked_masks(recipe: Recipe, arch: ArchSpec, scores: dict[str, torch.Tensor], stage_dir: str | Path,
                      method: str) -> tuple[Masks, dict[str, Any]]:
    """The one-shot selection: masks meeting the recipe's target from `scores`, allocated over the layers as
    `prune.one_shot_allocation` says (hidden dims kept unless the target forces fewer), written to stage_dir
    with a summary naming `method`; returns both."""
    sparsity = target_sparsity(recipe, arch)
    allocation = recipe.prune.one_shot_allocation
    masks = select_final_masks_from_scores(allocate(scores, allocation), arch, sparsity, recipe.export.mode,
                                           recipe.target.structures,
                                           hidden_kept=arch.hidden_size, multiple_of=recipe.target.multiple_of)
    summary = {"method": method, "allocation": allocation, "target_sparsity": sparsity,
               "achieved_sparsity": prunable_sparsity(arch, masks.kept())}
    masks.save(stage_dir, arch, extra={"prune": summary})
    return masks, summary

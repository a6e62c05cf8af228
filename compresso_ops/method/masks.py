"""Final 0/1 masks: the hand-off from the prune stage to the slice stage.

`masks.safetensors` holds float32 tensors `heads` [L, G] (one per KV group), `ffn` [L, f] and `hidden` [d],
each exactly 0 or 1. `masks.json` is the readable summary next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from compresso_ops.errors import UserError
from compresso_ops.infra import atomic
from compresso_ops.method.gates import GateSet
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import (
    Alignment,
    Kept,
    aligned_counts,
    count_params,
    fixed_cost,
    hidden_cap,
    largest_fitting,
    prunable_budget,
    prunable_sparsity,
    pruned_kinds,
    unmeetable_target,
)

MASKS_FILE = "masks.safetensors"
SUMMARY_FILE = "masks.json"


@dataclass
class Masks:
    heads: torch.Tensor  # [L, G] 0/1
    ffn: torch.Tensor  # [L, f] 0/1
    hidden: torch.Tensor  # [d] 0/1

    @classmethod
    def full(cls, arch: ArchSpec) -> Masks:
        return cls(torch.ones(arch.num_layers, arch.num_kv_heads), torch.ones(arch.num_layers, arch.intermediate_size),
                   torch.ones(arch.hidden_size))

    def validate(self, arch: ArchSpec) -> None:
        expected = {"heads": (arch.num_layers, arch.num_kv_heads), "ffn": (arch.num_layers, arch.intermediate_size),
                    "hidden": (arch.hidden_size,)}
        for name, shape in expected.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"mask '{name}' has shape {tuple(t.shape)}, expected {shape}")
            if not torch.all((t == 0) | (t == 1)):
                raise ValueError(f"mask '{name}' is not exactly 0/1")
        if self.hidden.sum() == 0:
            raise ValueError("the hidden mask keeps no dimension")

    def kept(self) -> Kept:
        return Kept(tuple(int(x) for x in self.heads.sum(1).tolist()),
                    tuple(int(x) for x in self.ffn.sum(1).tolist()), int(self.hidden.sum().item()))

    def kept_indices(self) -> dict[str, Any]:
        """Indices of kept structures: per-layer KV groups, per-layer FFN channels, hidden dims."""
        return {
            "heads": [torch.nonzero(row).flatten().tolist() for row in self.heads],
            "ffn": [torch.nonzero(row).flatten().tolist() for row in self.ffn],
            "hidden": torch.nonzero(self.hidden).flatten().tolist(),
        }

    def save(self, folder: str | Path, arch: ArchSpec, extra: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        self.validate(arch)
        tensors = {"heads": self.heads.float().contiguous(), "ffn": self.ffn.float().contiguous(),
                   "hidden": self.hidden.float().contiguous()}
        atomic.write_with(folder / MASKS_FILE, lambda p: save_file(tensors, str(p)))
        atomic.write_json(folder / SUMMARY_FILE, summary(self, arch, extra))

    @classmethod
    def load(cls, folder: str | Path) -> Masks:
        t = load_file(str(Path(folder) / MASKS_FILE))
        return cls(t["heads"], t["ffn"], t["hidden"])


def summary(masks: Masks, arch: ArchSpec, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    kept = masks.kept()
    src = count_params(arch)
    out = {
        "kept_kv_groups_per_layer": list(kept.groups),
        "kept_query_heads_per_layer": [g * arch.group_size for g in kept.groups],
        "kept_ffn_channels_per_layer": list(kept.channels),
        "kept_hidden_dims": kept.hidden,
        "params": {
            "source": src.as_dict(),
            "pruned": count_params(arch, kept).as_dict(),
            "prunable_sparsity": prunable_sparsity(arch, kept),
        },
        "indices": masks.kept_indices(),
    }
    if extra:
        out.update(extra)
    return out


# ------------------------------------------------------------------------------------ final-mask selection

@dataclass
class _Units:
    """Selectable units of one structure type, in the order the greedy pass sees them.

    Each unit costs `cost`; the first unit kept in a block (`block` id) also pays `first_cost`, which is
    how an o_proj / down_proj bias that exists only while its block keeps something is counted.
    """

    score: torch.Tensor  # [n]
    cost: float | torch.Tensor  # one cost for all units, or one per unit
    block: torch.Tensor  # [n] long
    first_cost: float


def _per_unit_costs(arch: ArchSpec, hidden: int) -> dict[str, tuple[float, float]]:
    """(cost of one KV group / FFN channel, extra cost of the first one in its layer) at `hidden` dims,
    term by term as in `sizes.attention_params` / `sizes.ffn_params`."""
    h, rep = arch.head_dim, arch.group_size
    group = hidden * (2 * rep * h + 2 * h) + (rep * h + 2 * h if arch.qkv_bias else 0)
    channel = 3 * hidden + (2 if arch.mlp_bias else 0)
    return {"heads": (float(group), float(hidden if arch.o_bias else 0)),
            "ffn": (float(channel), float(hidden if arch.mlp_bias else 0))}


def _combined_scores(scores: dict[str, torch.Tensor], kind: str, block: str, shape: tuple[int, int],
                     structures: tuple[str, ...]) -> torch.Tensor:
    """Per-structure scores with the block gate folded in (the effective gate is z_block * z)."""
    s = scores[kind].double() if kind in structures else torch.ones(shape, dtype=torch.float64)
    if block in structures:
        s = s * scores[block].double()[:, None]
    return s


def _greedy(units: list[_Units], budget: float) -> list[torch.Tensor]:
    """Keep units in descending score order until the next one would exceed `budget`.

    A strict prefix of the ranking, so the kept total is within one unit's cost of the budget. Ties keep
    their input order (stable sort), which makes the result deterministic.
    """
    score = torch.cat([u.score for u in units])
    cost = torch.cat([torch.broadcast_to(torch.as_tensor(u.cost, dtype=torch.float64), u.score.shape)
                      for u in units])
    offsets, blocks, first = 0, [], []
    for u in units:
        blocks.append(u.block + offsets)
        n_blocks = int(u.block.max().item()) + 1 if len(u.block) else 0
        first.append(torch.full((n_blocks,), u.first_cost, dtype=torch.float64))
        offsets += n_blocks
    block, first_cost = torch.cat(blocks), torch.cat(first)
    order = torch.sort(score, descending=True, stable=True).indices
    block_sorted = block[order]
    positions = torch.arange(len(order))
    first_pos = torch.full((offsets,), len(order), dtype=torch.long).scatter_reduce(
        0, block_sorted, positions, reduce="amin")
    is_first = first_pos[block_sorted] == positions
    running = torch.cumsum(cost[order] + is_first.double() * first_cost[block_sorted], 0)
    n_keep = int((running <= budget).sum().item())
    kept = torch.zeros(len(order), dtype=torch.bool)
    kept[order[:n_keep]] = True
    return list(torch.split(kept, [len(u.score) for u in units]))


def _top_k_rows(scores: torch.Tensor, k: int | list[int]) -> torch.Tensor:
    """0/1 mask keeping the k best entries of every row (`k` per row when a list)."""
    ks = k if isinstance(k, list) else [k] * scores.shape[0]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    return (ranks < torch.tensor(ks)[:, None]).float()


def _chunks(ranked: torch.Tensor, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned units over the last dim of descending `ranked` scores: each unit is `unit` consecutive ranks
    (the last one shorter when the dimension is not a multiple). Returns (mean score, size) per unit; the
    means descend too, so keeping units by score keeps a prefix of the ranks."""
    starts = range(0, ranked.shape[-1], unit)
    means = torch.stack([ranked[..., a:a + unit].mean(-1) for a in starts], -1)
    sizes = torch.tensor([min(unit, ranked.shape[-1] - a) for a in starts], dtype=torch.float64)
    return means, sizes


def _aligned_hidden(wanted: int, unit: int, full: int, floor: int, cap: int) -> int:
    """The allowed hidden count (`aligned_counts`) nearest `wanted` within [floor, cap]; when none lies
    there, the largest one within the cap (the target must stay reachable; `unmeetable_target` has made
    sure one is)."""
    allowed = [n for n in aligned_counts(unit, full) if n <= cap]
    inside = [n for n in allowed if n >= floor] or allowed[-1:]
    return min(inside, key=lambda n: (abs(n - wanted), -n))


def select_final_masks_from_scores(scores: dict[str, torch.Tensor], arch: ArchSpec, target_sparsity: float,
                                   mode: str = "native", structures: tuple[str, ...] | list[str] = ("heads", "ffn", "hidden"),
                                   hidden_kept: int | None = None, multiple_of: int | None = None) -> Masks:
    """Exact 0/1 masks whose prunable size meets `target_sparsity` within one (aligned) unit's size.

    `scores` maps structure names (heads [L, G], ffn [L, f], hidden [d], attention_blocks [L], ffn_blocks [L])
    to any ranking score (higher keeps). Hidden dims multiply every other cost, so their count is fixed first
    (`hidden_kept`, capped so the target stays reachable; with hidden as the only structure, as many as fit);
    heads and FFN channels are then kept greedily by score while the budget allows. Mode `uniform` keeps the
    same number of KV groups and FFN channels in every layer (its unit is one rank across all layers).
    `multiple_of` (`Alignment.of`; None is the default) makes FFN channels per layer and hidden dims come in
    aligned units: an FFN unit is that many consecutive ranks of a layer (of every layer, in `uniform`).
    """
    structures = tuple(structures)
    if (unmeetable := unmeetable_target(arch, target_sparsity, structures, multiple_of, mode)) is not None:
        raise UserError(unmeetable[1])
    L, G, f, d = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    heads_on, ffn_on = pruned_kinds(structures)
    budget = prunable_budget(arch, target_sparsity)
    align = Alignment.of(arch, multiple_of)

    if "hidden" in structures:
        cap = hidden_cap(arch, budget, structures)
        # Enough hidden dims that keeping every head and channel would not undershoot the budget.
        floor = largest_fitting(lambda n: count_params(arch, Kept((G,) * L, (f,) * L, n)).prunable <= budget, d)
        if heads_on or ffn_on:
            if hidden_kept is None:
                raise ValueError("hidden_kept is required when hidden dims are pruned with other structures")
            hidden = _aligned_hidden(min(max(1, hidden_kept, floor), cap), align.hidden, d, max(1, floor), cap)
        else:
            hidden = _aligned_hidden(cap, align.hidden, d, cap, cap)
        hidden_mask = torch.zeros(d)
        hidden_mask[torch.sort(scores["hidden"].double(), descending=True, stable=True).indices[:hidden]] = 1.0
    else:
        hidden = d
        hidden_mask = torch.ones(d)

    costs = _per_unit_costs(arch, hidden)
    kinds = [(k, b, n) for k, b, n, on in (("heads", "attention_blocks", G, heads_on), ("ffn", "ffn_blocks", f, ffn_on))
             if on]
    units, combined = [], {}
    for kind, block, n in kinds:
        s = combined[kind] = _combined_scores(scores, kind, block, (L, n), structures)
        cost, first = costs[kind]
        unit = align.ffn if kind == "ffn" else 1
        ranked = torch.sort(s, dim=1, descending=True, stable=True).values
        if mode == "uniform":  # unit j: the j-th best structures of every layer
            means, sizes = _chunks(ranked.mean(0), unit)
            units.append(_Units(means, L * cost * sizes, torch.zeros(len(sizes), dtype=torch.long), L * first))
        elif kind not in structures:  # whole blocks only
            units.append(_Units(s[:, 0], n * cost + first, torch.arange(L), 0.0))
        else:  # unit (i, j): the j-th best structures of layer i
            means, sizes = _chunks(ranked, unit)
            units.append(_Units(means.flatten(), cost * sizes.repeat(L), torch.arange(L).repeat_interleave(len(sizes)),
                                first))
    chosen = _greedy(units, budget - fixed_cost(arch, hidden, heads_on, ffn_on)) if units else []

    out = {"heads": torch.ones(L, G), "ffn": torch.ones(L, f)}
    for (kind, _, n), unit_kept in zip(kinds, chosen, strict=True):
        if kind not in structures and mode != "uniform":  # whole blocks
            out[kind] = unit_kept.float()[:, None].expand(L, n).clone()
            continue
        sizes = _chunks(torch.zeros(n), align.ffn if kind == "ffn" else 1)[1]
        counts = (unit_kept.view(-1, len(sizes)).double() * sizes).sum(1).round().long().tolist()
        out[kind] = _top_k_rows(combined[kind], counts * L if mode == "uniform" else counts)
    return Masks(out["heads"], out["ffn"], hidden_mask)


def select_final_masks(gates: GateSet, arch: ArchSpec, target_sparsity: float, mode: str = "native",
                       multiple_of: int | None = None) -> Masks:
    """Final masks from trained gates: rank by the deterministic score, hidden count from its expected value."""
    hidden_kept = None
    if "hidden" in gates.structures:
        hidden_kept = round(gates.probabilities()["hidden"].detach().sum().item())
    return select_final_masks_from_scores(gates.scores(), arch, target_sparsity, mode, gates.structures, hidden_kept,
                                          multiple_of)

"""Exact parameter counts of a LLaMA-family model (Qwen3 included) before and after structured pruning.

One set of formulas serves the planner (before any training), the final-mask selection (to meet the
target) and the slice stage's check (the exported checkpoint must hold exactly what these formulas say).
"Prunable" follows the paper: the attention and FFN projections (their biases included). Embeddings and
norms are not prunable but shrink with the kept hidden dims (Qwen3's per-head q/k norms do not: they span
head_dim).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from compresso_ops.models.architecture import ArchSpec
from compresso_ops.recipe.schema import Recipe

EXPORT_MODES = ("native", "uniform", "pad")


@dataclass(frozen=True)
class Kept:
    """How many structures survive: KV groups and FFN channels per layer, and hidden dims (global)."""

    groups: tuple[int, ...]
    channels: tuple[int, ...]
    hidden: int

    @classmethod
    def full(cls, arch: ArchSpec) -> Kept:
        return cls((arch.num_kv_heads,) * arch.num_layers, (arch.intermediate_size,) * arch.num_layers,
                   arch.hidden_size)

    def for_mode(self, mode: str) -> Kept:
        """The per-layer counts a checkpoint of this export mode holds.

        `native` holds the learned counts; `pad` pads every layer to the largest layer; `uniform` masks are
        already equal per layer (the final-mask step makes them so), which this asserts.
        """
        if mode == "pad":
            return Kept((max(self.groups),) * len(self.groups), (max(self.channels),) * len(self.channels),
                        self.hidden)
        if mode == "uniform" and (len(set(self.groups)) > 1 or len(set(self.channels)) > 1):
            raise ValueError("uniform export needs the same head and FFN count in every layer")
        return self


@dataclass
class ParamCount:
    total: int
    prunable: int
    embeddings: int
    norms: int
    attention: int = 0
    ffn: int = 0
    per_layer: list[dict[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "prunable": self.prunable, "embeddings": self.embeddings,
                "norms": self.norms, "attention": self.attention, "ffn": self.ffn}


def attention_params(arch: ArchSpec, groups: int, hidden: int) -> int:
    """Parameters of one attention block keeping `groups` KV groups over `hidden` residual dims.

    q and o carry H/G query heads per group, k and v one head each; a block with no group is dropped.
    """
    if groups == 0:
        return 0
    h, rep = arch.head_dim, arch.group_size
    n = hidden * groups * (2 * rep * h + 2 * h)
    if arch.qkv_bias:
        n += groups * (rep * h + 2 * h)
    if arch.o_bias:
        n += hidden
    return n


def ffn_params(arch: ArchSpec, channels: int, hidden: int) -> int:
    """Parameters of one FFN block (gate, up, down) keeping `channels` intermediate channels."""
    if channels == 0:
        return 0
    n = 3 * hidden * channels
    if arch.mlp_bias:
        n += 2 * channels + hidden
    return n


def head_norm_params(arch: ArchSpec) -> int:
    """Qwen3's per-head q_norm and k_norm of one attention block: two weights of head_dim, shared by all heads,
    so pruning heads or hidden dims leaves them whole; they go only with the whole block."""
    return 2 * arch.head_dim if arch.qk_norm else 0


def embedding_params(arch: ArchSpec, hidden: int) -> int:
    return arch.vocab_size * hidden * (1 if arch.tie_embeddings else 2)


def count_params(arch: ArchSpec, kept: Kept | None = None, mode: str = "native") -> ParamCount:
    """Exact parameter count of the model (sliced to `kept`, exported in `mode`)."""
    kept = (kept or Kept.full(arch)).for_mode(mode)
    d = kept.hidden
    per_layer = []
    attn_total = ffn_total = 0
    norms = d  # final norm
    for g, c in zip(kept.groups, kept.channels, strict=True):
        a, f = attention_params(arch, g, d), ffn_params(arch, c, d)
        attn_total += a
        ffn_total += f
        # A native checkpoint drops a dropped block's norms with it; stock classes keep every norm.
        attention_kept, ffn_kept = g > 0 or mode != "native", c > 0 or mode != "native"
        norms += (d + head_norm_params(arch)) * attention_kept + d * ffn_kept
        per_layer.append({"attention": a, "ffn": f})
    emb = embedding_params(arch, d)
    prunable = attn_total + ffn_total
    return ParamCount(total=prunable + emb + norms, prunable=prunable, embeddings=emb, norms=norms,
                      attention=attn_total, ffn=ffn_total, per_layer=per_layer)


def prunable_sparsity(arch: ArchSpec, kept: Kept) -> float:
    """The paper's sparsity: the fraction of the source's prunable parameters removed."""
    return 1.0 - count_params(arch, kept).prunable / count_params(arch).prunable


def sparsity_for_total(arch: ArchSpec, total: int) -> float:
    """The prunable sparsity that gives `total` parameters when hidden dims are kept (the planner's
    convention: the target is stated on prunable parameters, embeddings and norms stay)."""
    src = count_params(arch)
    return 1.0 - (total - src.embeddings - src.norms) / src.prunable


def lora_params(arch: ArchSpec, r: int, target_modules: list[str] | tuple[str, ...]) -> int:
    """Trainable LoRA parameters: r * (in + out) per targeted projection per layer."""
    d, h, f = arch.hidden_size, arch.head_dim, arch.intermediate_size
    shapes = {
        "q_proj": (d, arch.num_heads * h), "k_proj": (d, arch.num_kv_heads * h),
        "v_proj": (d, arch.num_kv_heads * h), "o_proj": (arch.num_heads * h, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    return arch.num_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules)


def gate_params(arch: ArchSpec, structures: list[str] | tuple[str, ...]) -> int:
    """Gate logits: one per KV group per layer, one per FFN channel per layer, one per hidden dim, and
    one per layer for each optional whole-block gate."""
    n = 0
    if "heads" in structures:
        n += arch.num_layers * arch.num_kv_heads
    if "ffn" in structures:
        n += arch.num_layers * arch.intermediate_size
    if "hidden" in structures:
        n += arch.hidden_size
    n += arch.num_layers * sum(s in structures for s in ("attention_blocks", "ffn_blocks"))
    return n


DEFAULT_MULTIPLE_OF = 64  # fp16 tensor-core GEMMs run best at multiples of 64; llama.cpp's q8_0 blocks (32) divide it
ALIGN_FROM = 16 * DEFAULT_MULTIPLE_OF  # the default aligns a dimension of at least 16 such units


@dataclass(frozen=True)
class Alignment:
    """The unit that kept FFN channels (per layer) and kept hidden dims come in. A count equal to the whole
    dimension is always allowed, so a source width that is not a multiple stays loadable."""

    ffn: int
    hidden: int

    @classmethod
    def of(cls, arch: ArchSpec, multiple_of: int | None) -> Alignment:
        """`multiple_of` None is the default: 64 for a dimension of at least 1,024 (7B-class widths: hidden
        4096, FFN 11008 = 172 x 64), 1 below, where a 64-wide unit would be a large share of the dimension
        and tiny models could not meet their target."""
        def unit(dim: int) -> int:
            if multiple_of is not None:
                return multiple_of
            return DEFAULT_MULTIPLE_OF if dim >= ALIGN_FROM else 1
        return cls(ffn=unit(arch.intermediate_size), hidden=unit(arch.hidden_size))

    def as_dict(self) -> dict[str, int]:
        return {"ffn_channels": self.ffn, "hidden_dims": self.hidden}


def aligned_counts(unit: int, full: int) -> list[int]:
    """The counts a dimension of `full` may keep under `unit`, ascending: multiples of `unit`, and `full`."""
    return sorted({*range(unit, full, unit), full})


def alignment_problem(arch: ArchSpec, multiple_of: int | None, structures: Sequence[str]) -> str | None:
    """Why an explicit `multiple_of` defeats a pruned dimension (None when it does not): at the dimension's
    width or above, the dimension can only keep all of it (hidden dims: never pruned) or, per layer, all or
    none (FFN channels: whole FFN blocks), which is not what listing the structure asks for."""
    if multiple_of is None or multiple_of == 1:
        return None
    for structure, what, width in (("ffn", "FFN width", arch.intermediate_size),
                                   ("hidden", "hidden size", arch.hidden_size)):
        if structure in structures and multiple_of >= width:
            return (f"{multiple_of} is not below the model's {what} ({width}), so '{structure}' could keep only "
                    f"all or none of it; use a unit that leaves several per dimension (e.g. 8), 1 for none, or "
                    "null for the default")
    return None


def pruned_kinds(structures: Sequence[str]) -> tuple[bool, bool]:
    """(heads pruned, FFN pruned): by their own gates or by whole-block gates."""
    return ("heads" in structures or "attention_blocks" in structures,
            "ffn" in structures or "ffn_blocks" in structures)


def fixed_cost(arch: ArchSpec, hidden: int, heads_on: bool, ffn_on: bool) -> int:
    """Prunable parameters of the structure types that are not being pruned, at `hidden` dims."""
    kept = Kept(tuple([arch.num_kv_heads if not heads_on else 0] * arch.num_layers),
                tuple([arch.intermediate_size if not ffn_on else 0] * arch.num_layers), hidden)
    return count_params(arch, kept).prunable


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in [0, upper] with fits(n), for a predicate that holds up to some point and fails after."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def prunable_budget(arch: ArchSpec, sparsity: float) -> float:
    """The prunable parameters a model pruned to `sparsity` may keep."""
    return (1.0 - sparsity) * count_params(arch).prunable


def hidden_cap(arch: ArchSpec, budget: float, structures: Sequence[str]) -> int:
    """The most hidden dims with which the structure types not pruned still fit the prunable `budget`
    (0: none do); the whole hidden size when hidden dims are not pruned and it fits."""
    heads_on, ffn_on = pruned_kinds(structures)
    if "hidden" not in structures:
        return arch.hidden_size if fixed_cost(arch, arch.hidden_size, heads_on, ffn_on) <= budget else 0
    return largest_fitting(lambda n: fixed_cost(arch, n, heads_on, ffn_on) <= budget, arch.hidden_size)


def unmeetable_target(arch: ArchSpec, sparsity: float, structures: Sequence[str], multiple_of: int | None,
                      mode: str) -> tuple[str, str] | None:
    """(recipe field to change, why) when no masks over `structures` (aligned by `multiple_of`, shaped for
    export `mode`) reach `sparsity`; None when some do. The recipe loader asks before any training, the
    final-mask selection relies on it."""
    if mode == "uniform" and (("attention_blocks" in structures and "heads" not in structures)
                              or ("ffn_blocks" in structures and "ffn" not in structures)):
        return "export.mode", ("export.mode uniform keeps the same structures in every layer, so it cannot drop "
                               "whole blocks alone; add heads / ffn to target.structures or use export.mode native")
    cap = hidden_cap(arch, prunable_budget(arch, sparsity), structures)
    if cap == 0:
        return "target.structures", (f"target sparsity {sparsity:.3f} cannot be reached by pruning "
                                     f"{', '.join(structures)}; add structures to target.structures or lower the "
                                     "target")
    unit = Alignment.of(arch, multiple_of).hidden
    if "hidden" in structures and min(unit, arch.hidden_size) > cap:  # the smallest count `aligned_counts` allows
        return "target.multiple_of", (f"target.multiple_of {unit} leaves no hidden size that meets the target (at "
                                      f"most {cap} of {arch.hidden_size} dims fit); lower target.multiple_of or the "
                                      "target sparsity")
    return None


def target_sparsity(recipe: Recipe, arch: ArchSpec) -> float:
    """The prunable sparsity the recipe asks for (target.params converted with hidden dims kept)."""
    if recipe.target.sparsity is not None:
        return recipe.target.sparsity
    assert recipe.target.params is not None
    return sparsity_for_total(arch, recipe.target.params)

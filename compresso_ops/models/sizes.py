"""Exact parameter counts of a LLaMA-family model (Qwen3 included) before and after structured pruning.

One set of formulas serves the planner (before any training), the final-mask selection (to meet the
target) and the slice stage's check (the exported checkpoint must hold exactly what these formulas say).
"Prunable" follows the paper: the attention and FFN projections (their biases included). Embeddings and
norms are not prunable but shrink with the kept hidden dims (Qwen3's per-head q/k norms do not: they span
head_dim).
"""

from __future__ import annotations

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


def target_sparsity(recipe: Recipe, arch: ArchSpec) -> float:
    """The prunable sparsity the recipe asks for (target.params converted with hidden dims kept)."""
    if recipe.target.sparsity is not None:
        return recipe.target.sparsity
    assert recipe.target.params is not None
    return sparsity_for_total(arch, recipe.target.params)

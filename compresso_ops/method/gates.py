"""Hard-concrete (L0) gates, their expected size, and the Lagrangian that drives it to the target.

Everything follows docs/method.md §3-5. The expected size is a product of sums (expected hidden dims
times expected attention/FFN widths), never an outer product of gate vectors, and uses the same
per-structure costs as `sizes.attention_params` / `sizes.ffn_params`, so that with 0/1 probabilities it
equals the exact count the slice stage will produce.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params

LOW, HIGH, BETA, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
INIT_DROP_RATE = 0.01
INIT_MEAN = math.log(1 - INIT_DROP_RATE) - math.log(INIT_DROP_RATE)  # 4.595
INIT_STD = 0.01
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
_PROB_SHIFT = BETA * math.log(-LOW / HIGH)  # P(z != 0) = sigmoid(log_alpha - _PROB_SHIFT)

STRUCTURES = ("heads", "ffn", "hidden", "attention_blocks", "ffn_blocks")


def gate_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    L = arch.num_layers
    return {"heads": (L, arch.num_kv_heads), "ffn": (L, arch.intermediate_size), "hidden": (arch.hidden_size,),
            "attention_blocks": (L,), "ffn_blocks": (L,)}


def sample_gate(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One hard-concrete sample z in [0, 1], differentiable in log_alpha."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u * (1 - 2 * EPS) + EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (HIGH - LOW) + LOW).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0), the quantity the expected size is built from."""
    return torch.sigmoid(log_alpha - _PROB_SHIFT)


def deterministic_score(log_alpha: torch.Tensor) -> torch.Tensor:
    """The reference's test-time gate value; only its order matters (final masks rank by it)."""
    return torch.sigmoid(log_alpha / BETA * 0.8)


class GateSet(nn.Module):
    """log_alpha of every gated structure named in `structures` (recipe.target.structures)."""

    def __init__(self, arch: ArchSpec, structures: list[str] | tuple[str, ...], seed: int = 0) -> None:
        super().__init__()
        unknown = set(structures) - set(STRUCTURES)
        if unknown:
            raise ValueError(f"unknown gate structures {sorted(unknown)}")
        self.arch = arch
        self.structures = tuple(s for s in STRUCTURES if s in structures)
        gen = torch.Generator().manual_seed(seed)
        shapes = gate_shapes(arch)
        self.log_alpha = nn.ParameterDict({
            s: nn.Parameter(torch.randn(shapes[s], generator=gen) * INIT_STD + INIT_MEAN) for s in self.structures
        })

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One sample per structure, shared by every example of the micro-batch."""
        return {s: sample_gate(la, generator) for s, la in self.log_alpha.items()}

    def probabilities(self) -> dict[str, torch.Tensor]:
        return {s: prob_nonzero(la) for s, la in self.log_alpha.items()}

    def scores(self) -> dict[str, torch.Tensor]:
        return {s: deterministic_score(la.detach()) for s, la in self.log_alpha.items()}

    def expected_prunable(self) -> torch.Tensor:
        return expected_prunable(self.probabilities(), self.arch)

    def expected_sparsity(self) -> torch.Tensor:
        return 1.0 - self.expected_prunable() / count_params(self.arch).prunable

    @torch.no_grad()
    def clamp_(self) -> None:
        """The reference clamps after every optimizer step so no gate saturates beyond recovery."""
        for la in self.log_alpha.values():
            la.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def expected_prunable(probs: dict[str, torch.Tensor], arch: ArchSpec) -> torch.Tensor:
    """E[prunable parameters] given P(z != 0) per structure (absent structures are always kept).

    Mirrors `sizes.attention_params` / `sizes.ffn_params` term by term: weights scale with hidden dims times
    width, q/k/v biases with width only, and an o_proj / down_proj bias exists when its block keeps anything
    (probability 1 - prod(1 - p)). Computed in float64 so 0/1 probabilities give the exact integer count.
    """
    L, G, f, d = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    ref = next(iter(probs.values()))
    kw = {"device": ref.device, "dtype": torch.float64}

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return probs[name].double() if name in probs else torch.ones(shape, **kw)

    hidden = probs["hidden"].double().sum() if "hidden" in probs else torch.tensor(float(d), **kw)
    heads, attn_block = get("heads", (L, G)), get("attention_blocks", (L,))
    ffn, ffn_block = get("ffn", (L, f)), get("ffn_blocks", (L,))

    h, rep = arch.head_dim, arch.group_size
    groups = (heads.sum(1) * attn_block).sum()
    attn = hidden * groups * (2 * rep * h + 2 * h)
    if arch.qkv_bias:
        attn = attn + groups * (rep * h + 2 * h)
    if arch.o_bias:
        attn = attn + hidden * (attn_block * (1 - torch.prod(1 - heads, dim=1))).sum()
    channels = (ffn.sum(1) * ffn_block).sum()
    mlp = 3 * hidden * channels
    if arch.mlp_bias:
        mlp = mlp + 2 * channels + hidden * (ffn_block * (1 - torch.prod(1 - ffn, dim=1))).sum()
    return attn + mlp


class Lagrangian(nn.Module):
    """lambda1 * (s_hat - S) + lambda2 * (s_hat - S)^2; the lambdas start at 0 and are trained by ascent."""

    def __init__(self) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))

    def forward(self, expected_sparsity: torch.Tensor, target: float) -> torch.Tensor:
        gap = expected_sparsity.to(self.lambda1.dtype) - target
        return self.lambda1 * gap + self.lambda2 * gap * gap


def target_at(step: int, target: float, ramp_start: int, ramp_steps: int) -> float:
    """S(t) for the 0-based optimizer step `step`: 0 before the ramp, linear to `target` at the ramp's last
    step, `target` after."""
    if step < ramp_start:
        return 0.0
    if ramp_steps <= 0:
        return target
    return target * min(1.0, (step - ramp_start + 1) / ramp_steps)

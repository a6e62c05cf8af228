"""Hard-concrete gates, the expected-size formula, the Lagrangian and final-mask selection."""

from __future__ import annotations

import math

import pytest
import torch

from compresso_ops.errors import UserError
from compresso_ops.method.gates import (
    INIT_MEAN,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    GateSet,
    Lagrangian,
    deterministic_score,
    expected_prunable,
    prob_nonzero,
    sample_gate,
    target_at,
)
from compresso_ops.method.masks import Masks, select_final_masks, select_final_masks_from_scores
from compresso_ops.models.architecture import PRESETS, ArchSpec
from compresso_ops.models.sizes import Kept, count_params, prunable_sparsity
from tests.tiny import tiny_config

ARCHS = {
    "llama_mha": ArchSpec.from_hf_config(tiny_config("llama", gqa=False)),
    "llama_gqa_tied": ArchSpec.from_hf_config(tiny_config("llama", gqa=True, tied=True)),
    "mistral_gqa": ArchSpec.from_hf_config(tiny_config("mistral", gqa=True)),
    "qwen2_biases": ArchSpec.from_hf_config(tiny_config("qwen2", gqa=True)),
}
_biased = tiny_config("llama", gqa=True)
_biased.attention_bias, _biased.mlp_bias = True, True
ARCHS["llama_o_and_mlp_bias"] = ArchSpec.from_hf_config(_biased)


def test_probability_of_nonzero_matches_monte_carlo():
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0])
    gen = torch.Generator().manual_seed(0)
    samples = sample_gate(log_alpha.expand(40000, -1), gen)  # 40000 independent draws per gate
    assert samples.min() >= 0 and samples.max() <= 1
    assert (samples == 0).any() and (samples == 1).any()  # the stretch-and-clamp makes exact 0 and 1 reachable
    empirical = (samples > 0).float().mean(0)
    assert torch.allclose(empirical, prob_nonzero(log_alpha), atol=0.01)


def test_init_sampling_and_clamp_follow_the_reference():
    arch = ARCHS["llama_gqa_tied"]
    gates = GateSet(arch, ["heads", "ffn", "hidden"], seed=3)
    ffn = gates.log_alpha["ffn"].detach()
    assert abs(ffn.mean().item() - INIT_MEAN) < 0.01 and abs(ffn.std().item() - 0.01) < 0.003
    assert abs(INIT_MEAN - math.log(99)) < 1e-9
    # Same seed, same gates; same sampler seed, same samples.
    again = GateSet(arch, ["heads", "ffn", "hidden"], seed=3)
    assert torch.equal(again.log_alpha["hidden"], gates.log_alpha["hidden"])
    a = gates.sample(torch.Generator().manual_seed(7))
    b = gates.sample(torch.Generator().manual_seed(7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        gates.log_alpha["heads"].fill_(50.0)
        gates.log_alpha["ffn"].fill_(-50.0)
    gates.clamp_()
    assert torch.allclose(gates.log_alpha["heads"], torch.tensor(LOG_ALPHA_MAX))
    assert torch.allclose(gates.log_alpha["ffn"], torch.tensor(LOG_ALPHA_MIN))


def test_deterministic_score_ranks_like_log_alpha():
    la = torch.randn(100)
    assert torch.equal(torch.argsort(deterministic_score(la)), torch.argsort(la))


def _random_kept_probs(arch: ArchSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    L, G, f, d = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    probs = {"heads": (torch.rand(L, G, generator=gen) > 0.4).float(),
             "ffn": (torch.rand(L, f, generator=gen) > 0.5).float(),
             "hidden": (torch.rand(d, generator=gen) > 0.3).float()}
    probs["heads"][0] = 0.0  # a layer that drops its whole attention block
    probs["ffn"][-1] = 0.0  # and one that drops its FFN block
    return probs


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_expected_size_of_binary_gates_is_the_exact_count(name):
    arch = ARCHS[name]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        probs = _random_kept_probs(arch, gen)
        kept = Masks(probs["heads"], probs["ffn"], probs["hidden"]).kept()
        assert expected_prunable(probs, arch).item() == count_params(arch, kept).prunable
    full = {k: torch.ones_like(v) for k, v in probs.items()}
    assert expected_prunable(full, arch).item() == count_params(arch).prunable


def test_block_gates_and_absent_structures():
    arch = ARCHS["qwen2_biases"]
    L, G, f = arch.num_layers, arch.num_kv_heads, arch.intermediate_size
    probs = {"heads": torch.ones(L, G), "attention_blocks": torch.tensor([0.0, 1.0]),
             "ffn_blocks": torch.tensor([1.0, 0.0])}  # no ffn / hidden entry: always kept
    kept = Kept((0, G), (f, 0), arch.hidden_size)
    assert expected_prunable(probs, arch).item() == count_params(arch, kept).prunable


def test_expected_size_is_a_product_of_sums_and_differentiable():
    arch = PRESETS["llama-7b"]  # the outer product would hold 1.4e9 entries; this must stay instant
    gates = GateSet(arch, ["heads", "ffn", "hidden"])
    s_hat = gates.expected_sparsity()
    assert 0 < s_hat.item() < 0.05  # every gate starts almost surely open
    s_hat.backward()
    assert all(la.grad is not None and torch.all(la.grad < 0) for la in gates.log_alpha.values())


def test_lagrangian_is_maximised_by_its_multipliers():
    lag = Lagrangian()
    opt = torch.optim.AdamW(lag.parameters(), lr=0.1, weight_decay=0.0, maximize=True)
    s_hat, target = torch.tensor(0.1), 0.3  # below target: lambda1 goes negative, lambda2 up
    value = lag(s_hat, target)
    assert value.item() == 0.0
    value.backward()
    opt.step()
    assert lag.lambda1.item() < 0 and lag.lambda2.item() > 0
    gap = 0.1 - 0.3
    assert lag(s_hat, target).item() == pytest.approx(lag.lambda1.item() * gap + lag.lambda2.item() * gap**2)


def test_target_ramps_linearly_then_holds():
    assert [target_at(s, 0.4, ramp_start=2, ramp_steps=4) for s in range(8)] == pytest.approx(
        [0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


# ------------------------------------------------------------------------------------ final masks

def _unit_sizes(arch: ArchSpec, hidden: int) -> tuple[int, int]:
    """Largest single structure at `hidden` dims: one KV group (with biases) and one FFN channel."""
    return (count_params(arch, Kept((1,) * arch.num_layers, (0,) * arch.num_layers, hidden)).prunable
            // arch.num_layers, 3 * hidden + 2 + hidden)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_biases", "llama_o_and_mlp_bias"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.8])
def test_final_masks_meet_the_target_within_one_structure(name, target):
    arch = ARCHS[name]
    gen = torch.Generator().manual_seed(2)
    scores = {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=gen),
              "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=gen),
              "hidden": torch.rand(arch.hidden_size, generator=gen)}
    masks = select_final_masks_from_scores(scores, arch, target, "native", ("heads", "ffn", "hidden"),
                                           hidden_kept=28)
    masks.validate(arch)
    achieved = prunable_sparsity(arch, masks.kept())
    slack = max(_unit_sizes(arch, masks.kept().hidden)) / count_params(arch).prunable
    assert target <= achieved < target + slack
    assert masks.kept().hidden == 28
    assert torch.equal(masks.hidden, (scores["hidden"] >= scores["hidden"].sort(descending=True).values[27]).float())
    # Greedy by score across kinds: no dropped head or channel outranks a kept one.
    kept = torch.cat([scores["heads"][masks.heads == 1], scores["ffn"][masks.ffn == 1]])
    dropped = torch.cat([scores["heads"][masks.heads == 0], scores["ffn"][masks.ffn == 0]])
    assert len(dropped) > 0 and kept.min() >= dropped.max()


def test_uniform_masks_keep_the_same_counts_in_every_layer():
    arch = PRESETS["llama-2-7b"]
    gen = torch.Generator().manual_seed(4)
    scores = {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=gen),
              "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=gen)}
    masks = select_final_masks_from_scores(scores, arch, 0.3, "uniform", ("heads", "ffn"))
    kept = masks.kept()
    assert len(set(kept.groups)) == 1 and len(set(kept.channels)) == 1 and kept.hidden == arch.hidden_size
    achieved = prunable_sparsity(arch, kept)
    layer_unit = arch.num_layers * max(_unit_sizes(arch, arch.hidden_size)) / count_params(arch).prunable
    assert 0.3 <= achieved < 0.3 + layer_unit
    # Each layer keeps its own best channels.
    row = scores["ffn"][5]
    assert torch.equal(masks.ffn[5], (row >= row.sort(descending=True).values[kept.channels[0] - 1]).float())


def test_block_only_and_hidden_only_structures():
    arch = ARCHS["llama_mha"]
    scores = {"attention_blocks": torch.tensor([0.2, 0.9]), "ffn_blocks": torch.tensor([0.8, 0.1])}
    masks = select_final_masks_from_scores(scores, arch, 0.3, "native", ("attention_blocks", "ffn_blocks"))
    assert masks.heads[0].sum() == 0 and masks.heads[1].sum() == arch.num_kv_heads  # whole blocks go
    assert masks.ffn.sum(1).tolist() == [arch.intermediate_size, 0]
    assert prunable_sparsity(arch, masks.kept()) >= 0.3
    with pytest.raises(UserError, match="uniform"):
        select_final_masks_from_scores(scores, arch, 0.3, "uniform", ("attention_blocks",))
    hidden_only = select_final_masks_from_scores({"hidden": torch.rand(arch.hidden_size)}, arch, 0.25, "native",
                                                 ("hidden",))
    assert hidden_only.kept().hidden == 24  # prunable size is linear in the hidden dims: 32 * 0.75
    with pytest.raises(UserError, match="target.structures"):
        select_final_masks_from_scores({"heads": torch.rand(2, 4)}, arch, 0.9, "native", ("heads",))


def test_final_masks_from_trained_gates_use_expected_hidden_count():
    arch = ARCHS["llama_gqa_tied"]
    gates = GateSet(arch, ["heads", "ffn", "hidden"])
    with torch.no_grad():
        gates.log_alpha["hidden"][:8] = LOG_ALPHA_MIN - 20  # P(nonzero) ~ 0: those 8 dims go
        gates.log_alpha["hidden"][8:] = 20.0
        gates.log_alpha["ffn"].normal_(0, 2)
    masks = select_final_masks(gates, arch, 0.4)
    assert masks.kept().hidden == arch.hidden_size - 8 and masks.hidden[:8].sum() == 0
    assert prunable_sparsity(arch, masks.kept()) >= 0.4


def _random_scores(arch: ArchSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"heads": torch.rand(arch.num_layers, arch.num_kv_heads, generator=gen),
            "ffn": torch.rand(arch.num_layers, arch.intermediate_size, generator=gen),
            "hidden": torch.rand(arch.hidden_size, generator=gen)}


@pytest.mark.parametrize("mode", ["native", "uniform", "pad"])
@pytest.mark.parametrize("target", [0.2, 0.35, 0.6])
def test_7b_masks_are_aligned_to_64_by_default_and_meet_the_target_within_one_aligned_unit(mode, target):
    arch = PRESETS["llama-7b"]
    scores = _random_scores(arch, 5)
    masks = select_final_masks_from_scores(scores, arch, target, mode, ("heads", "ffn", "hidden"), hidden_kept=3001)
    kept = masks.kept()
    assert kept.hidden % 64 == 0 and kept.hidden < arch.hidden_size
    assert all(c % 64 == 0 for c in kept.channels) and len(set(kept.channels)) > (mode != "uniform")
    layers = arch.num_layers if mode == "uniform" else 1  # a uniform unit spans every layer
    group, channel = _unit_sizes(arch, kept.hidden)
    slack = layers * max(group, 64 * channel) / count_params(arch).prunable
    assert target <= prunable_sparsity(arch, kept) < target + slack
    # A layer keeps its best channels, and no dropped aligned unit outranks a kept one.
    for row, mask in zip(scores["ffn"], masks.ffn, strict=True):
        n = int(mask.sum())
        assert torch.equal(mask, (row >= row.sort(descending=True).values[n - 1]).float())


def test_explicit_multiple_of_aligns_a_tiny_model_and_1_turns_alignment_off():
    arch = ArchSpec.from_hf_config(tiny_config("llama", hidden=64, ffn=172, layers=3))  # stories260K's widths
    scores = _random_scores(arch, 6)
    default = select_final_masks_from_scores(scores, arch, 0.3, "native", ("heads", "ffn", "hidden"), hidden_kept=53)
    assert default.kept().hidden == 53  # below 1,024 dims the default leaves counts as they are
    off = select_final_masks_from_scores(scores, arch, 0.3, "native", ("heads", "ffn", "hidden"), hidden_kept=53,
                                         multiple_of=1)
    assert off.kept() == default.kept()
    eight = select_final_masks_from_scores(scores, arch, 0.3, "native", ("heads", "ffn", "hidden"), hidden_kept=53,
                                           multiple_of=8)
    kept = eight.kept()
    assert kept.hidden == 56 and all(c % 8 == 0 or c == 172 for c in kept.channels)
    group, channel = _unit_sizes(arch, kept.hidden)
    assert 0.3 <= prunable_sparsity(arch, kept) < 0.3 + max(group, 8 * channel) / count_params(arch).prunable
    with pytest.raises(UserError, match="target.multiple_of 128"):  # no hidden width below 64 is a multiple
        select_final_masks_from_scores({"hidden": scores["hidden"]}, arch, 0.3, "native", ("hidden",),
                                       multiple_of=128)


def test_auto_gate_rates_are_the_papers_on_long_ramps_and_give_short_ramps_the_same_travel():
    from compresso_ops.method.rates import GATE_TRAVEL, LAMBDA_TRAVEL, REFERENCE_LR, gate_learning_rates

    assert gate_learning_rates("auto", "auto", 1628) == (REFERENCE_LR, REFERENCE_LR)  # the paper's schedule
    gates, lam = gate_learning_rates("auto", "auto", 40)
    assert gates * 40 == pytest.approx(GATE_TRAVEL) and lam * 40 == pytest.approx(LAMBDA_TRAVEL)
    assert gate_learning_rates(0.3, 0.2, 40) == (0.3, 0.2)  # numbers in the recipe are taken as given


def test_a_ramp_that_ends_far_from_the_target_is_named():
    from compresso_ops.method.rates import ramp_lag

    assert ramp_lag(0.19, 0.2) is None and ramp_lag(None, 0.2) is None
    assert "ended the ramp at 0.006 for a target of 0.200" in ramp_lag(0.006, 0.2)

"""Slicing: the sliced model computes the masked model's logits with exactly the predicted parameters.

The reference "masked model" here is built by zeroing weights by hand (`zeroed_reference`), independently of
the forward hooks the slice stage uses for its own check (`slicing.masked`), so each validates the other.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from compresso_ops.method.hooks import masked
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import build_model, check_batch, logits, native_config, stock_config
from compresso_ops.models.sizes import count_params
from compresso_ops.models.slicing import drop_empty_blocks, head_rows, merge_lora, pad_state_dict, slice_state_dict
from tests.tiny import tiny_config, tiny_model

TOL = 1e-4

# (model_type, tiny_model kwargs): MHA and GQA, tied and untied, the Llama-3 layout (llama3 RoPE scaling, tied
# like Llama-3.2-1B/3B), Qwen2 q/k/v biases, Qwen3 per-head q/k norms with head_dim != hidden/heads, Mistral
VARIANTS = {
    "llama-gqa-untied": ("llama", {"gqa": True, "tied": False}),
    "llama-mha-tied": ("llama", {"gqa": False, "tied": True}),
    "llama3-rope-tied": ("llama", {"gqa": True, "tied": True, "llama3_rope": True}),
    "qwen2-bias-tied": ("qwen2", {"gqa": True, "tied": True}),
    "qwen3-qknorm-tied": ("qwen3", {"gqa": True, "tied": True}),
    "mistral-mha": ("mistral", {"gqa": False}),
}

# The stock class a uniform or pad export of each source type reloads as.
STOCK_CLASS = {"llama": "MistralForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def random_masks(
    arch: ArchSpec,
    seed: int = 0,
    *,
    keep: float = 0.6,
    hidden: bool = True,
    no_heads_layer: int | None = 0,
    no_ffn_layer: int | None = -1,
) -> Masks:
    """Non-uniform 0/1 masks; optionally one layer keeps no head and one keeps no FFN channel."""
    g = torch.Generator().manual_seed(seed)
    L, G, f, d = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    heads = (torch.rand(L, G, generator=g) < keep).float()
    heads[torch.arange(L), torch.randint(0, G, (L,), generator=g)] = 1.0  # every layer keeps >= 1 group ...
    ffn = (torch.rand(L, f, generator=g) < keep).float()
    ffn[:, 0] = 1.0
    hid = (torch.rand(d, generator=g) < 0.75).float() if hidden else torch.ones(d)
    hid[0] = 1.0
    if no_heads_layer is not None:  # ... except the one meant to lose its attention block
        heads[no_heads_layer] = 0.0
    if no_ffn_layer is not None:
        ffn[no_ffn_layer] = 0.0
    return Masks(heads, ffn, hid)


def uniform_masks(
    arch: ArchSpec, seed: int = 0, groups: int = 1, channels: int = 20, hidden_keep: int = 24
) -> Masks:
    """Random masks with the same counts in every layer (different indices per layer)."""
    g = torch.Generator().manual_seed(seed)
    L = arch.num_layers
    heads, ffn = torch.zeros(L, arch.num_kv_heads), torch.zeros(L, arch.intermediate_size)
    for i in range(L):
        heads[i, torch.randperm(arch.num_kv_heads, generator=g)[:groups]] = 1.0
        ffn[i, torch.randperm(arch.intermediate_size, generator=g)[:channels]] = 1.0
    hid = torch.zeros(arch.hidden_size)
    hid[torch.randperm(arch.hidden_size, generator=g)[:hidden_keep]] = 1.0
    return Masks(heads, ffn, hid)


@torch.no_grad()
def zeroed_reference(model: torch.nn.Module, masks: Masks) -> torch.nn.Module:
    """The masked model built by zeroing weights: dropped heads' q/k/v rows and o columns, dropped channels'
    gate/up rows and down columns, dropped hidden dims' embedding columns and o/down output rows (and biases).
    RMSNorm still divides by the full hidden size, exactly as in the gated model."""
    ref = copy.deepcopy(model)
    arch = ArchSpec.from_hf_config(model.config)
    drop_d = masks.hidden == 0
    ref.model.embed_tokens.weight[:, drop_d] = 0
    for i, layer in enumerate(ref.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        dropped = torch.nonzero(masks.heads[i] == 0).flatten()
        q_rows, kv_rows = head_rows(dropped, arch.group_size, arch.head_dim)
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        attn.o_proj.weight[:, q_rows] = 0
        drop_c = masks.ffn[i] == 0
        mlp.gate_proj.weight[drop_c] = 0
        mlp.up_proj.weight[drop_c] = 0
        mlp.down_proj.weight[:, drop_c] = 0
        for proj in (attn.o_proj, mlp.down_proj):
            proj.weight[drop_d] = 0
            if proj.bias is not None:
                proj.bias[drop_d] = 0
        # A block that keeps nothing is gone, its output bias with it.
        for proj, kept in ((attn.o_proj, masks.heads[i]), (mlp.down_proj, masks.ffn[i])):
            if proj.bias is not None and not kept.any():
                proj.bias.zero_()
    return ref


def _native(model: torch.nn.Module, masks: Masks) -> torch.nn.Module:
    sd, shape = slice_state_dict(model, masks)
    return build_model(native_config(model.config, shape), drop_empty_blocks(sd, shape))


def test_head_rows_follow_repeat_kv_layout():
    q, kv = head_rows(torch.tensor([1]), group_size=2, head_dim=3)
    assert q.tolist() == [6, 7, 8, 9, 10, 11]  # query heads 2 and 3 read KV head 1
    assert kv.tolist() == [3, 4, 5]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hooks_equal_zeroed_weights(variant):
    model_type, kw = VARIANTS[variant]
    model = tiny_model(model_type, layers=3, **kw)
    masks = random_masks(ArchSpec.from_hf_config(model.config))
    batch = check_batch(model.config)
    with masked(model, masks):
        hooked = logits(model, batch)
    assert (hooked - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL
    assert not torch.allclose(hooked, logits(model, batch), atol=1e-3)  # the masks do change the model
    assert not model.model.layers[0].self_attn.o_proj._forward_pre_hooks  # hooks are removed afterwards


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_native_slice_equals_masked_model(variant):
    """Layer 0 keeps no head, the last layer no FFN channel, hidden dims are pruned."""
    model_type, kw = VARIANTS[variant]
    model = tiny_model(model_type, layers=3, **kw)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch)
    small = _native(model, masks)
    batch = check_batch(model.config)
    assert (logits(small, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL
    assert sum(p.numel() for p in small.parameters()) == count_params(arch, masks.kept(), "native").total
    assert small.model.layers[0].self_attn is None and small.model.layers[0].input_layernorm is None
    assert small.model.layers[-1].mlp is None and small.model.layers[-1].post_attention_layernorm is None
    assert small.config.hidden_size == masks.kept().hidden < arch.hidden_size
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == arch.tie_embeddings


@torch.no_grad()
def test_biased_llama_with_dropped_blocks_slices_exactly():
    """LLaMA with attention_bias and mlp_bias: a layer that keeps no head (no channel) loses its o_proj
    (down_proj) bias too, in the masked model as in the native export and the size formulas."""
    config = tiny_config("llama", layers=3)
    config.attention_bias = config.mlp_bias = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.bias.normal_(0, 0.1)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch, no_heads_layer=0, no_ffn_layer=-1)
    batch = check_batch(model.config)
    reference = logits(zeroed_reference(model, masks), batch)
    with masked(model, masks):
        assert (logits(model, batch) - reference).abs().max() <= TOL
    sliced = _native(model, masks)
    assert (logits(sliced, batch) - reference).abs().max() <= TOL
    assert sum(p.numel() for p in sliced.parameters()) == count_params(arch, masks.kept()).total


def test_norm_rescale_is_what_makes_pruned_hidden_exact():
    model = tiny_model("llama", layers=2)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch, no_heads_layer=None, no_ffn_layer=None)
    sd, shape = slice_state_dict(model, masks)
    d, kept = arch.hidden_size, masks.kept().hidden
    assert shape.rms_norm_eps == pytest.approx(arch.rms_norm_eps * d / kept)
    src_norm = model.model.layers[1].input_layernorm.weight[masks.hidden.bool()]
    torch.testing.assert_close(sd["model.layers.1.input_layernorm.weight"], src_norm * (d / kept) ** 0.5)
    unscaled = {k: (v / (d / kept) ** 0.5 if "norm" in k else v) for k, v in sd.items()}
    wrong = build_model(native_config(model.config, shape), unscaled)
    batch = check_batch(model.config)
    assert (logits(wrong, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "qwen2-bias-tied", "qwen3-qknorm-tied"])
def test_pad_slice_is_exact_stock_and_padded_to_largest_layer(variant):
    model_type, kw = VARIANTS[variant]
    model = tiny_model(model_type, layers=3, **kw)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch)
    sd, shape = slice_state_dict(model, masks)
    sd, padded = pad_state_dict(sd, shape)
    small = build_model(stock_config(model.config, padded), sd)
    assert type(small).__name__ == STOCK_CLASS[model_type]
    batch = check_batch(model.config)
    assert (logits(small, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL
    kept = masks.kept()
    assert small.config.num_key_value_heads == max(kept.groups)
    assert small.config.intermediate_size == max(kept.channels)
    assert sum(p.numel() for p in small.parameters()) == count_params(arch, kept, "pad").total


@pytest.mark.parametrize("mode", ["native", "pad"])
def test_qwen3_with_biases_on_all_four_projections_slices_exactly(mode):
    """Qwen3's optional attention_bias (q, k, v and o). Every layer keeps a head: an o_proj bias of a layer with
    no head still reaches the residual stream in the masked model, which no dropped block can reproduce."""
    model = tiny_model("qwen3", layers=3, gqa=False, attention_bias=True)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch, no_heads_layer=None)
    sd, shape = slice_state_dict(model, masks)
    if mode == "native":
        small = build_model(native_config(model.config, shape), drop_empty_blocks(sd, shape))
    else:
        sd, shape = pad_state_dict(sd, shape)
        small = build_model(stock_config(model.config, shape), sd)
    batch = check_batch(model.config)
    assert (logits(small, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL
    assert sum(p.numel() for p in small.parameters()) == count_params(arch, masks.kept(), mode).total
    assert small.model.layers[1].self_attn.o_proj.bias is not None


def test_qwen3_qk_projections_are_rescaled_with_pruned_hidden_dims():
    """q_norm / k_norm read the sliced config's eps (eps * d/|D|); scaling q and k by sqrt(d/|D|) is what keeps
    them exact. Without it the logits drift."""
    model = tiny_model("qwen3", layers=2)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch, no_heads_layer=None, no_ffn_layer=None)
    masks.hidden[arch.hidden_size // 4:] = 0.0  # keep a quarter: eps grows fourfold in the sliced config
    sd, shape = slice_state_dict(model, masks)
    factor = (arch.hidden_size / masks.kept().hidden) ** 0.5
    torch.testing.assert_close(sd["model.layers.0.self_attn.q_norm.weight"],
                               model.model.layers[0].self_attn.q_norm.weight)
    model.config.rms_norm_eps = 0.05  # large enough that an unscaled eps is visible in the logits
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 0.05
        for layer in model.model.layers:  # q, k, v and o of unit scale: attention is far from uniform and counts
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
            layer.self_attn.v_proj.weight.mul_(10)
            layer.self_attn.o_proj.weight.mul_(10)
    sd, shape = slice_state_dict(model, masks)
    exact = build_model(native_config(model.config, shape), drop_empty_blocks(sd, shape))
    unscaled = {k: (v / factor if "q_proj" in k or "k_proj" in k else v) for k, v in sd.items()}
    wrong = build_model(native_config(model.config, shape), drop_empty_blocks(unscaled, shape))
    batch = check_batch(model.config)
    reference = logits(zeroed_reference(model, masks), batch)
    exact_diff = (logits(exact, batch) - reference).abs().max()
    wrong_diff = (logits(wrong, batch) - reference).abs().max()
    assert exact_diff <= TOL and wrong_diff > 1e-3


def test_uniform_slice_of_llama_is_a_mistral_with_explicit_head_dim():
    model = tiny_model("llama", layers=2)
    arch = ArchSpec.from_hf_config(model.config)
    masks = uniform_masks(
        arch, hidden_keep=30
    )  # 30 % 2 heads != head_dim: only an explicit head_dim holds it
    sd, shape = slice_state_dict(model, masks)
    small = build_model(stock_config(model.config, shape), sd)
    assert type(small).__name__ == "MistralForCausalLM" and small.config.sliding_window is None
    assert small.config.head_dim == arch.head_dim and small.config.hidden_size == 30
    batch = check_batch(model.config)
    assert (logits(small, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL


def test_native_generate_with_cache_equals_uncached_recompute_when_layer0_has_no_attention():
    model = tiny_model("llama", layers=3)
    masks = random_masks(ArchSpec.from_hf_config(model.config), no_heads_layer=0)
    small = _native(model, masks)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "pad_token_id": 258}
    cached = small.generate(prompt, use_cache=True, **kw)
    seq = prompt
    for _ in range(12):  # greedy decoding by full recomputation, no cache at all
        seq = torch.cat([seq, logits(small, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)
    out = small(prompt, use_cache=True)
    assert out.cache.get_seq_length() == prompt.shape[1]  # counted from a layer that does store keys


def test_merge_lora_folds_the_adapter_into_the_weights():
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama", layers=2)
    batch = check_batch(model.config)
    base = logits(model, batch)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = logits(peft_model, batch)
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert (logits(merged, batch) - adapted).abs().max() <= TOL
    assert (adapted - base).abs().max() > 1e-3


def test_mistral_sliding_window_is_kept_by_native_export():
    model = tiny_model("mistral", layers=3)
    model.config.sliding_window = 8  # shorter than the check batch, so the window changes the logits
    masks = random_masks(ArchSpec.from_hf_config(model.config))
    small = _native(model, masks)
    assert small.config.sliding_window == 8
    batch = check_batch(model.config)
    ref = zeroed_reference(model, masks)
    windowed = logits(ref, batch)
    assert (logits(small, batch) - windowed).abs().max() <= TOL
    ref.config.sliding_window = None
    assert (logits(ref, batch) - windowed).abs().max() > 1e-3
    prompt = batch[:, :6]
    cached = small.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=258)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, logits(small, seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, seq)

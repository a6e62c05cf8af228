"""Gate hooks act exactly like scaling the weights they stand for, peft LoRA wrappers included."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from compresso_ops.method.gates import GateSet
from compresso_ops.method.hooks import GateHooks, masked
from compresso_ops.method.masks import Masks
from compresso_ops.models.adapter import ModelAdapter
from compresso_ops.training.setup import enable_gradient_checkpointing
from tests.tiny import tiny_model

IDS = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))


def _values(model, soft: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    arch = ModelAdapter(model).arch
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        v = torch.rand(*shape, generator=gen) if soft else (torch.rand(*shape, generator=gen) > 0.4).float()
        v.view(-1)[0] = 0.0  # at least one structure is off
        return v

    return {"heads": draw(arch.num_layers, arch.num_kv_heads), "ffn": draw(arch.num_layers, arch.intermediate_size),
            "hidden": draw(arch.hidden_size)}


@torch.no_grad()
def _scale_weights(model, values: dict[str, torch.Tensor]) -> None:
    """What the hooks stand for, written into the weights: o_proj / down_proj columns by head / FFN gate,
    rows (and biases) of o_proj, down_proj and the embedding columns by the hidden gate."""
    adapter = ModelAdapter(model)
    arch, hidden = adapter.arch, values["hidden"]
    adapter.embed_tokens().weight.mul_(hidden[None, :])
    for layer in range(arch.num_layers):
        o_proj, down = adapter.projection(layer, "o_proj"), adapter.projection(layer, "down_proj")
        cols = values["heads"][layer].repeat_interleave(arch.group_size * arch.head_dim)
        o_proj.weight.mul_(cols[None, :]).mul_(hidden[:, None])
        down.weight.mul_(values["ffn"][layer][None, :]).mul_(hidden[:, None])
        for proj in (o_proj, down):
            if proj.bias is not None:
                proj.bias.mul_(hidden)


@pytest.mark.parametrize("model_type,gqa", [("llama", True), ("llama", False), ("mistral", True), ("qwen2", True)])
@pytest.mark.parametrize("soft", [False, True])
def test_hooks_equal_scaled_weights(model_type, gqa, soft):
    model = tiny_model(model_type, gqa=gqa, tied=model_type == "llama")
    values = _values(model, soft)
    reference = copy.deepcopy(model)
    if reference.config.tie_word_embeddings:  # the hidden gate scales the embedding output, not lm_head's weight
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    _scale_weights(reference, values)
    with torch.no_grad():
        hooks = GateHooks(ModelAdapter(model))
        hooks.set(values)
        gated = model(IDS).logits
        hooks.set(None)  # pass-through
        open_ = model(IDS).logits
        hooks.remove()
        plain = model(IDS).logits
        expected = reference(IDS).logits
    assert (gated - expected).abs().max() < 1e-5
    assert torch.equal(open_, plain)
    assert (gated - plain).abs().max() > 1e-3  # the gates did something


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft asks transformers 5
def test_masks_gate_the_lora_delta_too():
    """Hooks sit on peft's LoRA wrapper: the masked peft model equals the merged model with zeroed weights."""
    model = tiny_model("llama", gqa=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)  # random A and B, so the delta is not zero
    peft_model = get_peft_model(model, config)
    masks = Masks(**_values(peft_model, soft=False))
    with torch.no_grad(), masked(peft_model, masks):
        gated = peft_model(IDS).logits
    merged = copy.deepcopy(peft_model).merge_and_unload()
    with torch.no_grad():
        unmasked = merged(IDS).logits
    _scale_weights(merged, {"heads": masks.heads, "ffn": masks.ffn, "hidden": masks.hidden})
    with torch.no_grad():
        expected = merged(IDS).logits
        after = peft_model(IDS).logits  # the context removed its hooks
    assert (gated - expected).abs().max() < 1e-5
    assert (after - unmasked).abs().max() < 1e-5


def test_block_gates_switch_whole_blocks():
    model = tiny_model("llama", gqa=True)
    arch = ModelAdapter(model).arch
    hooks = GateHooks(ModelAdapter(model))
    with torch.no_grad():
        hooks.set({"attention_blocks": torch.tensor([0.0, 1.0]), "ffn_blocks": torch.tensor([1.0, 0.0])})
        by_blocks = model(IDS).logits
        heads = torch.ones(arch.num_layers, arch.num_kv_heads)
        ffn = torch.ones(arch.num_layers, arch.intermediate_size)
        heads[0], ffn[1] = 0.0, 0.0
        hooks.set({"heads": heads, "ffn": ffn})
        by_structures = model(IDS).logits
    hooks.remove()
    assert torch.equal(by_blocks, by_structures)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sampled_gates_receive_gradients(checkpointing):
    """Every gate gets a gradient, and gradient checkpointing (non-reentrant) gives the same ones."""
    grads = {}
    for ckpt in (False, checkpointing):
        model = tiny_model("llama", gqa=True).train()
        for p in model.parameters():
            p.requires_grad_(False)
        if ckpt:
            enable_gradient_checkpointing(model)
        gates = GateSet(ModelAdapter(model).arch, ["heads", "ffn", "hidden"])
        with torch.no_grad():
            for la in gates.log_alpha.values():
                la.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
        hooks = GateHooks(ModelAdapter(model))
        hooks.set(gates.sample(torch.Generator().manual_seed(3)))
        model(IDS, labels=IDS).loss.backward()
        hooks.remove()
        grads[ckpt] = {k: v.grad.clone() for k, v in gates.log_alpha.items()}
    for k, g in grads[False].items():
        assert g.abs().sum() > 0, k
        assert torch.allclose(g, grads[checkpointing][k], atol=1e-6), k

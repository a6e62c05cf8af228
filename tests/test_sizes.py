"""The size formulas against transformers' own classes: every preset and every supported layout, built on the
meta device (no memory, no weights), holds exactly the parameters `count_params` predicts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from compresso_ops.models.architecture import PRESET_CONFIGS, PRESETS, SUPPORTED_MODEL_TYPES, ArchSpec
from compresso_ops.models.sizes import count_params
from tests.tiny import tiny_config

# The parameter counts the model publishers state (safetensors metadata of the Hugging Face repositories).
PUBLISHED = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "mistral-7b-v0.3": 7_248_023_552,
    "llama-2-70b": 68_976_648_192,
}

# Every supported model type in each of its optional layouts (biases, tying, head_dim != hidden/heads).
LAYOUTS = [
    ("llama", {}),
    ("llama", {"tied": True, "llama3_rope": True}),
    ("llama", {"attention_bias": True, "gqa": False}),
    ("mistral", {}),
    ("qwen2", {"tied": True}),
    ("qwen3", {}),
    ("qwen3", {"tied": True, "attention_bias": True, "head_dim": 16}),
]


def _meta_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESET_CONFIGS))
def test_every_preset_counts_what_transformers_builds(name):
    fields = dict(PRESET_CONFIGS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert count_params(PRESETS[name]).total == _meta_count(config)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_todays_presets_have_the_published_parameter_count(name):
    assert count_params(PRESETS[name]).total == PUBLISHED[name]


def test_every_supported_model_type_has_a_layout_here():
    assert {model_type for model_type, _ in LAYOUTS} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize(("model_type", "kw"), LAYOUTS, ids=[f"{t}-{'-'.join(k) or 'plain'}" for t, k in LAYOUTS])
def test_every_layout_counts_what_transformers_builds(model_type, kw):
    config = tiny_config(model_type, **kw)
    assert count_params(ArchSpec.from_hf_config(config)).total == _meta_count(config)


def test_qwen3_head_dim_defaults_like_transformers_when_config_json_omits_it():
    fields = {k: v for k, v in PRESET_CONFIGS["qwen3-8b"].items() if k != "head_dim"}
    fields.update(hidden_size=2048, num_attention_heads=32)  # d/H = 64, but Qwen3Config defaults to 128
    arch = ArchSpec.from_hf_config(fields)
    model_type = fields.pop("model_type")
    assert arch.head_dim == AutoConfig.for_model(model_type, **fields).head_dim == 128


def test_the_recipe_schema_lists_every_preset():
    from compresso_ops.recipe.schema import ModelSection

    description = ModelSection.model_fields["architecture"].description
    assert all(name in description for name in PRESETS)

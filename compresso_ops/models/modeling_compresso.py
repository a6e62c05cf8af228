"""A LLaMA-family decoder whose layers each keep their own number of heads and FFN channels.

This is the `native` export format of compresso-ops: structured pruning leaves every layer with a different
number of attention heads (whole KV groups) and FFN channels, and some layers with no attention or no FFN at
all. Stock configs hold one count for all layers, so this file adds a config with per-layer lists and a model
that builds the STOCK transformers attention / MLP / RMSNorm modules from per-layer views of that config.
Attention kernels (eager, SDPA, flash), RoPE and the KV cache are therefore transformers' own code.

The file imports only torch and transformers: the exporter copies it next to the weights with an `auto_map`
in config.json, so `trust_remote_code=True` loads an export on a machine without compresso-ops.
Written against the transformers 5.24 API (the `cache` keyword of attention modules and outputs).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.models.mistral.modeling_mistral import MistralAttention
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention


class CompressoLlamaConfig(PreTrainedConfig):
    """Config of a pruned LLaMA/Mistral/Qwen2/Qwen3 model with per-layer head and FFN counts.

    `num_attention_heads`, `num_key_value_heads` and `intermediate_size` are lists with one entry per layer;
    0 heads (or 0 channels) means the layer has no attention (or no FFN) block. `head_dim` is explicit because
    hidden dims may have been pruned. `qkv_bias` / `o_bias` / `mlp_bias` say which projections carry biases:
    Qwen2 has q/k/v biases only, LLaMA's `attention_bias` puts one on all four attention projections.
    `qk_norm`: Qwen3's per-head RMSNorm on queries and keys (head_dim wide, so it survives pruning whole).
    """

    model_type = "compresso_llama"

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: list[int] | None = None
    num_key_value_heads: list[int] | None = None
    intermediate_size: list[int] | None = None
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None
    source_model_type: str = "llama"

    def __post_init__(self, **kwargs: Any) -> None:
        n = self.num_hidden_layers
        for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is None:
                raise ValueError(f"CompressoLlamaConfig needs `{name}` as a list of {n} per-layer counts")
            if isinstance(value, int):  # a uniform count is a valid special case
                setattr(self, name, [value] * n)
            elif len(value) != n:
                raise ValueError(f"`{name}` has {len(value)} entries for {n} layers")
        for layer, (q, kv) in enumerate(zip(self.num_attention_heads, self.num_key_value_heads)):
            if (q == 0) != (kv == 0) or (kv and q % kv):
                raise ValueError(f"layer {layer}: {q} query heads do not form whole groups of {kv} KV heads")
        if self.o_bias and not self.qkv_bias:
            raise ValueError("a bias on o_proj without q/k/v biases is not a LLaMA-family layout")
        if self.qk_norm and self.qkv_bias != self.o_bias:
            raise ValueError("Qwen3 attention has biases on all four projections or on none")
        super().__post_init__(**kwargs)

    def layer_config(self, layer_idx: int) -> _LayerConfig:
        """The view of this config that the stock modules of one layer are built from."""
        return _LayerConfig(
            self,
            num_attention_heads=self.num_attention_heads[layer_idx],
            num_key_value_heads=self.num_key_value_heads[layer_idx],
            intermediate_size=self.intermediate_size[layer_idx],
            attention_bias=self.qkv_bias,
        )


class _LayerConfig:
    """Per-layer counts over a live view of the model's config.

    Stock modules keep a reference to the config they were built from and read e.g. `_attn_implementation` at
    every forward. A copied config would freeze those values; this view reads everything it does not override
    from the model's config, so `model.set_attn_implementation(...)` still reaches every layer.
    """

    def __init__(self, config: CompressoLlamaConfig, **overrides: Any) -> None:
        self.__dict__["_config"] = config
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        if name == "_config":  # reached only while copy/pickle rebuilds the object
            raise AttributeError(name)
        return getattr(self._config, name)


def _attention_class(config: CompressoLlamaConfig) -> type[nn.Module]:
    """Pick the stock attention that holds exactly the source's parameters.

    Qwen2Attention: biases on q/k/v only. LlamaAttention: `attention_bias` on all four projections (or none).
    MistralAttention: no biases, and it honours `sliding_window` (Mistral sources).
    Qwen3Attention: per-head q_norm / k_norm, `attention_bias` on all four projections (or none).
    """
    if config.qk_norm:
        return Qwen3Attention
    if config.qkv_bias and not config.o_bias:
        return Qwen2Attention
    if config.qkv_bias:
        return LlamaAttention
    return MistralAttention


class CompressoDecoderLayer(GradientCheckpointingLayer):
    """A pre-norm decoder layer whose attention and FFN blocks are each optional.

    A pruned-away block is absent together with its norm: its residual branch added nothing in the masked
    model. `cache_idx` is the layer's slot in the KV cache: slots count attention blocks only, so slot 0
    always belongs to a layer that stores keys (the cache reports its sequence length from slot 0).
    """

    def __init__(self, config: CompressoLlamaConfig, layer_idx: int, cache_idx: int | None) -> None:
        super().__init__()
        view = config.layer_config(layer_idx)
        self.layer_idx = layer_idx
        self.input_layernorm = self.self_attn = self.post_attention_layernorm = self.mlp = None
        if view.num_attention_heads:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = _attention_class(config)(view, cache_idx)
        if view.intermediate_size:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = LlamaMLP(view)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self.self_attn is not None:
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attn_out
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class CompressoLlamaPreTrainedModel(PreTrainedModel):
    config_class = CompressoLlamaConfig
    config: CompressoLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["CompressoDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class CompressoLlamaModel(CompressoLlamaPreTrainedModel):
    def __init__(self, config: CompressoLlamaConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        layers, slot = [], 0
        for i, heads in enumerate(config.num_attention_heads):
            layers.append(CompressoDecoderLayer(config, i, slot if heads else None))
            slot += bool(heads)
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            ).unsqueeze(0)

        make_mask = (
            create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        )
        causal_mask = make_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden[-1] = hidden_states
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


class CompressoLlamaForCausalLM(CompressoLlamaPreTrainedModel, GenerationMixin):
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CompressoLlamaConfig) -> None:
        super().__init__(config)
        self.model = CompressoLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if cache is None:  # callers written for older transformers name it past_key_values
            cache = kwargs.pop("past_key_values", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


def register() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` resolve model_type "compresso_llama" to these classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(CompressoLlamaConfig.model_type, CompressoLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(CompressoLlamaConfig, CompressoLlamaForCausalLM, exist_ok=True)


__all__ = ["CompressoLlamaConfig", "CompressoLlamaForCausalLM", "CompressoLlamaModel", "register"]

# Registered when imported as part of compresso_ops. The same file, copied into a native export folder and
# loaded by transformers as remote code (trust_remote_code=True), registers nothing: auto_map serves there.
if __name__.startswith("compresso_ops."):
    register()

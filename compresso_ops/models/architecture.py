"""The shape of a LLaMA-family model, as plain numbers.

Planning, the expected-size formula and the exporters all work from an `ArchSpec`, never from loaded
weights, so a plan needs no download and no GPU. A spec comes from a local `config.json`, a loaded
Hugging Face config, or the built-in table of well-known models below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compresso_ops.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Projection names of the LLaMA layout; LoRA target modules are validated against these.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


@dataclass(frozen=True)
class ArchSpec:
    """Dimensions of a decoder-only LLaMA-family model (docs/method.md notation in brackets)."""

    model_type: str
    hidden_size: int  # d
    num_layers: int  # L
    num_heads: int  # H (query heads)
    num_kv_heads: int  # G (KV heads; equals H without GQA)
    head_dim: int  # h
    intermediate_size: int  # f
    vocab_size: int  # V
    tie_embeddings: bool
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2: biases on q, k and v
    o_bias: bool = False  # LLaMA's attention_bias=True also puts a bias on o_proj
    mlp_bias: bool = False

    @property
    def group_size(self) -> int:
        """Query heads per KV group (H/G)."""
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, config: Any) -> ArchSpec:
        """Build a spec from a transformers config object or a `config.json` dict."""
        c = config if isinstance(config, dict) else config.to_dict()
        model_type = c.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"model type '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            d = int(c["hidden_size"])
            heads = int(c["num_attention_heads"])
            kv = c.get("num_key_value_heads") or heads
            head_dim = c.get("head_dim") or d // heads
            attention_bias = bool(c.get("attention_bias", False))
            return cls(
                model_type=model_type,
                hidden_size=d,
                num_layers=int(c["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(kv),
                head_dim=int(head_dim),
                intermediate_size=int(c["intermediate_size"]),
                vocab_size=int(c["vocab_size"]),
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                qkv_bias=model_type == "qwen2" or attention_bias,
                o_bias=attention_bias and model_type != "qwen2",
                mlp_bias=bool(c.get("mlp_bias", False)),
            )
        except KeyError as exc:
            raise UserError(f"model config lacks the field {exc.args[0]!r}") from None

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ArchSpec:
        cfg = Path(path) / "config.json"
        if not cfg.is_file():
            raise UserError(f"{path}: no config.json; give a local model folder or set model.architecture")
        try:
            return cls.from_hf_config(json.loads(cfg.read_text()))
        except json.JSONDecodeError as exc:
            raise UserError(f"{cfg}:{exc.lineno}: not valid JSON: {exc.msg}") from None


def _llama(d: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, max_pos: int, eps: float = 1e-6,
           model_type: str = "llama") -> ArchSpec:
    return ArchSpec(model_type=model_type, hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                    head_dim=d // heads, intermediate_size=ffn, vocab_size=vocab, tie_embeddings=False,
                    max_position_embeddings=max_pos, rms_norm_eps=eps)


# Published configs of well-known models, so `plan` works with no weights and no network.
PRESETS: dict[str, ArchSpec] = {
    "llama-7b": _llama(4096, 32, 32, 32, 11008, 32000, 2048),
    "llama-13b": _llama(5120, 40, 40, 40, 13824, 32000, 2048),
    "llama-2-7b": _llama(4096, 32, 32, 32, 11008, 32000, 4096, 1e-5),
    "llama-2-13b": _llama(5120, 40, 40, 40, 13824, 32000, 4096, 1e-5),
    "llama-2-70b": _llama(8192, 80, 64, 8, 28672, 32000, 4096, 1e-5),
    "llama-3-8b": _llama(4096, 32, 32, 8, 14336, 128256, 8192, 1e-5),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32000, 32768, 1e-5, model_type="mistral"),
}

"""The shape of a LLaMA-family model (LLaMA 1-3, Mistral, Qwen2/2.5, Qwen3), as plain numbers.

Planning, the expected-size formula and the exporters all work from an `ArchSpec`, never from loaded
weights, so a plan needs no download and no GPU. A spec comes from a local `config.json`, a loaded
Hugging Face config, or the built-in table of well-known models below.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compresso_ops.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Bounds on a config's sizes: far above any LLaMA-family model (Llama-3.1-405B: hidden 16384, FFN 53248, 126
# layers; vocabularies up to 256k), low enough that a damaged or hostile config.json is refused instead of
# sizing arithmetic and lists by it.
_SIZE_LIMITS = {"hidden_size": 1 << 20, "num_hidden_layers": 1 << 16, "num_attention_heads": 1 << 16,
                "num_key_value_heads": 1 << 16, "head_dim": 1 << 16, "intermediate_size": 1 << 20,
                "vocab_size": 1 << 24, "max_position_embeddings": 1 << 31}


def _check_sizes(c: dict[str, Any]) -> None:
    """Every size a config gives is a whole number from 1 to its bound (`_SIZE_LIMITS`); absent ones are
    derived, defaulted, or reported missing by the caller."""
    for name, limit in _SIZE_LIMITS.items():
        value = c.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise UserError(f"{name} is {value!r}; a usable config gives a whole number from 1 to {limit:,} "
                            "(the config.json is damaged or not a LLaMA-family model's)")

# head_dim when a config.json does not state it: transformers' Qwen3Config defaults to 128, the others to d/H.
_DEFAULT_HEAD_DIM = {"qwen3": 128}

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
    qk_norm: bool = False  # Qwen3: an RMSNorm over head_dim on every query and key head (q_norm, k_norm)

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
            _check_sizes(c)
            d = int(c["hidden_size"])
            heads = int(c["num_attention_heads"])
            kv = c.get("num_key_value_heads") or heads
            head_dim = c.get("head_dim") or _DEFAULT_HEAD_DIM.get(model_type, d // heads)
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
                qk_norm=model_type == "qwen3",
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
        except UserError as exc:
            raise UserError(f"{cfg}: {exc}") from None


def _llama1(d: int, layers: int, heads: int, ffn: int, max_pos: int, eps: float,
            kv_heads: int | None = None) -> dict[str, Any]:
    """The config.json fields of a LLaMA-1/2 checkpoint (32000-token vocabulary, untied; MHA unless
    `kv_heads` is given, as Llama-2-70B's GQA is)."""
    return {"model_type": "llama", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads or heads, "intermediate_size": ffn, "vocab_size": 32000,
            "max_position_embeddings": max_pos, "rms_norm_eps": eps, "rope_theta": 10000.0,
            "tie_word_embeddings": False}


def _llama3(d: int, layers: int, heads: int, ffn: int, tied: bool, rope_factor: float | None,
            max_pos: int) -> dict[str, Any]:
    """The config.json fields of a Llama-3.x checkpoint (8 KV heads, 128256-token vocabulary, theta 5e5)."""
    rope_scaling = None if rope_factor is None else {
        "rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    return {"model_type": "llama", "hidden_size": d, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 8, "head_dim": d // heads, "intermediate_size": ffn, "vocab_size": 128256,
            "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": rope_scaling, "tie_word_embeddings": tied}


# The architecture fields of published config.json files (the models' Hugging Face repositories), so `plan`
# works with no weights and no network. tests/test_plan.py instantiates transformers' own class from each on
# the meta device and checks `sizes.count_params` against it.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-7b": _llama1(4096, 32, 32, 11008, 2048, 1e-6),
    "llama-13b": _llama1(5120, 40, 40, 13824, 2048, 1e-6),
    "llama-2-7b": _llama1(4096, 32, 32, 11008, 4096, 1e-5),
    "llama-2-13b": _llama1(5120, 40, 40, 13824, 4096, 1e-5),
    "llama-2-70b": _llama1(8192, 80, 64, 28672, 4096, 1e-5, kv_heads=8),
    "llama-3-8b": _llama3(4096, 32, 32, 14336, False, None, 8192),
    "llama-3.1-8b": _llama3(4096, 32, 32, 14336, False, 8.0, 131072),
    "llama-3.2-1b": _llama3(2048, 16, 32, 8192, True, 32.0, 131072),
    "llama-3.2-3b": _llama3(3072, 28, 24, 8192, True, 32.0, 131072),
    "mistral-7b": {  # Mistral-7B-v0.1
        "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
        "tie_word_embeddings": False},
    "mistral-7b-v0.3": {
        "model_type": "mistral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 32768,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False},
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
        "tie_word_embeddings": False},
    "qwen3-8b": {
        "model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 36,
        "tie_word_embeddings": False},
}

PRESETS: dict[str, ArchSpec] = {name: ArchSpec.from_hf_config(c) for name, c in PRESET_CONFIGS.items()}


def unknown_preset(name: str) -> str:
    """Why `name` is not a preset, with a did-you-mean only for what looks like a typo of one: the same sizes
    and versions (digits), so llama-3.1-70b is not offered llama-3.1-8b."""
    numbers = re.findall(r"\d+", name)
    close = [c for c in difflib.get_close_matches(name, list(PRESETS), n=3, cutoff=0.75)
             if re.findall(r"\d+", c) == numbers]
    if close:
        return f"unknown preset '{name}'; did you mean '{close[0]}'?"
    return (f"there is no preset '{name}'; the presets are {', '.join(PRESETS)} (for another model, point "
            "model.path at a folder with its config.json)")

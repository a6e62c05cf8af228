"""Tiny models and a byte-level tokenizer built in code, so tests need no download."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
STORIES260K = SHARED / "assets" / "models" / "stories260K"
TINYSTORIES = SHARED / "assets" / "data" / "tinystories"
EVAL_DATA = SHARED / "assets" / "data" / "eval"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer: 256 bytes plus <s>, </s>, <pad>."""
    byte_to_char = _bytes_to_unicode()  # the printable alphabet ByteLevel maps raw bytes to
    vocab = {byte_to_char[i]: i for i in range(256)}
    vocab.update({"<s>": 256, "</s>": 257, "<pad>": 258})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                                                 pre_tokenizers.Split(pattern="", behavior="isolated")])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


# Llama-3.x RoPE scaling, scaled down to the tiny context (Llama-3.1: factor 8 over 8192 positions).
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(model_type: str = "llama", *, gqa: bool = True, tied: bool = False, hidden: int = 32,
                layers: int = 2, heads: int = 4, ffn: int = 48, vocab: int = 259, llama3_rope: bool = False,
                head_dim: int | None = None, attention_bias: bool = False):
    """A tiny config of `model_type`. Qwen3 gets head_dim 12 (not hidden/heads = 8) unless told otherwise, as
    the real Qwen3 models do (e.g. Qwen3-0.6B: 1024 / 16 heads, head_dim 128)."""
    kv = heads // 2 if gqa else heads
    common = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": 256,
              "tie_word_embeddings": tied, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
              "rms_norm_eps": 1e-6}
    if head_dim is not None:
        common["head_dim"] = head_dim
    if model_type == "llama":
        rope = {"rope_parameters": dict(LLAMA3_ROPE)} if llama3_rope else {}
        return LlamaConfig(**common, **rope, attention_bias=attention_bias)
    if model_type == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if model_type == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if model_type == "qwen3":
        common.setdefault("head_dim", 12)
        return Qwen3Config(use_sliding_window=False, attention_bias=attention_bias, **common)
    raise ValueError(model_type)


def tiny_model(model_type: str = "llama", seed: int = 0, **kw):
    """A random tiny model in fp32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32)
    with torch.no_grad():  # non-trivial biases and q/k norm weights, so slicing them is tested
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.1)
            for norm in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.normal_(1.0, 0.2)
    return model.eval()


def save_tiny(folder: Path, model_type: str = "llama", **kw) -> Path:
    """Write a tiny model and the byte tokenizer as a Hugging Face folder."""
    tiny_model(model_type, **kw).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder

"""Where the structures of a LLaMA-family model live, by attribute path.

LLaMA, Mistral, Qwen2 and Qwen3 share one module layout (`model.layers[i].self_attn.{q,k,v,o}_proj`,
`model.layers[i].mlp.{gate,up,down}_proj`, `model.embed_tokens`, `model.norm`, `lm_head`). The adapter
names those paths once and looks modules up when asked rather than caching them: peft replaces a
targeted `nn.Linear` by a LoRA wrapper at the same path, and gates must act on that outermost module so
the LoRA delta is gated too.
"""

from __future__ import annotations

from torch import nn

from compresso_ops.errors import UserError
from compresso_ops.models.architecture import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, ArchSpec


def unwrap(model: nn.Module) -> nn.Module:
    """The causal-LM module inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def module_names(model: nn.Module) -> set[str]:
    """Last path components of every submodule, the names peft's `target_modules` match against. Works on
    any model, the native export (whose config has per-layer counts) included."""
    return {name.rsplit(".", 1)[-1] for name, _ in unwrap(model).named_modules() if name}


class ModelAdapter:
    """Attribute paths of a LLaMA-layout causal LM, resolved against the (possibly peft-wrapped) model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = unwrap(model)
        self.arch = ArchSpec.from_hf_config(self.base.config)
        layers = self.base.get_submodule("model.layers")
        if len(layers) != self.arch.num_layers:
            raise UserError(f"model has {len(layers)} decoder layers but its config says {self.arch.num_layers}")

    # Paths are relative to `self.base`.
    @staticmethod
    def layer_path(layer: int) -> str:
        return f"model.layers.{layer}"

    def projection_path(self, layer: int, name: str) -> str:
        if name in ATTENTION_PROJECTIONS:
            return f"{self.layer_path(layer)}.self_attn.{name}"
        if name in MLP_PROJECTIONS:
            return f"{self.layer_path(layer)}.mlp.{name}"
        raise ValueError(f"unknown projection {name!r}")

    def module(self, path: str) -> nn.Module:
        """The outermost module at `path` now (a peft LoRA wrapper if one was installed there)."""
        return self.base.get_submodule(path)

    def projection(self, layer: int, name: str) -> nn.Module:
        return self.module(self.projection_path(layer, name))

    def layers(self) -> nn.ModuleList:
        return self.module("model.layers")

    def embed_tokens(self) -> nn.Module:
        return self.module("model.embed_tokens")

    def lm_head(self) -> nn.Module:
        return self.module("lm_head")

    def module_names(self) -> set[str]:
        return module_names(self.base)

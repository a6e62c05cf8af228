"""The model as training needs it: the source loaded in the planned precision, frozen, with gradient
checkpointing, then either seeded LoRA adapters (peft) or, with `train: full`, every weight trainable; under
FSDP the frozen base sharded."""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch
from torch import nn

from compresso_ops.errors import UserError
from compresso_ops.infra.units import spoken_list
from compresso_ops.models.adapter import module_names, unwrap
from compresso_ops.models.architecture import PROJECTIONS
from compresso_ops.models.resolve import locate_model, readable_model
from compresso_ops.recipe.schema import LoraSection, Recipe, TrainingSection
from compresso_ops.training.distributed import SINGLE, DistContext
from compresso_ops.training.precision import Precision, choose_precision
from compresso_ops.training.sharded_load import (
    SOURCE_ATTR,
    can_load_sharded,
    fill_shards,
    placeholder_model,
    to_meta_,
)
from compresso_ops.training.sharding import shard_model


def load_source(recipe: Recipe, dist: DistContext = SINGLE, *, full: bool = False) -> tuple[nn.Module, Any, Precision]:
    """The source model (frozen, training mode, no KV cache), its tokenizer, and the precision to use
    (`full`: fp32 master weights, see `choose_precision`). Under FSDP a safetensors source is a placeholder
    model whose shards `prepare_for_training` reads (`training/sharded_load.py`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    m = recipe.model
    kw = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    precision = choose_precision(recipe, dist, full=full)
    folder = locate_model(m).folder
    with readable_model(m.path):
        tokenizer = AutoTokenizer.from_pretrained(m.path, **kw)
        if precision.shard_base and can_load_sharded(folder) and not m.trust_remote_code:
            # Under FSDP no process reads the whole model: placeholders now, own shards after sharding.
            model = placeholder_model(folder, AutoConfig.from_pretrained(m.path, **kw), precision.base_dtype)
            freeze_for_training(model, precision)
            return model, tokenizer, precision
        turns = _loading_turns(recipe, precision)
        for turn in range(turns):
            # A replica per GPU: the processes of a node load one after another, each moving its copy to
            # its GPU before the next reads, so the node's RAM holds one copy at a time.
            if turn == dist.local_rank % turns:
                model = AutoModelForCausalLM.from_pretrained(m.path, dtype=precision.base_dtype, **kw)
                freeze_for_training(model, precision)
            if turns > 1:
                dist.barrier()
    refuse_nonfinite_weights(model, m.path)
    return model, tokenizer, precision


def refuse_nonfinite_weights(model: nn.Module, path: str, dist: DistContext = SINGLE) -> None:
    """A source with NaN or inf in its weights (a damaged download or conversion) is a user error at load:
    otherwise the first step fails with advice about learning rates, or a one-shot method slices NaNs and
    the export check blames the slice. A whole model is the same in every process, so all refuse alike;
    FSDP shards differ, so with `dist` the processes decide together and none is left waiting in a
    collective while another stops."""
    bad = [name for name, p in model.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    if dist.any(bool(bad)):
        found = f"{len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})" if bad else (
            "weights hold NaN or inf (in rows another process read)")
        raise UserError(f"model.path: {path}: {found}; the checkpoint is damaged: download or convert it again")


def _loading_turns(recipe: Recipe, precision: Precision) -> int:
    """How many turns the processes of a node take to load a replica: one each when the replica then leaves
    for a GPU, one for all on CPU (the replicas stay in RAM, so waiting saves nothing)."""
    on_gpu = precision.device.type == "cuda" and not precision.shard_base
    return recipe.hardware.gpus_per_node if on_gpu and precision.dist.active else 1


def freeze_for_training(model: nn.Module, precision: Precision) -> None:
    """Frozen, training mode, no KV cache; on the device unless FSDP will shard it there."""
    if not precision.shard_base:
        model.to(precision.device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()


def prepare_for_training(model: nn.Module, section: TrainingSection, field: str,
                         precision: Precision) -> nn.Module:
    """Checkpointing as the section asks, then seeded LoRA adapters (the same init on every rank and every
    run) or, for `train: full`, every weight trainable; under FSDP the frozen base sharded across the ranks."""
    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if section.train == "full":
        model.requires_grad_(True)
    else:
        seed_all(section.seed)
        model = add_lora(model, section.lora, field)
    shard_frozen(model, precision)
    return model


def shard_frozen(model: nn.Module, precision: Precision) -> None:
    """Under FSDP, shard `model` across the ranks; a placeholder model (load_source) allocates nothing until
    each rank reads its own shards. Without FSDP, nothing to do."""
    if precision.shard_base:
        source = getattr(unwrap(model), SOURCE_ATTR, None)  # a placeholder's folder (load_source checked others)
        to_meta_(model)
        shard_model(model, precision)
        fill_shards(model, precision.device, precision.dist.rank, precision.dist.world_size)
        if source is not None:
            refuse_nonfinite_weights(unwrap(model), source, precision.dist)


def add_lora(model: nn.Module, lora: LoraSection, field: str) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on `lora.target_modules` (checked to exist; `field` names the
    recipe field in the error). The base stays frozen; peft keeps adapters in fp32 over a half-precision base."""
    from peft import LoraConfig, get_peft_model

    names = module_names(model)
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        # A projection of the architecture that is absent was pruned away in every layer (all heads, all
        # channels or every block): the model keeps only the others.
        pruned = " (pruning removed it from every layer)" if set(missing) <= set(PROJECTIONS) else ""
        kept = [p for p in PROJECTIONS if p in names] or list(PROJECTIONS)
        raise UserError(f"{field}: {', '.join(missing)} matches no module of the model{pruned}; use "
                        f"{spoken_list(kept, 'or')}")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: gate values captured by hooks keep receiving gradients."""
    base = unwrap(model)
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def seed_all(seed: int) -> None:
    """Seed python and torch (all devices) so adapter init repeats from run to run and rank to rank."""
    random.seed(seed)
    torch.manual_seed(seed)

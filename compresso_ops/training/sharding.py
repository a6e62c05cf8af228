"""FSDP: shard the frozen base and replicate the small trainables (LoRA), or with `train: full` shard
every weight with its gradients and optimizer state.

When the plan says a replica of the model does not fit one GPU (`hardware.strategy: fsdp`, or `auto`
choosing it), every decoder layer and then the rest of the model are wrapped with torch's FSDP2
`fully_shard`: each rank keeps 1/world of the frozen weights and all-gathers a layer only while it computes
(forward, and again in backward; gradient checkpointing works as usual).

The trainables are handed to FSDP as `ignored_params`, so they stay ordinary replicated fp32 tensors: LoRA
for a 7B model is a few MB, and sharding it would save nothing while changing how gradients meet. Their
gradients are summed by `Precision.step` as in a replicated run, checkpoints hold the same state, and a
sharded run follows the same trajectory (tested with 2 processes against 1). The gates and multipliers live
outside the model and are untouched.

With `train: full` nothing is ignored: each rank holds 1/world of the fp32 master weights, their gradients
and AdamW state; a layer is gathered in the compute dtype (FSDP's mixed-precision policy) while it computes,
and FSDP reduce-scatters their gradients as the mean over ranks, which `Precision.step` turns back into the
sum that replicated trainables get. (A divide factor of 1 would be FSDP's own way, but it needs a PREMUL_SUM
reduction, which gloo lacks.) Checkpoints gather whole tensors onto rank 0
(`checkpoints.trained_state`).

Every forward and backward is now a collective (the all-gathers), so every rank must run the same number
of micro-batches per step: `require_even_split` says so in one line before training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from compresso_ops.errors import UserError
from compresso_ops.infra.units import human_bytes
from compresso_ops.models.adapter import unwrap

if TYPE_CHECKING:  # training imports this module
    from compresso_ops.training.precision import Precision


def shard_model(model: nn.Module, precision: Precision) -> None:
    """Shard `model` (on CPU; peft-wrapped under LoRA) across the ranks, onto the precision's device.

    The model is loaded on CPU so that no GPU ever holds it whole: FSDP moves each layer to the device as it
    shards it. Under LoRA the trainables are ignored by FSDP and moved to the device unsharded; when every
    weight trains, all of them are sharded.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device, dist = precision.device, precision.dist
    mesh = init_device_mesh(device.type, (dist.world_size,))
    params = list(model.parameters())
    full = all(p.requires_grad for p in params)
    options: dict[str, Any] = {"mesh": mesh}
    if full and precision.autocast_dtype is not None:  # gather in the compute dtype, reduce in fp32
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=precision.autocast_dtype, reduce_dtype=torch.float32)
    trainables = set() if full else {p for p in params if p.requires_grad}
    if trainables:
        options["ignored_params"] = trainables
    causal_lm = unwrap(model)
    # the decoder layers (stock LLaMA-family and the native export alike), then the root: embeddings, final
    # norm, LM head
    groups = [*causal_lm.get_submodule("model.layers"), causal_lm]
    for module in groups:
        fully_shard(module, **options)
    with torch.no_grad():
        for p in trainables:
            p.data = p.data.to(device)


def weights_held(model: nn.Module, precision: Precision) -> dict[str, Any]:
    """How the frozen weights were held, for the stage's result: sharded or not, and the bytes rank 0 held
    (its shards under FSDP, the whole base otherwise; other ranks differ by at most a row per tensor).
    Every rank must call it (rank 0's number is broadcast)."""
    frozen = trained = 0
    for p in model.parameters():
        shard = p.to_local() if hasattr(p, "to_local") else p
        if p.requires_grad:
            trained += shard.numel()
        else:
            frozen += shard.numel() * shard.element_size()
    return {"sharded": precision.shard_base, "processes": precision.dist.world_size,
            "frozen_bytes_per_process": precision.dist.broadcast_object(frozen),
            "trained_params": precision.dist.broadcast_object(trained)}


def describe_weights(weights: dict[str, Any]) -> str:
    """One phrase for the stage note, e.g. 'frozen base sharded over 4 processes, 3.2 GiB each'."""
    size = human_bytes(weights["frozen_bytes_per_process"])
    if not weights["frozen_bytes_per_process"]:
        return f"every weight trained ({weights['trained_params']:,} parameters)"
    if weights["sharded"]:
        return f"frozen base sharded over {weights['processes']} processes, {size} each"
    return f"frozen base replicated, {size} per process"


def require_even_split(micros: int, precision: Precision, section: str) -> None:
    """Under FSDP each rank must run as many forward passes per step as the others (a replicated run may
    split a step's micro-batches unevenly)."""
    dist = precision.dist
    if precision.shard_base and micros % dist.world_size:
        raise UserError(f"hardware: with strategy fsdp every process must run the same number of micro-batches, "
                        f"but a {section} step has {micros} for {dist.world_size} processes; launch "
                        "gpus_per_node x nodes processes or make gradient_accumulation a multiple of the process "
                        "count")

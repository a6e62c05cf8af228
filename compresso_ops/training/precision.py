"""How tensors are held and where the math runs.

CPU runs are fp32. On GPU the frozen base is held in the planner's compute dtype (bf16 where the GPU has it,
else fp16), trainables in fp32 under autocast, and fp16 adds a GradScaler. `Precision.backward` /
`Precision.step` are the one place that runs backward passes and optimizer steps; `step` sums gradients
across data-parallel ranks before unscaling, clipping and stepping."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.plan import compute_dtype, training_strategy
from compresso_ops.training.distributed import SINGLE, DistContext

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Precision:
    """How tensors are held and where the math runs."""

    device: torch.device
    base_dtype: torch.dtype  # how the model's weights are held
    scaler: torch.amp.GradScaler | None = None
    dist: DistContext = field(default_factory=lambda: SINGLE)
    shard_base: bool = False  # FSDP: each rank holds 1/world of the frozen weights (sharding.py)
    compute_dtype: torch.dtype | None = None  # autocast dtype when it differs from base_dtype (fp32 masters)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return self.base_dtype if self.base_dtype in (torch.float16, torch.bfloat16) else None

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizers: list[torch.optim.Optimizer], clip: tuple[list[nn.Parameter], float] | None = None) -> None:
        """Sum gradients across ranks, unscale, clip `clip[0]` to norm `clip[1]`, step every optimizer, zero
        the gradients. Every rank then holds the same gradients, so the scaler finds the same inf/NaN and
        every rank takes the same step."""
        params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
        # FSDP reduce-scattered the gradients of the weights it shards (DTensors) as a mean over ranks: make
        # it the sum every other trainable gets here.
        self.dist.all_reduce_grads_([p for p in params if not isinstance(p, DTensor)])
        for p in params:
            if isinstance(p, DTensor) and p.grad is not None:
                p.grad.mul_(self.dist.world_size)
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
        for opt in optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


def choose_precision(recipe: Recipe, dist: DistContext = SINGLE, *, full: bool = False) -> Precision:
    """CPU runs are fp32. On GPU the math runs in the planner's compute dtype (model.dtype; 'auto': bf16
    where the GPU has it, fp16 elsewhere), falling back to fp16 on a GPU without native bf16 (V100); fp16
    adds a GradScaler. The frozen base of LoRA training is held in that dtype; `full` (every weight trains)
    holds fp32 master weights and autocasts. The device is this rank's GPU (set by `init_distributed`). The
    base is sharded when several processes run and the plan chose FSDP."""
    shard = dist.active and training_strategy(recipe) == "fsdp"
    if recipe.hardware.gpu == "cpu" or not torch.cuda.is_available():
        return Precision(torch.device("cpu"), torch.float32, dist=dist, shard_base=shard)
    dtype = _DTYPES[compute_dtype(recipe)]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        dtype = torch.float16
    scaler = None
    if dtype == torch.float16:  # sharded trainables: the scaler must agree on inf/NaN across the shards
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        scaler = ShardedGradScaler("cuda") if full and shard else torch.amp.GradScaler("cuda")
    device = torch.device("cuda", torch.cuda.current_device())
    if full:
        return Precision(device, torch.float32, scaler, dist, shard, compute_dtype=dtype)
    return Precision(device, dtype, scaler, dist, shard)

"""Data-parallel building blocks on torch.distributed, for processes started by torchrun.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_distributed` turns them
into one process group (joined once per process, so stages and the executor can all call it) and a
`DistContext`. Without WORLD_SIZE > 1 every helper here is a no-op, so single-process code paths are the
distributed ones with a world of 1.

The group is created as "cpu:gloo,cuda:nccl" where CUDA exists: gradients on the GPU travel over NCCL,
while the small control messages here (scalars, barriers, pickled objects) stay on CPU tensors over gloo,
so they need no GPU sync and behave the same on CPU-only test machines.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Other ranks wait at a barrier while rank 0 writes a (possibly multi-GB) export; the default NCCL
# timeout of 10 minutes would kill a healthy job on slow storage.
DEFAULT_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and reports progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` across ranks in place, one collective per (device, dtype) via a flat buffer."""
        if not self.active or not tensors:
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        for t in tensors:
            buckets[(t.device, t.dtype)].append(t)
        for group in buckets.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` across ranks. A parameter keeps `grad=None` only when no rank
        produced one (as a single process would have it), so optimizers skip exactly the same parameters."""
        if not self.active or not params:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self.all_reduce_sum_(grads + [present])
        for p, g, seen in zip(params, grads, present.tolist(), strict=True):
            p.grad = g if seen > 0 else None

    def all_reduce_scalar(self, value: float) -> float:
        """The sum of `value` over ranks."""
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any rank (a stop request seen by one rank only)."""
        return self.all_reduce_scalar(float(flag)) > 0 if self.active else flag

    def barrier(self) -> None:
        """Wait for every rank (a CPU all-reduce, so it never needs a GPU)."""
        if self.active:
            dist.all_reduce(torch.zeros(1), op=dist.ReduceOp.SUM)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (pickled; for checkpoints and result dicts, not per-step data)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled over gloo; for the scores of a share of
        evaluation requests, not per-step data)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


SINGLE = DistContext()


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """This process's context; joins the process group the first time it is called under torchrun.

    Idempotent: later calls (the executor, then each stage) return the same context. On CUDA machines the
    device is set from LOCAL_RANK, so `torch.device("cuda")` is this rank's GPU from here on.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local_rank)


def shutdown_distributed() -> None:
    """Leave the process group (call once, at the very end, on every rank)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


"""Checkpoints of a training stage: one atomically replaced folder holding everything a resumed run needs
to continue the same trajectory (trainable tensors, optimizer / scheduler / scaler states, the step).

Checkpoints always hold whole tensors, whatever the strategy. When FSDP shards the trained weights
(`train: full` under FSDP), `trained_state` gathers them and their optimizer state onto rank 0 and
`load_trained_state` broadcasts rank 0's back into the shards: both are collectives every rank calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresso_ops.errors import StageError
from compresso_ops.infra import atomic

CHECKPOINT_DIR = "checkpoints"


CHECKPOINT_NAME = "last"


STATE_FILE = "state.pt"


# The checkpoint entries that hold the trained weights and their optimizer state (gathered under FSDP).
SHARDED_ENTRIES = ("weights", "weights_optimizer")


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def sharded_trainables(model: nn.Module) -> bool:
    """True when FSDP shards weights that train (train: full under FSDP)."""
    from torch.distributed.tensor import DTensor

    return any(p.requires_grad and isinstance(p, DTensor) for p in model.parameters())


def _full_options(**kw: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors, whole, on CPU, by parameter name (tied weights once). Sharded: a collective, and
    only rank 0 gets them (the others an empty dict)."""
    if not sharded_trainables(model):
        return trainable_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    return {k: v for k, v in state.items() if k in names}


def trained_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The SHARDED_ENTRIES of a checkpoint: the trained weights and the state of the optimizer over them."""
    if not sharded_trainables(model):
        return {"weights": trainable_state(model), "weights_optimizer": optimizer.state_dict()}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"weights": gather_weights(model),
            "weights_optimizer": get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))}


def load_trained_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """The inverse of `trained_state`; sharded, rank 0's `state` is broadcast into every rank's shards."""
    if not sharded_trainables(model):
        load_trainable_state(model, state["weights"])
        optimizer.load_state_dict(state["weights_optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _full_options(broadcast_from_rank0=True, strict=False)  # tied weights are saved once
    set_model_state_dict(model, state["weights"], options=options)
    set_optimizer_state_dict(model, optimizer, state["weights_optimizer"], options=options)


def shared_checkpoint(model: nn.Module, state: dict[str, Any] | None, dist: Any) -> dict[str, Any]:
    """The checkpoint as every rank needs it. Replicated trainables: rank 0's whole state was broadcast
    already (`run_steps`). Sharded: only rank 0 read it; the other ranks get its small entries here and the
    sharded ones through `load_trained_state`."""
    if not sharded_trainables(model):
        assert state is not None
        return state
    small = dist.broadcast_object(None if state is None else {k: v for k, v in state.items()
                                                              if k not in SHARDED_ENTRIES})
    return {**small, **{k: (state[k] if state is not None else {}) for k in SHARDED_ENTRIES}}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise StageError("checkpoint does not match the model's trainable parameters; delete the stage's "
                         "checkpoints folder to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


class CheckpointStore:
    """`<stage_dir>/checkpoints/last/state.pt`, replaced atomically, so a crash leaves the previous one."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.folder = Path(stage_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME

    def save(self, state: dict[str, Any]) -> None:
        with atomic.atomic_dir(self.folder) as tmp:
            torch.save(state, tmp / STATE_FILE)
            atomic.write_json(tmp / "meta.json", {"step": state.get("step"), "fingerprint": state.get("fingerprint")})

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it belongs to different inputs."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state if state.get("fingerprint") == fingerprint else None

    def saved_step(self) -> int | None:
        meta = self.folder / "meta.json"
        return json.loads(meta.read_text())["step"] if meta.is_file() else None

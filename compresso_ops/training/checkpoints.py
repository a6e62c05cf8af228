"""Checkpoints of a training stage: everything a resumed run needs to continue the same trajectory
(trainable tensors, optimizer / scheduler / scaler states, the step), kept as the last two.

A checkpoint is a folder `state.pt` + `meta.json` (step, fingerprint, the sha256 of state.pt). A new one is
written completely beside the others and only then takes the place of `last`, whose folder becomes
`previous`; so a crash mid-write leaves both earlier checkpoints. A checkpoint whose state file is missing,
truncated or altered (its hash differs) is not loaded: the store falls back to `previous`, and with no
usable checkpoint the stage starts over; either way `notice` says so in one line.

Checkpoints always hold whole tensors, whatever the strategy. When FSDP shards the trained weights
(`train: full` under FSDP), `trained_state` gathers them and their optimizer state onto rank 0 and
`load_trained_state` broadcasts rank 0's back into the shards: both are collectives every rank calls.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresso_ops.errors import StageError
from compresso_ops.infra import atomic
from compresso_ops.infra.integrity import sha256_file

CHECKPOINT_DIR = "checkpoints"


SLOTS = ("last", "previous")  # newest first


STATE_FILE = "state.pt"


META_FILE = "meta.json"
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
    """`<stage_dir>/checkpoints/{last,previous}/`, rotated only once a new checkpoint is complete."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.root = Path(stage_dir) / CHECKPOINT_DIR
        self.folder = self.root / SLOTS[0]
        self.notice: str | None = None  # what `load` had to skip, for the user

    def save(self, state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".new.*.tmp"):  # left by a kill mid-save; `last` or `previous` covers it
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".new.", suffix=".tmp", dir=self.root))
        try:
            with atomic.atomic_path(tmp / STATE_FILE) as path:
                torch.save(state, path)
            atomic.write_json(tmp / META_FILE, {"step": state.get("step"), "fingerprint": state.get("fingerprint"),
                                                "sha256": sha256_file(tmp / STATE_FILE)})
            os.chmod(tmp, 0o777 & ~atomic.umask())
            last, previous = self.root / SLOTS[0], self.root / SLOTS[1]
            if last.exists():
                if previous.exists():
                    shutil.rmtree(previous)
                os.replace(last, previous)
            os.replace(tmp, last)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        """The newest intact checkpoint of these inputs, or None. Sets `notice` when a damaged one was
        skipped (falling back to the previous one, or starting over)."""
        self.notice = None
        damaged: list[str] = []
        for slot in SLOTS:
            folder = self.root / slot
            if not folder.is_dir():
                continue
            meta = atomic.read_json(folder / META_FILE) or {}
            state = _read_state(folder / STATE_FILE, meta.get("sha256"))
            if state is None:
                damaged.append(slot)
                continue
            if state.get("fingerprint") != fingerprint:
                return None  # from other inputs: the stage starts over, as it should
            if damaged:
                self.notice = (f"checkpoint {self.root / damaged[0]} is damaged; resuming from the previous one "
                               f"(step {state.get('step')})")
            return state
        if damaged:
            self.notice = f"no usable checkpoint in {self.root} (damaged); the stage starts over"
        return None

    def saved_step(self) -> int | None:
        """The step of the newest checkpoint on disk (for messages)."""
        meta = atomic.read_json(self.folder / META_FILE)
        return meta.get("step") if meta else None


def _read_state(path: Path, expected_sha256: Any) -> dict[str, Any] | None:
    """A checkpoint's state when the file is there, matches its recorded hash and loads; else None."""
    if not path.is_file() or not isinstance(expected_sha256, str) or sha256_file(path) != expected_sha256:
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (any unreadable file is a damaged checkpoint, whatever torch raises)
        return None
    return state if isinstance(state, dict) else None

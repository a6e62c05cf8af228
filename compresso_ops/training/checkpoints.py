"""Checkpoints of a training stage: one atomically replaced folder holding everything a resumed run needs
to continue the same trajectory (trainable tensors, optimizer / scheduler / scaler states, the step)."""

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


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


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

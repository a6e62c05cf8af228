"""Checkpoints of a training stage: everything a resumed run needs to continue the same trajectory
(trainable tensors, optimizer / scheduler / scaler states, the step), kept as the last two.

A checkpoint is a folder `state.pt` + `meta.json` (step, fingerprint, the sha256 of state.pt). A new one is
written completely beside the others and only then takes the place of `last`, whose folder becomes
`previous`; so a crash mid-write leaves both earlier checkpoints. A checkpoint whose state file is missing,
truncated or altered (its hash differs) is not loaded: the store falls back to `previous`, and with no
usable checkpoint the stage starts over; either way `notice` says so in one line.
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

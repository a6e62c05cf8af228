"""Atomic file writes: every artifact is written to a temporary file in the same folder, flushed to disk,
and renamed over its final name, so an interrupted run never leaves a half-written file behind. Also the
tolerant read of a JSON artifact that may be absent."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path`, on failure remove it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes 0600, and writers that replace the file (safetensors) may too: every artifact
        # gets what a plain open() would give it, 0666 less the umask
        os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    current = os.umask(0)
    os.umask(current)
    return current


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_with(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` (for example `safetensors.torch.save_file`) and publish atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path` as a whole."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        _usual_permissions(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _usual_permissions(folder: Path) -> None:
    """Files written into `folder` by libraries (safetensors writes 0600) get 0666 less the umask, folders
    0777 less the umask: the run folder reads the same whoever wrote each file."""
    mask = umask()
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line and flush it: event logs are append-only and each line is self-contained.
    A log whose last line was torn (a kill mid-write) gets a line break first, so the new record stands
    on its own line and only the torn one is lost."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "ab") as fh:
        if fh.tell() > 0 and _last_byte(p) != b"\n":
            fh.write(b"\n")
        fh.write((json.dumps(record, default=float) + "\n").encode())
        fh.flush()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines log, in order; a torn or garbled line (a kill mid-write, stray
    bytes) is dropped rather than failing every later reader. An absent file reads as empty."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return []
    out = []
    for line in raw.splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None

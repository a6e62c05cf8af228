"""Content hashes of the artifacts later work trusts: masks, gates, adapters, exported weights, checkpoints.

Fingerprints (infra/fingerprint.py) decide whether inputs changed, by file identity; this module decides
whether an output is still the one its stage wrote, by content. A stage's outputs are hashed (sha256,
streamed in 1 MiB blocks, so a multi-GB shard never sits in memory) when the stage finishes and recorded
in state.json; a skip re-hashes them, and a checkpoint carries the hash of its state file in meta.json. A
truncated or bit-flipped file therefore re-runs the stage that wrote it instead of passing as up to date.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read a block at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def hash_outputs(root: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """{path relative to `root`: sha256} of every file matching `patterns` (globs relative to `root`)."""
    files = sorted({f for pattern in patterns for f in root.glob(pattern) if f.is_file()})
    return {f.relative_to(root).as_posix(): sha256_file(f) for f in files}


def damaged(root: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded files (relative to `root`) that are missing or whose content changed since recorded."""
    out = []
    for name, expected in recorded.items():
        path = root / name
        if not path.is_file() or sha256_file(path) != expected:
            out.append(name)
    return out

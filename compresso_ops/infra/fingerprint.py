"""Input fingerprints: the one rule that decides whether a result may be reused.

The contract, shared by every skip and cache decision:
- A fingerprint is `digest(payload)`: sha256 over the canonical JSON (sorted keys) of the inputs.
- Recipe inputs enter by value (the sections a result depends on, after `extends:` and defaults).
- File inputs enter by identity, `path_identity`: size and mtime_ns of a file, or of every file in a
  folder. Hashing content would read multi-GB weights on every `apply`; any rewrite changes the mtime.
- A hub id enters by the cached snapshot it resolves to (its folder name is the commit), or by its name
  when it is not cached.

Who uses it, and what invalidates what:
- executor stage hashes: the stage's recipe fields and files, chained with the upstream stage's hash, so a
  change re-runs its stage and every stage after it (the plan is informational and chains nothing).
- prune / fine-tune checkpoints: the sections that define the training trajectory and the global batch's
  micro-batch count (fine-tune adds the sliced model's manifest); another fingerprint is not resumed.
- the source-evaluation cache: the source model's files, dtype, eval settings and data, the prompt, the
  hardware and the library versions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest(payload: Any, length: int = 16) -> str:
    """Hex sha256 of `payload` as canonical JSON (non-JSON values by their str)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def path_identity(path: str | Path | None, patterns: tuple[str, ...] = ("*",)) -> Any:
    """[size, mtime_ns] of a file; sorted [name, size, mtime_ns] of a folder's files matching `patterns`;
    the string itself for anything else (a hub id); None for no path."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    if p.is_dir():
        files = sorted({f for pattern in patterns for f in p.glob(pattern) if f.is_file()})
        return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return str(path)

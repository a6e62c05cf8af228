"""The user's compresso-ops cache folder, kept across runs: source-model evaluations and lm-eval's task names.

`COMPRESSO_OPS_CACHE` moves it (tests point it at a temporary folder); the default is ~/.cache/compresso-ops.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "COMPRESSO_OPS_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "compresso-ops")

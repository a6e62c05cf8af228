"""events.jsonl of a training stage: one line per optimizer step, cut back to the checkpoint on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compresso_ops.infra import atomic


class EventLog:
    """Append-only events.jsonl; on resume the lines after the checkpoint's step are dropped so the log
    reads as one uninterrupted run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        atomic.append_jsonl(self.path, record)

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in keep))

    def reset(self) -> None:
        if self.path.is_file():
            self.path.unlink()

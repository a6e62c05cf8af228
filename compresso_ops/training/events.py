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
        keep = [record for record in atomic.read_jsonl(self.path) if record.get("step", 0) <= step]
        atomic.write_text(self.path, "".join(json.dumps(record, default=float) + "\n" for record in keep))

    def reset(self) -> None:
        if self.path.is_file():
            self.path.unlink()

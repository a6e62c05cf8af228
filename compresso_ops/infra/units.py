"""How numbers and times are written for people: one byte unit (binary, as `plan` prints GPU memory), one
duration style and one timestamp format for every file and display."""

from __future__ import annotations

from datetime import datetime


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.0f} s"


def timestamp() -> str:
    """Local time, ISO 8601 with milliseconds and the UTC offset: sortable, unambiguous across machines,
    and fine enough to order stages that take well under a second."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")

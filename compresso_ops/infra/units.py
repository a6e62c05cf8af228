"""How numbers, times and lists are written for people: one byte unit (binary, as `plan` prints GPU memory),
one duration style, one timestamp format for every file and display, and lists read as a sentence."""

from __future__ import annotations

import re
from datetime import datetime

_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*$")
_BYTE_POWER = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def parse_bytes(value: object) -> int:
    """A size as people write it: 512GB and 500MB are decimal (as Hugging Face's max_shard_size), 768GiB
    binary, a plain integer is bytes. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512GB, 768GiB or a number of bytes")  # noqa: TRY004
    if isinstance(value, int):
        return value
    match = _BYTES.match(str(value))
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError(f"'{value}' is not a size; write it as 512GB, 768GiB or a number of bytes")
    base = 1024 if match.group(3) else 1000
    return round(float(match.group(1)) * base ** _BYTE_POWER[match.group(2).lower()])


def spoken_list(items: list[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c' (or with `conjunction` 'or')."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


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

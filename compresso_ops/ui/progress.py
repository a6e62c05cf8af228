"""Live progress for `apply`: a rich view on a terminal, timestamped plain lines elsewhere (CI, log files).

Stages report through `on_event(dict)` callbacks with keys such as `step`, `total_steps`, `lm_loss`,
`expected_sparsity`, `target_sparsity`, `lambda1`, `task`; this module decides how to show them.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from compresso_ops.infra.units import timestamp

# What stages call with each event: a dict with keys such as those above.
EventFn = Callable[[dict[str, Any]], None]

# Numbers worth showing while a stage runs, in display order.
KEY_METRICS = ("lm_loss", "loss", "expected_sparsity", "target_sparsity", "lambda1", "lambda2", "perplexity")
PLAIN_EVERY_SECONDS = 10.0


class Reporter(Protocol):
    def start(self, stages: list[str]) -> None: ...
    def stage(self, name: str, status: str, seconds: float | None = None, note: str = "") -> None: ...
    def event(self, event: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _metrics(event: dict[str, Any]) -> str:
    parts = [f"{k} {event[k]:.4g}" for k in KEY_METRICS if isinstance(event.get(k), (int, float))]
    if event.get("task"):
        parts.insert(0, f"task {event['task']}")
    return "  ".join(parts)


def _counter(event: dict[str, Any]) -> tuple[int | None, int | None]:
    """(step, total) when the event counts steps; stages also send named phases such as "load"."""
    step, total = event.get("step"), event.get("total_steps")
    if isinstance(step, int) and not isinstance(step, bool):
        return step, total if isinstance(total, int) else None
    return None, None


class PlainReporter:
    """Timestamped lines; step events at most every PLAIN_EVERY_SECONDS per stage (and the last one)."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self._last: dict[str, float] = {}

    def _print(self, text: str) -> None:
        print(f"{timestamp()} {text}", file=self.stream, flush=True)

    def start(self, stages: list[str]) -> None:
        self._print(f"stages: {' -> '.join(stages)}")

    def stage(self, name: str, status: str, seconds: float | None = None, note: str = "") -> None:
        took = f" in {seconds:.1f}s" if seconds is not None else ""
        self._print(f"[{name}] {status}{took}{' ' + note if note else ''}")

    def event(self, event: dict[str, Any]) -> None:
        stage = event.get("stage", "?")
        step, total = _counter(event)
        now = time.monotonic()
        last_step = step is not None and total is not None and step >= total
        if not last_step and now - self._last.get(stage, 0.0) < PLAIN_EVERY_SECONDS:
            return
        self._last[stage] = now
        where = f"step {step}/{total}" if step is not None else str(event.get("phase", ""))
        self._print(f"[{stage}] {where} {_metrics(event)}".rstrip())

    def message(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass


class RichReporter:
    """The stage list with status and elapsed time, a bar with ETA for the running stage, its key numbers."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.status: dict[str, tuple[str, float | None, str]] = {}
        self.started_at: dict[str, float] = {}
        self.metrics = ""
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
        self.task_id: Any = None
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)

    def _render(self) -> Group:
        table = Table(show_header=True, header_style="bold", box=None)
        table.add_column("stage")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("")
        style = {"done": "green", "skipped": "dim", "running": "yellow", "failed": "red", "pending": "dim"}
        for name, (status, seconds, note) in self.status.items():
            if status == "running" and name in self.started_at:
                seconds = time.monotonic() - self.started_at[name]
            took = f"{seconds:.0f}s" if seconds is not None else ""
            table.add_row(name, f"[{style.get(status, '')}]{status}[/]", took, note)
        return Group(table, self.progress, self.metrics)

    def start(self, stages: list[str]) -> None:
        self.status = {s: ("pending", None, "") for s in stages}
        self.live.start()

    def stage(self, name: str, status: str, seconds: float | None = None, note: str = "") -> None:
        self.status[name] = (status, seconds, note)
        if status == "running":
            self.started_at[name] = time.monotonic()
            if self.task_id is not None:
                self.progress.remove_task(self.task_id)
            self.task_id = self.progress.add_task(name, total=None)
            self.metrics = ""
        self.live.update(self._render())

    def event(self, event: dict[str, Any]) -> None:
        step, total = _counter(event)
        if self.task_id is not None and step is not None:
            self.progress.update(self.task_id, completed=step, total=total)
        self.metrics = _metrics(event)
        self.live.update(self._render())

    def message(self, text: str) -> None:
        self.live.console.print(text)

    def close(self) -> None:
        self.live.update(self._render())
        self.live.stop()


def quiet_libraries() -> None:
    """Silence the libraries' own progress bars and advisory logs: this module is the run's one voice."""
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and datasets' per-request bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


def make_reporter(force_plain: bool = False) -> Reporter:
    if not force_plain and sys.stdout.isatty():
        return RichReporter()
    return PlainReporter()

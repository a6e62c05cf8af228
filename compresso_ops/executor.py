"""The executor behind `compresso-ops apply`: runs plan -> prune -> slice -> finetune -> evaluate -> report
in a run folder, and can be trusted with a multi-day job.

Each stage declares the recipe sections it reads; their content hash (chained through the upstream stages,
plus fingerprints of the model and data files) decides whether a finished stage can be skipped. A stage
that was interrupted keeps its folder and resumes from its own checkpoint; a stage whose inputs changed
starts from an empty folder. `state.json` records status, timings and input hashes, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .errors import UserError
from .progress import Reporter
from .recipe import Recipe
from .recipe_loader import dump_resolved
from .runlock import RunLock

STAGES = ("plan", "prune", "slice", "finetune", "evaluate", "report")
STATE_FILE = "state.json"


@dataclass(frozen=True)
class StageSpec:
    name: str
    reads: tuple[str, ...]  # recipe fields (dotted) whose values are this stage's inputs
    files: tuple[str, ...] = ()  # recipe fields naming files/folders whose content is an input


SPECS: dict[str, StageSpec] = {
    "plan": StageSpec("plan", ("model", "target", "data", "prune", "finetune", "eval", "export", "hardware",
                               "method")),
    # hardware: GPUs per node x nodes set the global batch, the GPU type the precision.
    "prune": StageSpec("prune", ("method", "model", "target", "prompt", "data", "prune", "export.mode",
                                 "hardware.gpu", "hardware.gpus_per_node", "hardware.nodes"),
                       ("model.path", "data.path")),
    "slice": StageSpec("slice", ("export",)),
    "finetune": StageSpec("finetune", ("finetune", "data", "prompt", "model.dtype", "hardware.gpu",
                                       "hardware.gpus_per_node", "hardware.nodes"), ("data.path",)),
    "evaluate": StageSpec("evaluate", ("eval", "prompt"), ("eval.perplexity.path",)),
    "report": StageSpec("report", ()),
}


def _pick(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _fingerprint(path: str | None) -> Any:
    """Size and mtime of a file, or of the files of a folder: cheap, and changes when the content does."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    if p.is_dir():
        return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in p.iterdir() if f.is_file())
    return str(path)  # a hub id: its name (and the recipe's revision) identify it


def stage_hashes(recipe: Recipe) -> dict[str, str]:
    """Input hash per stage, each chained with the previous stage's so a change flows downstream."""
    data = recipe.model_dump(mode="json")
    for task in data.get("eval", {}).get("local_tasks", []):
        task["fingerprint"] = _fingerprint(task.get("data"))
    hashes: dict[str, str] = {}
    upstream = ""
    for name in STAGES:
        spec = SPECS[name]
        payload = {
            "upstream": upstream if name != "plan" else "",
            "reads": {k: _pick(data, k) for k in spec.reads},
            "files": {k: _fingerprint(_pick(data, k)) for k in spec.files},
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
        hashes[name] = digest
        if name != "plan":  # the plan is informational: nothing downstream depends on it
            upstream = digest
    return hashes


class RunState:
    """state.json: per-stage status (pending, running, done, skipped, failed, interrupted), hashes, timings."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self.data: dict[str, Any] = {"stages": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise UserError(f"{self.path}: not valid JSON; it was not written by compresso-ops, "
                                "remove it to start the run again") from None

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        atomic.write_json(self.path, self.data)


StageFn = Callable[[Recipe, Path, Callable[[dict[str, Any]], None]], str | None]


class Executor:
    def __init__(self, recipe: Recipe, reporter: Reporter, *, run_dir: Path | None = None,
                 from_stage: str | None = None, until: str | None = None, force: bool = False,
                 break_stale_lock: bool = False, preflight: bool = True) -> None:
        self.recipe = recipe
        self.reporter = reporter
        self.run_dir = Path(run_dir or recipe.resolved_run_dir())
        self.from_stage = from_stage
        self.until = until
        self.force = force
        self.break_stale_lock = break_stale_lock
        self.preflight = preflight

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def selected(self) -> list[str]:
        last = STAGES.index(self.until) if self.until else len(STAGES) - 1
        return list(STAGES[: last + 1])

    def collective(self, name: str) -> bool:
        """Stages every process of a torchrun job runs together (data-parallel training); the others run
        on rank 0 alone."""
        return (name == "prune" and self.recipe.method == "compresso") or (
            name == "finetune" and self.recipe.finetune.enabled)

    def run(self) -> dict[str, Any]:
        from .distributed import init_distributed, shutdown_distributed

        ctx = init_distributed()
        try:
            if not ctx.is_main:
                self._follow(ctx)
                return {}
            with RunLock(self.run_dir, break_stale=self.break_stale_lock), _sigterm_as_interrupt():
                return self._run_locked(ctx)
        finally:
            shutdown_distributed()

    def _follow(self, ctx: Any) -> None:
        """Ranks other than 0: join the collective stages rank 0 decided to run, in order, then leave.
        Rank 0 alone holds the lock, writes state and files, evaluates and reports."""
        todo: list[str] = ctx.broadcast_object(None)
        for name in todo:
            if self.collective(name):
                ctx.barrier()  # rank 0 has finished the stages before this one
                STAGE_FUNCTIONS[name](self, self.stage_dir(name), lambda event: None)

    def _run_locked(self, ctx: Any) -> dict[str, Any]:
        state = RunState(self.run_dir)
        hashes = stage_hashes(self.recipe)
        state.data["recipe_hash"] = self.recipe.recipe_hash()
        state.data["recipe_file"] = str(self.recipe.source_file) if self.recipe.source_file else None
        atomic.write_text(self.run_dir / "recipe.resolved.yaml", dump_resolved(self.recipe))
        stages = self.selected()
        forced_from = STAGES.index(self.from_stage) if self.from_stage else (0 if self.force else None)
        todo: list[str] = []
        for name in stages:  # a stage that runs makes every stage after it (but the plan) run too
            if self._needs_run(state, name, hashes[name], forced_from) or any(t != "plan" for t in todo):
                todo.append(name)
        self._check_upstream(state, hashes, stages, todo)
        if self.preflight and any(s not in ("plan", "report") for s in todo):
            from .preflight import run_preflight

            run_preflight(self.recipe, self.run_dir, todo)
        ctx.broadcast_object(todo)

        self.reporter.start(stages)
        try:
            for name in stages:
                if name not in todo:
                    self.reporter.stage(name, "skipped", state.stage(name).get("seconds"), "up to date")
                    continue
                if self.collective(name):
                    ctx.barrier()  # the other ranks join this stage now
                self._run_stage(state, name, hashes[name])
        finally:
            self.reporter.close()
        return state.data

    def _needs_run(self, state: RunState, name: str, digest: str, forced_from: int | None) -> bool:
        if forced_from is not None and STAGES.index(name) >= forced_from:
            return True
        entry = state.stage(name)
        return not (entry.get("status") == "done" and entry.get("input_hash") == digest)

    def _check_upstream(self, state: RunState, hashes: dict[str, str], stages: list[str], todo: list[str]) -> None:
        """A stage may only run on finished, current upstream results."""
        for name in todo:
            for before in STAGES[1: STAGES.index(name)]:
                if before in todo:
                    continue
                entry = state.stage(before)
                if entry.get("status") != "done" or entry.get("input_hash") != hashes[before]:
                    raise UserError(f"{self.run_dir}: stage '{name}' needs '{before}', which is not up to date; "
                                    f"rerun without --from/--until {name}")

    def _run_stage(self, state: RunState, name: str, digest: str) -> None:
        entry = state.stage(name)
        folder = self.stage_dir(name)
        resuming = entry.get("input_hash") == digest and entry.get("status") in ("running", "interrupted", "failed")
        if not resuming and folder.exists():
            shutil.rmtree(folder)  # inputs changed (or forced): start the stage from scratch
        folder.mkdir(parents=True, exist_ok=True)
        for later in STAGES[STAGES.index(name) + 1:]:  # their results no longer follow from this stage's
            if name != "plan" and state.stage(later).get("status") == "done":
                state.stage(later)["status"] = "pending"
        entry.update({"status": "running", "input_hash": digest, "started": _now(), "finished": None})
        entry.setdefault("seconds_before", 0.0)
        if not resuming:
            entry["seconds_before"] = 0.0
        state.save()
        self._log({"event": "stage_start", "stage": name, "resuming": resuming})
        self.reporter.stage(name, "running", note="resuming from checkpoint" if resuming else "")
        t0 = time.monotonic()

        def on_event(event: dict[str, Any]) -> None:
            self.reporter.event({"stage": name, **event})

        try:
            note = STAGE_FUNCTIONS[name](self, folder, on_event)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            entry.update({"status": "interrupted" if interrupted else "failed",
                          "seconds_before": entry["seconds_before"] + time.monotonic() - t0,
                          "error": None if interrupted else str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            state.save()
            self._log({"event": "stage_end", "stage": name, "status": entry["status"]})
            self.reporter.stage(name, entry["status"], time.monotonic() - t0)
            raise
        seconds = entry.pop("seconds_before") + time.monotonic() - t0
        entry.update({"status": "done", "finished": _now(), "seconds": round(seconds, 3), "note": note or ""})
        entry.pop("error", None)
        state.save()
        self._log({"event": "stage_end", "stage": name, "status": "done", "seconds": seconds})
        self.reporter.stage(name, "done", seconds, note or "")

    def _log(self, record: dict[str, Any]) -> None:
        atomic.append_jsonl(self.run_dir / "events.jsonl", {"time": _now(), **record})

    def final_model_dir(self) -> Path:
        ft = self.stage_dir("finetune") / "model"
        return ft if self.recipe.finetune.enabled and ft.is_dir() else self.stage_dir("slice") / "model"


# --------------------------------------------------------------------------- the stages


def _plan(ex: Executor, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> str:
    from .plan import make_plan

    plan = make_plan(ex.recipe)
    atomic.write_json(folder / "plan.json", plan)
    return f"target {plan['params']['target']['total']:,} params"


def _prune(ex: Executor, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> str:
    from .sharding import describe_weights

    if ex.recipe.method == "compresso":
        from .prune import run_prune

        result = run_prune(ex.recipe, folder, on_event=on_event)
    else:
        from .baselines import run_one_shot

        result = run_one_shot(ex.recipe, folder, on_event=on_event)
    note = f"prunable sparsity {result['achieved_sparsity']:.4f} (target {result['target_sparsity']:.4f})"
    return note + (f"; {describe_weights(result['weights'])}" if "weights" in result else "")


def _slice(ex: Executor, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> str:
    from .export import run_slice

    manifest = run_slice(ex.recipe, ex.stage_dir("prune"), folder, on_event=on_event)
    return f"{manifest['params']['exported']['total']:,} params ({manifest['mode']})"


def _finetune(ex: Executor, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> str:
    if not ex.recipe.finetune.enabled:
        return "disabled in the recipe"
    from .finetune import run_finetune
    from .sharding import describe_weights

    result = run_finetune(ex.recipe, ex.stage_dir("slice") / "model", folder, on_event=on_event)
    return describe_weights(result["weights"])


def _evaluate(ex: Executor, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> str:
    from .evaluate import run_evaluate, run_source_evaluate

    pruned = run_evaluate(ex.recipe, ex.final_model_dir(), folder / "pruned.json", label="pruned",
                          on_event=on_event)
    if ex.recipe.eval.compare_source:
        run_source_evaluate(ex.recipe, folder / "source.json", on_event=on_event)
    return f"{len(pruned.get('tasks', {}))} task(s)"


def _report(ex: Executor, folder: Path, on_event: Callable[[dict[str, Any]], None]) -> str:
    from .report import write_report

    write_report([ex.run_dir], ex.run_dir / "report.md", json_path=ex.run_dir / "report.json",
                 assets_dir=folder)
    return str(ex.run_dir / "report.md")


STAGE_FUNCTIONS: dict[str, Callable[[Executor, Path, Callable[[dict[str, Any]], None]], str | None]] = {
    "plan": _plan, "prune": _prune, "slice": _slice, "finetune": _finetune, "evaluate": _evaluate,
    "report": _report,
}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class _sigterm_as_interrupt:
    """SIGTERM (a scheduler's stop, `kill`) takes the same path as Ctrl-C: checkpoint, mark, exit 130."""

    def __enter__(self) -> None:
        self.previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not in the main thread
            self.previous = None

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)

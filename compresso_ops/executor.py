"""The executor behind `compresso-ops apply`: runs plan -> prune -> slice -> finetune -> evaluate -> report
in a run folder, and can be trusted with a multi-day job.

Each stage declares the recipe sections it reads; their content hash (chained through the upstream stages,
plus fingerprints of the model and data files) decides whether a finished stage can be skipped. A stage
that was interrupted keeps its folder and resumes from its own checkpoint; a stage whose inputs changed
starts from an empty folder. `state.json` records status, timings and input hashes, written atomically.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresso_ops.errors import UserError
from compresso_ops.infra import atomic
from compresso_ops.infra.fingerprint import digest, path_identity
from compresso_ops.infra.integrity import damaged, hash_outputs
from compresso_ops.infra.lock import RunLock
from compresso_ops.infra.units import human_seconds, timestamp
from compresso_ops.models.resolve import locate_model
from compresso_ops.recipe.loader import dump_resolved
from compresso_ops.recipe.schema import Recipe
from compresso_ops.ui.progress import EventFn, Reporter

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: the module whose `run(recipe, run_dir, on_event) -> note` does the work,
    the recipe fields (dotted) that are its inputs, the recipe fields naming files whose content is, and
    the outputs (globs under the run folder) that later stages trust: their sha256 is recorded when the
    stage finishes and checked before the stage is skipped."""

    name: str
    module: str
    reads: tuple[str, ...]
    files: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()

    def run(self, recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
        return importlib.import_module(self.module).run(recipe, run_dir, on_event)


def _model_folder(folder: str) -> tuple[str, ...]:
    """The files of an exported model folder that later stages load: weights, configs, tokenizer, modeling
    code. Not its README.md, the model card, which the evaluate stage rewrites with its results."""
    return tuple(f"{folder}/{pattern}" for pattern in ("*.safetensors", "*.json", "*.py", "*.model"))


# The pipeline, in order. Stage modules are imported when they run: `plan` needs no torch.
PIPELINE: tuple[Stage, ...] = (
    Stage("plan", "compresso_ops.stages.plan",
          ("model", "target", "data", "prune", "finetune", "eval", "export", "hardware", "method")),
    # hardware: GPUs per node x nodes set the global batch, the GPU type the precision.
    Stage("prune", "compresso_ops.stages.prune",
          ("method", "model", "target", "prompt", "data", "prune", "export.mode", "hardware.gpu",
           "hardware.gpus_per_node", "hardware.nodes"), ("model.path", "data.path"),
          ("prune/masks.safetensors", "prune/masks.json", "prune/gates.safetensors", "prune/lora/*",
           *_model_folder("prune/model"))),  # prune/model: the trained model of prune.train: full
    Stage("slice", "compresso_ops.stages.slice", ("export",), outputs=_model_folder("slice/model")),
    Stage("finetune", "compresso_ops.stages.finetune",
          ("finetune", "data", "prompt", "model.dtype", "hardware.gpu", "hardware.gpus_per_node",
           "hardware.nodes"), ("data.path",), _model_folder("finetune/model")),
    Stage("evaluate", "compresso_ops.stages.evaluate", ("eval", "prompt"), ("eval.perplexity.path",)),
    Stage("report", "compresso_ops.stages.report", ("report",)),
)

STAGES = tuple(stage.name for stage in PIPELINE)
BY_NAME = {stage.name: stage for stage in PIPELINE}


def _pick(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _identity(recipe: Recipe, data: dict[str, Any], field: str) -> Any:
    """The identity of a file input (infra/fingerprint.py); the source model's is that of the folder it
    resolves to, so a hub id follows its cached snapshot."""
    if field == "model.path":
        folder = locate_model(recipe.model).folder
        return path_identity(folder or recipe.model.path)
    return path_identity(_pick(data, field))


def stage_hashes(recipe: Recipe) -> dict[str, str]:
    """Input hash per stage, each chained with the previous stage's so a change flows downstream."""
    data = recipe.model_dump(mode="json")
    for task in data.get("eval", {}).get("local_tasks", []):
        task["fingerprint"] = path_identity(task.get("data"))
    hashes: dict[str, str] = {}
    upstream = ""
    for name in STAGES:
        spec = BY_NAME[name]
        payload = {
            "upstream": upstream if name != "plan" else "",
            "reads": {k: _pick(data, k) for k in spec.reads},
            "files": {k: _identity(recipe, data, k) for k in spec.files},
        }
        hashes[name] = digest(payload)
        if name != "plan":  # the plan is informational: nothing downstream depends on it
            upstream = hashes[name]
    return hashes


def load_state(path: Path) -> dict[str, Any] | None:
    """A run's state.json, or None when there is none; a damaged one is a user error with what to do
    (compresso-ops writes it atomically, so damage comes from outside)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not (isinstance(data, dict) and isinstance(data.get("stages"), dict)
            and all(isinstance(v, dict) for v in data["stages"].values())):
        raise UserError(f"{path}: damaged (not the state compresso-ops writes); restore it, or delete it and "
                        "rerun `compresso-ops apply` to run every stage again")
    return data


class RunState:
    """state.json: per-stage status (pending, running, done, skipped, failed, interrupted, damaged), input
    hashes, the sha256 of the outputs later stages trust, timings."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / STATE_FILE
        self.data: dict[str, Any] = load_state(self.path) or {"stages": {}}

    def stage(self, name: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        atomic.write_json(self.path, self.data)

    def save_failure(self) -> None:
        """Record a failed or interrupted stage even when the failure is a full disk, which also fails the
        atomic write (it needs room for a second copy): then the file is rewritten in place, in the blocks
        it already holds, so state.json never claims a stage is still running."""
        try:
            self.save()
        except OSError:
            text = json.dumps(self.data, indent=2, default=str).encode() + b"\n"
            with contextlib.suppress(OSError), open(self.path, "r+b") as fh:
                fh.write(text)
                fh.truncate()
                os.fsync(fh.fileno())


class Executor:
    def __init__(self, recipe: Recipe, reporter: Reporter, *, run_dir: Path | None = None,
                 from_stage: str | None = None, until: str | None = None, force: bool = False,
                 break_stale_lock: bool = False, preflight: bool = True) -> None:
        self.recipe = recipe
        self.reporter = reporter
        self.run_dir = Path(run_dir or recipe.resolved_run_dir())
        if from_stage and until and STAGES.index(from_stage) > STAGES.index(until):
            raise UserError(f"--from {from_stage} comes after --until {until} in the pipeline "
                            f"({' -> '.join(STAGES)}); nothing would run; swap them")
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
        """Stages every process of a torchrun job runs together (data-parallel training, and evaluation of a
        model that fits one GPU); the others run on rank 0 alone."""
        if name == "evaluate":
            from compresso_ops.stages.plan import evaluation_parallel

            return evaluation_parallel(self.recipe) == "data"
        return (name == "prune" and self.recipe.method == "compresso") or (
            name == "finetune" and self.recipe.finetune.enabled)

    def run(self) -> dict[str, Any]:
        from compresso_ops.training.distributed import init_distributed, shutdown_distributed

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
        Rank 0 alone holds the lock, writes state and files and reports."""
        todo: list[str] = ctx.broadcast_object(None)
        for name in todo:
            if self.collective(name):
                ctx.barrier()  # rank 0 has finished the stages before this one
                BY_NAME[name].run(self.recipe, self.run_dir, lambda event: None)

    def _run_locked(self, ctx: Any) -> dict[str, Any]:
        state = RunState(self.run_dir)
        hashes = stage_hashes(self.recipe)
        state.data["recipe_hash"] = self.recipe.recipe_hash()
        state.data["recipe_file"] = str(self.recipe.source_file) if self.recipe.source_file else None
        atomic.write_text(self.run_dir / "recipe.resolved.yaml", dump_resolved(self.recipe))
        stages = self.selected()
        todo = self._todo(state, hashes)
        if self.preflight:
            self._preflight(todo)
        ctx.broadcast_object(todo)

        self.reporter.start(stages)
        try:
            for name in stages:
                if name not in todo:
                    took = state.stage(name).get("seconds")  # when it ran; skipping takes no time
                    earlier = f" (ran earlier in {human_seconds(took)})" if isinstance(took, (int, float)) else ""
                    self.reporter.stage(name, "skipped", None, "up to date" + earlier)
                    continue
                if self.collective(name):
                    ctx.barrier()  # the other ranks join this stage now
                self._run_stage(state, name, hashes[name])
        finally:
            self.reporter.close()
        return state.data

    def _todo(self, state: RunState, hashes: dict[str, str]) -> list[str]:
        """The selected stages that must run: out of date or forced, and every stage after one that runs."""
        forced_from = STAGES.index(self.from_stage) if self.from_stage else (0 if self.force else None)
        todo: list[str] = []
        for name in self.selected():  # a stage that runs makes every stage after it (but the plan) run too
            if self._needs_run(state, name, hashes[name], forced_from) or any(t != "plan" for t in todo):
                todo.append(name)
        self._check_upstream(state, hashes, todo)
        return todo

    def _preflight(self, todo: list[str]) -> None:
        if any(s not in ("plan", "report") for s in todo):
            from compresso_ops.stages.preflight import run_preflight

            run_preflight(self.recipe, self.run_dir, todo)

    def check_before_launch(self) -> None:
        """Preflight in the launching process, before torchrun starts the workers, so a bad input is one line
        here rather than a failure on every rank. Reads the run state; writes nothing but the run folder."""
        if self.preflight:
            self._preflight(self._todo(RunState(self.run_dir), stage_hashes(self.recipe)))

    def _needs_run(self, state: RunState, name: str, input_hash: str, forced_from: int | None) -> bool:
        if forced_from is not None and STAGES.index(name) >= forced_from:
            return True
        entry = state.stage(name)
        if not (entry.get("status") == "done" and entry.get("input_hash") == input_hash):
            return True
        changed = damaged(self.run_dir, entry.get("artifacts") or {})
        if changed:  # a file the stage wrote was altered or truncated since: produce it again (resuming
            entry["status"] = "damaged"  # from its final checkpoint where it has one)
            self.reporter.message(f"[{name}] {self.run_dir / changed[0]} is not the file this stage wrote (sha256 "
                                  f"differs{f'; {len(changed)} files' if len(changed) > 1 else ''}); re-running {name}")
        return bool(changed)

    def _check_upstream(self, state: RunState, hashes: dict[str, str], todo: list[str]) -> None:
        """A stage may only run on finished, current upstream results."""
        for name in todo:
            for before in STAGES[1: STAGES.index(name)]:
                if before in todo:
                    continue
                entry = state.stage(before)
                if entry.get("status") != "done" or entry.get("input_hash") != hashes[before]:
                    raise UserError(f"{self.run_dir}: stage '{name}' needs '{before}', which is not up to date; "
                                    f"rerun without --from/--until {name}")

    def _run_stage(self, state: RunState, name: str, input_hash: str) -> None:
        entry = state.stage(name)
        folder = self.stage_dir(name)
        resuming = entry.get("input_hash") == input_hash and entry.get("status") in (
            "running", "interrupted", "failed", "damaged")
        if not resuming and folder.exists():
            shutil.rmtree(folder)  # inputs changed (or forced): start the stage from scratch
        folder.mkdir(parents=True, exist_ok=True)
        for later in STAGES[STAGES.index(name) + 1:]:  # their results no longer follow from this stage's
            if name != "plan" and state.stage(later).get("status") == "done":
                state.stage(later)["status"] = "pending"
        entry.update({"status": "running", "input_hash": input_hash, "started": timestamp(), "finished": None})
        entry.setdefault("seconds_before", 0.0)
        if not resuming:
            entry["seconds_before"] = 0.0
        state.save()
        self._log({"event": "stage_start", "stage": name, "resuming": resuming})
        self.reporter.stage(name, "running", note="resuming from checkpoint" if resuming else "")
        t0 = time.monotonic()

        def on_event(event: dict[str, Any]) -> None:
            if "notice" in event:  # something the user should read (a damaged checkpoint was skipped)
                self.reporter.message(f"[{name}] {event['notice']}")
                self._log({"event": "notice", "stage": name, "text": event["notice"]})
            else:
                self.reporter.event({"stage": name, **event})

        try:
            note = BY_NAME[name].run(self.recipe, self.run_dir, on_event)
            artifacts = hash_outputs(self.run_dir, BY_NAME[name].outputs)
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            entry.update({"status": "interrupted" if interrupted else "failed",
                          "seconds_before": entry["seconds_before"] + time.monotonic() - t0,
                          "error": None if interrupted else str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            state.save_failure()
            self._log({"event": "stage_end", "stage": name, "status": entry["status"]})
            self.reporter.stage(name, entry["status"], time.monotonic() - t0)
            raise
        seconds = entry.pop("seconds_before") + time.monotonic() - t0
        entry.update({"status": "done", "finished": timestamp(), "seconds": round(seconds, 3), "note": note or ""})
        entry.pop("error", None)
        entry.pop("artifacts", None)
        if artifacts:
            entry["artifacts"] = artifacts
        state.save()
        self._log({"event": "stage_end", "stage": name, "status": "done", "seconds": seconds})
        self.reporter.stage(name, "done", seconds, note or "")

    def _log(self, record: dict[str, Any]) -> None:
        atomic.append_jsonl(self.run_dir / "events.jsonl", {"time": timestamp(), **record})

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

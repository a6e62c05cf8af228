"""The step loop shared by the prune and fine-tune stages: resume, events, checkpoints, graceful stop.

A trainer object does one optimizer step at a time and can export/import its complete state; this loop
decides when to checkpoint and how to stop. Ctrl-C or SIGTERM never cut a step in half: the signal is
noted, the step in flight finishes, a checkpoint is written, and KeyboardInterrupt is raised (the CLI then
exits with 130 and the next `apply` resumes). A second Ctrl-C stops at once.

Under torchrun the ranks agree after every step on whether any of them was asked to stop, so they stop
after the same step; rank 0 reads the checkpoint (or, on a fresh start, takes its own initial state) and
broadcasts it, so every rank starts from the same state even without a shared file system, and only
rank 0 writes events and checkpoints.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from compresso_ops.errors import StageError
from compresso_ops.recipe.schema import DistillSection
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.data import IGNORE
from compresso_ops.training.distill import Teacher, distill_loss_sum, hidden_states_loss_sum
from compresso_ops.training.distributed import SINGLE, DistContext
from compresso_ops.training.events import EventLog
from compresso_ops.training.precision import Precision
from compresso_ops.training.shared_prefix import MIN_SHARED_PREFIX, forward_with_shared_prefix, shared_prefix_length
from compresso_ops.ui.progress import EventFn


class Trainer(Protocol):
    """With replicated trainables `state_dict` runs on rank 0 only and must not use collectives. With
    `collective_state` (FSDP shards the trained weights) every rank calls `state_dict` and `load_state_dict`
    (non-zero ranks with None), which gather to and broadcast from rank 0. `step` returns the step's record
    with its `lm_loss`; `vocab_size` and `lr_setting` (the recipe field of the learning rate and its value)
    let the loop recognise and explain a diverged run."""

    collective_state: bool
    vocab_size: int
    lr_setting: str

    def step(self, step: int) -> dict[str, Any]: ...
    def state_dict(self, step: int, fingerprint: str) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> int: ...


class _StopFlag:
    def __init__(self) -> None:
        self.requested = False


@contextmanager
def graceful_stop() -> Iterator[_StopFlag]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between steps."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class DivergenceGuard:
    """Stops a run whose loss has left the range of learning, before more steps are spent on it.

    A model that knows anything scores below ln(vocab), the loss of predicting every token uniformly; a
    too-large learning rate drives it to that loss (or far beyond it) and keeps it there. The guard
    compares each step's LM loss with a limit set from the first step's loss (measured before any update):
    when that loss is clearly below uniform, the limit sits just below uniform; when the model starts near
    uniform (an untrained one), the limit is twice the larger of the two. `PATIENCE` consecutive steps above
    the limit stop the run. While the loss is above the limit no periodic checkpoint is written, so the
    last checkpoint on disk is the last good one.
    """

    PATIENCE = 3

    def __init__(self, vocab_size: int, lr_setting: str) -> None:
        self.uniform = math.log(max(2, vocab_size))
        self.lr_setting = lr_setting
        self.first: float | None = None
        self.streak = 0

    @property
    def limit(self) -> float:
        first = self.uniform if self.first is None else self.first
        if first < 0.9 * self.uniform:
            return self.uniform - 0.1 * (self.uniform - first)
        return 2 * max(self.uniform, first)

    @property
    def suspicious(self) -> bool:
        return self.streak > 0

    def observe(self, record: dict[str, Any], store: CheckpointStore) -> None:
        """Count the step; raise StageError once the loss has stayed above the limit PATIENCE steps."""
        loss = float(record["lm_loss"])
        if self.first is None:
            self.first = loss
        self.streak = self.streak + 1 if loss > self.limit else 0
        if self.streak >= self.PATIENCE:
            raise StageError(
                f"{record.get('stage', 'training')}: training diverged: the LM loss stayed above {self.limit:.3g} for "
                f"{self.streak} steps (step {record['step']}: {loss:.4g}; first step {self.first:.4g}; predicting "
                f"tokens uniformly gives ln(vocab) = {self.uniform:.4g}); {_kept(store)}; lower {self.lr_setting} "
                "and rerun")

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "streak": self.streak}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.first, self.streak = (state or {}).get("first"), (state or {}).get("streak", 0)


def run_steps(trainer: Trainer, *, store: CheckpointStore, events: EventLog, fingerprint: str, total: int,
              checkpoint_every: int, on_event: EventFn | None = None,
              max_steps: int | None = None, dist: DistContext = SINGLE) -> bool:
    """Run steps from the last checkpoint to `total`; True when the run is complete.

    `max_steps` stops after that many steps in this call, as a killed run would (tests use it).
    `on_event` is called on rank 0 only; it also receives {"notice": ...} when a damaged checkpoint was
    skipped. A diverged run stops with StageError (see `DivergenceGuard`).
    """
    is_writer = dist.is_main
    saved = store.load(fingerprint) if is_writer else None
    if is_writer and store.notice and on_event is not None:
        on_event({"notice": store.notice})
    guard = DivergenceGuard(trainer.vocab_size, trainer.lr_setting)
    start = 0
    guard_state = saved.get("guard") if saved is not None else None
    if trainer.collective_state:  # every rank loaded the same source and seeds: only a resume needs loading
        if dist.broadcast_object(saved is not None):
            start = trainer.load_state_dict(saved)
        guard_state = dist.broadcast_object(guard_state)
    elif dist.active:  # like DDP, every rank starts from rank 0's state: its checkpoint or its fresh init
        saved = dist.broadcast_object(
            (saved if saved is not None else trainer.state_dict(0, fingerprint)) if is_writer else None)
        start = trainer.load_state_dict(saved)
        guard_state = saved.get("guard")
    elif saved is not None:
        start = trainer.load_state_dict(saved)
    guard.load_state_dict(guard_state)
    if is_writer:
        if start == 0:
            events.reset()
        else:
            events.truncate_after(start)
    stop = total if max_steps is None else min(total, start + max_steps)
    with graceful_stop() as flag:
        for step in range(start, stop):
            t0 = time.perf_counter()
            record = trainer.step(step)
            record["time_s"] = round(time.perf_counter() - t0, 4)
            done = step + 1
            if is_writer:
                events.append(record)
                if on_event is not None:
                    on_event(record)
            guard.observe(record, store)
            stopping = dist.any(flag.requested)
            periodic = done % checkpoint_every == 0 and not guard.suspicious
            if (periodic or done == total or stopping) and (is_writer or trainer.collective_state):
                # replicated: rank 0's state is everyone's; collective: every rank gathers onto rank 0
                state = trainer.state_dict(done, fingerprint)
                if is_writer:
                    store.save({**state, "guard": guard.state_dict()})
            if stopping:
                raise KeyboardInterrupt
    return stop >= total


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], precision: Precision,
                teacher: Teacher | None = None, distill: DistillSection | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens (divide by `step_label_tokens` of the whole
    global batch so accumulation and data parallelism equal one large batch). With a `teacher` (the source,
    training/distill.py) each position's term mixes in the KL to the teacher's distribution as `distill` says.

    When the rows share a prefix of at least `MIN_SHARED_PREFIX` tokens (the prompt and template every
    training row starts with) it is forwarded once (`training/shared_prefix.py`), by the teacher too: the same
    sum, with the prefix's own labelled positions counted once per row and the prediction of each row's first
    suffix token read from the prefix's last position. Under FSDP every forward gathers the layers on every
    rank, so the ranks agree to share only when all of them can."""
    batch = {k: v.to(precision.device) for k, v in batch.items()}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if teacher is not None and distill is not None and distill.hidden_states_weight:
        return _loss_sum_with_hidden_states(model, ids, mask, labels, precision, teacher, distill)
    prefix = shared_prefix_length(ids, labels, mask)
    share = prefix >= MIN_SHARED_PREFIX
    if precision.shard_base:
        share = not precision.dist.any(not share)
    prefix = prefix if share else 0
    taught = None
    if teacher is not None and distill is not None:
        with torch.no_grad(), teacher.active():
            taught = _shifted_logits(teacher.model, ids, mask, prefix, teacher.precision)
    total = torch.zeros((), device=precision.device)
    for i, (logits, (targets, repeat)) in enumerate(zip(_shifted_logits(model, ids, mask, prefix, precision),
                                                        _shifted_targets(labels, prefix), strict=True)):
        term = _loss_sum(logits, targets)
        if taught is not None:
            term = distill_loss_sum(logits, taught[i], targets, term, distill)
        total = total + repeat * term
    return total


def _loss_sum_with_hidden_states(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                                 precision: Precision, teacher: Teacher, distill: DistillSection) -> torch.Tensor:
    """`lm_loss_sum` with the hidden-state term of `distill` added: whole rows through both models (the term
    needs every position's states, so no prefix is shared), the same sums otherwise."""
    with torch.no_grad(), teacher.active(), teacher.precision.autocast():
        taught = teacher.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    with precision.autocast():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    logits, targets = out.logits[:, :-1], labels[:, 1:]
    term = distill_loss_sum(logits, taught.logits[:, :-1], targets, _loss_sum(logits, targets), distill)
    return term + distill.hidden_states_weight * hidden_states_loss_sum(out.hidden_states, taught.hidden_states,
                                                                        targets)


def _shifted_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prefix: int,
                    precision: Precision) -> list[torch.Tensor]:
    """The logits that predict each next token, in the pieces `_shifted_targets` pairs them with: the whole
    batch, or (a shared `prefix`) the prefix's own predictions from its one row, each row's first suffix token
    predicted from the prefix's last position, and the suffixes' own."""
    with precision.autocast():
        if not prefix:
            return [model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]]
        head, tail = forward_with_shared_prefix(model, ids, mask, prefix)
    return [head[:, :-1], head[:, -1:].expand(ids.shape[0], -1, -1), tail[:, :-1]]


def _shifted_targets(labels: torch.Tensor, prefix: int) -> list[tuple[torch.Tensor, int]]:
    """The next-token targets of `_shifted_logits`' pieces, each with how many rows its sum stands for."""
    if not prefix:
        return [(labels[:, 1:], 1)]
    return [(labels[:1, 1:prefix], labels.shape[0]), (labels[:, prefix:prefix + 1], 1), (labels[:, prefix + 1:], 1)]


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (in fp32) of each position's logits against its target, summed over labelled targets."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """constant / linear / cosine decay to 0 after a linear warm-up."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _kept(store: CheckpointStore) -> str:
    saved = store.saved_step()
    return f"the last good checkpoint (step {saved}) is kept in {store.folder}" if saved is not None else \
        "no checkpoint was written yet"


def check_finite(stage: str, step: int, values: dict[str, torch.Tensor], store: CheckpointStore,
                 lr_setting: str) -> None:
    """Stop before a non-finite loss reaches the weights; the last good checkpoint stays on disk."""
    bad = [name for name, v in values.items() if not torch.isfinite(v).all()]
    if bad and step == 0:  # nothing has been trained yet: the learning rate cannot be the cause
        raise StageError(f"{stage}: {bad[0]} is NaN/inf at step 1, before any weight was updated: the model's "
                         "forward is not finite on the first batch; check its weights, and use bfloat16 or float32 "
                         "instead of float16")
    if bad:
        raise StageError(f"{stage}: {bad[0]} became NaN/inf at step {step + 1}; {_kept(store)}; lower {lr_setting} "
                         "or use bfloat16 instead of float16")

"""Knowledge distillation from the source model (docs/method.md §11).

The loss of a training step becomes (1 - w) * LM + w * T^2 * KL(teacher || student) on the response tokens, the
teacher being the source model. On stories260K at equal steps this recovered far more than the LM loss alone
(benchmarks/quality.py): a pruned model's next-token distribution carries more signal per token than its label.

With `hidden_states_weight` a second term matches the student's residual stream after each decoder layer to
the source's (CoFi's layer distillation, without its layer mapping: pruning keeps every layer and the hidden
size): a sliced model's layers get a target of their own instead of only the last layer's, which recovered
more at equal steps (benchmarks/quality_levers.py).

Two teachers, chosen to cost the least memory:
- `AdapterOffTeacher`: in a LoRA prune stage the source *is* the student's frozen base, so the teacher is the
  same model with the adapters disabled (the caller turns the gate hooks off): no second copy.
- `FrozenTeacher`: otherwise (a sliced student, or a prune stage training every weight) a frozen copy of the
  source in the compute dtype, sharded like the frozen base under FSDP; the planner counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from compresso_ops.errors import UserError
from compresso_ops.method.hooks import GateHooks
from compresso_ops.recipe.schema import DistillSection, Recipe, TrainingSection
from compresso_ops.training.data import IGNORE
from compresso_ops.training.distributed import DistContext
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import load_source, shard_frozen


class Teacher(Protocol):
    """A model whose forward, inside `active()` and without gradients, gives the source's logits."""

    model: nn.Module
    precision: Precision

    def active(self) -> AbstractContextManager[Any]: ...


class AdapterOffTeacher:
    """The student's own frozen base with its peft adapters disabled and its gate hooks paused."""

    def __init__(self, model: nn.Module, precision: Precision, hooks: GateHooks) -> None:
        self.model, self.precision, self.hooks = model, precision, hooks

    @contextmanager
    def active(self) -> Iterator[None]:
        with self.model.disable_adapter(), self.hooks.paused():
            yield


class FrozenTeacher:
    """A frozen copy of the source model."""

    def __init__(self, model: nn.Module, precision: Precision) -> None:
        self.model, self.precision = model, precision

    def active(self) -> AbstractContextManager[Any]:
        return nullcontext()


def load_teacher(recipe: Recipe, dist: DistContext) -> FrozenTeacher:
    """The source, frozen, in the compute dtype (not the fp32 master weights a full-weight student trains in),
    sharded across the ranks when the stage shards its base (FSDP)."""
    model, _, precision = load_source(recipe, dist)
    shard_frozen(model, precision)
    return FrozenTeacher(model.eval(), precision)


def distill_loss_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, lm_sum: torch.Tensor,
                     section: DistillSection) -> torch.Tensor:
    """(1 - w) * lm_sum + w * T^2 * summed KL(teacher || student) over the labelled positions.

    `student` / `teacher`: logits already shifted to predict `labels` ([B, L, V] and [B, L, V]); `labels` uses
    IGNORE for positions without a loss. A sum, like `lm_sum`, so the caller's division by the step's
    response tokens normalises both terms alike."""
    keep = labels != IGNORE
    t = section.temperature
    log_p_student = F.log_softmax(student[keep].float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher[keep].float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") * (t * t)
    return (1.0 - section.weight) * lm_sum + section.weight * kl


def hidden_states_loss_sum(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                           targets: torch.Tensor) -> torch.Tensor:
    """Summed over the labelled positions: each position's squared distance between the student's and the
    teacher's residual stream, relative to the teacher's squared norm there, averaged over the decoder layers
    but the last.

    `student` / `teacher`: the models' `hidden_states` (the embeddings, then one entry per decoder layer, the
    last one after the final norm in some classes: the KL term covers that layer, so it and the embeddings are
    left out); `targets`: the next-token labels of every position but the last, IGNORE where no loss is
    taken. Relative per position, so no layer or outlier position dominates by its scale and the sum does not
    depend on which rows share a micro-batch (data-parallel runs equal one process)."""
    if student[0].shape[-1] != teacher[0].shape[-1]:
        raise UserError(f"distill.hidden_states_weight: the student's hidden size ({student[0].shape[-1]}) is not "
                        f"the source's ({teacher[0].shape[-1]}); hidden dims were pruned, so set it to 0")
    keep = targets != IGNORE
    layers = list(zip(student[1:-1], teacher[1:-1], strict=True))
    total = torch.zeros((), device=targets.device)
    for s, t in layers:
        s, t = s[:, :-1][keep].float(), t[:, :-1][keep].float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)).sum()
    return total / max(1, len(layers))


def teacher_for(recipe: Recipe, stage: str, model: nn.Module, precision: Precision,
                hooks: GateHooks | None = None) -> Teacher | None:
    """The teacher of `stage` ("prune", whose gate `hooks` it pauses, or "finetune"), or None when its recipe
    section does not distil."""
    section = getattr(recipe, stage)
    if section.distill.weight == 0:
        return None
    if stage == "prune" and section.train == "lora" and hooks is not None:
        return AdapterOffTeacher(model, precision, hooks)
    return load_teacher(recipe, precision.dist)


def describe(section: TrainingSection) -> dict[str, Any] | None:
    """What the manifest and the report say of a stage's distillation (None: off)."""
    if section.distill.weight == 0:
        return None
    said = section.distill.model_dump(exclude={"hidden_states_weight"} if not section.distill.hidden_states_weight
                                      else None)
    return {"teacher": "source", **said}


"""The prune stage: LoRA + hard-concrete gates + Lagrangian, then exact final masks.

Three optimizers, as in docs/method.md §5: AdamW on the LoRA adapters, AdamW on the gates' log_alpha and
AdamW with `maximize=True` on the two Lagrange multipliers (gradient ascent). The schedule has three
phases, in optimizer steps: LoRA only (gates frozen and open), a linear ramp of the target sparsity, and a
hold at the target. Every step appends one line to `events.jsonl`; a checkpoint every
`prune.checkpoint_every` steps (and at the end) lets a killed run continue the same trajectory.

Under torchrun the ranks share each step's global micro-batches (see `training.BatchLayout`); the gradients
are summed in `Precision.step`. The Lagrangian is the same number on every rank, so only rank 0
backpropagates it and the summed gradient is the single-process one. Only rank 0 writes files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compresso_ops.infra import atomic
from compresso_ops.infra.fingerprint import digest
from compresso_ops.method.baselines import run_one_shot
from compresso_ops.method.gates import GateSet, Lagrangian, target_at
from compresso_ops.method.hooks import GateHooks
from compresso_ops.method.masks import select_final_masks
from compresso_ops.method.prompts import resolve_prompt
from compresso_ops.method.rates import gate_learning_rates, ramp_lag
from compresso_ops.models.adapter import ModelAdapter, unwrap
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params, prunable_sparsity, target_sparsity
from compresso_ops.recipe.schema import Recipe
from compresso_ops.training.batching import (
    BatchLayout,
    Collator,
    DataOrder,
    label_count,
    micro_batches,
    micro_rng,
    pad_token_id,
    step_label_tokens,
    to_steps,
)
from compresso_ops.training.checkpoints import (
    CheckpointStore,
    gather_weights,
    load_trained_state,
    sharded_trainables,
    shared_checkpoint,
    trained_state,
)
from compresso_ops.training.data import Example, build_dataset
from compresso_ops.training.distill import describe as describe_distill
from compresso_ops.training.distill import teacher_for
from compresso_ops.training.distributed import init_distributed
from compresso_ops.training.events import EventLog
from compresso_ops.training.loop import check_finite, lm_loss_sum, make_scheduler, run_steps
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import load_source, prepare_for_training
from compresso_ops.training.sharding import describe_weights, require_even_split, weights_held
from compresso_ops.ui.progress import EventFn

STAGE = "prune"
# Where the prune stage leaves what trained besides the gates: the adapter, or the whole trained model.
TRAINED = {"lora": "lora", "full": "model"}


@dataclass(frozen=True)
class Phases:
    """Phase lengths in optimizer steps."""

    lora_only: int
    ramp: int
    hold: int
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return self.lora_only + self.ramp + self.hold

    def name(self, step: int) -> str:
        if step < self.lora_only:
            return "lora_only"
        return "ramp" if step < self.lora_only + self.ramp else "hold"


def prune_phases(recipe: Recipe, num_examples: int) -> Phases:
    """Phase lengths from the global batch, so they do not depend on how many processes run."""
    per_epoch = BatchLayout.of(recipe.prune, recipe.hardware).steps_per_epoch(num_examples)
    s = recipe.prune.schedule
    return Phases(to_steps(s.lora_only, s.unit, per_epoch), max(1, to_steps(s.ramp, s.unit, per_epoch)),
                  to_steps(s.hold, s.unit, per_epoch), per_epoch)


class PruneTrainer:
    """One optimizer step of the prune stage at a time, plus the state a checkpoint needs."""

    def __init__(self, recipe: Recipe, model: nn.Module, examples: list[Example], collate: Collator,
                 precision: Precision, store: CheckpointStore) -> None:
        p = recipe.prune
        self.recipe, self.model, self.examples, self.collate, self.precision = recipe, model, examples, collate, precision
        self.store = store
        self.arch = ModelAdapter(model).arch
        self.vocab_size = self.arch.vocab_size
        self.lr_setting = f"prune.lr.lora (now {p.lr.lora:g})"
        self.target = target_sparsity(recipe, self.arch)
        self.phases = prune_phases(recipe, len(examples))
        self.layout = BatchLayout.of(p, recipe.hardware)
        self.layout.require_fits(len(examples), STAGE)
        require_even_split(self.layout.micros, precision, "prune")
        self.order = DataOrder.of(examples, p, recipe.data)
        self.label_counts = [label_count(e) for e in examples]
        device = precision.device
        self.gates = GateSet(self.arch, recipe.target.structures, seed=p.seed).to(device)
        self.lagrangian = Lagrangian().to(device)
        self.hooks = GateHooks(ModelAdapter(model))
        self.teacher = teacher_for(recipe, STAGE, model, precision, self.hooks)
        self.lora_params = [q for q in model.parameters() if q.requires_grad]  # every weight with train: full
        self.opt_lora = torch.optim.AdamW(self.lora_params, lr=p.lr.lora, weight_decay=0.0)
        self.lr_gates, self.lr_lambda = gate_learning_rates(p.lr.gates, p.lr.lagrangian, self.phases.ramp)
        self.opt_gates = torch.optim.AdamW(self.gates.parameters(), lr=self.lr_gates, weight_decay=0.0)
        self.opt_lambda = torch.optim.AdamW(self.lagrangian.parameters(), lr=self.lr_lambda, weight_decay=0.0,
                                            maximize=True)
        self.sched_lora = make_scheduler(self.opt_lora, "constant", self.phases.total)
        self.collective_state = sharded_trainables(model)

    def step(self, step: int) -> dict[str, Any]:
        """Run optimizer step `step` (0-based) and return its metrics."""
        p = self.recipe.prune
        gating = step >= self.phases.lora_only
        target = target_at(step, self.target, self.phases.lora_only, self.phases.ramp)
        dist, device = self.precision.dist, self.precision.device
        tokens = max(1, step_label_tokens(self.label_counts, self.order, step, self.layout))
        lm_local = torch.zeros((), device=device)
        for k, batch in micro_batches(self.examples, self.order, self.collate, step, self.layout, dist):
            with micro_rng(p.seed, step, k, device):  # one gate sample per global micro-batch
                self.hooks.set(self.gates.sample() if gating else None)
                loss = lm_loss_sum(self.model, batch, self.precision, self.teacher, p.distill) / tokens
                self.precision.backward(loss)
            lm_local += loss.detach()
        self.hooks.set(None)
        lm_total = torch.tensor(dist.all_reduce_scalar(lm_local.item()))
        with torch.set_grad_enabled(gating):
            expected = self.gates.expected_sparsity()
        lagrangian = torch.zeros((), device=device)
        if gating:
            lagrangian = self.lagrangian(expected, target)
            if dist.is_main:  # identical on every rank: counted once in the summed gradient
                self.precision.backward(lagrangian)
        check_finite(STAGE, step, {"lm_loss": lm_total, "lagrangian": lagrangian.detach()}, self.store,
                     self.lr_setting)
        optimizers = [self.opt_lora] + ([self.opt_gates, self.opt_lambda] if gating else [])
        clip = (self.lora_params, p.max_grad_norm) if p.max_grad_norm is not None else None
        self.precision.step(optimizers, clip)
        self.sched_lora.step()
        self.gates.clamp_()
        return {
            "stage": STAGE, "step": step + 1, "total_steps": self.phases.total, "phase": self.phases.name(step),
            "loss": lm_total.item() + lagrangian.item(), "lm_loss": lm_total.item(), "lagrangian": lagrangian.item(),
            "expected_sparsity": expected.item(), "target_sparsity": target,
            "lambda1": self.lagrangian.lambda1.item(), "lambda2": self.lagrangian.lambda2.item(),
            "lr": {"lora": self.sched_lora.get_last_lr()[0], "gates": self.lr_gates, "lagrangian": self.lr_lambda},
            "tokens": tokens,
        }

    def state_dict(self, step: int, fingerprint: str) -> dict[str, Any]:
        return {
            "step": step, "fingerprint": fingerprint,
            **trained_state(self.model, self.opt_lora), "gates": self.gates.state_dict(),
            "lagrangian": self.lagrangian.state_dict(),
            "optimizers": {"gates": self.opt_gates.state_dict(), "lagrangian": self.opt_lambda.state_dict()},
            "scheduler": self.sched_lora.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> int:
        state = shared_checkpoint(self.model, state, self.precision.dist)
        load_trained_state(self.model, self.opt_lora, state)
        self.gates.load_state_dict(state["gates"])
        self.lagrangian.load_state_dict(state["lagrangian"])
        self.opt_gates.load_state_dict(state["optimizers"]["gates"])
        self.opt_lambda.load_state_dict(state["optimizers"]["lagrangian"])
        self.sched_lora.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        return int(state["step"])


def fingerprint(recipe: Recipe) -> str:
    """Inputs that define the trajectory (the global batch among them); a checkpoint from other inputs is
    not resumed."""
    micros = BatchLayout.of(recipe.prune, recipe.hardware).micros
    return digest({"recipe": recipe.sections("model", "target", "prompt", "data", "prune"), "micros": micros})


def run_prune(recipe: Recipe, stage_dir: str | Path, *, on_event: EventFn | None = None,
              max_steps: int | None = None) -> dict[str, Any]:
    """Train gates + LoRA, write `lora/`, `masks.safetensors`, `masks.json`, `gates.safetensors`.

    Resumes from `checkpoints/last` when it matches the recipe. `max_steps` stops after that many optimizer
    steps in this call without writing outputs, as a killed run would (for tests). Under torchrun every rank
    calls this; rank 0 writes the files and reports `on_event`, and all ranks return the same dict once the
    outputs are on disk.
    """
    dist = init_distributed()
    stage_dir = Path(stage_dir)
    model, tokenizer, precision = load_source(recipe, dist, full=recipe.prune.train == "full")
    arch = ModelAdapter(model).arch
    examples = build_dataset(recipe.data, tokenizer, resolve_prompt(recipe.prompt, "prune"),
                             arch.max_position_embeddings)
    model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
    store = CheckpointStore(stage_dir)
    trainer = PruneTrainer(recipe, model, examples, Collator(pad_token_id(tokenizer)), precision, store)
    total = trainer.phases.total
    complete = run_steps(trainer, store=store, events=EventLog(stage_dir / "events.jsonl"),
                         fingerprint=fingerprint(recipe), total=total, checkpoint_every=recipe.prune.checkpoint_every,
                         on_event=on_event, max_steps=max_steps, dist=dist)
    if not complete:
        return {"completed": False, "total_steps": total}
    result = _finish(trainer, stage_dir, arch)
    dist.barrier()  # no rank moves on (or exits) before the outputs are written
    return result


def _finish(trainer: PruneTrainer, stage_dir: Path, arch: ArchSpec) -> dict[str, Any]:
    """The final masks and summary (computed on every rank from the same gates); rank 0 writes them."""
    trainer.hooks.remove()
    masks = select_final_masks(trainer.gates, arch, trainer.target, trainer.recipe.export.mode,
                               trainer.recipe.target.multiple_of)
    expected = trainer.gates.expected_sparsity().item()
    achieved = prunable_sparsity(arch, masks.kept())
    dist, phases = trainer.precision.dist, trainer.phases
    ramp_end = dist.broadcast_object(next(  # from the log: a resumed run may not have seen that step
        (e["expected_sparsity"] for e in atomic.read_jsonl(stage_dir / "events.jsonl")
         if e.get("step") == phases.lora_only + phases.ramp), None) if dist.is_main else None)
    summary = {"target_sparsity": trainer.target, "expected_sparsity": expected, "achieved_sparsity": achieved,
               "ramp_end_expected_sparsity": ramp_end, "lr": {"gates": trainer.lr_gates,
                                                               "lagrangian": trainer.lr_lambda},
               "steps": phases.total, "phases": asdict(phases),
               "lambda1": trainer.lagrangian.lambda1.item(), "lambda2": trainer.lagrangian.lambda2.item(),
               "distill": describe_distill(trainer.recipe.prune)}
    full = trainer.recipe.prune.train == "full"
    weights = gather_weights(trainer.model) if full else None  # a collective when FSDP shards them
    if trainer.precision.dist.is_main:
        masks.save(stage_dir, arch, extra={"prune": summary})
        log_alpha = {k: v.detach().float().cpu().contiguous() for k, v in trainer.gates.log_alpha.items()}
        atomic.write_with(stage_dir / "gates.safetensors", lambda p: save_file(log_alpha, str(p)))
        with atomic.atomic_dir(stage_dir / TRAINED[trainer.recipe.prune.train]) as tmp:
            if full:  # the whole fp32 model
                unwrap(trainer.model).save_pretrained(tmp, state_dict=weights)
            else:  # the peft adapter
                trainer.model.save_pretrained(tmp)
    return {"completed": True, **summary, "kept": asdict(masks.kept()),
            "weights": weights_held(trainer.model, trainer.precision),
            "params": count_params(arch, masks.kept()).as_dict(), "masks_dir": str(stage_dir)}


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The prune stage: Compresso training, or the recipe's one-shot baseline, into `prune/`."""
    if recipe.method == "compresso":
        result = run_prune(recipe, run_dir / STAGE, on_event=on_event)
    else:
        model, tokenizer, _ = load_source(recipe)
        result = run_one_shot(recipe, model, tokenizer, run_dir / STAGE, on_event=on_event)
    note = f"prunable sparsity {result['achieved_sparsity']:.4f} (target {result['target_sparsity']:.4f})"
    lag = ramp_lag(result.get("ramp_end_expected_sparsity"), result["target_sparsity"])
    return note + (f"; {describe_weights(result['weights'])}" if "weights" in result else "") + (
        f"; warning: {lag}" if lag else "")

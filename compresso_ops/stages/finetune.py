"""The fine-tune stage: LoRA (or, with `finetune.train: full`, every weight) trained on the sliced model to
recover quality, then saved in the same export format as the slice stage (same manifest, same reload-and-check).

The collaborative prompt starts every example when the recipe uses it in fine-tuning (docs/method.md §9);
the learning rate follows the recipe's schedule (cosine by default) after a linear warm-up. Checkpoints and
resume work as in the prune stage, through the shared step loop, and so does data parallelism under torchrun
(ranks share the global micro-batches, gradients are summed in `Precision.step`, rank 0 writes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresso_ops.errors import UserError
from compresso_ops.infra.fingerprint import digest
from compresso_ops.method.prompts import resolve_prompt
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
    load_trainable_state,
    load_trained_state,
    sharded_trainables,
    shared_checkpoint,
    trained_state,
)
from compresso_ops.training.data import Example, build_dataset
from compresso_ops.training.distill import describe as describe_distill
from compresso_ops.training.distill import teacher_for
from compresso_ops.training.distributed import SINGLE, DistContext, init_distributed
from compresso_ops.training.events import EventLog
from compresso_ops.training.loop import check_finite, lm_loss_sum, make_scheduler, run_steps
from compresso_ops.training.precision import Precision, choose_precision
from compresso_ops.training.setup import add_lora, freeze_for_training, prepare_for_training
from compresso_ops.training.sharded_load import can_load_sharded, placeholder_model
from compresso_ops.training.sharding import describe_weights, require_even_split, weights_held
from compresso_ops.ui.progress import EventFn

STAGE = "finetune"
MANIFEST = "compresso_manifest.json"


class FinetuneTrainer:
    """One optimizer step of LoRA fine-tuning at a time, plus the state a checkpoint needs."""

    def __init__(self, recipe: Recipe, model: nn.Module, examples: list[Example], collate: Collator,
                 precision: Precision, store: CheckpointStore) -> None:
        f = recipe.finetune
        self.recipe, self.model, self.examples, self.collate = recipe, model, examples, collate
        self.teacher = teacher_for(recipe, STAGE, model, precision)
        self.precision, self.store = precision, store
        self.vocab_size = int(model.config.vocab_size)
        self.lr_setting = f"finetune.lr (now {f.lr:g})"
        self.layout = BatchLayout.of(f, recipe.hardware)
        self.layout.require_fits(len(examples), STAGE)
        require_even_split(self.layout.micros, precision, "finetune")
        self.total = max(1, to_steps(f.duration, f.unit, self.layout.steps_per_epoch(len(examples))))
        self.order = DataOrder.of(examples, f, recipe.data)
        self.label_counts = [label_count(e) for e in examples]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=f.lr, weight_decay=0.0)
        self.scheduler = make_scheduler(self.optimizer, f.schedule, self.total, round(f.warmup_ratio * self.total))
        self.collective_state = sharded_trainables(model)

    def step(self, step: int) -> dict[str, Any]:
        f = self.recipe.finetune
        dist, device = self.precision.dist, self.precision.device
        tokens = max(1, step_label_tokens(self.label_counts, self.order, step, self.layout))
        local = torch.zeros((), device=device)
        for k, batch in micro_batches(self.examples, self.order, self.collate, step, self.layout, dist):
            with micro_rng(f.seed, step, k, device):  # LoRA dropout, the same whichever rank runs it
                loss = lm_loss_sum(self.model, batch, self.precision, self.teacher, f.distill) / tokens
                self.precision.backward(loss)
            local += loss.detach()
        total = torch.tensor(dist.all_reduce_scalar(local.item()))
        check_finite(STAGE, step, {"lm_loss": total}, self.store, self.lr_setting)
        lr = self.scheduler.get_last_lr()[0]
        self.precision.step([self.optimizer], (self.params, 1.0))
        self.scheduler.step()
        return {"stage": STAGE, "step": step + 1, "total_steps": self.total, "lm_loss": total.item(),
                "loss": total.item(), "lr": lr, "tokens": tokens}

    def recovery(self) -> dict[str, Any]:
        """What the fine-tune trained, for the manifest and the report: the mode (every weight, or LoRA on
        which projections at which rank), the trained parameter count and the loss-carrying tokens of all its steps."""
        f = self.recipe.finetune
        mode = {"mode": "full"} if f.train == "full" else {
            "mode": "lora", "target_modules": list(f.lora.target_modules), "r": f.lora.r}
        return {**mode, "distill": describe_distill(f), "trained_params": sum(p.numel() for p in self.params),
                "tokens": sum(step_label_tokens(self.label_counts, self.order, step, self.layout)
                              for step in range(self.total))}

    def state_dict(self, step: int, fingerprint: str) -> dict[str, Any]:
        return {"step": step, "fingerprint": fingerprint, **trained_state(self.model, self.optimizer),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any] | None) -> int:
        state = shared_checkpoint(self.model, state, self.precision.dist)
        load_trained_state(self.model, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        return int(state["step"])


def _fingerprint(recipe: Recipe, sliced_dir: Path) -> str:
    """Inputs that define the trajectory: the recipe sections, the sliced model, the global batch."""
    manifest = (sliced_dir / MANIFEST).read_text() if (sliced_dir / MANIFEST).is_file() else ""
    micros = BatchLayout.of(recipe.finetune, recipe.hardware).micros
    return digest({"recipe": recipe.sections("finetune", "data", "prompt"), "sliced": manifest, "micros": micros})


def load_sliced(recipe: Recipe, sliced_dir: Path, dist: DistContext = SINGLE) -> tuple[nn.Module, Any, Precision]:
    """The sliced model at its exact pruned shapes (frozen, training mode) with its tokenizer, held as the
    recipe's precision says. A `pad` export trains without its padding (`load_exact`), so the padding stays
    zero and costs no compute; it comes back when the model is written. Under FSDP any other export is a
    placeholder model whose shards each rank reads (`training/sharded_load.py`)."""
    from transformers import AutoConfig, AutoTokenizer

    import compresso_ops.models.modeling_compresso  # noqa: F401  (registers the native export class)
    from compresso_ops.models.export import load_exact, read_manifest

    if not (sliced_dir / "config.json").is_file():
        raise UserError(f"{sliced_dir}: no sliced model; run the slice stage first")
    precision = choose_precision(recipe, dist, full=recipe.finetune.train == "full")
    if precision.shard_base and can_load_sharded(sliced_dir) and read_manifest(sliced_dir).get("mode") != "pad":
        # each rank reads only its rows (sharded_load.py); a pad export is cut to its exact shapes in memory
        model = placeholder_model(sliced_dir, AutoConfig.from_pretrained(sliced_dir), precision.base_dtype)
    else:
        model = load_exact(sliced_dir, precision.base_dtype)
    freeze_for_training(model, precision)
    return model, AutoTokenizer.from_pretrained(sliced_dir), precision


def run_finetune(recipe: Recipe, sliced_dir: str | Path, stage_dir: str | Path, *,
                 on_event: EventFn | None = None,
                 max_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune the sliced model in `sliced_dir`; write the merged result to `stage_dir/model`.

    `max_steps` stops after that many steps without writing the model, as a killed run would (tests). Under
    torchrun every rank calls this; rank 0 merges and writes the model and reports `on_event`, and every
    rank returns rank 0's result once the model is on disk.
    """
    dist = init_distributed()
    sliced_dir, stage_dir = Path(sliced_dir), Path(stage_dir)
    model, tokenizer, precision = load_sliced(recipe, sliced_dir, dist)
    max_positions = int(getattr(model.config, "max_position_embeddings", recipe.data.max_seq_length))
    examples = build_dataset(recipe.data, tokenizer, resolve_prompt(recipe.prompt, STAGE), max_positions)
    model = prepare_for_training(model, recipe.finetune, "finetune.lora.target_modules", precision)
    store = CheckpointStore(stage_dir)
    trainer = FinetuneTrainer(recipe, model, examples, Collator(pad_token_id(tokenizer)), precision, store)
    events = EventLog(stage_dir / "events.jsonl")
    complete = run_steps(trainer, store=store, events=events, fingerprint=_fingerprint(recipe, sliced_dir),
                         total=trainer.total, checkpoint_every=recipe.finetune.checkpoint_every,
                         on_event=on_event, max_steps=max_steps, dist=dist)
    if not complete:
        return {"completed": False}
    weights = weights_held(model, precision)
    trained = gather_weights(model)  # a collective when FSDP shards them
    result = None
    if dist.is_main:
        result = _export(recipe, trained, tokenizer, sliced_dir, stage_dir, trainer.total, trainer.recovery())
        result["weights"] = weights
    return dist.broadcast_object(result)  # also keeps the other ranks until the model is on disk


def _merged(recipe: Recipe, trained: dict[str, torch.Tensor], sliced_dir: Path) -> nn.Module:
    """The trained state in a fresh fp32 CPU copy of the sliced model, in the sliced folder's layout (a `pad`
    export is padded again here, with exact zeros): LoRA adapters are merged into it, or (train: full) the
    trained weights replace its own. The trained model may be sharded (FSDP) or half precision on a GPU with
    no room for an fp32 copy, and merging in fp32 rounds once, at save time."""
    from compresso_ops.models.export import load_exact, stored_layout

    model = load_exact(sliced_dir, torch.float32)
    if recipe.finetune.train == "full":
        model.requires_grad_(True)  # the parameters `trainable_state` collected
        load_trainable_state(model, trained)
        merged = model.eval()
    else:
        model = add_lora(model, recipe.finetune.lora, "finetune.lora.target_modules")
        load_trainable_state(model, trained)
        merged = model.merge_and_unload().eval()
    merged.requires_grad_(False)
    merged.config.use_cache = True
    return stored_layout(sliced_dir, merged)


def _export(recipe: Recipe, trained: dict[str, torch.Tensor], tokenizer: Any, sliced_dir: Path, stage_dir: Path,
            steps: int, recovery: dict[str, Any]) -> dict[str, Any]:
    """Merge what trained and save the model in the slice stage's export format (rank 0 only)."""
    from compresso_ops.models.export import save_export

    merged = _merged(recipe, trained, sliced_dir)
    manifest = json.loads((sliced_dir / MANIFEST).read_text())
    f = recipe.finetune
    manifest["finetune"] = {"steps": steps, "train": f.train, "lr": f.lr, "schedule": f.schedule,
                            "lora": f.lora.model_dump() if f.train == "lora" else None,
                            "prompt": resolve_prompt(recipe.prompt, STAGE), "recovery": recovery}
    manifest = save_export(merged, tokenizer, stage_dir / "model", manifest)
    return {"completed": True, "steps": steps, "manifest": manifest}


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The fine-tune stage: LoRA (or every weight) trained on `slice/model`, written to `finetune/model`."""
    if not recipe.finetune.enabled:
        return "disabled in the recipe"
    result = run_finetune(recipe, run_dir / "slice" / "model", run_dir / STAGE, on_event=on_event)
    return describe_weights(result["weights"])

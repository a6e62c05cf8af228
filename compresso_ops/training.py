"""Training plumbing shared by the prune and fine-tune stages.

- `load_source`: the source model and tokenizer, on CPU in fp32; on GPU the frozen base in the planner's
  compute dtype (bf16 where the GPU has it, else fp16), trainables in fp32 and autocast (fp16 adds a
  GradScaler). Under FSDP the model stays on CPU until `prepare_for_training` shards it onto the GPUs.
- `Precision.backward` / `Precision.step` are the one place that runs backward passes and optimizer
  steps; `step` sums gradients across data-parallel ranks before unscaling, clipping and stepping.
- `BatchLayout` / `micro_batches` / `micro_rng`: an optimizer step takes micro_batch_size *
  gradient_accumulation * (hardware.gpus_per_node * hardware.nodes) examples of the seeded stream, cut into
  global micro-batches dealt round-robin to the processes actually running. Each global micro-batch draws
  its randomness (gate noise, LoRA dropout) from a seed of (seed, step, micro index), so any number of
  processes follows the trajectory the recipe defines, the same one the planner counts steps for.
- `CheckpointStore`: one atomically replaced checkpoint holding everything a resumed run needs to continue
  the same trajectory: trainable tensors, optimizer / scheduler / scaler states, the step.
- `EventLog`: events.jsonl, one line per optimizer step, cut back to the checkpoint on resume.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import atomic
from .adapter import module_names, unwrap
from .data import IGNORE, Collator, DataOrder, Example
from .distributed import SINGLE, DistContext
from .errors import StageError, UserError
from .plan import compute_dtype, training_strategy
from .recipe import FinetuneSection, HardwareSection, LoraSection, PruneSection, Recipe
from .sharding import shard_frozen_base

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "last"
STATE_FILE = "state.pt"

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ----------------------------------------------------------------------------------------------- precision

@dataclass
class Precision:
    """How tensors are held and where the math runs."""

    device: torch.device
    base_dtype: torch.dtype
    scaler: torch.amp.GradScaler | None = None
    dist: DistContext = field(default_factory=lambda: SINGLE)
    shard_base: bool = False  # FSDP: each rank holds 1/world of the frozen weights (sharding.py)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.base_dtype if self.base_dtype in (torch.float16, torch.bfloat16) else None

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizers: list[torch.optim.Optimizer], clip: tuple[list[nn.Parameter], float] | None = None) -> None:
        """Sum gradients across ranks, unscale, clip `clip[0]` to norm `clip[1]`, step every optimizer, zero
        the gradients. Every rank then holds the same gradients, so the scaler finds the same inf/NaN and
        every rank takes the same step."""
        self.dist.all_reduce_grads_([p for opt in optimizers for g in opt.param_groups for p in g["params"]])
        if self.scaler is not None:
            for opt in optimizers:
                self.scaler.unscale_(opt)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
        for opt in optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


def choose_precision(recipe: Recipe, dist: DistContext = SINGLE) -> Precision:
    """CPU runs are fp32. On GPU the base is held in the planner's compute dtype (model.dtype; 'auto':
    bf16 where the GPU has it, fp16 elsewhere), falling back to fp16 on a GPU without native bf16 (V100);
    fp16 adds a GradScaler. The device is this rank's GPU (set by `init_distributed`). The base is sharded
    when several processes run and the plan chose FSDP."""
    shard = dist.active and training_strategy(recipe) == "fsdp"
    if recipe.hardware.gpu == "cpu" or not torch.cuda.is_available():
        return Precision(torch.device("cpu"), torch.float32, dist=dist, shard_base=shard)
    dtype = _DTYPES[compute_dtype(recipe)]
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        dtype = torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Precision(torch.device("cuda", torch.cuda.current_device()), dtype, scaler, dist, shard)


def load_source(recipe: Recipe, dist: DistContext = SINGLE) -> tuple[nn.Module, Any, Precision]:
    """The source model (frozen, training mode, no KV cache), its tokenizer, and the precision to use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = recipe.model
    kw = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    precision = choose_precision(recipe, dist)
    try:
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=precision.base_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(m.path, **kw)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.path: cannot load '{m.path}': {first}") from None
    freeze_for_training(model, precision)
    return model, tokenizer, precision


def freeze_for_training(model: nn.Module, precision: Precision) -> None:
    """Frozen, training mode, no KV cache; on the device unless FSDP will shard it there."""
    if not precision.shard_base:
        model.to(precision.device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()


def prepare_for_training(model: nn.Module, section: PruneSection | FinetuneSection, field: str,
                         precision: Precision) -> nn.Module:
    """Checkpointing as the section asks, seeded LoRA adapters (the same init on every rank and every run),
    and under FSDP the frozen base sharded across the ranks."""
    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    seed_all(section.seed)
    model = add_lora(model, section.lora, field)
    if precision.shard_base:
        shard_frozen_base(model, precision.device, precision.dist)
    return model


def add_lora(model: nn.Module, lora: LoraSection, field: str) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on `lora.target_modules` (checked to exist; `field` names the
    recipe field in the error). The base stays frozen; peft keeps adapters in fp32 over a half-precision base."""
    from peft import LoraConfig, get_peft_model

    names = module_names(model)
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise UserError(f"{field}: {', '.join(missing)} matches no module of the model; use q_proj, k_proj, "
                        "v_proj, o_proj, gate_proj, up_proj or down_proj")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing: gate values captured by hooks keep receiving gradients."""
    base = unwrap(model)
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name; the old one warns
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ------------------------------------------------------------------------------------------------- schedule

@dataclass(frozen=True)
class BatchLayout:
    """The examples of one optimizer step: `micros` global micro-batches of `micro_batch` examples.

    `micros` = gradient_accumulation * the recipe's world (gpus_per_node * nodes), as the planner counts
    it; the processes actually launched share them round-robin, so the global batch (and with it the step
    count, the LR schedule and the sparsity ramp) depends on the recipe alone.
    """

    micro_batch: int
    micros: int

    @classmethod
    def of(cls, section: PruneSection | FinetuneSection, hardware: HardwareSection) -> BatchLayout:
        return cls(section.micro_batch_size, section.gradient_accumulation * hardware.gpus_per_node * hardware.nodes)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.micros

    def steps_per_epoch(self, num_examples: int) -> int:
        return max(1, math.ceil(num_examples / self.global_batch))

    def indices(self, order: DataOrder, step: int, micro: int) -> list[int]:
        """Example indices of global micro-batch `micro` of optimizer step `step`."""
        return order.indices(step * self.global_batch + micro * self.micro_batch, self.micro_batch)


def to_steps(amount: float, unit: str, per_epoch: int) -> int:
    """A phase length in optimizer steps, counted as the planner counts it (partial epochs round up)."""
    return math.ceil(amount * per_epoch) if unit == "epochs" else int(amount)


def micro_batches(examples: list[Example], order: DataOrder, collate: Collator, step: int, layout: BatchLayout,
                  dist: DistContext = SINGLE) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """(global micro index, batch) for this rank's share of step `step`: micro-batch k goes to rank
    k % world_size."""
    return [(k, collate([examples[i] for i in layout.indices(order, step, k)]))
            for k in range(dist.rank, layout.micros, dist.world_size)]


def label_count(example: Example) -> int:
    """Tokens of `example` that carry a loss (the next-token shift drops position 0)."""
    return sum(1 for t in example.labels[1:] if t != IGNORE)


def step_label_tokens(counts: list[int], order: DataOrder, step: int, layout: BatchLayout) -> int:
    """Loss-carrying tokens of the whole global batch of `step` (`counts[i]` = label_count(examples[i])).
    Computed identically on every rank from the seeded order, so the loss normaliser needs no collective."""
    return sum(counts[i] for k in range(layout.micros) for i in layout.indices(order, step, k))


def _micro_seed(seed: int, step: int, micro: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def micro_rng(seed: int, step: int, micro: int, device: torch.device) -> Iterator[None]:
    """Seed torch's default generators for one global micro-batch (gate noise, LoRA dropout) and restore
    them afterwards: whichever rank runs micro-batch `micro` of `step`, it draws the same random numbers,
    and a resumed run needs no saved RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(_micro_seed(seed, step, micro))
        yield


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], precision: Precision) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens (divide by `step_label_tokens` of the whole
    global batch so accumulation and data parallelism equal one large batch)."""
    batch = {k: v.to(precision.device) for k, v in batch.items()}
    with precision.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
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


# ------------------------------------------------------------------------------------------ state and RNG

def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise StageError("checkpoint does not match the model's trainable parameters; delete the stage's "
                         "checkpoints folder to start over")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def seed_all(seed: int) -> None:
    """Seed python and torch (all devices) so adapter init repeats from run to run and rank to rank."""
    random.seed(seed)
    torch.manual_seed(seed)


class CheckpointStore:
    """`<stage_dir>/checkpoints/last/state.pt`, replaced atomically, so a crash leaves the previous one."""

    def __init__(self, stage_dir: str | Path) -> None:
        self.folder = Path(stage_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME

    def save(self, state: dict[str, Any]) -> None:
        with atomic.atomic_dir(self.folder) as tmp:
            torch.save(state, tmp / STATE_FILE)
            atomic.write_json(tmp / "meta.json", {"step": state.get("step"), "fingerprint": state.get("fingerprint")})

    def load(self, fingerprint: str) -> dict[str, Any] | None:
        """The saved state, or None when there is none or it belongs to different inputs."""
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state if state.get("fingerprint") == fingerprint else None

    def saved_step(self) -> int | None:
        meta = self.folder / "meta.json"
        return json.loads(meta.read_text())["step"] if meta.is_file() else None


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
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic.write_text(self.path, "".join(line + "\n" for line in keep))

    def reset(self) -> None:
        if self.path.is_file():
            self.path.unlink()


def check_finite(stage: str, step: int, values: dict[str, torch.Tensor], store: CheckpointStore) -> None:
    """Stop before a non-finite loss reaches the weights; the last good checkpoint stays on disk."""
    bad = [name for name, v in values.items() if not torch.isfinite(v).all()]
    if bad:
        saved = store.saved_step()
        kept = f"last good checkpoint (step {saved}) kept in {store.folder}" if saved is not None else "no checkpoint yet"
        raise StageError(f"{stage}: {bad[0]} became NaN/inf at step {step + 1}; {kept}; lower the learning rates "
                         "or use bfloat16 instead of float16")

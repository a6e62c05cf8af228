"""Training plumbing shared by the prune and fine-tune stages.

- `load_source`: the source model and tokenizer, on CPU in fp32; on GPU the frozen base in the recipe's
  dtype, trainables in fp32 and autocast (fp16 adds a GradScaler).
- `Precision.backward` / `Precision.step` are the one place that runs backward passes and optimizer
  steps, so data parallelism can later be added there (and micro-batches sharded by rank in
  `micro_batches`) without touching the stages.
- `CheckpointStore`: one atomically replaced checkpoint holding everything a resumed run needs to continue
  the same trajectory: trainable tensors, optimizer / scheduler / scaler states, RNG states, the step.
- `EventLog`: events.jsonl, one line per optimizer step, cut back to the checkpoint on resume.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import atomic
from .adapter import ModelAdapter, unwrap
from .data import IGNORE, Collator, DataOrder, Example
from .errors import StageError, UserError
from .recipe import LoraSection, Recipe

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
        """Unscale, clip `clip[0]` to norm `clip[1]`, step every optimizer, zero the gradients."""
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


def choose_precision(recipe: Recipe, config_dtype: Any) -> Precision:
    """CPU runs are fp32. On GPU the base uses model.dtype ('auto': the checkpoint's own dtype)."""
    if recipe.hardware.gpu == "cpu" or not torch.cuda.is_available():
        return Precision(torch.device("cpu"), torch.float32)
    name = recipe.model.dtype
    if name == "auto":
        name = str(config_dtype).replace("torch.", "") if config_dtype is not None else "float32"
    dtype = _DTYPES.get(name, torch.float32)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return Precision(torch.device("cuda"), dtype, scaler)


def load_source(recipe: Recipe) -> tuple[nn.Module, Any, Precision]:
    """The source model (frozen, training mode, no KV cache), its tokenizer, and the precision to use."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    m = recipe.model
    kw = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(m.path, **kw)
        precision = choose_precision(recipe, getattr(config, "dtype", None))
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=precision.base_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(m.path, **kw)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model.path: cannot load '{m.path}': {first}") from None
    model.to(precision.device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()
    return model, tokenizer, precision


def add_lora(model: nn.Module, lora: LoraSection, field: str) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on `lora.target_modules` (checked to exist; `field` names the
    recipe field in the error). The base stays frozen; peft keeps adapters in fp32 over a half-precision base."""
    from peft import LoraConfig, get_peft_model

    names = ModelAdapter(model).module_names()
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

def steps_per_epoch(num_examples: int, micro_batch: int, accumulation: int) -> int:
    return max(1, math.ceil(num_examples / (micro_batch * accumulation)))


def to_steps(amount: float, unit: str, per_epoch: int) -> int:
    """A phase length in optimizer steps, counted as the planner counts it (partial epochs round up)."""
    return math.ceil(amount * per_epoch) if unit == "epochs" else int(amount)


def micro_batches(examples: list[Example], order: DataOrder, collate: Collator, step: int, micro_batch: int,
                  accumulation: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of optimizer step `step`: consecutive slices of the seeded example stream."""
    start = step * micro_batch * accumulation
    return [collate([examples[i] for i in order.indices(start + k * micro_batch, micro_batch)])
            for k in range(accumulation)]


def label_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Tokens that carry a loss across all micro-batches of a step (the shift drops position 0)."""
    return int(sum((b["labels"][:, 1:] != IGNORE).sum().item() for b in batches))


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], precision: Precision) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens (divide by `label_tokens` of the whole step so
    gradient accumulation equals one large batch)."""
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
    """Seed python and torch (all devices) so adapter init and dropout repeat from run to run."""
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

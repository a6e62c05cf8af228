"""The recipe: one YAML file that describes a whole compression job.

Pydantic v2 models with `extra="forbid"` and a description on every field (the JSON Schema that editors use
is generated from them). Loading adds what a type cannot express: `extends:` inheritance, paths resolved
against the recipe's own folder, cross-field checks, and error lines of the form
`FILE:LINE: field.path: message` that point at the offending YAML line.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PrivateAttr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from compresso_ops.infra.fingerprint import digest
from compresso_ops.infra.units import parse_bytes

Dtype = Literal["float16", "bfloat16", "float32", "auto"]
Structure = Literal["heads", "ffn", "hidden", "attention_blocks", "ffn_blocks"]
StageName = Literal["prune", "finetune", "evaluate"]
GpuType = Literal["V100-16GB", "V100-32GB", "A100-40GB", "A100-80GB", "H100-80GB", "H200", "cpu"]
ExportMode = Literal["native", "uniform", "pad"]


class Strict(BaseModel):
    """Unknown keys, infinities and NaN (YAML's .inf, .nan: an infinite learning rate validates against `gt=0`),
    yes/no values given for numbers and NUL characters in text are errors, not silently taken."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_value(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads true/false/yes/no/on/off as booleans and pydantic would take them as 1 and 0:
        `multiple_of: true` would turn alignment off, `distill: {weight: yes}` would drop the LM loss.
        YAML's "\\0" is a NUL character, which no path the operating system opens can hold."""
        if isinstance(value, bool) and info.field_name and _takes_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"{str(value).lower()} is a yes/no value, not a number; write a number")
        if isinstance(value, str) and "\0" in value:
            raise ValueError("contains a NUL character (\\0), which no file name or recipe text may hold; remove it")
        return value


def _takes_number(annotation: Any) -> bool:
    """Whether a field's type accepts an int or a float but not a bool."""
    leaves = _leaf_types(annotation)
    return bool(leaves & {int, float}) and bool not in leaves


def _leaf_types(annotation: Any) -> set[Any]:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_leaf_types(arg) for arg in typing.get_args(annotation)))
    return {annotation}


# Upper bounds on values that size memory or time: far above any real job, low enough that a typo or a
# hostile recipe fails validation instead of exhausting the machine.
MAX_BATCH = 65_536
MAX_SEQ_LENGTH = 1 << 20
MAX_STEPS = 10_000_000
MAX_EPOCHS = 10_000
MAX_NAME_LENGTH = 128
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def _check_duration(amount: float, unit: str, field: str) -> None:
    """A training length is bounded in its unit (epochs multiply by the dataset's steps per epoch)."""
    limit = MAX_EPOCHS if unit == "epochs" else MAX_STEPS
    if amount > limit:
        raise ValueError(f"{field} {amount:g} {unit} is above the limit of {limit:,} {unit}; lower it")


def check_run_name(name: str) -> str:
    """A run name becomes the folder runs/<name>: one plain path component, never a way out of runs/."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"'{name[:40]}' is not a folder name; use letters, digits, '-', '_' or '.' without '/'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("contains control characters; use letters, digits, '-', '_' or '.'")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"'{name[:20]}...' is {len(name):,} characters long; use at most {MAX_NAME_LENGTH}")
    return name


def micro_batch_problem(micro_batch_size: int, num_examples: int) -> str | None:
    """Why a micro-batch cannot be drawn from a dataset (a larger one only repeats examples in memory)."""
    if micro_batch_size > num_examples:
        return (f"{micro_batch_size:,} is larger than the dataset's {num_examples:,} examples; "
                f"use at most {num_examples:,}")
    return None


def _whole(value: float) -> float | int:
    """A duration that is a whole number is written as one (`10`, not `10.0`, in recipe.resolved.yaml)."""
    return int(value) if float(value).is_integer() else value


def _check_whole_steps(unit: str, **amounts: float) -> None:
    if unit == "steps":
        for name, amount in amounts.items():
            if not float(amount).is_integer():
                raise ValueError(f"{name} is {amount} but the unit is steps; give a whole number of steps")


PARAM_COUNT_PATTERN = r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBtT]?)\s*$"
_SIZE = re.compile(PARAM_COUNT_PATTERN)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_param_count(value: Any) -> int:
    """Accept 5.4B, 500M, 120k or a plain integer."""
    if isinstance(value, bool):
        # pydantic turns a ValueError into a located recipe error; a TypeError would escape as a traceback
        raise ValueError("expected a parameter count such as 5.4B, 500M or 6738415616")  # noqa: TRY004
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a parameter count; write it as 5.4B, 500M or an integer")
    return round(float(match.group(1)) * _SCALE[match.group(2).lower()])


class ModelSection(Strict):
    path: str = Field(description="Local model folder (Hugging Face layout) or a hub id such as huggyllama/llama-7b.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    dtype: Dtype = Field(default="auto", description="dtype the frozen base is held in on GPU; CPU runs use float32.")
    trust_remote_code: bool = Field(default=False, description="Allow custom modeling code from the model folder.")
    architecture: str | None = Field(
        default=None,
        description="Built-in architecture preset (llama-7b, llama-13b, llama-2-7b, llama-2-13b, llama-2-70b, "
        "llama-3-8b, llama-3.1-8b, llama-3.2-1b, llama-3.2-3b, mistral-7b, mistral-7b-v0.3, qwen2.5-7b, qwen3-8b) "
        "used for planning when the model's config.json is not on disk.",
    )


class TargetSection(Strict):
    sparsity: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Fraction of the prunable parameters (attention and FFN projections) to remove: the paper's definition.",
    )
    params: int | None = Field(
        default=None, gt=0,
        description="Total parameters after pruning, e.g. 5.4B, 500M or an integer.",
        # The loader parses "5.4B" before validating; the schema editors see must accept what it accepts.
        json_schema_extra=lambda schema: schema.update(anyOf=[
            {"type": "integer", "exclusiveMinimum": 0},
            {"type": "string", "pattern": PARAM_COUNT_PATTERN},
            {"type": "null"},
        ]),
    )
    structures: list[Structure] = Field(
        default_factory=lambda: ["heads", "ffn", "hidden"],
        description="What may be pruned: heads, ffn (channels), hidden (dims), and optionally whole "
        "attention_blocks / ffn_blocks.",
    )

    multiple_of: int | None = Field(
        default=None, ge=1,
        description="Keep FFN channels (per layer) and hidden dims in multiples of this (a dimension may also keep "
        "its whole width; heads are whole units already): fp16 tensor-core GEMMs want multiples of 8 and run "
        "best at 64 or 128, llama.cpp's quantizers need blocks of 32 (q8_0) or 256 (k-quants). The final masks "
        "meet the target within one aligned unit. Default (null): 64 for a dimension of at least 1,024 "
        "(7B-class widths: hidden 4096, FFN 11008 = 172 x 64), none below, where a 64-wide unit is a large share "
        "of a tiny model's dimension and would move it far from its target; 1 turns alignment off. An explicit unit "
        "must be below the width of each pruned dimension.",
    )

    @field_validator("params", mode="before")
    @classmethod
    def _parse_params(cls, v: Any) -> Any:
        return None if v is None else parse_param_count(v)

    @field_validator("structures")
    @classmethod
    def _some_structures_once(cls, v: list[str]) -> list[str]:
        """Checked on the field, so the error points at its line, or at the --set that gave it."""
        if not v:
            raise ValueError("empty; list at least one of heads, ffn, hidden")
        if len(set(v)) != len(v):
            raise ValueError("lists a structure twice")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetSection:
        if (self.sparsity is None) == (self.params is None):
            raise ValueError("give exactly one of target.sparsity or target.params")
        return self


class PromptSection(Strict):
    text: str = Field(
        default="collaborative",
        description="'collaborative' (the project's collaborative prompt), 'none', or literal prompt text.",
    )
    use_in: list[StageName] = Field(
        default_factory=lambda: ["prune", "finetune", "evaluate"],
        description="Stages whose inputs start with the prompt.",
    )
    eval_text: str | None = Field(
        default=None,
        description="Prompt used at evaluation instead of `text`; 'collaborative' gives the past-tense variant "
        "('you have been pruned'). Default: the evaluation variant of `text`.",
    )


class DataSection(Strict):
    path: Path | None = Field(default=None, description="Training data file (relative to the recipe's folder).")
    format: Literal["alpaca", "text"] = Field(
        default="alpaca",
        description="alpaca: JSON or JSONL rows with instruction/input/output; text: plain text chunked to max_seq_length.",
    )
    max_seq_length: int = Field(default=512, ge=8, le=MAX_SEQ_LENGTH, description="Tokens per training example (longer ones are cut).")
    max_samples: int | None = Field(default=None, gt=0, description="Use at most this many examples.")
    validation_path: Path | None = Field(
        default=None, description="Read by no stage (older recipes set it; validate warns): held-out text is "
                                  "scored by eval.perplexity.path.")
    num_examples: int | None = Field(
        default=None, gt=0, le=10**12,
        description="Rows in the data file, for planning steps and time before the file is on disk.")


class LoraSection(Strict):
    r: int = Field(default=8, ge=1, le=MAX_BATCH, description="LoRA rank.")
    alpha: float = Field(default=8.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
        description="Projections that get LoRA adapters (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).",
    )


TRAIN_DESCRIPTION = (
    "What trains besides the gates: lora (adapters on a frozen base; the reference method) or full (every "
    "weight, fp32 master weights under fp16/bf16 autocast; more memory, better recovery)."
)


class PruneLearningRates(Strict):
    lora: float = Field(
        default=5e-5, gt=0,
        description="Learning rate of the trained weights while pruning: the LoRA adapters, or every weight "
                    "with prune.train: full.")
    gates: PositiveFloat | Literal["auto"] = Field(
        default="auto",
        description="Learning rate of the gates' log_alpha. auto: the paper's 0.1, raised for ramps shorter than "
                    "150 steps so the gates can follow the target (15 / ramp steps; docs/method.md §5).")
    lagrangian: PositiveFloat | Literal["auto"] = Field(
        default="auto",
        description="Learning rate of the Lagrange multipliers (applied as gradient ascent). auto: the paper's "
                    "0.1, raised for ramps shorter than 250 steps (25 / ramp steps).")


class PruneSchedule(Strict):
    unit: Literal["epochs", "steps"] = Field(default="epochs", description="Unit of the three phases.")
    lora_only: float = Field(default=1, ge=0, description="Phase 1: LoRA only, gates frozen.")
    ramp: float = Field(default=4, gt=0, description="Phase 2: target sparsity ramps linearly from 0 to the target.")
    hold: float = Field(default=3, ge=0, description="Phase 3: training continues at the target.")

    @model_validator(mode="after")
    def _bounded(self) -> PruneSchedule:
        _check_duration(self.lora_only + self.ramp + self.hold, self.unit, "lora_only + ramp + hold =")
        _check_whole_steps(self.unit, lora_only=self.lora_only, ramp=self.ramp, hold=self.hold)
        return self

    @field_serializer("lora_only", "ramp", "hold")
    def _write_whole(self, value: float) -> float | int:
        return _whole(value)


GROUP_BY_LENGTH_HELP = (
    "Length-grouped micro-batches (the idea of transformers' group_by_length): megabatches of up to 50 "
    "micro-batches are sorted by length, so a micro-batch pads little, and their micro-batches are dealt in a "
    "seeded random order, so an optimizer step still mixes long and short examples. On by default: every example "
    "is still seen once per epoch, the loss stays normalised by the step's response tokens, runs stay "
    "deterministic, resumable and equal across processes, and padding falls (benchmarks/throughput.py, Alpaca "
    "rows, micro-batches of 4: 18% of the positions ungrouped, 1% grouped). Applies to data.format alpaca; "
    "text chunks have one length."
)


class DistillSection(Strict):
    """Knowledge distillation from the source model (docs/method.md §11)."""

    weight: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of the loss that is the KL divergence from the source model's next-token distribution "
                    "on the response tokens (the rest is the LM loss); 0 turns distillation off. The source is "
                    "the teacher: in a LoRA prune stage it is the same weights with the adapters and gates off "
                    "(no extra memory), otherwise a frozen copy in the compute dtype (planned). 0.5 recovered "
                    "more than the LM loss alone at equal steps in benchmarks/quality.py.")
    temperature: float = Field(default=1.0, gt=0.0, le=20.0,
                               description="Softmax temperature of both distributions in the KL term (scaled by T^2).")
    hidden_states_weight: float = Field(
        default=0.0, ge=0.0, le=100.0,
        description="Weight of a second distillation term added to the loss: the residual stream after every "
                    "decoder layer but the last, matched to the source's at the same positions (each labelled "
                    "position's squared distance relative to the source's squared norm there, averaged over the "
                    "layers). 0 turns it off. Needs weight > 0 and the hidden size kept (no 'hidden' in "
                    "target.structures); training forwards whole rows (no shared prompt prefix). On stories260K "
                    "2 to 4, with a higher finetune.lr (2e-3 to 2.5e-3 for that 260K-parameter model), recovered "
                    "most (benchmarks/quality_levers.py).")

    @field_validator("hidden_states_weight")
    @classmethod
    def _needs_teacher(cls, value: float, info: ValidationInfo) -> float:
        if value and info.data.get("weight") == 0:  # weight validates first (field order); absent if it failed
            raise ValueError("needs the teacher: set distill.weight above 0 (0.5 is a good start), or this to 0")
        return value


class TrainingSection(Strict):
    """What the prune and the fine-tune stage share: what trains, how batches are laid out, seeds, checkpoints."""

    train: Literal["lora", "full"] = Field(default="lora", description=TRAIN_DESCRIPTION)
    micro_batch_size: int = Field(default=4, ge=1, le=MAX_BATCH, description="Examples per forward pass per GPU.")
    gradient_accumulation: int = Field(default=8, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    seed: int = Field(default=42, ge=0, le=MAX_SEED, description="Seed of data shuffling.")
    group_by_length: bool = Field(default=True, description=GROUP_BY_LENGTH_HELP)
    checkpoint_every: int = Field(default=200, ge=1, description="Optimizer steps between checkpoints.")
    distill: DistillSection = Field(default_factory=DistillSection,
                                    description="Distillation from the source model (off by default).")


class PruneSection(TrainingSection):
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapters trained while pruning.")
    lr: PruneLearningRates = Field(default_factory=PruneLearningRates, description="Learning rates of the three optimizers.")
    schedule: PruneSchedule = Field(default_factory=PruneSchedule, description="LoRA-only, ramp and hold phases.")
    seed: int = Field(default=42, ge=0, le=MAX_SEED, description="Seed of data shuffling, gate init and gate sampling.")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient norm of the trained weights; null disables.")
    calibration_examples: int = Field(
        default=64, ge=1, le=MAX_BATCH,
        description="method activation: how many of the first training examples (with the prune stage's prompt) "
                    "its calibration forward reads, in micro-batches of micro_batch_size; the data must hold "
                    "at least this many.")
    one_shot_allocation: Literal["global", "uniform"] = Field(
        default="global",
        description="How a one-shot method (magnitude, random, activation) spreads the cut over the layers. "
                    "global: one ranking across all layers, so layers lose different amounts. uniform: FFN channels "
                    "ranked within each layer, every layer cut to the same width, heads kept unless the target "
                    "forces fewer. With activation on stories260K (benchmarks/results/quality.md, Other levers) uniform "
                    "recovered to perplexity 7.74 against global's 8.03 at sparsity 0.35, and 6.43 against 6.40 at "
                    "0.20. Compresso's gates choose their own allocation.")


class FinetuneSection(TrainingSection):
    enabled: bool = Field(default=True, description="Fine-tune the sliced model to recover quality.")
    unit: Literal["epochs", "steps"] = Field(default="epochs", description="Unit of `duration`.")
    duration: float = Field(default=3, gt=0, description="How long to fine-tune, in `unit`.")
    lr: float = Field(default=4e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapters of the fine-tune.")

    @model_validator(mode="after")
    def _bounded(self) -> FinetuneSection:
        _check_duration(self.duration, self.unit, "duration")
        _check_whole_steps(self.unit, duration=self.duration)
        return self

    @field_serializer("duration")
    def _write_whole(self, value: float) -> float | int:
        return _whole(value)


class LocalTask(Strict):
    name: str = Field(description="Task name used in results and the report.")
    data: Path = Field(description="JSON/JSONL data file (relative to the recipe's folder).")
    format: Literal["piqa", "arc", "openbookqa", "copa", "multiple_choice"] = Field(
        description="Built-in task definition for the file's schema (the Hugging Face schema of that dataset); "
        "multiple_choice reads rows {question, choices: [...], answer: index}.",
    )
    group: Literal["commonsense", "reading", "knowledge"] | None = Field(
        default=None, description="Report group this task averages into.")


class PerplexitySection(Strict):
    path: Path = Field(description="Plain text file for perplexity (relative to the recipe's folder).")
    window: int = Field(default=512, ge=8, le=MAX_SEQ_LENGTH, description="Tokens per sliding window.")
    stride: int = Field(
        default=256, ge=1,
        description="Tokens the window advances; only new tokens are scored. Equal to window: non-overlapping windows.")
    max_tokens: int | None = Field(default=None, gt=0, description="Score at most this many tokens.")

    @model_validator(mode="after")
    def _stride_within_window(self) -> PerplexitySection:
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) is larger than window ({self.window}): the tokens between "
                             "windows would never be scored; use a stride of at most the window")
        return self


class SpeedSection(Strict):
    enabled: bool = Field(default=True, description="Measure prefill and decode speed and peak memory.")
    batch_size: int = Field(default=1, ge=1, le=MAX_BATCH, description="Sequences per batch.")
    prompt_length: int = Field(default=128, ge=1, le=MAX_SEQ_LENGTH, description="Prompt tokens for prefill.")
    new_tokens: int = Field(default=64, ge=1, le=MAX_SEQ_LENGTH, description="Tokens decoded with the KV cache.")
    repeats: int = Field(default=3, ge=1, le=1000, description="Timed repetitions (the median is reported).")


class EvalSection(Strict):
    tasks: list[str] = Field(
        default_factory=list,
        description="Stock lm-eval task names (need network or HF cache); validate checks them against lm-eval.")
    local_tasks: list[LocalTask] = Field(default_factory=list, description="Tasks built from local data files (offline).")
    num_fewshot: int = Field(default=0, ge=0, le=1000, description="Few-shot examples per task.")
    limit: int | None = Field(default=None, gt=0, description="Evaluate at most this many examples per task.")
    batch_size: int | str = Field(
        default=8,
        description="lm-eval batch size: a positive integer, or lm-eval's 'auto' (the largest batch that fits) "
        "or 'auto:N' (re-detected N times as requests get shorter).")
    max_length: int | None = Field(default=None, gt=0, le=MAX_SEQ_LENGTH,
                                   description="Context length given to lm-eval (default: the model's).")
    perplexity: PerplexitySection | None = Field(default=None, description="Sliding-window perplexity on a text file.")
    speed: SpeedSection = Field(default_factory=SpeedSection, description="Speed and memory measurement.")
    compare_source: bool = Field(default=True, description="Evaluate the source model too (cached across runs).")


    @field_validator("batch_size")
    @classmethod
    def _lm_eval_batch_size(cls, v: int | str) -> int | str:
        if isinstance(v, int) and 1 <= v <= MAX_BATCH or isinstance(v, str) and _AUTO_BATCH.match(v):
            return v
        raise ValueError(f"batch_size {v!r} is not an integer from 1 to {MAX_BATCH:,}, 'auto' or 'auto:N' (e.g. auto:4)")

    @property
    def fixed_batch_size(self) -> int | None:
        """The batch size when the recipe fixes one; None for lm-eval's 'auto' detection."""
        return self.batch_size if isinstance(self.batch_size, int) else None


_AUTO_BATCH = re.compile(r"^auto(:[1-9][0-9]*)?$")


class ExportSection(Strict):
    mode: ExportMode = Field(
        default="native",
        description="native: per-layer counts, smallest; uniform: same counts per layer, stock class; "
        "pad: stock class zero-padded to the largest layer.",
    )
    dtype: Dtype = Field(default="auto", description="dtype of the saved weights ('auto': the model's dtype).")
    max_shard_size: str = Field(default="5GB", description="Shard safetensors above this size.")


class Requirements(Strict):
    """Release thresholds: the report's verdict is PASS when every one given holds (and the export checks
    passed), FAIL otherwise; `compresso-ops report --check` exits 3 on FAIL."""

    retention: float | None = Field(
        default=None, gt=0, description="Least mean retention over the evaluated tasks (pruned / source), e.g. 0.95.")
    ppl_ratio: float | None = Field(
        default=None, gt=0, description="Largest perplexity ratio (pruned / source), e.g. 1.2.")
    decode_speedup: float | None = Field(
        default=None, gt=0, description="Least decode speed-up (pruned / source tokens per second), e.g. 1.1.")
    memory_ratio: float | None = Field(
        default=None, gt=0, description="Largest deployed-memory ratio (pruned / source), e.g. 0.85.")
    sparsity: float | None = Field(
        default=None, ge=0, lt=1, description="Least prunable sparsity the final model must reach, e.g. 0.2.")


class ReportSection(Strict):
    require: Requirements = Field(default_factory=Requirements, description="Thresholds that decide PASS/FAIL.")


class HardwareSection(Strict):
    gpu: GpuType = Field(default="cpu", description="GPU type the job runs on.")
    gpus_per_node: int = Field(default=1, ge=1, le=64, description="GPUs (processes) per node.")
    nodes: int = Field(default=1, ge=1, le=100_000, description="Nodes; multi-node runs are started with torchrun.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="ddp: every GPU holds the whole frozen model; fsdp: the frozen base is sharded across GPUs "
                    "(LoRA, gates and multipliers stay replicated); auto: ddp unless only fsdp lets pruning fit.")
    host_memory: int | None = Field(
        default=None, gt=0,
        description="RAM of one node, e.g. 512GB, 768GiB or bytes; plan and preflight check the host peaks "
                    "against it (default: this machine's MemTotal).")

    @field_validator("host_memory", mode="before")
    @classmethod
    def _parse_host_memory(cls, v: Any) -> Any:
        return None if v is None else parse_bytes(v)

    @property
    def world_size(self) -> int:
        """Processes of the whole job: one per GPU on every node."""
        return self.gpus_per_node * self.nodes

    @model_validator(mode="after")
    def _fsdp_needs_gpus(self) -> HardwareSection:
        if self.strategy == "fsdp" and self.world_size == 1:
            raise ValueError("strategy fsdp shards the frozen base across GPUs but the recipe has one; "
                             "use auto or ddp, or raise gpus_per_node")
        return self


class Recipe(Strict):
    name: str = Field(
        default="recipe", description="Name of the job (default: the recipe file's name); the run folder is runs/<name>.")
    description: str | None = Field(default=None, description="Free text for humans.")
    method: Literal["compresso", "magnitude", "random", "activation"] = Field(
        default="compresso",
        description="compresso: training-based pruning; magnitude: one-shot L2-norm ranking; random: a floor; "
                    "activation: one-shot ranking by what each KV group and FFN channel adds to the residual stream "
                    "on calibration text (one forward of the source over prune.calibration_examples training "
                    "examples).",
    )
    model: ModelSection = Field(description="The source model.")
    target: TargetSection = Field(description="The size to reach.")
    prompt: PromptSection = Field(default_factory=PromptSection, description="The collaborative prompt.")
    data: DataSection = Field(default_factory=DataSection, description="Training data.")
    prune: PruneSection = Field(default_factory=PruneSection, description="The pruning run.")
    finetune: FinetuneSection = Field(default_factory=FinetuneSection, description="Post-pruning LoRA fine-tune.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Evaluation suite.")
    export: ExportSection = Field(default_factory=ExportSection, description="Checkpoint format.")
    hardware: HardwareSection = Field(default_factory=HardwareSection, description="Where the job runs.")
    report: ReportSection = Field(default_factory=ReportSection, description="The release review's verdict.")
    run_dir: Path | None = Field(default=None, description="Run folder (default runs/<name>, relative to the working directory).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_run_name(v)

    # Set by the loader, not by users: where the recipe came from and where each field was written, so
    # checks that run after validation still point at a file and line.
    _source_file: Path | None = PrivateAttr(default=None)
    _locations: dict[tuple[str | int, ...], tuple[str, int]] = PrivateAttr(default_factory=dict)
    _overrides: tuple[str, ...] = PrivateAttr(default=())
    _warnings: tuple[str, ...] = PrivateAttr(default=())

    @property
    def source_file(self) -> Path | None:
        return self._source_file

    @property
    def warnings(self) -> tuple[str, ...]:
        """`FILE:LINE: field: warning: ...` lines for settings that are valid but predictably poor."""
        return self._warnings

    @property
    def overrides(self) -> tuple[str, ...]:
        """The `--set key.path=value` items applied on top of the file, in order."""
        return self._overrides

    def location(self, *path: str | int) -> tuple[str, int]:
        """(file, line) of the deepest part of `path` that was written in a recipe file."""
        for end in range(len(path), -1, -1):
            if path[:end] in self._locations:
                return self._locations[path[:end]]
        return (str(self._source_file or "<recipe>"), 1)

    @property
    def prune_reads_data(self) -> bool:
        """Whether the prune stage reads the training data: Compresso trains on it, activation calibrates on it
        (magnitude and random read only the weights)."""
        return self.method in ("compresso", "activation")

    def resolved_run_dir(self) -> Path:
        return self.run_dir if self.run_dir is not None else Path("runs") / self.name

    def sections(self, *names: str) -> dict[str, Any]:
        """The named top-level sections as JSON values: the recipe part of an input fingerprint."""
        data = self.model_dump(mode="json")
        return {name: data.get(name) for name in names}

    def recipe_hash(self) -> str:
        """Identifies the whole resolved recipe (manifests and reports quote it)."""
        return digest(self.model_dump(mode="json"))



def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema editors validate recipes with; it accepts exactly what the loader accepts before its
    own cross-field checks.

    A recipe with `extends:` is deep-merged over its parent, so it may leave out required fields (a
    child that only sets `target` has no `model`). The required lists of merged sections therefore apply
    only when `extends` is absent: they move from the definitions into one `if`/`then` at the top.
    """
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "compresso-ops recipe"
    schema.setdefault("properties", {})["extends"] = {
        "type": "string", "description": "Another recipe (relative path) whose fields this one overrides."}
    merged: set[str] = set()
    schema["then"] = _merged_required(schema, schema.get("$defs", {}), merged)
    schema["if"] = {"not": {"required": ["extends"]}}
    for node in [schema, *(schema["$defs"][name] for name in merged)]:
        node.pop("required", None)
    return schema


def _merged_required(node: dict[str, Any], defs: dict[str, Any], merged: set[str]) -> dict[str, Any]:
    """A schema holding only the `required` lists of `node` and of the mappings `extends:` deep-merges into
    (sections reached through properties; lists are replaced whole, so their items keep theirs). Adds the
    names of those definitions to `merged`."""
    out: dict[str, Any] = {"required": node["required"]} if node.get("required") else {}
    properties: dict[str, Any] = {}
    for name, prop in node.get("properties", {}).items():
        for ref in [prop.get("$ref")] + [alt.get("$ref") for alt in prop.get("anyOf", [])]:
            if ref and ref.startswith("#/$defs/"):
                merged.add(ref.removeprefix("#/$defs/"))
                if sub := _merged_required(defs[ref.removeprefix("#/$defs/")], defs, merged):
                    properties[name] = sub
    if properties:
        out["properties"] = properties
    return out

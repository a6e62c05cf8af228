"""The dry-run planner: sizes, trainable parameters, GPU memory and steps, before any GPU time is spent.

Pure arithmetic on the architecture (a local config.json or a built-in preset) and, when the training file
is local, its row count. No weights, no network, no GPU. Every assumption (throughput, efficiency, the
activation model) is written into the plan so a reader can judge the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresso_ops.evaluation.tasks import longest_request_tokens
from compresso_ops.infra import atomic
from compresso_ops.infra.units import human_bytes
from compresso_ops.method.prompts import resolve_prompt
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.resolve import locate_model, resolve_arch
from compresso_ops.models.sizes import (
    Alignment,
    Kept,
    aligned_counts,
    attention_params,
    count_params,
    ffn_params,
    gate_params,
    lora_params,
    target_sparsity,
)
from compresso_ops.recipe.schema import Recipe
from compresso_ops.training.data import read_rows
from compresso_ops.ui.progress import EventFn

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    memory_bytes: int  # what nvidia-smi reports as total
    tflops: float  # dense fp16/bf16 tensor-core peak
    bf16: bool


GPUS: dict[str, Gpu] = {
    "V100-16GB": Gpu(16160 * 2**20, 125.0, False),
    "V100-32GB": Gpu(32510 * 2**20, 125.0, False),
    "A100-40GB": Gpu(40536 * 2**20, 312.0, True),
    "A100-80GB": Gpu(81251 * 2**20, 312.0, True),
    "H100-80GB": Gpu(81559 * 2**20, 989.0, True),
    "H200": Gpu(143771 * 2**20, 989.0, True),
    "cpu": Gpu(24 * GIB, 0.05, True),  # a laptop-class CPU: about 50 GFLOP/s sustained in fp32
}

# Model FLOPs utilisation assumed for the wall-time estimate (LoRA training of 7B-class models on GPUs
# reaches 30-45%; we take the low end so estimates err long).
MFU = 0.30
# CUDA context, cuBLAS workspaces and allocator fragmentation: a fixed part plus a share of the rest.
CUDA_OVERHEAD_BYTES = int(1.0 * GIB)
FRAGMENTATION = 0.10
DEPLOY_BATCH = 1
# Bytes per trainable parameter: fp32 weight + fp32 grad + two fp32 AdamW moments.
BYTES_PER_TRAINABLE = 16
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def compute_dtype(recipe: Recipe) -> str:
    """dtype of the frozen base: the recipe's on GPU ('auto' = fp16 on V100, bf16 elsewhere), fp32 on CPU."""
    if recipe.hardware.gpu == "cpu":
        return "float32"
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    return "bfloat16" if GPUS[recipe.hardware.gpu].bf16 else "float16"


def export_dtype(recipe: Recipe) -> str:
    """dtype of the saved checkpoint: the recipe's, or ('auto') the dtype the base was held in."""
    return compute_dtype(recipe) if recipe.export.dtype == "auto" else recipe.export.dtype


# --------------------------------------------------------------------------- sizes


def uniform_kept(arch: ArchSpec, sparsity: float, multiple_of: int | None = None) -> Kept:
    """Per-layer counts for the `uniform` export at the planner's split: attention and FFN lose the same
    fraction, hidden dims are kept, and the FFN count absorbs rounding so the total meets the target, to the
    nearest count `target.multiple_of` allows (`Alignment`)."""
    layer_full = attention_params(arch, arch.num_kv_heads, arch.hidden_size) + ffn_params(
        arch, arch.intermediate_size, arch.hidden_size)
    budget = (1.0 - sparsity) * layer_full
    groups = max(1, round(arch.num_kv_heads * (1.0 - sparsity)))
    per_channel = ffn_params(arch, 1, arch.hidden_size)
    wanted = (budget - attention_params(arch, groups, arch.hidden_size)) / per_channel
    unit = Alignment.of(arch, multiple_of).ffn
    channels = min([0, *aligned_counts(unit, arch.intermediate_size)], key=lambda n: abs(n - wanted))
    return Kept((groups,) * arch.num_layers, (channels,) * arch.num_layers, arch.hidden_size)


def _params(recipe: Recipe, arch: ArchSpec, sparsity: float) -> dict[str, Any]:
    src = count_params(arch)
    target_prunable = round((1.0 - sparsity) * src.prunable)
    target_total = recipe.target.params if recipe.target.params is not None else (
        target_prunable + src.embeddings + src.norms)
    nbytes = DTYPE_BYTES[export_dtype(recipe)]
    align = Alignment.of(arch, recipe.target.multiple_of)
    uniform = count_params(arch, uniform_kept(arch, sparsity, recipe.target.multiple_of), "uniform").total
    full_structures = count_params(arch, Kept.full(arch), "pad").total
    export = {
        "native": {"params": target_total, "exact": False,
                   "note": f"meets the target within one structure ({align.ffn} FFN channels, a KV group); exact "
                           f"counts are known after pruning"},
        "uniform": {"params": uniform, "exact": True,
                    "note": "same heads and FFN channels in every layer, at the planner's attention/FFN split"},
        "pad": {"params": full_structures, "exact": False,
                "note": "upper bound: every layer padded to the largest layer's counts"},
    }
    for entry in export.values():
        entry["checkpoint_bytes"] = entry["params"] * nbytes
    return {
        "source": src.as_dict(),
        "target": {"total": target_total, "prunable": target_prunable, "prunable_sparsity": sparsity,
                   "total_sparsity": 1.0 - target_total / src.total},
        "export": export,
        "export_dtype": export_dtype(recipe),
        "alignment": align.as_dict(),
    }


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Training:
    """What a training stage trains, which decides what its forward keeps for backward."""
    lora_modules: tuple[str, ...] = ()  # projections with LoRA adapters
    lora_r: int = 0
    lora_dropout: float = 0.0
    full: bool = False  # every weight trains (then there are no adapters)
    gates: tuple[str, ...] = ()  # target.structures the hooks multiply by (prune only)

    def trains(self, *modules: str) -> bool:
        return self.full or any(m in self.lora_modules for m in modules)


ATTENTION_INPUT = ("q_proj", "k_proj", "v_proj")
FFN_INPUT = ("gate_proj", "up_proj")
FP32 = 4


def activation_bytes_per_token_layer(arch: ArchSpec, dtype_bytes: int, scale: float = 1.0,
                                     training: Training = Training()) -> float:
    """Bytes one decoder layer keeps for backward, per token, under SDPA/flash attention.

    Counted from the saved tensors of the stock LLaMA forward (benchmarks/plan_memory.py measures them). A frozen
    projection keeps nothing (its input is needed only for its own weight's gradient); a trained one (LoRA
    or full) keeps its input, LoRA also its rank-r output, and with dropout the dropped input and its mask.
    Each gate multiply keeps the tensor it scales. The terms:
    - each RMSNorm: its fp32 input and the per-token rsqrt (8 d + 8 bytes for the two);
    - attention: SDPA keeps q, k, v, its output and the fp32 log-sum-exp per head. K and V are counted
      expanded to all H heads: CUDA's SDPA runs GQA unexpanded only when the batch has no padding mask;
    - the head gate keeps the attention output (SDPA's own, no extra); a trained o_proj keeps the gated copy;
    - the hidden gate (and a block gate) keeps the o_proj and down_proj outputs (d each);
    - FFN: SiLU keeps the gate_proj output, the product keeps the SiLU and up_proj outputs (3 f); the FFN gate
      keeps the product (f), a trained down_proj its (gated) input (f).
    `scale` shrinks the dims for a pruned model.
    """
    d, hh, f = arch.hidden_size * scale, arch.num_heads * arch.head_dim * scale, arch.intermediate_size * scale
    heads = arch.num_heads * scale
    t, gates = training, set(training.gates)
    values = 4 * hh  # q, k and v expanded, the attention output
    values += d * t.trains(*ATTENTION_INPUT) + d * t.trains(*FFN_INPUT)  # normed inputs of trained projections
    values += hh * (t.trains("o_proj") and "heads" in gates)
    values += d * ("hidden" in gates) * 2 + d * ("attention_blocks" in gates) + d * ("ffn_blocks" in gates)
    values += 3 * f + f * ("ffn" in gates) + f * t.trains("down_proj")
    inputs = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": hh, "gate_proj": d, "up_proj": d, "down_proj": f}
    lora = [m for m in t.lora_modules if m in inputs] if not t.full else []
    values += t.lora_r * scale * len(lora)
    dropped = sum(inputs[m] for m in lora) if t.lora_dropout > 0 else 0.0
    norms = 2 * (arch.hidden_size * scale + 1) * FP32
    return norms + heads * FP32 + values * dtype_bytes + dropped * (dtype_bytes + 1)


def logits_bytes_per_token(arch: ArchSpec) -> int:
    """The loss's peak, per token: at log-softmax's backward its fp32 output, the gradient arriving from the
    NLL and the gradient it returns are alive together (3 x V fp32). The forward holds less or the same: the
    compute-dtype logits, their fp32 copy and the log-softmax (V x (dtype + 8) bytes)."""
    return 3 * arch.vocab_size * FP32


def distill_bytes_per_token(arch: ArchSpec, dtype_bytes: int) -> int:
    """What distillation adds at the loss, per token: the teacher's logits in the compute dtype, its fp32
    log-probabilities, the student's tempered fp32 log-probabilities and the gradient flowing back through them."""
    return arch.vocab_size * (dtype_bytes + 3 * FP32)


def hidden_states_distill_bytes_per_token(arch: ArchSpec, dtype_bytes: int) -> int:
    """What the hidden-state distillation term adds, per token: the teacher's states after every decoder layer
    (kept by its forward, in the compute dtype) and one layer's fp32 student/teacher copies and difference."""
    return arch.hidden_size * (arch.num_layers * dtype_bytes + 3 * FP32)


def _training_memory(arch: ArchSpec, frozen_params: int, outside_layers: int, trainable: int, *, dtype: str,
                     micro_batch: int, seq_len: int, checkpointing: bool, world: int, fsdp: bool, on_gpu: bool,
                     training: Training, scale: float = 1.0, distill: bool = False,
                     teacher: tuple[int, int] = (0, 0), distill_hidden_states: bool = False) -> dict[str, Any]:
    """Peak bytes per GPU of one training stage. `frozen_params` are held in `dtype`; `trainable` (LoRA,
    gates, or with train: full every weight, then `frozen_params` is 0) cost BYTES_PER_TRAINABLE each.
    With `distill`, a frozen `teacher` of (parameters, of which outside the decoder layers) in `dtype`
    ((0, 0): the stage's own base serves), sharded like the base under FSDP, and the distillation term's
    buffers at the loss (with `distill_hidden_states`, the hidden-state term's too).

    The peak is at the loss: every saved activation is alive when the logits' buffers are, so the two add.
    """
    nbytes = DTYPE_BYTES[dtype]
    tokens = micro_batch * seq_len
    d = arch.hidden_size * scale
    per_layer = activation_bytes_per_token_layer(arch, nbytes, scale, training) * tokens
    layer_input = d * nbytes * tokens
    # Outside the layers: the final RMSNorm's fp32 input and rsqrt, and the embedding output the hidden gate keeps.
    outside = tokens * ((d + 1) * FP32 + d * nbytes * ("hidden" in training.gates))
    logits = tokens * logits_bytes_per_token(arch)
    act_full = per_layer * arch.num_layers + outside
    # With checkpointing only layer inputs stay; one layer's activations are rebuilt during its backward,
    # after the logits are freed, so the peak holds the larger of the two.
    act_ckpt = layer_input * arch.num_layers + outside + max(0.0, per_layer - logits)
    frozen = frozen_params * nbytes
    trained = trainable * BYTES_PER_TRAINABLE
    teacher_params, teacher_outside = teacher
    teacher_bytes = teacher_params * nbytes
    if fsdp:
        # Each rank keeps 1/world of every sharded weight, plus what is gathered at the peak in the compute
        # dtype: the embeddings, LM head and final norm (the root group stays gathered from forward to
        # backward) and two decoder layers (the one computing and the one prefetched). Under LoRA the frozen
        # base is sharded and the trainables replicated; with train: full (frozen_params 0) the fp32 weights,
        # gradients and optimizer state are sharded (sharding.py).
        sharded = frozen_params or trainable
        layer = (sharded - outside_layers) / arch.num_layers
        frozen = (frozen_params / world + 2 * layer + outside_layers) * nbytes
        if not frozen_params:
            trained /= world
        if teacher_params:  # gathered as the base is: two decoder layers and the part outside them
            teacher_layer = (teacher_params - teacher_outside) / arch.num_layers
            teacher_bytes = (teacher_params / world + 2 * teacher_layer + teacher_outside) * nbytes
    breakdown = {
        "frozen_weights": int(frozen),
        "trainable_grads_optimizer": int(trained),
        "activations": int(act_ckpt if checkpointing else act_full),
        "activations_without_checkpointing": int(act_full),
        "activations_with_checkpointing": int(act_ckpt),
        "logits": int(logits),
    }
    if distill:
        breakdown["teacher_weights"] = int(teacher_bytes)
        breakdown["distill_logits"] = int(tokens * distill_bytes_per_token(arch, nbytes))
        if distill_hidden_states:
            breakdown["distill_hidden_states"] = int(tokens * hidden_states_distill_bytes_per_token(arch, nbytes))
    subtotal = sum(v for k, v in breakdown.items() if not k.startswith("activations_"))
    breakdown["framework_overhead"] = _framework_overhead(subtotal) if on_gpu else 0
    return {"per_gpu_bytes": int(subtotal + breakdown["framework_overhead"]), "breakdown": breakdown}


def _framework_overhead(subtotal: float) -> int:
    """The CUDA context and allocator fragmentation on top of `subtotal` bytes of tensors."""
    return int(CUDA_OVERHEAD_BYTES + FRAGMENTATION * subtotal)


def _finetune_trainable(recipe: Recipe, arch: ArchSpec, target_total: int) -> int:
    if recipe.finetune.train == "full":
        return target_total
    return lora_params(arch, recipe.finetune.lora.r, recipe.finetune.lora.target_modules)


def stage_training(section: Any, gates: list[str]) -> Training:
    """What the prune or finetune `section` trains; `gates`: the structures gated during it."""
    full = section.train == "full"
    lora = section.lora
    return Training(() if full else tuple(lora.target_modules), 0 if full else lora.r,
                    0.0 if full else lora.dropout, full, tuple(gates))


def _distill_memory(section: Any, params: dict[str, Any], *, own_base: bool) -> dict[str, Any]:
    """The distillation arguments of `_training_memory` for a prune or fine-tune `section`: the teacher is
    the source, a second copy unless the stage's own frozen base serves (a LoRA prune stage)."""
    if section.distill.weight == 0:
        return {}
    source = params["source"]
    return {"distill": True, "teacher": (0, 0) if own_base else
            (source["total"], source["embeddings"] + source["norms"]),
            "distill_hidden_states": section.distill.hidden_states_weight > 0}


def _stage_memory(recipe: Recipe, arch: ArchSpec, params: dict[str, Any], trainable: dict[str, int],
                  fsdp: bool | None = None) -> dict[str, Any]:
    """Per-GPU memory of each stage as the recipe stands (`fsdp`: override the recipe's strategy)."""
    gpu = GPUS[recipe.hardware.gpu]
    on_gpu = recipe.hardware.gpu != "cpu"
    dtype = compute_dtype(recipe)
    world = recipe.hardware.world_size
    fsdp = recipe.hardware.strategy == "fsdp" if fsdp is None else fsdp
    seq = recipe.data.max_seq_length
    target_total = params["target"]["total"]
    scale = math.sqrt(target_total / params["source"]["total"])  # dims shrink roughly with sqrt(params)
    outside = params["source"]["embeddings"] + params["source"]["norms"]  # not in any decoder layer (roughly)
    stages = {
        "prune": _training_memory(
            arch, params["source"]["total"] - trainable["weights"], outside, trainable["total"], dtype=dtype,
            micro_batch=recipe.prune.micro_batch_size, seq_len=seq,
            checkpointing=recipe.prune.gradient_checkpointing, world=world, fsdp=fsdp, on_gpu=on_gpu,
            training=stage_training(recipe.prune, recipe.target.structures),
            **_distill_memory(recipe.prune, params, own_base=recipe.prune.train == "lora")),
        "finetune": _training_memory(
            arch, 0 if recipe.finetune.train == "full" else target_total, int(outside * scale),
            _finetune_trainable(recipe, arch, target_total), dtype=dtype,
            micro_batch=recipe.finetune.micro_batch_size, seq_len=seq,
            checkpointing=recipe.finetune.gradient_checkpointing, world=world, fsdp=fsdp, on_gpu=on_gpu,
            training=stage_training(recipe.finetune, []), scale=scale,
            **_distill_memory(recipe.finetune, params, own_base=False)),
    }
    # A stage that will not run (one-shot methods do not train a prune stage) needs no memory, and must not
    # steer the strategy the others run with; activation's prune stage is one calibration forward.
    for name, idle in (("prune", recipe.method in ("magnitude", "random") and f"method '{recipe.method}' is "
                                                                              "one-shot: no pruning run"),
                       ("finetune", not recipe.finetune.enabled and "finetune.enabled is false: no fine-tune")):
        if idle:
            stages[name] = {"per_gpu_bytes": 0, "breakdown": {}, "note": idle}
    if recipe.method == "activation":
        stages["prune"] = _calibration_memory(recipe, arch, params)
    stages["evaluate"] = _eval_memory(recipe, arch, params)
    for entry in stages.values():
        entry["fits"] = entry["per_gpu_bytes"] <= gpu.memory_bytes
    return stages


def _calibration_memory(recipe: Recipe, arch: ArchSpec, params: dict[str, Any]) -> dict[str, Any]:
    """The activation method's prune stage, on one GPU of rank 0: the source's weights in the compute dtype and
    one micro-batch's forward through the decoder layers without gradients (no LM head: only the layers'
    outputs are read), at full length. Per token at a layer's peak: the layer's transient
    (`_layer_transient_per_token`); the hooks' copy of the down_proj or o_proj input at the real tokens and its
    fp32 work (2 f, or H h + 2 d: one head's output and its square); and the padding mask SDPA is given (seq
    per token)."""
    nbytes = DTYPE_BYTES[compute_dtype(recipe)]
    d, f, hh = arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim
    seq, micro = recipe.data.max_seq_length, recipe.prune.micro_batch_size
    per_token = (_layer_transient_per_token(arch) + max(f, hh) + seq) * nbytes + max(2 * f, hh + 2 * d) * FP32
    breakdown = {"frozen_weights": params["source"]["total"] * nbytes, "activations": int(micro * seq * per_token)}
    subtotal = sum(breakdown.values())
    breakdown["framework_overhead"] = _framework_overhead(subtotal) if recipe.hardware.gpu != "cpu" else 0
    return {"per_gpu_bytes": int(subtotal + breakdown["framework_overhead"]), "breakdown": breakdown,
            "note": f"method 'activation': one calibration forward of {recipe.prune.calibration_examples:,} "
                    f"examples in micro-batches of {micro}, no gradients"}


def eval_sequence(recipe: Recipe, arch: ArchSpec) -> tuple[int, str]:
    """Tokens of the longest sequence the evaluate stage runs, and where the number comes from.

    lm-eval pads each batch to its longest request and truncates requests to its max_length (eval.max_length,
    else the model's max_position_embeddings); the tasks bound the longest request (evaluation/tasks.py).
    Perplexity runs one `window` at a time and the speed check `prompt_length + new_tokens` per sequence.
    """
    cap = min(recipe.eval.max_length or arch.max_position_embeddings, arch.max_position_embeddings)
    longest = longest_request_tokens(recipe.eval, resolve_prompt(recipe.prompt, "evaluate"))
    if longest is None:
        length, why = cap, "a rolling-loglikelihood task fills max_length"
    elif longest > cap:
        length, why = cap, f"longest request ~{longest:,} tokens, truncated to max_length {cap:,}"
    else:
        length, why = longest, "the tasks' longest request"
    if recipe.eval.perplexity is not None and recipe.eval.perplexity.window > length:
        length, why = min(recipe.eval.perplexity.window, cap), "the perplexity window"
    return length, why


def _layer_transient_per_token(arch: ArchSpec) -> int:
    """Values per token a decoder layer's forward holds at once without gradients: its FFN the residual stream,
    its normed copy, SiLU(gate), up and their product (2 d + 3 f); its attention the residual, normed copy, q,
    attention output and o_proj output (3 d + 2 H h); the larger of the two."""
    d = arch.hidden_size
    return max(2 * d + 3 * arch.intermediate_size, 3 * d + 2 * arch.num_heads * arch.head_dim)


def _eval_peak_per_token(arch: ArchSpec) -> tuple[str, dict[str, int]]:
    """Values per token alive at the evaluate stage's peak, and which moment of lm-eval's loop that is.

    lm-eval's HFLM calls the model with the KV cache on (transformers' default), takes the log-softmax of the
    logits once the call has returned (cache freed), and keeps the previous batch's log-probabilities until
    the new ones replace them. So the peak is the larger of two moments:
    - log-softmax: the previous log-probs, the new logits and their log-softmax (3 V);
    - the forward's end: the previous log-probs, the KV cache of every layer (2 L G h), and either the new
      logits with the final hidden states (V + d) or, if larger, the last layer's transient
      (`_layer_transient_per_token`).
    """
    d, v = arch.hidden_size, arch.vocab_size
    kv = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim
    layer = _layer_transient_per_token(arch)
    at_head = v + d >= layer
    forward = {"logits": v + (v if at_head else 0), "kv_cache": kv, "activations": d if at_head else layer}
    if 3 * v >= sum(forward.values()):
        return "the log-softmax (previous log-probs, logits, log-softmax)", \
            {"logits": 3 * v, "kv_cache": 0, "activations": 0}
    where = "the LM head" if at_head else "the last layer"
    return f"the forward's end at {where} (previous log-probs, KV cache of every layer)", forward


def _eval_memory(recipe: Recipe, arch: ArchSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Log-likelihood evaluation: the weights and lm-eval's peak (`_eval_peak_per_token`) at the longest batch
    lm-eval forms (it sorts requests longest first, so the previous batch is never longer).

    lm-eval's `auto` batch size tries batches until one fits, so the plan checks that batch 1 does.
    """
    gpu = GPUS[recipe.hardware.gpu]
    on_gpu = recipe.hardware.gpu != "cpu"
    nbytes = DTYPE_BYTES[compute_dtype(recipe)]
    length, why = eval_sequence(recipe, arch)
    batch = recipe.eval.fixed_batch_size or 1
    tokens = batch * length
    if recipe.eval.speed.enabled:  # the speed check's prefill: its batch of prompt + generated tokens
        tokens = max(tokens, recipe.eval.speed.batch_size * (recipe.eval.speed.prompt_length
                                                             + recipe.eval.speed.new_tokens))
    weights = max(params["source"]["total"], params["target"]["total"]) * nbytes
    moment, per_token = _eval_peak_per_token(arch)
    peak = {k: tokens * n * nbytes for k, n in per_token.items()}
    gpus = 1
    whole = weights + sum(peak.values())
    if on_gpu and whole + _framework_overhead(whole) > gpu.memory_bytes:
        # It does not fit one GPU: rank 0 evaluates alone, its layers spread over its node's GPUs (freed after
        # training). Each GPU holds its share of the weights and of the KV cache (a layer's cache lives with
        # the layer); activations and logits are counted whole, for the GPU holding the LM head.
        gpus = recipe.hardware.gpus_per_node
        peak["kv_cache"] /= gpus
    # A model that fits one GPU is evaluated data-parallel: every process of the job holds it whole and
    # scores a share of the requests.
    world = recipe.hardware.world_size
    parallel = "layers" if gpus > 1 else "data" if world > 1 else "none"
    sub = weights / gpus + sum(peak.values())
    overhead = _framework_overhead(sub) if on_gpu else 0
    batch_text = (f"batch {batch}" if recipe.eval.fixed_batch_size else
                  f"batch_size {recipe.eval.batch_size}: lm-eval picks the largest batch that fits, batch 1 planned")
    how = {"layers": f", its layers spread over {gpus} GPUs of rank 0",
           "data": f", the requests shared by {world} processes each holding the whole model", "none": ""}
    return {
        "per_gpu_bytes": int(sub + overhead),
        "gpus": gpus,
        "parallel": parallel,
        "processes": world if parallel == "data" else 1,
        "sequence_tokens": length,
        "breakdown": {"weights": int(weights / gpus), **{k: int(v) for k, v in peak.items()},
                      "framework_overhead": overhead},
        "assumption": f"{batch_text} x {length:,} tokens ({why}), peak at {moment}; the larger of source and "
                      "pruned model" + how[parallel],
    }


Overrides = dict[str, Any]  # recipe field path ("prune.micro_batch_size") -> value


def with_overrides(recipe: Recipe, overrides: Overrides) -> Recipe:
    """A copy of `recipe` with the dotted fields set, as a user editing the YAML would."""
    changed = recipe.model_copy(deep=True)
    for path, value in overrides.items():
        *parents, name = path.split(".")
        section = changed
        for part in parents:
            section = getattr(section, part)
        setattr(section, name, value)
    return changed


def _candidate_fixes(recipe: Recipe, stage: str) -> list[Overrides]:
    """Changes that may make `stage` fit, cheapest for the user first; each holds every field it changes."""
    out: list[Overrides] = []
    if stage == "evaluate":
        ev = recipe.eval
        batch = ev.fixed_batch_size
        while batch is not None and batch > 1:
            batch //= 2
            out.append({"eval.batch_size": batch})
        length = ev.max_length or 0
        for cap in (8192, 4096, 2048, 1024):
            if not length or cap < length:
                out.append({**({"eval.batch_size": 1} if batch is not None else {}), "eval.max_length": cap})
        return out
    section = getattr(recipe, stage)
    # checkpointing saves only what a backward needs: activation's calibration forward has none
    ckpt = {f"{stage}.gradient_checkpointing": True} if stage == "finetune" or recipe.method == "compresso" else {}
    if ckpt and not section.gradient_checkpointing:
        out.append(dict(ckpt))
    smaller: list[Overrides] = []
    mb = section.micro_batch_size
    while mb > 1:
        mb //= 2
        factor = section.micro_batch_size // mb
        same_batch = {f"{stage}.gradient_accumulation": section.gradient_accumulation * factor} if ckpt else {}
        smaller.append({**ckpt, f"{stage}.micro_batch_size": mb, **same_batch})
    out += smaller
    sharded = recipe.hardware.world_size > 1 and recipe.hardware.strategy != "fsdp"
    if sharded:
        out += [{**fix, "hardware.strategy": "fsdp"} for fix in [ckpt, *smaller]]
    shortest = {**ckpt, **(smaller[-1] if smaller else {}), **({"hardware.strategy": "fsdp"} if sharded else {})}
    seq = recipe.data.max_seq_length
    while seq > 256:
        seq //= 2
        out.append({**shortest, "data.max_seq_length": seq})
    return out


def _fits(recipe: Recipe, stage: str) -> bool:
    """Whether `stage` fits when the whole plan is redone for `recipe` (strategy choice included)."""
    arch = resolve_arch(recipe)
    params = _params(recipe, arch, target_sparsity(recipe, arch))
    return _memory_and_strategy(recipe, arch, params, _trainable(recipe, arch))[0][stage]["fits"]


def _describe(overrides: Overrides) -> str:
    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)
    return ", ".join(f"{k}: {value(v)}" for k, v in overrides.items())


def _suggest(recipe: Recipe, stage: str) -> tuple[str, list[Overrides]]:
    """What to change so that `stage` fits: one line, and the alternatives it names as recipe overrides.

    Every alternative is checked by re-planning with it, so each one listed makes the stage fit. First the
    cheapest change on this hardware; else every larger GPU that fits as the recipe stands; else the smallest
    GPU that fits with the cheapest change.
    """
    for fix in _candidate_fixes(recipe, stage):
        if _fits(with_overrides(recipe, fix), stage):
            note = " (same global batch)" if any(k.endswith("gradient_accumulation") for k in fix) else ""
            return f"set {_describe(fix)}{note}", [fix]
    here = GPUS[recipe.hardware.gpu].memory_bytes
    bigger = sorted((g.memory_bytes, name) for name, g in GPUS.items() if name != "cpu" and g.memory_bytes > here)
    gpus = [{"hardware.gpu": name} for _, name in bigger
            if _fits(with_overrides(recipe, {"hardware.gpu": name}), stage)]
    if gpus:
        names = [g["hardware.gpu"] for g in gpus]
        return f"set hardware.gpu: {names[0]}" + (f" (or {', '.join(names[1:])})" if names[1:] else ""), gpus
    for _, name in bigger:
        on_gpu = with_overrides(recipe, {"hardware.gpu": name})
        for fix in _candidate_fixes(on_gpu, stage):
            if _fits(with_overrides(on_gpu, fix), stage):
                fix = {"hardware.gpu": name, **fix}
                return f"set {_describe(fix)}", [fix]
    return "no setting of this recipe makes it fit; use more GPUs per node or a smaller model", []


# --------------------------------------------------------------------------- steps and time


def count_examples(recipe: Recipe) -> tuple[int | None, str]:
    """Training examples in the data file, counted when it is local (text: estimated at 4 bytes a token)."""
    path = recipe.data.path
    if path is None or not Path(path).is_file():
        if recipe.data.num_examples is not None:
            return min(recipe.data.num_examples, recipe.data.max_samples or recipe.data.num_examples), \
                "data.num_examples (file not on disk)"
        return None, "data file not on disk; set data.num_examples to plan steps"
    if recipe.data.format == "text":
        tokens = Path(path).stat().st_size / 4
        n, how = max(1, math.ceil(tokens / recipe.data.max_seq_length)), "text at ~4 bytes per token"
    else:
        n, how = len(read_rows(Path(path))), "rows counted"
    if recipe.data.max_samples is not None:
        n = min(n, recipe.data.max_samples)
    return n, how


def _phase_steps(amount: float, unit: str, steps_per_epoch: int | None) -> int | None:
    if unit == "steps":
        return int(amount)
    return None if steps_per_epoch is None else math.ceil(amount * steps_per_epoch)


def _steps(recipe: Recipe, arch: ArchSpec, target_total: int) -> dict[str, Any]:
    world = recipe.hardware.world_size
    n, how = count_examples(recipe)
    out: dict[str, Any] = {"examples": n, "examples_counted_by": how}
    gpu = GPUS[recipe.hardware.gpu]
    flops_per_s = gpu.tflops * 1e12 * MFU * world
    if recipe.method != "compresso":
        out["prune"] = _one_shot_steps(recipe, arch, gpu.tflops * 1e12 * MFU)
    for stage, section, phases in (
        ("prune", recipe.prune, {"lora_only": recipe.prune.schedule.lora_only, "ramp": recipe.prune.schedule.ramp,
                                 "hold": recipe.prune.schedule.hold}),
        ("finetune", recipe.finetune, {"train": recipe.finetune.duration}),
    ):
        if stage in out:  # a one-shot prune stage trains nothing
            continue
        unit = recipe.prune.schedule.unit if stage == "prune" else recipe.finetune.unit
        global_batch = section.micro_batch_size * section.gradient_accumulation * world
        per_epoch = None if n is None else max(1, math.ceil(n / global_batch))
        phase_steps = {k: _phase_steps(v, unit, per_epoch) for k, v in phases.items()}
        total = None if None in phase_steps.values() else sum(phase_steps.values())
        if stage == "finetune" and not recipe.finetune.enabled:
            total, phase_steps = 0, {"train": 0}
        params = count_params(arch).total if stage == "prune" else target_total
        # LoRA with a frozen base: forward (2P) + backward through activations (2P); train: full adds the
        # weight gradients (2P); gradient checkpointing recomputes the forward (2P); distillation adds the
        # teacher's forward, and the teacher is the source (2 x its parameters).
        teacher = 2 * count_params(arch).total if section.distill.weight else 0
        flops_per_token = (4 + 2 * (section.train == "full") + 2 * section.gradient_checkpointing) * params + teacher
        tokens = None if total is None else total * global_batch * recipe.data.max_seq_length
        out[stage] = {
            "global_batch": global_batch, "steps_per_epoch": per_epoch, "phases": phase_steps, "total": total,
            "est_seconds": None if tokens is None else tokens * flops_per_token / flops_per_s,
        }
    out["assumption"] = (f"{gpu.tflops:g} TFLOP/s peak per {recipe.hardware.gpu} at {MFU:.0%} utilisation, "
                         "full-length sequences, 4P FLOPs per trained token (+2P with train: full, +2P with "
                         "checkpointing, + 2 x the source's parameters with distillation)"
                         + ("; activation's calibration: 2P FLOPs per token, one forward on rank 0"
                            if recipe.method == "activation" else ""))
    return out


def _one_shot_steps(recipe: Recipe, arch: ArchSpec, flops_per_s: float) -> dict[str, Any]:
    """A one-shot prune stage trains nothing: magnitude and random rank the weights (seconds), activation also
    runs one forward of its calibration examples (2P FLOPs per token, full-length) on one GPU of rank 0."""
    if recipe.method != "activation":
        return {"global_batch": 0, "steps_per_epoch": None, "phases": {}, "total": 0, "est_seconds": 0.0,
                "note": "one-shot: ranks the weights, no training"}
    n, micro = recipe.prune.calibration_examples, recipe.prune.micro_batch_size
    tokens = n * recipe.data.max_seq_length
    return {"global_batch": micro, "steps_per_epoch": None, "phases": {"calibration_forwards": math.ceil(n / micro)},
            "total": 0, "est_seconds": tokens * 2 * count_params(arch).total / flops_per_s,
            "note": "one-shot: no training"}


# --------------------------------------------------------------------------- entry point


def node_ram(recipe: Recipe) -> tuple[int | None, str]:
    """RAM of one node: `hardware.host_memory`, else this machine's MemTotal (plan and preflight usually run
    on a node of the job), else unknown."""
    if recipe.hardware.host_memory is not None:
        return recipe.hardware.host_memory, "hardware.host_memory"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "this machine (/proc/meminfo)"
    except OSError:
        pass
    return None, "unknown: set hardware.host_memory"


def reads_safetensors(recipe: Recipe) -> bool:
    """Whether the source is read tensor by tensor (safetensors: the slice stage streams it, FSDP ranks read
    their own rows) or whole (`.bin` weights). A source not on disk yet is assumed to be safetensors, as hub
    models are."""
    location = locate_model(recipe.model)
    return location.folder is None or location.has_safetensors or not location.has_weights


def _layer_params(arch: ArchSpec) -> int:
    return attention_params(arch, arch.num_kv_heads, arch.hidden_size) + ffn_params(
        arch, arch.intermediate_size, arch.hidden_size) + 2 * arch.hidden_size


def _largest_tensor_params(arch: ArchSpec) -> int:
    d = arch.hidden_size
    return max(arch.vocab_size * d, arch.intermediate_size * d, arch.num_heads * arch.head_dim * d)


def _host_memory(recipe: Recipe, arch: ArchSpec, params: dict[str, Any], strategy: str) -> dict[str, Any]:
    """Host RAM per node at the run's three peaks (`peaks`: load, slice, evaluate), next to the node's RAM
    (GPU memory is `stages`).

    Loading: under FSDP each process reads only its 1/world of every tensor from the safetensors files
    (`training/sharded_load.py`), so a node holds its processes' shards plus one tensor each in flight;
    under DDP on GPUs the processes of a node load one after another, each moving its copy to its GPU before
    the next reads; a CPU run keeps every replica in RAM. Slice (rank 0): streamed from safetensors, one
    decoder layer (or the embedding matrix) in fp32 and its slice, written tensor by tensor
    (`models/streaming_slice.py`); from `.bin` weights, the fp32 source and the sliced model together.
    Evaluate (rank 0): one model at a time in the compute dtype.
    """
    hw = recipe.hardware
    on_gpu = hw.gpu != "cpu"
    nbytes = DTYPE_BYTES[compute_dtype(recipe)]
    # train: full holds fp32 master weights (`choose_precision`), so those stages load the model in fp32
    full = (recipe.method == "compresso" and recipe.prune.train == "full") or (
        recipe.finetune.enabled and recipe.finetune.train == "full")
    load_bytes = 4 if full else nbytes
    source, target = params["source"]["total"], params["target"]["total"]
    widest = max(_layer_params(arch), arch.vocab_size * arch.hidden_size)
    streams = reads_safetensors(recipe)
    if strategy == "fsdp" and streams:
        load = hw.gpus_per_node * (math.ceil(source / hw.world_size) + _largest_tensor_params(arch)) * load_bytes
        how = "each process reads its own shards from the safetensors files"
    elif on_gpu and strategy != "fsdp":
        load, how = source * load_bytes, "the node's processes load one after another"
    else:
        load, how = hw.gpus_per_node * source * load_bytes, "every process reads the whole source"
    if streams:  # the merged piece, its slice, and transient copies (measured: 2.8x the piece on 1B params)
        slice_bytes = 3 * widest * 4
    else:
        slice_bytes = (source + target) * 4
    ram, ram_from = node_ram(recipe)
    peaks = {"load": load, "slice": slice_bytes, "evaluate": max(source, target) * nbytes}
    return {"peaks": peaks, "model_bytes": source * load_bytes,
            "load_in_flight_bytes": hw.gpus_per_node * _largest_tensor_params(arch) * load_bytes,
            "slice_streams": streams, "node_ram_bytes": ram, "node_ram_from": ram_from,
            "fits": {k: ram is None or v <= ram for k, v in peaks.items()},
            "note": f"loading: {how}; slice: " + ("streamed from safetensors, one layer in fp32 and its slice"
                                                  if streams else "fp32 source + sliced model (.bin source)")
                    + "; evaluate: one model in the compute dtype"}


def host_fix(recipe: Recipe, plan: dict[str, Any], peak: str) -> str:
    """The smallest change that makes the host peak `peak` (load, slice, evaluate) fit the node's RAM."""
    host, hw = plan["memory"]["host"], recipe.hardware
    ram = host["node_ram_bytes"]
    if peak == "load" and plan["hardware"]["strategy"] == "fsdp" and host["slice_streams"]:
        # A node holds 1/nodes of the model plus one tensor in flight per process.
        room = (ram or 0) - host["load_in_flight_bytes"]
        if room > 0 and (nodes := math.ceil(host["model_bytes"] / room)) > hw.nodes:
            return f"raise hardware.nodes to {nodes} (each node then holds a smaller share)"
    if peak == "load" and hw.world_size > 1 and plan["hardware"]["strategy"] != "fsdp" and hw.gpu != "cpu":
        return "set hardware.strategy: fsdp (each process reads only its own shards)"
    if peak == "slice" and not host["slice_streams"]:
        return ("save the source as safetensors (save_pretrained) so the slice stage streams it layer by "
                "layer")
    return f"run on nodes with at least {human_bytes(host['peaks'][peak])} of RAM"


def _trainable(recipe: Recipe, arch: ArchSpec) -> dict[str, int]:
    """Trainable parameters of the prune stage: LoRA (or with train: full every weight), gates, the two
    multipliers."""
    compresso = recipe.method == "compresso"
    full = compresso and recipe.prune.train == "full"
    lora = lora_params(arch, recipe.prune.lora.r, recipe.prune.lora.target_modules) if compresso and not full else 0
    weights = count_params(arch).total if full else 0
    gates = gate_params(arch, recipe.target.structures if compresso else [])
    lagrangian = 2 if gates else 0
    return {"lora": lora, "weights": weights, "gates": gates, "lagrangian": lagrangian,
            "total": lora + weights + gates + lagrangian}


def _memory_and_strategy(recipe: Recipe, arch: ArchSpec, params: dict[str, Any],
                         trainable: dict[str, int]) -> tuple[dict[str, Any], str]:
    """Per-stage memory under the strategy the run will use: the recipe's, or for `auto` a replica (DDP)
    unless only a sharded base (FSDP) lets the prune stage fit."""
    world = recipe.hardware.world_size
    stages = _stage_memory(recipe, arch, params, trainable)
    if recipe.hardware.strategy != "auto":
        return stages, recipe.hardware.strategy
    if world > 1 and not (stages["prune"]["fits"] and stages["finetune"]["fits"]):
        sharded = _stage_memory(recipe, arch, params, trainable, fsdp=True)
        if sharded["prune"]["fits"]:
            return sharded, "fsdp"
    return stages, "single" if world == 1 else "ddp"


def _planned_memory(recipe: Recipe) -> tuple[dict[str, Any], str]:
    arch = resolve_arch(recipe)
    params = _params(recipe, arch, target_sparsity(recipe, arch))
    return _memory_and_strategy(recipe, arch, params, _trainable(recipe, arch))


def training_strategy(recipe: Recipe) -> str:
    """single | ddp | fsdp: what the plan chose, and so what the prune and fine-tune stages run with."""
    return _planned_memory(recipe)[1]


def evaluation_gpus(recipe: Recipe) -> int:
    """How many of rank 0's GPUs the evaluate stage spreads a model over (1 unless it does not fit one)."""
    return _planned_memory(recipe)[0]["evaluate"]["gpus"]


def evaluation_parallel(recipe: Recipe) -> str:
    """How the evaluate stage uses several processes: "data" (the model fits one GPU: every process scores a
    share of the requests), "layers" (it does not: rank 0 alone, its layers spread over `evaluation_gpus`
    GPUs) or "none" (one process)."""
    return _planned_memory(recipe)[0]["evaluate"]["parallel"]


def make_plan(recipe: Recipe) -> dict[str, Any]:
    """The plan as one JSON-serialisable object (the `plan --json` output)."""
    arch = resolve_arch(recipe)
    sparsity = target_sparsity(recipe, arch)
    params = _params(recipe, arch, sparsity)
    trainable = _trainable(recipe, arch)
    world = recipe.hardware.world_size
    stages, strategy = _memory_and_strategy(recipe, arch, params, trainable)
    on_gpu = recipe.hardware.gpu != "cpu"
    for name, entry in stages.items():
        if recipe.hardware.gpu == "cpu":  # host RAM bounds a CPU run: no GPU verdict (memory.host has its peaks)
            entry["fits"] = None
        entry["suggestion"], entry["suggestion_overrides"] = (
            _suggest(recipe, name) if entry["fits"] is False else (None, []))
    deploy_len = min(arch.max_position_embeddings, 4096)
    deploy_kept = uniform_kept(arch, sparsity, recipe.target.multiple_of)
    deploy_weights = params["target"]["total"] * DTYPE_BYTES[export_dtype(recipe)]
    deploy_kv = (2 * sum(deploy_kept.groups) * arch.head_dim * DEPLOY_BATCH * deploy_len
                 * DTYPE_BYTES[export_dtype(recipe)])
    gpu = GPUS[recipe.hardware.gpu]
    return {
        "recipe": {"name": recipe.name, "file": str(recipe.source_file) if recipe.source_file else None,
                   "method": recipe.method, "hash": recipe.recipe_hash()},
        "architecture": arch.to_dict(),
        "params": params,
        "trainable": trainable,
        "memory": {
            "stages": stages,
            "compute_dtype": compute_dtype(recipe),
            "deploy": {"batch": DEPLOY_BATCH, "seq_len": deploy_len, "weights_bytes": deploy_weights,
                       "kv_cache_bytes": deploy_kv, "total_bytes": deploy_weights + deploy_kv,
                       "note": "pruned model at the export dtype; KV cache at the planner's uniform split"},
            "host": _host_memory(recipe, arch, params, strategy),
        },
        "steps": _steps(recipe, arch, params["target"]["total"]),
        "hardware": {"gpu": recipe.hardware.gpu, "gpus_per_node": recipe.hardware.gpus_per_node,
                     "nodes": recipe.hardware.nodes, "world_size": world, "strategy": strategy,
                     "per_gpu_memory_bytes": gpu.memory_bytes if on_gpu else None},
    }


def misfits(plan: dict[str, Any]) -> list[str]:
    """One line per stage that does not fit its GPU, with the smallest change that makes it fit."""
    limit = plan["hardware"]["per_gpu_memory_bytes"]
    return [f"{name}: needs {human_bytes(entry['per_gpu_bytes'])} per GPU, {human_bytes(limit)} available on "
            f"{plan['hardware']['gpu']}; {entry['suggestion']}"
            for name, entry in plan["memory"]["stages"].items() if entry["fits"] is False]


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The plan stage: `plan/plan.json`, the same object `compresso-ops plan --json` prints."""
    plan = make_plan(recipe)
    atomic.write_json(run_dir / "plan" / "plan.json", plan)
    return f"target {plan['params']['target']['total']:,} params"

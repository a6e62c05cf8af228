"""How close is the planner's memory model to a measured peak? Measured on CPU (fp32), one run.

For a random LLaMA of about 30M parameters, each configuration (gradient checkpointing off/on) runs one
prune step (LoRA + gates + Lagrangian, optimizer states allocated) in a fresh subprocess, and a third one
runs lm-eval (the evaluate stage's harness) on a local multiple-choice task. The measured number is the rise
of the process's peak resident memory over the step or the evaluation (Linux: VmHWM after resetting it via
/proc/self/clear_refs), with glibc told to return large blocks to the OS at once so RSS follows live
tensors. The planner's matching number is the same stage's breakdown without the weights (already resident
before) and without GPU framework overhead: for prune trainable + grads + optimizer states, activations,
logits; for evaluate what lm-eval holds at its peak (logits, log-probs, KV cache) at the planned sequence
(the task file's longest row in bytes, a bound on its tokens; the byte-level tokenizer here makes it nearly
exact). Ratios are plan / measured. Without checkpointing a second prune step also takes a census of the
tensors autograd saves in each decoder layer, against the plan's per-layer activation term. Writes benchmarks/results/plan_memory.json.

    .venv/bin/python -m benchmarks.plan_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODEL = {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
         "intermediate_size": 1376, "vocab_size": 8000, "max_position_embeddings": 1024}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _peak_rise_bytes(work: Callable[[], object]) -> int:
    """Rise of the peak resident set over `work()` above the resident set before it."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    work()
    return (_rss_kib("VmHWM") - before) * 1024


def saved_bytes_per_layer_token(model: object, step: Callable[[], object], tokens: int) -> float:
    """Bytes each decoder layer saves for backward per token over `step()`, averaged over the layers: every
    distinct storage autograd packs while a layer's forward runs, weights excluded (the census behind
    stages/plan.py's activation model)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[int | None] = [None]
    saved: dict[int, tuple[int, int]] = {}  # storage -> (layer, bytes)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    handles = [h for i, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)),
        layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if current[0] is not None and storage.data_ptr() not in weights:
            saved.setdefault(storage.data_ptr(), (current[0], storage.nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    for h in handles:
        h.remove()
    return sum(n for _, n in saved.values()) / len(layers) / tokens


def write_task(folder: Path, rows: int, question_bytes: int) -> Path:
    """A multiple-choice task whose requests are about `question_bytes` tokens (byte tokenizer): a long
    question and short choices, so the planner's length bound (the longest row in bytes) is close to the
    longest request and the ratio measures the memory model, not the bound."""
    prose = "the quick brown fox jumps over the lazy dog and runs far away. " * (question_bytes // 8 + 1)
    path = folder / "long_mc.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            text = prose[i:i + question_bytes]
            f.write(json.dumps({"question": text, "choices": ["yes", "no", "maybe"], "answer": i % 3}) + "\n")
    return path


def child_evaluate(model_dir: str, batch: int, seq: int) -> None:
    """Runs inside the subprocess: lm-eval on the local task, print the measured rise and the prediction."""
    import torch

    from compresso_ops.evaluation.harness import load_model, run_lm_eval
    from compresso_ops.recipe.schema import Recipe
    from compresso_ops.stages.plan import make_plan

    torch.set_num_threads(2)
    task = write_task(Path(model_dir), rows=4 * batch, question_bytes=seq)

    def recipe(limit: int, batch_size: int) -> Recipe:
        return Recipe(name="mem", model={"path": model_dir}, target={"sparsity": 0.3}, prompt={"text": "none"},
                      eval={"local_tasks": [{"name": "long_mc", "data": str(task), "format": "multiple_choice"}],
                            "limit": limit, "batch_size": batch_size, "speed": {"enabled": False}})

    model, tok = load_model(model_dir)
    run_lm_eval(model, tok, recipe(1, 1).eval, None)  # warm-up: imports and lm-eval's first-call state
    measured = recipe(4 * batch, batch)
    rise = _peak_rise_bytes(lambda: run_lm_eval(model, tok, measured.eval, None))
    plan = make_plan(measured)["memory"]["stages"]["evaluate"]
    predicted = sum(v for k, v in plan["breakdown"].items() if k not in ("weights", "framework_overhead"))
    longest = max(len(tok(f"Question: {json.loads(line)['question']}\nAnswer: maybe").input_ids)
                  for line in task.read_text().splitlines())
    print(json.dumps({"measured_bytes": rise, "predicted_bytes": predicted, "breakdown": plan["breakdown"],
                      "batch": batch, "planned_sequence_tokens": plan["sequence_tokens"],
                      "longest_request_tokens": longest}))


def child(model_dir: str, checkpointing: bool, micro_batch: int, seq: int) -> None:
    """Runs inside the subprocess: one prune step, print the measured rise and the plan's prediction."""
    import torch

    from compresso_ops.models.resolve import resolve_arch
    from compresso_ops.recipe.schema import Recipe
    from compresso_ops.stages.plan import (
        DTYPE_BYTES,
        activation_bytes_per_token_layer,
        compute_dtype,
        make_plan,
        stage_training,
    )
    from compresso_ops.stages.prune import PruneTrainer
    from compresso_ops.training.batching import Collator, pad_token_id
    from compresso_ops.training.checkpoints import CheckpointStore
    from compresso_ops.training.data import build_dataset
    from compresso_ops.training.setup import add_lora, enable_gradient_checkpointing, load_source

    torch.set_num_threads(2)
    data = Path(model_dir) / "data.txt"
    recipe = Recipe(name="mem", model={"path": model_dir}, target={"sparsity": 0.3},
                    prompt={"text": "none"}, data={"path": str(data), "format": "text", "max_seq_length": seq},
                    prune={"micro_batch_size": micro_batch, "gradient_accumulation": 1,
                           "gradient_checkpointing": checkpointing,
                           "schedule": {"unit": "steps", "lora_only": 0, "ramp": 10, "hold": 0}})
    model, tok, precision = load_source(recipe)
    examples = build_dataset(recipe.data, tok, "", MODEL["max_position_embeddings"])
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = add_lora(model, recipe.prune.lora, "prune.lora.target_modules")
    trainer = PruneTrainer(recipe, model, examples, Collator(pad_token_id(tok)), precision,
                           CheckpointStore(tempfile.mkdtemp()))
    with torch.no_grad():  # touch every weight page before the baseline
        for p in model.parameters():
            p.sum()
    rise = _peak_rise_bytes(lambda: trainer.step(0))
    plan = make_plan(recipe)
    breakdown = plan["memory"]["stages"]["prune"]["breakdown"]
    predicted = breakdown["trainable_grads_optimizer"] + breakdown["activations"] + breakdown["logits"]
    row = {"measured_bytes": rise, "predicted_bytes": predicted, "breakdown": breakdown}
    if not checkpointing:  # the per-layer term alone, from a second, identical step
        arch = resolve_arch(recipe)
        row["saved_bytes_per_token_layer"] = {
            "measured": saved_bytes_per_layer_token(model, lambda: trainer.step(1), micro_batch * seq),
            "planned": activation_bytes_per_token_layer(
                arch, DTYPE_BYTES[compute_dtype(recipe)], training=stage_training(recipe.prune, recipe.target.structures))}
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plan_memory.json"))
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child[1] == "evaluate":
            child_evaluate(args.child[0], args.eval_batch, args.seq)
        else:
            child(args.child[0], args.child[1] == "1", args.micro_batch, args.seq)
        return

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny import byte_tokenizer

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, bos_token_id=256, eos_token_id=257, pad_token_id=258))
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    (tmp / "data.txt").write_text("a quick brown fox jumps over the lazy dog. " * 2000)
    n_params = sum(p.numel() for p in model.parameters())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    rows = {}
    for name, mode in (("no_checkpointing", "0"), ("gradient_checkpointing", "1"), ("evaluate", "evaluate")):
        out = subprocess.run([sys.executable, __file__, "--child", str(tmp), mode, "--micro-batch",
                              str(args.micro_batch), "--eval-batch", str(args.eval_batch), "--seq", str(args.seq)],
                             capture_output=True, text=True, env=env, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["predicted_over_measured"] = row["predicted_bytes"] / row["measured_bytes"]
        rows[name] = row
        print(f"{name}: measured {row['measured_bytes'] / 2**20:.1f} MiB, predicted "
              f"{row['predicted_bytes'] / 2**20:.1f} MiB, ratio {row['predicted_over_measured']:.2f}")
    result = {"benchmark": "plan_memory", "device": "cpu (fp32)", "model": {**MODEL, "params": n_params},
              "micro_batch": args.micro_batch, "eval_batch": args.eval_batch, "seq": args.seq,
              "ratio_no_ckpt": rows["no_checkpointing"]["predicted_over_measured"],
              "ratio_ckpt": rows["gradient_checkpointing"]["predicted_over_measured"],
              "ratio_evaluate": rows["evaluate"]["predicted_over_measured"], "results": rows,
              "method": "rise of peak RSS over one prune step (the plan's trainable+activations+logits) and over "
                        "one lm-eval run (the plan's evaluate line less the weights); ratio = plan / measured"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

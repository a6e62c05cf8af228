"""Quality benchmark: Compresso against one-shot structured pruning at equal size and equal training budget.

On the real stories260K model (../shared/assets/models/stories260K) with TinyStories text, at prunable
sparsity 0.2 and 0.35, it runs the whole pipeline for each method through the library's stage functions:

- compresso: prune (LoRA + gates + Lagrangian) -> slice -> fine-tune (LoRA)
- magnitude: one-shot L2 ranking (LLM-Pruner "L2") -> slice -> fine-tune
- random:    one-shot random ranking (a floor) -> slice -> fine-tune

and scores sliding-window perplexity on tinystories/dev.txt for the source, every sliced model (no
fine-tune) and every fine-tuned model. Fairness is enforced, not assumed:

- budget: compresso's prune steps + fine-tune steps == the one-shot methods' fine-tune steps, with the same
  examples per step; the benchmark sums the loss-carrying tokens each run actually consumed (from the
  stages' events.jsonl) and fails unless they match within one example;
- size: the parameter count of every exported model is read back from disk (sum of tensor sizes of the
  reloaded model, compared with its manifest) and the methods must agree within one KV group's size (the
  documented tolerance of the shared budgeted selection); the table prints every count.

Text-only data, so the prompt is off (`prompt.text: none`) in every stage: perplexity of plain text is
measured without a prompt, and all methods see identical inputs. Seeds: 42 for data order, gate init and
noise, LoRA init and the random baseline's ranking.

    .venv/bin/python -m benchmarks.quality [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compresso_ops.evaluation.harness import load_model
from compresso_ops.evaluation.measures import perplexity
from compresso_ops.infra import atomic
from compresso_ops.method.baselines import run_one_shot
from compresso_ops.recipe.schema import PerplexitySection, Recipe
from compresso_ops.stages.finetune import run_finetune
from compresso_ops.stages.prune import run_prune
from compresso_ops.stages.slice import run_slice
from compresso_ops.training.setup import load_source

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "tinystories"
RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.2, 0.35)
SEED = 42
SEQ_LEN = 128
MICRO_BATCH = 4
PPL = {"window": 256, "stride": 128, "max_tokens": 16384}


@dataclass(frozen=True)
class Budget:
    """Optimizer steps of one run; every method spends `total` steps of MICRO_BATCH examples."""

    lora_only: int
    ramp: int
    hold: int
    finetune: int  # compresso's post fine-tune

    @property
    def prune(self) -> int:
        return self.lora_only + self.ramp + self.hold

    @property
    def total(self) -> int:
        return self.prune + self.finetune


FULL = Budget(lora_only=20, ramp=200, hold=180, finetune=200)
QUICK = Budget(lora_only=5, ramp=40, hold=35, finetune=40)

# Shared by every method: the fine-tune settings (only the step count differs, to equalise the budget).
FINETUNE = {"unit": "steps", "lr": 1e-3, "schedule": "cosine", "warmup_ratio": 0.03,
            "micro_batch_size": MICRO_BATCH, "gradient_accumulation": 1, "seed": SEED, "checkpoint_every": 10_000}
PRUNE_LR = {"lora": 1e-3, "gates": 0.5, "lagrangian": 0.3}
# Heads and FFN channels for every method. The one-shot methods keep all hidden dims anyway (LLM-Pruner style);
# letting Compresso also gate the 64 hidden dims of this model cost it perplexity (see "What was tried").
STRUCTURES = ["heads", "ffn"]


def recipe(method: str, sparsity: float, budget: Budget, finetune_steps: int) -> Recipe:
    return Recipe(
        name=f"quality-{method}-{sparsity}", method=method,
        model={"path": str(MODEL)}, target={"sparsity": sparsity, "structures": STRUCTURES}, prompt={"text": "none"},
        data={"path": str(DATA / "train.txt"), "format": "text", "max_seq_length": SEQ_LEN},
        prune={"schedule": {"unit": "steps", "lora_only": budget.lora_only, "ramp": budget.ramp,
                            "hold": budget.hold},
               "micro_batch_size": MICRO_BATCH, "gradient_accumulation": 1, "seed": SEED,
               "checkpoint_every": 10_000, "lr": PRUNE_LR},
        finetune={**FINETUNE, "duration": finetune_steps},
        export={"mode": "native", "dtype": "float32"},
    )


def tokens_used(stage_dir: Path) -> int:
    """Loss-carrying tokens a training stage consumed, from its per-step events."""
    path = stage_dir / "events.jsonl"
    return sum(json.loads(line)["tokens"] for line in path.read_text().splitlines() if line.strip())


def score(model_dir: Path, spec: PerplexitySection) -> tuple[float, int]:
    """Perplexity of an exported folder and its parameter count read back from disk (checked against
    the manifest the export wrote)."""
    model, tok = load_model(model_dir, tokenizer_path=MODEL)
    n_params = sum(p.numel() for p in model.parameters())
    manifest = json.loads((model_dir / "compresso_manifest.json").read_text())
    if n_params != manifest["params"]["exported"]["total"]:
        sys.exit(f"{model_dir}: reloaded {n_params} parameters, manifest says {manifest['params']['exported']['total']}")
    with torch.no_grad():
        ppl = perplexity(model, tok, spec)["perplexity"]
    return ppl, n_params


def run_method(method: str, sparsity: float, budget: Budget, work: Path, spec: PerplexitySection) -> dict[str, Any]:
    t0 = time.perf_counter()
    ft_steps = budget.finetune if method == "compresso" else budget.total
    r = recipe(method, sparsity, budget, ft_steps)
    prune_dir, slice_dir, ft_dir = work / "prune", work / "slice", work / "finetune"
    pruned = run_prune(r, prune_dir) if method == "compresso" else run_one_shot(r, load_source(r)[0], prune_dir)
    manifest = run_slice(r, prune_dir, slice_dir)
    ppl_sliced, params_sliced = score(slice_dir / "model", spec)
    run_finetune(r, slice_dir / "model", ft_dir)
    ppl_ft, params_ft = score(ft_dir / "model", spec)
    if params_ft != params_sliced:
        sys.exit(f"{method} {sparsity}: fine-tuning changed the parameter count ({params_sliced} -> {params_ft})")
    prune_tokens = tokens_used(prune_dir) if method == "compresso" else 0
    ft_tokens = tokens_used(ft_dir)
    return {
        "method": method, "sparsity": sparsity, "achieved_sparsity": manifest["params"]["prunable_sparsity"],
        "params": params_ft, "prunable_params": manifest["params"]["exported"]["prunable"],
        "kept": manifest["kept"], "ppl_no_ft": ppl_sliced, "ppl_ft": ppl_ft,
        "steps": {"prune": budget.prune if method == "compresso" else 0, "finetune": ft_steps},
        "tokens": {"prune": prune_tokens, "finetune": ft_tokens, "total": prune_tokens + ft_tokens},
        "prune_summary": {k: pruned.get(k) for k in ("expected_sparsity", "lambda1", "lambda2") if k in pruned},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check_fair(rows: list[dict[str, Any]], group_cost: int) -> None:
    """Same budget (within one example's tokens) and same size (within one KV group) per sparsity."""
    for s in SPARSITIES:
        same = [r for r in rows if r["sparsity"] == s]
        tokens = [r["tokens"]["total"] for r in same]
        if max(tokens) - min(tokens) > MICRO_BATCH * SEQ_LEN:
            sys.exit(f"sparsity {s}: training budgets differ: {tokens}")
        params = [r["params"] for r in same]
        if max(params) - min(params) > group_cost:
            sys.exit(f"sparsity {s}: parameter counts differ by more than one KV group ({group_cost}): {params}")


def table(source: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    header = ("| method | target sparsity | achieved | params | ppl, no fine-tune | ppl, fine-tuned | "
              "budget (steps prune + FT) | budget (tokens) |")
    lines = [header,
             "|---|---|---|---|---|---|---|---|",
             f"| source | 0 | 0 | {source['params']:,} | {source['ppl']:.3f} | — | — | — |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['sparsity']} | {r['achieved_sparsity']:.3f} | {r['params']:,} | "
                     f"{r['ppl_no_ft']:.3f} | {r['ppl_ft']:.3f} | {r['steps']['prune']} + {r['steps']['finetune']} | "
                     f"{r['tokens']['total']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short schedules (under 5 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    parser.add_argument("--methods", default="compresso,magnitude,random", help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for quality.md / quality.json")
    args = parser.parse_args()
    if not MODEL.is_dir() or not (DATA / "train.txt").is_file():
        sys.exit(f"{MODEL} or {DATA} is absent: this benchmark needs the shared assets folder (../shared)")
    torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else FULL
    methods = args.methods.split(",")
    spec = PerplexitySection(path=DATA / "dev.txt", **PPL)
    t0 = time.perf_counter()

    src_model, tok = load_model(MODEL)
    with torch.no_grad():
        source = {"ppl": perplexity(src_model, tok, spec)["perplexity"],
                  "params": sum(p.numel() for p in src_model.parameters())}
    cfg = src_model.config
    group_cost = cfg.hidden_size * cfg.head_dim * 2 * (cfg.num_attention_heads // cfg.num_key_value_heads + 1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in SPARSITIES:
            for m in methods:
                row = run_method(m, s, budget, Path(tmp) / f"{m}-{s}", spec)
                rows.append(row)
                print(f"{m:9s} sparsity {s}: params {row['params']:,}  ppl {row['ppl_no_ft']:.3f} -> "
                      f"{row['ppl_ft']:.3f}  ({row['seconds']}s)", flush=True)
    check_fair(rows, group_cost)
    elapsed = time.perf_counter() - t0
    text = table(source, rows)
    print(text)
    settings = {
        "mode": "quick" if args.quick else "full", "seed": SEED, "seq_len": SEQ_LEN, "micro_batch": MICRO_BATCH,
        "budget_steps": budget.total, "prune_schedule": {"lora_only": budget.lora_only, "ramp": budget.ramp,
                                                         "hold": budget.hold},
        "compresso_finetune_steps": budget.finetune, "prune_lr": PRUNE_LR, "structures": STRUCTURES, "finetune": FINETUNE,
        "perplexity": {**PPL, "file": "tinystories/dev.txt"}, "prompt": "none", "threads": args.threads,
        "seconds": round(elapsed, 1),
    }
    suffix = "" if not args.quick else "_quick"
    atomic.write_json(args.out / f"quality{suffix}.json", {"settings": settings, "source": source, "rows": rows})
    write_markdown(args.out / f"quality{suffix}.md", text, settings, budget)
    print(f"{elapsed:.0f}s -> {args.out}")


def write_markdown(path: Path, text: str, settings: dict[str, Any], budget: Budget) -> None:
    """The table plus how it was made; keeps a hand-written "What was tried" section if the file has one."""
    tried = ""
    if path.is_file():
        old = path.read_text()
        marker = "## What was tried"
        if marker in old:
            tried = old[old.index(marker):]
    tokens_nominal = budget.total * MICRO_BATCH * (SEQ_LEN - 1)
    body = (
        f"# Quality: Compresso vs one-shot pruning on stories260K ({settings['mode']} run)\n\n"
        f"Produced by `benchmarks/quality.py{' --quick' if settings['mode'] == 'quick' else ''}` in "
        f"{settings['seconds']:.0f} s ({settings['threads']} torch thread(s)).\n\n"
        f"{text}\n\n"
        "- Perplexity: `tinystories/dev.txt`, sliding window {window} tokens, stride {stride}, first {max_tokens} "
        "tokens (BOS first), no prompt.\n".format(**PPL)
        + f"- Budget: every method trains {budget.total} optimizer steps of {MICRO_BATCH} x {SEQ_LEN}-token "
        f"examples (about {tokens_nominal:,} loss-carrying tokens; the table shows the measured sum). Compresso spends "
        f"{budget.prune} of them pruning (LoRA-only {budget.lora_only}, ramp {budget.ramp}, hold {budget.hold}) "
        f"and {budget.finetune} fine-tuning; magnitude and random spend all {budget.total} fine-tuning.\n"
        f"- Same fine-tune for all: LoRA r=8 on q_proj/v_proj, lr {FINETUNE['lr']} cosine, warm-up 3%. "
        f"Compresso prune learning rates: LoRA {PRUNE_LR['lora']}, gates {PRUNE_LR['gates']}, lambdas "
        f"{PRUNE_LR['lagrangian']}. Structures pruned: {', '.join(STRUCTURES)} (every method).\n"
        f"- Params are read back from each exported folder (reloaded model, equal to its manifest); per sparsity "
        "they must agree within one KV group, and budgets within one example, or the script fails.\n"
        f"- Seed {SEED} everywhere (data order, gate init/noise, LoRA init, random ranking). Export: native, fp32.\n\n"
    )
    atomic.write_text(path, body + tried)


if __name__ == "__main__":
    main()

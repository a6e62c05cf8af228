"""Prune the real stories260K model to 30% prunable sparsity on TinyStories and measure what it costs.

Runs the prune stage (LoRA + gates + Lagrangian) on ../shared/assets/data/tinystories/train.txt, then
reports dev.txt perplexity of the source model and of the masked model (merged LoRA + final 0/1 masks via
hooks), plus the masks alone without the LoRA, to show what the jointly trained adapter recovers. No
prompt: the quality signal here is plain-text perplexity, which is measured without one.

    .venv/bin/python -m benchmarks.prune_stories [--steps-scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
from compresso_ops.evaluation.measures import perplexity
from compresso_ops.infra import atomic
from compresso_ops.method.hooks import masked
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params
from compresso_ops.recipe.schema import PerplexitySection, Recipe
from compresso_ops.stages.prune import run_prune

SHARED = ROOT.parent / "shared" / "assets"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "tinystories"
RESULT = Path(__file__).resolve().parent / "results" / "prune_stories.json"
TARGET = 0.3


def load(lora_dir: Path | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    if lora_dir is not None:
        model = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply the schedule's step counts")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 is fastest)")
    args = parser.parse_args()
    if not MODEL.is_dir():
        sys.exit(f"{MODEL} is absent: this benchmark needs the shared assets folder")
    torch.set_num_threads(args.threads)
    schedule = {"unit": "steps", "lora_only": round(20 * args.steps_scale), "ramp": round(300 * args.steps_scale),
                "hold": round(500 * args.steps_scale)}
    recipe = Recipe(
        name="prune_stories", model={"path": str(MODEL)}, target={"sparsity": TARGET}, prompt={"text": "none"},
        data={"path": str(DATA / "train.txt"), "format": "text", "max_seq_length": 128},
        prune={"schedule": schedule, "micro_batch_size": 4, "gradient_accumulation": 1, "checkpoint_every": 200,
               "lr": {"lora": 1e-3, "gates": 0.5, "lagrangian": 0.3}},
    )
    ppl_spec = PerplexitySection(path=DATA / "dev.txt", window=256, stride=128)
    tok = AutoTokenizer.from_pretrained(MODEL)
    arch = ArchSpec.from_pretrained_dir(MODEL)

    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / "prune"
        t0 = time.perf_counter()
        out = run_prune(recipe, stage)
        train_s = time.perf_counter() - t0
        masks = Masks.load(stage)
        events = [json.loads(line) for line in (stage / "events.jsonl").read_text().splitlines()]
        source_ppl = perplexity(load(), tok, ppl_spec)["perplexity"]
        merged = load(stage / "lora")
        with masked(merged, masks):
            pruned_ppl = perplexity(merged, tok, ppl_spec)["perplexity"]
        bare = load()
        with masked(bare, masks):
            masks_only_ppl = perplexity(bare, tok, ppl_spec)["perplexity"]

    late = [e["expected_sparsity"] for e in events[-100:]]
    result = {
        "target_sparsity": TARGET,
        "expected_sparsity_final": out["expected_sparsity"],
        "expected_sparsity_last100_mean": sum(late) / len(late),
        "achieved_sparsity": out["achieved_sparsity"],
        "reaches_target": out["achieved_sparsity"] >= TARGET,
        "params": {"source": count_params(arch).as_dict(), "pruned": out["params"]},
        "kept": out["kept"],
        "perplexity_dev": {"source": source_ppl, "masked_with_lora": pruned_ppl, "masks_without_lora": masks_only_ppl},
        "steps": out["steps"], "train_seconds": train_s, "threads": args.threads,
        "settings": recipe.prune.model_dump(mode="json"),
        "trajectory": [{k: e[k] for k in ("step", "expected_sparsity", "target_sparsity", "lm_loss", "lambda1",
                                          "lambda2")} for e in events[::50]],
    }
    atomic.write_json(RESULT, result)
    print(f"sparsity: target {TARGET}, expected {out['expected_sparsity']:.4f}, masks {out['achieved_sparsity']:.4f}; "
          f"dev perplexity {source_ppl:.3f} -> {pruned_ppl:.3f} (masks alone {masks_only_ppl:.3f}); "
          f"{train_s:.0f}s -> {RESULT}")


if __name__ == "__main__":
    main()

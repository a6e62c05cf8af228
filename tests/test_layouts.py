"""Every supported layout through `apply`: tiny random models in the Llama-3 layout (llama3 RoPE scaling, tied
embeddings), Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms, head_dim != hidden/heads) and Mistral run the
whole pipeline with native and uniform exports, and the result reloads with plain `AutoModelForCausalLM` at the
parameter count its manifest states."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from compresso_ops.cli import main
from tests.test_slice import STOCK_CLASS
from tests.tiny import save_tiny

LAYOUTS = {
    "llama3-tied": ("llama", {"tied": True, "llama3_rope": True}),
    "qwen2-bias": ("qwen2", {}),
    "qwen3-qknorm-tied": ("qwen3", {"tied": True}),
    "mistral": ("mistral", {}),
}

RECIPE = """
name: tiny-{layout}
model: {{path: model}}
target: {{sparsity: 0.4}}
prompt: {{text: "Keep quality.", use_in: [prune, finetune, evaluate]}}
data: {{path: train.jsonl, format: alpaca, max_seq_length: 200}}
prune:
  lr: {{lora: 1.0e-3, gates: 0.5, lagrangian: 0.3}}
  schedule: {{unit: steps, lora_only: 1, ramp: 3, hold: 1}}
  micro_batch_size: 4
  gradient_accumulation: 1
finetune: {{unit: steps, duration: 1, lr: 1.0e-3, micro_batch_size: 4, gradient_accumulation: 1}}
eval:
  local_tasks: [{{name: quiz, data: quiz.jsonl, format: multiple_choice}}]
  limit: 4
  batch_size: 4
  speed: {{enabled: false}}
  compare_source: false
export: {{mode: {mode}, dtype: float32}}
run_dir: run
"""


def _write_inputs(folder: Path, layout: str, mode: str) -> Path:
    model_type, kw = LAYOUTS[layout]
    save_tiny(folder / "model", model_type, **kw)
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(16)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    quiz = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 3)], "answer": 0}
            for i in range(4)]
    (folder / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quiz))
    recipe = folder / "recipe.yaml"
    recipe.write_text(textwrap.dedent(RECIPE.format(layout=layout, mode=mode)))
    return recipe


@pytest.mark.parametrize("mode", ["native", "uniform"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_apply_exports_every_layout_as_a_loadable_model(tmp_path, layout, mode):
    recipe = _write_inputs(tmp_path, layout, mode)
    result = CliRunner().invoke(main, ["apply", str(recipe), "--plain"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "run" / "finetune" / "model"
    manifest = json.loads((folder / "compresso_manifest.json").read_text())
    assert manifest["checks"]["passed"] and manifest["mode"] == mode
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == manifest["params"]["exported"]["total"]
    assert manifest["params"]["exported"]["total"] < manifest["params"]["source"]["total"]
    model_type = LAYOUTS[layout][0]
    expected = "CompressoLlamaForCausalLM" if mode == "native" else STOCK_CLASS[model_type]
    assert type(model).__name__ == expected
    assert model.config.tie_word_embeddings == LAYOUTS[layout][1].get("tied", False)

"""`train: full`: every weight trains (fp32 master weights), in the prune and in the fine-tune stage, and the
rest of the pipeline (slice, export checks, resume, the planner) follows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import MANIFEST_FILE, export_pruned
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.finetune import run_finetune
from compresso_ops.stages.plan import make_plan
from compresso_ops.stages.prune import run_prune
from compresso_ops.stages.slice import run_slice
from tests.test_finetune import _text
from tests.test_slice import random_masks
from tests.tiny import REPO_ROOT, byte_tokenizer, save_tiny, tiny_model

SOURCE = {"path": "tiny", "revision": None, "dtype": "float32"}


def _recipe(folder: Path, **sections) -> Recipe:
    base = {"name": "full", "model": {"path": str(folder / "src")}, "target": {"sparsity": 0.3},
            "prompt": {"text": "none"}, "data": {"path": str(_text(folder)), "format": "text", "max_seq_length": 32},
            "prune": {"train": "full", "schedule": {"unit": "steps", "lora_only": 1, "ramp": 3, "hold": 2},
                      "lr": {"lora": 1e-3, "gates": 0.5, "lagrangian": 0.3}, "micro_batch_size": 2,
                      "gradient_accumulation": 1, "checkpoint_every": 2},
            "finetune": {"train": "full", "unit": "steps", "duration": 4, "lr": 1e-3, "micro_batch_size": 2,
                         "gradient_accumulation": 1, "checkpoint_every": 2},
            "export": {"mode": "native", "dtype": "float32"}}
    for key, value in sections.items():
        base[key] = {**base[key], **value}
    return Recipe(**base)


def _sliced(folder: Path, tied: bool = False) -> Path:
    model = tiny_model("llama", layers=3, tied=tied)
    masks = random_masks(ArchSpec.from_hf_config(model.config), no_heads_layer=None, no_ffn_layer=None)
    export_pruned(model, byte_tokenizer(), masks, "native", folder / "sliced", source_info=SOURCE)
    return folder / "sliced"


def test_full_finetune_trains_every_weight_and_exports_the_pruned_shapes(tmp_path):
    sliced = _sliced(tmp_path, tied=True)
    result = run_finetune(_recipe(tmp_path), sliced, tmp_path / "finetune")
    out = tmp_path / "finetune" / "model"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    before, after = load_file(str(sliced / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert result["completed"] and manifest["checks"]["passed"]
    assert manifest["finetune"]["train"] == "full" and manifest["finetune"]["lora"] is None
    recovery = manifest["finetune"]["recovery"]
    assert recovery["mode"] == "full" and recovery["tokens"] > 0
    assert recovery["trained_params"] == manifest["params"]["exported"]["total"]  # tied: counted once
    assert before.keys() == after.keys()
    assert all(before[k].shape == after[k].shape for k in before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert set(changed) == set(before), "every weight, norms and embeddings included, trained"
    assert result["weights"]["frozen_bytes_per_process"] == 0  # nothing was frozen


def test_full_finetune_resumes_to_the_uninterrupted_result(tmp_path):
    sliced = _sliced(tmp_path)
    recipe = _recipe(tmp_path)
    run_finetune(recipe, sliced, tmp_path / "once")
    assert not run_finetune(recipe, sliced, tmp_path / "twice", max_steps=3)["completed"]  # killed after a checkpoint
    assert run_finetune(recipe, sliced, tmp_path / "twice")["completed"]
    once = load_file(str(tmp_path / "once" / "model" / "model.safetensors"))
    twice = load_file(str(tmp_path / "twice" / "model" / "model.safetensors"))
    assert all(torch.equal(once[k], twice[k]) for k in once)


def test_full_prune_leaves_the_trained_model_and_the_slice_uses_it(tmp_path):
    save_tiny(tmp_path / "src", "llama", layers=3)
    recipe = _recipe(tmp_path)
    result = run_prune(recipe, tmp_path / "prune")
    assert result["completed"] and result["achieved_sparsity"] >= 0.3
    assert (tmp_path / "prune" / "model" / "config.json").is_file() and not (tmp_path / "prune" / "lora").exists()
    trained = load_file(str(tmp_path / "prune" / "model" / "model.safetensors"))
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], source["model.layers.0.mlp.up_proj.weight"])
    manifest = run_slice(recipe, tmp_path / "prune", tmp_path / "slice")
    assert manifest["checks"]["passed"]  # the export reproduces the masked *trained* model's logits
    assert manifest["streamed"]  # read from prune/model's safetensors, layer by layer


def test_plan_fits_a_full_finetune_of_5_4b_on_4_v100_32gb_with_fsdp_and_checkpointing(tmp_path):
    recipe = tmp_path / "full.yaml"
    recipe.write_text(f"extends: {REPO_ROOT / 'recipes' / 'llama7b-5.4b.yaml'}\n"
                      "finetune: {train: full, gradient_checkpointing: true}\n")
    plan = make_plan(load_recipe(recipe, check_files=False))
    finetune = plan["memory"]["stages"]["finetune"]
    assert plan["hardware"]["strategy"] == "fsdp" and finetune["fits"]
    # fp32 weights, gradients and AdamW state of the 5.4B model, sharded over 4 GPUs
    target = plan["params"]["target"]["total"]
    assert finetune["breakdown"]["trainable_grads_optimizer"] == int(target * 16 / 4)
    replica = tmp_path / "ddp.yaml"
    replica.write_text(recipe.read_text() + "hardware: {strategy: ddp}\n")
    assert not make_plan(load_recipe(replica, check_files=False))["memory"]["stages"]["finetune"]["fits"]

"""The half-precision training path (frozen base in fp16, trainables in fp32, autocast, gradient scaler),
exercised on CPU: CUDA is not needed to check that the dtypes are held where they should be and that a
scaled step trains."""

from __future__ import annotations

import random

import pytest
import torch

from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.prune import PruneTrainer
from compresso_ops.training import setup
from compresso_ops.training.batching import Collator, pad_token_id
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.data import build_dataset
from compresso_ops.training.distributed import SINGLE
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import load_source, prepare_for_training
from tests.tiny import save_tiny


@pytest.fixture
def half_on_cpu(monkeypatch):
    """What `choose_precision` returns on a V100, with the CPU standing in for the GPU."""
    def choose(recipe, dist=SINGLE, full=False):
        return Precision(torch.device("cpu"), torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0**10), dist)
    monkeypatch.setattr(setup, "choose_precision", choose)


def test_fp16_base_fp32_trainables_and_a_scaled_step(tmp_path, half_on_cpu):
    save_tiny(tmp_path / "model", "llama", gqa=True)
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "sun", "tree"]
    (tmp_path / "train.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(24)) for _ in range(8)))
    recipe = Recipe(name="t", model={"path": str(tmp_path / "model")}, target={"sparsity": 0.3},
                    prompt={"text": "none"},
                    data={"path": str(tmp_path / "train.txt"), "format": "text", "max_seq_length": 32},
                    prune={"schedule": {"unit": "steps", "lora_only": 0, "ramp": 2, "hold": 0},
                           "micro_batch_size": 4, "gradient_checkpointing": True,
                           "lr": {"lora": 1e-2, "gates": 0.3, "lagrangian": 0.1}})
    model, tokenizer, precision = load_source(recipe)
    examples = build_dataset(recipe.data, tokenizer, None, 64)
    model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
    trainer = PruneTrainer(recipe, model, examples, Collator(pad_token_id(tokenizer)), precision,
                           CheckpointStore(tmp_path / "stage"))

    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.float16} and trainable == {torch.float32}
    assert {p.dtype for p in trainer.gates.parameters()} == {torch.float32}

    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(torch.count_nonzero(p) == 0 for p in lora_b)  # peft starts B at zero
    log_alpha = {k: v.detach().clone() for k, v in trainer.gates.log_alpha.items()}
    for step in range(2):
        record = trainer.step(step)
        assert torch.isfinite(torch.tensor(record["lm_loss"])) and record["lm_loss"] > 0
    assert any(torch.count_nonzero(p) > 0 for p in lora_b)  # the unscaled step moved LoRA
    assert any(not torch.equal(v, log_alpha[k]) for k, v in trainer.gates.log_alpha.items())
    assert precision.scaler.get_scale() > 0
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    # the state a checkpoint holds carries the scaler, so a resumed fp16 run continues with the same scale
    assert trainer.state_dict(2, "f")["scaler"]["scale"] == precision.scaler.get_scale()


def test_full_training_keeps_fp32_master_weights_under_fp16_autocast(tmp_path, monkeypatch):
    """train: full on a V100: the weights stay fp32 (the masters), the math runs in fp16 under autocast, and
    a scaled step moves every weight."""
    def choose(recipe, dist=SINGLE, full=False):
        assert full
        return Precision(torch.device("cpu"), torch.float32, torch.amp.GradScaler("cpu", init_scale=2.0**10), dist,
                         compute_dtype=torch.float16)
    monkeypatch.setattr(setup, "choose_precision", choose)
    save_tiny(tmp_path / "model", "llama", gqa=True)
    (tmp_path / "train.txt").write_text("\n\n".join("the cat sat on the mat " * 4 for _ in range(8)))
    recipe = Recipe(name="t", model={"path": str(tmp_path / "model")}, target={"sparsity": 0.3},
                    prompt={"text": "none"},
                    data={"path": str(tmp_path / "train.txt"), "format": "text", "max_seq_length": 24},
                    prune={"train": "full", "micro_batch_size": 2, "gradient_accumulation": 1,
                           "schedule": {"unit": "steps", "lora_only": 0, "ramp": 2, "hold": 0},
                           "lr": {"lora": 1e-2, "gates": 0.5, "lagrangian": 0.3}})
    model, tokenizer, precision = load_source(recipe, full=True)
    model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
    assert precision.autocast_dtype == torch.float16
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = build_dataset(recipe.data, tokenizer, "", 64)
    trainer = PruneTrainer(recipe, model, examples, Collator(pad_token_id(tokenizer)), precision,
                           CheckpointStore(tmp_path / "prune"))
    trainer.step(0)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())

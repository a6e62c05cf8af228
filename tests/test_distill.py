"""Distillation from the source (`prune.distill` / `finetune.distill`): the loss term, the teacher each stage
uses, that training with it pulls the student to the source, and the memory the plan gives it."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from compresso_ops.errors import UserError
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import MANIFEST_FILE, export_pruned, load_exact
from compresso_ops.recipe.schema import DistillSection, Recipe
from compresso_ops.stages.finetune import run_finetune
from compresso_ops.stages.plan import make_plan, with_overrides
from compresso_ops.stages.prune import PruneTrainer
from compresso_ops.training.batching import Collator
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.data import IGNORE, Example, build_dataset
from compresso_ops.training.distill import FrozenTeacher, distill_loss_sum, hidden_states_loss_sum
from compresso_ops.training.loop import lm_loss_sum
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import load_source, prepare_for_training
from tests.test_slice import random_masks
from tests.tiny import byte_tokenizer, save_tiny, tiny_model

CPU = Precision(torch.device("cpu"), torch.float32)


def test_the_loss_mixes_lm_and_tempered_kl_on_labelled_positions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[3, IGNORE, 4, 5, IGNORE], [IGNORE, 1, 2, IGNORE, 7]])
    lm = torch.tensor(2.5)
    assert distill_loss_sum(student, teacher, labels, lm, DistillSection(weight=0.0)) == lm
    assert distill_loss_sum(teacher, teacher, labels, lm, DistillSection(weight=1.0)).abs() < 1e-6
    keep = labels != IGNORE
    t = 2.0
    p = F.softmax(teacher[keep] / t, -1)
    kl = (p * (p.log() - F.log_softmax(student[keep] / t, -1))).sum() * t * t
    got = distill_loss_sum(student, teacher, labels, lm, DistillSection(weight=0.3, temperature=t))
    assert got == pytest.approx((0.7 * lm + 0.3 * kl).item(), rel=1e-5)


def test_with_a_shared_prefix_the_distilled_loss_equals_the_plain_forwards():
    """The teacher runs the same shared-prefix forward as the student; the sum equals one plain forward's."""
    student, source = tiny_model("qwen3", seed=1), tiny_model("qwen3", seed=2)
    g = torch.Generator().manual_seed(0)
    head = torch.randint(0, 256, (24,), generator=g).tolist()
    rows = [head + torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 1)]
    batch = Collator(258)([Example(r, [IGNORE] * 20 + r[20:]) for r in rows])
    section = DistillSection(weight=0.4, temperature=1.5)
    got = lm_loss_sum(student, batch, CPU, FrozenTeacher(source, CPU), section)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    taught = source(input_ids=ids, attention_mask=mask).logits[:, :-1]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert got.item() == pytest.approx(distill_loss_sum(logits, taught, labels, lm, section).item(), rel=1e-5)


def test_the_hidden_state_term_is_each_labelled_positions_relative_distance_averaged_over_layers():
    g = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 5, 4, generator=g) for _ in range(4))  # embeddings, 3 layers (the last: KL's)
    student = tuple(t + 0.3 * torch.randn(t.shape, generator=g) for t in teacher)
    targets = torch.tensor([[3, IGNORE, 4, 5], [IGNORE, 1, 2, IGNORE]])
    assert hidden_states_loss_sum(teacher, teacher, targets) == 0
    keep = targets != IGNORE
    expected = sum((((s[:, :-1] - t[:, :-1]).pow(2).sum(-1) / t[:, :-1].pow(2).sum(-1))[keep]).sum()
                   for s, t in zip(student[1:3], teacher[1:3], strict=True)) / 2
    assert hidden_states_loss_sum(student, teacher, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    elsewhere = [s.clone() for s in student]
    elsewhere[0] += 5.0  # the embeddings,
    elsewhere[3] += 5.0  # the last layer (the KL term's),
    elsewhere[1][0, 1] += 5.0  # an unlabelled position,
    elsewhere[2][:, -1] += 5.0  # and the last position (it predicts nothing) do not count
    assert hidden_states_loss_sum(tuple(elsewhere), teacher, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(UserError, match="hidden size"):  # a recipe built in code with hidden dims pruned
        hidden_states_loss_sum(tuple(s[..., :3] for s in student), teacher, targets)


def test_the_hidden_state_term_adds_to_the_distilled_loss_with_its_weight():
    """Rows sharing a prompt prefix forward whole (the term needs every position's states): the sum is the
    plain forwards' distilled loss plus the weighted term."""
    student, source = tiny_model("mistral", seed=1), tiny_model("mistral", seed=2)
    g = torch.Generator().manual_seed(0)
    head = torch.randint(0, 256, (24,), generator=g).tolist()
    rows = [head + torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 1)]
    batch = Collator(258)([Example(r, [IGNORE] * 20 + r[20:]) for r in rows])
    section = DistillSection(weight=0.4, temperature=1.5, hidden_states_weight=3.0)
    got = lm_loss_sum(student, batch, CPU, FrozenTeacher(source, CPU), section)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
    out = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    taught = source(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = out.logits[:, :-1]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    expected = distill_loss_sum(logits, taught.logits[:, :-1], labels, lm, section) + 3.0 * hidden_states_loss_sum(
        out.hidden_states, taught.hidden_states, labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = lm_loss_sum(student, batch, CPU, FrozenTeacher(source, CPU), DistillSection(weight=0.4, temperature=1.5))
    assert got.item() > plain.item() + 1e-3


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distill")
    save_tiny(folder / "model", "llama", gqa=True)
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "sun"]
    (folder / "train.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) + "."
                                                  for _ in range(24)))
    return folder


def _recipe(folder, **sections) -> Recipe:
    return Recipe(name="t", model={"path": str(folder / "model")}, target={"sparsity": 0.4}, prompt={"text": "none"},
                  data={"path": str(folder / "train.txt"), "format": "text", "max_seq_length": 32}, **sections)


@pytest.mark.parametrize("train", ["lora", "full"])
def test_the_prune_stages_teacher_is_the_untouched_source(source_dir, tmp_path, train):
    """LoRA: the student's own base with adapters and gates off; full: a frozen copy. Either way its logits
    are the source's while the student's adapters or weights and gates have moved, and the student's gates are
    back on afterwards."""
    recipe = _recipe(source_dir, prune={"train": train, "distill": {"weight": 0.5}, "micro_batch_size": 2,
                                        "gradient_accumulation": 1,
                                        "schedule": {"unit": "steps", "lora_only": 0, "ramp": 4, "hold": 0}})
    model, tokenizer, precision = load_source(recipe, full=train == "full")
    examples = build_dataset(recipe.data, tokenizer, "", 256)
    model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
    trainer = PruneTrainer(recipe, model, examples, Collator(258), precision, CheckpointStore(tmp_path))
    assert (trainer.teacher.model is model) == (train == "lora")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.tensor([examples[0].input_ids])
    trainer.hooks.set({k: v.detach() for k, v in trainer.gates.sample().items()})
    with torch.no_grad():
        gated = model(input_ids=ids).logits
        with trainer.teacher.active():
            taught = trainer.teacher.model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    reference = tiny_model("llama", gqa=True)(input_ids=ids).logits
    torch.testing.assert_close(taught, reference, rtol=1e-5, atol=1e-5)
    assert (gated - reference).abs().max() > 1e-3
    torch.testing.assert_close(again, gated)


@pytest.mark.parametrize("train", ["lora", "full"])
def test_the_prune_stage_distils_hidden_states_through_its_gates(source_dir, tmp_path, train):
    """Gated heads and FFN channels (the hidden size kept), the teacher the student's own base (LoRA) or a
    copy: the steps' losses carry the hidden-state term, and are finite."""
    prune = {"train": train, "micro_batch_size": 2, "gradient_accumulation": 1,
             "schedule": {"unit": "steps", "lora_only": 0, "ramp": 2, "hold": 0}}
    losses = {}
    for states in (0.0, 2.0):
        recipe = _recipe(source_dir, prune={**prune, "distill": {"weight": 0.5, "hidden_states_weight": states}})
        recipe = with_overrides(recipe, {"target.structures": ["heads", "ffn"]})
        model, tokenizer, precision = load_source(recipe, full=train == "full")
        examples = build_dataset(recipe.data, tokenizer, "", 256)
        model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
        trainer = PruneTrainer(recipe, model, examples, Collator(258), precision, CheckpointStore(tmp_path / str(states)))
        losses[states] = trainer.step(0)["lm_loss"]
    assert math.isfinite(losses[2.0]) and losses[2.0] > losses[0.0]


def _kl_to_source(model: torch.nn.Module, source: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return F.kl_div(F.log_softmax(model(input_ids=ids).logits, -1), F.log_softmax(source(input_ids=ids).logits, -1),
                        log_target=True, reduction="batchmean").item()


def test_distilled_fine_tune_moves_the_student_towards_the_source_and_says_so(source_dir, tmp_path):
    source = tiny_model("llama", gqa=True)
    export_pruned(source, byte_tokenizer(), random_masks(ArchSpec.from_hf_config(source.config), no_heads_layer=None),
                  "native", tmp_path / "sliced", source_info={"path": "tiny", "revision": None, "dtype": "float32"})
    finetune = {"unit": "steps", "duration": 12, "lr": 3e-3, "train": "full", "micro_batch_size": 2,
                "gradient_accumulation": 1, "distill": {"weight": 1.0}}
    run_finetune(_recipe(source_dir, finetune=finetune), tmp_path / "sliced", tmp_path / "finetune")
    ids = torch.tensor([build_dataset(_recipe(source_dir).data, byte_tokenizer(), "", 256)[1].input_ids])
    before = _kl_to_source(load_exact(tmp_path / "sliced", torch.float32), source, ids)
    after = _kl_to_source(load_exact(tmp_path / "finetune" / "model", torch.float32), source, ids)
    assert after < 0.8 * before
    recovery = json.loads((tmp_path / "finetune" / "model" / MANIFEST_FILE).read_text())["finetune"]["recovery"]
    assert recovery["distill"] == {"teacher": "source", "weight": 1.0, "temperature": 1.0}


def _hidden_state_distance(model: torch.nn.Module, source: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out, taught = model(input_ids=ids, output_hidden_states=True), source(input_ids=ids, output_hidden_states=True)
    return hidden_states_loss_sum(out.hidden_states, taught.hidden_states, ids[:, 1:]).item()


def test_hidden_state_distillation_pulls_the_students_layers_to_the_sources_and_says_so(source_dir, tmp_path):
    source = tiny_model("llama", gqa=True)
    arch = ArchSpec.from_hf_config(source.config)
    export_pruned(source, byte_tokenizer(), random_masks(arch, hidden=False, no_heads_layer=None, no_ffn_layer=None),
                  "native", tmp_path / "sliced", source_info={"path": "tiny", "revision": None, "dtype": "float32"})
    ids = torch.tensor([build_dataset(_recipe(source_dir).data, byte_tokenizer(), "", 256)[1].input_ids])
    after = {}
    for states in (0.0, 4.0):
        finetune = {"unit": "steps", "duration": 12, "lr": 3e-3, "train": "full", "micro_batch_size": 2,
                    "gradient_accumulation": 1, "distill": {"weight": 0.5, "hidden_states_weight": states}}
        out = tmp_path / f"finetune-{states}"
        run_finetune(_recipe(source_dir, finetune=finetune), tmp_path / "sliced", out)
        after[states] = _hidden_state_distance(load_exact(out / "model", torch.float32), source, ids)
        recovery = json.loads((out / "model" / MANIFEST_FILE).read_text())["finetune"]["recovery"]
    assert after[4.0] < 0.8 * after[0.0]
    assert recovery["distill"] == {"teacher": "source", "weight": 0.5, "temperature": 1.0, "hidden_states_weight": 4.0}


def _memory(stage: str, **sections) -> dict:
    recipe = Recipe(name="t", model={"path": "unused", "architecture": "llama-7b"}, target={"sparsity": 0.3},
                    hardware={"gpu": "V100-32GB"}, **sections)
    return make_plan(recipe)["memory"]["stages"][stage]["breakdown"]


def test_the_plan_counts_a_teacher_only_where_one_is_loaded():
    on = {"distill": {"weight": 0.5}}
    assert "teacher_weights" not in _memory("finetune") and "teacher_weights" not in _memory("prune")
    finetune = _memory("finetune", finetune=on)
    assert finetune["teacher_weights"] == _memory("prune")["frozen_weights"]  # the source, fp16
    assert finetune["distill_logits"] > 0
    prune_lora = _memory("prune", prune=on)
    assert prune_lora["teacher_weights"] == 0 and prune_lora["distill_logits"] > 0  # its own base serves
    prune_full = _memory("prune", prune={**on, "train": "full"})
    assert prune_full["teacher_weights"] == _memory("prune")["frozen_weights"]
    assert "distill_hidden_states" not in finetune
    states = _memory("finetune", finetune={"distill": {"weight": 0.5, "hidden_states_weight": 2.0}})
    assert states["distill_hidden_states"] > 0 and states["teacher_weights"] == finetune["teacher_weights"]

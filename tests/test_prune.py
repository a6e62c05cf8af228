"""The prune stage end to end on tiny models: reaching the target, resuming, failing clearly."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

import compresso_ops.stages.prune as prune_mod
from compresso_ops.errors import StageError, UserError
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params, prunable_sparsity
from compresso_ops.recipe.schema import ModelSection, PruneSchedule, Recipe, TargetSection
from compresso_ops.stages.prune import prune_phases, run_prune
from compresso_ops.training.loop import make_scheduler
from tests.tiny import STORIES260K, TINYSTORIES, save_tiny, tiny_config

EVENT_KEYS = {"step", "lm_loss", "lagrangian", "expected_sparsity", "target_sparsity", "lambda1", "lambda2", "lr"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny(folder / "model", "llama", gqa=True)
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "sun", "moon", "tree", "happy", "sad"]
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(60))
    (folder / "train.txt").write_text(text)
    return folder


def _recipe(folder, *, sparsity=0.5, schedule=(1, 4, 4), data=None, **prune) -> Recipe:
    lora_only, ramp, hold = schedule
    settings = {"schedule": {"unit": "steps", "lora_only": lora_only, "ramp": ramp, "hold": hold},
                "micro_batch_size": 4, "gradient_accumulation": 1, "checkpoint_every": 100,
                "lr": {"lora": 1e-3, "gates": 0.3, "lagrangian": 0.1}}
    settings.update(prune)
    return Recipe(name="t", model={"path": str(folder / "model")}, target={"sparsity": sparsity},
                  prompt={"text": "none"},
                  data=data or {"path": str(folder / "train.txt"), "format": "text", "max_seq_length": 32,
                                "max_samples": 32},
                  prune=settings)


def _events(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "events.jsonl").read_text().splitlines()]


def test_reaches_the_target_and_writes_its_outputs(tiny_dir, tmp_path):
    recipe = _recipe(tiny_dir, sparsity=0.5, schedule=(1, 80, 160))
    seen = []
    out = run_prune(recipe, tmp_path, on_event=seen.append)
    assert out["completed"] and abs(out["expected_sparsity"] - 0.5) < 0.01
    arch = ArchSpec.from_pretrained_dir(tiny_dir / "model")
    masks = Masks.load(tmp_path)
    masks.validate(arch)
    achieved = prunable_sparsity(arch, masks.kept())
    assert achieved == pytest.approx(out["achieved_sparsity"]) and 0.5 <= achieved < 0.52
    summary = json.loads((tmp_path / "masks.json").read_text())
    assert summary["prune"]["target_sparsity"] == 0.5
    assert (tmp_path / "lora" / "adapter_config.json").is_file() and (tmp_path / "gates.safetensors").is_file()
    events = _events(tmp_path)
    assert len(events) == len(seen) == 241 and [e["step"] for e in events] == list(range(1, 242))
    assert EVENT_KEYS <= set(events[0]) and events[0]["phase"] == "lora_only" and events[0]["lagrangian"] == 0.0
    assert events[-1]["target_sparsity"] == 0.5 and events[40]["target_sparsity"] == pytest.approx(0.5 * 40 / 80)
    assert events[-1]["lambda2"] > 0  # trained by ascent


def test_resume_continues_the_same_trajectory(tiny_dir, tmp_path):
    """A run stopped after 7 steps (checkpoint at 5) and resumed ends exactly where an uninterrupted run
    does: same gates, same LoRA, same event log. LoRA dropout makes the RNG state matter."""
    recipe = _recipe(tiny_dir, schedule=(2, 6, 4), checkpoint_every=5, gradient_accumulation=2,
                     lora={"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "o_proj"]})
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_prune(recipe, whole)
    partial = run_prune(recipe, split, max_steps=7)
    assert partial == {"completed": False, "total_steps": 12}
    assert len(_events(split)) == 7 and not (split / "masks.safetensors").exists()
    run_prune(recipe, split)
    for name in ("gates.safetensors", "masks.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(split / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def strip(events):
        return [{k: v for k, v in e.items() if k != "time_s"} for e in events]

    assert strip(_events(whole)) == strip(_events(split))


def test_a_source_with_nan_weights_is_refused_at_load(tiny_dir, tmp_path):
    """A damaged checkpoint (NaN in one weight) used to fail the first step with advice to lower the learning
    rate (or, with magnitude, the slice's export check); it is refused at load, naming the tensor."""
    from tests.tiny import byte_tokenizer, tiny_model

    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text((tiny_dir / "train.txt").read_text())
    for method in ("compresso", "magnitude"):
        recipe = _recipe(tmp_path).model_copy(update={"method": method})
        with pytest.raises(UserError, match=r"model\.path: .*1 weight tensor\(s\) hold NaN or inf \(first: "
                                            r"model\.layers\.1\.self_attn\.o_proj\.weight\)") as info:
            run_prune(recipe, tmp_path / method)
        assert "\n" not in str(info.value)


def test_a_non_finite_first_step_does_not_blame_the_learning_rate(tiny_dir, tmp_path, monkeypatch):
    real = prune_mod.lm_loss_sum
    monkeypatch.setattr(prune_mod, "lm_loss_sum", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(StageError, match="lm_loss is NaN/inf at step 1, before any weight was updated") as info:
        run_prune(_recipe(tiny_dir), tmp_path)
    assert "lr" not in str(info.value)


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tiny_dir, tmp_path, monkeypatch):
    recipe = _recipe(tiny_dir, schedule=(1, 6, 3), checkpoint_every=3)
    real, calls = prune_mod.lm_loss_sum, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 8 else loss

    monkeypatch.setattr(prune_mod, "lm_loss_sum", poisoned)
    with pytest.raises(StageError, match="lm_loss became NaN/inf at step 8.*step 6") as info:
        run_prune(recipe, tmp_path)
    assert "\n" not in str(info.value)
    assert json.loads((tmp_path / "checkpoints" / "last" / "meta.json").read_text())["step"] == 6
    assert len(_events(tmp_path)) == 7
    monkeypatch.setattr(prune_mod, "lm_loss_sum", real)
    out = run_prune(recipe, tmp_path)  # resumes from step 6 once the cause is gone
    assert out["completed"] and [e["step"] for e in _events(tmp_path)] == list(range(1, 11))


def test_user_errors_are_one_line_and_name_the_field(tiny_dir, tmp_path):
    bad_lora = _recipe(tiny_dir, lora={"target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(UserError, match=r"^prune\.lora\.target_modules: qkv_proj matches no module") as info:
        run_prune(bad_lora, tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = _recipe(tiny_dir, data={"path": str(tmp_path / "empty.txt"), "format": "text", "max_seq_length": 32})
    with pytest.raises(UserError, match="no training examples"):
        run_prune(empty, tmp_path)
    too_long = _recipe(tiny_dir, data={"path": str(tiny_dir / "train.txt"), "format": "text", "max_seq_length": 300})
    with pytest.raises(UserError, match="data.max_seq_length 300 exceeds the model's max_position_embeddings 256"):
        run_prune(too_long, tmp_path)
    assert not (tmp_path / "events.jsonl").exists()


def test_missing_model_is_a_user_error(tiny_dir, tmp_path):
    recipe = _recipe(tiny_dir).model_copy(update={"model": ModelSection(path=str(tmp_path / "nowhere"))})
    with pytest.raises(UserError, match="^model.path: cannot load"):
        run_prune(recipe, tmp_path)


def test_schedule_in_epochs_and_learning_rate_shapes(tiny_dir):
    recipe = _recipe(tiny_dir, gradient_accumulation=2)
    recipe.prune.schedule = PruneSchedule(unit="epochs", lora_only=1, ramp=2.5, hold=1)
    phases = prune_phases(recipe, num_examples=30)  # 30 examples, 8 per step: 4 steps an epoch
    assert (phases.steps_per_epoch, phases.lora_only, phases.ramp, phases.hold) == (4, 4, 10, 4)
    assert [phases.name(s) for s in (3, 4, 13, 14)] == ["lora_only", "ramp", "ramp", "hold"]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cosine = make_scheduler(opt, "cosine", total_steps=12, warmup_steps=2)
    lrs = []
    for _ in range(12):
        lrs.append(cosine.get_last_lr()[0])
        opt.step()
        cosine.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0]) and lrs[7] == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_target_params_set_the_sparsity_reached(tiny_dir, tmp_path):
    arch = ArchSpec.from_hf_config(tiny_config("llama", gqa=True))
    src = count_params(arch)
    recipe = _recipe(tiny_dir, schedule=(0, 2, 0))
    recipe.target = TargetSection(params=src.total - src.prunable // 4, structures=["heads", "ffn"])
    out = run_prune(recipe, tmp_path)
    assert out["target_sparsity"] == pytest.approx(0.25) and out["achieved_sparsity"] >= 0.25
    assert out["params"]["total"] <= recipe.target.params


def test_stories260k_reaches_the_target(shared, tmp_path):
    """A real pretrained model pushes back (pruning hurts its loss); the Lagrangian still gets there."""
    recipe = Recipe(
        name="stories", model={"path": str(STORIES260K)}, target={"sparsity": 0.3}, prompt={"text": "Once upon a time"},
        data={"path": str(TINYSTORIES / "train.txt"), "format": "text", "max_seq_length": 64, "max_samples": 64},
        prune={"schedule": {"unit": "steps", "lora_only": 2, "ramp": 100, "hold": 300}, "micro_batch_size": 1,
               "gradient_accumulation": 1, "lr": {"lora": 1e-3, "gates": 0.5, "lagrangian": 0.3}},
    )
    run_prune(recipe, tmp_path)
    events = _events(tmp_path)
    late = [e["expected_sparsity"] for e in events[-100:]]
    assert abs(sum(late) / len(late) - 0.3) < 0.02  # the gates settle around the target
    arch = ArchSpec.from_pretrained_dir(STORIES260K)
    assert 0.3 <= prunable_sparsity(arch, Masks.load(tmp_path).kept()) < 0.31
    assert max(e["lm_loss"] for e in events[-100:]) < 5.0  # still a language model (ln 512 = 6.2 is chance)

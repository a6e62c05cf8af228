"""Hostile inputs and damaged run folders: each ends in exit 2 with a message naming the file (and line or
field), or in a healthy result; never exit 1, a hang, or exit 0 over a broken artifact."""

from __future__ import annotations

import errno
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import compresso_ops.training.checkpoints as checkpoints_mod
from compresso_ops.cli import main
from compresso_ops.errors import StageError, UserError
from compresso_ops.evaluation.measures import perplexity
from compresso_ops.infra import atomic
from compresso_ops.infra.lock import RunLock
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.recipe.schema import PerplexitySection, Recipe
from compresso_ops.stages.plan import make_plan
from compresso_ops.stages.preflight import DISK_FLOOR, disk_needed
from compresso_ops.stages.prune import fingerprint, run_prune
from compresso_ops.training.checkpoints import CheckpointStore
from compresso_ops.training.loop import DivergenceGuard
from tests.test_apply import RECIPE, _setup
from tests.test_prune import _recipe
from tests.tiny import REPO_ROOT, STORIES260K, TINYSTORIES, byte_tokenizer


def _cli(*args: str):
    return CliRunner().invoke(main, list(args))


def _report(run: Path):
    """`report RUN -o FILE` beside the run (the default writes charts into the working folder)."""
    return _cli("report", str(run), "-o", str(run.parent / f"{run.name}-report.md"))


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny model, its data and a valid recipe (recipe.yaml) to derive hostile variants from."""
    folder = tmp_path_factory.mktemp("hostile")
    _setup(folder)
    return folder


def _variant(assets: Path, name: str, text: str) -> Path:
    path = assets / name
    path.write_text(textwrap.dedent(text))
    return path


def _recipe_text(assets: Path, run_dir: str = "run", **replace: str) -> str:
    text = textwrap.dedent(RECIPE.format(run_dir=assets / run_dir, hold=4, ft_steps=3))
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


# ------------------------------------------------------------------------------------------ recipe inputs


ALIAS_BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: [*g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize(("text", "line", "needle"), [
    (ALIAS_BOMB, 2, "aliases"),
    ("name: x\nmodel: &m [*m]\n", 2, "aliases"),
    ("name: x\nmodel: " + "[" * 5000 + "]" * 5000 + "\n", 1, "nests too deeply"),
])
def test_yaml_aliases_and_deep_nesting_are_refused_at_their_line(tmp_path, text, line, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    result = _cli("validate", str(path))
    assert time.monotonic() - t0 < 10
    assert result.exit_code == 2, result.output
    assert f"bad.yaml:{line}: yaml:" in result.output and needle in result.output


@pytest.mark.parametrize(("replace", "field", "needle"), [
    ({"  micro_batch_size: 4\n": "  micro_batch_size: 99999999999999999999999999\n"}, "prune.micro_batch_size",
     "less than or equal"),
    ({"duration: 3,": "duration: 1.0e30,"}, "finetune", "above the limit"),
    ({"finetune: {unit: steps, duration: 3,": "finetune: {unit: epochs, duration: 1.0e5,"}, "finetune",
     "above the limit of 10,000 epochs"),
    ({"hold: 4}": "hold: 1.0e30}"}, "prune.schedule", "above the limit"),
    ({"max_seq_length: 200": "max_seq_length: 100000000"}, "data.max_seq_length", "less than or equal"),
    ({"max_seq_length: 200": "max_seq_length: 4096"}, "data.max_seq_length", "limit of 256 positions"),
    ({"window: 64": "window: 1000"}, "eval.perplexity.window", "limit of 256 positions"),
    ({"speed: {enabled: false}": "speed: {enabled: true, prompt_length: 200, new_tokens: 100}"},
     "eval.speed.prompt_length", "prompt_length + new_tokens = 300"),
    ({"max_seq_length: 200}": "max_seq_length: 200, num_examples: 3}"}, "prune.micro_batch_size",
     "larger than the dataset's 3 examples"),
    ({"  checkpoint_every: 2\n": "  checkpoint_every: 2\n  seed: 99999999999999999999999\n"}, "prune.seed",
     "less than or equal"),
    ({"name: tiny": "name: /some/abs/path"}, "name", "not a folder name"),
    ({"name: tiny": "name: ../../x"}, "name", "not a folder name"),
    ({"name: tiny": "name: " + "n" * 5000}, "name", "5,000 characters"),
    ({"name: tiny": 'name: "a\\tb"'}, "name", "control characters"),
])
def test_values_that_exhaust_memory_time_or_escape_runs_are_refused(assets, replace, field, needle):
    path = _variant(assets, "bounds.yaml", _recipe_text(assets, **replace))
    result = _cli("validate", str(path))
    assert result.exit_code == 2, result.output
    assert f": {field}: " in result.output and needle in result.output, result.output


def test_micro_batch_larger_than_the_dataset_is_refused_before_training(assets, tmp_path):
    recipe = load_recipe(_variant(assets, "mbs.yaml", _recipe_text(
        assets, **{"  micro_batch_size: 4\n": "  micro_batch_size: 1000\n"})))
    with pytest.raises(UserError, match="prune.micro_batch_size: 1,000 is larger than the dataset's 32 examples"):
        run_prune(recipe, tmp_path)


def test_model_folder_without_tokenizer(assets, tmp_path):
    model = tmp_path / "notok"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(assets / "model" / name, model / name)
    path = _variant(assets, "notok.yaml", _recipe_text(assets, **{"{path: model}": f"{{path: {model}}}"}))
    result = _cli("validate", str(path))
    assert result.exit_code == 2 and ":3: model.path:" in result.output and "no tokenizer" in result.output


@pytest.mark.parametrize(("change", "needle"), [
    ({"hidden_size": 10**15}, "hidden_size is 1000000000000000; a usable config gives a whole number from 1 to"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"intermediate_size": -5}, "intermediate_size is -5"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers is '2'"),
    ({"hidden_size": 32.5}, "hidden_size is 32.5"),
    ({"hidden_size": None}, "lacks the field 'hidden_size'"),
])
def test_a_damaged_config_json_is_refused_at_model_path(assets, tmp_path, change, needle):
    """validate ran out of memory on hidden_size 1e15 (the default alignment listed every multiple of 64 below
    it), and passed 0 heads, negative or fractional widths on to the stages."""
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    config = json.loads((model / "config.json").read_text()) | change
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    path = _variant(assets, "badconfig.yaml", _recipe_text(assets, **{"{path: model}": f"{{path: {model}}}"}))
    for command in ("validate", "plan"):
        result = _cli(command, str(path))
        assert result.exit_code == 2, result.output
        assert f":3: model.path: {model / 'config.json'}: " in result.output and needle in result.output


def test_truncated_source_weights(assets, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20000])
    path = _variant(assets, "truncsrc.yaml", _recipe_text(assets, run_dir=str(tmp_path / "run"),
                                                          **{"{path: model}": f"{{path: {model}}}"}))
    result = _cli("apply", str(path), "--plain")
    assert result.exit_code == 2, result.output
    assert f"model.path: cannot load '{model}'" in result.output and "restore the model's files" in result.output
    assert _state(tmp_path / "run")["stages"]["prune"]["status"] == "failed"


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q2"}\n', "line 2: lacks field(s)"),
    (b'{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": \n', "2: not valid JSON"),
    (b'{"question": "q\xff\xfe", "choices": ["a"], "answer": 0}\n', "not UTF-8"),
    (b"", "no rows"),
])
def test_malformed_local_eval_task_file(assets, tmp_path, content, needle):
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_bytes(content)
    path = _variant(assets, "quiz.yaml", _recipe_text(assets, **{"data: quiz.jsonl": f"data: {quiz}"}))
    result = _cli("validate", str(path))
    assert result.exit_code == 2, result.output
    assert "eval.local_tasks[0].data:" in result.output and needle in result.output and str(quiz) in result.output


def test_non_utf8_training_data(assets, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"instruction": "add \xff\xfe", "output": "2"}\n')
    path = _variant(assets, "utf8.yaml", _recipe_text(assets, **{"path: train.jsonl": f"path: {data}"}))
    for command in (["plan"], ["apply", "--plain"]):
        result = _cli(*command, str(path))
        assert result.exit_code == 2, result.output
        assert f"{data}: not UTF-8 text" in result.output


def test_non_utf8_perplexity_text(tmp_path):
    text = tmp_path / "dev.txt"
    text.write_bytes(b"one two \xff\xfe three")
    with pytest.raises(UserError, match=f"{text}: not UTF-8 text"):
        perplexity(None, byte_tokenizer(), PerplexitySection(path=text, window=16, stride=8))


def test_from_after_until_is_refused(assets):
    result = _cli("apply", str(assets / "recipe.yaml"), "--from", "slice", "--until", "prune")
    assert result.exit_code == 2 and "--from slice comes after --until prune" in result.output


def test_report_on_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = _cli("report", str(tmp_path))
    assert result.exit_code == 2 and "not a run folder" in result.output


@pytest.mark.parametrize("content", [b"\x00\xff binary \x93", b"[1, 2]", b'{"stages": [1]}', b'{"stages": {"a": 1'])
def test_garbled_state_json(assets, tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.json").write_bytes(content)
    path = _variant(assets, "garbled.yaml", _recipe_text(assets, run_dir=str(run)))
    for args in (["apply", str(path), "--plain"], ["report", str(run)]):
        result = _cli(*args)
        assert result.exit_code == 2, result.output
        assert f"{run / 'state.json'}: damaged" in result.output and "delete it" in result.output


# ------------------------------------------------------------------------------------ damaged run folders


@pytest.fixture(scope="module")
def finished(assets) -> Path:
    """One finished run; tests damage copies of it."""
    result = _cli("apply", str(assets / "recipe.yaml"), "--plain")
    assert result.exit_code == 0, result.output
    return assets / "run"


def _copy_run(assets: Path, finished: Path, name: str, **replace: str) -> tuple[Path, Path]:
    run = assets / name
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(finished, run)
    return run, _variant(assets, f"{name}.yaml", _recipe_text(assets, run_dir=name, **replace))


def test_every_artifact_is_hashed_and_every_file_has_the_usual_permissions(finished):
    state = _state(finished)
    assert {"prune/masks.safetensors", "prune/gates.safetensors", "prune/lora/adapter_model.safetensors"} <= set(
        state["stages"]["prune"]["artifacts"])
    assert "slice/model/model.safetensors" in state["stages"]["slice"]["artifacts"]
    assert "finetune/model/model.safetensors" in state["stages"]["finetune"]["artifacts"]
    meta = json.loads((finished / "prune" / "checkpoints" / "last" / "meta.json").read_text())
    assert len(meta["sha256"]) == 64
    mode = 0o666 & ~atomic.umask()
    wrong = {str(p.relative_to(finished)): oct(p.stat().st_mode & 0o777) for p in finished.rglob("*")
             if p.is_file() and p.stat().st_mode & 0o777 != mode}
    assert not wrong


def test_safetensors_written_atomically_honour_the_umask(tmp_path):
    before = os.umask(0o027)
    try:
        atomic.write_with(tmp_path / "x.safetensors", lambda p: save_file({"a": torch.zeros(2)}, str(p)))
        with atomic.atomic_dir(tmp_path / "folder") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "y.safetensors"))
    finally:
        os.umask(before)
    assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder" / "y.safetensors").stat().st_mode & 0o777 == 0o640


def test_truncated_final_model_is_reported_then_rebuilt_identically(assets, finished):
    run, recipe = _copy_run(assets, finished, "truncated")
    weights = run / "finetune" / "model" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    result = _report(run)
    assert result.exit_code == 2 and f"{weights}: damaged" in result.output
    result = _cli("apply", str(recipe), "--plain")
    assert result.exit_code == 0, result.output
    assert "model.safetensors is not the file this stage wrote" in result.output
    assert "[prune] skipped" in result.output and "[slice] skipped" in result.output
    assert weights.read_bytes() == good  # resumed from its final checkpoint: the same model
    assert _report(run).exit_code == 0
    assert "model files: all 7 match the sha256" in (run.parent / "truncated-report.md").read_text()


def test_bit_flipped_masks_rerun_the_prune_stage(assets, finished):
    run, recipe = _copy_run(assets, finished, "flipped")
    masks = run / "prune" / "masks.safetensors"
    good = masks.read_bytes()
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    masks.write_bytes(bytes(flipped))
    result = _cli("apply", str(recipe), "--plain", "--until", "slice")
    assert result.exit_code == 0, result.output
    assert "masks.safetensors is not the file this stage wrote" in result.output
    assert masks.read_bytes() == good


def test_torn_and_binary_event_lines_are_dropped(assets, finished):
    run, recipe = _copy_run(assets, finished, "torn")
    with open(run / "events.jsonl", "ab") as fh:
        fh.write(b'{"time": "x", "event": "stage_st')
    with open(run / "prune" / "events.jsonl", "ab") as fh:
        fh.write(b"\x00\xff\xfe garbage\n{\"step\": 99, \"lm_lo")
    result = _report(run)
    assert result.exit_code == 0, result.output
    result = _cli("apply", str(recipe), "--plain", "--force", "--until", "plan")
    assert result.exit_code == 0, result.output
    lines = (run / "events.jsonl").read_bytes().splitlines()
    assert json.loads(lines[-1])["event"] == "stage_end"  # the new records start on a line of their own


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(assets, tmp_path):
    recipe = _recipe(assets, schedule=(2, 6, 4), checkpoint_every=2,
                     data={"path": str(assets / "train.jsonl"), "format": "alpaca", "max_seq_length": 200})
    whole = tmp_path / "whole"
    run_prune(recipe, whole)
    split = tmp_path / "split"
    run_prune(recipe, split, max_steps=7)  # stopped as a kill would: checkpoints of steps 4 and 6 kept
    last = split / "checkpoints" / "last" / "state.pt"
    last.write_bytes(last.read_bytes()[:100])
    notices: list[dict] = []
    run_prune(recipe, split, on_event=notices.append)
    assert [n["notice"] for n in notices if "notice" in n] == [
        f"checkpoint {split / 'checkpoints' / 'last'} is damaged; resuming from the previous one (step 4)"]
    assert (split / "masks.safetensors").read_bytes() == (whole / "masks.safetensors").read_bytes()
    steps = [json.loads(line)["step"] for line in (split / "events.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))

    for slot in ("last", "previous"):  # nothing usable: the stage starts over, and says so
        (split / "checkpoints" / slot / "state.pt").write_bytes(b"not a checkpoint")
    store = CheckpointStore(split)
    assert store.load(fingerprint(recipe)) is None
    assert store.notice == f"no usable checkpoint in {split / 'checkpoints'} (damaged); the stage starts over"


# ------------------------------------------------------------------------------------------- divergence


def test_divergence_guard_limits():
    uniform = math.log(32000)
    trained = DivergenceGuard(32000, "finetune.lr (now 1e+08)")
    store = CheckpointStore("/nonexistent")
    for step, loss in enumerate([2.0, 2.1, 9.9, 2.0, 9.9, 9.9], start=1):  # single spikes are tolerated
        trained.observe({"stage": "finetune", "step": step, "lm_loss": loss}, store)
    with pytest.raises(StageError, match=r"training diverged.*ln\(vocab\) = 10.37.*lower finetune.lr \(now 1e\+08\)"):
        trained.observe({"stage": "finetune", "step": 7, "lm_loss": uniform}, store)
    untrained = DivergenceGuard(32000, "x")
    for step in range(1, 20):  # an untrained model sits at ln(vocab) and is fine there
        untrained.observe({"step": step, "lm_loss": uniform + 0.2}, store)


def test_a_pretrained_model_driven_past_uniform_prediction_stops(shared, tmp_path):
    """stories260K starts at a loss of 4.4, well below ln(512) = 6.24; a learning rate of 100 drives it
    above that and keeps it there: the guard stops after three steps and keeps the checkpoint before."""
    recipe = Recipe(name="t", model={"path": str(STORIES260K)}, target={"sparsity": 0.3}, prompt={"text": "none"},
                    data={"path": str(TINYSTORIES / "dev.txt"), "format": "text", "max_seq_length": 64,
                          "max_samples": 16},
                    prune={"schedule": {"unit": "steps", "lora_only": 4, "ramp": 4, "hold": 4}, "micro_batch_size": 4,
                           "gradient_accumulation": 1, "checkpoint_every": 1,
                           "lr": {"lora": 100.0, "gates": 0.3, "lagrangian": 0.1}})
    with pytest.raises(StageError, match=r"training diverged.*ln\(vocab\) = 6.238.*step 1\).*lower prune.lr.lora "
                                         r"\(now 100\)"):
        run_prune(recipe, tmp_path)
    assert json.loads((tmp_path / "checkpoints" / "last" / "meta.json").read_text())["step"] == 1


@pytest.mark.parametrize("lr", [1e8, 1e4])
def test_a_huge_learning_rate_stops_with_a_message_that_names_it(assets, tmp_path, lr):
    recipe = _recipe(assets, schedule=(2, 12, 6), checkpoint_every=1, lr={"lora": lr, "gates": 0.3, "lagrangian": 0.1},
                     data={"path": str(assets / "train.jsonl"), "format": "alpaca", "max_seq_length": 200})
    with pytest.raises(StageError, match=rf"prune: .*lower prune.lr.lora \(now {re.escape(f'{lr:g}')}\)") as info:
        run_prune(recipe, tmp_path)
    assert "\n" not in str(info.value)
    kept = json.loads((tmp_path / "checkpoints" / "last" / "meta.json").read_text())["step"]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    limit = 2 * max(math.log(259), events[0]["lm_loss"])
    assert events[kept - 1]["lm_loss"] <= limit  # the kept checkpoint precedes the divergence
    assert not (tmp_path / "masks.safetensors").exists()


def test_diverging_finetune_exits_2_and_marks_the_stage_failed(assets, finished):
    run, recipe = _copy_run(assets, finished, "diverge", **{"duration: 3, lr: 1.0e-3": "duration: 8, lr: 1.0e8"})
    result = _cli("apply", str(recipe), "--plain")
    assert result.exit_code == 2, result.output
    assert "finetune.lr (now 1e+08)" in result.output
    assert _state(run)["stages"]["finetune"]["status"] == "failed"


# -------------------------------------------------------------------------------- failures and disk space


def test_a_failed_checkpoint_write_on_a_full_disk_leaves_the_stage_failed(assets, finished, monkeypatch):
    run, recipe = _copy_run(assets, finished, "full", **{"duration: 3,": "duration: 4,"})
    real_write_json = atomic.write_json
    full = []

    def no_space(*args, **kwargs):
        full.append(1)
        raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))

    def write_json(path, data):  # once the disk is full, the atomic state write fails too
        if full and Path(path).name == "state.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write_json(path, data)

    monkeypatch.setattr(checkpoints_mod.torch, "save", no_space)
    monkeypatch.setattr(atomic, "write_json", write_json)
    result = _cli("apply", str(recipe), "--plain")
    assert result.exit_code == 2, result.output
    assert "no space left" in result.output.lower() and "free space" in result.output
    entry = _state(run)["stages"]["finetune"]
    assert entry["status"] == "failed" and "No space left" in entry["error"]
    assert not list((run / "finetune" / "checkpoints").glob(".*.tmp"))


def test_disk_estimate_counts_exports_and_checkpoints(assets):
    recipe = load_recipe(assets / "recipe.yaml")
    stages = ["prune", "slice", "finetune", "evaluate"]
    need = disk_needed(recipe, make_plan(recipe), stages)
    assert need > DISK_FLOOR
    big = load_recipe(REPO_ROOT / "recipes" / "llama7b-5.4b.yaml", check_files=False)
    plan = make_plan(big)
    export = plan["params"]["export"][big.export.mode]["checkpoint_bytes"]
    assert export > 5e9 and disk_needed(big, plan, stages) >= 3 * export  # slice + finetune + one being replaced


# ----------------------------------------------------------------------------------------------- locks


def _break_stale_lock(run_dir: str, barrier, results, release) -> None:
    barrier.wait()
    try:
        RunLock(Path(run_dir), break_stale=True).acquire()
    except UserError as exc:
        results.put(("refused", str(exc)))
        return
    results.put(("won", os.getpid()))
    release.wait(30)  # hold the lock while the others try


def test_many_concurrent_breakers_of_a_stale_lock_find_exactly_one_winner(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ctx = multiprocessing.get_context("fork")
    n = 8
    for trial in range(10):
        run_dir = tmp_path / f"run{trial}"
        run_dir.mkdir()
        (run_dir / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "x"}))
        barrier, results, release = ctx.Barrier(n), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_break_stale_lock, args=(str(run_dir), barrier, results, release))
                 for _ in range(n)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in range(n)]
        release.set()
        for p in procs:
            p.join(30)
        winners = [o for o in outcomes if o[0] == "won"]
        assert len(winners) == 1, (trial, outcomes)
        assert all("another run" in o[1] for o in outcomes if o[0] == "refused")
        assert json.loads((run_dir / ".lock").read_text())["pid"] == winners[0][1]

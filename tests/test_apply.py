"""`compresso-ops apply` end to end on a tiny model: the full pipeline, idempotent resume, a real SIGKILL
during pruning, re-running only what a recipe edit touches, and the run lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.method.masks import Masks
from tests.tiny import REPO_ROOT, save_tiny

RECIPE = """
name: tiny
model: {{path: model}}
target: {{sparsity: 0.3}}
prompt: {{text: "Keep quality.", use_in: [prune, finetune, evaluate]}}
data: {{path: train.jsonl, format: alpaca, max_seq_length: 200}}
prune:
  lr: {{lora: 1.0e-3, gates: 0.5, lagrangian: 0.3}}
  schedule: {{unit: steps, lora_only: 2, ramp: 8, hold: {hold}}}
  micro_batch_size: 4
  gradient_accumulation: 1
  checkpoint_every: 2
finetune: {{unit: steps, duration: {ft_steps}, lr: 1.0e-3, micro_batch_size: 4, gradient_accumulation: 1}}
eval:
  local_tasks: [{{name: quiz, data: quiz.jsonl, format: multiple_choice}}]
  limit: 8
  batch_size: 8
  perplexity: {{path: dev.txt, window: 64, stride: 32}}
  speed: {{enabled: false}}
  compare_source: false
export: {{mode: native, dtype: float32}}
run_dir: {run_dir}
"""


def _setup(folder: Path, run_dir: str = "run", hold: int = 4, ft_steps: int = 3) -> Path:
    if not (folder / "model").exists():
        save_tiny(folder / "model", "llama")
        rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(32)]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        quiz = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 3)], "answer": 0}
                for i in range(8)]
        (folder / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quiz))
        (folder / "dev.txt").write_text("One plus one is two. Two plus two is four. " * 20)
    path = folder / "recipe.yaml"
    path.write_text(textwrap.dedent(RECIPE.format(run_dir=folder / run_dir, hold=hold, ft_steps=ft_steps)))
    return path


def _apply(recipe: Path, *args: str):
    result = CliRunner().invoke(main, ["apply", str(recipe), "--plain", *args])
    return result


def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("apply")
    recipe = _setup(folder)
    result = _apply(recipe)
    assert result.exit_code == 0, result.output
    (folder / "apply-output.txt").write_text(result.output)
    return folder, recipe


def test_full_apply_produces_every_artifact(finished_run):
    folder, _ = finished_run
    run = folder / "run"
    state = _state(run)
    assert {k: v["status"] for k, v in state["stages"].items()} == {
        s: "done" for s in ("plan", "prune", "slice", "finetune", "evaluate", "report")}
    for artifact in ("plan/plan.json", "prune/masks.safetensors", "prune/lora/adapter_config.json",
                     "slice/model/config.json", "slice/model/compresso_manifest.json",
                     "finetune/model/model.safetensors", "evaluate/pruned.json", "report.md",
                     "recipe.resolved.yaml", "events.jsonl"):
        assert (run / artifact).is_file(), artifact
    manifest = json.loads((run / "finetune" / "model" / "compresso_manifest.json").read_text())
    assert manifest["checks"]["passed"]
    assert "quiz" in (run / "report.md").read_text()
    output = (folder / "apply-output.txt").read_text()
    assert "[finetune] done" in output and "frozen base replicated" in output
    # lm-eval's request bars stay off (it overrides TQDM_DISABLE, which bars of libraries imported before
    # `apply` starts, as in this test process, read too early anyway)
    assert "Running loglikelihood" not in output


def test_second_apply_does_no_work(finished_run):
    folder, recipe = finished_run
    run = folder / "run"
    before = _state(run)
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "state.json"
              and p.name != "events.jsonl" and p.name != "recipe.resolved.yaml"}
    result = _apply(recipe)
    assert result.exit_code == 0, result.output
    after = _state(run)
    for name, entry in after["stages"].items():
        assert entry["started"] == before["stages"][name]["started"], name
    assert result.output.count("skipped") == 6
    assert "skipped in" not in result.output and "ran earlier in" in result.output  # a skip takes no time
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())


def test_the_shipped_folder_has_a_model_card_with_the_evaluation(finished_run):
    folder, _ = finished_run
    card = (folder / "run" / "finetune" / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "## Evaluation" in card and "| quiz |" in card and "Not evaluated yet" not in card
    assert "Not evaluated yet" in (folder / "run" / "slice" / "model" / "README.md").read_text()
    assert "with the Compresso method (LoRA + L0 gates trained to the size target)" in card


def test_editing_finetune_reruns_only_finetune_evaluate_report(finished_run, tmp_path):
    folder, _ = finished_run
    recipe = _setup(folder, ft_steps=4)  # the same run folder, one finetune field changed
    before = _state(folder / "run")
    result = _apply(recipe)
    assert result.exit_code == 0, result.output
    after = _state(folder / "run")
    rerun = {n for n in after["stages"] if after["stages"][n]["started"] != before["stages"][n]["started"]}
    # The plan is refreshed too (it describes the fine-tune's steps and memory; it takes milliseconds).
    assert rerun == {"plan", "finetune", "evaluate", "report"}
    assert after["stages"]["prune"] == before["stages"]["prune"]
    assert after["stages"]["slice"] == before["stages"]["slice"]
    _setup(folder)  # restore the recipe for the other tests of this module


def test_rerunning_a_stage_alone_makes_the_stages_after_it_stale(finished_run):
    folder, recipe = finished_run
    assert _apply(recipe, "--from", "slice", "--until", "slice").exit_code == 0
    assert _state(folder / "run")["stages"]["finetune"]["status"] == "pending"
    before = _state(folder / "run")
    result = _apply(recipe)
    assert result.exit_code == 0, result.output
    after = _state(folder / "run")
    rerun = {n for n in after["stages"] if after["stages"][n]["started"] != before["stages"][n]["started"]}
    assert rerun == {"finetune", "evaluate", "report"}


def test_a_second_concurrent_apply_is_refused(finished_run):
    folder, recipe = finished_run
    lock = folder / "run" / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "now"}))
    try:
        result = _apply(recipe)
        assert result.exit_code == 2
        assert "another run" in result.output
    finally:
        lock.unlink()


def test_a_stale_lock_is_reported_then_taken_over_on_request(finished_run):
    folder, recipe = finished_run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = folder / "run" / ".lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "then"}))
    result = _apply(recipe)
    assert result.exit_code == 2 and "stale lock" in result.output and "--break-stale-lock" in result.output
    assert lock.exists()
    result = _apply(recipe, "--break-stale-lock")
    assert result.exit_code == 0, result.output
    assert not lock.exists()


def test_sigkill_during_prune_then_resume_gives_the_same_masks(tmp_path):
    recipe = _setup(tmp_path, run_dir="killed", hold=40)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compresso_ops.cli", "apply", str(recipe), "--plain", "--until", "prune"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt_meta = tmp_path / "killed" / "prune" / "checkpoints" / "last" / "meta.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt_meta.is_file() and json.loads(ckpt_meta.read_text())["step"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _state(tmp_path / "killed")["stages"]["prune"]["status"] == "running"

    result = _apply(recipe, "--until", "prune", "--break-stale-lock")
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    resumed = Masks.load(tmp_path / "killed" / "prune")

    straight = _setup(tmp_path, run_dir="straight", hold=40)
    result = _apply(straight, "--until", "prune")
    assert result.exit_code == 0, result.output
    uninterrupted = Masks.load(tmp_path / "straight" / "prune")
    for name in ("heads", "ffn", "hidden"):
        assert torch.equal(getattr(resumed, name), getattr(uninterrupted, name)), name


@pytest.fixture(scope="module")
def one_process_masks(tmp_path_factory) -> Masks:
    """The reference for the multi-process runs below: one process, gradient accumulation 2."""
    folder = tmp_path_factory.mktemp("one")
    one = _setup(folder, run_dir="one")
    one.write_text(one.read_text().replace("gradient_accumulation: 1\n  checkpoint_every",
                                           "gradient_accumulation: 2\n  checkpoint_every"))
    assert _apply(one, "--until", "prune").exit_code == 0
    return Masks.load(folder / "one" / "prune")


def _assert_two_process_run(run: Path, reference: Masks, held: str) -> None:
    state = _state(run)
    assert state["stages"]["finetune"]["status"] == "done"
    assert len((run / "prune" / "events.jsonl").read_text().splitlines()) == 14  # one writer
    assert all(held in state["stages"][stage]["note"] for stage in ("prune", "finetune"))
    masks = Masks.load(run / "prune")
    for name in ("heads", "ffn", "hidden"):
        assert torch.equal(getattr(masks, name), getattr(reference, name)), name


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_through_torchrun_equal_one_with_the_same_global_batch(tmp_path, strategy,
                                                                             one_process_masks):
    """gpus_per_node: 2 makes `apply` re-launch itself under torch.distributed.run (gloo on CPU); the result,
    with the frozen base replicated or sharded, equals one process with twice the gradient accumulation.
    The tiny model fits one "GPU", so both processes evaluate it, and rank 0 writes the results."""
    two = _setup(tmp_path, run_dir="two")
    two.write_text(two.read_text().replace(
        "run_dir:", f"hardware: {{gpu: cpu, gpus_per_node: 2, strategy: {strategy}}}\nrun_dir:"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "compresso_ops.cli", "apply", str(two), "--plain", "--until", "evaluate"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    held = "sharded over 2 processes" if strategy == "fsdp" else "replicated"
    _assert_two_process_run(tmp_path / "two", one_process_masks, held)
    pruned = json.loads((tmp_path / "two" / "evaluate" / "pruned.json").read_text())
    assert pruned["parallel"]["mode"] == "data" and pruned["tasks"]["quiz"]["n"] == 8


def test_two_nodes_started_as_the_readme_says(tmp_path, one_process_masks):
    """The README's multi-node command, with both "nodes" on this machine: two torchrun launchers meet
    through c10d rendezvous and run `python -m compresso_ops.cli apply` as one job of 2 x 1 processes."""
    recipe = _setup(tmp_path, run_dir="nodes")
    recipe.write_text(recipe.read_text().replace(
        "run_dir:", "hardware: {gpu: cpu, gpus_per_node: 1, nodes: 2}\nrun_dir:"))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
           "-m", "compresso_ops.cli", "apply", str(recipe), "--plain", "--until", "finetune"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    nodes = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-4000:]
    _assert_two_process_run(tmp_path / "nodes", one_process_masks, "replicated")


def test_an_error_under_torchrun_keeps_its_exit_code(tmp_path):
    recipe = _setup(tmp_path, run_dir="bad")
    recipe.write_text(recipe.read_text().replace("run_dir:", "hardware: {gpu: cpu, gpus_per_node: 2}\nrun_dir:")
                      .replace("max_seq_length: 200", "max_seq_length: 16"))  # every example is too long
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "compresso_ops.cli", "apply", str(recipe), "--plain"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "data." in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("method", "allocation"), [("magnitude", "global"), ("random", "global"),
                                                    ("activation", "uniform")])
def test_one_shot_baseline_runs_the_same_pipeline(tmp_path, method, allocation):
    """`method: magnitude | random | activation` ranks once (no training) and hands the masks to the same slice
    stage; the sliced model reloads."""
    from compresso_ops.evaluation.harness import load_model

    recipe = _setup(tmp_path)
    prune = f"prune:\n  one_shot_allocation: {allocation}\n  calibration_examples: 12\n"
    recipe.write_text(recipe.read_text().replace("name: tiny\n", f"name: tiny\nmethod: {method}\n")
                      .replace("prune:\n", prune))
    result = _apply(recipe, "--until", "slice")
    assert result.exit_code == 0, result.output
    state = _state(tmp_path / "run")
    assert [state["stages"][s]["status"] for s in ("prune", "slice")] == ["done", "done"]
    summary = json.loads((tmp_path / "run" / "prune" / "masks.json").read_text())
    assert (summary["prune"]["method"], summary["prune"]["allocation"]) == (method, allocation)
    assert summary["prune"]["achieved_sparsity"] >= 0.3
    assert not (tmp_path / "run" / "prune" / "lora").exists()  # nothing was trained
    if allocation == "uniform":
        channels = summary["kept_ffn_channels_per_layer"]
        assert max(channels) - min(channels) <= 1
    manifest = json.loads((tmp_path / "run" / "slice" / "model" / "compresso_manifest.json").read_text())
    assert manifest["checks"]["passed"] and manifest["method"] == method
    card = (tmp_path / "run" / "slice" / "model" / "README.md").read_text()  # names how it was pruned
    assert f"with a one-shot {method} ranking" in card or f"with a {method} ranking" in card
    assert "Compresso method" not in card
    model, tokenizer = load_model(tmp_path / "run" / "slice" / "model")
    ids = tokenizer("Add 2 and 3.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids).logits).all()
    report = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert report.exit_code == 0, report.output
    assert f"Pruning: one-shot {method} ranking, {allocation} allocation over the layers, no training" in report.output
    assert f"method {method}" in report.output


def test_activation_with_too_few_examples_for_calibration_is_one_line(tmp_path):
    recipe = _setup(tmp_path)
    recipe.write_text(recipe.read_text().replace("name: tiny\n", "name: tiny\nmethod: activation\n"))
    result = _apply(recipe)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        (f"{recipe}:8: prune.calibration_examples: 64 is more than the training data's 32 examples (rows of "
        "data.path); lower it to at most 32 or give more data")]
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_bad_input_for_a_multi_gpu_run_is_one_line_before_torchrun_starts(tmp_path):
    """Preflight runs in the launching process: no torchrun banner, no error from every rank."""
    recipe = _setup(tmp_path, run_dir="gpus")
    recipe.write_text(recipe.read_text().replace("run_dir:", "hardware: {gpu: V100-32GB, gpus_per_node: 2}\nrun_dir:"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine has
    proc = subprocess.run([sys.executable, "-m", "compresso_ops.cli", "apply", str(recipe), "--plain"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    expected = ("hardware.gpu: the recipe asks for V100-32GB but no CUDA GPU is visible; set hardware.gpu: cpu or "
                "run on a GPU machine")
    assert proc.stderr.strip().splitlines() == [expected], proc.stderr
    assert proc.stdout == ""  # not even the stage list: nothing was launched

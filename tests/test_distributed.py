"""Data-parallel prune and fine-tune under torchrun (2 CPU processes, gloo) on tiny models.

What users rely on: a run under torchrun ends where a single process with the same global batch ends, with
the frozen base replicated (DDP) or sharded (FSDP); a killed multi-process run resumes to the same result;
and the run folder holds one copy of every artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compresso_ops.errors import UserError
from compresso_ops.infra.cache import CACHE_ENV
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.sizes import count_params
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages import evaluate
from compresso_ops.stages.finetune import run_finetune
from compresso_ops.stages.plan import with_overrides
from compresso_ops.stages.prune import run_prune
from compresso_ops.training.distributed import DistContext
from compresso_ops.training.precision import Precision
from compresso_ops.training.sharding import require_even_split
from tests.tiny import REPO_ROOT, save_tiny

DRIVER = Path(__file__).with_name("dist_driver.py")
TOL = 1e-5
PRUNE_OUTPUTS = {"events.jsonl", "checkpoints", "lora", "masks.safetensors", "masks.json", "gates.safetensors"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    save_tiny(folder / "model", "llama", gqa=True)
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "sun", "moon", "tree"]
    (folder / "train.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) + "."
                                                  for _ in range(40)))
    # A stock tiny model with a manifest stands in for the slice stage's export.
    save_tiny(folder / "sliced", "llama", gqa=True, seed=1)
    total = count_params(ArchSpec.from_pretrained_dir(folder / "sliced")).total
    (folder / "sliced" / "compresso_manifest.json").write_text(
        json.dumps({"dtype": "float32", "params": {"exported": {"total": total}}}))
    return folder


def _recipe(folder: Path, *, gpus: int = 2, accumulation: int = 2, finetune_accumulation: int = 1,
            checkpoint_every: int = 2, strategy: str = "auto", checkpointing: bool = False) -> Recipe:
    lora = {"r": 4, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "o_proj"]}
    return Recipe(
        name="t", model={"path": str(folder / "model")}, target={"sparsity": 0.4}, prompt={"text": "none"},
        data={"path": str(folder / "train.txt"), "format": "text", "max_seq_length": 32, "max_samples": 24},
        prune={"schedule": {"unit": "steps", "lora_only": 1, "ramp": 3, "hold": 2}, "micro_batch_size": 2,
               "gradient_accumulation": accumulation, "checkpoint_every": checkpoint_every, "lora": lora,
               "lr": {"lora": 1e-3, "gates": 0.3, "lagrangian": 0.1}, "gradient_checkpointing": checkpointing},
        finetune={"unit": "steps", "duration": 4, "lr": 1e-3, "micro_batch_size": 2,
                  "gradient_accumulation": finetune_accumulation, "checkpoint_every": 2, "lora": lora,
                  "gradient_checkpointing": checkpointing},
        hardware={"gpu": "cpu", "gpus_per_node": gpus, "strategy": strategy})


def _launch(config: dict, out: Path) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    config = {**config, "out_dir": str(out)}
    (out / "config.json").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    log = (out / "torchrun.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(DRIVER), str(out / "config.json")], cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_job(proc: subprocess.Popen, out: Path) -> None:
    """SIGKILL the launcher and every worker (torchrun starts workers in their own sessions)."""
    pids = [proc.pid] + [int(p.read_text()) for p in out.glob("rank*.pid")]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _kill_after_first_checkpoint(jobs: list[dict], out: Path) -> None:
    """Launch `jobs`, wait until rank 0 has written its first checkpoint, then SIGKILL the whole job."""
    proc = _launch({"jobs": jobs, "pause_after_checkpoint": True}, out)
    try:
        deadline = time.monotonic() + 120
        while not (out / "paused").exists():
            assert proc.poll() is None, (out / "torchrun.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the job never wrote its first checkpoint"
            time.sleep(0.2)
        while len(list(out.glob("rank*.pid"))) < 2:
            time.sleep(0.1)
    finally:
        _kill_job(proc, out)


def _run(jobs: list[dict], out: Path, timeout: float = 180) -> list[list[dict]]:
    """Run the jobs to their end in one launch; per job, every rank's return value."""
    proc = _launch({"jobs": jobs}, out)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            _kill_job(proc, out)
    assert rc == 0, (out / "torchrun.log").read_text()[-4000:]
    return [[json.loads((out / f"result{i}_{r}.json").read_text()) for r in range(2)] for i in range(len(jobs))]


def _events(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "events.jsonl").read_text().splitlines()]


def _assert_same_events(got: list[dict], want: list[dict]) -> None:
    assert [e["step"] for e in got] == [e["step"] for e in want] == list(range(1, len(want) + 1))
    for a, b in zip(got, want, strict=True):
        for key, value in b.items():
            if key == "time_s":
                continue
            assert a[key] == (pytest.approx(value, abs=TOL) if isinstance(value, float) else value), key


def _assert_close(a_file: Path, b_file: Path, exact: bool = False) -> None:
    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if exact else torch.allclose(a[k], b[k], rtol=0, atol=TOL), (a_file.name, k)


def _assert_prune_matches(got: Path, want: Path) -> None:
    for name in ("gates.safetensors", "lora/adapter_model.safetensors", "masks.safetensors"):
        _assert_close(got / name, want / name)
    _assert_same_events(_events(got), _events(want))


def _assert_one_copy(stage_dir: Path, outputs: set[str], steps: int) -> None:
    assert {p.name for p in stage_dir.iterdir()} == outputs  # no leftover temporary folders
    assert {p.name for p in (stage_dir / "checkpoints").iterdir()} <= {"last", "previous"}  # no temporaries
    assert [e["step"] for e in _events(stage_dir)] == list(range(1, steps + 1))  # one line per step


def _finetune_recipe(folder: Path) -> Recipe:
    """1 GPU x accumulation 3 in the recipe, launched as 2 processes: the 3 micro-batches of a step are
    split 2 + 1 between the ranks."""
    return _recipe(folder, gpus=1, finetune_accumulation=3)


@pytest.fixture(scope="module")
def single_prune(work):
    """The reference: one process, the recipe of the distributed runs (2 GPUs x accumulation 2)."""
    out = work / "single_prune"
    run_prune(_recipe(work), out)
    return out


@pytest.fixture(scope="module")
def two_processes(work):
    """One torchrun launch of 2 processes running the prune stage, then the fine-tune stage."""
    out = work / "two"
    results = _run([{"stage": "prune", "recipe": _recipe(work).model_dump(mode="json"), "stage_dir": str(out / "prune")},
                    {"stage": "finetune", "recipe": _finetune_recipe(work).model_dump(mode="json"),
                     "sliced_dir": str(work / "sliced"), "stage_dir": str(out / "finetune")}], out / "job")
    return out, results


def test_two_processes_prune_like_one_with_the_same_global_batch(work, single_prune, two_processes, tmp_path):
    out, (results, _) = two_processes
    assert results[0] == results[1] and results[0]["completed"]  # every rank returns the same summary
    _assert_prune_matches(out / "prune", single_prune)
    _assert_one_copy(out / "prune", PRUNE_OUTPUTS, steps=6)
    # The global batch is what the recipe says, however it is split: 1 GPU x accumulation 4 is the same run.
    run_prune(_recipe(work, gpus=1, accumulation=4), tmp_path / "one_gpu")
    for name in ("gates.safetensors", "lora/adapter_model.safetensors"):
        _assert_close(tmp_path / "one_gpu" / name, single_prune / name, exact=True)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_killed_two_process_run_resumes_to_the_same_result(work, single_prune, tmp_path, strategy):
    config = {"stage": "prune", "recipe": _recipe(work, strategy=strategy).model_dump(mode="json"),
              "stage_dir": str(tmp_path / "prune")}
    _kill_after_first_checkpoint([config], tmp_path / "killed")
    meta = json.loads((tmp_path / "prune" / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == 2 and not (tmp_path / "prune" / "masks.safetensors").exists()
    _run([config], tmp_path / "resumed")
    _assert_prune_matches(tmp_path / "prune", single_prune)
    _assert_one_copy(tmp_path / "prune", PRUNE_OUTPUTS, steps=6)


def test_two_processes_finetune_like_one(work, two_processes, tmp_path):
    """Even with the recipe's micro-batches split unevenly (2 + 1), the run equals the single process."""
    out, (_, results) = two_processes
    single = run_finetune(_finetune_recipe(work), work / "sliced", tmp_path / "single")
    assert results[0] == results[1] and results[0]["completed"] and results[0]["steps"] == single["steps"] == 4
    _assert_close(out / "finetune" / "model" / "model.safetensors", tmp_path / "single" / "model" / "model.safetensors")
    _assert_same_events(_events(out / "finetune"), _events(tmp_path / "single"))
    _assert_one_copy(out / "finetune", {"events.jsonl", "checkpoints", "model"}, steps=4)


def test_single_process_helpers_are_no_ops():
    ctx = DistContext()
    grads = [torch.ones(3)]
    ctx.all_reduce_sum_(grads)
    assert ctx.is_main and not ctx.active and torch.equal(grads[0], torch.ones(3))
    assert ctx.all_reduce_scalar(2.5) == 2.5 and ctx.broadcast_object({"a": 1}) == {"a": 1} and ctx.any(True)

@pytest.fixture(scope="module")
def fsdp_two_processes(work):
    """One torchrun launch of 2 processes with the frozen base sharded and activations recomputed (as the 7B
    recipes run): prune, then fine-tune (2 GPUs x accumulation 1, so each rank runs one micro-batch a step).
    The references run in one process without checkpointing, which changes no number."""
    out = work / "fsdp"
    recipe = _recipe(work, strategy="fsdp", checkpointing=True).model_dump(mode="json")
    jobs = [{"stage": "prune", "recipe": recipe, "stage_dir": str(out / "prune")},
            {"stage": "finetune", "recipe": recipe,
             "sliced_dir": str(work / "sliced"), "stage_dir": str(out / "finetune")}]
    return out, _run(jobs, out / "job")


def test_fsdp_shards_the_base_and_prunes_like_one_process(work, single_prune, fsdp_two_processes):
    out, (results, _) = fsdp_two_processes
    assert results[0] == results[1] and results[0]["completed"]
    weights = results[0]["weights"]
    replica = count_params(ArchSpec.from_pretrained_dir(work / "model")).total * 4  # fp32 on CPU
    assert weights["sharded"] and weights["processes"] == 2
    assert abs(weights["frozen_bytes_per_process"] - replica / 2) < 0.05 * replica  # half the base each
    _assert_prune_matches(out / "prune", single_prune)  # the trajectory of the replicated run
    _assert_one_copy(out / "prune", PRUNE_OUTPUTS, steps=6)


def test_fsdp_finetune_like_one_process(work, fsdp_two_processes, tmp_path):
    out, (_, results) = fsdp_two_processes
    single = run_finetune(_recipe(work, strategy="fsdp"), work / "sliced", tmp_path / "single")
    assert not single["weights"]["sharded"]  # one process: nothing to shard across
    assert results[0] == results[1] and results[0]["weights"]["sharded"] and results[0]["steps"] == 4
    _assert_close(out / "finetune" / "model" / "model.safetensors", tmp_path / "single" / "model" / "model.safetensors")
    _assert_same_events(_events(out / "finetune"), _events(tmp_path / "single"))
    _assert_one_copy(out / "finetune", {"events.jsonl", "checkpoints", "model"}, steps=4)


def test_fsdp_with_uneven_micro_batches_stops_with_one_line():
    sharded = Precision(torch.device("cpu"), torch.float32, dist=DistContext(0, 2, 0), shard_base=True)
    with pytest.raises(UserError, match="^hardware: with strategy fsdp every process must run") as info:
        require_even_split(3, sharded, "finetune")
    assert "\n" not in str(info.value)
    require_even_split(4, sharded, "prune")
    require_even_split(3, dataclasses.replace(sharded, shard_base=False), "finetune")  # replicated: any split


def test_fsdp_loading_reads_only_own_shards_and_gives_todays_base(tmp_path):
    """Under FSDP each process builds placeholders and reads only its rows from the safetensors files (a
    sharded index here, tied embeddings, a vocabulary that splits unevenly): every frozen weight and every
    LoRA value equals what loading the whole model in one process gives."""
    from compresso_ops.models.adapter import unwrap
    from compresso_ops.training.setup import load_source, prepare_for_training

    folder = tmp_path / "model"
    save_tiny(folder, "llama", gqa=True, tied=True, layers=3)
    sharded = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(folder).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    recipe = _recipe(tmp_path, strategy="fsdp").model_copy(update={"model": Recipe.model_validate(
        {"model": {"path": str(sharded)}, "target": {"sparsity": 0.4}}).model})
    (results,) = _run([{"stage": "load", "recipe": recipe.model_dump(mode="json")}], tmp_path / "job")
    assert all(r["weights"]["sharded"] for r in results)
    model, _, precision = load_source(recipe)  # one process: today's whole-model load
    model = prepare_for_training(model, recipe.prune, "prune.lora.target_modules", precision)
    want = {name: p.detach() for name, p in unwrap(model).named_parameters()}
    got = load_file(str(tmp_path / "job" / "load0.safetensors"))
    assert got.keys() == want.keys() and any("lora_A" in k for k in got)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_fsdp_loading_refuses_nan_rows_in_every_process(tmp_path):
    """Under FSDP each process reads only its rows, so only one may see a damaged tensor: both still stop
    with the one-line model.path error (no process left waiting in a collective, no advice about learning
    rates at step 1)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    save_tiny(folder, "llama", gqa=True, layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight[-1, 0] = float("nan")  # a row of the second process's shard
    model.save_pretrained(folder)
    recipe = _recipe(tmp_path, strategy="fsdp")
    out = tmp_path / "job"
    proc = _launch({"jobs": [{"stage": "load", "recipe": recipe.model_dump(mode="json")}]}, out)
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            _kill_job(proc, out)
    log = (out / "torchrun.log").read_text()
    assert rc != 0, log[-4000:]
    assert "1 weight tensor(s) hold NaN or inf (first: model.embed_tokens.weight)" in log, log[-4000:]
    assert "weights hold NaN or inf (in rows another process read)" in log, log[-4000:]


def test_replicas_on_gpus_load_one_process_at_a_time(work):
    """Under DDP on GPUs the processes of a node take turns (one copy in RAM at a time); on CPU, or when
    FSDP reads shards, they load together."""
    from compresso_ops.training.setup import _loading_turns

    recipe = _recipe(work, gpus=2)
    on_gpu = Precision(torch.device("cuda", 0), torch.float16, dist=DistContext(0, 2, 0))
    assert _loading_turns(recipe, on_gpu) == 2
    assert _loading_turns(recipe, dataclasses.replace(on_gpu, shard_base=True)) == 1
    assert _loading_turns(recipe, dataclasses.replace(on_gpu, device=torch.device("cpu"))) == 1
    assert _loading_turns(recipe, dataclasses.replace(on_gpu, dist=DistContext())) == 1


FULL_PRUNE_OUTPUTS = {"events.jsonl", "checkpoints", "model", "masks.safetensors", "masks.json", "gates.safetensors"}


def _full(recipe: Recipe) -> Recipe:
    """The same recipe with every weight trained in both stages (train: full)."""
    return recipe.model_copy(update={"prune": recipe.prune.model_copy(update={"train": "full"}),
                                     "finetune": recipe.finetune.model_copy(update={"train": "full"})})


@pytest.fixture(scope="module")
def single_full(work):
    """References in one process: full-weight prune, and full-weight fine-tune of the stand-in slice."""
    out = work / "single_full"
    run_prune(_full(_recipe(work)), out / "prune")
    run_finetune(_full(_recipe(work)), work / "sliced", out / "finetune")
    return out


def _full_jobs(work: Path, out: Path, strategy: str) -> list[dict]:
    recipe = _full(_recipe(work, strategy=strategy, checkpointing=strategy == "fsdp")).model_dump(mode="json")
    return [{"stage": "prune", "recipe": recipe, "stage_dir": str(out / "prune")},
            {"stage": "finetune", "recipe": recipe, "sliced_dir": str(work / "sliced"),
             "stage_dir": str(out / "finetune")}]


def _assert_full_matches(got: Path, want: Path) -> None:
    for name in ("prune/gates.safetensors", "prune/masks.safetensors", "prune/model/model.safetensors",
                 "finetune/model/model.safetensors"):
        _assert_close(got / name, want / name)
    for stage in ("prune", "finetune"):
        _assert_same_events(_events(got / stage), _events(want / stage))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_full_weight_training_on_two_processes_equals_one(work, single_full, tmp_path, strategy):
    """train: full, replicated (DDP) or with weights, gradients and optimizer state sharded (FSDP): the
    prune and fine-tune stages end where one process ends."""
    prune, finetune = _run(_full_jobs(work, tmp_path, strategy), tmp_path / "job")
    assert prune[0] == prune[1] and finetune[0] == finetune[1] and finetune[0]["completed"]
    assert finetune[0]["weights"]["sharded"] == (strategy == "fsdp")
    assert finetune[0]["weights"]["frozen_bytes_per_process"] == 0
    _assert_full_matches(tmp_path, single_full)
    _assert_one_copy(tmp_path / "prune", FULL_PRUNE_OUTPUTS, steps=6)


def test_killed_fsdp_full_weight_run_resumes_to_the_same_result(work, single_full, tmp_path):
    """The sharded checkpoint path: gathered onto rank 0 when saved, broadcast into the shards on resume."""
    jobs = _full_jobs(work, tmp_path, "fsdp")[:1]
    _kill_after_first_checkpoint(jobs, tmp_path / "killed")
    assert json.loads((tmp_path / "prune" / "checkpoints" / "last" / "meta.json").read_text())["step"] == 2
    _run(jobs, tmp_path / "resumed")
    for name in ("gates.safetensors", "masks.safetensors", "model/model.safetensors"):
        _assert_close(tmp_path / "prune" / name, single_full / "prune" / name)
    _assert_same_events(_events(tmp_path / "prune"), _events(single_full / "prune"))


QUIZ_ROWS, QUIZ_CHOICES, QUIZ_LIMIT = 9, 3, 7


def _eval_recipe(folder: Path) -> Recipe:
    """The 2-process recipe with an evaluation of the source and the pruned model: a local multiple-choice
    task with one few-shot example (whose choice must not depend on the number of processes), perplexity
    over overlapping windows, and speed."""
    quiz = folder / "quiz.jsonl"
    if not quiz.exists():
        rows = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 3), str(i)], "answer": i % 3}
                for i in range(QUIZ_ROWS)]
        quiz.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(folder)
    return recipe.model_copy(update={"eval": type(recipe.eval).model_validate({
        "local_tasks": [{"name": "quiz", "data": str(quiz), "format": "multiple_choice", "group": "commonsense"}],
        "limit": QUIZ_LIMIT, "num_fewshot": 1, "batch_size": 4,
        "perplexity": {"path": str(folder / "train.txt"), "window": 32, "stride": 16, "max_tokens": 300},
        "speed": {"batch_size": 1, "prompt_length": 8, "new_tokens": 4, "repeats": 1},
        "compare_source": True})})


def _eval_run_dir(folder: Path) -> Path:
    """A run folder whose slice stage left a (stand-in) pruned model, without a manifest (so no model card)."""
    save_tiny(folder / "slice" / "model", "llama", gqa=True, seed=3)
    return folder


def _assert_same_results(got: dict, want: dict) -> None:
    """Equal, floats to 1e-6 (each process scores with its own thread count); timings, speed and the run
    folder's path aside."""
    skip = {"timing_s", "speed", "parallel", "cache", "lm_eval", "model"}
    assert got.keys() == want.keys()
    for key in want.keys() - skip:
        assert got[key] == _approx(want[key]), key
    assert {**got["model"], "path": None} == {**want["model"], "path": None}
    for key in ("results", "groups", "configs", "n-samples", "n-shot", "versions", "higher_is_better"):
        assert got["lm_eval"].get(key) == _approx(want["lm_eval"].get(key)), key


def _approx(value: object) -> object:
    if isinstance(value, dict):
        return {k: _approx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_approx(v) for v in value]
    return pytest.approx(value, rel=1e-6, abs=1e-9) if isinstance(value, float) else value


def test_two_processes_evaluate_like_one(work, tmp_path, monkeypatch):
    """The evaluate stage on both ranks of a torchrun job: each scores a share of the lm-eval requests and
    of the perplexity windows, the results (pruned and source) equal one process's, and rank 0 alone
    writes them and measures speed."""
    recipe = _eval_recipe(work)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "single_cache"))
    single = _eval_run_dir(tmp_path / "single")
    evaluate.run(recipe, single, lambda event: None)
    two = _eval_run_dir(tmp_path / "two")
    (results,) = _run([{"stage": "evaluate", "recipe": recipe.model_dump(mode="json"), "run_dir": str(two),
                        "cache_dir": str(tmp_path / "two_cache")}], tmp_path / "job")
    assert results[0]["note"] == "1 task(s)"  # rank 0 reports; the executor ignores the others' notes
    for name in ("pruned.json", "source.json"):
        got, want = (json.loads((run / "evaluate" / name).read_text()) for run in (two, single))
        _assert_same_results(got, want)
        assert got["tasks"]["quiz"]["n"] == QUIZ_LIMIT
        assert got["parallel"] == {"mode": "data", "processes": 2, "gpus_per_process": 0}
        assert want["parallel"] == {"mode": "none", "processes": 1, "gpus_per_process": 0}
        assert got["speed"]["decode_tokens_per_s"] > 0  # measured on rank 0
    # one copy of every file: rank 0 wrote the results and the source cache, no temporaries
    assert {p.name for p in (two / "evaluate").iterdir()} == {"pruned.json", "source.json"}
    assert len(list((tmp_path / "two_cache" / "source-eval").iterdir())) == 1
    # the work was shared: every request and window scored once, by one of the ranks
    requests = [r["work"]["requests"] for r in results]
    windows = [r["work"]["windows"] for r in results]
    per_model = json.loads((single / "evaluate" / "pruned.json").read_text())["perplexity"]["windows"]
    assert sum(requests) == 2 * QUIZ_LIMIT * QUIZ_CHOICES and min(requests) > 0
    assert sum(windows) == 2 * per_model and min(windows) > 0


def _distilled(recipe: Recipe) -> Recipe:
    """Distillation in both stages; the fine-tune (its stand-in slice keeps the hidden size) matches hidden
    states too."""
    return with_overrides(recipe, {**{f"{stage}.distill.{name}": value for stage in ("prune", "finetune")
                                      for name, value in (("weight", 0.5), ("temperature", 2.0))},
                                   "finetune.distill.hidden_states_weight": 1.0})


def test_distillation_under_fsdp_trains_like_one_process(work, tmp_path):
    """The prune stage's teacher (its own sharded base, adapters and gates off) and the fine-tune's (a sharded
    copy of the source, its hidden states matched too) give 2 FSDP processes the trajectory of one."""
    recipe = _distilled(_recipe(work, strategy="fsdp", checkpointing=True))
    jobs = [{"stage": "prune", "recipe": recipe.model_dump(mode="json"), "stage_dir": str(tmp_path / "two" / "prune")},
            {"stage": "finetune", "recipe": recipe.model_dump(mode="json"), "sliced_dir": str(work / "sliced"),
             "stage_dir": str(tmp_path / "two" / "finetune")}]
    _run(jobs, tmp_path / "job")
    single = _distilled(_recipe(work, strategy="fsdp"))
    run_prune(single, tmp_path / "one" / "prune")
    run_finetune(single, work / "sliced", tmp_path / "one" / "finetune")
    _assert_prune_matches(tmp_path / "two" / "prune", tmp_path / "one" / "prune")
    _assert_close(tmp_path / "two" / "finetune" / "model" / "model.safetensors",
                  tmp_path / "one" / "finetune" / "model" / "model.safetensors")
    _assert_same_events(_events(tmp_path / "two" / "finetune"), _events(tmp_path / "one" / "finetune"))

"""The evaluate stage on a real (tiny) LLaMA, fully offline: lm-eval on local task files, perplexity, speed,
the collaborative prompt at evaluation, the source-results cache, and the report built from real results."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from compresso_ops.errors import UserError
from compresso_ops.evaluation import harness, measures
from compresso_ops.evaluation.tasks import local_task_config
from compresso_ops.infra.cache import CACHE_ENV
from compresso_ops.method.prompts import COLLABORATIVE_EVAL
from compresso_ops.recipe.schema import LocalTask, PerplexitySection, Recipe, SpeedSection
from compresso_ops.stages import evaluate
from compresso_ops.stages.report import _num, build_report, render_markdown
from tests.tiny import EVAL_DATA, STORIES260K, TINYSTORIES, byte_tokenizer, tiny_model


def _recipe(limit: int = 20) -> Recipe:
    return Recipe(
        name="eval-test", model={"path": str(STORIES260K)}, target={"sparsity": 0.3},
        eval={
            "local_tasks": [
                {"name": "piqa", "data": str(EVAL_DATA / "piqa_validation.jsonl"), "format": "piqa",
                 "group": "commonsense"},
                {"name": "copa", "data": str(EVAL_DATA / "copa_validation.jsonl"), "format": "copa"},
            ],
            "limit": limit, "batch_size": 16, "max_length": 2048,
            "perplexity": {"path": str(TINYSTORIES / "dev.txt"), "window": 256, "stride": 128, "max_tokens": 1200},
            "speed": {"batch_size": 1, "prompt_length": 16, "new_tokens": 8, "repeats": 1},
        },
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Source with the collaborative prompt (twice: computed, then cached) and the same model without it."""
    if not STORIES260K.is_dir():
        pytest.skip("../shared is absent (only developer machines and CI have it)")
    root = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV, str(root / "cache"))
        recipe = _recipe()
        run = root / "run"
        first = evaluate.run_source_evaluate(recipe, run / "evaluate" / "source.json", prompt_text=COLLABORATIVE_EVAL)
        second = evaluate.run_source_evaluate(recipe, run / "evaluate" / "source.json", prompt_text=COLLABORATIVE_EVAL)
        bare = evaluate.run_evaluate(recipe, STORIES260K, run / "evaluate" / "pruned.json", label="pruned",
                                     prompt_text="")
        other_key = evaluate.source_cache_key(_recipe(limit=10), COLLABORATIVE_EVAL)
    return {"first": first, "second": second, "bare": bare, "run": run, "recipe": recipe, "other_key": other_key}


def test_results_are_valid_and_the_prompt_changes_them(shared: Path, evaluated: dict[str, Any]) -> None:
    with_prompt, bare = evaluated["first"], evaluated["bare"]
    for results in (with_prompt, bare):
        assert set(results["tasks"]) == {"piqa", "copa"}
        for entry in results["tasks"].values():
            assert 0.0 <= entry["value"] <= 1.0 and entry["n"] == 20
        assert results["tasks"]["piqa"]["metric"] == "acc_norm" and results["tasks"]["copa"]["metric"] == "acc"
        assert results["groups"]["commonsense"]["tasks"] == ["piqa"]
        assert math.isfinite(results["perplexity"]["perplexity"]) and results["perplexity"]["perplexity"] > 1
        assert (results["perplexity"]["window"], results["perplexity"]["stride"]) == (256, 128)
        assert results["perplexity"]["tokens_scored"] == 1200
        assert results["speed"]["decode_tokens_per_s"] > 0 and results["speed"]["prefill_tokens_per_s"] > 0
        json.dumps(results["lm_eval"])  # lm-eval's own structure, serialisable
        assert "samples" not in results["lm_eval"]
    assert with_prompt["prompt"] == {"text": COLLABORATIVE_EVAL, "name": "collaborative"}
    assert bare["prompt"] == {"text": None, "name": "none"}
    assert {k: v["value"] for k, v in with_prompt["tasks"].items()} != {k: v["value"] for k, v in bare["tasks"].items()}
    # perplexity is measured on raw text, so the prompt must not touch it
    assert with_prompt["perplexity"]["perplexity"] == pytest.approx(bare["perplexity"]["perplexity"], rel=1e-6)
    on_disk = json.loads((evaluated["run"] / "evaluate" / "pruned.json").read_text())
    assert on_disk["tasks"] == bare["tasks"] and on_disk["model"]["params"] == 260032


def test_source_evaluation_is_cached(shared: Path, evaluated: dict[str, Any]) -> None:
    first, second = evaluated["first"], evaluated["second"]
    assert first["cache"]["hit"] is False and second["cache"]["hit"] is True
    assert first["cache"]["key"] == second["cache"]["key"] != evaluated["other_key"]
    assert second["tasks"] == first["tasks"] and second["speed"] == first["speed"]
    assert Path(second["cache"]["file"]).is_file()


def test_report_states_the_real_results(shared: Path, evaluated: dict[str, Any], tmp_path: Path) -> None:
    md = render_markdown(build_report([evaluated["run"]]), tmp_path / "assets")
    for task, entry in evaluated["bare"]["tasks"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {task} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3].split(" ± ")[0]) == round(evaluated["first"]["tasks"][task]["value"] * 100, 2)
        assert float(cells[4].split(" ± ")[0]) == round(entry["value"] * 100, 2)
    assert "Limited to 20 examples per task" in md


def test_prompt_is_prepended_to_every_context_with_zero_shot(shared: Path) -> None:
    """lm-eval puts the system text right before the task text; our separator keeps them apart, and the
    continuation (what is scored) is untouched."""
    from lm_eval.tasks import TaskManager

    config = local_task_config(LocalTask(name="copa", data=EVAL_DATA / "copa_validation.jsonl", format="copa"))
    task = TaskManager(include_defaults=False).load([config])["tasks"]["copa"]
    doc = next(iter(task.test_docs()))
    plain = task.fewshot_context(doc, 0)
    prompted = task.fewshot_context(doc, 0, system_instruction=harness.system_instruction("Be good. "))
    assert plain == doc["query"]
    assert prompted == "Be good.\n\n" + plain
    requests = task.construct_requests(doc, prompted, metadata=("copa", 0, 1))
    assert [r.arguments[1] for r in requests] == [" " + c for c in doc["choices"]]


@pytest.mark.parametrize(("fmt", "file", "context", "answer"), [
    ("piqa", "piqa_validation.jsonl", "Question: {goal}\nAnswer:", lambda d: [d["sol1"], d["sol2"]][d["label"]]),
    ("arc", "arc_easy_test.jsonl", "Question: {question}\nAnswer:",
     lambda d: d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])]),
    ("openbookqa", "openbookqa_test.jsonl", "{question_stem}",
     lambda d: d["choices"]["text"][d["choices"]["label"].index(d["answerKey"].strip())]),
    ("copa", "copa_validation.jsonl", "{query}", lambda d: d["choices"][d["gold"]]),
    ("multiple_choice", None, "Question: {question}\nAnswer:", lambda d: d["choices"][d["answer"]]),
])
def test_each_local_format_reads_its_schema(shared: Path, tmp_path: Path, fmt: str, file: str | None,
                                            context: str, answer: Any) -> None:
    from lm_eval.tasks import TaskManager

    if file is None:
        path = tmp_path / "mc.jsonl"
        path.write_text(json.dumps({"question": "Which is a fruit?", "choices": ["stone", "apple"], "answer": 1}))
    else:
        path = EVAL_DATA / file
    config = local_task_config(LocalTask(name=f"local_{fmt}", data=path, format=fmt))
    task = TaskManager(include_defaults=False).load([config])["tasks"][f"local_{fmt}"]
    doc = next(iter(task.test_docs()))
    assert task.fewshot_context(doc, 0) == context.format(**doc)
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == answer(doc)


def test_copa_in_superglue_schema(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager

    path = tmp_path / "copa.jsonl"
    path.write_text(json.dumps({"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                                "choice2": "He got a hole in his sock.", "question": "cause", "label": 0}))
    task = TaskManager(include_defaults=False).load(
        [local_task_config(LocalTask(name="sg_copa", data=path, format="copa"))])["tasks"]["sg_copa"]
    doc = next(iter(task.test_docs()))
    assert task.fewshot_context(doc, 0) == "The man broke his toe because"
    assert task.doc_to_choice(doc) == ["he dropped a hammer on his foot.", "he got a hole in his sock."]
    assert task.doc_to_target(doc) == 0


def test_local_task_schema_mismatch_is_a_user_error(shared: Path) -> None:
    with pytest.raises(UserError, match="lacks field.*goal"):
        local_task_config(LocalTask(name="x", data=EVAL_DATA / "copa_validation.jsonl", format="piqa"))
    with pytest.raises(UserError, match="does not exist"):
        local_task_config(LocalTask(name="x", data=EVAL_DATA / "missing.jsonl", format="piqa"))


def test_perplexity_scores_each_token_once(tmp_path: Path) -> None:
    model, tok = tiny_model(), byte_tokenizer()
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    ids = [tok.bos_token_id, *tok(text.read_text(), add_special_tokens=False)["input_ids"]]
    one = measures.perplexity(model, tok, PerplexitySection(path=text, window=len(ids), stride=8))
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert one["windows"] == 1 and one["tokens_scored"] == len(ids) - 1
    assert one["nll_per_token"] == pytest.approx(loss, rel=1e-5)
    many = measures.perplexity(model, tok, PerplexitySection(path=text, window=32, stride=8))
    assert many["tokens_scored"] == len(ids) - 1 and many["windows"] == 1 + math.ceil((len(ids) - 32) / 8)
    # stride == window: non-overlapping windows, each token still scored once, the first of each window by
    # the previous window's last position (its context is the previous window)
    text.write_text(text.read_text()[:127])  # with BOS, 8 windows of exactly 16 tokens
    ids = ids[:128]
    apart = measures.perplexity(model, tok, PerplexitySection(path=text, window=16, stride=16))
    assert apart["tokens_scored"] == len(ids) - 1 and apart["windows"] == 8
    expected = 0.0
    with torch.no_grad():
        for begin in range(0, len(ids), 16):
            x = torch.tensor([ids[begin:begin + 16]])
            expected += model(x, labels=x).loss.item() * (x.shape[1] - 1)
            if begin:  # the window's first token, predicted from the 16 tokens before it
                prev = torch.tensor([ids[begin - 16:begin]])
                expected -= torch.log_softmax(model(prev).logits[0, -1], -1)[ids[begin]].item()
    assert apart["nll_per_token"] == pytest.approx(expected / (len(ids) - 1), rel=1e-5)
    with pytest.raises(ValueError, match="larger than window"):
        PerplexitySection(path=text, window=16, stride=17)


def test_speed_reports_the_documented_cpu_memory_measure() -> None:
    model = tiny_model()  # 2 layers, 2 KV heads of 8 dims
    speed = measures.measure_speed(model, SpeedSection(batch_size=2, prompt_length=8, new_tokens=4, repeats=1))
    weights = sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    kv = 2 * (8 + 4) * (2 * 2 * 2 * 8) * 4  # batch * tokens * (layers * K,V * heads * head_dim) * fp32
    assert speed["memory"] == {"weights_bytes": weights, "kv_cache_bytes": kv, "peak_bytes": weights + kv,
                               "method": "weights_plus_kv_cache"}
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0


def test_summary_of_stock_groups_and_tags() -> None:
    """Stock names pass through to lm-eval: a group (mmlu) reports its aggregate, a tag (ai2_arc) its tasks,
    and each lands in the paper's report group."""
    lm_results = {
        "results": {"arc_easy": {"acc,none": 0.7, "acc_stderr,none": 0.01, "acc_norm,none": 0.65,
                                 "acc_norm_stderr,none": 0.01},
                    "arc_challenge": {"acc,none": 0.4, "acc_stderr,none": 0.02, "acc_norm,none": 0.45,
                                      "acc_norm_stderr,none": 0.02},
                    "mmlu_abstract_algebra": {"acc,none": 0.3, "acc_stderr,none": 0.05}},
        "groups": {"mmlu": {"acc,none": 0.35, "acc_stderr,none": "N/A"},
                   "mmlu_stem": {"acc,none": 0.3, "acc_stderr,none": 0.05}},
        "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_abstract_algebra"]},
        "n-samples": {"arc_easy": {"original": 2376, "effective": 2376}},
    }
    recipe = Recipe(name="t", model={"path": "m"}, target={"sparsity": 0.3}, eval={"tasks": ["mmlu", "ai2_arc"]})
    tasks = harness.summarize_tasks(lm_results, recipe.eval)
    assert list(tasks) == ["mmlu", "arc_easy", "arc_challenge"]
    assert tasks["mmlu"] == {"metric": "acc", "filter": "none", "value": 0.35, "stderr": None, "n": None,
                             "groups": ["knowledge"]}
    assert tasks["arc_easy"]["metric"] == "acc_norm" and tasks["arc_easy"]["n"] == 2376
    groups = harness.group_averages(tasks)
    assert groups["commonsense"]["tasks"] == ["arc_easy", "arc_challenge"]
    assert groups["commonsense"]["average"] == pytest.approx(0.55)
    assert groups["knowledge"]["average"] == 0.35 and len(groups["commonsense"]["paper_tasks"]) == 7


@pytest.mark.slow
def test_task_names_come_from_lm_evals_registry_offline_and_are_cached(tmp_path: Path, monkeypatch) -> None:
    """Indexes lm-eval's real task folder once (10-25 s), then answers from the cache without lm-eval."""
    import lm_eval.tasks

    from compresso_ops.evaluation import tasks

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    names = tasks.lm_eval_task_names()
    assert tasks.task_names_cache().is_file()
    built_in = set(tasks.LONGEST_REQUEST_TOKENS) | tasks.ROLLING_TASKS
    assert built_in | {t for group in tasks.PAPER_GROUPS.values() for t in group} <= names
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", None)  # a second look-up must not index again
    assert tasks.lm_eval_task_names() == names
    assert tasks.unknown_task_problems(["boolq", "hellaswg"]) == [
        (1, "'hellaswg' is not an lm-eval task, group or tag; did you mean 'hellaswag'?")]


def test_perplexity_beyond_the_float_range_is_inf_not_a_crash(tmp_path: Path) -> None:
    """A hostile source whose logits are scaled far beyond a trained model's scores above ~709 nats per token:
    math.exp overflowed and the evaluate stage died with exit 1; the perplexity is now inf, and the report
    prints it as such."""
    model, tok = tiny_model(), byte_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    out = measures.perplexity(model, tok, PerplexitySection(path=text, window=64, stride=64))
    assert out["nll_per_token"] > 710 and math.isfinite(out["nll_per_token"]) and out["perplexity"] == math.inf
    assert _num(out["perplexity"], ".3f") == "inf" and _num(None, ".3f") == "—"


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (8, 1), (5, 4), (64, 32)])
def test_perplexity_windows_score_each_token_once_and_alone(window: int, stride: int) -> None:
    """What data-parallel perplexity relies on: each window says what it reads and what it scores, every
    token (but the first) is scored by exactly one window, from a position inside that window."""
    for n in (2, 7, 8, 9, 40, 41):
        spans = measures.windows(n, window, stride)
        assert [t for _, _, lo, hi in spans for t in range(lo, hi)] == list(range(1, n))
        assert all(0 <= begin < lo <= hi <= end + 1 and end - begin <= window for begin, end, lo, hi in spans)

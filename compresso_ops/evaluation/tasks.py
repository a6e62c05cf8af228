"""lm-eval task configurations built in code, and the report groups of the Compresso paper.

Local tasks are plain dicts that lm-eval turns into `ConfigurableTask`s: `dataset_path: json` with an absolute
`data_files` path, so evaluation runs offline and does not depend on the working directory. Templates are
Jinja strings (not Python callables) so lm-eval's own results JSON stays serialisable and readable.
Stock task names (`recipe.eval.tasks`) are passed through untouched for lm-eval's `TaskManager`.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from compresso_ops.errors import UserError
from compresso_ops.infra import atomic
from compresso_ops.infra.cache import cache_dir
from compresso_ops.infra.fingerprint import digest
from compresso_ops.recipe.schema import EvalSection, LocalTask
from compresso_ops.training.data import read_rows

# Report groups, as the paper averages them (docs/method.md §10). Local tasks join a group through `LocalTask.group`.
PAPER_GROUPS: dict[str, tuple[str, ...]] = {
    "commonsense": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"),
    "reading": ("boolq", "race"),
    "knowledge": ("mmlu", "bbh"),
}

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}

# Per format: fields a row must have, and the task body (templates follow lm-eval's stock tasks).
_FORMATS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "piqa": (("goal", "sol1", "sol2", "label"), {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": [_ACC, _ACC_NORM],
    }),
    "arc": (("question", "choices", "answerKey"), {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{choices.label.index(answerKey)}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [_ACC, _ACC_NORM],
    }),
    "openbookqa": (("question_stem", "choices", "answerKey"), {
        "doc_to_text": "question_stem",
        "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": [_ACC, _ACC_NORM],
    }),
    "multiple_choice": (("question", "choices", "answer"), {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "answer",
        "doc_to_choice": "choices",
        "metric_list": [_ACC, _ACC_NORM],
    }),
}

# COPA comes in two schemas: SuperGLUE's (premise, choice1, choice2, question, label) and the preprocessed one
# shipped in ../shared (query, choices, gold), whose query already ends with "because"/"therefore".
_COPA_SUPERGLUE = (("premise", "choice1", "choice2", "question", "label"), {
    "doc_to_text": "{{premise.strip()[:-1]}} {{'because' if question == 'cause' else 'therefore'}}",
    "doc_to_target": "label",
    "doc_to_choice": "{{[choice1[0].lower() + choice1[1:], choice2[0].lower() + choice2[1:]]}}",
    "metric_list": [_ACC],
})
_COPA_QUERY = (("query", "choices", "gold"), {
    "doc_to_text": "query",
    "doc_to_target": "gold",
    "doc_to_choice": "choices",
    "metric_list": [_ACC],
})


# The longest request (context + continuation, in tokens, zero-shot) each stock lm-eval task produces, for the
# planner's evaluation memory. lm-eval sorts requests longest first and pads each batch to its longest request,
# so the first batch is the peak. Values bound the tasks' data with headroom for tokenizers that split finer
# than Llama-3's or Qwen's (LLaMA-1's 32k vocabulary); the shared copies of piqa, arc_easy, openbookqa and copa
# have their longest rows at 2190, 1079, 582 and 236 bytes of JSON. RACE joins an article with the questions
# asked before, the longest request of the standard suite.
LONGEST_REQUEST_TOKENS: dict[str, int] = {
    "arc_easy": 512, "arc_challenge": 512, "ai2_arc": 512, "boolq": 1024, "copa": 128, "hellaswag": 256,
    "lambada_openai": 512, "lambada_standard": 512, "mmlu": 1024, "openbookqa": 256, "piqa": 768,
    "race": 2048, "sciq": 512, "winogrande": 128,
}
# Tasks scored with loglikelihood_rolling: lm-eval cuts the text into windows of the whole max_length.
ROLLING_TASKS = frozenset({"wikitext", "pile_10k", "paloma"})
# A stock task not in the table: a bound well below today's 128k contexts; eval.max_length lowers it further.
DEFAULT_REQUEST_TOKENS = 2048


def _lm_eval_tasks_dir() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def task_names_cache() -> Path:
    """The cache file of lm-eval's task names for the installed lm-eval."""
    folder = _lm_eval_tasks_dir()
    if folder is None:
        raise UserError("eval.tasks: lm-eval is not installed; install lm-eval or use eval.local_tasks only")
    key = digest([importlib.metadata.version("lm_eval"), str(folder), folder.stat().st_mtime_ns])
    return cache_dir() / "lm-eval-tasks" / f"{key}.json"


def lm_eval_task_names() -> frozenset[str]:
    """Every task, group and tag name of lm-eval's registry, indexed offline once per lm-eval install.

    lm-eval's TaskManager parses ~14,000 task YAML files (10-25 s); the names are cached under the user's
    compresso-ops cache, keyed by lm-eval's version and its task folder, so later checks take milliseconds.
    """
    cached = task_names_cache()
    stored = atomic.read_json(cached)
    if stored is None or not isinstance(stored.get("names"), list):
        from lm_eval.tasks import TaskManager

        stored = {"lm_eval": importlib.metadata.version("lm_eval"), "names": sorted(TaskManager().all_tasks)}
        atomic.write_json(cached, stored)
    return frozenset(stored["names"])


def unknown_task_problems(tasks: list[str]) -> list[tuple[int, str]]:
    """(index, message) for each name in `tasks` that lm-eval does not know, with a did-you-mean.

    Names of the built-in table (the paper's suite among them) are known without indexing lm-eval, so a
    recipe of stock tasks is checked instantly even before the first index is cached.
    """
    known = set(LONGEST_REQUEST_TOKENS) | ROLLING_TASKS | {t for group in PAPER_GROUPS.values() for t in group}
    if not tasks or set(tasks) <= known:
        return []
    registry = lm_eval_task_names()
    out = []
    for i, name in enumerate(tasks):
        if name in registry:
            continue
        close = difflib.get_close_matches(name, sorted(registry), n=1, cutoff=0.8)
        hint = f"did you mean '{close[0]}'?" if close else "`lm_eval --tasks list` lists them"
        out.append((i, f"'{name}' is not an lm-eval task, group or tag; {hint}"))
    return out


def _longest_row_bytes(path: Path) -> int | None:
    """UTF-8 bytes of a local task file's longest row: a bound on its tokens, since byte-level BPE and
    SentencePiece with byte fallback never make more tokens than bytes. None when the file is not on disk."""
    if not path.is_file():
        return None
    return max((len(line.encode("utf-8")) for line in path.read_text(encoding="utf-8").splitlines()), default=0)


def longest_request_tokens(section: EvalSection, prompt_text: str | None) -> int | None:
    """Tokens of the longest lm-eval request the recipe's tasks can produce (before lm-eval's truncation to
    max_length), or None when a rolling-loglikelihood task fills the whole max_length, or 0 without tasks.

    Each few-shot example adds about one more request's length; the evaluation prompt (lm-eval's
    system_instruction) is counted at one token per byte.
    """
    lengths: list[int] = []
    for name in section.tasks:
        if name in ROLLING_TASKS:
            return None
        lengths.append(LONGEST_REQUEST_TOKENS.get(name, DEFAULT_REQUEST_TOKENS))
    for task in section.local_tasks:
        row_bytes = _longest_row_bytes(Path(task.data).expanduser())
        lengths.append(DEFAULT_REQUEST_TOKENS if row_bytes is None else row_bytes)
    if not lengths:
        return 0
    prompt = len((prompt_text or "").encode("utf-8"))
    return max(lengths) * (section.num_fewshot + 1) + prompt


def first_row(path: Path) -> dict[str, Any]:
    """The first record of a JSON-lines file or a JSON array, to check the schema before lm-eval loads it."""
    if not path.is_file():
        raise UserError(f"eval.local_tasks: data file {path} does not exist; fix the task's `data` path")
    text = path.read_text(encoding="utf-8").lstrip()
    try:
        if text.startswith("["):
            rows = json.loads(text)
            row = rows[0] if rows else None
        else:
            line = text.split("\n", 1)[0]
            row = json.loads(line) if line else None
    except json.JSONDecodeError as exc:
        raise UserError(f"eval.local_tasks: {path} is not JSON or JSON lines ({exc.msg}, line {exc.lineno})") from exc
    if not isinstance(row, dict):
        raise UserError(f"eval.local_tasks: {path} has no rows; it must hold JSON objects, one per example")
    return row


def _schema_for(task: LocalTask, row: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    if task.format == "copa":
        return _COPA_SUPERGLUE if "premise" in row else _COPA_QUERY
    return _FORMATS[task.format]


def check_task_file(task: LocalTask) -> dict[str, Any]:
    """The task body for the file's schema, once every row of the file is a JSON object with the fields its
    format needs (lm-eval would otherwise fail mid-evaluation with a traceback)."""
    path = Path(task.data).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"eval.local_tasks: data file {path} does not exist; fix the task's `data` path")
    rows = read_rows(path)
    if not rows or not isinstance(rows[0][1], dict):
        raise UserError(f"{path}: no rows; a task file holds JSON objects, one per example")
    required, body = _schema_for(task, rows[0][1])
    for where, row in rows:
        missing = [k for k in required if k not in row] if isinstance(row, dict) else list(required)
        if missing:
            raise UserError(f"{path}: {where}: lacks field(s) {', '.join(missing)} that format '{task.format}' "
                            "needs; fix the row or pick the format matching the file's schema")
    return body


def local_task_config(task: LocalTask) -> dict[str, Any]:
    """An lm-eval task config for one local task, reading its file by absolute path."""
    path = Path(task.data).expanduser().resolve()
    body = check_task_file(task)
    return {
        "task": task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "dataset_name": None,  # older lm-eval merges a dict onto a stock task of the same name: clear its
        "training_split": None,  # dataset and splits so only this file is read
        "validation_split": None,
        "output_type": "multiple_choice",
        "test_split": "test",
        **json.loads(json.dumps(body)),  # deep copy: lm-eval may mutate the config it is given
        "metadata": {"version": 1.0, "source_format": task.format},
    }


def task_specs(section: EvalSection) -> list[str | dict[str, Any]]:
    """What `simple_evaluate(tasks=...)` receives: stock names, then local task configs."""
    names = [t.name for t in section.local_tasks]
    clash = sorted(set(names) & set(section.tasks)) or sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise UserError(f"eval.local_tasks: task name '{clash[0]}' is used twice; give each task a unique name")
    return [*section.tasks, *(local_task_config(t) for t in section.local_tasks)]


def primary_metric(metrics: dict[str, Any]) -> str | None:
    """The metric a task is reported by: acc_norm where the task has it (length-normalised, so answers of
    different lengths compete fairly), else acc, else exact_match, else the first numeric one.
    `metrics` is one entry of lm-eval's `results` ("acc,none": 0.5, "acc_stderr,none": ...)."""
    names = [k.split(",", 1)[0] for k, v in metrics.items()
             if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
    for preferred in ("acc_norm", "acc", "exact_match"):
        if preferred in names:
            return preferred
    return names[0] if names else None

"""lm-eval task configurations built in code, and the report groups of the Compresso paper.

Local tasks are plain dicts that lm-eval turns into `ConfigurableTask`s: `dataset_path: json` with an absolute
`data_files` path, so evaluation runs offline and does not depend on the working directory. Templates are
Jinja strings (not Python callables) so lm-eval's own results JSON stays serialisable and readable.
Stock task names (`recipe.eval.tasks`) are passed through untouched for lm-eval's `TaskManager`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from compresso_ops.errors import UserError
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

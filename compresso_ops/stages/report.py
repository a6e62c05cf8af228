"""The release-review report of one or more run folders (`compresso-ops report RUN_DIR ...`).

Every number comes from a file the stages wrote (results JSON, export manifest, event logs, state.json,
the resolved recipe); the report only reads, compares (deltas, ratios, averages of what the files hold) and
formats. Each file is read by one small function below, so a change of layout is a one-place change. A
stage that did not run gives a "not run" line with the reason, never a crash.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compresso_ops.errors import UserError
from compresso_ops.evaluation.summary import (
    MEMORY_METHODS,
    NOISE_Z,
    delta_stderr,
    headline,
    ratio,
    retention_stderr,
    within_noise,
)
from compresso_ops.executor import STAGES, STATE_FILE, load_state
from compresso_ops.infra import atomic
from compresso_ops.infra.integrity import damaged
from compresso_ops.infra.units import human_bytes, timestamp
from compresso_ops.recipe.schema import Recipe
from compresso_ops.ui import charts
from compresso_ops.ui.progress import EventFn

NOT_RUN = "not run"
MAX_CURVE_POINTS = 1000  # training curves are thinned to this many points for the charts and report.json


# --------------------------------------------------------------------------------------- readers


def _stage_status(stage: dict[str, Any]) -> str:
    """A report written by `apply` sees its own stage still running."""
    if stage["stage"] == "report" and stage["status"] == "running":
        return "writing this report"
    return stage["status"] or "—"


def read_state(run_dir: Path) -> dict[str, Any]:
    """state.json of a run folder ({} for a run without one, e.g. stages run one by one); a folder with
    neither state.json nor any stage's folder is not a run (`report` on the wrong folder)."""
    state = load_state(run_dir / STATE_FILE)
    if state is None and not any((run_dir / name).is_dir() for name in STAGES):
        raise UserError(f"{run_dir}: not a run folder (no {STATE_FILE} and no stage folder); give the run_dir of "
                        "a `compresso-ops apply`")
    return state or {}


def read_recipe(run_dir: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load((run_dir / "recipe.resolved.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_plan(run_dir: Path) -> dict[str, Any]:
    return atomic.read_json(run_dir / "plan" / "plan.json") or {}


def read_manifest(run_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The final model's export manifest: the fine-tuned model if there is one, else the sliced model."""
    for stage in ("finetune", "slice"):
        folder = run_dir / stage / "model"
        manifest = atomic.read_json(folder / "compresso_manifest.json")
        if manifest is not None:
            return manifest, folder
    return None, None


def read_results(run_dir: Path, which: str) -> dict[str, Any] | None:
    """evaluate/pruned.json or evaluate/source.json."""
    return atomic.read_json(run_dir / "evaluate" / f"{which}.json")


def read_masks(run_dir: Path) -> dict[str, Any]:
    return atomic.read_json(run_dir / "prune" / "masks.json") or {}


def read_events(path: Path) -> list[dict[str, Any]]:
    """Step records of a training log; unreadable lines (a run killed mid-write) are skipped."""
    return [r for r in atomic.read_jsonl(path) if isinstance(r.get("step"), (int, float))]


def verify_model(run_dir: Path, state: dict[str, Any], model_dir: Path | None) -> int | None:
    """How many files of the shipped model match the sha256 its stage recorded (None: nothing recorded).
    A file that differs is an error naming it: a report must not vouch for a damaged model."""
    if model_dir is None:
        return None
    stage = model_dir.parent.name
    prefix = f"{stage}/{model_dir.name}/"
    artifacts = (state.get("stages", {}).get(stage) or {}).get("artifacts") or {}
    recorded = {k: v for k, v in artifacts.items() if k.startswith(prefix)}
    if not recorded:
        return None
    changed = damaged(run_dir, recorded)
    if changed:
        raise UserError(f"{run_dir / changed[0]}: damaged (its sha256 differs from the one the {stage} stage "
                        "recorded); rerun `compresso-ops apply` on the recipe to rebuild the model")
    return len(recorded)


def folder_size(path: str | Path | None) -> int | None:
    """Bytes of all files under a folder (None when it is not a local folder, e.g. a hub id)."""
    if not path or not Path(path).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------- building

def _why(state: dict[str, Any], recipe: dict[str, Any], stage: str) -> str:
    """One line on why a stage's output is missing."""
    if stage == "finetune" and recipe.get("finetune", {}).get("enabled") is False:
        return f"{NOT_RUN}: finetune is disabled in the recipe"
    entry = state.get("stages", {}).get(stage)
    if not entry:
        return f"{NOT_RUN}: the {stage} stage has not run in this folder"
    status = entry.get("status", "pending")
    if status == "done":
        return f"{NOT_RUN}: the {stage} stage finished but its output file is missing"
    error = f" ({entry['error']})" if entry.get("error") else ""
    return f"{NOT_RUN}: the {stage} stage is {status}{error}"


def _summary(manifest: dict[str, Any] | None, model_dir: Path | None, recipe: dict[str, Any],
             state: dict[str, Any]) -> dict[str, Any]:
    """Sizes and export checks of the final model, from its compresso_manifest.json (written by export.py)."""
    if manifest is None:
        return {"missing": _why(state, recipe, "slice") + " (no compresso_manifest.json)"}
    params = manifest.get("params", {})
    src, out = params.get("source", {}), params.get("exported", {})
    source = manifest.get("source", {})
    source_path = source.get("path") or recipe.get("model", {}).get("path")
    checks = manifest.get("checks", {})
    diffs = {k: v for k, v in checks.items() if k.endswith("max_abs_diff") and isinstance(v, (int, float))}
    count = checks.get("param_count") or {}
    return {
        "source": {"path": source_path, "revision": source.get("revision")},
        "result": {"path": str(model_dir), "stage": model_dir.parent.name if model_dir else None,
                   "model_class": manifest.get("model_class"), "dtype": manifest.get("dtype")},
        "params": {"source": {"total": src.get("total"), "prunable": src.get("prunable")},
                   "result": {"total": out.get("total"), "prunable": out.get("prunable")}},
        "prunable_sparsity": params.get("prunable_sparsity"),
        "mode": manifest.get("mode"),
        "size_on_disk": {"source": folder_size(source_path), "result": folder_size(model_dir)},
        "checks": {"passed": checks.get("passed"), "tolerance": checks.get("tolerance"),
                   "max_abs_diff": max(diffs.values()) if diffs else None, "diffs": diffs,
                   "params_expected": count.get("expected"), "params_reloaded": count.get("reloaded")},
    }


def _task_rows(pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> list[dict[str, Any]]:
    p_tasks, s_tasks = (pruned or {}).get("tasks") or {}, (source or {}).get("tasks") or {}
    rows = []
    for name in [*p_tasks, *(n for n in s_tasks if n not in p_tasks)]:
        p, s = p_tasks.get(name, {}), s_tasks.get(name, {})
        pv, sv = p.get("value"), s.get("value")
        delta = pv - sv if pv is not None and sv is not None else None
        delta_se = delta_stderr(p.get("stderr"), s.get("stderr"))
        rows.append({"task": name, "metric": p.get("metric") or s.get("metric"), "source": sv, "pruned": pv,
                     "source_stderr": s.get("stderr"), "pruned_stderr": p.get("stderr"),
                     "n": p.get("n") or s.get("n"), "delta": delta, "delta_stderr": delta_se,
                     "within_noise": within_noise(delta, delta_se), "retention": ratio(pv, sv),
                     "retention_stderr": retention_stderr(pv, sv, p.get("stderr"), s.get("stderr"))})
    return rows


def _group_rows(pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> list[dict[str, Any]]:
    p_groups, s_groups = (pruned or {}).get("groups") or {}, (source or {}).get("groups") or {}
    rows = []
    for name in [*p_groups, *(g for g in s_groups if g not in p_groups)]:
        p, s = p_groups.get(name, {}), s_groups.get(name, {})
        pv, sv = p.get("average"), s.get("average")
        rows.append({"group": name, "tasks": p.get("tasks") or s.get("tasks") or [],
                     "paper_tasks": p.get("paper_tasks") or s.get("paper_tasks") or [],
                     "source": sv, "pruned": pv,
                     "delta": pv - sv if pv is not None and sv is not None else None, "retention": ratio(pv, sv)})
    return rows


def _evaluation(pruned: dict[str, Any] | None, source: dict[str, Any] | None, recipe: dict[str, Any],
                state: dict[str, Any]) -> dict[str, Any]:
    if pruned is None and source is None:
        return {"missing": _why(state, recipe, "evaluate")}
    lm_config = ((pruned or source or {}).get("lm_eval") or {}).get("config") or {}
    return {
        "prompt": {"pruned": (pruned or {}).get("prompt"), "source": (source or {}).get("prompt")},
        "limit": lm_config.get("limit"),
        "tasks": _task_rows(pruned, source),
        "groups": _group_rows(pruned, source),
        "source_missing": None if source is not None else
        f"{NOT_RUN}: no source evaluation (eval.compare_source is false, or evaluate/source.json is missing)",
        "source_cache": (source or {}).get("cache"),
        "pruned_missing": None if pruned is not None else _why(state, recipe, "evaluate"),
    }


def _perplexity(pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> dict[str, Any]:
    p, s = (pruned or {}).get("perplexity"), (source or {}).get("perplexity")
    if p is None and s is None:
        return {"missing": f"{NOT_RUN}: eval.perplexity is not set in the recipe (or evaluate has not run)"}
    return {"source": s, "pruned": p, "ratio": ratio((p or {}).get("perplexity"), (s or {}).get("perplexity"))}


def _speed(pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> dict[str, Any]:
    p, s = (pruned or {}).get("speed"), (source or {}).get("speed")
    if p is None and s is None:
        return {"missing": f"{NOT_RUN}: eval.speed is disabled (or evaluate has not run)"}
    p, s = p or {}, s or {}
    return {
        "source": s or None, "pruned": p or None,
        "hardware": (pruned or source or {}).get("hardware"),
        "prefill_speedup": ratio(p.get("prefill_tokens_per_s"), s.get("prefill_tokens_per_s")),
        "decode_speedup": ratio(p.get("decode_tokens_per_s"), s.get("decode_tokens_per_s")),
        "memory_ratio": ratio((p.get("memory") or {}).get("peak_bytes"), (s.get("memory") or {}).get("peak_bytes")),
    }


def _layers(manifest: dict[str, Any] | None, masks: dict[str, Any], plan: dict[str, Any],
            recipe: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Kept query heads and FFN channels per layer: the export manifest's (with what the checkpoint stores,
    which differs in pad mode), else the prune stage's masks.json."""
    kept = (manifest or {}).get("kept")
    if kept:
        view = {"source": "compresso_manifest.json", "heads": kept.get("query_heads_per_layer"),
                "ffn": kept.get("ffn_channels_per_layer"), "hidden": kept.get("hidden_dims"),
                "stored_heads": kept.get("stored_query_heads_per_layer"),
                "stored_ffn": kept.get("stored_ffn_channels_per_layer")}
    else:
        view = {"source": "prune/masks.json", "heads": masks.get("kept_query_heads_per_layer"),
                "ffn": masks.get("kept_ffn_channels_per_layer"), "hidden": masks.get("kept_hidden_dims"),
                "stored_heads": None, "stored_ffn": None}
    if not view["heads"] or not view["ffn"]:
        return {"missing": _why(state, recipe, "prune") + " (no kept structures in the manifest or masks.json)"}
    arch = plan.get("architecture") or {}
    return {**view, "full_heads": arch.get("num_heads"), "full_ffn": arch.get("intermediate_size"),
            "full_hidden": arch.get("hidden_size")}


# Each threshold of report.require: what it is called, whether the value must be at least ("min") or at
# most ("max") the threshold, and where the value comes from.
REQUIREMENTS = {
    "retention": ("mean retention", "min"),
    "ppl_ratio": ("perplexity ratio (pruned / source)", "max"),
    "decode_speedup": ("decode speed-up", "min"),
    "memory_ratio": ("deployed memory (pruned / source)", "max"),
    "sparsity": ("prunable sparsity", "min"),
}


def _decision(recipe: dict[str, Any], plan: dict[str, Any], summary: dict[str, Any],
              pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> dict[str, Any]:
    """Target vs achieved, the headline numbers with their errors, and the verdict against report.require.

    PASS: thresholds are given and all hold, and the export checks passed. FAIL: a threshold fails, a
    required number was not measured, or the export checks did not pass. UNCHECKED: no thresholds given.
    """
    target = recipe.get("target") or {}
    planned = (plan.get("params") or {}).get("target") or {}
    head = headline(pruned, source)
    achieved = {"params": ((summary.get("params") or {}).get("result") or {}).get("total"),
                "prunable_sparsity": summary.get("prunable_sparsity")}
    values = {"retention": (head["retention"] or {}).get("mean"), "ppl_ratio": head["ppl_ratio"],
              "decode_speedup": head["decode_speedup"], "memory_ratio": head["memory"]["ratio"],
              "sparsity": achieved["prunable_sparsity"]}
    required = {k: v for k, v in ((recipe.get("report") or {}).get("require") or {}).items()
                if k in REQUIREMENTS and v is not None}
    criteria = []
    for name, threshold in required.items():
        label, direction = REQUIREMENTS[name]
        value = values[name]
        ok = value is not None and (value >= threshold if direction == "min" else value <= threshold)
        criteria.append({"name": name, "label": label, "direction": direction, "threshold": threshold,
                         "value": value, "passed": ok})
    checks_passed = (summary.get("checks") or {}).get("passed") is True
    criteria.append({"name": "export_checks", "label": "export checks (reload, logits, parameter count)",
                     "direction": None, "threshold": None, "value": checks_passed, "passed": checks_passed})
    failed = [c for c in criteria if not c["passed"]]
    verdict = "FAIL" if failed else "PASS" if required else "UNCHECKED"
    return {
        "target": {"params": planned.get("total") or target.get("params"),
                   "prunable_sparsity": planned.get("prunable_sparsity") or target.get("sparsity")},
        "achieved": achieved, "headline": head, "criteria": criteria, "verdict": verdict,
        "failed": [c["name"] for c in failed],
    }


def _thin(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    stride = max(1, math.ceil(len(records) / MAX_CURVE_POINTS))
    out = records[::stride]
    if records and out[-1] is not records[-1]:
        out.append(records[-1])
    return out


def _curve(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    thin = _thin(records)
    return {"steps": len(records), "final": {k: records[-1].get(k) for k in ("step", *keys)},
            "series": {k: [[r["step"], r[k]] for r in thin if isinstance(r.get(k), (int, float))] for k in keys}}


def _phases(records: list[dict[str, Any]]) -> list[list[Any]]:
    """[step, phase] where each logged phase begins."""
    out: list[list[Any]] = []
    for r in records:
        if r.get("phase") and (not out or out[-1][1] != r["phase"]):
            out.append([r["step"], r["phase"]])
    return out


def _training(run_dir: Path, recipe: dict[str, Any], state: dict[str, Any],
              manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Loss curves of both stages; the fine-tune also names its recovery (mode, trained parameters, tokens)
    from the fine-tuned model's manifest."""
    prune = read_events(run_dir / "prune" / "events.jsonl")
    for r in prune:  # logs written before the term was logged on its own
        if "lagrangian" not in r and isinstance(r.get("loss"), (int, float)) and isinstance(r.get("lm_loss"), (int, float)):
            r["lagrangian"] = r["loss"] - r["lm_loss"]
    finetune = read_events(run_dir / "finetune" / "events.jsonl")
    recovery = (manifest or {}).get("finetune", {}).get("recovery")
    summary = read_masks(run_dir).get("prune", {})
    return {
        "prune": {**_curve(prune, ("loss", "lm_loss", "lagrangian", "expected_sparsity", "target_sparsity")),
                  "phases": _phases(prune), "distill": summary.get("distill")} if prune
        else {"one_shot": summary} if summary.get("method")  # a one-shot method's masks: nothing trained
        else {"missing": _why(state, recipe, "prune") + " (no prune/events.jsonl)"},
        "finetune": {**_curve(finetune, ("loss", "lr")), "recovery": recovery} if finetune
        else {"missing": _why(state, recipe, "finetune") + " (no finetune/events.jsonl)"},
    }


def _reproducibility(run_dir: Path, state: dict[str, Any], recipe: dict[str, Any], manifest: dict[str, Any] | None,
                     pruned: dict[str, Any] | None, source: dict[str, Any] | None,
                     verified: int | None) -> dict[str, Any]:
    stages = [{"stage": name, "status": entry.get("status"), "seconds": entry.get("seconds"),
               "note": entry.get("note") or entry.get("error") or ""}
              for name, entry in state.get("stages", {}).items()]
    results = pruned or source or {}
    return {
        "recipe_hash": state.get("recipe_hash") or (manifest or {}).get("recipe_hash"),
        "recipe_file": state.get("recipe_file"),
        "resolved_recipe": str(run_dir / "recipe.resolved.yaml") if recipe else None,
        "method": recipe.get("method"),
        # a seed matters only where a stage draws random numbers: the Compresso prune, the random ranking and an
        # enabled fine-tune
        "seeds": {"prune": (recipe.get("prune") or {}).get("seed")
                  if recipe.get("method") in ("compresso", "random") else None,
                  "finetune": (recipe.get("finetune") or {}).get("seed")
                  if (recipe.get("finetune") or {}).get("enabled") else None},
        "versions": results.get("versions"),
        "hardware": {"recipe": recipe.get("hardware"), "evaluated_on": results.get("hardware")},
        "stages": stages,
        "model_files_verified": verified,
        "total_seconds": sum(s["seconds"] for s in stages if isinstance(s["seconds"], (int, float))) or None,
    }


def build_run(run_dir: Path) -> dict[str, Any]:
    """Everything the report says about one run folder, as JSON-serialisable data."""
    run_dir = Path(run_dir).resolve()
    state, recipe, plan, masks = read_state(run_dir), read_recipe(run_dir), read_plan(run_dir), read_masks(run_dir)
    manifest, model_dir = read_manifest(run_dir)
    pruned, source = read_results(run_dir, "pruned"), read_results(run_dir, "source")
    summary = _summary(manifest, model_dir, recipe, state)
    return {
        "run_dir": str(run_dir),
        "name": recipe.get("name") or run_dir.name,
        "decision": _decision(recipe, plan, summary, pruned, source),
        "summary": summary,
        "evaluation": _evaluation(pruned, source, recipe, state),
        "perplexity": _perplexity(pruned, source),
        "speed": _speed(pruned, source),
        "layers": _layers(manifest, masks, plan, recipe, state),
        "training": _training(run_dir, recipe, state, manifest),
        "reproducibility": _reproducibility(run_dir, state, recipe, manifest, pruned, source,
                                            verify_model(run_dir, state, model_dir)),
    }


def build_report(run_dirs: list[Path]) -> dict[str, Any]:
    """The report's content for one or more run folders (what `report --json` prints)."""
    return {"generated": timestamp(), "runs": [build_run(Path(d)) for d in run_dirs]}


# --------------------------------------------------------------------------------------- formatting

def _num(v: Any, spec: str, suffix: str = "") -> str:
    """`v` formatted; "inf" for an infinite measure (a perplexity past the float range), "—" for none."""
    if isinstance(v, float) and math.isinf(v):
        return f"{'' if v > 0 else '-'}inf{suffix}"
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "—"
    return f"{v:{spec}}{suffix}"


def _pct(v: Any) -> str:
    return _num(v * 100 if isinstance(v, (int, float)) else v, ".2f")


def _delta(v: Any) -> str:
    return _num(v * 100 if isinstance(v, (int, float)) else v, "+.2f")


def _retention(v: Any) -> str:
    return _num(v * 100 if isinstance(v, (int, float)) else v, ".1f", "%")


def _times(v: Any) -> str:
    return _num(v, ".2f", "×")


def _bytes(v: Any) -> str:
    return human_bytes(v) if isinstance(v, (int, float)) else "—"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def _check(ok: Any) -> str:
    return "passed" if ok is True else "FAILED" if ok is False else "—"


# --------------------------------------------------------------------------------------- sections

def _pm(value: Any, stderr: Any, fmt: Any) -> str:
    """`value ± stderr` in one formatter (the error is omitted when unknown)."""
    return fmt(value) + (f" ± {fmt(stderr).lstrip('+')}" if isinstance(stderr, (int, float)) and fmt(value) != "—"
                         else "")


def _requirement(c: dict[str, Any]) -> str:
    if c["threshold"] is None:
        return "required"
    value = _pct(c["threshold"]) + " %" if c["name"] in ("retention", "sparsity") else _num(c["threshold"], "g")
    return ("≥ " if c["direction"] == "min" else "≤ ") + value


def _md_decision(d: dict[str, Any]) -> list[str]:
    head, target, achieved = d["headline"], d["target"], d["achieved"]
    sizes = _table(["size", "target", "achieved"], [
        ["parameters", _num(target["params"], ","), _num(achieved["params"], ",")],
        ["prunable sparsity %", _pct(target["prunable_sparsity"]), _pct(achieved["prunable_sparsity"])],
    ])
    ret, ppl, mem = head["retention"], head["perplexity"], head["memory"]
    by_name = {c["name"]: c for c in d["criteria"]}

    def row(name: str | None, label: str, value: str) -> list[str]:
        c = by_name.get(name or "")
        return [label, value, _requirement(c) if c else "—", ("pass" if c["passed"] else "**FAIL**") if c else ""]

    rows = [
        row("retention", f"mean retention ({len(ret['tasks'])} task(s))" if ret else "mean retention",
            _pm((ret or {}).get("mean"), (ret or {}).get("stderr"), _retention)),
        row("ppl_ratio", "perplexity ratio", _times(head["ppl_ratio"]) + (
            f" ({_num(ppl['source'], '.3f')} → {_num(ppl['pruned'], '.3f')})" if ppl["pruned"] is not None else "")),
        row("decode_speedup", "decode speed-up", _times(head["decode_speedup"])),
        row(None, "prefill speed-up", _times(head["prefill_speedup"])),
        row("memory_ratio", "deployed memory", (f"{_bytes(mem['pruned'])} vs {_bytes(mem['source'])} "
                                                 f"({_times(mem['ratio'])}; {mem['method']})")
            if mem["pruned"] is not None else "—"),
        row("export_checks", "export checks", _check(by_name["export_checks"]["value"])),
    ]
    if "sparsity" in by_name:  # the sizes table shows it; a row here only when it is a requirement
        rows.insert(-1, row("sparsity", "prunable sparsity (achieved)", _pct(achieved["prunable_sparsity"]) + " %"))
    rows = [r for r in rows if r[1] != "—" or r[3]]
    verdict = {"PASS": "every threshold in report.require holds and the export checks passed",
               "FAIL": "failed: " + ", ".join(by_name[n]["label"] for n in d["failed"]),
               "UNCHECKED": "no thresholds: set report.require in the recipe (e.g. retention: 0.95, "
                            "ppl_ratio: 1.2) for a PASS/FAIL"}[d["verdict"]]
    return [f"**Verdict: {d['verdict']}** ({verdict}).", sizes,
            _table(["measure", "value", "requirement", ""], rows),
            (f"± is one standard error (lm-eval's per-task errors, combined as independent: conservative). "
             f"A delta within {NOISE_Z} standard errors of zero is marked ≈ in the task table: this evaluation "
             "cannot tell it from noise.")]


def _md_summary(s: dict[str, Any]) -> list[str]:
    if "missing" in s:
        return [s["missing"] + "."]
    src, res = s["params"]["source"], s["params"]["result"]
    rev = f" @ {s['source']['revision']}" if s["source"].get("revision") else ""
    checks = s["checks"]
    rows = [
        ["model", f"`{s['source']['path']}`{rev}", f"`{s['result']['path']}` ({s['result']['stage']})"],
        ["total params", _num(src["total"], ","), _num(res["total"], ",")],
        ["prunable params", _num(src["prunable"], ","), _num(res["prunable"], ",")],
        ["prunable sparsity", "", _pct(s["prunable_sparsity"]) + " %"],
        ["export mode", "", str(s["mode"] or "—")],
        ["size on disk", _bytes(s["size_on_disk"]["source"]), _bytes(s["size_on_disk"]["result"])],
        ["export checks (reload, logits)", "", (f"{_check(checks['passed'])} (max abs logits diff "
                                               f"{_num(checks['max_abs_diff'], '.3g')}, tolerance "
                                               f"{_num(checks['tolerance'], 'g')})")],
        ["reloaded params (expected)", "", (f"{_num(checks['params_reloaded'], ',')} "
                                           f"({_num(checks['params_expected'], ',')})")],
    ]
    return [_table(["", "source", "result"], rows)]


def _excerpt(text: str, limit: int = 60) -> str:
    """`text` on one line, cut at the last word boundary within `limit` characters."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit + 1].rsplit(" ", 1)[0] if " " in text[:limit + 1] else text[:limit]
    return cut.rstrip(" ,.;:") + "…"


def _prompt_line(prompt: dict[str, Any] | None) -> str:
    if not prompt:
        return "—"
    text = prompt.get("text") or ""
    return str(prompt.get("name")) + (f' ("{_excerpt(text)}")' if text else "")


def _md_evaluation(e: dict[str, Any]) -> list[str]:
    if "missing" in e:
        return [e["missing"] + "."]
    out = [(f"Prompt at evaluation: pruned {_prompt_line(e['prompt']['pruned'])}; "
           f"source {_prompt_line(e['prompt']['source'])}.")]
    if e["limit"] is not None:
        out.append(f"Limited to {e['limit']} examples per task: a smoke check, not a full benchmark.")
    for line in (e["source_missing"], e["pruned_missing"]):
        if line:
            out.append(line + ".")
    if e["source_cache"]:
        out.append("Source results " + ("reused from an earlier run with the same model and settings."
                                        if e["source_cache"].get("hit") else "computed in this run."))
    if e["tasks"]:
        out.append(_table(["task", "metric", "n", "source", "pruned", "Δ (points)", "retention"],
                          [[r["task"], r["metric"], _num(r["n"], "d"), _pm(r["source"], r["source_stderr"], _pct),
                            _pm(r["pruned"], r["pruned_stderr"], _pct),
                            _pm(r["delta"], r["delta_stderr"], _delta) + (" ≈" if r["within_noise"] else ""),
                            _pm(r["retention"], r["retention_stderr"], _retention)] for r in e["tasks"]]))
        out.append(f"Values in points (%) ± one standard error; ≈: the delta is within {NOISE_Z} standard errors "
                   "of zero, so this evaluation cannot tell it from noise.")
    else:
        out.append(f"{NOT_RUN}: no lm-eval tasks in the recipe (eval.tasks / eval.local_tasks).")
    if e["groups"]:
        out.append("Group averages (the paper averages 7 commonsense tasks, 2 reading tasks; knowledge is MMLU/BBH):")
        out.append(_table(["group", "tasks", "source", "pruned", "Δ (points)", "retention"],
                          [[g["group"], f"{len(g['tasks'])} of {len(g['paper_tasks'])}: {', '.join(g['tasks'])}"
                            if g["paper_tasks"] else ", ".join(g["tasks"]),
                            _pct(g["source"]), _pct(g["pruned"]), _delta(g["delta"]), _retention(g["retention"])]
                           for g in e["groups"]]))
    return out


def _md_perplexity(p: dict[str, Any]) -> list[str]:
    if "missing" in p:
        return [p["missing"] + "."]
    rows = []
    for label in ("source", "pruned"):
        r = p[label]
        rows.append([label, _num((r or {}).get("perplexity"), ".3f"), _num((r or {}).get("tokens_scored"), ","),
                     _num((r or {}).get("window"), "d"), _num((r or {}).get("stride"), "d"),
                     f"`{r['file']}`" if r else f"{NOT_RUN}"])
    return [_table(["model", "perplexity", "tokens", "window", "stride", "file"], rows),
            f"Pruned / source perplexity: {_times(p['ratio'])}."]


def _md_speed(s: dict[str, Any]) -> list[str]:
    if "missing" in s:
        return [s["missing"] + "."]
    src, pr = s["source"] or {}, s["pruned"] or {}
    ref = pr or src
    hw = s["hardware"] or {}
    method = (ref.get("memory") or {}).get("method")
    mem_method = MEMORY_METHODS.get(method, method or "—")
    rows = [
        ["prefill tokens/s", _num(src.get("prefill_tokens_per_s"), ",.1f"),
         _num(pr.get("prefill_tokens_per_s"), ",.1f"), _times(s["prefill_speedup"])],
        ["decode tokens/s", _num(src.get("decode_tokens_per_s"), ",.1f"),
         _num(pr.get("decode_tokens_per_s"), ",.1f"), _times(s["decode_speedup"])],
        [f"deployed memory ({mem_method})", _bytes((src.get("memory") or {}).get("peak_bytes")),
         _bytes((pr.get("memory") or {}).get("peak_bytes")), _times(s["memory_ratio"])],
    ]
    return [(f"Batch {ref.get('batch_size')}, prompt {ref.get('prompt_length')} tokens, {ref.get('new_tokens')} new "
            f"tokens (KV cache), median of {ref.get('repeats')}, on {hw.get('device', '?')} ({hw.get('name', '?')})."),
            _table(["", "source", "pruned", "pruned / source"], rows)]


def _md_layers(layers: dict[str, Any], assets: _Assets | None) -> list[str]:
    if "missing" in layers:
        return [layers["missing"] + "."]
    fh, ff = layers["full_heads"], layers["full_ffn"]
    rows = [[str(i), f"{h} / {fh}" if fh else str(h), f"{f} / {ff}" if ff else str(f)]
            for i, (h, f) in enumerate(zip(layers["heads"], layers["ffn"]))]
    headers = ["layer", "query heads kept", "FFN channels kept"]
    padded = (layers["stored_heads"] or layers["heads"]) != layers["heads"] or \
        (layers["stored_ffn"] or layers["ffn"]) != layers["ffn"]
    if padded:  # pad mode stores zero-padded structures beyond the kept ones
        headers += ["query heads stored", "FFN channels stored"]
        rows = [[*row, str(h), str(f)] for row, h, f in zip(rows, layers["stored_heads"], layers["stored_ffn"])]
    hidden, n = layers["hidden"], len(layers["heads"])
    out = [f"Kept hidden dims: {hidden}" + (f" / {layers['full_hidden']}" if layers["full_hidden"] else "")
           + f" (from {layers['source']})."]
    if assets is not None:
        shares = [(label, float(sum(kept) if isinstance(kept, list) else kept), float(full))
                  for label, kept, full in (("query heads", layers["heads"], fh * n if fh else None),
                                            ("FFN channels", layers["ffn"], ff * n if ff else None),
                                            ("hidden dims", hidden, layers["full_hidden"])) if full and kept is not None]
        if shares:
            out.append(assets.add("kept_shares.svg", charts.share_chart("Kept share per structure", shares),
                                  "kept share per structure"))
        for key, full, title, label, name in (("heads", fh, "Query heads kept per layer", "query heads", "heads"),
                                              ("ffn", ff, "FFN channels kept per layer", "FFN channels", "ffn")):
            out.append(assets.add(f"layers_{name}.svg", charts.layer_chart(
                title, [float(v) for v in layers[key]], float(full) if full else None, label), title))
    out.append("<details><summary>Per-layer table</summary>\n\n" + _table(headers, rows) + "\n\n</details>")
    return out


@dataclass
class _Assets:
    """Where charts go and how the markdown links them; `prefix` keeps several runs' charts apart."""

    folder: Path
    link: str
    prefix: str = ""

    def add(self, name: str, svg: str, alt: str) -> str:
        atomic.write_text(self.folder / f"{self.prefix}{name}", svg)
        return f"![{alt}]({self.link}/{self.prefix}{name})"


def _recovery(r: dict[str, Any] | None) -> str:
    """', LoRA r=8 on q_proj, v_proj: 12,345 trained parameters, 67,890 loss-carrying tokens' ('' if unknown)."""
    if not r:
        return ""
    mode = f"LoRA r={r['r']} on {', '.join(r['target_modules'])}" if r["mode"] == "lora" else "every weight"
    return (f" of {mode}{_distilled(r.get('distill'))}: {r['trained_params']:,} trained parameters, "
            f"{r['tokens']:,} loss-carrying tokens")


def _distilled(distill: dict[str, Any] | None) -> str:
    """', distilled from the source (weight 0.5, temperature 1)' for a stage that distilled, else ''; the
    hidden-state term is named when it was on (older manifests have no such key)."""
    if not distill:
        return ""
    states = distill.get("hidden_states_weight")
    return (f", distilled from the source (weight {distill['weight']:g}, temperature {distill['temperature']:g}"
            + (f", hidden states {states:g}" if states else "") + ")")


NO_CHARTS = "Charts are written only next to a report file: `compresso-ops report RUN_DIR -o report.md`."


def _phase_markers(phases: list[list[Any]]) -> dict[float, str]:
    """Vertical lines where a pruning phase begins (the first phase starts with the chart)."""
    return {float(step): PHASE_LABELS.get(name, name) for step, name in phases[1:]}


PHASE_LABELS = {"lora_only": "LoRA only", "ramp": "ramp starts", "hold": "hold starts"}


def _md_training(t: dict[str, Any], assets: _Assets | None) -> list[str]:
    out = [] if assets is not None else [NO_CHARTS]
    p = t["prune"]
    if "missing" in p:
        out.append("Pruning: " + p["missing"] + ".")
    elif "one_shot" in p:
        o = p["one_shot"]
        out.append(f"Pruning: one-shot {o['method']} ranking, {o.get('allocation', 'global')} allocation over the "
                   f"layers, no training; prunable sparsity {_num(o.get('achieved_sparsity'), '.4f')} vs target "
                   f"{_num(o.get('target_sparsity'), '.4f')}.")
    else:
        f = p["final"]
        phases = ", ".join(f"{PHASE_LABELS.get(name, name).removesuffix(' starts')} from step {step}"
                           for step, name in p["phases"])
        out.append(f"Pruning: {p['steps']} steps ({phases or 'no phases logged'}){_distilled(p.get('distill'))}; final LM loss "
                   f"{_num(f.get('lm_loss'), '.4f')}, Lagrangian term {_num(f.get('lagrangian'), '.4f')}; expected "
                   f"sparsity {_num(f.get('expected_sparsity'), '.4f')} vs target {_num(f.get('target_sparsity'), '.4f')}. "
                   "The training objective is the LM loss plus the Lagrangian term, which the multipliers' gradient "
                   "ascent can drive below zero: the LM loss alone is the quality signal.")
        if assets is not None:
            markers, s = _phase_markers(p["phases"]), p["series"]
            out.append(assets.add("prune_loss.svg", charts.line_chart(
                "Pruning: LM loss", {"LM loss": s["lm_loss"]}, "cross-entropy (nats/token)", "optimizer step",
                smoothed=True, markers=markers), "pruning LM loss"))
            out.append(assets.add("prune_lagrangian.svg", charts.line_chart(
                "Pruning: Lagrangian term (size constraint)", {"Lagrangian term": s["lagrangian"]}, "penalty",
                "optimizer step", smoothed=True, markers=markers), "pruning Lagrangian term"))
            out.append(assets.add("prune_sparsity.svg", charts.line_chart(
                "Pruning: expected vs target sparsity",
                {"expected sparsity": s["expected_sparsity"], "target sparsity": s["target_sparsity"]},
                "prunable sparsity", "optimizer step", markers=markers, dashed=("target sparsity",)),
                "expected vs target sparsity"))
    ft = t["finetune"]
    if "missing" in ft:
        out.append("Fine-tuning: " + ft["missing"] + ".")
    else:
        out.append(f"Fine-tuning: {ft['steps']} steps{_recovery(ft['recovery'])}; final LM loss "
                   f"{_num(ft['final'].get('loss'), '.4f')}.")
        if assets is not None:
            out.append(assets.add("finetune_loss.svg", charts.line_chart(
                "Fine-tuning: LM loss", {"LM loss": ft["series"]["loss"]}, "cross-entropy (nats/token)",
                "optimizer step", smoothed=True), "fine-tuning LM loss"))
    return out


def _md_reproducibility(r: dict[str, Any]) -> list[str]:
    versions = r["versions"] or {}
    evaluated = (r["hardware"] or {}).get("evaluated_on") or {}
    planned = (r["hardware"] or {}).get("recipe") or {}
    bullets = [
        (f"- recipe hash `{r['recipe_hash'] or '—'}`; recipe file `{r['recipe_file'] or '—'}`; resolved recipe "
        f"`{r['resolved_recipe'] or '—'}`; method {r['method'] or '—'}"),
        "- seeds: " + (", ".join(f"{k} {v}" for k, v in r["seeds"].items() if v is not None) or "—"),
        "- versions: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "—"),
        (f"- hardware: recipe {planned.get('gpu', '—')} × {planned.get('gpus_per_node', '—')} per node × "
         f"{planned.get('nodes', '—')} node(s); evaluated on {evaluated.get('device', '—')} "
         f"({evaluated.get('name', '—')})"),
        ("- model files: " + (f"all {r['model_files_verified']} match the sha256 recorded when they were written"
                              if r.get("model_files_verified") else "no recorded sha256 to check them against")),
    ]
    out = ["\n".join(bullets)]
    if r["stages"]:
        out.append(_table(["stage", "status", "wall time (s)", "note"],
                          [[s["stage"], _stage_status(s), _num(s["seconds"], ",.1f"), s["note"]]
                           for s in r["stages"]]))
        out.append(f"Total wall time: {_num(r['total_seconds'], ',.1f')} s.")
    else:
        out.append(f"{NOT_RUN}: no state.json, so no stage timings.")
    return out


def _md_run(run: dict[str, Any], assets: _Assets | None, level: int) -> list[str]:
    h = "#" * level
    sections = [
        (f"{h} Decision", _md_decision(run["decision"])),
        (f"{h} Summary", _md_summary(run["summary"])),
        (f"{h} Tasks", _md_evaluation(run["evaluation"])),
        (f"{h} Perplexity", _md_perplexity(run["perplexity"])),
        (f"{h} Speed and memory", _md_speed(run["speed"])),
        (f"{h} Kept structures per layer", _md_layers(run["layers"], assets)),
        (f"{h} Training curves", _md_training(run["training"], assets)),
        (f"{h} Reproducibility", _md_reproducibility(run["reproducibility"])),
    ]
    return [block for title, body in sections for block in (title, *body)]


def column_names(run_dirs: list[str]) -> list[str]:
    """Unique, short column names: each run folder's name, with as many parent folders as it takes to tell
    it apart from the others (two runs of one recipe share the recipe name, never the folder)."""
    parts = [Path(d).parts for d in run_dirs]
    depth = 1
    while depth < max(len(p) for p in parts):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
        depth += 1
    return [str(d) for d in run_dirs]


def _md_side_by_side(runs: list[dict[str, Any]]) -> list[str]:
    """One column per run (named by its folder) beside the source model: verdict, size, every task with its
    retention, perplexity, speed, memory, wall time. Each run's own report.md has the detail."""
    def pick(node: Any, *path: str | int) -> Any:
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    def task(run: dict[str, Any], name: str) -> dict[str, Any]:
        return next((r for r in run["evaluation"].get("tasks", []) if r["task"] == name), {})

    def with_retention(value: Any, kept: Any) -> str:
        return _pct(value) + (f" ({_retention(kept)})" if isinstance(kept, (int, float)) else "")

    # The source column: the first run that evaluated its source (runs of one model share it).
    ref = next((r for r in runs if any(t.get("source") is not None for t in r["evaluation"].get("tasks", []))),
               runs[0])
    sources = {pick(r, "summary", "source", "path") for r in runs} - {None}
    names = list(dict.fromkeys(r["task"] for run in runs for r in run["evaluation"].get("tasks", [])))
    rows = [
        ["verdict", "", *[r["decision"]["verdict"] for r in runs]],
        ["total params", _num(pick(ref, "summary", "params", "source", "total"), ","),
         *[_num(pick(r, "decision", "achieved", "params"), ",") for r in runs]],
        ["target params", "", *[_num(pick(r, "decision", "target", "params"), ",") for r in runs]],
        ["prunable sparsity (%)", "0.00", *[_pct(pick(r, "decision", "achieved", "prunable_sparsity")) for r in runs]],
        ["export mode", "", *[str(pick(r, "summary", "mode") or "—") for r in runs]],
        ["mean retention", "", *[_pm(pick(r, "decision", "headline", "retention", "mean"),
                                     pick(r, "decision", "headline", "retention", "stderr"), _retention) for r in runs]],
        *[[f"{n} (%, retention)", _pct(task(ref, n).get("source")),
           *[with_retention(task(r, n).get("pruned"), task(r, n).get("retention")) for r in runs]] for n in names],
        ["perplexity", _num(pick(ref, "perplexity", "source", "perplexity"), ".3f"),
         *[_num(pick(r, "perplexity", "pruned", "perplexity"), ".3f") for r in runs]],
        ["decode tokens/s", _num(pick(ref, "speed", "source", "decode_tokens_per_s"), ",.1f"),
         *[_num(pick(r, "speed", "pruned", "decode_tokens_per_s"), ",.1f") for r in runs]],
        ["deployed memory", _bytes(pick(ref, "speed", "source", "memory", "peak_bytes")),
         *[_bytes(pick(r, "speed", "pruned", "memory", "peak_bytes")) for r in runs]],
        ["total wall time", "", *[_num(r["reproducibility"]["total_seconds"], ",.1f", " s") for r in runs]],
    ]
    columns = column_names([r["run_dir"] for r in runs])
    out = [_table(["", "source", *columns], rows)]
    if len(sources) > 1:
        out.append("The runs prune different source models; the source column is "
                   f"`{pick(ref, 'summary', 'source', 'path')}`'s.")
    out.append("\n".join(f"- `{c}`: {r['name']}, run folder `{r['run_dir']}`"
                          + (f", full report `{Path(r['run_dir']) / 'report.md'}`"
                             if (Path(r["run_dir"]) / "report.md").is_file() else "")
                          for c, r in zip(columns, runs)))
    return out


def render_markdown(report: dict[str, Any], assets_dir: Path | None, *, link_dir: str | None = None) -> str:
    """The report as markdown. SVG charts are written into `assets_dir` and linked as `<link_dir>/<chart>.svg`;
    `link_dir` defaults to the folder's name, right when the markdown sits next to `assets_dir`. Without an
    `assets_dir` (a report printed to stdout) there are no charts and nothing is written. Several runs give
    one side-by-side table, not each run's full report again."""
    runs = report["runs"]
    if len(runs) > 1:
        return "\n\n".join([f"# Release review: {len(runs)} runs", f"Generated {report['generated']}.",
                             *_md_side_by_side(runs)]) + "\n"
    assets = None if assets_dir is None else _Assets(Path(assets_dir), link_dir or Path(assets_dir).name)
    blocks = [f"# Release review: {runs[0]['name']}",
              f"Run folder `{runs[0]['run_dir']}`; generated {report['generated']}.", *_md_run(runs[0], assets, 2)]
    return "\n\n".join(blocks) + "\n"


def failures(report: dict[str, Any]) -> list[str]:
    """One line per run whose verdict is FAIL (what `report --check` prints before exiting 3)."""
    return [f"{run['run_dir']}: FAIL: " + ", ".join(run["decision"]["failed"])
            for run in report["runs"] if run["decision"]["verdict"] == "FAIL"]


def write_report(run_dirs: list[Path], md_path: Path, *, json_path: Path | None = None,
                 assets_dir: Path | None = None) -> dict[str, Any]:
    """Build, render and write the report (markdown, and JSON when asked) atomically."""
    md_path = Path(md_path)
    report = build_report(run_dirs)
    assets = Path(assets_dir) if assets_dir is not None else md_path.parent / "report_assets"
    link = Path(os.path.relpath(assets.resolve(), md_path.parent.resolve())).as_posix()
    atomic.write_text(md_path, render_markdown(report, assets, link_dir=link))
    if json_path is not None:
        atomic.write_json(json_path, report)
    return report


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The report stage: `report.md` and `report.json` in the run folder, charts in `report/`."""
    report = write_report([run_dir], run_dir / "report.md", json_path=run_dir / "report.json",
                          assets_dir=run_dir / "report")
    return f"verdict {report['runs'][0]['decision']['verdict']}: {run_dir / 'report.md'}"

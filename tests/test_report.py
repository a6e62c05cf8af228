"""The release-review report reads a run folder and states its numbers exactly as the stage files hold them.

The run folder here is fabricated with the layout and file formats the stages write (the brief's run-folder
layout, the evaluate stage's results JSON, the export manifest, prune/finetune event logs, state.json), so the
report is tested without training anything.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from compresso_ops.stages.report import build_report, render_markdown, write_report

ARCH = {"model_type": "llama", "hidden_size": 64, "num_layers": 3, "num_heads": 8, "num_kv_heads": 4, "head_dim": 8,
        "intermediate_size": 172, "vocab_size": 512}


def _results(label: str, scale: float, *, ppl: float, decode: float, peak: int) -> dict[str, Any]:
    """An evaluate-stage results JSON (same keys as evaluate.evaluate_model writes)."""
    tasks = {
        "piqa": {"metric": "acc_norm", "filter": "none", "value": 0.6123 * scale, "stderr": 0.011, "n": 1838,
                 "groups": ["commonsense"]},
        "arc_easy": {"metric": "acc_norm", "filter": "none", "value": 0.5234 * scale, "stderr": 0.01, "n": 2376,
                     "groups": ["commonsense"]},
        "copa": {"metric": "acc", "filter": "none", "value": 0.71 * scale, "stderr": 0.045, "n": 100, "groups": []},
    }
    avg = (tasks["piqa"]["value"] + tasks["arc_easy"]["value"]) / 2
    return {
        "model": {"label": label, "path": f"/models/{label}", "revision": None, "class": "LlamaForCausalLM",
                  "params": 260032, "dtype": "float32", "device": "cpu"},
        "prompt": {"text": "You have been pruned.", "name": "custom"},
        "lm_eval": {"results": {k: {"acc,none": v["value"]} for k, v in tasks.items()}, "config": {"limit": None}},
        "tasks": tasks,
        "groups": {"commonsense": {"tasks": ["piqa", "arc_easy"], "average": avg,
                                   "paper_tasks": ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                                                   "arc_challenge", "openbookqa"]}},
        "perplexity": {"file": "/data/dev.txt", "window": 512, "stride": 256, "tokens_scored": 20481, "windows": 80,
                       "bos": True, "nll_per_token": math.log(ppl), "perplexity": ppl},
        "speed": {"batch_size": 1, "prompt_length": 128, "new_tokens": 64, "repeats": 3, "prefill_s": 0.01,
                  "prefill_tokens_per_s": 12800.0 / scale, "decode_s": 0.5, "decode_tokens_per_s": decode,
                  "memory": {"weights_bytes": peak - 4096, "kv_cache_bytes": 4096, "peak_bytes": peak,
                             "method": "weights_plus_kv_cache"}},
        "timing_s": {"lm_eval": 1.0},
        "versions": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0", "lm_eval": "0.4.13"},
        "hardware": {"device": "cpu", "name": "x86_64", "threads": 2},
    }


def make_run(root: Path, name: str, *, finetune: bool = True, source: bool = True, sparsity: float = 0.3) -> Path:
    """Fabricate a finished run folder."""
    run = root / name
    heads, ffn = [8, 6, 4], [172, 120, 90]
    recipe = {"name": name, "method": "compresso", "model": {"path": "/models/source", "revision": None},
              "prune": {"seed": 42}, "finetune": {"enabled": finetune, "seed": 7},
              "hardware": {"gpu": "cpu", "gpus_per_node": 1, "nodes": 1}}
    (run / "plan").mkdir(parents=True)
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))
    (run / "plan" / "plan.json").write_text(json.dumps({"architecture": ARCH}))
    stages = {"plan": 0.2, "prune": 812.5, "slice": 3.25, "finetune": 120.0 if finetune else 0.01, "evaluate": 40.0}
    state = {"recipe_hash": "abc123def4567890", "recipe_file": "/recipes/demo.yaml",
             "stages": {k: {"status": "done", "seconds": v, "note": "disabled in the recipe"
                            if k == "finetune" and not finetune else ""} for k, v in stages.items()}}
    (run / "state.json").write_text(json.dumps(state))
    (run / "prune").mkdir()
    with open(run / "prune" / "events.jsonl", "w") as fh:
        for step in range(1, 41):
            target = min(sparsity, sparsity * max(0, step - 5) / 20)
            fh.write(json.dumps({"stage": "prune", "step": step, "total_steps": 40, "loss": 3.0 - step * 0.02,
                                 "lm_loss": 2.9 - step * 0.02, "expected_sparsity": target * 0.95,
                                 "target_sparsity": target}) + "\n")
        fh.write('{"step": 41, "loss": 1.0')  # a line cut short by a crash must not break the report
    model = run / ("finetune" if finetune else "slice") / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"\0" * 4000)
    manifest = {  # as export.py writes it
        "format": "compresso-ops export", "format_version": 1, "mode": "native", "model_class": "CompressoForCausalLM",
        "dtype": "float32", "source": {"path": "/models/source", "revision": None, "model_type": "llama",
                                       "dtype": "float32"},
        "recipe_hash": "abc123def4567890",
        "kept": {"kv_groups_per_layer": [h // 2 for h in heads], "query_heads_per_layer": heads,
                 "ffn_channels_per_layer": ffn, "hidden_dims": 48, "stored_query_heads_per_layer": heads,
                 "stored_ffn_channels_per_layer": ffn},
        "params": {"source": {"total": 260032, "prunable": 221184, "embeddings": 32768, "norms": 704},
                   "exported": {"total": 181234, "prunable": 154829, "embeddings": 24576, "norms": 528},
                   "prunable_sparsity": 0.30000},
        "checks": {"tolerance": 1e-4, "batch": {"shape": [2, 16], "seed": 0},
                   "sliced_vs_masked_max_abs_diff": 1.1e-06, "reloaded_vs_in_memory_max_abs_diff": 0.0,
                   "reloaded_vs_masked_max_abs_diff": 3.2e-06,
                   "param_count": {"expected": 181234, "reloaded": 181234}, "passed": True},
        "weights_bytes": 4000}
    if finetune:  # as the fine-tune stage adds it
        manifest["finetune"] = {"steps": 10, "recovery": {"mode": "lora", "target_modules": ["q_proj", "v_proj"],
                                                          "r": 8, "trained_params": 12288, "tokens": 40960}}
    (model / "compresso_manifest.json").write_text(json.dumps(manifest))
    if finetune:
        with open(run / "finetune" / "events.jsonl", "w") as fh:
            for step in range(1, 11):
                fh.write(json.dumps({"stage": "finetune", "step": step, "loss": 2.5 - step * 0.05, "lr": 4e-4}) + "\n")
    (run / "evaluate").mkdir()
    (run / "evaluate" / "pruned.json").write_text(json.dumps(_results("pruned", 0.9, ppl=12.3456, decode=95.5,
                                                                      peak=800_000)))
    if source:
        (run / "evaluate" / "source.json").write_text(json.dumps(_results("source", 1.0, ppl=10.5, decode=70.25,
                                                                          peak=1_100_000)))
    return run


def _row(md: str, first_cell: str) -> list[str]:
    """Cells of the markdown table row whose first cell is `first_cell`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row '{first_cell}' in the report")


def _float(cell: str) -> float:
    """The first number in a cell ("61.23 ± 1.10" -> 61.23, "1,838" -> 1838)."""
    match = re.search(r"[-+]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?", cell)
    assert match, cell
    return float(match.group().replace(",", ""))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path, "demo")


def test_report_has_every_section_and_valid_charts(run_dir: Path, tmp_path: Path) -> None:
    md_path = tmp_path / "out" / "report.md"
    write_report([run_dir], md_path, json_path=tmp_path / "out" / "report.json")
    md = md_path.read_text()
    for title in ("Decision", "Summary", "Tasks", "Perplexity", "Speed and memory", "Kept structures per layer",
                  "Training curves", "Reproducibility"):
        assert f"## {title}" in md
    assert md.index("## Decision") < md.index("## Summary")  # the verdict comes first
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert {Path(link).name for link in links} == {"kept_shares.svg", "layers_heads.svg", "layers_ffn.svg",
                                                   "prune_loss.svg", "prune_lagrangian.svg", "prune_sparsity.svg",
                                                   "finetune_loss.svg"}
    for link in links:  # links resolve from the markdown's folder, and each chart is well-formed SVG
        assert ET.parse(md_path.parent / link).getroot().tag.endswith("svg")
    assert "not run" not in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"][0]["name"] == "demo"


def test_report_numbers_equal_the_run_files(run_dir: Path, tmp_path: Path) -> None:
    md = render_markdown(build_report([run_dir]), tmp_path / "assets")
    pruned = json.loads((run_dir / "evaluate" / "pruned.json").read_text())
    source = json.loads((run_dir / "evaluate" / "source.json").read_text())
    manifest = json.loads((run_dir / "finetune" / "model" / "compresso_manifest.json").read_text())

    for task, p in pruned["tasks"].items():
        s = source["tasks"][task]
        cells = _row(md, task)
        assert cells[1] == p["metric"]
        assert _float(cells[3]) == round(s["value"] * 100, 2)
        assert _float(cells[4]) == round(p["value"] * 100, 2)
        assert _float(cells[5]) == round((p["value"] - s["value"]) * 100, 2)
        assert _float(cells[6]) == round(p["value"] / s["value"] * 100, 1)
    group = _row(md, "commonsense")
    assert group[1].startswith("2 of 7")
    assert _float(group[3]) == round(pruned["groups"]["commonsense"]["average"] * 100, 2)

    total = _row(md, "total params")
    assert int(total[1].replace(",", "")) == manifest["params"]["source"]["total"]
    assert int(total[2].replace(",", "")) == manifest["params"]["exported"]["total"]
    assert _float(_row(md, "prunable sparsity")[2]) == round(manifest["params"]["prunable_sparsity"] * 100, 2)
    assert _row(md, "export checks (reload, logits)")[2] == "passed (max abs logits diff 3.2e-06, tolerance 0.0001)"
    assert _row(md, "reloaded params (expected)")[2] == "181,234 (181,234)"
    on_disk = sum(f.stat().st_size for f in (run_dir / "finetune" / "model").iterdir())
    assert _row(md, "size on disk")[2] == f"{on_disk / 1024:.2f} KiB"  # the plan's binary units

    ppl = _row(md, "pruned")
    assert _float(ppl[1]) == round(pruned["perplexity"]["perplexity"], 3)
    assert _float(ppl[2]) == pruned["perplexity"]["tokens_scored"]
    assert (ppl[3], ppl[4]) == ("512", "256")
    decode = _row(md, "decode tokens/s")
    assert _float(decode[2]) == round(pruned["speed"]["decode_tokens_per_s"], 1)
    assert _float(decode[3]) == round(pruned["speed"]["decode_tokens_per_s"] / source["speed"]["decode_tokens_per_s"], 2)

    kept = manifest["kept"]
    assert _row(md, "1")[1:] == [f"{kept['query_heads_per_layer'][1]} / 8", f"{kept['ffn_channels_per_layer'][1]} / 172"]
    assert "final LM loss 2.1000, Lagrangian term 0.1000; expected sparsity 0.2850 vs target 0.3000" in md
    assert ("Fine-tuning: 10 steps of LoRA r=8 on q_proj, v_proj: 12,288 trained parameters, 40,960 loss-carrying "
            "tokens; final LM loss 2.0000.") in md
    assert _float(_row(md, "prune")[2]) == 812.5
    assert "recipe hash `abc123def4567890`" in md and "seeds: prune 42, finetune 7" in md


def test_distilled_stages_say_so(tmp_path: Path) -> None:
    """The prune line reads masks.json's summary, the fine-tune line the model's manifest."""
    run = make_run(tmp_path, "distilled")
    distill = {"teacher": "source", "weight": 0.5, "temperature": 2.0}
    (run / "prune" / "masks.json").write_text(json.dumps({"prune": {"distill": distill}}))
    manifest_file = run / "finetune" / "model" / "compresso_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["finetune"]["recovery"]["distill"] = distill
    manifest_file.write_text(json.dumps(manifest))
    md = render_markdown(build_report([run]), tmp_path / "assets")
    said = ", distilled from the source (weight 0.5, temperature 2)"
    assert f"Pruning: 40 steps (no phases logged){said}; final LM loss" in md
    assert f"Fine-tuning: 10 steps of LoRA r=8 on q_proj, v_proj{said}: 12,288 trained parameters" in md


def test_missing_stages_give_not_run_lines(tmp_path: Path) -> None:
    run = make_run(tmp_path, "nofinetune", finetune=False, source=False)
    md = render_markdown(build_report([run]), tmp_path / "assets")
    assert "Fine-tuning: not run: finetune is disabled in the recipe" in md
    assert "not run: no source evaluation" in md
    assert _row(md, "piqa")[3] == "—"  # no source number, no invented delta
    assert _row(md, "piqa")[5] == "—"

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "state.json").write_text('{"stages": {}}')  # a run that has not got far
    md = render_markdown(build_report([empty]), tmp_path / "assets")
    for title in ("Summary", "Tasks", "Perplexity", "Speed and memory", "Kept structures per layer",
                  "Training curves", "Reproducibility"):
        section = md.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
        assert "not run" in section, title


def test_several_runs_give_a_side_by_side_table(tmp_path: Path) -> None:
    a, b = make_run(tmp_path / "x", "demo"), make_run(tmp_path / "y", "demo", sparsity=0.5)  # one recipe, twice
    (b / "evaluate" / "pruned.json").write_text(json.dumps(_results("pruned", 0.8, ppl=15.0, decode=120.0,
                                                                    peak=600_000)))
    md = render_markdown(build_report([a, b]), tmp_path / "assets")
    assert _row(md, "")[1:] == ["source", "x/demo", "y/demo"]  # columns named by run folder, made unique
    piqa = _row(md, "piqa (%, retention)")
    assert [_float(c) for c in piqa[1:]] == [61.23, round(0.6123 * 0.9 * 100, 2), round(0.6123 * 0.8 * 100, 2)]
    assert piqa[2].endswith("(90.0%)") and piqa[3].endswith("(80.0%)")
    assert [_float(c) for c in _row(md, "perplexity")[1:]] == [10.5, 12.346, 15.0]
    assert _row(md, "mean retention")[2].startswith("90.0% ±")
    assert md.count("## Summary") == 0 and md.count("Decision") == 0  # no run's full report repeated
    assert not (tmp_path / "assets").exists()


def test_pad_export_shows_stored_structures(tmp_path: Path) -> None:
    run = make_run(tmp_path, "padded")
    path = run / "finetune" / "model" / "compresso_manifest.json"
    manifest = json.loads(path.read_text())
    manifest["mode"] = "pad"
    manifest["kept"]["stored_query_heads_per_layer"] = [8, 8, 8]
    manifest["kept"]["stored_ffn_channels_per_layer"] = [172, 172, 172]
    path.write_text(json.dumps(manifest))
    md = render_markdown(build_report([run]), tmp_path / "assets")
    assert _row(md, "layer")[1:] == ["query heads kept", "FFN channels kept", "query heads stored",
                                     "FFN channels stored"]
    assert _row(md, "2")[1:] == ["4 / 8", "90 / 172", "8", "172"]
    assert _row(md, "export mode")[2] == "pad"


def _require(run: Path, **thresholds: float) -> None:
    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text())
    recipe["report"] = {"require": thresholds}
    recipe["target"] = {"sparsity": 0.3}
    (run / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe))


def test_decision_states_target_achieved_and_the_verdict(run_dir: Path, tmp_path: Path) -> None:
    _require(run_dir, retention=0.85, ppl_ratio=1.2)
    md = render_markdown(build_report([run_dir]), None)
    decision = md.split("## Decision", 1)[1].split("\n## ", 1)[0]
    assert "**Verdict: PASS**" in decision
    assert _row(decision, "parameters")[1:] == ["—", "181,234"]  # no plan.json here: the recipe's target only
    assert _row(decision, "prunable sparsity %")[1:] == ["30.00", "30.00"]
    retention = _row(decision, "mean retention (3 task(s))")
    assert retention[1].startswith("90.0% ± ") and retention[2:] == ["≥ 90.00 %".replace("90.00", "85.00"), "pass"]
    assert _row(decision, "perplexity ratio")[1].startswith(f"{12.3456 / 10.5:.2f}×")
    assert _row(decision, "deployed memory")[1].startswith("781.25 KiB vs 1.05 MiB")
    assert "weights_plus_kv_cache" not in md and "weights + KV cache" in md

    _require(run_dir, retention=0.95)
    report = build_report([run_dir])
    assert report["runs"][0]["decision"]["verdict"] == "FAIL"
    assert "**Verdict: FAIL** (failed: mean retention)" in render_markdown(report, None)


def test_report_check_exits_3_on_fail_and_stdout_writes_no_files(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from click.testing import CliRunner

    from compresso_ops.cli import main

    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    assert CliRunner().invoke(main, ["report", str(run_dir), "--check"]).exit_code == 0  # no thresholds: unchecked
    _require(run_dir, ppl_ratio=1.1)
    failed = CliRunner().invoke(main, ["report", str(run_dir), "--check"])
    assert failed.exit_code == 3
    assert f"{run_dir}: FAIL: ppl_ratio" in failed.output
    assert "Charts are written only next to a report file" in failed.output
    assert set(tmp_path.iterdir()) == before  # nothing written into the working folder
    out = tmp_path / "review" / "r.md"
    assert CliRunner().invoke(main, ["report", str(run_dir), "-o", str(out)]).exit_code == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.md", "r_assets"]


def test_task_deltas_within_noise_are_marked_and_internals_hidden(run_dir: Path) -> None:
    pruned_file = run_dir / "evaluate" / "pruned.json"
    pruned = json.loads(pruned_file.read_text())
    pruned["tasks"]["copa"]["value"] = 0.70  # 1 point below the source's 0.71, with stderr 0.045: noise
    pruned["prompt"]["text"] = "Note to the assistant: a pruning procedure has compressed you by deleting parameters."
    pruned_file.write_text(json.dumps(pruned))
    source = json.loads((run_dir / "evaluate" / "source.json").read_text())
    source["cache"] = {"hit": True, "key": "0123456789abcdef0123", "file": "/cache/x.json"}
    (run_dir / "evaluate" / "source.json").write_text(json.dumps(source))
    md = render_markdown(build_report([run_dir]), None)
    assert _row(md, "copa")[5] == "-1.00 ± 6.36 ≈"
    assert not _row(md, "piqa")[5].endswith("≈")  # 6 points on 1838 examples is not noise
    assert "0123456789abcdef0123" not in md and "reused from an earlier run" in md
    assert '("Note to the assistant: a pruning procedure has compressed…")' in md  # cut between words

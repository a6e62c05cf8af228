"""Recipe loading: valid recipes load; each kind of malformed recipe gives exit 2 and FILE:LINE: field: message."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.infra.units import parse_bytes
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.recipe.schema import parse_param_count, recipe_json_schema
from tests.tiny import REPO_ROOT, save_tiny

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<field>[^:]+): (?P<msg>.+)$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", "llama")


def _write(folder: Path, body: str, name: str = "r.yaml") -> Path:
    (folder / "train.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


BASE = """
name: t
model:
  path: {model}
target:
  sparsity: 0.3
data:
  path: train.jsonl
  max_seq_length: 128
"""


def test_valid_recipe_loads_and_resolves_paths(tmp_path, model_dir):
    recipe = load_recipe(_write(tmp_path, BASE.format(model=model_dir)))
    assert recipe.data.path == tmp_path / "train.jsonl"
    assert recipe.prune.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.resolved_run_dir() == Path("runs/t")


def test_extends_overrides_fields_and_keeps_the_rest(tmp_path, model_dir):
    _write(tmp_path, BASE.format(model=model_dir), "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\nname: child\ntarget:\n  sparsity: 0.5\n", "child.yaml")
    recipe = load_recipe(child)
    assert (recipe.name, recipe.target.sparsity) == ("child", 0.5)
    assert recipe.data.path == tmp_path / "train.jsonl"


@pytest.mark.parametrize("value,expected", [("5.4B", 5_400_000_000), ("500M", 500_000_000), (123, 123),
                                            ("6738415616", 6_738_415_616), ("1.5k", 1500)])
def test_param_counts_parse(value, expected):
    assert parse_param_count(value) == expected


@pytest.mark.parametrize("value,expected", [("512GB", 512 * 10**9), ("768GiB", 768 * 2**30), ("500MB", 500 * 10**6),
                                            ("1.5 TiB", round(1.5 * 2**40)), (4096, 4096), ("4096", 4096)])
def test_sizes_parse(value, expected):
    assert parse_bytes(value) == expected


# Each case: a recipe body (with {model} for the tiny model folder), the field the error names, the line it
# points at, and a fragment of the message.
MALFORMED = {
    "unknown top-level key": (BASE + "tragets: 1\n", "tragets", 9, "did you mean 'target'"),
    "unknown nested key": (BASE + "prune:\n  lora:\n    rank: 8\n", "prune.lora.rank", 11, "valid keys: alpha, dropout, r,"),
    "wrong type": (BASE + "prune:\n  micro_batch_size: four\n", "prune.micro_batch_size", 10, "integer"),
    "out of range sparsity": (BASE.replace("0.3", "1.5"), "target.sparsity", 5, "less than 1"),
    "host memory not a size": (BASE + "hardware:\n  host_memory: lots\n", "hardware.host_memory", 10,
                               "write it as 512GB, 768GiB"),
    "negative learning rate": (BASE + "prune:\n  lr:\n    gates: -0.1\n", "prune.lr.gates", 11, "greater than 0"),
    "both sparsity and params": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  params: 10K"), "target", 4,
                                 "exactly one"),
    "neither sparsity nor params": (BASE.replace("  sparsity: 0.3\n", "  structures: [heads]\n"), "target", 4,
                                    "exactly one"),
    "empty structures": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: []"), "target", 4, "empty"),
    "unknown structure": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [heads, layers]"),
                          "target.structures[1]", 6, "heads"),
    "bad param count": (BASE.replace("sparsity: 0.3", "params: lots"), "target.params", 5, "parameter count"),
    "infeasible params target": (BASE.replace("sparsity: 0.3", "params: 10M"), "target.params", 5,
                                 "not below the source"),
    "target below embeddings without hidden": (
        BASE.replace("sparsity: 0.3", "params: 100\n  structures: [heads, ffn]"), "target.params", 5, "embeddings"),
    "missing file": (BASE.replace("train.jsonl", "nope.jsonl"), "data.path", 7, "file not found"),
    "missing model folder": (BASE.replace("{model}", "./no-such-model"), "model.path", 3, "no local config.json"),
    "bad yaml": (BASE + "prune: [unclosed\n", "yaml", 10, "fix the YAML"),
    "bf16 export dtype on V100": (BASE + "hardware:\n  gpu: V100-32GB\nexport:\n  dtype: bfloat16\n", "export.dtype", 12,
                                  "use float16"),
    "bf16 model dtype on V100": (BASE.replace("  path: {model}", "  path: {model}\n  dtype: bfloat16")
                                 + "hardware:\n  gpu: V100-16GB\n", "model.dtype", 4, "use float16"),
    "unknown gpu": (BASE + "hardware:\n  gpu: V100\n", "hardware.gpu", 10, "V100-32GB"),
    "fsdp on one GPU": (BASE + "hardware:\n  gpu: V100-16GB\n  strategy: fsdp\n", "hardware", 9, "use auto or ddp"),
    "lora target module that does not exist": (BASE + "prune:\n  lora:\n    target_modules: [q_proj, qkv]\n",
                                               "prune.lora.target_modules[1]", 11, "not a projection"),
    "sequence above the model's limit": (BASE.replace("max_seq_length: 128", "max_seq_length: 4096"),
                                         "data.max_seq_length", 8,
                                         "above the model's limit"),
    "wrong export mode": (BASE + "export:\n  mode: sharded\n", "export.mode", 10, "native"),
    "section given as a scalar": (BASE + "prune: fast\n", "prune", 9, "dictionary"),
    "missing model": ("name: t\ntarget:\n  sparsity: 0.3\n", "model", 1, "required"),
    "unknown preset": ("name: t\nmodel:\n  path: org/m\n  architecture: llama-8b\ntarget:\n  sparsity: 0.3\n",
                       "model.architecture", 4, "did you mean"),
    "hub id without preset": ("name: t\nmodel:\n  path: org/m\ntarget:\n  sparsity: 0.3\n", "model.path", 3,
                              "model.architecture"),
    "duplicate key": (BASE + "name: u\n", "name", 9, "twice"),
    "not a mapping": ("- just\n- a list\n", "(recipe)", 1, "mapping"),
    "empty file": ("", "(recipe)", 1, "empty"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_gives_exit_2_and_a_located_line(case, tmp_path, model_dir):
    body, field, line, fragment = MALFORMED[case]
    path = _write(tmp_path, body.replace("{model}", str(model_dir)))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.endswith(": ok")]
    assert lines, result.output
    match = LINE.match(lines[0])
    assert match, f"not FILE:LINE: field: message: {lines[0]!r}"
    assert Path(match["file"]).name == path.name
    assert match["field"] == field, lines[0]
    assert int(match["line"]) == line, lines[0]
    assert fragment in match["msg"], lines[0]


def test_bad_extends_is_located(tmp_path):
    path = _write(tmp_path, "extends: missing.yaml\nname: x\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert re.match(r"^.*r\.yaml:1: extends: recipe 'missing.yaml' not found", result.output)


def test_extends_cycle_is_refused(tmp_path):
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    path = _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "cycle" in result.output


def test_every_problem_is_reported_in_one_pass(tmp_path, model_dir):
    path = _write(tmp_path, BASE.format(model=model_dir) + "prune:\n  seed: x\n  micro_batch_size: 0\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 2


def test_shipped_schema_is_in_sync():
    shipped = json.loads((REPO_ROOT / "schemas" / "recipe.schema.json").read_text())
    assert shipped == recipe_json_schema(), "run `make schema` to regenerate schemas/recipe.schema.json"


def test_schema_command_prints_the_schema():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "compresso-ops recipe"


def test_shipped_recipes_start_with_the_schema_comment_and_load():
    for path in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        assert path.read_text().startswith("# yaml-language-server: $schema=../schemas/recipe.schema.json"), path
        load_recipe(path, check_files=False)

"""`model.path` as a hub id resolves through the local Hugging Face cache (no network), in validate, plan and
preflight alike; a cached config without weights plans but does not validate."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.models.resolve import locate_model
from compresso_ops.recipe.schema import ModelSection
from tests.tiny import save_tiny

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub's cache look-ups read (the constant is read at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_repo(cache: Path, repo_id: str, *, weights: bool) -> Path:
    """The layout `hf download` leaves: models--org--name/snapshots/<commit>/... and refs/main -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    save_tiny(snapshot, "qwen3")
    if not weights:
        for f in snapshot.glob("*.safetensors"):
            f.unlink()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def _recipe(folder: Path, repo_id: str) -> Path:
    (folder / "train.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    path = folder / "r.yaml"
    path.write_text(textwrap.dedent(f"""
        model: {{path: {repo_id}}}
        target: {{sparsity: 0.3}}
        data: {{path: train.jsonl, max_seq_length: 200}}
        prompt: {{text: none}}
    """))
    return path


def test_a_cached_hub_id_resolves_to_its_snapshot(tmp_path, hub_cache):
    snapshot = _cache_repo(hub_cache, "org/tiny-qwen3", weights=True)
    location = locate_model(ModelSection(path="org/tiny-qwen3"))
    assert location.folder == snapshot and location.has_weights and not location.is_path
    assert location.problem(need_weights=True) is None
    recipe = _recipe(tmp_path, "org/tiny-qwen3")
    assert CliRunner().invoke(main, ["validate", str(recipe)]).exit_code == 0
    result = CliRunner().invoke(main, ["plan", str(recipe), "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((snapshot / "config.json").read_text())
    assert json.loads(result.output)["architecture"]["hidden_size"] == config["hidden_size"]
    assert locate_model(ModelSection(path="org/tiny-qwen3", revision="no-such-branch")).folder is None


def test_a_cached_config_without_weights_plans_but_fails_validate_in_one_line(tmp_path, hub_cache):
    snapshot = _cache_repo(hub_cache, "org/config-only", weights=False)
    recipe = _recipe(tmp_path, "org/config-only")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    problems = [line for line in result.output.splitlines() if line.strip()]
    assert len(problems) == 1, result.output
    assert problems[0].endswith(f"r.yaml:2: model.path: {snapshot} has a config.json but no weights "
                                "(*.safetensors or *.bin); copy the weights there (plan works from the config alone)")
    assert CliRunner().invoke(main, ["plan", str(recipe), "--json"]).exit_code == 0


def test_a_hub_id_not_in_the_cache_says_how_to_download_it(tmp_path, hub_cache):
    shutil.rmtree(hub_cache)
    recipe = _recipe(tmp_path, "org/absent")
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2 and "(hf download org/absent puts it there)" in result.output
    recipe.write_text(recipe.read_text().replace("org/absent}", "org/absent, architecture: qwen3-8b}"))
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 2
    assert "'org/absent' is not in the Hugging Face cache; download it first (hf download org/absent)" in result.output
    assert CliRunner().invoke(main, ["plan", str(recipe), "--json"]).exit_code == 0  # the preset plans it
    assert "huggingface-cli" not in result.output

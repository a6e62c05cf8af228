"""The recipe catalogue: `recipes ls` lists what ships, `recipes cp` gives a copy that loads where it lands,
and the wheel's package data covers every catalogue file."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.recipe.loader import load_recipe
from tests.tiny import REPO_ROOT


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_ls_lists_every_shipped_recipe_with_its_description():
    result = _invoke("recipes", "ls", "--json")
    assert result.exit_code == 0, result.output
    listed = {row["name"]: row["description"] for row in json.loads(result.output)}
    shipped = sorted(REPO_ROOT.glob("recipes/*.yaml"))
    assert sorted(listed) == [p.stem for p in shipped]
    for path in shipped:
        own = yaml.safe_load(path.read_text())
        assert listed[path.stem] == own["description"], path
    plain = _invoke("recipes", "ls").output.splitlines()
    assert [line.split()[0] for line in plain] == sorted(listed)


def test_cp_copies_a_recipe_with_its_files_and_it_validates_there(tmp_path):
    result = _invoke("recipes", "cp", "demo", str(tmp_path))
    assert result.exit_code == 0, result.output
    copied = tmp_path / "demo.yaml"
    assert (tmp_path / "demo" / "model" / "config.json").is_file()
    assert not copied.read_text().startswith("# yaml-language-server: $schema=../")  # would point nowhere here
    recipe = load_recipe(copied, check_files=True)
    assert recipe.data.path == tmp_path / "demo" / "train.jsonl"


def test_cp_of_an_extending_recipe_brings_its_parent_and_may_rename(tmp_path):
    result = _invoke("recipes", "cp", "llama7b-4.5b.yaml", str(tmp_path / "mine.yaml"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "llama7b-5.4b.yaml").is_file()
    recipe = load_recipe(tmp_path / "mine.yaml", check_files=False)
    assert (recipe.name, recipe.target.params) == ("llama7b-4.5b", 4_500_000_000)


def test_cp_refuses_to_overwrite_without_force(tmp_path):
    dest = tmp_path / "r.yaml"
    dest.write_text("mine\n")
    result = _invoke("recipes", "cp", "llama7b-5.4b", str(dest))
    assert result.exit_code == 2
    assert "already exists; pass --force" in result.output and "Traceback" not in result.output
    assert dest.read_text() == "mine\n"
    assert _invoke("recipes", "cp", "llama7b-5.4b", str(dest), "--force").exit_code == 0
    assert load_recipe(dest, check_files=False).name == "llama7b-5.4b"


def test_cp_of_an_unknown_name_suggests_one():
    result = _invoke("recipes", "cp", "dmeo", ".")
    assert result.exit_code == 2
    assert "did you mean 'demo'?" in result.output


def test_package_data_ships_every_catalogue_file():
    """compresso_ops/recipes links to recipes/; a file its package-data globs miss would be absent from wheels."""
    assert (REPO_ROOT / "compresso_ops" / "recipes").resolve() == (REPO_ROOT / "recipes").resolve()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    globs = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = REPO_ROOT / "compresso_ops"
    shipped = {str(p.relative_to(package)) for g in globs["compresso_ops"] for p in package.glob(g) if p.is_file()}
    tracked = subprocess.run(["git", "ls-files", "recipes"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked
    assert sorted(set(tracked) - shipped) == []

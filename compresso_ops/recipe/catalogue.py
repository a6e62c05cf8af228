"""The recipe catalogue: the recipes shipped with the package, to list and to copy as a starting point.

The catalogue is the repository's `recipes/` folder; `compresso_ops/recipes` links to it, so a source
checkout and an installed wheel (which holds real copies) read it at the same place. A catalogue recipe may
`extends:` another and may keep its own files (model, data) in a folder named like it (`demo.yaml` and
`demo/`); copying a recipe copies both, so the copy loads wherever it lands.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import yaml

from compresso_ops.errors import UserError
from compresso_ops.infra import atomic
from compresso_ops.recipe.loader import merged_fields

CATALOGUE = Path(__file__).resolve().parent.parent / "recipes"
_MODELINE = "# yaml-language-server: $schema="


def catalogue() -> dict[str, Path]:
    """Recipe name (file stem) -> file, sorted by name."""
    return {p.stem: p for p in sorted(CATALOGUE.glob("*.yaml"))}


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) per shipped recipe; an inherited description counts."""
    rows = []
    for name, path in catalogue().items():
        text = str(merged_fields(path).get("description") or "")
        rows.append((name, " ".join(text.split())))
    return rows


def find(name: str) -> Path:
    """The catalogue file called `name` (with or without .yaml); exit 2 with a hint when there is none."""
    recipes = catalogue()
    stem = name.removesuffix(".yaml")
    if stem in recipes:
        return recipes[stem]
    close = difflib.get_close_matches(stem, list(recipes), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(recipes)}"
    raise UserError(f"recipes: no recipe '{name}' in the catalogue; {hint} (`compresso-ops recipes ls` lists them)")


def copy(name: str, dest: Path, *, force: bool = False) -> list[Path]:
    """Copy recipe `name` to `dest` (a file, or a folder to copy into) with the recipes it extends and its
    files folder; return what was written. Refuses to overwrite anything unless `force`."""
    source = find(name)
    target = dest / source.name if dest.is_dir() else dest
    plan: list[tuple[Path, Path]] = [(source, target)]
    for parent in _extended(source):
        plan.append((parent, target.parent / parent.relative_to(CATALOGUE)))
    if (assets := CATALOGUE / source.stem).is_dir():
        plan.append((assets, target.parent / assets.name))
    existing = [str(dst) for _, dst in plan if dst.exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise UserError(f"recipes cp: {', '.join(existing)} already {verb}; pass --force to overwrite")
    for src, dst in plan:
        if src.is_dir():
            with atomic.atomic_dir(dst) as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            atomic.write_text(dst, _retarget_modeline(src.read_text(encoding="utf-8")))
    return [dst for _, dst in plan]


def _extended(path: Path) -> list[Path]:
    """The catalogue recipes `path` extends, nearest first (the loader refuses cycles and missing parents)."""
    chain: list[Path] = []
    while isinstance(parent := (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("extends"), str):
        path = (path.parent / parent).resolve()
        if path in chain or not path.is_relative_to(CATALOGUE.resolve()) or not path.is_file():
            break
        chain.append(path)
    return [CATALOGUE / p.relative_to(CATALOGUE.resolve()) for p in chain]


def _retarget_modeline(text: str) -> str:
    """Point the editor's schema comment at this installation's schema (a relative one breaks once copied);
    drop it where no schema file ships (`compresso-ops schema > recipe.schema.json` makes one)."""
    schema = CATALOGUE.resolve().parent / "schemas" / "recipe.schema.json"
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith(_MODELINE):
        lines[0] = f"{_MODELINE}{schema}\n" if schema.is_file() else ""
    return "".join(lines)

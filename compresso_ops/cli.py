"""The `compresso-ops` command line. Thin: every command parses options and calls the package's API.

Exit codes: 0 success, 1 an internal error, 2 bad input (one line per problem, never a traceback),
3 a `--check` failed (plan: a stage does not fit; report: a verdict is FAIL), 130 interrupted (the run
checkpoints first and resumes on the next `apply`).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from compresso_ops.errors import UserError


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one line each and exit 2; Ctrl-C into exit 130; anything else into one line
    and exit 1 (COMPRESSO_OPS_DEBUG=1 shows the traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            for line in exc.lines:
                click.echo(line, err=True)
            _exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; the next `compresso-ops apply` resumes from the last checkpoint", err=True)
            _exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                _internal_error(exc)
            click.echo(f"{exc.filename or 'the run folder'}: no space left on the device; free space and rerun "
                       "(`apply` resumes from the last checkpoint)", err=True)
            _exit(2)
        except Exception as exc:  # noqa: BLE001 (an internal error: one line unless debugging)
            _internal_error(exc)

    return wrapper


def _internal_error(exc: Exception) -> None:
    if os.environ.get("COMPRESSO_OPS_DEBUG"):
        raise exc
    click.echo(f"internal error: {type(exc).__name__}: {exc} (set COMPRESSO_OPS_DEBUG=1 for the traceback)", err=True)
    _exit(1)


EXIT_FILE_ENV = "COMPRESSO_OPS_EXIT_FILE"


def _exit(code: int) -> None:
    """Exit with `code`; under a self-launched torchrun, rank 0 also leaves the code for the launcher, whose
    own exit status would otherwise be torchrun's generic 1."""
    exit_file = os.environ.get(EXIT_FILE_ENV)
    if exit_file and os.environ.get("RANK", "0") == "0":
        Path(exit_file).write_text(str(code))
    sys.exit(code)


def _launch_torchrun(nproc: int) -> int:
    """Re-run this very command under torchrun (torch.distributed.run), one process per GPU on this node."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="compresso-exit-", delete=False) as fh:
        exit_file = Path(fh.name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "compresso_ops.cli", *sys.argv[1:]]
    held: list[str] = []  # torchrun's own failure report, shown only when no worker explained the failure
    try:
        proc = subprocess.Popen(cmd, env={**os.environ, EXIT_FILE_ENV: str(exit_file)}, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None
        while True:
            try:
                for line in proc.stderr:
                    if held or line.startswith("Traceback (most recent call last):"):
                        held.append(line)
                    else:
                        sys.stderr.write(line)
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # the workers got it too: wait while they checkpoint and stop
                continue
        code = exit_file.read_text().strip()
        if not code:
            sys.stderr.writelines(held)
        return int(code) if code else rc
    finally:
        exit_file.unlink(missing_ok=True)


CHECK_FAILED = 3  # `plan --check`: a stage does not fit its GPU; `report --check`: a verdict is FAIL

STAGE_CHOICES = ("plan", "prune", "slice", "finetune", "evaluate", "report")
recipe_arg = click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override one recipe field, e.g. --set prune.lr.lora=1e-4 (a YAML value; repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compresso-ops")
def main() -> None:
    """Compress LLaMA-family models with Compresso structured pruning, driven by a YAML recipe."""


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@set_option
@_handle_errors
def validate(recipes: tuple[Path, ...], overrides: tuple[str, ...]) -> None:
    """Check RECIPES: schema, cross-field rules and that their files exist.

    Prints one `FILE:LINE: field: message` line per problem and exits 2 if any recipe is invalid.
    """
    from compresso_ops.errors import RecipeError
    from compresso_ops.recipe.loader import load_recipe

    problems: list[str] = []
    for path in recipes:
        try:
            recipe = load_recipe(path, check_files=True, overrides=overrides)
            click.echo(f"{path}: ok")
            for line in recipe.warnings:
                click.echo(line)
        except RecipeError as exc:
            problems.extend(exc.lines)
    if problems:
        raise UserError(problems[0], lines=problems)


@main.group()
def recipes() -> None:
    """The recipes shipped with compresso-ops: list them, copy one to edit."""


@recipes.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {name, description, path}.")
@_handle_errors
def recipes_ls(as_json: bool) -> None:
    """List the shipped recipes with their descriptions."""
    from compresso_ops.recipe.catalogue import catalogue, describe

    rows = describe()
    if as_json:
        paths = catalogue()
        click.echo(json.dumps([{"name": n, "description": d, "path": str(paths[n])} for n, d in rows], indent=2))
        return
    width = max((len(name) for name, _ in rows), default=0)
    for name, description in rows:
        click.echo(f"{name:<{width}}  {description}".rstrip())


@recipes.command("cp")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite files that already exist.")
@_handle_errors
def recipes_cp(name: str, dest: Path, force: bool) -> None:
    """Copy recipe NAME to DEST (a file or a folder), with the recipes it extends and its files folder."""
    from compresso_ops.recipe.catalogue import copy

    for path in copy(name, dest, force=force):
        click.echo(f"wrote {path}")


@main.command()
@_handle_errors
def schema() -> None:
    """Print the recipe's JSON Schema (the source of schemas/recipe.schema.json)."""
    from compresso_ops.recipe.schema import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))


@main.command()
@recipe_arg
@set_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--check", is_flag=True, help="Exit 3 when a stage does not fit its GPU (for scripts and CI).")
@_handle_errors
def plan(recipe: Path, overrides: tuple[str, ...], as_json: bool, check: bool) -> None:
    """Plan sizes, trainable parameters, GPU memory and steps for RECIPE without running anything.

    With --check, exits 3 and names each stage that does not fit (exit 2 stays "the recipe is invalid").
    """
    from compresso_ops.stages.plan import misfits

    problems = misfits(_print_plan(recipe, overrides, as_json))
    if check and problems:
        for line in problems:
            click.echo(f"{recipe}: does not fit: {line}", err=True)
        _exit(CHECK_FAILED)


@main.command()
@recipe_arg
@set_option
@click.option("--dry-run", is_flag=True, help="Print the plan and run nothing (same as `plan`).")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON; otherwise the final "
              "run state as JSON.")
@click.option("--from", "from_stage", type=click.Choice(STAGE_CHOICES), help="Re-run from this stage on.")
@click.option("--until", type=click.Choice(STAGE_CHOICES), help="Stop after this stage.")
@click.option("--force", is_flag=True, help="Re-run every stage, even those that are up to date.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), help="Override the recipe's run_dir.")
@click.option("--plain", is_flag=True, help="Timestamped lines instead of the live view (automatic off a terminal).")
@click.option("--break-stale-lock", is_flag=True, help="Take over a run folder whose lock's process is gone.")
@_handle_errors
def apply(recipe: Path, overrides: tuple[str, ...], dry_run: bool, as_json: bool, from_stage: str | None, until: str | None, force: bool,
          run_dir: Path | None, plain: bool, break_stale_lock: bool) -> None:
    """Run plan -> prune -> slice -> finetune -> evaluate -> report for RECIPE.

    Re-running the same command skips finished stages and resumes an interrupted one from its last
    checkpoint; a changed recipe re-runs only the stages whose inputs changed.
    """
    if dry_run:
        _print_plan(recipe, overrides, as_json)
        return
    from compresso_ops.executor import Executor
    from compresso_ops.recipe.loader import load_recipe
    from compresso_ops.ui.progress import make_reporter, quiet_libraries

    loaded = load_recipe(recipe, check_files=True, overrides=overrides)
    executor = Executor(loaded, make_reporter(force_plain=plain or as_json), run_dir=run_dir, from_stage=from_stage,
                        until=until, force=force, break_stale_lock=break_stale_lock)
    hw = loaded.hardware
    if hw.world_size > 1 and "LOCAL_RANK" not in os.environ:
        if hw.nodes > 1:
            raise UserError(f"{recipe}: hardware.nodes is {hw.nodes}; start multi-node runs with torchrun on every "
                            "node (see the README's 'Several GPUs and nodes')")
        executor.check_before_launch()
        _exit(_launch_torchrun(hw.gpus_per_node))
    quiet_libraries()
    state = executor.run()
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        click.echo(json.dumps(state, indent=2))
    else:
        report = executor.run_dir / "report.md"
        if report.is_file():
            click.echo(f"report: {report}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Markdown file to write, with its charts in OUTPUT_assets/ beside it (default: print to stdout, "
                   "without charts).")
@click.option("--json", "as_json", is_flag=True, help="Write the report's content as JSON instead of markdown.")
@click.option("--check", is_flag=True, help="Exit 3 when a run's verdict is FAIL against its report.require "
              "thresholds (for CI gates).")
@_handle_errors
def report(run_dirs: tuple[Path, ...], output: Path | None, as_json: bool, check: bool) -> None:
    """Write the release-review report for one or more RUN_DIRS (several give a side-by-side table)."""
    from compresso_ops.stages.report import build_report, failures, render_markdown

    content = build_report(list(run_dirs))
    if as_json:
        text = json.dumps(content, indent=2)
    else:
        # Charts are files: they go beside the report file, never into the working folder of a stdout report.
        text = render_markdown(content, output.parent / f"{output.stem}_assets" if output else None)
    if output:
        from compresso_ops.infra import atomic

        atomic.write_text(output, text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text)
    if check and (failed := failures(content)):
        for line in failed:
            click.echo(line, err=True)
        _exit(CHECK_FAILED)


def _print_plan(recipe_path: Path, overrides: tuple[str, ...], as_json: bool) -> dict[str, Any]:
    from compresso_ops.recipe.loader import load_recipe
    from compresso_ops.stages.plan import make_plan

    recipe = load_recipe(recipe_path, check_files=False, overrides=overrides)
    result = make_plan(recipe)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from compresso_ops.ui.plan_view import render_plan

        render_plan(result, Console(highlight=False))
    return result


if __name__ == "__main__":
    main()

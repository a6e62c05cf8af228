"""Read a recipe file: safe YAML with line numbers, `extends:`, relative paths, and every problem reported as
`FILE:LINE: field.path: message`.

Validation happens in three layers. YAML syntax, then the pydantic schema (types, ranges, unknown keys with
a "did you mean" hint), then checks that need the model's architecture or the file system (the target is
reachable, LoRA targets exist, files exist, bf16 is not asked of a V100). All problems of a layer are
reported together so a user fixes a recipe in one pass.
"""


from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ValidationError

from compresso_ops.errors import RecipeError, UserError
from compresso_ops.evaluation.tasks import check_task_file, unknown_task_problems
from compresso_ops.method.rates import ramp_too_short
from compresso_ops.models.architecture import PRESETS, PROJECTIONS, unknown_preset
from compresso_ops.models.resolve import locate_model, resolve_arch
from compresso_ops.models.sizes import alignment_problem, count_params, target_sparsity, unmeetable_target
from compresso_ops.recipe.schema import Recipe, micro_batch_problem

Loc = tuple[str | int, ...]


Locations = dict[Loc, tuple[str, int]]


# Fields holding file paths; relative values are resolved against the folder of the recipe that wrote them.
_PATH_FIELDS: tuple[Loc, ...] = (
    ("data", "path"), ("data", "validation_path"), ("eval", "perplexity", "path"), ("run_dir",),
)


_GPU_WITHOUT_BF16 = ("V100-16GB", "V100-32GB")


class _Problems:
    def __init__(self, locations: Locations, default_file: str) -> None:
        self.locations = locations
        self.default_file = default_file
        self.lines: list[str] = []

    def add(self, loc: Loc, message: str) -> None:
        file, line = self.default_file, 1
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.locations:
                file, line = self.locations[loc[:end]]
                break
        # A field set on the command line has no line: its "file" is the override itself (line 0).
        where = f"{file}:{line}" if line else file
        self.lines.append(f"{where}: {_dotted(loc) or '(recipe)'}: {message}")


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# A recipe is a few hundred lines; a larger file is not one, and reading it whole would cost memory.
MAX_RECIPE_BYTES = 1 << 20


class _AliasRefused(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that refuses duplicate keys (YAML silently keeps the last one otherwise) and aliases:
    `*name` shares a node, so ten lines of nested aliases expand to billions of values (an alias bomb)
    and a self-referencing one never ends. `extends:` is how recipes reuse each other."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _AliasRefused(problem="YAML aliases (*name) are not allowed in a recipe; write the value out "
                                "or share settings with extends:", problem_mark=mark)
        return super().compose_node(parent, index)


def _compose(path: Path) -> yaml.Node | None:
    text = path.read_text(encoding="utf-8")
    return yaml.compose(text, Loader=_UniqueKeyLoader)


def _to_python(node: yaml.Node, loc: Loc, file: str, locations: Locations, errors: list[str]) -> Any:
    locations[loc] = (file, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _UniqueKeyLoader(" ").construct_object(key_node)
            if not isinstance(key, str):
                errors.append(f"{file}:{key_node.start_mark.line + 1}: {_dotted(loc) or '(recipe)'}: "
                              f"key {key!r} is not a string")
                continue
            if key in out:
                errors.append(f"{file}:{key_node.start_mark.line + 1}: {_dotted(loc + (key,))}: "
                              "key appears twice; keep one")
            out[key] = _to_python(value_node, loc + (key,), file, locations, errors)
            locations[loc + (key,)] = (file, key_node.start_mark.line + 1)  # a field's line is its key's
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, loc + (i,), file, locations, errors) for i, v in enumerate(node.value)]
    return _UniqueKeyLoader(" ").construct_object(node)


def _display(path: Path) -> str:
    """A path as users typed it: relative to the working folder when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _read_yaml(path: Path, locations: Locations) -> dict[str, Any]:
    file = _display(path)
    if not path.is_file():
        raise RecipeError([f"{file}:1: (recipe): file not found"])
    if path.stat().st_size > MAX_RECIPE_BYTES:
        size = path.stat().st_size
        raise RecipeError([f"{file}:1: (recipe): {size:,} bytes is too large for a recipe; check the file name"])
    try:
        node = _compose(path)
    except _AliasRefused as exc:
        raise RecipeError([f"{file}:{exc.problem_mark.line + 1}: yaml: {exc.problem}"]) from None
    except RecursionError:
        raise RecipeError([f"{file}:1: yaml: the file nests too deeply to be a recipe"]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise RecipeError([f"{file}:{line}: yaml: {exc.problem or exc.context}; fix the YAML syntax"]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RecipeError([f"{file}:1: yaml: {exc}"]) from None
    if node is None:
        raise RecipeError([f"{file}:1: (recipe): the file is empty; a recipe needs at least name, model and target"])
    errors: list[str] = []
    data = _to_python(node, (), file, locations, errors)
    if errors:
        raise RecipeError(errors)
    if not isinstance(data, dict):
        raise RecipeError([f"{file}:1: (recipe): a recipe is a YAML mapping of sections, not a {type(data).__name__}"])
    _resolve_paths(data, path.parent, file, locations)
    return data


def _resolve_paths(data: dict[str, Any], base: Path, file: str, locations: Locations) -> None:
    """Make relative paths absolute against the folder of the file that wrote them."""

    def fix(container: dict[str, Any], key: str, loc: Loc, model_path: bool = False) -> None:
        value = container.get(key)
        if not isinstance(value, str) or "\0" in value or locations.get(loc, (file,))[0] != file:
            return  # not a path (validation says so)
        p = Path(value).expanduser()
        if p.is_absolute():
            return
        candidate = base / p
        # A model path is a hub id unless it looks like a path or exists next to the recipe.
        if model_path and not (value.startswith((".", "~")) or candidate.exists()):
            return
        container[key] = str(candidate.resolve())

    for loc in _PATH_FIELDS:
        parent = _get(data, loc[:-1])
        if isinstance(parent, dict):
            fix(parent, str(loc[-1]), loc)
    model = data.get("model")
    if isinstance(model, dict):
        fix(model, "path", ("model", "path"), model_path=True)
    tasks = _get(data, ("eval", "local_tasks"))
    if isinstance(tasks, list):
        for i, task in enumerate(tasks):
            if isinstance(task, dict):
                fix(task, "data", ("eval", "local_tasks", i, "data"))


def _get(data: Any, loc: Loc) -> Any:
    for part in loc:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in `override` replace the base's."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_extends(path: Path, locations: Locations, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(_display(p) for p in chain + (path,))
        raise RecipeError([f"{_display(chain[-1])}:1: extends: recipes extend each other in a cycle ({cycle}); break it"])
    own: Locations = {}
    data = _read_yaml(path, own)
    parent = data.pop("extends", None)
    if parent is None:
        locations.update(own)
        return data
    if not isinstance(parent, str) or "\0" in parent:
        line = own.get(("extends",), (str(path), 1))[1]
        what = "without a NUL character (\\0)" if isinstance(parent, str) else "as a string"
        raise RecipeError([f"{_display(path)}:{line}: extends: give the path of another recipe {what}"])
    base_path = (path.parent / parent).resolve()
    if not base_path.is_file():
        line = own.get(("extends",), (str(path), 1))[1]
        raise RecipeError([f"{_display(path)}:{line}: extends: recipe '{parent}' not found (looked for {base_path})"])
    base = _load_with_extends(base_path, locations, chain + (path,))
    locations.update(own)
    return _merge(base, data)


def merged_fields(path: Path) -> dict[str, Any]:
    """A recipe file's fields with `extends:` applied, unvalidated (for listing recipes, not running them)."""
    return _load_with_extends(path, {})


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at `loc` (for "did you mean" hints)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """list[X] -> X, X | None -> X."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _schema_problems(exc: ValidationError, problems: _Problems, data: dict[str, Any]) -> None:
    """One line per field. Pydantic reports a union (`0.5 | "auto"`) once per branch, with the branch's tag in
    the location (`constrained-float`, `literal['auto']`): the tags go, and the branches' messages join."""
    messages: dict[Loc, list[str]] = {}
    for err in exc.errors(include_url=False):
        loc = _recipe_loc(err["loc"], data)
        kind = err["type"]
        msg = _plain_hint(loc, err, data, problems) or err["msg"].removeprefix("Value error, ")
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            if parent is Recipe:
                valid.append("extends")
            close = difflib.get_close_matches(str(loc[-1]).partition(":")[0], valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            if ":" in str(loc[-1]):  # `{weight:0.5}` is one key: YAML splits a key from its value at ': '
                hint += " (write a space after the ':' to give a key a value)"
            msg = f"unknown key '{loc[-1]}'{hint}"
        elif kind == "missing":
            msg = "required field is missing; add it"
        if msg not in messages.setdefault(loc, []):
            messages[loc].append(msg)
    for loc, msgs in messages.items():
        problems.add(loc, "; or ".join(msgs))


def _recipe_loc(loc: tuple[str | int, ...], data: Any) -> Loc:
    """A pydantic error location as the recipe's path: the tags pydantic inserts for union branches
    (`constrained-float`, `literal['auto']`) go; a key the recipe itself holds stays, whatever its spelling."""
    out: list[str | int] = []
    for part in loc:
        here = _get(data, tuple(out))
        if isinstance(part, str) and not part.isidentifier() and not (isinstance(here, dict) and part in here):
            continue
        out.append(part)
    return tuple(out)


def _plain_hint(loc: Loc, err: Any, data: dict[str, Any], problems: _Problems) -> str | None:
    """A message for the mistakes users make most, where pydantic's own text would not say what to write."""
    value, section = err.get("input"), _model_at(loc)
    if isinstance(value, bool) and section is not None and "enabled" in section.model_fields:
        return f"{str(value).lower()} is not a section; write {_dotted(loc)}: {{enabled: {str(value).lower()}}}"
    if loc == ("target", "sparsity") and err["type"] == "less_than" and isinstance(value, (int, float)):
        example = f": write {value / 100:.2f} for {value:g}%" if 1 < value < 100 and value == int(value) else ""
        return f"{value} is not a fraction; sparsity is the share of prunable parameters removed, between 0 " \
               f"and 1{example}"
    target = _get(data, ("target",))
    if loc == ("target",) and isinstance(target, dict) and None not in (target.get("sparsity"), target.get("params")):
        where = {key: problems.locations.get(("target", key), ("", 0)) for key in ("sparsity", "params")}
        overridden = [key for key, (file, line) in where.items() if file.startswith("--set ") and line == 0]
        if len(overridden) == 1:  # the command line chose one; the file holds the other
            key, = overridden
            other = "params" if key == "sparsity" else "sparsity"
            file, line = where[other]
            return (f"target.sparsity and target.params are both set ({where[key][0]}; target.{other} is in "
                    f"{file}:{line}); add --set target.{other}=null to use target.{key} alone")
        inherited = [key for key, (file, _) in where.items() if file != problems.default_file]
        if len(inherited) == 1:
            key = inherited[0]
            file, line = where[key]
            return (f"target.sparsity and target.params are both set (target.{key} comes from {file}:{line} "
                    f"through extends); add '{key}: null' under target to clear the inherited one")
        return "give one of target.sparsity or target.params, not both"
    return None


def _semantic_problems(recipe: Recipe, problems: _Problems, check_files: bool) -> None:
    if recipe.model.architecture and recipe.model.architecture not in PRESETS:
        problems.add(("model", "architecture"), unknown_preset(recipe.model.architecture))
        return
    try:
        arch = resolve_arch(recipe)
    except UserError as exc:
        field, _, msg = str(exc).partition(": ")
        problems.add(tuple(field.split(".")), msg)
        return

    if arch.num_heads % arch.num_kv_heads:
        problems.add(("model", "path"), f"num_attention_heads ({arch.num_heads}) is not a multiple of "
                                        f"num_key_value_heads ({arch.num_kv_heads}); the model config is broken")

    gpu = recipe.hardware.gpu
    for loc, dtype in ((("model", "dtype"), recipe.model.dtype), (("export", "dtype"), recipe.export.dtype)):
        if dtype == "bfloat16" and gpu in _GPU_WITHOUT_BF16:
            problems.add(loc, f"bfloat16 is not supported on {gpu}; use float16 (V100s have no bf16 units)")

    for section in ("prune", "finetune"):
        for i, module in enumerate(getattr(recipe, section).lora.target_modules):
            if module not in PROJECTIONS:
                close = difflib.get_close_matches(module, PROJECTIONS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(PROJECTIONS)}"
                problems.add((section, "lora", "target_modules", i),
                             f"'{module}' is not a projection of a {arch.model_type} layer; {hint}")

    structures = recipe.target.structures
    if recipe.target.params is not None:
        src = count_params(arch)
        if recipe.target.params >= src.total:
            problems.add(("target", "params"), f"{recipe.target.params:,} is not below the source model's "
                                               f"{src.total:,} parameters; pick a smaller target")
        elif "hidden" not in structures and recipe.target.params <= src.embeddings + src.norms:
            problems.add(("target", "params"), f"{recipe.target.params:,} is at or below the embeddings and norms "
                                               f"alone ({src.embeddings + src.norms:,}); add 'hidden' to "
                                               "target.structures or pick a larger target")
    if (why := alignment_problem(arch, recipe.target.multiple_of, structures)) is not None:
        problems.add(("target", "multiple_of"), why)
    sparsity = target_sparsity(recipe, arch) if not problems.lines else None
    if sparsity is not None and sparsity >= 0.95:
        problems.add(("target",), f"prunable sparsity {sparsity:.3f} is not reachable while keeping a usable model "
                                  "(at most 0.95); pick a larger target")
    elif sparsity is not None and (unmeetable := unmeetable_target(arch, sparsity, structures,
                                                                    recipe.target.multiple_of, recipe.export.mode)):
        field, why = unmeetable
        problems.add(tuple(field.split(".")), why)
    for section in ("prune", "finetune"):
        if getattr(recipe, section).distill.hidden_states_weight and "hidden" in structures:
            problems.add((section, "distill", "hidden_states_weight"),
                         "matches the student's hidden states to the source's, so the hidden size must stay: drop "
                         "'hidden' from target.structures or set it to 0")
    if recipe.method != "compresso" and {"attention_blocks", "ffn_blocks"} & set(structures):
        problems.add(("target", "structures"), f"whole-block gates need training; method '{recipe.method}' "
                                               "ranks heads, ffn and hidden only")

    if recipe.method == "compresso" and recipe.prune.one_shot_allocation != "global":
        problems.add(("prune", "one_shot_allocation"), f"{recipe.prune.one_shot_allocation} applies to the one-shot "
                                                       "methods; Compresso's gates choose their own allocation, so "
                                                       "drop this line or pick a one-shot method")

    _length_problems(recipe, arch.max_position_embeddings, problems)
    for section in ("prune", "finetune"):
        micro = getattr(recipe, section).micro_batch_size
        if recipe.data.num_examples and (why := micro_batch_problem(micro, recipe.data.num_examples)):
            problems.add((section, "micro_batch_size"), why)
    if recipe.method == "activation" and (bound := _examples_bound(recipe, check_files)) is not None:
        _calibration_problem(recipe, *bound, problems)
    if recipe.hardware.gpu == "cpu" and recipe.model.dtype == "float16":
        default = "" if ("hardware", "gpu") in recipe._locations else \
            " (the recipe sets no hardware.gpu, and the default is hardware.gpu: cpu)"
        problems.add(("model", "dtype"), f"float16 training is not supported on cpu{default}; set hardware.gpu "
                                         "to your GPU type, or model.dtype: float32 or auto")

    if check_files:
        _file_problems(recipe, arch.vocab_size, problems)


def _examples_bound(recipe: Recipe, check_files: bool) -> tuple[int, str] | None:
    """The most training examples the data can yield, and how that is known, where it is known before the run:
    data.max_samples, data.num_examples, or (checking files) an Alpaca file's rows, one example at most each.
    A text file's chunks depend on the tokenizer: the run counts those."""
    known = [(n, f"data.{field}") for n, field in ((recipe.data.max_samples, "max_samples"),
                                                     (recipe.data.num_examples, "num_examples")) if n is not None]
    path = recipe.data.path
    if check_files and recipe.data.format == "alpaca" and path is not None and Path(path).is_file():
        from compresso_ops.training.data import read_rows

        try:
            known.append((len(read_rows(Path(path))), "rows of data.path"))
        except UserError:
            pass  # a malformed file is the run's error, with its line
    return min(known, default=None)


def _calibration_problem(recipe: Recipe, examples: int, counted_by: str, problems: _Problems) -> None:
    """method activation calibrates on the first prune.calibration_examples training examples, of which at most
    `examples` exist (`counted_by` says how that is known)."""
    wanted = recipe.prune.calibration_examples
    if examples < wanted:
        problems.add(("prune", "calibration_examples"), f"{wanted:,} is more than the training data's {examples:,} "
                                                        f"examples ({counted_by}); lower it to at most {examples:,} "
                                                        "or give more data")


def _length_problems(recipe: Recipe, max_positions: int, problems: _Problems) -> None:
    """Every sequence the run builds fits the model's position table."""
    ppl, speed = recipe.eval.perplexity, recipe.eval.speed
    lengths: list[tuple[Loc, int]] = [(("data", "max_seq_length"), recipe.data.max_seq_length)]
    if ppl is not None:
        lengths.append((("eval", "perplexity", "window"), ppl.window))
    if recipe.eval.max_length is not None:
        lengths.append((("eval", "max_length"), recipe.eval.max_length))
    if speed.enabled:
        lengths.append((("eval", "speed", "prompt_length"), speed.prompt_length + speed.new_tokens))
    for loc, length in lengths:
        if length > max_positions:
            what = "prompt_length + new_tokens = " if loc[-1] == "prompt_length" else ""
            problems.add(loc, f"{what}{length:,} is above the model's limit of {max_positions:,} positions; lower it")


# A bound for when no tokenizer is on disk: no LLaMA-family tokenizer averages more characters per token than
# this over a sentence (LLaMA's is about 4 on English prose), so chars / 10 tokens is a floor.
_MAX_CHARS_PER_TOKEN = 10


def _local_tokenizer(folder: Path | None, problems: _Problems) -> Any:
    """The model `folder`'s tokenizer.json (a `tokenizers.Tokenizer`) when the model is local or cached
    (`folder` not None), else None (a file that does not parse is a problem at model.path)."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
        problems.add(("model", "path"), f"{folder / 'tokenizer.json'} is not a readable tokenizer "
                                        f"({str(exc).splitlines()[0][:120]}); copy the source model's tokenizer "
                                        "files there")
        return None


def _vocabulary_problem(tokenizer: Any, vocab_size: int, problems: _Problems) -> None:
    """Every id the tokenizer can produce must have an embedding row: tokenizer files copied from another
    model (or a pad token added after training) give ids the model cannot look up, and the first forward
    that meets one fails deep inside torch."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        problems.add(("model", "path"), f"the tokenizer has {size:,} tokens but the model's vocabulary (vocab_size in "
                                        f"config.json) has {vocab_size:,}; copy the source model's own tokenizer "
                                        "files into the folder")


def _tokenizer_config(path: Path, problems: _Problems) -> dict[str, Any]:
    """A model folder's tokenizer_config.json ({} when absent; a problem at model.path when not JSON)."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        problems.add(("model", "path"), f"{path} is not valid JSON ({exc}); copy the source model's tokenizer "
                                        "files there")
        return {}
    return config if isinstance(config, dict) else {}


def _prompt_room(recipe: Recipe, tokenizer: Any, bos: bool, problems: _Problems) -> None:
    """Every training sequence starts with BOS, the prompt and the template; at data.max_seq_length there must
    be room left for the example's own text, or the prune stage finds no example to train on. Counted with the
    model's tokenizer.json when it is local or cached, else bounded from the character count."""
    from compresso_ops.method.prompts import resolve_prompt
    from compresso_ops.training.data import fixed_prefix

    stages = [s for s, on in (("prune", recipe.prune_reads_data), ("finetune", recipe.finetune.enabled)) if on]
    prefix = max((fixed_prefix(recipe.data.format, resolve_prompt(recipe.prompt, s)) for s in stages),  # type: ignore[arg-type]
                 key=len, default="")
    if not prefix:
        return
    limit = recipe.data.max_seq_length
    if tokenizer is not None:
        count = len(tokenizer.encode(prefix, add_special_tokens=False).ids) + bos
        how = f"{count} tokens with the model's tokenizer"
    else:
        count = len(prefix) // _MAX_CHARS_PER_TOKEN
        how = f"at least {count} tokens by its {len(prefix)} characters (no local tokenizer to count exactly)"
    if count >= limit:
        problems.add(("data", "max_seq_length"), f"{limit} leaves no room for text after the prompt and the "
                                                 f"{recipe.data.format} template ({how}); raise "
                                                 "data.max_seq_length or shorten prompt.text")


def _warnings(recipe: Recipe, warnings: _Problems) -> list[str]:
    """Valid settings whose outcome can be predicted to be poor; only where the prediction needs no data:
    a steps-based ramp with a fixed multiplier learning rate too small for it, and a field no stage reads."""
    if recipe.data.validation_path is not None:
        warnings.add(("data", "validation_path"), "warning: no stage reads this field; to score held-out text "
                                                  "set eval.perplexity.path (and drop this line)")
    schedule = recipe.prune.schedule
    lag = ramp_too_short(recipe.prune.lr.lagrangian, max(1, int(schedule.ramp))) \
        if recipe.method == "compresso" and schedule.unit == "steps" else None
    if lag is not None:
        warnings.add(("prune", "lr", "lagrangian"), f"warning: {lag}")
    return warnings.lines


def _file_problems(recipe: Recipe, vocab_size: int, problems: _Problems) -> None:
    location = locate_model(recipe.model)
    if (missing := location.problem(need_weights=True)) is not None:
        problems.add(("model", "path"), missing.removeprefix("model.path: "))
    elif not location.has_tokenizer:
        problems.add(("model", "path"), f"{location.folder} has no tokenizer (tokenizer.json, tokenizer.model or "
                                        "tokenizer_config.json); copy the source model's tokenizer files there")
    tokenizer = _local_tokenizer(location.folder, problems)
    if tokenizer is not None:
        _vocabulary_problem(tokenizer, vocab_size, problems)
    config = _tokenizer_config(location.folder / "tokenizer_config.json", problems) if location.folder else {}
    _prompt_room(recipe, tokenizer, bool(config.get("bos_token")), problems)
    needs_data = recipe.prune_reads_data or recipe.finetune.enabled
    if recipe.data.path is None and needs_data:
        problems.add(("data", "path"), "training data is required; give a JSON/JSONL (alpaca) or text file")
    files: list[tuple[Loc, Path | None]] = [
        (("data", "path"), recipe.data.path),
        (("eval", "perplexity", "path"), recipe.eval.perplexity.path if recipe.eval.perplexity else None),
    ]
    files += [(("eval", "local_tasks", i, "data"), t.data) for i, t in enumerate(recipe.eval.local_tasks)]
    for i, message in unknown_task_problems(recipe.eval.tasks):
        problems.add(("eval", "tasks", i), message)
    for loc, path in files:
        if path is not None and not Path(path).is_file():
            problems.add(loc, f"file not found: {path}")
    for i, task in enumerate(recipe.eval.local_tasks):
        if Path(task.data).is_file():
            try:
                check_task_file(task)
            except UserError as exc:
                problems.add(("eval", "local_tasks", i, "data"), str(exc))


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*|\[[0-9]+\])*$")


def _override_loc(key: str) -> Loc:
    """`prune.lr.lora` -> ("prune", "lr", "lora"); `eval.local_tasks[0].data` -> (..., "local_tasks", 0, "data")."""
    return tuple(int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[[0-9]+\]|[^.\[\]]+", key))


def _apply_override(data: dict[str, Any], item: str, locations: Locations) -> None:
    """Set one `--set key.path=value` in the merged recipe. The value is YAML (`0.3`, `null`, `[q_proj, v_proj]`,
    `{r: 16}`), so it reaches validation typed exactly as if it had been written in the file. Its location is
    the override itself, so every later problem with the field names it."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    label = f"--set {item}"
    if not eq or not _OVERRIDE_KEY.match(key):
        raise RecipeError([f"{label}: give it as key.path=value, e.g. --set prune.lr.lora=1e-4"])
    if key == "extends":
        raise RecipeError([f"{label}: extends is read before overrides apply; edit the recipe file instead"])
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise RecipeError([f"{label}: the value is not YAML ({str(exc).splitlines()[0]}); quote it"]) from None
    loc = _override_loc(key)
    container: Any = data
    for depth, part in enumerate(loc[:-1]):
        nxt = loc[depth + 1]
        if isinstance(part, int):
            if not (isinstance(container, list) and part < len(container)):
                raise RecipeError([f"{label}: {_dotted(loc[:depth + 1])}: no such list item in the recipe"])
            container = container[part]
            continue
        if not isinstance(container, dict):
            raise RecipeError([f"{label}: {_dotted(loc[:depth])}: is not a mapping; set it whole instead"])
        if container.get(part) is None and not isinstance(nxt, int):
            container[part] = {}
        container = container.get(part)
    last = loc[-1]
    if isinstance(last, int):
        if not (isinstance(container, list) and last < len(container)):
            raise RecipeError([f"{label}: {key}: no such list item in the recipe"])
    elif not isinstance(container, dict):
        raise RecipeError([f"{label}: {_dotted(loc[:-1])}: is not a mapping; set it whole instead"])
    old = container[last] if isinstance(last, int) or last in container else None
    if isinstance(value, dict) and isinstance(old, dict):  # a mapping merges into the section, as extends: does
        container[last] = _merge(old, value)
    else:
        container[last] = value
        for known in [k for k in locations if k[:len(loc)] == loc]:
            del locations[known]  # lines of the file's old value no longer describe it
    for end in range(1, len(loc)):  # sections the override created have no line in a file either
        locations.setdefault(loc[:end], (label, 0))
    _locate_value(value, loc, label, locations)
    _resolve_paths(data, Path.cwd(), label, locations)


def _locate_value(value: Any, loc: Loc, label: str, locations: Locations) -> None:
    locations[loc] = (label, 0)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        _locate_value(v, loc + (k,), label, locations)


def load_recipe(path: str | Path, *, check_files: bool = True, overrides: Sequence[str] = ()) -> Recipe:
    """Load, validate and check a recipe; raise `RecipeError` listing every problem found.

    `overrides` are `key.path=value` strings (the CLI's `--set`), applied after `extends:` and before
    validation, so they are checked, resolved and hashed like fields written in the file; relative paths
    they give are relative to the working folder, where they were typed.
    """
    path = Path(path)
    locations: Locations = {}
    data = _load_with_extends(path, locations)
    for item in overrides:
        _apply_override(data, item, locations)
    problems = _Problems(locations, _display(path))
    data.setdefault("name", path.stem)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        _schema_problems(exc, problems, data)
        raise RecipeError(problems.lines) from None
    recipe._source_file = path.resolve()
    recipe._locations = locations
    recipe._overrides = tuple(overrides)
    _semantic_problems(recipe, problems, check_files)
    if problems.lines:
        raise RecipeError(problems.lines)
    recipe._warnings = tuple(_warnings(recipe, _Problems(locations, _display(path))))
    return recipe


def dump_resolved(recipe: Recipe) -> str:
    """The fully resolved recipe (extends applied, overrides set, defaults filled, absolute paths) as YAML;
    a comment names the command-line overrides, which the file alone cannot show."""
    header = "".join(f"# --set {item}\n" for item in recipe.overrides)
    return header + yaml.safe_dump(json.loads(json.dumps(recipe.model_dump(mode="json"))), sort_keys=False)

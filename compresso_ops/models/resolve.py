"""Where the recipe's source model is, and what its architecture is: the one answer to "does the model exist".

`model.path` is a local folder or a Hugging Face hub id. A hub id resolves through the local cache only
(huggingface_hub's cache look-ups, no network): compresso-ops never downloads weights. `validate`, `plan`,
preflight, the architecture and the source-evaluation cache all ask `locate_model`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from compresso_ops.errors import UserError
from compresso_ops.models.architecture import PRESETS, ArchSpec, unknown_preset
from compresso_ops.recipe.schema import ModelSection, Recipe

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


# Any one of these lets AutoTokenizer load (fast tokenizer, sentencepiece model, or a config naming one).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelLocation:
    """`folder` holds the model's config.json (the path itself, or the cached hub snapshot), or is None."""

    name: str
    is_path: bool  # the recipe names a local path rather than a hub id
    folder: Path | None

    @property
    def has_weights(self) -> bool:
        return self.folder is not None and any(any(self.folder.glob(p)) for p in WEIGHT_PATTERNS)

    @property
    def has_safetensors(self) -> bool:
        """The weights are safetensors files, which the slice stage and sharded loading read tensor by tensor."""
        return self.folder is not None and any(self.folder.glob("*.safetensors"))

    @property
    def has_tokenizer(self) -> bool:
        return self.folder is not None and any((self.folder / name).is_file() for name in TOKENIZER_FILES)

    def problem(self, need_weights: bool) -> str | None:
        """One line saying what is missing and what to do, or None when the model is there."""
        if self.folder is None:
            if self.is_path:
                return f"model.path: no model folder with a config.json at {self.name}"
            return (f"model.path: '{self.name}' is not in the Hugging Face cache; download it first "
                    f"(hf download {self.name}) or point model.path at a local folder")
        if need_weights and not self.has_weights:
            return (f"model.path: {self.folder} has a config.json but no weights (*.safetensors or *.bin); "
                    "copy the weights there (plan works from the config alone)")
        return None


@contextmanager
def readable_model(name: str | Path, field: str = "model.path") -> Iterator[None]:
    """Loading a model folder whose files are missing, truncated or corrupt (OSError from transformers,
    SafetensorError from a damaged shard) is a user error naming the folder, not an internal one."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{field}: cannot load '{name}': {first}; check or restore the model's files") from None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid hub id
        return None
    return Path(found).parent if isinstance(found, str) else None


def locate_model(model: ModelSection) -> ModelLocation:
    """The local folder of `model.path`: the folder itself, or the cached snapshot of a hub id."""
    name = model.path
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        return ModelLocation(name, True, folder if (folder / "config.json").is_file() else None)
    return ModelLocation(name, False, _cached_snapshot(name, model.revision))


def resolve_arch(recipe: Recipe) -> ArchSpec:
    """The architecture of the recipe's source model: its config.json (local or cached), else a preset."""
    location = locate_model(recipe.model)
    if location.folder is not None:
        try:
            return ArchSpec.from_pretrained_dir(location.folder)
        except UserError as exc:  # the folder's config.json is the recipe's model.path
            raise UserError(f"model.path: {exc}") from None
    if recipe.model.architecture:
        if recipe.model.architecture not in PRESETS:
            raise UserError(f"model.architecture: {unknown_preset(recipe.model.architecture)}")
        return PRESETS[recipe.model.architecture]
    where = "" if location.is_path else \
        f" and is not in the Hugging Face cache (hf download {recipe.model.path} puts it there)"
    raise UserError(f"model.path: '{recipe.model.path}' has no local config.json{where}; point it at a model "
                    f"folder or set model.architecture to one of {', '.join(PRESETS)}")

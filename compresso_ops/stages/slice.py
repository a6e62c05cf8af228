"""The slice stage: the source model with the prune stage's LoRA merged and its masks applied, exported as
a smaller model folder (`models/export.py` builds, writes and checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compresso_ops.errors import StageError
from compresso_ops.method.masks import MASKS_FILE, Masks
from compresso_ops.models.export import _emit, export_pruned
from compresso_ops.models.resolve import readable_model
from compresso_ops.models.slicing import merge_lora
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.prune import TRAINED
from compresso_ops.ui.progress import EventFn


def run_slice(
    recipe: Recipe, prune_dir: str | Path, stage_dir: str | Path, *, on_event: EventFn | None = None
) -> dict[str, Any]:
    """The slice stage: source model (fp32, CPU) + prune/lora merged + prune/masks -> stage_dir/model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    prune_dir, stage_dir = Path(prune_dir), Path(stage_dir)
    if not (prune_dir / MASKS_FILE).is_file():
        raise StageError(f"{prune_dir / MASKS_FILE}: not found; run the prune stage first")
    src = recipe.model
    load_kw = {"revision": src.revision, "trust_remote_code": src.trust_remote_code}
    _emit(on_event, "load", model=src.path)
    trained = prune_dir / TRAINED["full"]  # prune.train: full left the whole trained model (fp32)
    weights = trained if trained.is_dir() else src.path
    with readable_model(src.path):
        source_dtype = AutoConfig.from_pretrained(src.path, **load_kw).dtype
        tokenizer = AutoTokenizer.from_pretrained(src.path, **load_kw)
    with readable_model(weights, field="model.path" if weights == src.path else "prune/model"):
        model: Any = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32,
                                                          **(load_kw if weights == src.path else {}))
    lora_dir = prune_dir / TRAINED["lora"]
    if lora_dir.is_dir():
        from peft import PeftModel

        _emit(on_event, "merge_lora", adapter=str(lora_dir))
        model = merge_lora(PeftModel.from_pretrained(model, lora_dir))
    masks = Masks.load(prune_dir)
    return export_pruned(
        model,
        tokenizer,
        masks,
        recipe.export.mode,
        stage_dir / "model",
        source_info={"path": src.path, "revision": src.revision, "dtype": source_dtype},
        recipe=recipe,
        dtype=recipe.export.dtype,
        max_shard_size=recipe.export.max_shard_size,
        on_event=on_event,
        release_source=True,  # loaded here for this export alone
    )


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The slice stage: `prune/` (masks, LoRA) applied to the source, exported to `slice/model`."""
    manifest = run_slice(recipe, run_dir / "prune", run_dir / "slice", on_event=on_event)
    return f"{manifest['params']['exported']['total']:,} params ({manifest['mode']})"

"""The slice stage: the source model with the prune stage's LoRA merged and its masks applied, exported as
a smaller model folder: streamed tensor by tensor from safetensors (`models/streaming_slice.py`), or loaded
whole when the source is not safetensors (`models/export.py` builds, writes and checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compresso_ops.errors import StageError
from compresso_ops.method.masks import MASKS_FILE, Masks
from compresso_ops.models.export import emit_phase, export_pruned
from compresso_ops.models.resolve import locate_model, readable_model
from compresso_ops.models.slicing import merge_lora
from compresso_ops.models.streaming_slice import stream_export, streamable
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.prune import TRAINED
from compresso_ops.ui.progress import EventFn


def run_slice(
    recipe: Recipe, prune_dir: str | Path, stage_dir: str | Path, *, on_event: EventFn | None = None
) -> dict[str, Any]:
    """The slice stage: source model (fp32, CPU) + prune/lora merged + prune/masks -> stage_dir/model; after
    `prune.train: full` the trained model in prune/model takes the source's place (and there is no LoRA).

    A source in safetensors on disk is streamed (`models/streaming_slice.py`: about one layer in memory);
    otherwise (`.bin` weights, an adapter peft alone can merge) the model is loaded whole and exported by
    `models/export.py`, as `manifest["in_memory_because"]` says. Both write the same folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    prune_dir, stage_dir = Path(prune_dir), Path(stage_dir)
    if not (prune_dir / MASKS_FILE).is_file():
        raise StageError(f"{prune_dir / MASKS_FILE}: not found; run the prune stage first")
    src = recipe.model
    load_kw = {"revision": src.revision, "trust_remote_code": src.trust_remote_code}
    emit_phase(on_event, "load", model=src.path)
    trained = prune_dir / TRAINED["full"]  # prune.train: full left the whole trained model (fp32)
    lora_dir = prune_dir / TRAINED["lora"]
    with readable_model(src.path):
        source_config = AutoConfig.from_pretrained(src.path, **load_kw)
        tokenizer = AutoTokenizer.from_pretrained(src.path, **load_kw)
    masks = Masks.load(prune_dir)
    source_info = {"path": src.path, "revision": src.revision, "dtype": source_config.dtype}
    export_kw = {"recipe": recipe, "dtype": recipe.export.dtype, "max_shard_size": recipe.export.max_shard_size,
                 "on_event": on_event}
    # The streamed source: the trained model when prune.train: full left one (no LoRA then), else the source
    # model's folder with the prune stage's LoRA (when there is one).
    if trained.is_dir():
        folder: Path | None = trained
        stream_lora: Path | None = None
        field = "prune/model"
    else:
        folder = locate_model(src).folder
        stream_lora = lora_dir if lora_dir.is_dir() else None
        field = "model.path"
    why_not = streamable(folder, stream_lora)
    if why_not is None and folder is not None:
        if stream_lora is not None:
            emit_phase(on_event, "merge_lora", adapter=str(stream_lora), streamed=True)
        emit_phase(on_event, "slice", streamed=True)
        if folder == trained:
            with readable_model(trained, field=field):
                weights_config = AutoConfig.from_pretrained(trained)
        else:
            weights_config = source_config
        return stream_export(folder, stream_lora, masks, recipe.export.mode, stage_dir / "model",
                             source_config=weights_config, tokenizer=tokenizer, source_info=source_info,
                             source_field=field, **export_kw)
    weights = trained if trained.is_dir() else src.path
    with readable_model(weights, field=field):
        model: Any = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32,
                                                          **(load_kw if weights == src.path else {}))
    if lora_dir.is_dir():
        from peft import PeftModel

        emit_phase(on_event, "merge_lora", adapter=str(lora_dir))
        model = merge_lora(PeftModel.from_pretrained(model, lora_dir))
    manifest = export_pruned(
        model, tokenizer, masks, recipe.export.mode, stage_dir / "model", source_info=source_info,
        release_source=True,  # loaded here for this export alone
        **export_kw,
    )
    return {**manifest, "streamed": False, "in_memory_because": why_not}


def run(recipe: Recipe, run_dir: Path, on_event: EventFn) -> str:
    """The slice stage: `prune/` (masks, LoRA) applied to the source, exported to `slice/model`."""
    manifest = run_slice(recipe, run_dir / "prune", run_dir / "slice", on_event=on_event)
    how = "streamed layer by layer" if manifest.get("streamed") else f"in memory: {manifest['in_memory_because']}"
    return f"{manifest['params']['exported']['total']:,} params ({manifest['mode']}; {how})"

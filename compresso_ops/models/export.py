"""Export folders: turn a masked model into a smaller checkpoint that users can load, and prove it.

Three formats (docs/method.md §8, recipe `export.mode`):
- native: per-layer head/FFN counts, `CompressoLlamaForCausalLM` (registered with the Auto classes when
  `compresso_ops.models.modeling_compresso` is imported; `modeling_compresso.py` + `auto_map` in the folder for `trust_remote_code`).
- uniform: the same counts in every layer, a stock class. A LLaMA source becomes `MistralForCausalLM` with
  `sliding_window: null` and an explicit `head_dim`, because transformers 5 `LlamaConfig` rejects
  `hidden_size % num_attention_heads != 0` (checked with 5.24.0: StrictDataclassClassValidationError), which a
  pruned hidden size produces; `MistralConfig` accepts it and the Mistral modules are LLaMA's without biases.
  Qwen2 and Qwen3 sources stay `Qwen2ForCausalLM` / `Qwen3ForCausalLM`: `Qwen2Config` and `Qwen3Config` accept
  any hidden size with an explicit `head_dim` (checked with 5.24.0).
- pad: a stock class with every layer zero-padded to the largest layer's counts: exact, smaller savings.

Every export is reloaded from disk and checked: its logits on a fixed batch equal the masked model's and its
parameter count equals `sizes.count_params` (the planner's prediction). The results go into
`compresso_manifest.json`, and a model card (README.md, `models/card.py`) says what the folder is and how to
load it; a failed check raises `StageError` and leaves no folder behind.
"""


from __future__ import annotations

import copy
import gc
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresso_ops.errors import StageError
from compresso_ops.infra import atomic
from compresso_ops.method.hooks import masked
from compresso_ops.method.masks import MASKS_FILE, Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.card import write_card
from compresso_ops.models.sizes import EXPORT_MODES, Alignment, count_params, prunable_sparsity
from compresso_ops.models.slicing import SliceShape, drop_empty_blocks, pad_state_dict, slice_state_dict
from compresso_ops.ui.progress import EventFn

MANIFEST_FILE = "compresso_manifest.json"


NATIVE_MODELING_FILE = "modeling_compresso.py"


CHECK_TOLERANCE = 1e-4  # docs/method.md §7.4: fp32, max abs diff of logits


CHECK_BATCH_SEED = 0


CHECK_BATCH_SHAPE = (2, 32)


NATIVE_AUTO_MAP = {
    "AutoConfig": "modeling_compresso.CompressoLlamaConfig",
    "AutoModelForCausalLM": "modeling_compresso.CompressoLlamaForCausalLM",
}




def emit_phase(on_event: EventFn | None, phase: str, **extra: Any) -> None:
    """Report a phase of the slice stage (load, merge_lora, slice, write, check) to the progress display."""
    if on_event is not None:
        on_event({"stage": "slice", "phase": phase, **extra})


def resolve_dtype(dtype: str, source_dtype: Any) -> str:
    """'auto' means the source checkpoint's dtype (float32 when the source does not say)."""
    if dtype != "auto":
        return dtype
    if isinstance(source_dtype, torch.dtype):
        return str(source_dtype).removeprefix("torch.")
    return str(source_dtype) if source_dtype else "float32"


def check_batch(config: Any) -> torch.Tensor:
    """The fixed token batch every check runs on (random ids from a fixed seed: tokenizer-independent)."""
    gen = torch.Generator().manual_seed(CHECK_BATCH_SEED)
    batch, length = CHECK_BATCH_SHAPE
    length = min(length, int(getattr(config, "max_position_embeddings", length)))
    return torch.randint(0, config.vocab_size, (batch, length), generator=gen)


@torch.no_grad()
def logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    return model(input_ids=batch.to(device), use_cache=False).logits.float().cpu()


def _common_config(src: Any, shape: SliceShape) -> dict[str, Any]:
    """Fields every target config copies from the source; sizes and eps come from the slice."""
    return {
        "vocab_size": src.vocab_size,
        "hidden_size": shape.hidden,
        "num_hidden_layers": len(shape.kv_heads),
        "head_dim": shape.head_dim,
        "hidden_act": src.hidden_act,
        "max_position_embeddings": src.max_position_embeddings,
        "initializer_range": getattr(src, "initializer_range", 0.02),
        "rms_norm_eps": shape.rms_norm_eps,
        "use_cache": getattr(src, "use_cache", True),
        "pad_token_id": src.pad_token_id,
        "bos_token_id": src.bos_token_id,
        "eos_token_id": src.eos_token_id,
        "tie_word_embeddings": bool(getattr(src, "tie_word_embeddings", False)),
        "rope_parameters": copy.deepcopy(getattr(src, "rope_parameters", None)),
        "attention_dropout": getattr(src, "attention_dropout", 0.0),
    }


def native_config(src: Any, shape: SliceShape) -> Any:
    from compresso_ops.models.modeling_compresso import CompressoLlamaConfig

    arch = ArchSpec.from_hf_config(src)
    if arch.model_type in ("qwen2", "qwen3") and getattr(src, "use_sliding_window", False):
        raise StageError(
            f"export.mode native does not support {arch.model_type} sliding-window layers; use uniform or pad"
        )
    return CompressoLlamaConfig(
        **_common_config(src, shape),
        num_attention_heads=list(shape.query_heads),
        num_key_value_heads=list(shape.kv_heads),
        intermediate_size=list(shape.channels),
        qkv_bias=arch.qkv_bias,
        o_bias=arch.o_bias,
        mlp_bias=arch.mlp_bias,
        qk_norm=arch.qk_norm,
        sliding_window=getattr(src, "sliding_window", None) if arch.model_type == "mistral" else None,
        source_model_type=arch.model_type,
    )


def _qwen_window(src: Any, arch: ArchSpec) -> dict[str, Any]:
    """Qwen2/Qwen3 sliding-window settings, copied from the source."""
    return {"use_sliding_window": getattr(src, "use_sliding_window", False),
            "sliding_window": getattr(src, "sliding_window", None),
            "max_window_layers": getattr(src, "max_window_layers", arch.num_layers)}


def stock_config(src: Any, shape: SliceShape) -> Any:
    """A stock config with one head/FFN count for all layers (uniform and pad exports)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    arch = ArchSpec.from_hf_config(src)
    if shape.kv_heads[0] == 0:
        raise StageError(
            "the masks keep no attention head in any layer; a stock class cannot hold that, "
            "use export.mode native"
        )
    fields = {
        **_common_config(src, shape),
        "num_attention_heads": shape.query_heads[0],
        "num_key_value_heads": shape.kv_heads[0],
        "intermediate_size": shape.channels[0],
    }
    if arch.model_type == "qwen2":
        return Qwen2Config(**fields, **_qwen_window(src, arch))
    if arch.model_type == "qwen3":  # Qwen3's attention_bias puts a bias on all four projections
        return Qwen3Config(**fields, attention_bias=arch.o_bias, **_qwen_window(src, arch))
    if arch.model_type == "mistral":
        return MistralConfig(**fields, sliding_window=getattr(src, "sliding_window", None))
    if arch.o_bias or arch.mlp_bias:  # Mistral has no biases: only LlamaConfig holds them
        if shape.hidden % fields["num_attention_heads"]:
            raise StageError(
                f"this LLaMA has projection biases, so only a stock LlamaConfig can hold it, and that "
                f"rejects {shape.hidden} hidden dims over {fields['num_attention_heads']} heads; "
                f"use export.mode native"
            )
        return LlamaConfig(**fields, attention_bias=arch.o_bias, mlp_bias=arch.mlp_bias)
    return MistralConfig(**fields, sliding_window=None)


def build_model(config: Any, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Instantiate the target class around the sliced tensors (no random init, no copy)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    import compresso_ops.models.modeling_compresso  # noqa: F401  (registers the native class for the reload)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def export_pruned(
    model: nn.Module,
    tokenizer: Any,
    masks: Masks,
    mode: str,
    out_dir: str | Path,
    *,
    source_info: dict[str, Any],
    recipe: Any = None,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    on_event: EventFn | None = None,
    release_source: bool = False,
) -> dict[str, Any]:
    """Slice the merged fp32 source `model` to `masks`, write it in `mode` to `out_dir`, reload and check it.

    `source_info`: {"path", "revision", "dtype"} of the source checkpoint, recorded in the manifest ("dtype"
    resolves dtype="auto"). `recipe` (optional) contributes its hash. Returns the manifest.
    `release_source`: the caller hands `model` over; its weights are freed once the sliced model is checked,
    so the source is gone before the export is written and reloaded (for 7B on CPU that is 27 GB less at the
    peak; `benchmarks/slice_memory.py`). The model is unusable afterwards.
    """
    arch = ArchSpec.from_hf_config(model.config)
    check_export_request(mode, arch, masks)
    model.eval()
    batch = check_batch(model.config)
    emit_phase(on_event, "reference")
    with masked(model, masks):
        reference = logits(model, batch)

    emit_phase(on_event, "slice")
    sd, shape = slice_state_dict(model, masks)
    if mode == "native":
        config, sd = native_config(model.config, shape), drop_empty_blocks(sd, shape)
    else:
        if mode == "pad":
            sd, shape = pad_state_dict(sd, shape)
        config = stock_config(model.config, shape)
    exported = build_model(config, sd)
    del sd
    if getattr(model, "generation_config", None) is not None:
        exported.generation_config = copy.deepcopy(model.generation_config)
    sliced_diff = (logits(exported, batch) - reference).abs().max().item()
    if not sliced_diff <= CHECK_TOLERANCE:
        raise StageError(
            f"{out_dir}: the sliced model's logits differ from the masked model's by {sliced_diff:.3g} "
            f"(tolerance {CHECK_TOLERANCE}); nothing was written"
        )
    if release_source:
        _release_weights(model)

    out_dtype = resolve_dtype(dtype, source_info.get("dtype"))
    manifest = export_manifest(mode, type(exported).__name__, out_dtype, arch, masks, shape,
                               source_info=source_info, recipe=recipe, max_shard_size=max_shard_size)
    emit_phase(on_event, "write", out_dir=str(out_dir))
    return save_export(
        exported,
        tokenizer,
        out_dir,
        manifest,
        extra_checks={"sliced_vs_masked_max_abs_diff": sliced_diff},
        reference_logits=reference if out_dtype == "float32" else None,
    )


def check_export_request(mode: str, arch: ArchSpec, masks: Masks) -> None:
    """StageError unless `masks` belong to `arch` and `mode` can hold them (uniform: equal counts)."""
    if mode not in EXPORT_MODES:
        raise StageError(f"export.mode '{mode}' is not one of {', '.join(EXPORT_MODES)}")
    try:
        masks.validate(arch)
    except ValueError as exc:
        raise StageError(f"{MASKS_FILE}: {exc}; the masks do not belong to this model") from None
    kept = masks.kept()
    if mode == "uniform" and (len(set(kept.groups)) > 1 or len(set(kept.channels)) > 1):
        raise StageError(
            f"export.mode uniform needs the same counts in every layer, but the masks keep KV groups "
            f"{list(kept.groups)} and FFN channels {list(kept.channels)}; re-run prune with "
            f"export.mode uniform, or export as native or pad"
        )


def export_manifest(mode: str, model_class: str, out_dtype: str, arch: ArchSpec, masks: Masks,
                    shape: SliceShape, *, source_info: dict[str, Any], recipe: Any,
                    max_shard_size: str) -> dict[str, Any]:
    """The manifest of an export before its checks (the in-memory and the streamed export write the same)."""
    kept = masks.kept()
    return {
        "format": "compresso-ops export",
        "format_version": 1,
        "mode": mode,
        "model_class": model_class,
        "dtype": out_dtype,
        "source": {
            "path": source_info.get("path") and str(source_info["path"]),
            "revision": source_info.get("revision"),
            "model_type": arch.model_type,
            "dtype": resolve_dtype("auto", source_info.get("dtype")),
            "shape": {"layers": arch.num_layers, "hidden_dims": arch.hidden_size,
                      "query_heads_per_layer": arch.num_heads, "kv_heads_per_layer": arch.num_kv_heads,
                      "ffn_channels_per_layer": arch.intermediate_size},
        },
        "recipe_hash": recipe.recipe_hash() if recipe is not None else None,
        "recipe_name": recipe.name if recipe is not None else None,
        "method": recipe.method if recipe is not None else None,
        "kept": {
            "kv_groups_per_layer": list(kept.groups),
            "query_heads_per_layer": [g * arch.group_size for g in kept.groups],
            "ffn_channels_per_layer": list(kept.channels),
            "hidden_dims": kept.hidden,
            "stored_query_heads_per_layer": list(shape.query_heads),
            "stored_ffn_channels_per_layer": list(shape.channels),
            "multiple_of": Alignment.of(arch, recipe.target.multiple_of if recipe is not None else None).as_dict(),
        },
        "params": {
            "source": count_params(arch).as_dict(),
            "exported": count_params(arch, kept, mode).as_dict(),
            "prunable_sparsity": prunable_sparsity(arch, kept),
        },
        "max_shard_size": max_shard_size,
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """An export folder's manifest ({} when the folder has none, e.g. a stock model standing in for one)."""
    path = Path(folder) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _leading(shape: torch.Size) -> tuple[slice, ...]:
    """The leading block of a padded tensor that holds a tensor of `shape`: slicing keeps the kept heads and
    channels first and `pad_state_dict` appends the zeros after them."""
    return tuple(slice(0, n) for n in shape)


def load_exact(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The pruned model an export folder holds, at its exact shapes, for training.

    A `pad` export stores zero heads and FFN channels that are not part of the pruned model. Training the
    padded tensors would make them real: a LoRA delta B·A has no zeros in the padded rows and columns (nor
    does a full-weight gradient), so the padding stops being padding. For a `pad` folder this returns the
    `native` model of the kept counts in the manifest, cut from the leading block of each padded tensor;
    `stored_layout` puts it back. Other folders hold their exact shapes already and load as they are.
    """
    from transformers import AutoModelForCausalLM

    import compresso_ops.models.modeling_compresso  # noqa: F401  (registers the native class for the reload)
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    manifest = read_manifest(folder)
    if manifest.get("mode") != "pad":
        return stored
    arch = ArchSpec.from_hf_config(stored.config)
    kept = manifest["kept"]
    shape = SliceShape(kv_heads=tuple(kept["kv_groups_per_layer"]), channels=tuple(kept["ffn_channels_per_layer"]),
                       hidden=arch.hidden_size, group_size=arch.group_size, head_dim=arch.head_dim,
                       rms_norm_eps=arch.rms_norm_eps)
    config = native_config(stored.config, shape)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    padded = stored.state_dict()
    exact = build_model(config, {k: padded[k][_leading(s)].contiguous() for k, s in shapes.items()})
    exact.generation_config = stored.generation_config
    return exact


@torch.no_grad()
def stored_layout(folder: str | Path, exact: nn.Module) -> nn.Module:
    """`exact` (from `load_exact`, trained since) in the layout of the export folder it came from.

    For a `pad` folder: the folder's stock model with every tensor of `exact` written into its leading block
    and the rest of that tensor set to zero, so the padding is exactly zero whatever training did; tensors
    `exact` does not hold (a block the native model drops because it keeps nothing) stay as the folder has
    them. Any other folder: `exact` itself.
    """
    from transformers import AutoModelForCausalLM

    if read_manifest(folder).get("mode") != "pad":
        return exact
    stored = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    target = stored.state_dict()
    for key, tensor in exact.state_dict().items():
        target[key].zero_()
        target[key][_leading(tensor.shape)] = tensor.to(target[key].dtype)
    stored.config.use_cache = exact.config.use_cache
    return stored.eval()


def _release_weights(model: nn.Module) -> None:
    """Point every parameter and buffer of `model` at an empty tensor, freeing the storage nothing else holds."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    gc.collect()


def confirm_checks(out_dir: str | Path, checks: dict[str, Any], *failures: str) -> None:
    """Set `checks["passed"]`, or raise StageError naming every failed check (nothing is written then): each
    `*_max_abs_diff` within CHECK_TOLERANCE, `param_count` reloaded == expected, and the caller's `failures`."""
    found = [f"{k} = {v:.3g} > {CHECK_TOLERANCE}" for k, v in checks.items()
             if k.endswith("max_abs_diff") and not v <= CHECK_TOLERANCE]
    count = checks["param_count"]
    if count["reloaded"] != count["expected"]:
        found.append(f"the export has {count['reloaded']:,} parameters, the size formulas predict "
                     f"{count['expected']:,}")
    found += failures
    checks["passed"] = not found
    if found:
        raise StageError(f"{out_dir}: export check failed: {'; '.join(found)}; nothing was written")


def save_export(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    manifest: dict[str, Any],
    *,
    extra_checks: dict[str, float] | None = None,
    reference_logits: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Write an already-sliced model as an export folder (atomically), reload it from disk and check it.

    Reused by the fine-tune stage with the slice stage's manifest: the weights are saved in
    `manifest["dtype"]`, sharded at `manifest["max_shard_size"]`. The model is converted to fp32 in place and
    its weights rounded to that dtype, so the in-memory model is exactly what was saved. Checks (they replace
    the manifest's `checks`; `extra_checks` are added): the reloaded model's fp32 logits on the fixed batch
    equal the in-memory model's (and `reference_logits`, the masked model's, when given) within 1e-4, and its
    parameter count equals `manifest["params"]["exported"]["total"]`. Returns the updated manifest.
    """
    from transformers import AutoModelForCausalLM

    import compresso_ops.models.modeling_compresso  # noqa: F401  (registers the native class for the reload)
    out_dir = Path(out_dir)
    dt = getattr(torch, manifest["dtype"])
    model.float().eval()
    if dt != torch.float32:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dt))
    batch = check_batch(model.config)
    expected = logits(model, batch)
    checks: dict[str, Any] = {
        "tolerance": CHECK_TOLERANCE,
        "batch": {"shape": list(batch.shape), "seed": CHECK_BATCH_SEED},
        **(extra_checks or {}),
    }
    expected_params = int(manifest["params"]["exported"]["total"])

    with atomic.atomic_dir(out_dir) as tmp:
        _write_folder(model, tokenizer, tmp, dt, manifest.get("max_shard_size", "5GB"))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        got = logits(reloaded, batch)
        n_params = sum(p.numel() for p in reloaded.parameters())
        del reloaded
        checks["reloaded_vs_in_memory_max_abs_diff"] = (got - expected).abs().max().item()
        if reference_logits is not None:
            checks["reloaded_vs_masked_max_abs_diff"] = (got - reference_logits).abs().max().item()
        checks["param_count"] = {"expected": expected_params, "reloaded": n_params}
        confirm_checks(out_dir, checks)
        manifest = {
            **manifest,
            "checks": checks,
            "weights_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors")),
        }
        atomic.write_json(tmp / MANIFEST_FILE, manifest)
        write_card(tmp, manifest)
    return manifest


def add_native_code(config: Any, folder: Path) -> None:
    """A native export carries its modeling file and `auto_map`, so it loads with `trust_remote_code`."""
    if config.model_type == "compresso_llama":
        config.auto_map = dict(NATIVE_AUTO_MAP)
        shutil.copyfile(Path(__file__).with_name(NATIVE_MODELING_FILE), folder / NATIVE_MODELING_FILE)


def _write_folder(
    model: nn.Module, tokenizer: Any, folder: Path, dt: torch.dtype, max_shard_size: str
) -> None:
    add_native_code(model.config, folder)
    model.to(dt)
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        model.float()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
        drop_load_time_keys(folder / "tokenizer_config.json")


# How this process loaded the tokenizer, which transformers saves back as if it were configuration: a
# folder shipped with "local_files_only": true would refuse the Hub wherever it is loaded.
_LOAD_TIME_KEYS = ("local_files_only", "is_local")


def drop_load_time_keys(config_file: Path) -> None:
    """Remove the load-time flags (local_files_only, ...) a saved tokenizer config carries: not the model's."""
    config = atomic.read_json(config_file)
    if config is not None and any(k in config for k in _LOAD_TIME_KEYS):
        atomic.write_json(config_file, {k: v for k, v in config.items() if k not in _LOAD_TIME_KEYS})

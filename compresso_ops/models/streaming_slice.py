"""The slice stage without the model in memory: read, merge, slice and write one decoder layer at a time.

`models/export.py` slices a loaded fp32 model, which for a 70B source means 280 GB of host RAM. Here the
source is read tensor by tensor from its safetensors files (a sharded index or single files), the prune
stage's LoRA is folded in (W + (B A) * alpha/r, in fp32, as peft's merge computes it), each layer is sliced by
`models/slicing.py` (the same functions the in-memory export uses, so the same bits), and the export is
written shard by shard with the split, tensor names, dtypes, config and index that `save_pretrained` writes.
The peak is one decoder layer (or the embedding matrix) in fp32 and its slice, plus one output shard.

The check streams too: the masked source and the written export each run the fixed check batch with their
weights on the meta device, each piece (embeddings, a decoder layer, the final norm, the LM head) loaded
just before it computes and dropped after. The export's pieces are read back from the written files and
must equal the slice at the export dtype bit for bit; their logits must equal the masked model's within the
tolerance (fp32 exports; otherwise the fp32 slice is run and compared, as the in-memory check does).
"""

from __future__ import annotations

import copy
import ctypes
import json
import re
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compresso_ops.errors import StageError
from compresso_ops.infra import atomic
from compresso_ops.method.hooks import masked
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.card import write_card
from compresso_ops.models.export import (
    CHECK_BATCH_SEED,
    CHECK_TOLERANCE,
    MANIFEST_FILE,
    add_native_code,
    check_batch,
    check_export_request,
    confirm_checks,
    drop_load_time_keys,
    emit_phase,
    export_manifest,
    native_config,
    resolve_dtype,
    stock_config,
)
from compresso_ops.models.resolve import readable_model
from compresso_ops.models.slicing import drop_empty_blocks, pad_state_dict, slice_layer, slice_outer, slice_shape
from compresso_ops.ui.progress import EventFn

INDEX_FILE = "model.safetensors.index.json"
EMBED, HEAD = "model.embed_tokens", "lm_head"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

Tensors = dict[str, torch.Tensor]
Group = int | str  # a decoder layer's index, or the module path of the embeddings, final norm or LM head


def group_of(name: str) -> Group:
    """The piece a tensor belongs to: what is read, merged and sliced together."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else name.rsplit(".", 1)[0]


class SafetensorsSource:
    """A checkpoint's tensors by name, read one at a time. Each read opens and closes its file, so no mapping
    of the whole file stays in the process (its pages would count in its resident memory)."""

    def __init__(self, folder: Path, field: str | None = None) -> None:
        self.folder, self.field = folder, field  # field: the recipe field naming a folder a user supplied
        with self._reading():
            self._index(folder)

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """A missing, truncated or corrupt file of a user's model folder is a user error naming it."""
        if self.field is None:
            yield
            return
        with readable_model(self.folder, field=self.field):
            yield

    def _index(self, folder: Path) -> None:
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(file, "pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))
        if not self.files:
            raise StageError(f"{folder}: no safetensors weights to stream")

    def group(self, group: Group) -> Tensors:
        """Every tensor of `group`, in fp32."""
        names = [n for n in self.files if group_of(n) == group]
        out: Tensors = {}
        with self._reading():
            for file in dict.fromkeys(self.files[n] for n in names):
                with safe_open(file, "pt") as handle:
                    for name in names:
                        if self.files[name] == file:
                            out[name] = handle.get_tensor(name).to(torch.float32)
        return out


@dataclass(frozen=True)
class LoraMerge:
    """A peft LoRA adapter as the merge needs it: (A, B) per base weight name and the scaling."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float

    @staticmethod
    def unsupported(folder: Path) -> str | None:
        """Why this adapter cannot be merged here (the in-memory path merges it with peft), or None."""
        config = json.loads((folder / "adapter_config.json").read_text())
        if not (folder / "adapter_model.safetensors").is_file():
            return "the adapter is not in safetensors"
        if config.get("peft_type") != "LORA":
            return f"peft_type {config.get('peft_type')}"
        for key in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                    "lora_bias", "layers_to_transform"):
            if config.get(key):
                return f"adapter_config.json sets {key}"
        if config.get("bias", "none") != "none":
            return "adapter_config.json trains biases"
        return None

    @classmethod
    def load(cls, folder: Path) -> LoraMerge:
        config = json.loads((folder / "adapter_config.json").read_text())
        r, alpha = config["r"], config["lora_alpha"]
        scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        with safe_open(folder / "adapter_model.safetensors", "pt") as handle:
            for key in list(handle.keys()):
                match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
                if match is None:
                    raise StageError(f"{folder}: unexpected adapter tensor {key}")
                pairs.setdefault(f"{match.group(1)}.weight", {})[match.group(2)] = handle.get_tensor(key).float()
        return cls({name: (ab["A"], ab["B"]) for name, ab in pairs.items()}, scaling)

    def merge_(self, weights: Tensors) -> None:
        """Fold the adapter into the base weights of `weights` that it targets, in place."""
        for name, weight in weights.items():
            if name in self.pairs:
                a, b = self.pairs[name]
                weight += (b @ a) * self.scaling  # peft: base_layer.weight.data += get_delta_weight()


class SlicedSource:
    """The merged source and its slice, one group (a decoder layer, or the embeddings, norm and head) at a
    time; the last group asked for is kept, so consecutive tensors of one group cost one read."""

    def __init__(self, source: SafetensorsSource, lora: LoraMerge | None, arch: ArchSpec, masks: Masks,
                 mode: str, tied: bool) -> None:
        self.source, self.lora, self.arch, self.masks, self.mode, self.tied = source, lora, arch, masks, mode, tied
        self.shape = slice_shape(arch, masks)
        self._cached: tuple[str, Group, Tensors] | None = None

    def merged(self, group: Group) -> Tensors:
        """The source tensors of `group` in fp32 with the LoRA folded in (a tied LM head: the embedding)."""
        return self._cache("merged", group, self._merge)

    def sliced(self, group: Group) -> Tensors:
        """`group` sliced and laid out for the export mode, in fp32."""
        return self._cache("sliced", group, self._slice)

    def _cache(self, kind: str, group: Group, make: Callable[[Group], Tensors]) -> Tensors:
        if self._cached is None or self._cached[:2] != (kind, group):
            self._cached = None  # free the previous group before reading the next
            self._cached = (kind, group, make(group))
        return self._cached[2]

    def _merge(self, group: Group) -> Tensors:
        if group == HEAD and self.tied:
            return {f"{HEAD}.weight": self.source.group(EMBED)[f"{EMBED}.weight"]}
        weights = self.source.group(group)
        if self.lora is not None:
            self.lora.merge_(weights)
        return weights

    def _slice(self, group: Group) -> Tensors:
        weights = self._merge(group)
        try:
            if isinstance(group, str):  # one piece at a time: a tied head is sliced as the embedding is
                sd = slice_outer(weights, self.arch, self.masks, tied=False)
            else:
                sd = slice_layer(weights, group, self.arch, self.masks)
        except (KeyError, StopIteration) as exc:
            raise StageError(f"the source has no tensor {exc.args[0] if exc.args else group!r}; its weights do "
                             "not match its config.json") from None
        del weights
        if self.mode == "native":
            return drop_empty_blocks(sd, self.shape)
        if self.mode == "pad":
            return pad_state_dict(sd, self.shape)[0]
        return sd


def streamable(source_dir: Path | None, lora_dir: Path | None) -> str | None:
    """Why the slice stage cannot stream this source and adapter (it then loads the model), or None."""
    if source_dir is None or not any(source_dir.glob("*.safetensors")):
        return "the source has no safetensors weights"
    if lora_dir is not None and lora_dir.is_dir():
        return LoraMerge.unsupported(lora_dir)
    return None


def stream_export(
    source_dir: Path,
    lora_dir: Path | None,
    masks: Masks,
    mode: str,
    out_dir: Path,
    *,
    source_config: Any,
    tokenizer: Any,
    source_info: dict[str, Any],
    recipe: Any = None,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    on_event: EventFn | None = None,
    source_field: str | None = None,
) -> dict[str, Any]:
    """The export `export_pruned` writes for the merged source, written from `source_dir`'s safetensors
    without loading the model; checked as the module docstring says. Returns the manifest. With `source_field`
(the recipe field that names `source_dir`), a missing or damaged source file is a user error naming it."""
    arch = ArchSpec.from_hf_config(source_config)
    check_export_request(mode, arch, masks)
    with freed_memory_returned():
        return _stream_export(source_dir, lora_dir, masks, mode, out_dir, arch, source_config=source_config,
                              tokenizer=tokenizer, source_info=source_info, recipe=recipe, dtype=dtype,
                              max_shard_size=max_shard_size, on_event=on_event, source_field=source_field)


def _stream_export(source_dir: Path, lora_dir: Path | None, masks: Masks, mode: str, out_dir: Path,
                   arch: ArchSpec, *, source_config: Any, tokenizer: Any, source_info: dict[str, Any],
                   recipe: Any, dtype: str, max_shard_size: str, on_event: EventFn | None,
                   source_field: str | None) -> dict[str, Any]:
    """`stream_export` once the request is checked: plan the export, write it, check it, write the manifest."""
    tied = bool(getattr(source_config, "tie_word_embeddings", False))
    lora = LoraMerge.load(lora_dir) if lora_dir is not None else None
    source = SafetensorsSource(source_dir, source_field)
    if lora is not None and (unknown := sorted(set(lora.pairs) - set(source.files))):
        raise StageError(f"{lora_dir}: the adapter targets {unknown[0]}, which the source does not have; "
                         "the adapter belongs to another model")
    sliced = SlicedSource(source, lora, arch, masks, mode, tied)
    shape = pad_state_dict({}, sliced.shape)[1] if mode == "pad" else sliced.shape
    config = native_config(source_config, shape) if mode == "native" else stock_config(source_config, shape)
    skeleton = meta_model(config)
    out_dtype = resolve_dtype(dtype, source_info.get("dtype"))
    manifest = export_manifest(mode, type(skeleton).__name__, out_dtype, arch, masks, shape,
                               source_info=source_info, recipe=recipe, max_shard_size=max_shard_size)
    dt = getattr(torch, out_dtype)
    emit_phase(on_event, "write", out_dir=str(out_dir), streamed=True)
    with atomic.atomic_dir(out_dir) as tmp:
        _write_weights(skeleton, sliced, dt, tmp, max_shard_size)
        _write_config(skeleton, dt, tmp, generation_config(source_dir))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            drop_load_time_keys(tmp / "tokenizer_config.json")
        emit_phase(on_event, "check", streamed=True)
        checks = _check(tmp, sliced, source_config, masks, dt, int(manifest["params"]["exported"]["total"]))
        confirm_checks(out_dir, checks, *([] if checks["written_equals_slice"] else
                                           ["the written tensors differ from the slice"]))
        manifest = {**manifest, "checks": checks, "streamed": True,
                    "weights_bytes": sum(f.stat().st_size for f in tmp.glob("*.safetensors"))}
        write_card(tmp, manifest)  # the model card save_export writes, from the same manifest
        atomic.write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


@contextmanager
def freed_memory_returned() -> Iterator[None]:
    """Within the block, serve every allocation of 1 MiB or more from its own mapping, so a freed tensor
    leaves the process.

    glibc keeps freed blocks under its mmap threshold in the heap, and the threshold grows (to 32 MiB) as
    large blocks are freed; a stream of 10-50 MB tensors then ratchets the resident set up by hundreds of MB
    of freed memory (on the 1B benchmark model: a 1,057 MiB peak without this, about 700 MiB with it). Afterwards the
    threshold is left at 32 MiB, where glibc's own adjustment ends up in a long-running process. A no-op where
    libc is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model class of `config` with its weights on the meta device (no memory) and its buffers (rotary
    frequencies) real, eval mode."""
    from transformers import AutoModelForCausalLM

    import compresso_ops.models.modeling_compresso  # noqa: F401  (registers the native class)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    if any(b.is_meta for b in model.buffers()):
        raise StageError(f"{type(model).__name__} has buffers the streamed export cannot rebuild")
    return model.eval()


def generation_config(source_dir: Path) -> Any:
    """The source's generation config as `from_pretrained` sets it: generation_config.json, else one derived
    from config.json (so the export carries what the in-memory export copies from the loaded model)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source_dir, _from_auto=True)
    except OSError:
        return GenerationConfig.from_pretrained(source_dir, config_file_name="config.json", _from_auto=True,
                                                _from_model_config=True)


def _planned(skeleton: nn.Module, dt: torch.dtype) -> Tensors:
    """The state dict `save_pretrained` would write, as meta tensors: names in order, shapes, dtype, with
    tied weights removed as transformers removes them."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return {k: v.to(dt) for k, v in remove_tied_weights_from_state_dict(skeleton.state_dict(), skeleton).items()}


def _write_weights(skeleton: nn.Module, sliced: SlicedSource, dt: torch.dtype, folder: Path,
                   max_shard_size: str) -> None:
    """Write the shards, split and named as `save_pretrained` splits them, and the index."""
    from huggingface_hub import split_torch_state_dict_into_shards

    planned = _planned(skeleton, dt)
    split = split_torch_state_dict_into_shards(planned, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        _write_shard(folder / file, {n: planned[n] for n in names}, lambda n: sliced.sliced(group_of(n))[n].to(dt))
    if split.is_sharded:
        index = {"metadata": {"total_parameters": skeleton.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_shard(path: Path, planned: Tensors, produce: Callable[[str], torch.Tensor]) -> None:
    """One safetensors file, written tensor by tensor as `produce` slices them, so no shard is ever held.

    The header comes first and needs every offset, which the planned (meta) tensors give; the layout is the
    one `safetensors.torch.save_file` writes (tensors by name within their dtype, compact JSON with the
    `format: pt` metadata first, padded with spaces to 8 bytes), so the files are byte for byte the same.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(planned):
        t = planned[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if len({t.dtype for t in planned.values()}) > 1:
        raise StageError(f"{path.name}: an export has one dtype, this shard has several")
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        start = fh.tell()
        for name, want in planned.items():  # in the producer's order: one group read per layer
            tensor = produce(name).contiguous()
            if tensor.shape != want.shape or tensor.dtype != want.dtype:
                raise StageError(f"{name}: sliced to {tuple(tensor.shape)} {tensor.dtype}, the export config "
                                 f"expects {tuple(want.shape)} {want.dtype}")
            fh.seek(start + header[name]["data_offsets"][0])
            write_tensor(fh, tensor)


def write_tensor(fh: Any, tensor: torch.Tensor) -> None:
    """The tensor's bytes, little-endian as in memory, without a copy."""
    if tensor.numel():
        fh.write(memoryview(tensor.view(torch.uint8).numpy()))


def _write_config(skeleton: nn.Module, dt: torch.dtype, folder: Path, generation: Any) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them for the exported class."""
    config = skeleton.config
    add_native_code(config, folder)
    config.dtype = str(dt).split(".")[1]
    config.architectures = [type(skeleton).__name__]
    config.save_pretrained(folder)
    generation.save_pretrained(folder)


# --------------------------------------------------------------------------- the streamed check


@contextmanager
def _piecewise(model: nn.Module, load: Callable[[str, list[str]], Tensors]) -> Iterator[None]:
    """Run `model` (weights on meta) with each piece's weights loaded just before it computes and dropped
    after: `load(prefix, names)` returns the piece's tensors by their names relative to `prefix`."""
    pieces = {"model.embed_tokens": model.model.embed_tokens, "model.norm": model.model.norm,
              "lm_head": model.lm_head}
    pieces.update({f"model.layers.{i}": layer for i, layer in enumerate(model.model.layers)})
    handles = []
    for prefix, module in pieces.items():
        names = list(module.state_dict())

        def fill(mod: nn.Module, _args: Any, prefix: str = prefix, names: list[str] = names) -> None:
            mod.load_state_dict(load(prefix, names), strict=True, assign=True)

        def drop(mod: nn.Module, _args: Any, _out: Any) -> None:
            mod.to("meta")

        handles += [module.register_forward_pre_hook(fill), module.register_forward_hook(drop)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _from(tensors: Callable[[Group], Tensors]) -> Callable[[str, list[str]], Tensors]:
    """A piece loader over a group-wise tensor source."""
    def load(prefix: str, names: list[str]) -> Tensors:
        group = tensors(group_of(f"{prefix}.weight"))
        return {n: group[f"{prefix}.{n}"] for n in names}
    return load


@torch.no_grad()
def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, use_cache=False).logits.float()


def _written(folder: Path, sliced: SlicedSource, dt: torch.dtype, tied: bool,
             mismatches: list[str]) -> Callable[[Group], Tensors]:
    """The export's tensors of a group read back from its files in fp32; each must equal the slice at `dt`
    bit for bit (a difference is recorded in `mismatches`)."""
    reader = SafetensorsSource(folder)

    def group(g: Group) -> Tensors:
        if g == HEAD and tied:  # not written: the embedding, checked with its own group
            return {f"{HEAD}.weight": reader.group(EMBED)[f"{EMBED}.weight"]}
        expected = sliced.sliced(g)
        out: Tensors = {}
        for name in [n for n in reader.files if group_of(n) == g]:
            with safe_open(reader.files[name], "pt") as handle:
                stored = handle.get_tensor(name)
            if name not in expected or not torch.equal(stored, expected[name].to(dt)):
                mismatches.append(name)
            out[name] = stored.float()
        mismatches.extend(sorted(set(expected) - set(out)))
        return out
    return group


def _check(folder: Path, sliced: SlicedSource, source_config: Any, masks: Masks, dt: torch.dtype,
           expected_params: int) -> dict[str, Any]:
    """The streamed export check (module docstring): reference logits of the masked source, logits of the
    written export, the bitwise comparison of the written tensors with the slice, and the parameter count."""
    from transformers import AutoConfig

    batch = check_batch(source_config)
    reference_model = meta_model(source_config)
    with _piecewise(reference_model, _from(sliced.merged)), masked(reference_model, masks, device="cpu"):
        reference = _logits(reference_model, batch)
    del reference_model
    exported = meta_model(AutoConfig.from_pretrained(folder))  # the written config, as a reload reads it
    n_params = sum(p.numel() for p in exported.parameters())  # before loading pieces unties tied weights
    mismatches: list[str] = []
    tied = bool(getattr(exported.config, "tie_word_embeddings", False))
    with _piecewise(exported, _from(_written(folder, sliced, dt, tied, mismatches))):
        got = _logits(exported, batch)
    checks: dict[str, Any] = {
        "tolerance": CHECK_TOLERANCE,
        "batch": {"shape": list(batch.shape), "seed": CHECK_BATCH_SEED},
        "written_equals_slice": not mismatches,
        "param_count": {"expected": expected_params, "reloaded": n_params},
    }
    if dt == torch.float32:
        checks["sliced_vs_masked_max_abs_diff"] = (got - reference).abs().max().item()
        checks["reloaded_vs_masked_max_abs_diff"] = checks["sliced_vs_masked_max_abs_diff"]
    else:  # the written weights are rounded: run the fp32 slice against the masked model, as export.py does
        with _piecewise(exported, _from(sliced.sliced)):
            checks["sliced_vs_masked_max_abs_diff"] = (_logits(exported, batch) - reference).abs().max().item()
    return checks

"""Loading under FSDP without any process reading the whole model.

Today's loader (`from_pretrained` in every process, then `fully_shard`) puts a whole copy of the model in
host memory per process: 8 processes x 138 GB for Llama-2-70B in fp16 on one node. Here the model is built
on the meta device and every frozen weight becomes a zero-stride placeholder (one element, the weight's
shape and dtype), so peft adds its adapters exactly as on a loaded model (same RNG draws, same values). The
placeholders then turn into meta weights (`to_meta_`), `fully_shard` shards them without allocating, and
`fill_shards` allocates this rank's rows on its device and reads those rows, and only those, from the
safetensors files (`get_slice`: the bytes of a row range), cast as `from_pretrained` casts them. The frozen
base is the one today's loader gives (tests/test_distributed.py compares them, and FSDP runs prune as one
process does).

A node then holds its processes' shards (about 1/nodes of the model) plus one tensor slice in flight per
process; `stages/plan.py` states that figure as the loading peak.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from compresso_ops.errors import UserError
from compresso_ops.models.adapter import unwrap
from compresso_ops.models.streaming_slice import INDEX_FILE, generation_config, meta_model

SOURCE_ATTR = "compresso_weights_from"  # on a placeholder model: the folder its shards are read from


def can_load_sharded(folder: Path | None) -> bool:
    """A local folder of safetensors weights (a `.bin` source is loaded whole, as before)."""
    return folder is not None and (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def placeholder_model(folder: Path, config: Any, dtype: torch.dtype) -> nn.Module:
    """The model of `config` whose weights take no memory: each a zero-stride view of one element with the
    weight's shape and dtype (tied weights stay one tensor). `fill_shards` reads them after sharding."""
    model = meta_model(config, dtype)
    model.generation_config = generation_config(folder)  # as from_pretrained sets it; saved with the model
    placeholders: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in placeholders:
                flat = torch.zeros((), dtype=param.dtype).expand(param.shape)
                placeholders[id(param)] = nn.Parameter(flat, requires_grad=False)
            module._parameters[name] = placeholders[id(param)]
    setattr(model, SOURCE_ATTR, str(folder))
    return model


def _checkpoint_name(name: str) -> str:
    """The checkpoint key of a parameter of the (possibly peft-wrapped) model."""
    return name.replace(".base_layer.", ".")


def _weight_files(folder: Path) -> dict[str, Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        return {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), file))
    return files


def _placeholder_params(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Parameter]]:
    for module in unwrap(model).modules():
        for name, param in module._parameters.items():
            if param is not None and param.numel() > 1 and not any(param.stride()):  # all strides 0
                yield module, name, param


def to_meta_(model: nn.Module) -> None:
    """Turn the placeholders of a placeholder model (LoRA now added, or every weight made trainable for
    `train: full`) into meta weights, which `fully_shard` shards without allocating (it rejects the
    zero-stride placeholders). Tied weights stay one tensor; each keeps whether it trains."""
    if getattr(unwrap(model), SOURCE_ATTR, None) is None:
        return
    metas: dict[int, nn.Parameter] = {}
    for module, name, param in list(_placeholder_params(model)):
        if id(param) not in metas:
            metas[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                            requires_grad=param.requires_grad)  # train: full trains them
        module._parameters[name] = metas[id(param)]


@torch.no_grad()
def fill_shards(model: nn.Module, device: torch.device, rank: int, world: int) -> None:
    """Allocate this rank's shards of a sharded placeholder model on `device` and read its rows, and only
    its rows, of every source weight (frozen, or trained with `train: full`) from the safetensors files, cast
    as `from_pretrained` casts.

    FSDP2 shards dim 0 as `torch.chunk` does: rank r holds rows [r c, r c + n_r) with c = ceil(rows / world).
    `to_empty` allocates the shards and also blanks what was real (the LoRA weights, the rotary buffers), so
    those are kept aside and put back. A model not built by `placeholder_model` is left alone.
    """
    base = unwrap(model)
    folder = getattr(base, SOURCE_ATTR, None)
    if folder is None:
        return
    real = {name: t.detach().clone() for name, t in [*base.named_parameters(), *base.named_buffers()]
            if not t.is_meta}
    base.to_empty(device=device)
    tensors = {**dict(base.named_parameters()), **dict(base.named_buffers())}
    for name, value in real.items():
        tensors[name].copy_(value)
    files = _weight_files(Path(folder))
    for name, param in base.named_parameters():
        if name in real:
            continue
        key = _checkpoint_name(name)
        if key not in files:
            raise UserError(f"model.path: {folder} has no tensor {key}; the weights do not match config.json")
        with safe_open(files[key], "pt") as handle:
            if not hasattr(param, "to_local"):  # not sharded: the whole tensor
                param.copy_(handle.get_tensor(key).to(param.dtype))
                continue
            local = param.to_local()
            start = min(rank * -(-param.shape[0] // world), param.shape[0])
            local.copy_(handle.get_slice(key)[start:start + local.shape[0]].to(local.dtype))
    delattr(base, SOURCE_ATTR)

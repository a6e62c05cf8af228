"""The streamed slice stage writes what the in-memory export writes, byte for byte, and checks it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from compresso_ops.errors import StageError
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import MANIFEST_FILE, check_batch, export_pruned, logits
from compresso_ops.models.slicing import merge_lora
from compresso_ops.models.streaming_slice import stream_export, streamable
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.slice import run_slice
from tests.test_slice import random_masks, uniform_masks, zeroed_reference
from tests.tiny import byte_tokenizer, tiny_model

SOURCE_KW = {"llama": {"gqa": True, "tied": False}, "qwen2": {"gqa": True, "tied": True},
             "mistral": {"gqa": False}, "qwen3": {"gqa": True, "tied": False}}


def _source(folder: Path, model_type: str, shard: str | None = None) -> Path:
    """A tiny source in safetensors (sharded when `shard` is given) with the byte tokenizer."""
    model = tiny_model(model_type, layers=3, **SOURCE_KW[model_type])
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    byte_tokenizer().save_pretrained(folder)
    return folder


def _lora(source: Path, folder: Path, targets: list[str]) -> Path:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(folder)
    return folder


def _in_memory(source: Path, lora: Path | None, masks: Masks, mode: str, out: Path, **kw) -> dict:
    """Today's path, as the slice stage ran it before streaming: load fp32, merge with peft, export."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if lora is not None:
        model = merge_lora(PeftModel.from_pretrained(model, lora))
    return export_pruned(model, byte_tokenizer(), masks, mode, out,
                         source_info={"path": str(source), "dtype": "float32"}, release_source=True, **kw)


def _streamed(source: Path, lora: Path | None, masks: Masks, mode: str, out: Path, **kw) -> dict:
    return stream_export(source, lora, masks, mode, out, source_config=AutoConfig.from_pretrained(source),
                         tokenizer=byte_tokenizer(), source_info={"path": str(source), "dtype": "float32"}, **kw)


# The checks both paths record (the streamed check has its own numbers: it compares the written tensors
# with the slice bit for bit and runs the masked model piece by piece).
SHARED_CHECKS = ("tolerance", "batch", "param_count", "passed")


def _same_manifest(a: dict, b: dict) -> None:
    """The manifests agree on every field but the check numbers (and the streamed flag)."""
    def comparable(m: dict) -> dict:
        return {**{k: v for k, v in m.items() if k not in ("checks", "streamed")},
                "checks": {k: m["checks"][k] for k in SHARED_CHECKS}}
    assert comparable(a) == comparable(b)


def _assert_same_folder(a: Path, b: Path) -> None:
    """The same files with the same contents: weights, configs, tokenizer and model card (README.md) byte for
    byte, JSON by value, the manifest except its check numbers."""
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert "README.md" in files and MANIFEST_FILE in files
    for name in files:
        if name == MANIFEST_FILE:
            _same_manifest(json.loads((a / name).read_text()), json.loads((b / name).read_text()))
        elif name.endswith(".json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("mode", ["native", "uniform", "pad"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_streamed_export_is_bit_identical_to_the_in_memory_one(tmp_path, model_type, mode):
    source = _source(tmp_path / "src", model_type)
    lora = _lora(source, tmp_path / "lora", ["q_proj", "v_proj", "down_proj"])
    arch = ArchSpec.from_hf_config(AutoConfig.from_pretrained(source))
    masks = uniform_masks(arch, 1, groups=1, channels=30, hidden_keep=24) if mode == "uniform" else \
        random_masks(arch, 1)
    expected = _in_memory(source, lora, masks, mode, tmp_path / "a")
    got = _streamed(source, lora, masks, mode, tmp_path / "b")
    _assert_same_folder(tmp_path / "a", tmp_path / "b")
    assert got["checks"]["passed"] and got["checks"]["written_equals_slice"]
    assert got["checks"]["reloaded_vs_masked_max_abs_diff"] <= 1e-4
    assert {k: v for k, v in got.items() if k not in ("checks", "streamed", "weights_bytes")} == \
        {k: v for k, v in expected.items() if k not in ("checks", "weights_bytes")}
    assert got["weights_bytes"] == expected["weights_bytes"]


def test_sharded_source_to_sharded_bfloat16_export(tmp_path):
    """A source split over several files (read through its index) to an export split over several files:
    the same split, index and bytes as save_pretrained, with the bf16 check on the fp32 slice."""
    source = _source(tmp_path / "src", "llama", shard="20KB")
    assert (source / "model.safetensors.index.json").is_file()
    arch = ArchSpec.from_hf_config(AutoConfig.from_pretrained(source))
    masks = random_masks(arch, 2)
    kw = {"dtype": "bfloat16", "max_shard_size": "10KB"}
    _in_memory(source, None, masks, "native", tmp_path / "a", **kw)
    got = _streamed(source, None, masks, "native", tmp_path / "b", **kw)
    assert len(list((tmp_path / "b").glob("model-*.safetensors"))) > 2
    _assert_same_folder(tmp_path / "a", tmp_path / "b")
    assert got["checks"]["passed"] and "reloaded_vs_masked_max_abs_diff" not in got["checks"]
    assert got["checks"]["sliced_vs_masked_max_abs_diff"] <= 1e-4


def test_a_corrupt_slice_fails_the_check_and_writes_nothing(tmp_path, monkeypatch):
    """The check reads the written export back: a tensor written wrong is caught and no folder is left."""
    import compresso_ops.models.streaming_slice as streaming

    source = _source(tmp_path / "src", "llama")
    masks = random_masks(ArchSpec.from_hf_config(AutoConfig.from_pretrained(source)), 3)
    real = streaming.write_tensor
    written = []

    def corrupt(fh, tensor):
        written.append(tensor)
        real(fh, tensor + 1.0 if len(written) == 5 else tensor)

    monkeypatch.setattr(streaming, "write_tensor", corrupt)
    with pytest.raises(StageError, match="export check failed: .*written tensors differ"):
        _streamed(source, None, masks, "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slice_stage_streams_safetensors_and_loads_bin(tmp_path):
    """The stage chooses: a safetensors source is streamed, a .bin source is loaded whole; the same folder."""
    source = _source(tmp_path / "src", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch, 4)
    bin_source = tmp_path / "bin"
    torch.save(model.state_dict(), bin_source.mkdir() or bin_source / "pytorch_model.bin")
    model.config.save_pretrained(bin_source)
    byte_tokenizer().save_pretrained(bin_source)
    assert streamable(bin_source, tmp_path / "none") == "the source has no safetensors weights"
    notes = {}
    for name, folder in (("st", source), ("bin", bin_source)):
        run = tmp_path / f"run-{name}"
        masks.save(run / "prune", arch)
        recipe = Recipe(name="t", model={"path": str(folder)}, target={"sparsity": 0.3}, export={"mode": "pad"})
        notes[name] = run_slice(recipe, run / "prune", run / "slice")
    assert notes["st"]["streamed"] and not notes["bin"]["streamed"]
    assert notes["bin"]["in_memory_because"] == "the source has no safetensors weights"
    a, b = tmp_path / "run-st" / "slice" / "model", tmp_path / "run-bin" / "slice" / "model"
    for f in ("model.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    small = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    batch = check_batch(model.config)
    assert (logits(small, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= 1e-4


def test_a_source_missing_a_tensor_is_a_stage_error(tmp_path):
    from safetensors.torch import load_file, save_file

    source = _source(tmp_path / "src", "llama")
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    masks = random_masks(ArchSpec.from_hf_config(AutoConfig.from_pretrained(source)), 5)
    with pytest.raises(StageError, match="no tensor 'model.layers.1.mlp.up_proj.weight'; its weights do not match"):
        _streamed(source, None, masks, "native", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slice_stage_streams_the_trained_model_of_train_full(tmp_path):
    """After prune.train: full the stage streams prune/model (the trained weights, no LoRA) instead of the
    source, and writes the folder the in-memory export of that model writes."""
    source = _source(tmp_path / "src", "llama")
    run = tmp_path / "run"
    trained = tiny_model("llama", seed=1, layers=3, **SOURCE_KW["llama"])  # other weights than the source's
    trained.save_pretrained(run / "prune" / "model")
    arch = ArchSpec.from_hf_config(trained.config)
    masks = random_masks(arch, 6)
    masks.save(run / "prune", arch)
    recipe = Recipe(name="t", model={"path": str(source)}, target={"sparsity": 0.3})
    got = run_slice(recipe, run / "prune", run / "slice")
    assert got["streamed"] and got["checks"]["passed"]
    model = AutoModelForCausalLM.from_pretrained(run / "prune" / "model", dtype=torch.float32)
    export_pruned(model, byte_tokenizer(), masks, "native", tmp_path / "a", recipe=recipe, release_source=True,
                  source_info={"path": str(source), "revision": None,
                               "dtype": AutoConfig.from_pretrained(source).dtype})
    _assert_same_folder(tmp_path / "a", run / "slice" / "model")

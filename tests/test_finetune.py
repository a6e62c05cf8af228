"""The fine-tune stage on a real slice export: what it writes is still the pruned model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import MANIFEST_FILE, check_batch, export_pruned, load_exact, logits
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.finetune import run_finetune
from tests.test_slice import VARIANTS, random_masks
from tests.tiny import byte_tokenizer, tiny_model


def _reload(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _text(folder: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "small", "red", "sun"]
    path = folder / "train.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(16)))
    return path


def _recipe(folder: Path) -> Recipe:
    return Recipe(name="t", model={"path": str(folder / "unused")}, target={"sparsity": 0.4}, prompt={"text": "none"},
                  data={"path": str(_text(folder)), "format": "text", "max_seq_length": 32},
                  finetune={"unit": "steps", "duration": 3, "lr": 1e-2, "micro_batch_size": 2,
                            "gradient_accumulation": 1, "lora": {"r": 4, "target_modules": ALL_LINEAR}})


def _padding(sd: dict[str, torch.Tensor], layer: int, groups: int, channels: int, q_rows: int, kv_rows: int
             ) -> dict[str, torch.Tensor]:
    """Every padded region of one layer: rows / columns beyond the kept heads and channels."""
    p = f"model.layers.{layer}."
    regions = {f"{p}self_attn.q_proj.weight": sd[f"{p}self_attn.q_proj.weight"][groups * q_rows:],
               f"{p}self_attn.o_proj.weight": sd[f"{p}self_attn.o_proj.weight"][:, groups * q_rows:],
               f"{p}mlp.gate_proj.weight": sd[f"{p}mlp.gate_proj.weight"][channels:],
               f"{p}mlp.up_proj.weight": sd[f"{p}mlp.up_proj.weight"][channels:],
               f"{p}mlp.down_proj.weight": sd[f"{p}mlp.down_proj.weight"][:, channels:]}
    for name in ("k_proj", "v_proj"):
        regions[f"{p}self_attn.{name}.weight"] = sd[f"{p}self_attn.{name}.weight"][groups * kv_rows:]
    for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        if f"{p}self_attn.{name}.bias" in sd:
            regions[f"{p}self_attn.{name}.bias"] = sd[f"{p}self_attn.{name}.bias"][groups * rows:]
    return regions


@pytest.mark.parametrize("variant", ["llama-gqa-untied", "qwen2-bias-tied"])
def test_finetuning_a_pad_export_keeps_its_padding_exactly_zero(tmp_path, variant):
    """LoRA on every projection: trained on the padded tensors, B·A would fill the padding with non-zeros
    (the pruned model would silently grow back). The layer that keeps no head and the one that keeps no FFN
    channel are padding through and through."""
    model_type, kw = VARIANTS[variant]
    model = tiny_model(model_type, layers=3, **kw)
    arch = ArchSpec.from_hf_config(model.config)
    masks = random_masks(arch, no_heads_layer=0, no_ffn_layer=-1)
    export_pruned(model, byte_tokenizer(), masks, "pad", tmp_path / "sliced",
                  source_info={"path": "tiny", "revision": None, "dtype": "float32"})
    exact, stored = load_exact(tmp_path / "sliced", torch.float32), _reload(tmp_path / "sliced")
    assert type(exact).__name__ == "CompressoLlamaForCausalLM"  # trained without the padding ...
    batch = check_batch(model.config)
    assert (logits(exact, batch) - logits(stored, batch)).abs().max() <= 1e-4  # ... and the same model
    result = run_finetune(_recipe(tmp_path), tmp_path / "sliced", tmp_path / "finetune")

    out = tmp_path / "finetune" / "model"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert result["completed"] and manifest["mode"] == "pad" and manifest["checks"]["passed"]
    before, after = load_file(str(tmp_path / "sliced" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    kept = masks.kept()
    q_rows, kv_rows = arch.group_size * arch.head_dim, arch.head_dim
    assert min(kept.channels) < max(kept.channels) and min(kept.groups) < max(kept.groups)  # there is padding
    for layer, (groups, channels) in enumerate(zip(kept.groups, kept.channels, strict=True)):
        for key, region in _padding(after, layer, groups, channels, q_rows, kv_rows).items():
            assert region.numel() == 0 or torch.count_nonzero(region) == 0, key
        if channels:  # the kept block was trained
            p = f"model.layers.{layer}.mlp.down_proj.weight"
            assert not torch.equal(after[p][:, :channels], before[p][:, :channels])


def test_the_manifest_names_the_recovery(tmp_path):
    """Mode, trained parameters (LoRA on the exact pruned shapes: r x (in + out) per adapted projection) and
    the loss-carrying tokens of every step, as the events logged them."""
    model = tiny_model("llama", layers=3)
    masks = random_masks(ArchSpec.from_hf_config(model.config), no_heads_layer=None)
    export_pruned(model, byte_tokenizer(), masks, "pad", tmp_path / "sliced",
                  source_info={"path": "tiny", "revision": None, "dtype": "float32"})
    run_finetune(_recipe(tmp_path), tmp_path / "sliced", tmp_path / "finetune")
    recovery = json.loads((tmp_path / "finetune" / "model" / MANIFEST_FILE).read_text())["finetune"]["recovery"]
    exact = load_exact(tmp_path / "sliced", torch.float32)
    adapted = [m for name, m in exact.named_modules() if name.rsplit(".", 1)[-1] in ALL_LINEAR]
    events = [json.loads(line) for line in (tmp_path / "finetune" / "events.jsonl").read_text().splitlines()]
    assert recovery == {"mode": "lora", "target_modules": ALL_LINEAR, "r": 4, "distill": None,
                        "trained_params": sum(4 * (m.in_features + m.out_features) for m in adapted),
                        "tokens": sum(e["tokens"] for e in events)}


def test_lora_on_projections_pruned_away_says_so_and_names_the_kept_ones():
    """Pruning every head of every layer (a tiny model, or attention_blocks at a high target) leaves no q_proj
    or v_proj: the fine-tune's default LoRA targets then match nothing, which the error explains."""
    from compresso_ops.errors import UserError
    from compresso_ops.recipe.schema import LoraSection
    from compresso_ops.training.setup import add_lora

    model = tiny_model()
    for layer in model.model.layers:
        layer.self_attn = torch.nn.Module()
    with pytest.raises(UserError, match=r"^finetune\.lora\.target_modules: q_proj, v_proj matches no module of the "
                                        r"model \(pruning removed it from every layer\); use gate_proj, up_proj or "
                                        r"down_proj$"):
        add_lora(model, LoraSection(), "finetune.lora.target_modules")

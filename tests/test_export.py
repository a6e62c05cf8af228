"""Export folders: written atomically, reloaded from disk by transformers, exact and of predicted size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from compresso_ops.errors import StageError
from compresso_ops.method.masks import Masks
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import MANIFEST_FILE, check_batch, export_pruned, logits, save_export
from compresso_ops.models.sizes import count_params
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.slice import run_slice
from tests.test_slice import STOCK_CLASS, VARIANTS, random_masks, uniform_masks, zeroed_reference
from tests.tiny import STORIES260K, byte_tokenizer, save_tiny, tiny_model

TOL = 1e-4
SOURCE = {"path": "tiny", "revision": None, "dtype": "float32"}


def _masks_for(mode: str, arch: ArchSpec, seed: int = 0) -> Masks:
    return uniform_masks(arch, seed) if mode == "uniform" else random_masks(arch, seed)


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _reload(folder: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", ["native", "uniform", "pad"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_reloads_exact_with_predicted_size(tmp_path, variant, mode):
    model_type, kw = VARIANTS[variant]
    model = tiny_model(model_type, layers=3, **kw)
    arch = ArchSpec.from_hf_config(model.config)
    masks = _masks_for(mode, arch)
    out = tmp_path / "model"
    manifest = export_pruned(model, byte_tokenizer(), masks, mode, out, source_info=SOURCE)

    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert manifest["checks"]["passed"] and manifest["mode"] == mode
    assert manifest["kept"]["kv_groups_per_layer"] == list(masks.kept().groups)
    expected = count_params(arch, masks.kept(), mode).total
    assert manifest["params"]["exported"]["total"] == expected
    reloaded = _reload(out)
    assert sum(p.numel() for p in reloaded.parameters()) == expected
    batch = check_batch(model.config)
    assert (logits(reloaded, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL
    expected_class = "CompressoLlamaForCausalLM" if mode == "native" else STOCK_CLASS[model_type]
    assert type(reloaded).__name__ == expected_class
    assert (out / "modeling_compresso.py").is_file() == (mode == "native")
    assert AutoTokenizer.from_pretrained(out).encode("hi") == byte_tokenizer().encode("hi")
    assert not list(tmp_path.glob(".model.*"))  # no temporary folder left behind


@pytest.mark.parametrize("mode", ["native", "pad"])
def test_generate_with_cache_equals_uncached_after_reload(tmp_path, mode):
    model = tiny_model("llama", layers=3)
    masks = random_masks(ArchSpec.from_hf_config(model.config), no_heads_layer=0)
    export_pruned(model, byte_tokenizer(), masks, mode, tmp_path / "m", source_info=SOURCE)
    small = _reload(tmp_path / "m")
    prompt = torch.randint(0, 256, (2, 4), generator=torch.Generator().manual_seed(1))
    kw = {"max_new_tokens": 10, "do_sample": False, "eos_token_id": None, "pad_token_id": 258}
    assert torch.equal(
        small.generate(prompt, use_cache=True, **kw), small.generate(prompt, use_cache=False, **kw)
    )


def test_checkpoint_shrinks_in_proportion(tmp_path):
    model = tiny_model("llama", layers=2, hidden=64, heads=4, ffn=256)
    arch = ArchSpec.from_hf_config(model.config)
    model.save_pretrained(tmp_path / "source")
    masks = random_masks(arch, keep=0.5, no_heads_layer=None, no_ffn_layer=None)
    manifest = export_pruned(model, None, masks, "native", tmp_path / "small", source_info=SOURCE)
    src_bytes, small_bytes = _weights_bytes(tmp_path / "source"), _weights_bytes(tmp_path / "small")
    ratio = manifest["params"]["exported"]["total"] / manifest["params"]["source"]["total"]
    assert ratio < 0.7
    assert small_bytes / src_bytes == pytest.approx(ratio, rel=0.02)
    assert manifest["weights_bytes"] == small_bytes


def test_bfloat16_export_with_shards(tmp_path):
    model = tiny_model("llama", layers=2, hidden=64, heads=4, ffn=256)
    masks = random_masks(ArchSpec.from_hf_config(model.config))
    out = tmp_path / "m"
    manifest = export_pruned(
        model,
        None,
        masks,
        "native",
        out,
        source_info={**SOURCE, "dtype": torch.bfloat16},
        max_shard_size="40KB",
    )
    assert manifest["dtype"] == "bfloat16" and manifest["source"]["dtype"] == "bfloat16"
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with safe_open(str(shards[0]), "pt") as fh:
        names = fh.keys()
        assert {fh.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    checks = manifest["checks"]
    assert checks["passed"] and checks["sliced_vs_masked_max_abs_diff"] <= TOL
    assert checks["reloaded_vs_in_memory_max_abs_diff"] <= TOL
    assert "reloaded_vs_masked_max_abs_diff" not in checks  # bf16 rounding is not a slicing error


def test_releasing_the_source_frees_it_and_the_export_still_checks_out(tmp_path):
    """The slice stage hands its source over, so the source is not in memory while the export is written and
    reloaded; the export is the same as with the source kept."""
    kept_model, released_model = tiny_model("llama", layers=3, gqa=True), tiny_model("llama", layers=3, gqa=True)
    masks = random_masks(ArchSpec.from_hf_config(kept_model.config))
    kept = export_pruned(kept_model, None, masks, "native", tmp_path / "kept", source_info=SOURCE)
    released = export_pruned(released_model, None, masks, "native", tmp_path / "released", source_info=SOURCE,
                             release_source=True)
    assert all(t.numel() == 0 for t in [*released_model.parameters(), *released_model.buffers()])
    assert released["checks"]["passed"]
    assert released["checks"]["reloaded_vs_masked_max_abs_diff"] <= TOL
    assert released["params"] == kept["params"] and released["weights_bytes"] == kept["weights_bytes"]


def test_uniform_mode_rejects_non_uniform_masks(tmp_path):
    model = tiny_model("llama", layers=3)
    masks = random_masks(ArchSpec.from_hf_config(model.config))
    with pytest.raises(StageError, match="uniform needs the same counts in every layer"):
        export_pruned(model, None, masks, "uniform", tmp_path / "m", source_info=SOURCE)
    assert not (tmp_path / "m").exists()


def test_masks_of_another_model_are_a_stage_error(tmp_path):
    model = tiny_model("llama", layers=3)
    masks = random_masks(ArchSpec.from_hf_config(tiny_model("llama", layers=2).config))
    with pytest.raises(StageError, match="do not belong to this model"):
        export_pruned(model, None, masks, "native", tmp_path / "m", source_info=SOURCE)


def test_save_export_resaves_a_finetuned_export(tmp_path):
    model = tiny_model("qwen2", layers=3, tied=True)
    masks = random_masks(ArchSpec.from_hf_config(model.config))
    manifest = export_pruned(model, byte_tokenizer(), masks, "native", tmp_path / "slice", source_info=SOURCE)
    tuned = _reload(tmp_path / "slice")
    with torch.no_grad():  # stands in for a merged fine-tune
        tuned.model.layers[1].mlp.up_proj.weight.add_(0.05)
    again = save_export(
        tuned, byte_tokenizer(), tmp_path / "finetune", manifest
    )  # as the fine-tune stage does
    assert again["checks"]["passed"] and again["params"] == manifest["params"]
    assert (
        "reloaded_vs_masked_max_abs_diff" not in again["checks"]
    )  # the tuned model is no longer the masked one
    batch = check_batch(tuned.config)
    assert (logits(_reload(tmp_path / "finetune"), batch) - logits(tuned, batch)).abs().max() <= TOL
    assert (logits(_reload(tmp_path / "slice"), batch) - logits(tuned, batch)).abs().max() > 1e-3


def _run_python(code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_native_export_loads_with_trust_remote_code_without_compresso_ops(tmp_path):
    model = tiny_model("llama", layers=3)
    masks = random_masks(ArchSpec.from_hf_config(model.config))
    export_pruned(model, None, masks, "native", tmp_path / "m", source_info=SOURCE)
    batch = check_batch(model.config)
    code = f"""
        import json, sys
        class Block:  # this interpreter cannot import compresso_ops, as on a machine without it
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "compresso_ops":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Block())
        try:
            import compresso_ops
            sys.exit("compresso_ops is importable")
        except ModuleNotFoundError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True,
                                                 dtype=torch.float32)
        with torch.no_grad():
            out = m(torch.tensor({batch.tolist()}), use_cache=False).logits
        print(json.dumps({{"module": type(m).__module__, "logits": out.tolist()}}))
    """
    result = _run_python(code, tmp_path)
    assert not result["module"].startswith("compresso_ops")
    assert (torch.tensor(result["logits"]) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL


def test_importing_the_modeling_module_registers_native_class_with_auto(tmp_path):
    model = tiny_model("llama", layers=2)
    export_pruned(
        model,
        None,
        random_masks(ArchSpec.from_hf_config(model.config)),
        "native",
        tmp_path / "m",
        source_info=SOURCE,
    )
    code = f"""
        import json, sys
        import compresso_ops.cli
        assert "transformers" not in sys.modules and "torch" not in sys.modules  # the CLI starts light
        import compresso_ops.models.modeling_compresso
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r})
        print(json.dumps({{"module": type(m).__module__}}))
    """
    assert _run_python(code, tmp_path)["module"] == "compresso_ops.models.modeling_compresso"


def test_run_slice_merges_lora_and_exports(tmp_path):
    from peft import LoraConfig, get_peft_model

    src = save_tiny(tmp_path / "src", "llama", layers=3)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prune_dir = tmp_path / "run" / "prune"
    peft_model.save_pretrained(prune_dir / "lora")
    merged = peft_model.merge_and_unload()
    arch = ArchSpec.from_hf_config(merged.config)
    masks = random_masks(arch)
    masks.save(prune_dir, arch)
    recipe = Recipe(name="t", model={"path": str(src)}, target={"sparsity": 0.3}, export={"mode": "native"})
    events = []
    manifest = run_slice(recipe, prune_dir, tmp_path / "run" / "slice", on_event=events.append)
    assert manifest["checks"]["passed"] and manifest["recipe_hash"] == recipe.recipe_hash()
    assert manifest["source"] == {
        "path": str(src),
        "revision": None,
        "model_type": "llama",
        "dtype": "float32",
        "shape": {"layers": 3, "hidden_dims": arch.hidden_size, "query_heads_per_layer": arch.num_heads,
                  "kv_heads_per_layer": arch.num_kv_heads, "ffn_channels_per_layer": arch.intermediate_size},
    }
    assert {e["phase"] for e in events} >= {"load", "merge_lora", "slice", "write"}
    batch = check_batch(merged.config)
    small = _reload(tmp_path / "run" / "slice" / "model")
    assert (logits(small, batch) - logits(zeroed_reference(merged, masks), batch)).abs().max() <= TOL
    _check_card(tmp_path / "run" / "slice" / "model", manifest)


def _check_card(folder: Path, manifest: dict) -> None:
    """The folder tells whoever receives it what it is and how to load it, and carries no load-time flags."""
    import yaml

    card = (folder / "README.md").read_text()
    _, header, body = card.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert set(meta["tags"]) >= {"compresso-ops", "pruned", "structured-pruning"}
    assert "base_model" not in meta  # a local source folder is not a Hub id
    assert f"{manifest['params']['exported']['total']:,}" in body
    assert f"{manifest['params']['source']['total']:,}" in body
    assert manifest["recipe_hash"] in body
    if manifest["mode"] == "native":
        assert "import compresso_ops.models.modeling_compresso" in body and "trust_remote_code=True" in body
    else:
        assert "trust_remote_code" not in body
    assert "Not evaluated yet" in body
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tok_config and "is_local" not in tok_config


def test_run_slice_without_masks_is_a_stage_error(tmp_path):
    recipe = Recipe(name="t", model={"path": str(tmp_path)}, target={"sparsity": 0.3})
    with pytest.raises(StageError, match="run the prune stage first"):
        run_slice(recipe, tmp_path / "prune", tmp_path / "slice")


@pytest.mark.parametrize("mode", ["native", "uniform", "pad"])
def test_stories260k_exports_at_30_percent(tmp_path, shared, mode):
    model = AutoModelForCausalLM.from_pretrained(STORIES260K, dtype=torch.float32).eval()
    arch = ArchSpec.from_hf_config(model.config)
    if mode == "uniform":  # 3 of 4 groups, 120 of 172 channels, 60 of 64 dims in every layer
        masks = uniform_masks(arch, seed=1, groups=3, channels=120, hidden_keep=60)
    else:
        masks = random_masks(arch, seed=1, keep=0.75, hidden=False, no_heads_layer=2, no_ffn_layer=None)
        masks.hidden[torch.randperm(arch.hidden_size, generator=torch.Generator().manual_seed(0))[:4]] = 0
    manifest = export_pruned(
        model,
        AutoTokenizer.from_pretrained(STORIES260K),
        masks,
        mode,
        tmp_path / "m",
        source_info={"path": str(STORIES260K), "dtype": "float32"},
    )
    assert 0.25 < manifest["params"]["prunable_sparsity"] < 0.35
    assert manifest["checks"]["passed"]
    small = _reload(tmp_path / "m")
    batch = check_batch(model.config)
    assert (logits(small, batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL
    assert sum(p.numel() for p in small.parameters()) == count_params(arch, masks.kept(), mode).total


@pytest.mark.parametrize("mode", ["native", "uniform", "pad"])
def test_aligned_masks_export_and_reload_exact_in_every_mode(tmp_path, mode):
    from compresso_ops.method.masks import select_final_masks_from_scores

    model = tiny_model("llama", layers=3, hidden=64, ffn=172)
    arch = ArchSpec.from_hf_config(model.config)
    gen = torch.Generator().manual_seed(3)
    scores = {"heads": torch.rand(3, arch.num_kv_heads, generator=gen), "ffn": torch.rand(3, 172, generator=gen),
              "hidden": torch.rand(64, generator=gen)}
    masks = select_final_masks_from_scores(scores, arch, 0.4, mode, ("heads", "ffn", "hidden"), hidden_kept=50,
                                           multiple_of=16)
    recipe = Recipe(model={"path": "tiny"}, target={"sparsity": 0.4, "multiple_of": 16})
    manifest = export_pruned(model, byte_tokenizer(), masks, mode, tmp_path / "m", source_info=SOURCE, recipe=recipe)
    kept = manifest["kept"]
    assert manifest["checks"]["passed"] and kept["multiple_of"] == {"ffn_channels": 16, "hidden_dims": 16}
    assert kept["hidden_dims"] == 48 and all(c % 16 == 0 for c in kept["ffn_channels_per_layer"])
    assert all(c % 16 == 0 for c in kept["stored_ffn_channels_per_layer"])
    batch = check_batch(model.config)
    assert (logits(_reload(tmp_path / "m"), batch) - logits(zeroed_reference(model, masks), batch)).abs().max() <= TOL


def _result(value: float, stderr: float, ppl: float, decode: float, peak: int) -> dict:
    return {"prompt": {"text": "Keep the   answer short."},
            "tasks": {"quiz": {"metric": "acc", "value": value, "stderr": stderr, "n": 300}},
            "perplexity": {"perplexity": ppl}, "speed": {"decode_tokens_per_s": decode,
                                                         "memory": {"peak_bytes": peak, "method": "weights_plus_kv_cache"}}}


def test_model_card_states_the_load_path_per_mode_and_the_evaluation():
    from compresso_ops.models.card import base_model, render_card

    manifest = {"mode": "pad", "model_class": "MistralForCausalLM", "dtype": "float16", "recipe_hash": "abc123",
                "source": {"path": "huggyllama/llama-7b"}, "params": {"source": {"total": 10}, "exported": {"total": 7}},
                "checks": {"passed": True}}
    card = render_card(manifest, _result(0.50, 0.029, 2.5, 300.0, 2**30), _result(0.5133, 0.029, 2.0, 200.0, 2**31))
    header = card.split("---\n")[1]
    assert "base_model: huggyllama/llama-7b" in header
    assert "MistralForCausalLM" in card and "trust_remote_code" not in card
    assert "-1.33 ± 4.10 (within noise)" in card  # 1.33 points against sqrt(2) x 2.9 points of noise
    assert "> Keep the answer short." in card
    assert "×1.25" in card and "decode speed-up ×1.50" in card and "1.00 GiB" in card
    assert "Not evaluated yet" not in card
    assert base_model("/abs/folder") is None and base_model("not a hub id") is None


@pytest.mark.parametrize(("kept", "train", "removed", "trained"), [
    ({"hidden_dims": 64, "query_heads_per_layer": [4, 4], "ffn_channels_per_layer": [20, 32]}, "full",
     "removed FFN channels;", "every weight was trained for 30 steps."),
    ({"hidden_dims": 48, "query_heads_per_layer": [2, 4], "ffn_channels_per_layer": [20, 32]}, "lora",
     "removed attention heads, FFN channels and hidden dims;", "LoRA fine-tuning ran 30 steps and was merged"),
])
def test_model_card_names_what_was_removed_and_how_it_was_recovered(kept, train, removed, trained):
    from compresso_ops.models.card import render_card

    manifest = {"mode": "native", "dtype": "float32", "method": "activation", "kept": kept,
                "source": {"path": "/abs/src", "shape": {"layers": 2, "hidden_dims": 64, "query_heads_per_layer": 4,
                                                         "ffn_channels_per_layer": 32}},
                "params": {"source": {"total": 10}, "exported": {"total": 7}}, "finetune": {"steps": 30, "train": train}}
    card = render_card(manifest)
    assert f"with a one-shot activation ranking (what each structure adds to the residual stream on calibration " \
           f"text, no training) {removed}" in card
    assert trained in card

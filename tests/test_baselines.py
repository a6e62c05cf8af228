"""The one-shot methods' scores and allocation: `method: activation` reads what each structure adds to the
residual stream on calibration text, on every supported layout; `prune.one_shot_allocation` spreads the cut."""

from __future__ import annotations

import json

import pytest
import torch

from compresso_ops.errors import RecipeError, UserError
from compresso_ops.method.baselines import (
    activation_scores,
    calibration_batches,
    calibration_examples,
    magnitude_scores,
    save_ranked_masks,
)
from compresso_ops.models.adapter import ModelAdapter
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.recipe.schema import Recipe
from compresso_ops.training.data import Example
from tests.tiny import save_tiny, tiny_model

LAYOUTS = [("llama", True), ("llama", False), ("mistral", True), ("qwen2", True), ("qwen3", True), ("qwen3", False)]


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [Example(ids, ids) for ids in (torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths)]


def _scores(model: torch.nn.Module, examples: list[Example], micro_batch: int) -> dict[str, torch.Tensor]:
    return activation_scores(model, calibration_batches(examples, micro_batch, 258, torch.device("cpu")))


@pytest.mark.parametrize(("model_type", "gqa"), LAYOUTS)
def test_a_structure_that_adds_nothing_to_the_residual_stream_ranks_last(model_type, gqa):
    """A channel whose down_proj column is zero, and a KV group whose query heads' o_proj columns are zero,
    write nothing to the residual stream whatever their inputs: they score 0, below every other."""
    model = tiny_model(model_type, gqa=gqa)
    arch = ModelAdapter(model).arch
    channel, group = 5, arch.num_kv_heads - 1
    query_heads = range(group * arch.group_size, (group + 1) * arch.group_size)  # transformers' repeat_kv order
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, channel] = 0
        o_proj = model.model.layers[0].self_attn.o_proj.weight
        for q in query_heads:
            o_proj[:, q * arch.head_dim:(q + 1) * arch.head_dim] = 0
    scores = _scores(model, _examples([12, 9, 12]), micro_batch=2)
    assert scores["ffn"].shape == (arch.num_layers, arch.intermediate_size)
    assert scores["heads"].shape == (arch.num_layers, arch.num_kv_heads)
    assert scores["ffn"][1, channel] == 0 and scores["ffn"][1].argsort()[1:].tolist().count(channel) == 0
    assert (scores["ffn"][1, torch.arange(arch.intermediate_size) != channel] > 0).all()
    assert scores["heads"][0, group] == 0 and (scores["heads"][0, :group] > 0).all()
    assert (scores["ffn"][0] > 0).all() and (scores["heads"][1] > 0).all()


@pytest.mark.parametrize(("model_type", "gqa"), [("llama", True), ("qwen3", True)])
def test_padding_adds_nothing_to_the_scores(model_type, gqa):
    """Rows of different lengths are padded in a micro-batch; the padded positions must not count, so the
    scores equal those of the same examples one at a time (no padding at all)."""
    model = tiny_model(model_type, gqa=gqa)
    examples = _examples([5, 16, 9, 2, 11])
    alone = _scores(model, examples, micro_batch=1)
    padded = _scores(model, examples, micro_batch=5)
    for kind in ("heads", "ffn"):
        torch.testing.assert_close(padded[kind], alone[kind], rtol=1e-5, atol=0)
    # and they depend on the examples: a different calibration text gives different scores
    assert not torch.allclose(_scores(model, _examples([5, 16, 9, 2, 11], seed=1), 5)["ffn"], alone["ffn"])


def test_the_calibration_forward_leaves_the_model_as_it_found_it():
    model = tiny_model("llama").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _scores(model, _examples([8, 8]), micro_batch=1)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("baselines")
    save_tiny(folder / "model", "llama")
    rows = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"} for i in range(10)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.txt").write_text("the cat sat on the mat. " * 20)
    return folder


def _recipe(folder, **changes) -> Recipe:
    base = {"name": "t", "method": "activation", "model": {"path": str(folder / "model")},
            "target": {"sparsity": 0.3}, "prompt": {"text": "Keep quality."},
            "data": {"path": str(folder / "train.jsonl"), "format": "alpaca", "max_seq_length": 200}}
    for key, value in changes.items():
        section, field = key.split("__")
        base.setdefault(section, {})[field] = value
    return Recipe(**base)


def test_calibration_reads_the_first_examples_with_the_prune_prompt(tiny_dir):
    from compresso_ops.training.data import build_dataset
    from tests.tiny import byte_tokenizer

    recipe = _recipe(tiny_dir, prune__calibration_examples=3)
    tok = byte_tokenizer()
    assert calibration_examples(recipe, tok, 256) == build_dataset(recipe.data, tok, "Keep quality.", 256)[:3]


def test_too_few_examples_for_calibration_is_a_clear_error_at_run_time(tiny_dir):
    """A text file's example count is known only once it is tokenized: the run refuses with the count."""
    from tests.tiny import byte_tokenizer

    recipe = _recipe(tiny_dir, data__path=str(tiny_dir / "train.txt"), data__format="text")
    with pytest.raises(UserError, match=r"^prune\.calibration_examples: 64 is more than the 3 examples data\.path "
                                        r".*train\.txt yields; lower prune\.calibration_examples or give more data$"):
        calibration_examples(recipe, byte_tokenizer(), 256)


@pytest.mark.parametrize(("extra", "message"), [
    ("", "64 is more than the training data's 10 examples (rows of data.path); lower it to at most 10"),
    ("data: {max_samples: 8}\n", ("64 is more than the training data's 8 examples (data.max_samples); lower it "
                                 "to at most 8")),
])
def test_too_few_examples_for_calibration_is_a_located_error_when_knowable(tiny_dir, extra, message):
    path = tiny_dir / "r.yaml"
    path.write_text(f"extends: base.yaml\n{extra}")
    (tiny_dir / "base.yaml").write_text(f"method: activation\nmodel: {{path: {tiny_dir / 'model'}}}\n"
                                        "target: {sparsity: 0.3}\nprune:\n  micro_batch_size: 2\n"
                                        "data: {path: train.jsonl, max_seq_length: 200}\nprompt: {text: none}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (line,) = [p for p in info.value.lines if "calibration_examples" in p]
    assert line.endswith(f"prune.calibration_examples: {message} or give more data")
    assert line.startswith(f"{tiny_dir / 'base.yaml'}:4: ")  # the prune section it falls under
    assert load_recipe(path, overrides=["prune.calibration_examples=8"]).prune.calibration_examples == 8


@pytest.mark.parametrize("method", ["magnitude", "random", "activation"])
def test_uniform_allocation_cuts_every_layer_to_the_same_width(tiny_dir, tmp_path, method):
    model = tiny_model("llama", layers=3)
    arch = ModelAdapter(model).arch
    scores = magnitude_scores(model) if method != "activation" else {
        **_scores(model, _examples([10, 7]), 2), "hidden": magnitude_scores(model)["hidden"]}
    if method == "random":
        scores = {k: torch.rand_like(v) for k, v in scores.items()}
    widths = {}
    for allocation in ("global", "uniform"):
        recipe = _recipe(tiny_dir, prune__one_shot_allocation=allocation).model_copy(update={"method": method})
        masks, summary = save_ranked_masks(recipe, arch, scores, tmp_path / allocation, method)
        assert summary["allocation"] == allocation and summary["achieved_sparsity"] >= 0.3 - 0.02
        widths[allocation] = masks.kept().channels
    assert masks.kept().groups == (arch.num_kv_heads,) * arch.num_layers  # uniform: no head pruned, none forced
    assert max(widths["uniform"]) - min(widths["uniform"]) <= 1


def test_uniform_allocation_is_refused_for_compresso(tiny_dir):
    path = tiny_dir / "c.yaml"
    path.write_text(f"model: {{path: {tiny_dir / 'model'}}}\ntarget: {{sparsity: 0.3}}\n"
                    "data: {path: train.jsonl, max_seq_length: 200}\nprompt: {text: none}\n"
                    "prune:\n  one_shot_allocation: uniform\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.lines == [(f"{path}:6: prune.one_shot_allocation: uniform applies to the one-shot methods; "
                                 "Compresso's gates choose their own allocation, so drop this line or pick a "
                                 "one-shot method")]


@pytest.mark.parametrize(("sparsity", "allocation", "variant"), [
    (0.2, "global", "activation"), (0.35, "global", "activation"),
    (0.2, "uniform", "activation-uniform"), (0.35, "uniform", "activation-uniform")])
def test_the_library_selects_the_masks_the_quality_benchmark_measured(shared, tmp_path, sparsity, allocation,
                                                                        variant):
    """The real stories260K at the quality benchmark's settings (64 TinyStories chunks of 128 tokens, micro-batches
    of 4): `method: activation` keeps exactly the FFN widths benchmarks/results/quality_criteria.json recorded
    for the masks whose perplexities the README quotes."""
    from compresso_ops.method.baselines import run_one_shot
    from compresso_ops.training.setup import load_source
    from tests.tiny import REPO_ROOT, STORIES260K, TINYSTORIES

    rows = json.loads((REPO_ROOT / "benchmarks" / "results" / "quality_criteria.json").read_text())["rows"]
    (kept,) = {str(r["kept"]) for r in rows if (r["variant"], r["sparsity"]) == (variant, sparsity)}
    recipe = Recipe(name="q", method="activation", model={"path": str(STORIES260K)},
                    target={"sparsity": sparsity, "structures": ["heads", "ffn"]}, prompt={"text": "none"},
                    data={"path": str(TINYSTORIES / "train.txt"), "format": "text", "max_seq_length": 128},
                    prune={"micro_batch_size": 4, "one_shot_allocation": allocation},
                    export={"mode": "native", "dtype": "float32"})
    model, tokenizer, _ = load_source(recipe)
    run_one_shot(recipe, model, tokenizer, tmp_path)
    summary = json.loads((tmp_path / "masks.json").read_text())
    assert str({"heads": summary["kept_kv_groups_per_layer"], "ffn": summary["kept_ffn_channels_per_layer"],
                "hidden": summary["kept_hidden_dims"]}) == kept

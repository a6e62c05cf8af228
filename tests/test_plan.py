"""The dry-run planner: exact sizes for LLaMA-7B, memory verdicts and advice, no weights or network needed."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.models.architecture import PRESETS
from compresso_ops.models.sizes import count_params
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.stages.plan import evaluation_gpus, host_fix, make_plan, training_strategy, uniform_kept
from tests.tiny import REPO_ROOT


def _plan_json(args: list[str]) -> dict:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_llama7b_54b_plan_matches_the_paper():
    plan = _plan_json(["plan", str(REPO_ROOT / "recipes" / "llama7b-5.4b.yaml"), "--json"])
    params = plan["params"]
    assert params["source"]["total"] == 6_738_415_616
    assert params["source"]["prunable"] == 6_476_005_376
    assert params["source"]["embeddings"] == 262_144_000
    assert 5.40e9 <= params["target"]["total"] <= 5.48e9
    assert params["target"]["prunable_sparsity"] == pytest.approx(0.20)
    assert plan["trainable"]["lora"] == 4_194_304
    assert plan["trainable"]["gates"] == 357_376
    prune = plan["memory"]["stages"]["prune"]
    assert prune["fits"] and plan["hardware"]["gpu"] == "V100-32GB"
    assert set(prune["breakdown"]) >= {"frozen_weights", "trainable_grads_optimizer", "activations",
                                       "activations_without_checkpointing", "activations_with_checkpointing",
                                       "logits", "framework_overhead"}
    for mode in ("native", "uniform", "pad"):
        assert params["export"][mode]["checkpoint_bytes"] == params["export"][mode]["params"] * 2  # fp16
    assert plan["memory"]["deploy"]["total_bytes"] > plan["memory"]["deploy"]["weights_bytes"]
    # Host RAM: the 4 DDP processes load one after another, so a node holds one fp16 copy (13.5 GB); the
    # slice stage streams (the hub model is assumed safetensors): the widest piece (a layer, 0.81 GB, or the
    # embedding matrix) in fp32, its slice and transient copies, counted as three; evaluate holds one fp16 model.
    host = plan["memory"]["host"]
    assert host["peaks"]["load"] == 6_738_415_616 * 2
    assert host["slice_streams"]
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert host["peaks"]["slice"] == 3 * layer * 4
    assert host["peaks"]["evaluate"] == 6_738_415_616 * 2
    assert plan["steps"]["prune"]["total"] == 8 * plan["steps"]["prune"]["steps_per_epoch"]


def test_dry_run_prints_the_same_plan():
    recipe = str(REPO_ROOT / "recipes" / "llama7b-5.4b.yaml")
    assert _plan_json(["apply", recipe, "--dry-run", "--json"]) == _plan_json(["plan", recipe, "--json"])


@pytest.mark.parametrize("name,size", [("5.0b", 5.0e9), ("4.5b", 4.5e9)])
def test_smaller_recipes_land_on_their_names(name, size):
    plan = _plan_json(["plan", str(REPO_ROOT / "recipes" / f"llama7b-{name}.yaml"), "--json"])
    assert abs(plan["params"]["target"]["total"] - size) <= 0.05e9
    assert plan["params"]["export"]["uniform"]["exact"]
    assert abs(plan["params"]["export"]["uniform"]["params"] - size) <= 0.05e9


def test_uniform_split_meets_the_target_within_one_channel_per_layer():
    arch = PRESETS["llama-7b"]
    for sparsity in (0.2, 0.27, 0.35):
        kept = uniform_kept(arch, sparsity)
        got = count_params(arch, kept, "uniform").prunable
        want = (1 - sparsity) * count_params(arch).prunable
        assert abs(got - want) <= arch.num_layers * 3 * arch.hidden_size


def _recipe(tmp_path, body: str):
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(body))
    return load_recipe(path, check_files=False)


def test_a_replica_that_does_not_fit_gets_fsdp_chosen(tmp_path):
    body = """
        model: {path: org/llama-13b, architecture: llama-13b, dtype: float16}
        target: {sparsity: 0.2}
        prune: {gradient_checkpointing: true}
        hardware: {gpu: V100-16GB, gpus_per_node: 4, strategy: %s}
    """
    auto = _recipe(tmp_path, body % "auto")
    plan = make_plan(auto)
    assert plan["hardware"]["strategy"] == training_strategy(auto) == "fsdp"  # what the stages will run
    prune = plan["memory"]["stages"]["prune"]
    assert prune["fits"]
    # The numbers are the sharded ones: 1/4 of the 13B fp16 base (6.5 GB), plus the embeddings and LM head
    # (0.65 GB) and two gathered layers (1.27 GB), where a replica holds 26 GB.
    frozen = prune["breakdown"]["frozen_weights"]
    total = plan["params"]["source"]["total"] * 2
    assert total / 4 + 1.8e9 < frozen < total / 4 + 2.1e9
    # Rank 0 evaluates alone; a 13B model (24 GiB) does not fit one 16 GB GPU, so its layers are spread
    # over the node's 4 GPUs, and the evaluate stage's numbers are per GPU of those.
    evaluate = plan["memory"]["stages"]["evaluate"]
    assert evaluate["gpus"] == evaluation_gpus(auto) == 4 and evaluate["fits"]
    assert evaluate["breakdown"]["weights"] == total // 4
    replica = make_plan(_recipe(tmp_path, body % "ddp"))
    assert replica["hardware"]["strategy"] == "ddp"
    assert replica["memory"]["stages"]["prune"]["breakdown"]["frozen_weights"] == total
    assert not replica["memory"]["stages"]["prune"]["fits"]


def test_a_stage_that_does_not_fit_gets_the_smallest_fix(tmp_path):
    plan = make_plan(_recipe(tmp_path, """
        model: {path: org/llama-7b, architecture: llama-7b, dtype: float16}
        target: {sparsity: 0.2}
        prune: {micro_batch_size: 8, gradient_checkpointing: false}
        data: {max_seq_length: 1024}
        hardware: {gpu: V100-32GB, gpus_per_node: 1}
    """))
    prune = plan["memory"]["stages"]["prune"]
    assert not prune["fits"]
    assert prune["suggestion"] == "set prune.gradient_checkpointing: true"


def test_a_model_too_big_for_any_setting_says_so(tmp_path):
    plan = make_plan(_recipe(tmp_path, """
        model: {path: org/llama-13b, architecture: llama-13b, dtype: float16}
        target: {sparsity: 0.2}
        hardware: {gpu: V100-16GB, gpus_per_node: 1}
    """))
    assert not plan["memory"]["stages"]["prune"]["fits"]
    assert "larger GPU" in plan["memory"]["stages"]["prune"]["suggestion"]


def test_steps_come_from_the_local_data_file(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(100)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    plan = make_plan(_recipe(tmp_path, """
        model: {path: org/llama-7b, architecture: llama-7b}
        target: {sparsity: 0.2}
        data: {path: d.json}
        prune: {micro_batch_size: 2, gradient_accumulation: 5, schedule: {unit: epochs, lora_only: 1, ramp: 2, hold: 1}}
        finetune: {unit: steps, duration: 7}
        hardware: {gpu: A100-80GB, gpus_per_node: 2}
    """))
    steps = plan["steps"]
    assert steps["examples"] == 100
    assert steps["prune"]["global_batch"] == 20 and steps["prune"]["steps_per_epoch"] == 5
    assert steps["prune"]["phases"] == {"lora_only": 5, "ramp": 10, "hold": 5}
    assert steps["finetune"]["total"] == 7
    assert steps["prune"]["est_seconds"] > 0


def test_llama2_70b_on_two_v100_nodes_fits_the_host(tmp_path):
    """The issue's example: Llama-2-70B to 56B on 2 nodes x 8 V100-32GB with FSDP and 512 GB nodes. Each
    process reads only its shards, so a node holds about half the fp16 model; the slice stage streams."""
    recipe = _recipe(tmp_path, """
        model: {path: meta-llama/Llama-2-70b-hf, architecture: llama-2-70b, dtype: float16}
        target: {params: 56B}
        prune: {gradient_checkpointing: true, micro_batch_size: 1}
        hardware: {gpu: V100-32GB, gpus_per_node: 8, nodes: 2, strategy: fsdp, host_memory: 512GB}
    """)
    plan = make_plan(recipe)
    fp16 = plan["params"]["source"]["total"] * 2
    assert 68.9e9 < plan["params"]["source"]["total"] < 69.1e9  # the published 70B count
    host = plan["memory"]["host"]
    assert host["node_ram_bytes"] == 512 * 10**9 and host["node_ram_from"] == "hardware.host_memory"
    assert host["peaks"]["load"] <= 1.3 * fp16
    assert host["peaks"]["load"] < 0.6 * fp16  # half the model a node, plus one tensor per process
    assert host["peaks"]["slice"] <= 32 * 2**30
    assert all(host["fits"].values())
    # On 64 GB nodes the shards do not fit two nodes; a third makes each node's share small enough.
    small = recipe.model_copy(update={"hardware": recipe.hardware.model_copy(update={"host_memory": 64 * 10**9})})
    plan = make_plan(small)
    assert not plan["memory"]["host"]["fits"]["load"]
    assert host_fix(small, plan, "load") == "raise hardware.nodes to 3 (each node then holds a smaller share)"
    three = small.model_copy(update={"hardware": small.hardware.model_copy(update={"nodes": 3})})
    assert make_plan(three)["memory"]["host"]["fits"]["load"]


def test_preflight_refuses_a_node_too_small_with_the_smallest_fix(tmp_path):
    from compresso_ops.errors import UserError
    from compresso_ops.stages.preflight import run_preflight
    from tests.tiny import save_tiny

    save_tiny(tmp_path / "m")
    recipe = _recipe(tmp_path, f"""
        model: {{path: {tmp_path / "m"}}}
        target: {{sparsity: 0.2}}
        data: {{max_seq_length: 128}}
        hardware: {{gpu: cpu, gpus_per_node: 2, host_memory: 60KiB}}
    """)
    with pytest.raises(UserError) as err:
        run_preflight(recipe, tmp_path / "run", ["prune", "slice"])
    lines = err.value.lines
    load = next(line for line in lines if "load peak" in line)
    assert load.startswith("hardware.host_memory: the load peak needs about ")
    assert "the node has 60.00 KiB (hardware.host_memory); run on nodes with at least" in load
    assert any("slice peak" in line for line in lines)


def test_the_loading_fix_under_ddp_is_fsdp(tmp_path):
    recipe = _recipe(tmp_path, """
        model: {path: org/llama-13b, architecture: llama-13b, dtype: float16}
        target: {sparsity: 0.2}
        hardware: {gpu: A100-80GB, gpus_per_node: 8, strategy: ddp, host_memory: 16GiB}
    """)
    plan = make_plan(recipe)
    assert not plan["memory"]["host"]["fits"]["load"]
    assert host_fix(recipe, plan, "load") == "set hardware.strategy: fsdp (each process reads only its own shards)"

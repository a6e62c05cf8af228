"""The dry-run planner: exact sizes for LLaMA-7B, memory verdicts and advice, no weights or network needed."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.executor import Executor
from compresso_ops.models.architecture import PRESETS
from compresso_ops.models.sizes import count_params
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.recipe.schema import Recipe
from compresso_ops.stages.plan import (
    GPUS,
    MFU,
    evaluation_gpus,
    evaluation_parallel,
    host_fix,
    make_plan,
    training_strategy,
    uniform_kept,
)
from compresso_ops.ui.progress import PlainReporter
from tests.tiny import REPO_ROOT, save_tiny


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


@pytest.mark.parametrize(("multiple_of", "unit"), [(None, 64), (1, 1), (128, 128)])
def test_uniform_split_meets_the_target_within_half_an_aligned_unit_per_layer(multiple_of, unit):
    arch = PRESETS["llama-7b"]
    for sparsity in (0.2, 0.27, 0.35):
        kept = uniform_kept(arch, sparsity, multiple_of)
        assert all(c % unit == 0 for c in kept.channels)
        got = count_params(arch, kept, "uniform").prunable
        want = (1 - sparsity) * count_params(arch).prunable
        assert abs(got - want) <= arch.num_layers * 3 * arch.hidden_size * unit / 2


def test_plan_states_the_alignment_the_default_gives_7b_and_tiny_models(tmp_path):
    big = make_plan(Recipe(model={"path": "unused", "architecture": "llama-7b"}, target={"sparsity": 0.2}))
    assert big["params"]["alignment"] == {"ffn_channels": 64, "hidden_dims": 64}
    tiny = make_plan(Recipe(model={"path": str(save_tiny(tmp_path / "m"))}, target={"sparsity": 0.2}))
    assert tiny["params"]["alignment"] == {"ffn_channels": 1, "hidden_dims": 1}


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
    assert evaluate["parallel"] == evaluation_parallel(auto) == "layers" and evaluate["processes"] == 1
    assert evaluate["breakdown"]["weights"] == total // 4
    # each GPU keeps the KV cache of its own layers: a quarter of what one GPU holding the model would
    whole = make_plan(_recipe(tmp_path, body.replace("V100-16GB, gpus_per_node: 4", "A100-80GB, gpus_per_node: 1")
                              % "auto"))["memory"]["stages"]["evaluate"]
    assert whole["gpus"] == 1 and evaluate["breakdown"]["kv_cache"] == whole["breakdown"]["kv_cache"] // 4
    assert not Executor(auto, PlainReporter()).collective("evaluate")  # the other ranks leave after training
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
    prune = plan["memory"]["stages"]["prune"]
    assert not prune["fits"]
    # no setting fits 16 GB; of the larger GPUs only those that fit as the recipe stands are named
    assert prune["suggestion"] == "set hardware.gpu: A100-80GB (or H100-80GB, H200)"
    assert [o["hardware.gpu"] for o in prune["suggestion_overrides"]] == ["A100-80GB", "H100-80GB", "H200"]


def test_a_stage_that_does_not_run_neither_needs_memory_nor_steers_the_strategy(tmp_path):
    """finetune.enabled: false with train: full (inherited, say) planned the full fine-tune anyway: it did not
    fit a replica, so auto chose FSDP for the prune stage, which fits a replica. A disabled fine-tune and a
    one-shot method's prune stage now plan 0 bytes with a note, before the strategy is chosen."""
    body = """
        method: %s
        model: {path: org/x, architecture: llama-7b, dtype: bfloat16}
        target: {sparsity: 0.3}
        data: {num_examples: 1000}
        finetune: {enabled: %s, train: full}
        hardware: {gpu: A100-80GB, gpus_per_node: 2}
    """
    assert make_plan(_recipe(tmp_path, body % ("compresso", "true")))["hardware"]["strategy"] == "fsdp"
    plan = make_plan(_recipe(tmp_path, body % ("compresso", "false")))
    assert plan["hardware"]["strategy"] == "ddp"
    assert plan["memory"]["stages"]["finetune"] == {
        "per_gpu_bytes": 0, "breakdown": {}, "note": "finetune.enabled is false: no fine-tune", "fits": True,
        "suggestion": None, "suggestion_overrides": []}
    one_shot = make_plan(_recipe(tmp_path, body % ("magnitude", "false")))
    assert one_shot["memory"]["stages"]["prune"]["per_gpu_bytes"] == 0 and one_shot["hardware"]["strategy"] == "ddp"


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


def test_the_time_estimate_counts_the_teachers_forward(tmp_path):
    """Distillation runs the source as a teacher on every trained token: 2 x its parameters more FLOPs per
    token, which the estimate once left out (a fine-tune of the pruned model distilled from the 7B source
    planned as if no 7B forward ran)."""
    body = """
        model: {path: org/llama-7b, architecture: llama-7b}
        target: {sparsity: 0.3}
        data: {num_examples: 1000}
        prune: {schedule: {unit: steps, lora_only: 10, ramp: 10, hold: 10}DISTILL}
        finetune: {unit: steps, duration: 10DISTILL}
        hardware: {gpu: A100-80GB}
    """
    plain = make_plan(_recipe(tmp_path, body.replace("DISTILL", "")))
    taught = make_plan(_recipe(tmp_path, body.replace("DISTILL", ", distill: {weight: 0.5}")))
    teacher_flops_per_token = 2 * plain["params"]["source"]["total"]
    flops_per_s = GPUS["A100-80GB"].tflops * 1e12 * MFU
    for stage in ("prune", "finetune"):
        a, b = plain["steps"][stage], taught["steps"][stage]
        tokens = a["total"] * a["global_batch"] * 512  # data.max_seq_length's default
        assert b["est_seconds"] - a["est_seconds"] == pytest.approx(tokens * teacher_flops_per_token / flops_per_s)


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


# --------------------------------------------------------------------------- today's models

STANDARD_SUITE = "[boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, race]"
TODAYS_MODELS = ["llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b", "qwen2.5-7b", "qwen3-8b", "mistral-7b-v0.3"]
# GPUs the evaluate stage spreads the model over: lm-eval's batch 8 of RACE's ~2.4k tokens holds three
# logits-sized buffers (the previous batch's log-probs, the logits, their log-softmax), 5-6 GB each with a
# 128k-152k vocabulary; beside a 7-8B model's weights that exceeds one V100-32GB.
EVAL_GPUS = {"llama-3.1-8b": 4, "qwen2.5-7b": 4, "qwen3-8b": 4}


def _todays_recipe(tmp_path, preset: str, evaluation: str = f"{{tasks: {STANDARD_SUITE}}}",
                   prompt: str = "collaborative"):
    return _recipe(tmp_path, f"""
        model: {{path: org/{preset}, architecture: {preset}}}
        target: {{sparsity: 0.2}}
        prompt: {{text: {prompt}}}
        data: {{num_examples: 50000}}
        prune: {{gradient_checkpointing: true}}
        finetune: {{gradient_checkpointing: true}}
        eval: {evaluation}
        hardware: {{gpu: V100-32GB, gpus_per_node: 4}}
    """)


@pytest.mark.parametrize("preset", TODAYS_MODELS)
def test_todays_models_plan_their_published_size_and_fit_four_v100s(tmp_path, preset):
    """GQA, 32k-131k contexts, tied embeddings, Qwen biases and q/k norms: the issue's setting (fp16, 4 x
    V100-32GB, gradient checkpointing, the standard suite) fits every stage, evaluation on one GPU unless
    the large-vocabulary models' logits need the layers spread (EVAL_GPUS)."""
    plan = make_plan(_todays_recipe(tmp_path, preset))
    assert plan["params"]["source"]["total"] == count_params(PRESETS[preset]).total
    stages = plan["memory"]["stages"]
    assert all(entry["fits"] for entry in stages.values()), {k: v["per_gpu_bytes"] for k, v in stages.items()}
    assert stages["evaluate"]["gpus"] == EVAL_GPUS.get(preset, 1)
    if stages["evaluate"]["gpus"] == 1:  # the model fits one GPU: all 4 processes evaluate, a share each
        assert (stages["evaluate"]["parallel"], stages["evaluate"]["processes"]) == ("data", 4)
        assert Executor(_todays_recipe(tmp_path, preset), PlainReporter()).collective("evaluate")
    else:  # its layers are spread over the node's GPUs, and rank 0 evaluates
        assert stages["evaluate"]["parallel"] == "layers"
    # the longest request of the suite (RACE) plus the evaluation prompt, not the 32k-131k context
    assert 2048 < stages["evaluate"]["sequence_tokens"] < 4096 < PRESETS[preset].max_position_embeddings


def test_evaluation_is_planned_at_the_longest_request_capped_by_max_length(tmp_path):
    def evaluate(evaluation: str, prompt: str = "collaborative") -> dict:
        recipe = _todays_recipe(tmp_path, "llama-3.1-8b", evaluation, prompt)
        return make_plan(recipe)["memory"]["stages"]["evaluate"]

    suite = evaluate(f"{{tasks: {STANDARD_SUITE}}}")
    short = evaluate("{tasks: [winogrande], speed: {enabled: false}}", prompt="none")
    assert short["sequence_tokens"] == 128 and short["per_gpu_bytes"] < suite["per_gpu_bytes"]
    capped = evaluate("{tasks: [race], max_length: 1024}")
    assert capped["sequence_tokens"] == 1024 and "truncated to max_length 1,024" in capped["assumption"]
    rolling = evaluate("{tasks: [wikitext], batch_size: 1}")  # windows of the whole 131k context
    assert rolling["sequence_tokens"] == 131072 and rolling["gpus"] == 4
    doubled = evaluate("{tasks: [race], batch_size: 16}")
    assert doubled["breakdown"]["logits"] == 2 * evaluate("{tasks: [race]}")["breakdown"]["logits"]


@pytest.mark.parametrize("batch_size", ["auto", "auto:4"])
def test_lm_eval_auto_batch_size_is_accepted_and_planned_at_batch_one(tmp_path, batch_size):
    recipe = _todays_recipe(tmp_path, "qwen2.5-7b", f"{{tasks: [boolq], batch_size: '{batch_size}'}}")
    assert recipe.eval.batch_size == batch_size and recipe.eval.fixed_batch_size is None
    evaluate = make_plan(recipe)["memory"]["stages"]["evaluate"]
    one = make_plan(_todays_recipe(tmp_path, "qwen2.5-7b", "{tasks: [boolq], batch_size: 1}"))
    assert evaluate["breakdown"] == one["memory"]["stages"]["evaluate"]["breakdown"]
    assert "largest batch that fits" in evaluate["assumption"]


@pytest.mark.parametrize("bad", ["0", "automatic", "'auto:0'", "'auto:x'"])
def test_a_bad_eval_batch_size_is_a_located_error(tmp_path, bad):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: org/m, architecture: llama-3.2-1b}}\ntarget: {{sparsity: 0.2}}\n"
                    f"eval:\n  batch_size: {bad}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:4: eval.batch_size:" in result.output and "auto:N" in result.output


def test_a_local_task_is_planned_at_its_longest_row(tmp_path):
    rows = [{"question": "q" * n, "choices": ["a", "b"], "answer": 0} for n in (10, 900, 40)]
    (tmp_path / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _recipe(tmp_path, """
        model: {path: org/m, architecture: qwen3-8b}
        target: {sparsity: 0.2}
        prompt: {text: none}
        eval: {local_tasks: [{name: quiz, data: quiz.jsonl, format: multiple_choice}], speed: {enabled: false}}
    """)
    longest = max(len(line.encode()) for line in (tmp_path / "quiz.jsonl").read_text().splitlines())
    assert make_plan(recipe)["memory"]["stages"]["evaluate"]["sequence_tokens"] == longest


# --------------------------------------------------------------------------- suggestions that work

FAMILIES = ["llama-7b", "llama-3.1-8b", "mistral-7b-v0.3", "qwen2.5-7b", "qwen3-8b"]
HARDWARE = {"V100-16GB": 8, "V100-32GB": 4, "A100-80GB": 1}
HEAVY = """
    model: {{path: org/{preset}, architecture: {preset}}}
    target: {{sparsity: 0.2}}
    data: {{num_examples: 50000, max_seq_length: {seq}}}
    prune: {{micro_batch_size: 8, gradient_accumulation: 2}}
    finetune: {{micro_batch_size: 8, gradient_accumulation: 2}}
    eval: {{tasks: [race], batch_size: 64}}
    hardware: {{gpu: {gpu}, gpus_per_node: {n}}}
"""


@pytest.mark.parametrize("gpu", list(HARDWARE))
@pytest.mark.parametrize("preset", FAMILIES)
def test_every_suggestion_makes_its_stage_fit_when_applied(tmp_path, preset, gpu):
    """Recipes that do not fit (no checkpointing, large micro-batches, long sequences, a large eval batch):
    each alternative a suggestion names, applied to the recipe, re-plans to a stage that fits, and the line
    shown to the user names every field the alternative changes."""
    from compresso_ops.stages.plan import with_overrides

    misfits = 0
    for seq in (512, 2048):
        recipe = _recipe(tmp_path, HEAVY.format(preset=preset, seq=seq, gpu=gpu, n=HARDWARE[gpu]))
        for stage, entry in make_plan(recipe)["memory"]["stages"].items():
            if entry["fits"]:
                continue
            misfits += 1
            assert entry["suggestion_overrides"], entry["suggestion"]
            for overrides in entry["suggestion_overrides"]:
                fixed = make_plan(with_overrides(recipe, overrides))["memory"]["stages"][stage]
                assert fixed["fits"], (stage, overrides)
            for field, value in entry["suggestion_overrides"][0].items():
                shown = str(value).lower() if isinstance(value, bool) else str(value)
                assert f"{field}: {shown}" in entry["suggestion"]
    assert misfits  # the heavy recipes do not fit somewhere, so the suggestions were exercised


def test_plan_check_exits_3_naming_the_stage_that_does_not_fit():
    recipe = str(REPO_ROOT / "recipes" / "llama7b-5.4b.yaml")
    small = CliRunner().invoke(main, ["plan", recipe, "--check", "--json", "--set", "hardware.gpu=V100-16GB",
                                      "--set", "hardware.gpus_per_node=1"])
    assert small.exit_code == 3, small.output
    assert "does not fit: prune: needs" in small.output and "V100-16GB" in small.output
    table = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["plan", recipe, "--check"])
    assert table.exit_code == 0
    assert "evaluate (data-parallel over 4 processes)" in table.output  # 7B on 4 x V100-32GB: one GPU each


def test_cpu_plan_states_no_gpu_limit():
    recipe = str(REPO_ROOT / "recipes" / "demo.yaml")
    plan = _plan_json(["plan", recipe, "--json"])
    assert plan["hardware"]["per_gpu_memory_bytes"] is None
    assert all(entry["fits"] is None for entry in plan["memory"]["stages"].values())
    text = CliRunner().invoke(main, ["plan", recipe], terminal_width=200).output
    assert "available" not in text and "per GPU" not in text and "host RAM" in text
    assert "GiB float32" not in text  # sizes have their own column, not the sparsity one


def test_training_activations_follow_what_the_recipe_trains(tmp_path):
    """A frozen projection keeps no input for backward; LoRA dropout keeps the dropped input and its mask."""
    def prune(section: str) -> dict:
        plan = make_plan(_recipe(tmp_path, f"""
            model: {{path: org/llama-7b, architecture: llama-7b}}
            target: {{sparsity: 0.3}}
            data: {{num_examples: 1000, max_seq_length: 512}}
            prune: {section}
            hardware: {{gpu: A100-80GB}}
        """))
        return plan["memory"]["stages"]["prune"]["breakdown"]["activations_without_checkpointing"]

    arch, tokens, bf16 = PRESETS["llama-7b"], 4 * 512, 2
    qv = prune("{micro_batch_size: 4}")
    dropped = prune("{micro_batch_size: 4, lora: {dropout: 0.1}}")
    assert dropped - qv == 2 * arch.hidden_size * (bf16 + 1) * arch.num_layers * tokens  # q and v inputs
    every = prune("{micro_batch_size: 4, lora: {target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, "
                  "up_proj, down_proj]}}")
    full = prune("{micro_batch_size: 4, train: full}")
    assert qv < full < every  # full keeps the same inputs as LoRA everywhere, without the rank-r outputs


def test_evaluation_plans_the_kv_cache_lm_eval_keeps(tmp_path):
    """lm-eval calls the model with the KV cache on: a multi-head 7B at 2k tokens peaks at the forward's end."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "llama7b-5.4b.yaml", check_files=False)
    evaluate = make_plan(recipe)["memory"]["stages"]["evaluate"]
    arch, tokens = PRESETS["llama-7b"], recipe.eval.fixed_batch_size * evaluate["sequence_tokens"]
    assert "forward's end" in evaluate["assumption"]
    assert evaluate["breakdown"]["kv_cache"] == 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * tokens * 2
    assert sum(evaluate["breakdown"].values()) == evaluate["per_gpu_bytes"]


def test_a_one_shot_prune_stage_plans_what_it_runs(tmp_path):
    """magnitude and random train nothing: no prune steps, no time. activation runs one forward of its
    calibration examples: the source's weights plus one micro-batch's activations (no gradients, no LM head),
    2P FLOPs per calibration token, and a micro-batch that does not fit is met with a smaller one."""
    body = """
        method: %s
        model: {path: org/llama-7b, architecture: llama-7b}
        target: {sparsity: 0.3}
        data: {num_examples: 1000, max_seq_length: 1024}
        prune: {micro_batch_size: %d, calibration_examples: 100}
        hardware: {gpu: %s}
    """
    magnitude = make_plan(_recipe(tmp_path, body % ("magnitude", 4, "A100-80GB")))
    assert magnitude["steps"]["prune"]["total"] == 0 and magnitude["steps"]["prune"]["est_seconds"] == 0
    plan = make_plan(_recipe(tmp_path, body % ("activation", 4, "A100-80GB")))
    prune, source = plan["memory"]["stages"]["prune"], plan["params"]["source"]["total"]
    assert prune["fits"] and prune["breakdown"]["frozen_weights"] == source * 2  # bf16 on an A100
    assert "one calibration forward of 100 examples in micro-batches of 4" in prune["note"]
    assert plan["trainable"]["total"] == 0
    steps = plan["steps"]["prune"]
    assert steps["phases"] == {"calibration_forwards": 25} and steps["total"] == 0
    assert steps["est_seconds"] == pytest.approx(100 * 1024 * 2 * source / (GPUS["A100-80GB"].tflops * 1e12 * MFU))
    bigger = make_plan(_recipe(tmp_path, body % ("activation", 8, "A100-80GB")))["memory"]["stages"]["prune"]
    assert bigger["breakdown"]["activations"] == 2 * prune["breakdown"]["activations"]
    tight = make_plan(_recipe(tmp_path, body % ("activation", 64, "V100-16GB")))["memory"]["stages"]["prune"]
    assert not tight["fits"] and tight["suggestion"].startswith("set prune.micro_batch_size: ")
    assert "checkpointing" not in tight["suggestion"] and "accumulation" not in tight["suggestion"]
    for method in ("magnitude", "activation"):  # the human view renders a one-shot prune row
        (tmp_path / "r.yaml").write_text(textwrap.dedent(body % (method, 4, "A100-80GB")))
        shown = CliRunner().invoke(main, ["plan", str(tmp_path / "r.yaml")], env={"COLUMNS": "250"})
        assert shown.exit_code == 0, shown.output
        assert ("calibration forwards 25; one-shot: no training" if method == "activation" else
                "one-shot: ranks the weights, no training") in shown.output

"""Recipe loading: valid recipes load; each kind of malformed recipe gives exit 2 and FILE:LINE: field: message."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from compresso_ops.cli import main
from compresso_ops.infra.units import parse_bytes
from compresso_ops.recipe.loader import load_recipe
from compresso_ops.recipe.schema import parse_param_count, recipe_json_schema
from tests.tiny import REPO_ROOT, save_tiny

LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+): (?P<field>[^:]+): (?P<msg>.+)$")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", "llama")


def _write(folder: Path, body: str, name: str = "r.yaml") -> Path:
    (folder / "train.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


BASE = """
name: t
model:
  path: {model}
target:
  sparsity: 0.3
data:
  path: train.jsonl
  max_seq_length: 200
prompt: {text: none}
"""


def test_valid_recipe_loads_and_resolves_paths(tmp_path, model_dir):
    recipe = load_recipe(_write(tmp_path, BASE.replace("{model}", str(model_dir))))
    assert recipe.data.path == tmp_path / "train.jsonl"
    assert recipe.prune.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.resolved_run_dir() == Path("runs/t")


def test_extends_overrides_fields_and_keeps_the_rest(tmp_path, model_dir):
    _write(tmp_path, BASE.replace("{model}", str(model_dir)), "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\nname: child\ntarget:\n  sparsity: 0.5\n", "child.yaml")
    recipe = load_recipe(child)
    assert (recipe.name, recipe.target.sparsity) == ("child", 0.5)
    assert recipe.data.path == tmp_path / "train.jsonl"


@pytest.mark.parametrize("value,expected", [("5.4B", 5_400_000_000), ("500M", 500_000_000), (123, 123),
                                            ("6738415616", 6_738_415_616), ("1.5k", 1500)])
def test_param_counts_parse(value, expected):
    assert parse_param_count(value) == expected


@pytest.mark.parametrize("value,expected", [("512GB", 512 * 10**9), ("768GiB", 768 * 2**30), ("500MB", 500 * 10**6),
                                            ("1.5 TiB", round(1.5 * 2**40)), (4096, 4096), ("4096", 4096)])
def test_sizes_parse(value, expected):
    assert parse_bytes(value) == expected


# Each case: a recipe body (with {model} for the tiny model folder), the field the error names, the line it
# points at, and a fragment of the message.
MALFORMED = {
    "unknown top-level key": (BASE + "tragets: 1\n", "tragets", 10, "did you mean 'target'"),
    "unknown nested key": (BASE + "prune:\n  lora:\n    rank: 8\n", "prune.lora.rank", 12, "valid keys: alpha, dropout, r,"),
    "wrong type": (BASE + "prune:\n  micro_batch_size: four\n", "prune.micro_batch_size", 11, "integer"),
    "out of range sparsity": (BASE.replace("0.3", "1.5"), "target.sparsity", 5, "between 0 and 1"),
    "sparsity as a percentage": (BASE.replace("0.3", "20"), "target.sparsity", 5, "write 0.20 for 20%"),
    "finetune: false": (BASE + "finetune: false\n", "finetune", 10, "write finetune: {enabled: false}"),
    "float16 without a hardware section": (BASE.replace("  path: {model}", "  path: {model}\n  dtype: float16"),
                                           "model.dtype", 4, "the default is hardware.gpu: cpu"),
    "host memory not a size": (BASE + "hardware:\n  host_memory: lots\n", "hardware.host_memory", 11,
                               "write it as 512GB, 768GiB"),
    "negative learning rate": (BASE + "prune:\n  lr:\n    gates: -0.1\n", "prune.lr.gates", 12, "greater than 0"),
    "both sparsity and params": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  params: 10K"), "target", 4,
                                 "not both"),
    "neither sparsity nor params": (BASE.replace("  sparsity: 0.3\n", "  structures: [heads]\n"), "target", 4,
                                    "exactly one"),
    "empty structures": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: []"), "target.structures", 6,
                         "empty"),
    "a structure twice": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [ffn, ffn]"),
                          "target.structures", 6, "twice"),
    "unknown structure": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [heads, layers]"),
                          "target.structures[1]", 6, "heads"),
    "bad param count": (BASE.replace("sparsity: 0.3", "params: lots"), "target.params", 5, "parameter count"),
    "infeasible params target": (BASE.replace("sparsity: 0.3", "params: 10M"), "target.params", 5,
                                 "not below the source"),
    "target below embeddings without hidden": (
        BASE.replace("sparsity: 0.3", "params: 100\n  structures: [heads, ffn]"), "target.params", 5, "embeddings"),
    "missing file": (BASE.replace("train.jsonl", "nope.jsonl"), "data.path", 7, "file not found"),
    "missing model folder": (BASE.replace("{model}", "./no-such-model"), "model.path", 3, "no local config.json"),
    "bad yaml": (BASE + "prune: [unclosed\n", "yaml", 11, "fix the YAML"),
    "bf16 export dtype on V100": (BASE + "hardware:\n  gpu: V100-32GB\nexport:\n  dtype: bfloat16\n", "export.dtype", 13,
                                  "use float16"),
    "bf16 model dtype on V100": (BASE.replace("  path: {model}", "  path: {model}\n  dtype: bfloat16")
                                 + "hardware:\n  gpu: V100-16GB\n", "model.dtype", 4, "use float16"),
    "unknown gpu": (BASE + "hardware:\n  gpu: V100\n", "hardware.gpu", 11, "V100-32GB"),
    "fsdp on one GPU": (BASE + "hardware:\n  gpu: V100-16GB\n  strategy: fsdp\n", "hardware", 10, "use auto or ddp"),
    "lora target module that does not exist": (BASE + "prune:\n  lora:\n    target_modules: [q_proj, qkv]\n",
                                               "prune.lora.target_modules[1]", 12, "not a projection"),
    "sequence above the model's limit": (BASE.replace("max_seq_length: 200", "max_seq_length: 4096"),
                                         "data.max_seq_length", 8,
                                         "above the model's limit"),
    "wrong export mode": (BASE + "export:\n  mode: sharded\n", "export.mode", 11, "native"),
    "section given as a scalar": (BASE + "prune: fast\n", "prune", 10, "dictionary"),
    "missing model": ("name: t\ntarget:\n  sparsity: 0.3\n", "model", 1, "required"),
    "misspelt preset": ("name: t\nmodel:\n  path: org/m\n  architecture: lama-2-7b\ntarget:\n  sparsity: 0.3\n",
                        "model.architecture", 4, "did you mean 'llama-2-7b'?"),
    "missing preset": ("name: t\nmodel:\n  path: org/m\n  architecture: llama-3.1-70b\ntarget:\n  sparsity: 0.3\n",
                       "model.architecture", 4, "there is no preset 'llama-3.1-70b'; the presets are llama-7b"),
    "hub id without preset": ("name: t\nmodel:\n  path: org/m\ntarget:\n  sparsity: 0.3\n", "model.path", 3,
                              "model.architecture"),
    "duplicate key": (BASE + "name: u\n", "name", 10, "twice"),
    "not a mapping": ("- just\n- a list\n", "(recipe)", 1, "mapping"),
    "empty file": ("", "(recipe)", 1, "empty"),
    "infinite learning rate": (BASE + "prune:\n  lr:\n    lora: .inf\n", "prune.lr.lora", 12, "finite number"),
    "NaN distillation temperature": (BASE + "finetune:\n  distill:\n    temperature: .nan\n",
                                     "finetune.distill.temperature", 12, "finite number"),
    "yes for a number": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  multiple_of: yes"), "target.multiple_of", 6,
                         "yes/no value, not a number"),
    "true for a distillation weight": (BASE + "prune:\n  distill: {weight: true}\n", "prune.distill.weight", 11,
                                       "not a number"),
    "hidden-state distillation without the teacher": (
        BASE + "finetune:\n  distill:\n    hidden_states_weight: 2\n", "finetune.distill.hidden_states_weight", 12,
        "needs the teacher"),
    "hidden-state distillation with hidden dims pruned": (
        BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [ffn, hidden]")
        + "finetune:\n  distill:\n    weight: 0.5\n    hidden_states_weight: 2\n",
        "finetune.distill.hidden_states_weight", 14, "hidden size must stay"),
    "multiple_of at the FFN width": (BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  multiple_of: 48"),
                                     "target.multiple_of", 6, "not below the model's FFN width (48)"),
    "multiple_of above the hidden size": (
        BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [heads, hidden]\n  multiple_of: 40"),
        "target.multiple_of", 7, "not below the model's hidden size (32)"),
    "multiple_of leaves no hidden size within the target": (
        BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [hidden]\n  multiple_of: 24"),
        "target.multiple_of", 7, "leaves no hidden size that meets the target (at most 22 of 32"),
    "target out of reach of the listed structures": (
        BASE.replace("sparsity: 0.3", "sparsity: 0.9\n  structures: [ffn]"), "target.structures", 6,
        "cannot be reached by pruning ffn"),
    "uniform export of whole blocks alone": (
        BASE.replace("sparsity: 0.3", "sparsity: 0.3\n  structures: [heads, ffn_blocks]") + "export:\n  mode: uniform\n",
        "export.mode", 12, "cannot drop whole blocks alone"),
    "NUL character in a relative data path": (BASE.replace("path: train.jsonl", 'path: "train\\0.jsonl"'),
                                               "data.path", 7, "NUL character"),
    "NUL character in an absolute run folder": (BASE + 'run_dir: "/tmp/run\\0s"\n', "run_dir", 10,
                                                "NUL character"),
    "NUL character in extends": ('extends: "base\\0.yaml"\n', "extends", 1, "without a NUL character"),
    "prompt leaves no room at max_seq_length": (BASE.replace("{text: none}", "{text: " + "word " * 40 + "}"),
                                                "data.max_seq_length", 8, "with the model's tokenizer"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_gives_exit_2_and_a_located_line(case, tmp_path, model_dir):
    body, field, line, fragment = MALFORMED[case]
    path = _write(tmp_path, body.replace("{model}", str(model_dir)))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.endswith(": ok")]
    assert lines, result.output
    match = LINE.match(lines[0])
    assert match, f"not FILE:LINE: field: message: {lines[0]!r}"
    assert Path(match["file"]).name == path.name
    assert match["field"] == field, lines[0]
    assert int(match["line"]) == line, lines[0]
    assert fragment in match["msg"], lines[0]


def test_missing_preset_offers_no_wrong_did_you_mean(tmp_path):
    path = _write(tmp_path, "model: {path: org/m, architecture: qwen3-32b}\ntarget: {sparsity: 0.3}\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "there is no preset 'qwen3-32b'" in result.output
    assert "did you mean" not in result.output


def test_params_in_a_child_says_how_to_clear_the_parents_sparsity(tmp_path, model_dir):
    _write(tmp_path, BASE.replace("{model}", str(model_dir)), "base.yaml")
    child = _write(tmp_path, "extends: base.yaml\ntarget:\n  params: 20K\n", "child.yaml")
    result = CliRunner().invoke(main, ["validate", str(child)])
    assert result.exit_code == 2
    assert "child.yaml:2: target: target.sparsity and target.params are both set (target.sparsity comes from " \
           in result.output
    assert "base.yaml:5 through extends); add 'sparsity: null' under target" in result.output
    fixed = _write(tmp_path, "extends: base.yaml\ntarget:\n  params: 20K\n  sparsity: null\n", "fixed.yaml")
    assert load_recipe(fixed).target.params == 20_000


def test_a_misspelt_lm_eval_task_is_caught_by_validate(tmp_path, model_dir, monkeypatch):
    """The names come from the cached registry index (tests/test_evaluate.py builds the real one)."""
    from compresso_ops.evaluation.tasks import task_names_cache
    from compresso_ops.infra import atomic
    from compresso_ops.infra.cache import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    atomic.write_json(task_names_cache(), {"names": ["arc_easy", "hellaswag", "mmlu", "my_task"]})
    body = BASE.replace("{model}", str(model_dir)) + "eval:\n  tasks: [arc_easy, hellaswg, my_task, zzz]\n"
    result = CliRunner().invoke(main, ["validate", str(_write(tmp_path, body))])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines[0].endswith("r.yaml:11: eval.tasks[1]: 'hellaswg' is not an lm-eval task, group or tag; "
                             "did you mean 'hellaswag'?")
    assert "eval.tasks[3]: 'zzz' is not an lm-eval task" in lines[1] and len(lines) == 2
    assert CliRunner().invoke(main, ["plan", str(tmp_path / "r.yaml"), "--json"]).exit_code == 0  # plan: no check


def test_a_tokenizer_the_model_cannot_embed_is_refused_by_validate(tmp_path, model_dir):
    """Tokenizer files from another model gave ids past the embedding table, and the prune stage died in
    torch with 'IndexError: index out of range' (exit 1); an unreadable tokenizer.json or tokenizer_config.json
    crashed validate."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tests.tiny import byte_tokenizer, tiny_config

    small = tmp_path / "small-vocab"
    config = tiny_config(vocab=200)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = None, 1, 2
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    byte_tokenizer().save_pretrained(small)  # 259 tokens
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(model_dir, broken)
    (broken / "tokenizer.json").write_text('{"not": "a tokenizer"')
    bad_config = tmp_path / "broken-tokenizer-config"
    shutil.copytree(model_dir, bad_config)
    (bad_config / "tokenizer_config.json").write_text("{oops")
    too_many = "the tokenizer has 259 tokens but the model's vocabulary (vocab_size in config.json) has 200"
    for folder, fragment in ((small, too_many), (broken, "tokenizer.json is not a readable tokenizer"),
                             (bad_config, "tokenizer_config.json is not valid JSON")):
        path = _write(tmp_path, BASE.replace("{model}", str(folder)))
        result = CliRunner().invoke(main, ["validate", str(path)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        match = LINE.match(result.output.splitlines()[0])
        assert match and (match["field"], match["line"]) == ("model.path", "3") and fragment in match["msg"], \
            result.output


def test_bad_extends_is_located(tmp_path):
    path = _write(tmp_path, "extends: missing.yaml\nname: x\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert re.match(r"^.*r\.yaml:1: extends: recipe 'missing.yaml' not found", result.output)


def test_extends_cycle_is_refused(tmp_path):
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    path = _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "cycle" in result.output


def test_every_problem_is_reported_in_one_pass(tmp_path, model_dir):
    path = _write(tmp_path, BASE.replace("{model}", str(model_dir)) + "prune:\n  seed: x\n  micro_batch_size: 0\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 2


def test_shipped_schema_is_in_sync():
    shipped = json.loads((REPO_ROOT / "schemas" / "recipe.schema.json").read_text())
    assert shipped == recipe_json_schema(), "run `make schema` to regenerate schemas/recipe.schema.json"


def test_schema_command_prints_the_schema():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "compresso-ops recipe"


def test_shipped_recipes_start_with_the_schema_comment_and_load():
    for path in sorted((REPO_ROOT / "recipes").glob("*.yaml")):
        assert path.read_text().startswith("# yaml-language-server: $schema=../schemas/recipe.schema.json"), path
        load_recipe(path, check_files=False)


def _schema_errors(document: dict) -> list[str]:
    import jsonschema  # the dev extra installs it: a missing validator must fail, not skip

    schema = json.loads((REPO_ROOT / "schemas" / "recipe.schema.json").read_text())
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(document)]


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid_against_the_editor_schema(path):
    """Editors validate with schemas/recipe.schema.json: a recipe the loader accepts must not show as invalid."""
    import yaml

    assert _schema_errors(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("document,valid", [
    ({"model": {"path": "m"}, "target": {"params": "5.4B"}}, True),
    ({"model": {"path": "m"}, "target": {"params": 5_400_000_000}}, True),
    ({"model": {"path": "m"}, "target": {"params": "lots"}}, False),
    ({"model": {"path": "m"}, "target": {"params": 0}}, False),
    ({"target": {"sparsity": 0.3}}, False),                        # no model and nothing to inherit it from
    ({"model": {"dtype": "float16"}, "target": {"sparsity": 0.3}}, False),
    ({"extends": "base.yaml", "target": {"sparsity": 0.3}}, True),
    ({"extends": "base.yaml", "model": {"dtype": "float16"}, "eval": {"perplexity": {"window": 64}}}, True),
    ({"extends": "base.yaml", "model": {"dtype": "float99"}}, False),  # types still apply under extends
])
def test_editor_schema_accepts_what_the_loader_accepts(document, valid):
    assert (_schema_errors(document) == []) == valid


# --set: one field overridden on the command line, checked like a field in the file and named in errors.
OVERRIDE_ERRORS = {
    "out of range": ("prune.lr.lora=-1", "--set prune.lr.lora=-1: prune.lr.lora: ", "greater than 0"),
    "misspelt key": ("prune.lr.lroa=1", "--set prune.lr.lroa=1: prune.lr.lroa: ", "did you mean 'lora'"),
    "flow list item": ("prune.lora.target_modules=[q_proj, qkv]",
                       "--set prune.lora.target_modules=[q_proj, qkv]: prune.lora.target_modules[1]: ",
                       "not a projection"),
    "no equals sign": ("prune.lr.lora", "--set prune.lr.lora: ", "key.path=value"),
    "empty list": ("target.structures=[]", "--set target.structures=[]: target.structures: ", "empty"),
    "missing list item": ("eval.local_tasks[0].data=x.jsonl", "--set eval.local_tasks[0].data=x.jsonl: ", "no such"),
    "into a scalar": ("name.first=x", "--set name.first=x: name: ", "not a mapping"),
    "bad yaml": ("prune.seed=[1", "--set prune.seed=[1: ", "not YAML"),
    "section the file does not have": ("training.group_by_length=false",
                                       "--set training.group_by_length=false: training: ", "unknown key 'training'"),
    "flow mapping key without a space after its colon": (
        "prune.distill={weight:0.5}", "--set prune.distill={weight:0.5}: prune.distill.weight:0.5: ",
        "unknown key 'weight:0.5'; did you mean 'weight'? (write a space after the ':'"),
    "missing file, relative to the working folder": ("data.path=nope.jsonl", "--set data.path=nope.jsonl: data.path: ",
                                                     "nope.jsonl"),
}


@pytest.mark.parametrize("case", sorted(OVERRIDE_ERRORS))
def test_bad_override_names_itself_and_exits_2(case, tmp_path, model_dir):
    item, prefix, fragment = OVERRIDE_ERRORS[case]
    path = _write(tmp_path, BASE.replace("{model}", str(model_dir)))
    result = CliRunner().invoke(main, ["validate", str(path), "--set", item])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    first = result.output.splitlines()[0]
    assert first.startswith(prefix) and fragment in first, first


def test_switching_the_target_on_the_command_line_says_how(tmp_path, model_dir):
    """--set target.params=25K over a file with target.sparsity said params came 'through extends' and to
    clear it, the opposite of what the user meant."""
    path = _write(tmp_path, BASE.replace("{model}", str(model_dir)))
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "target.params=25K"])
    assert result.exit_code == 2, result.output
    assert re.search(r"r\.yaml:4: target: target\.sparsity and target\.params are both set \(--set target\.params=25K; "
                     r"target\.sparsity is in \S*r\.yaml:5\); add --set target\.sparsity=null to use target\.params "
                     r"alone$", result.output.splitlines()[0]), result.output
    fixed = CliRunner().invoke(main, ["validate", str(path), "--set", "target.params=25K", "--set",
                                      "target.sparsity=null"])
    assert fixed.exit_code == 0, fixed.output


def test_overrides_change_the_plan_the_resolved_recipe_and_the_stage_hashes(tmp_path, model_dir):
    from compresso_ops.executor import stage_hashes
    from compresso_ops.recipe.loader import dump_resolved

    path = _write(tmp_path, BASE.replace("{model}", str(model_dir)) + "prune:\n  lora: {target_modules: [q_proj, k_proj]}\n")
    sets = ["target.sparsity=0.5", "prune.lora={r: 4, alpha: 8}", "finetune.enabled=false"]
    edited = _write(tmp_path, BASE.replace("{model}", str(model_dir)).replace("sparsity: 0.3", "sparsity: 0.5")
                    + "prune:\n  lora: {r: 4, alpha: 8, target_modules: [q_proj, k_proj]}\nfinetune:\n  enabled: false\n",
                    "edited.yaml")

    def plan(recipe: Path, *args: str) -> dict:
        result = CliRunner().invoke(main, ["plan", str(recipe), "--json", *args])
        assert result.exit_code == 0, result.output
        return {k: v for k, v in json.loads(result.output).items() if k != "recipe"}  # "recipe" names the file

    assert plan(path, *[arg for item in sets for arg in ("--set", item)]) == plan(edited) != plan(path)

    plain, overridden = load_recipe(path), load_recipe(path, overrides=sets)
    assert (overridden.target.sparsity, overridden.prune.lora.r, overridden.finetune.enabled) == (0.5, 4, False)
    assert overridden.prune.lora.target_modules == ["q_proj", "k_proj"]  # a mapping merges, not replaces
    assert stage_hashes(overridden)["prune"] != stage_hashes(plain)["prune"]
    resolved = dump_resolved(overridden)
    assert resolved.startswith("# --set target.sparsity=0.5\n")
    import yaml

    assert yaml.safe_load(resolved)["prune"]["lora"]["r"] == 4


def test_override_path_is_relative_to_the_working_folder(tmp_path, model_dir, monkeypatch):
    path = _write(tmp_path, BASE.replace("{model}", str(model_dir)))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "other.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path, overrides=["data.path=other.jsonl"])
    assert recipe.data.path == elsewhere / "other.jsonl"


def test_prompt_room_is_bounded_by_characters_without_a_local_tokenizer(tmp_path, model_dir):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    (bare / "tokenizer.model").write_bytes(b"")  # a SentencePiece tokenizer: nothing to count with here
    body = BASE.replace("{model}", str(bare)).replace("{text: none}", "{text: " + "word " * 400 + "}")
    result = CliRunner().invoke(main, ["validate", str(_write(tmp_path, body))])
    assert result.exit_code == 2
    assert "data.max_seq_length: 200 leaves no room" in result.output and "characters" in result.output
    short = BASE.replace("{model}", str(bare)).replace("{text: none}", "{text: " + "word " * 100 + "}")  # 500 chars: may fit
    assert CliRunner().invoke(main, ["validate", str(_write(tmp_path, short))]).exit_code == 0


def test_step_counts_are_whole_numbers_in_the_resolved_recipe(tmp_path, model_dir):
    import yaml

    from compresso_ops.recipe.loader import dump_resolved

    body = BASE.replace("{model}", str(model_dir)) + "prune:\n  schedule: {unit: steps, lora_only: 10.0, ramp: 60, hold: 0}\n"
    resolved = yaml.safe_load(dump_resolved(load_recipe(_write(tmp_path, body))))
    assert [type(v) for v in resolved["prune"]["schedule"].values()] == [str, int, int, int]
    assert type(resolved["finetune"]["duration"]) is int
    half = CliRunner().invoke(main, ["validate", str(_write(tmp_path, body.replace("ramp: 60", "ramp: 60.5")))])
    assert half.exit_code == 2 and "whole number of steps" in half.output


def test_validate_warns_that_no_stage_reads_data_validation_path(tmp_path, model_dir):
    """An older recipe's data.validation_path still loads, but validate says at its line that nothing reads it
    and where held-out text goes instead; a path that no longer exists is then no error."""
    body = BASE.replace("{model}", str(model_dir)).replace("  max_seq_length: 200\n",
                                                           "  max_seq_length: 200\n  validation_path: gone.txt\n")
    result = CliRunner().invoke(main, ["validate", str(_write(tmp_path, body))])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warning) == 1 and "r.yaml:9: data.validation_path: warning: no stage reads" in warning[0]
    assert "eval.perplexity.path" in warning[0]


def test_validate_warns_when_the_multipliers_cannot_follow_a_short_ramp(tmp_path, model_dir):
    """Valid, but predictably poor: at 0.1 a 60-step ramp leaves the gates far below the target
    (benchmarks/gate_lr.py); validate says so at the field's line and still exits 0. auto does not warn."""
    body = BASE.replace("{model}", str(model_dir)) + (
        "prune:\n  schedule: {unit: steps, lora_only: 5, ramp: 60, hold: 10}\n  lr: {lagrangian: 0.1}\n")
    result = CliRunner().invoke(main, ["validate", str(_write(tmp_path, body))])
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warning) == 1 and warning[0].endswith("use auto or a longer ramp")
    assert "r.yaml:12: prune.lr.lagrangian: warning: 0.1 x a 60-step ramp" in warning[0]
    auto = CliRunner().invoke(main, ["validate", str(_write(tmp_path, body.replace("{lagrangian: 0.1}", "{}")))])
    assert auto.exit_code == 0 and "warning" not in auto.output

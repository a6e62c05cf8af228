"""The embedded demo assets: data files that the generator reproduces, and a source model with real quality.

`make demo` relies on recipes/demo/ holding a model that is clearly better than random (so pruning has
something to lose) and data that match the project's own generator (so the README's account of how they
were made stays true).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from types import ModuleType

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from tests.tiny import REPO_ROOT

DEMO = REPO_ROOT / "recipes" / "demo"


def _demo_module(name: str) -> ModuleType:
    """A module of the demo's own folder (not part of the package), imported as its build script sees it."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEMO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


demo_corpus = _demo_module("demo_corpus")


@pytest.fixture(scope="module")
def build() -> ModuleType:
    """The build script as a module: its seeds, sizes and metric functions."""
    return _demo_module("build_demo_model")


@pytest.fixture(scope="module")
def loaded():
    """One thread: these forwards are small, and on a shared CPU a second OpenMP thread spinning for its
    partner made this file 10x slower (unless OMP_WAIT_POLICY=PASSIVE)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(DEMO / "model", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "model", local_files_only=True)
    yield model, tokenizer
    torch.set_num_threads(threads)


def test_generator_is_deterministic_and_seeds_differ():
    assert demo_corpus.instruction_rows(40, 7) == demo_corpus.instruction_rows(40, 7)
    assert demo_corpus.instruction_rows(40, 7) != demo_corpus.instruction_rows(40, 8)
    assert demo_corpus.dev_text(20, 7) == demo_corpus.dev_text(20, 7)


def test_committed_data_files_are_the_generators_output(build):
    rows = demo_corpus.instruction_rows(build.TRAIN_ROWS, build.TRAIN_ROWS_SEED)
    assert (DEMO / "train.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in rows)
    assert (DEMO / "dev.txt").read_text() == demo_corpus.dev_text(build.DEV_DOCS, build.DEV_SEED)
    quiz = demo_corpus.multiple_choice_rows(build.EVAL_ROWS, build.EVAL_SEED)
    assert (DEMO / "eval_mc.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in quiz)
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total < 12 * 2**20, "the demo folder must stay small enough to embed"


def test_quiz_answers_are_derivable():
    for row in demo_corpus.multiple_choice_rows(200, 11):
        choices, answer = row["choices"], row["answer"]
        assert len(choices) == 4 and len(set(choices)) == 4 and 0 <= answer < 4
        question = row["question"]
        if question.count(".") >= 4:  # a story precedes the question: the right choice is stated in it
            story = question.rsplit(".", 1)[0]
            assert re.search(rf"\b{re.escape(choices[answer])}\b", story)
        if m := re.fullmatch(r"What is (\w+) plus (\w+)\?", question):
            total = demo_corpus.NUMBERS.index(m[1]) + demo_corpus.NUMBERS.index(m[2])
            assert choices[answer] == demo_corpus.NUMBERS[total]


def test_model_is_a_small_gqa_llama_that_loads_offline(loaded):
    model, tokenizer = loaded
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    assert (DEMO / "model" / "model.safetensors").stat().st_size < 10 * 2**20
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id == cfg.bos_token_id
    assert tokenizer.eos_token_id == cfg.eos_token_id
    text = "Pruning removes parameters: ünïcode and 42 % still encode."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_greedy_generation_continues_the_story_it_was_given(loaded, build):
    model, tokenizer = loaded
    story = "Once upon a time, there was a little dog named Tom. Tom had a blue kite."
    text = build.generate(model, tokenizer, story, new_tokens=32)
    assert re.search(r"\bTom\b", text) and re.search(r"\bkite\b", text)  # copies its characters and things
    prompt = demo_corpus.ALPACA_NO_INPUT.format(instruction="Write the plural of the word.")
    assert "### Instruction" not in build.generate(model, tokenizer, prompt, new_tokens=8)  # answers, not rambles


def test_perplexity_is_far_below_a_random_model(loaded, build):
    model, tokenizer = loaded
    text = (DEMO / "dev.txt").read_text()[:12000]
    trained = build.perplexity(model, tokenizer, text)
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(model.config).eval()
    assert trained < 4.0
    assert build.perplexity(random_model, tokenizer, text) > 50 * trained
    assert math.isfinite(trained)


def test_multiple_choice_accuracy_is_well_above_chance(loaded, build):
    model, tokenizer = loaded
    rows = [json.loads(line) for line in (DEMO / "eval_mc.jsonl").read_text().splitlines()]
    assert build.accuracy(model, tokenizer, rows) > 0.42  # chance is 0.25; 300 rows give a 2.5-point error

"""Training data: prompt + template, response-only loss, text chunking, order, padding, errors; prompts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from compresso_ops.errors import UserError
from compresso_ops.method.prompts import COLLABORATIVE, COLLABORATIVE_EVAL, alpaca_prompt, resolve_prompt
from compresso_ops.recipe.schema import DataSection, PromptSection
from compresso_ops.training.batching import Collator, DataOrder
from compresso_ops.training.data import IGNORE, build_dataset
from tests.tiny import byte_tokenizer

TOK = byte_tokenizer()
ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi!"},  # no input field at all
]


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _decode(ids: list[int]) -> str:
    return TOK.decode(ids)


@pytest.mark.parametrize("layout", ["json", "jsonl"])
def test_alpaca_rows_start_with_prompt_and_train_on_the_response_only(tmp_path, layout):
    text = json.dumps(ROWS) if layout == "json" else "\n".join(json.dumps(r) for r in ROWS) + "\n"
    path = _write(tmp_path, f"d.{layout}", text)
    examples = build_dataset(DataSection(path=path, format="alpaca", max_seq_length=256), TOK, "BE NICE", 256)
    assert len(examples) == 3
    for row, ex in zip(ROWS, examples, strict=True):
        assert ex.input_ids[0] == TOK.bos_token_id
        labelled = [t for t in ex.labels if t != IGNORE]
        assert _decode(labelled) == row["output"] + "</s>"  # loss on the response and the closing EOS only
        n_prompt = ex.labels.index(labelled[0])
        assert all(t == IGNORE for t in ex.labels[:n_prompt])
        context = _decode(ex.input_ids[1:n_prompt])
        assert context == "BE NICE\n\n" + alpaca_prompt(row["instruction"], row.get("input", ""))
    assert "### Input:\n2 and 3" in _decode(examples[1].input_ids) and "### Input" not in _decode(examples[0].input_ids)


def test_long_examples_are_cut_and_fully_cut_responses_dropped(tmp_path):
    rows = [{"instruction": "x" * 10, "output": "y" * 100}, {"instruction": "x" * 300, "output": "y"}]
    path = _write(tmp_path, "d.json", json.dumps(rows))
    examples = build_dataset(DataSection(path=path, max_seq_length=200), TOK, "", 256)
    assert len(examples) == 1 and len(examples[0].input_ids) == 200 == len(examples[0].labels)
    assert examples[0].labels[-1] == ord("y")


def test_max_samples(tmp_path):
    path = _write(tmp_path, "d.json", json.dumps(ROWS))
    examples = build_dataset(DataSection(path=path, max_seq_length=256, max_samples=2), TOK, "", 256)
    assert len(examples) == 2


def test_plain_text_is_chunked_with_the_prompt_in_front(tmp_path):
    body = "".join(f"Story {i}. The cat sat.\n\n" for i in range(40))
    path = _write(tmp_path, "t.txt", body)
    examples = build_dataset(DataSection(path=path, format="text", max_seq_length=64), TOK, "P:", 256)
    head = [TOK.bos_token_id] + TOK("P:\n\n", add_special_tokens=False)["input_ids"]
    for ex in examples:
        assert len(ex.input_ids) <= 64 and ex.input_ids[: len(head)] == head
        assert ex.labels[: len(head)] == [IGNORE] * len(head) and ex.labels[len(head):] == ex.input_ids[len(head):]
    text = [t for ex in examples for t in ex.input_ids[len(head):]]
    assert _decode(text) == body + "</s>"  # every byte once, in order, ending the document
    few = build_dataset(DataSection(path=path, format="text", max_seq_length=64, max_samples=3), TOK, "P:", 256)
    assert [e.input_ids for e in few] == [e.input_ids for e in examples[:3]]


def test_text_rows_of_a_jsonl_file_are_separate_documents(tmp_path):
    path = _write(tmp_path, "c.jsonl", '{"text": "first doc"}\n{"text": "second doc"}\n')
    (ex,) = build_dataset(DataSection(path=path, format="text", max_seq_length=64), TOK, "", 256)
    assert _decode(ex.input_ids[1:]) == "first doc</s>second doc</s>"


@pytest.mark.parametrize("content,fmt,message", [
    ("[]", "alpaca", "no training examples"),
    ("", "text", "no training examples"),
    ("   \n\n  \n", "text", "no training examples"),  # whitespace only: nothing to learn from
    (json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a"}]), "alpaca", r"d\.data: row 2: field 'output' is missing"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n', "alpaca", r"line 2: field 'instruction' is not a string"),
    ('{"instruction": "a", "output": "b"}\n{oops\n', "alpaca", r"d\.data:2: not valid JSON"),
    (json.dumps(["just a string"]), "alpaca", "row 1: expected a JSON object"),
])
def test_bad_data_is_a_one_line_user_error(tmp_path, content, fmt, message):
    path = _write(tmp_path, "d.data", content)
    with pytest.raises(UserError, match=message) as info:
        build_dataset(DataSection(path=path, format=fmt, max_seq_length=64), TOK, "", 256)
    assert "\n" not in str(info.value)


def test_rows_without_a_response_token_say_why(tmp_path):
    """The loss is taken on responses only: a file whose every response is cut off, or empty with no EOS to
    learn, has nothing to train on, and the error says which and what to change."""
    path = _write(tmp_path, "d.json", json.dumps([{"instruction": "x" * 100, "output": "y"}] * 3))
    with pytest.raises(UserError, match=r"d\.json: no row has a response token to train on: 3 start with a prompt.*"
                                        r"data\.max_seq_length \(200\).*raise data\.max_seq_length") as info:
        build_dataset(DataSection(path=path, max_seq_length=200), TOK, "", 256)
    assert "\n" not in str(info.value)
    no_eos = PreTrainedTokenizerFast(tokenizer_object=TOK.backend_tokenizer, bos_token="<s>", pad_token="<pad>")
    path = _write(tmp_path, "e.json", json.dumps([{"instruction": "a", "output": ""}] * 2))
    assert len(build_dataset(DataSection(path=path, max_seq_length=200), TOK, "", 256)) == 2  # the EOS is learnt
    with pytest.raises(UserError, match="2 have an empty output and the tokenizer has no EOS token"):
        build_dataset(DataSection(path=path, max_seq_length=200), no_eos, "", 256)


def test_non_utf8_file_is_a_user_error(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(UserError, match="not UTF-8"):
        build_dataset(DataSection(path=path, format="text", max_seq_length=64), TOK, "", 256)


def test_configuration_errors_name_the_field(tmp_path):
    path = _write(tmp_path, "t.txt", "hello")
    with pytest.raises(UserError, match="data.max_seq_length 512 exceeds the model's max_position_embeddings 256"):
        build_dataset(DataSection(path=path, format="text", max_seq_length=512), TOK, "", 256)
    with pytest.raises(UserError, match="leaves no room"):
        build_dataset(DataSection(path=path, format="text", max_seq_length=8), TOK, "a long prompt", 256)
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(DataSection(path=tmp_path / "missing.json"), TOK, "", 256)
    with pytest.raises(UserError, match="data.path is not set"):
        build_dataset(DataSection(), TOK, "", 256)


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(10, seed=3)
    first, second = order.indices(0, 10), order.indices(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert DataOrder(10, seed=3).indices(7, 6) == (first + second)[7:13]  # resumable from any position
    assert DataOrder(10, seed=4).indices(0, 10) != first


def test_collator_pads_right_without_loss_on_padding():
    from compresso_ops.training.data import Example
    batch = Collator(258)([Example([1, 2, 3], [IGNORE, 2, 3]), Example([4], [4])])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 258, 258]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_prompt_resolution():
    default = PromptSection()
    assert resolve_prompt(default, "prune") == COLLABORATIVE == resolve_prompt(default, "finetune")
    assert resolve_prompt(default, "evaluate") == COLLABORATIVE_EVAL
    assert "has compressed" in COLLABORATIVE_EVAL and "is currently compressing" in COLLABORATIVE
    assert resolve_prompt(PromptSection(text="none"), "prune") == ""
    assert resolve_prompt(PromptSection(text="Be brief."), "evaluate") == "Be brief."
    assert resolve_prompt(PromptSection(eval_text="none"), "evaluate") == ""
    assert resolve_prompt(PromptSection(text="none", eval_text="collaborative"), "evaluate") == COLLABORATIVE_EVAL
    assert resolve_prompt(PromptSection(use_in=["prune"]), "finetune") == ""

"""Training examples for the prune and fine-tune stages.

Alpaca rows become `prompt + template + response`, with the loss on the response only (every other token
is labelled -100). Plain text is split into chunks of `max_seq_length` tokens, each starting with the
prompt. The order of examples is a seeded permutation per epoch, computed from (seed, epoch) alone, so a
resumed run needs only the position it stopped at to see the same examples.
"""


from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresso_ops.errors import UserError
from compresso_ops.method.prompts import alpaca_prompt, with_prompt
from compresso_ops.recipe.schema import DataSection

IGNORE = -100


_TOKENIZE_BATCH = 256


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


def build_dataset(data: DataSection, tokenizer: Any, prompt_text: str, max_positions: int) -> list[Example]:
    """Tokenized examples of `data`, each starting with `prompt_text` (may be "")."""
    if data.path is None:
        raise UserError("data.path is not set; point it at an Alpaca JSON/JSONL file or a plain text file")
    path = Path(data.path)
    if not path.is_file():
        raise UserError(f"data.path: {path} does not exist")
    if data.max_seq_length > max_positions:
        raise UserError(f"data.max_seq_length {data.max_seq_length} exceeds the model's max_position_embeddings "
                        f"{max_positions}; lower data.max_seq_length")
    if data.format == "alpaca":
        examples = _alpaca_examples(path, tokenizer, prompt_text, data.max_seq_length)
    else:
        examples = _text_examples(path, tokenizer, prompt_text, data.max_seq_length, data.max_samples)
    if data.max_samples is not None:
        examples = examples[: data.max_samples]
    if not examples:
        raise UserError(f"data.path: {path} yields no training examples; check the file and data.format")
    return examples


def fixed_prefix(data_format: str, prompt: str) -> str:
    """The text every training example of `data_format` starts with before any text of its own (after BOS):
    the room the prompt and the template take in every sequence."""
    if data_format == "alpaca":
        return with_prompt(prompt, alpaca_prompt("", ""))
    return prompt + "\n\n" if prompt else ""


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _bos(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def read_text(path: Path) -> str:
    """A UTF-8 text file; other bytes are a user error naming the file and the offset."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); convert the file to UTF-8") from None


def read_rows(path: Path) -> list[tuple[str, Any]]:
    """JSON rows of a file holding a JSON list or JSON Lines, each with a location for error messages."""
    text = read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [(f"row {i + 1}", row) for i, row in enumerate(whole)]
    if whole is not None and not isinstance(whole, dict):
        raise UserError(f"{path}: expected a JSON list of rows or JSON Lines")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); expected one JSON object per line") from None
    return rows


def _field(path: Path, where: str, row: Any, name: str, required: bool) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
    value = row.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        problem = "is missing" if value is None else "is not a string"
        raise UserError(f"{path}: {where}: field '{name}' {problem}")
    return value


def _alpaca_examples(path: Path, tokenizer: Any, prompt: str, max_len: int) -> list[Example]:
    rows = read_rows(path)
    prefixes, responses = [], []
    for where, row in rows:
        instruction = _field(path, where, row, "instruction", True)
        input_text = _field(path, where, row, "input", False)
        prefixes.append(with_prompt(prompt, alpaca_prompt(instruction, input_text)))
        responses.append(_field(path, where, row, "output", True))
    bos, eos = _bos(tokenizer), _eos(tokenizer)
    examples, empty, cut = [], 0, 0
    for prefix, response in zip(_encode(tokenizer, prefixes), _encode(tokenizer, responses), strict=True):
        prefix, response = bos + prefix, response + eos
        ids = (prefix + response)[:max_len]
        labels = ([IGNORE] * len(prefix) + response)[:max_len]
        if any(t != IGNORE for t in labels):  # a response cut off entirely teaches nothing
            examples.append(Example(ids, labels))
        elif response:
            cut += 1
        else:
            empty += 1
    if rows and not examples:
        raise UserError(_no_response_tokens(path, empty, cut, max_len))
    return examples


def _no_response_tokens(path: Path, empty: int, cut: int, max_len: int) -> str:
    """Why no row of an Alpaca file leaves a token to train on (the loss is taken on responses only)."""
    reasons = []
    if cut:
        reasons.append(f"{cut:,} start with a prompt, template and instruction of data.max_seq_length ({max_len}) "
                       "tokens or more, which cut the response off (raise data.max_seq_length or shorten prompt.text)")
    if empty:
        reasons.append(f"{empty:,} have an empty output and the tokenizer has no EOS token to train on (give the "
                       "rows outputs)")
    return f"data.path: {path}: no row has a response token to train on: {'; '.join(reasons)}"


def _pieces(path: Path) -> list[tuple[str, bool]]:
    """Text pieces in file order, each flagged when a document ends with it (JSON rows are documents;
    a plain file is one document, cut after blank lines so it can be tokenized a batch at a time)."""
    if path.suffix in (".json", ".jsonl"):
        return [(_field(path, where, row, "text", True), True) for where, row in read_rows(path)]
    paragraphs = re.split(r"(?<=\n\n)", read_text(path))
    return [(p, i == len(paragraphs) - 1) for i, p in enumerate(paragraphs)]


def _text_examples(path: Path, tokenizer: Any, prompt: str, max_len: int, max_samples: int | None) -> list[Example]:
    head = _bos(tokenizer) + (_encode(tokenizer, [fixed_prefix("text", prompt)])[0] if prompt else [])
    room = max_len - len(head)
    if room < 1:
        raise UserError(f"data.max_seq_length {max_len} leaves no room for text after the prompt "
                        f"({len(head)} tokens); raise data.max_seq_length or shorten prompt.text")
    needed = None if max_samples is None else max_samples * room  # stop tokenizing once enough text is in
    pieces = [(text, end) for text, end in _pieces(path) if text.strip() or end]
    if not any(text.strip() for text, _ in pieces):  # whitespace alone is no text to learn from
        return []
    stream: list[int] = []
    doc_start, eos = 0, _eos(tokenizer)
    for i in range(0, len(pieces), _TOKENIZE_BATCH):
        batch = pieces[i:i + _TOKENIZE_BATCH]
        for ids, (_, end) in zip(_encode(tokenizer, [t for t, _ in batch]), batch, strict=True):
            stream.extend(ids)
            if end and len(stream) > doc_start:  # close non-empty documents with EOS
                stream.extend(eos)
                doc_start = len(stream)
        if needed is not None and len(stream) >= needed:
            break
    return [Example(head + stream[i:i + room], [IGNORE] * len(head) + stream[i:i + room])
            for i in range(0, len(stream), room)]

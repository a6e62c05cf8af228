"""Build the demo's data files and its source model from nothing but the project's own corpus generator.

    .venv/bin/python recipes/demo/build_demo_model.py     # 10-30 minutes on 2 CPU threads (README.md: measured)

Writes, next to this script:
    train.jsonl      Alpaca rows {instruction, input, output} that `recipes/demo.yaml` prunes and fine-tunes on
    dev.txt          held-out plain text for perplexity
    eval_mc.jsonl    held-out quiz rows {question, choices, answer} (the `multiple_choice` local task format)
    model/           a LlamaForCausalLM (GQA) and its byte-level BPE tokenizer, Hugging Face layout
    README.md        how the model was made and what it scored

Why build a model at all: `make demo` must show pruning losing real quality and fine-tuning winning it back,
offline, on a CPU, with nothing third-party in the repository. A random model has nothing to lose, so this
script trains a small one on `demo_corpus.py` text (beside it) for a fixed number of steps.

Everything is seeded (corpus, tokenizer, initialisation, data order) and the step count is fixed, so a rerun
on the same machine with the same torch version reproduces the files; other CPUs may differ in the last bits
of the weights because matmul kernels differ.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads steal
# the cores the working ones need (measured: 4.8 s per step spinning, 1.8 s passive, under load 4 on 2 cores).
# It must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import demo_corpus  # beside this script
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from compresso_ops.infra.atomic import atomic_dir, write_text
from compresso_ops.method import prompts

HERE = Path(__file__).resolve().parent

# Seeds of the separate draws; different seeds keep dev.txt and eval_mc.jsonl held out from training.
TRAIN_ROWS_SEED, DEV_SEED, EVAL_SEED, STREAM_SEED, TOKENIZER_SEED = 0, 1, 2, 3, 4
TORCH_SEED = 1234
TRAIN_ROWS, DEV_DOCS, EVAL_ROWS, TOKENIZER_DOCS, PROMPT_COPIES = 3000, 300, 300, 20000, 200
VOCAB_SIZE = 1024
SPECIAL = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2

# Training: packed 256-token sequences of the document stream, so the model is used to text that does not
# start at a document boundary (evaluation prepends a prompt; lm-eval adds no BOS).
SEQ_LEN, BATCH, STEPS, WARMUP, PEAK_LR, MIN_LR = 256, 8, 1800, 30, 3e-3, 3e-4
THREADS = 2


def model_config() -> LlamaConfig:
    """GQA with 8 query heads over 4 KV groups and an FFN width that is not a power of two, so every
    pruning structure (KV groups, channels, hidden dims) has something to choose from."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )


def write_data_files() -> None:
    rows = demo_corpus.instruction_rows(TRAIN_ROWS, TRAIN_ROWS_SEED)
    write_text(HERE / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_text(HERE / "dev.txt", demo_corpus.dev_text(DEV_DOCS, DEV_SEED))
    quiz = demo_corpus.multiple_choice_rows(EVAL_ROWS, EVAL_SEED)
    write_text(HERE / "eval_mc.jsonl", "".join(json.dumps(r) + "\n" for r in quiz))


def tokenizer_texts() -> Iterator[str]:
    """Generated documents, plus the project's collaborative prompt texts: a real model's tokenizer knows
    ordinary English words, and without them the prompt would cost about 190 tokens instead of 73,
    crowding the demo's short sequences."""
    stream = demo_corpus.documents(TOKENIZER_SEED)
    for _ in range(TOKENIZER_DOCS):
        yield next(stream)
    for _ in range(PROMPT_COPIES):
        yield from (prompts.COLLABORATIVE, prompts.COLLABORATIVE_EVAL)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text (a user's prompt included) encodes without an unknown token, and loading
    needs neither sentencepiece nor network."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_texts(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=512)


def batches(tokenizer: PreTrainedTokenizerFast) -> Iterator[torch.Tensor]:
    """Endless [BATCH, SEQ_LEN] blocks of the packed stream `<s> doc </s> <s> doc </s> ...`."""
    docs = demo_corpus.documents(STREAM_SEED)
    buffer: list[int] = []
    need = BATCH * SEQ_LEN
    while True:
        while len(buffer) < need:
            encoded = tokenizer([next(docs) for _ in range(64)])["input_ids"]
            for ids in encoded:
                buffer.extend(ids + [tokenizer.eos_token_id])
        yield torch.tensor(buffer[:need]).view(BATCH, SEQ_LEN)
        buffer = buffer[need:]


def learning_rate(step: int, steps: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, steps: int, probe: list[dict],
          log_every: int = 50, probe_every: int = 200) -> list[dict]:
    """AdamW on the packed stream; every `probe_every` steps the log shows quiz accuracy on `probe` rows."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=PEAK_LR, betas=(0.9, 0.95))
    model.train()
    log: list[dict] = []
    start = time.perf_counter()
    for step, ids in zip(range(steps), batches(tokenizer)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            entry = {"step": step, "loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start, 1)}
            if step % probe_every == 0 or step == steps - 1:
                model.eval()
                entry["quiz_accuracy"] = round(accuracy(model, tokenizer, probe), 3)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    return log


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, text: str, window: int = 256) -> float:
    """Perplexity over consecutive, non-overlapping windows of the whole text."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        logits = model(input_ids=chunk[:-1].unsqueeze(0)).logits[0]
        total += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


@torch.no_grad()
def choice_logprobs(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, row: dict) -> list[float]:
    """Log-probability of each choice as the continuation of `Question: ...\\nAnswer:` (lm-eval's `acc`)."""
    context = tokenizer(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
    conts = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"] for c in row["choices"]]
    width = len(context) + max(map(len, conts))
    # One right-padded batch for all choices: causal attention never lets a token see the padding after it.
    ids = torch.tensor([context + c + [tokenizer.pad_token_id] * (width - len(context) - len(c)) for c in conts])
    logprobs = model(input_ids=ids).logits[:, :-1].log_softmax(-1)
    return [sum(logprobs[i, len(context) - 1 + j, t].item() for j, t in enumerate(c)) for i, c in enumerate(conts)]


def accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> float:
    hits = 0
    for row in rows:
        scores = choice_logprobs(model, tokenizer, row)
        hits += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return hits / len(rows)


def generate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, new_tokens: int = 48) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


SAMPLE_PROMPTS = [
    demo_corpus.ALPACA_NO_INPUT.format(instruction="What is three plus four?"),
    demo_corpus.ALPACA_WITH_INPUT.format(
        instruction="Read the story and answer the question.",
        input="Mia is a brave fox. Mia has a green kite. Mia went to the beach with Leo. "
              "The kite was under the rock.\nQuestion: Where was the kite?"),
    "Once upon a time, there was a little cat named Lily.",
]


def readme(stats: dict) -> str:
    samples = "\n\n".join(f"Prompt:\n```\n{p}\n```\nGreedy continuation:\n```\n{g}\n```" for p, g in stats["samples"])
    return f"""# The demo's source model and data

Everything in this folder was written by `build_demo_model.py` from the project's own seeded generator
`compresso_ops/demo_corpus.py` (stories, instructions and quiz questions about a small made-up world);
nothing third-party is embedded. Rebuild it with

    .venv/bin/python recipes/demo/build_demo_model.py

| file | what |
|---|---|
| `train.jsonl` | {TRAIN_ROWS} Alpaca rows (seed {TRAIN_ROWS_SEED}): story continuation, questions about a story, word arithmetic, sorting, capitals, plurals, counting |
| `dev.txt` | {DEV_DOCS} held-out documents (seed {DEV_SEED}) for perplexity |
| `eval_mc.jsonl` | {EVAL_ROWS} held-out quiz rows `{{question, choices, answer}}` (seed {EVAL_SEED}), 4 choices each: chance is 25% |
| `model/` | `LlamaForCausalLM` + byte-level BPE tokenizer ({VOCAB_SIZE} tokens, no sentencepiece) |

## How the model was made

- Architecture: hidden 128, 4 layers, 8 query heads over 4 KV heads (GQA, head_dim 16), FFN 344, untied
  embeddings, {stats['params']:,} parameters, float32.
- Tokenizer: byte-level BPE trained on {TOKENIZER_DOCS} generated documents (seed {TOKENIZER_SEED}) plus
  {PROMPT_COPIES} copies of the collaborative prompt texts in `compresso_ops/prompts.py` (so their words are
  whole tokens, as in a real model's vocabulary; the model never trains on them); it prepends `<s>`.
- Training: {stats['steps']} AdamW steps of {BATCH} x {SEQ_LEN} packed tokens from the endless document stream (seed
  {STREAM_SEED}: stories, `Question:/Answer:` quizzes and Alpaca-template rows), learning rate {PEAK_LR} with
  {WARMUP} warm-up steps and cosine decay to {MIN_LR}, weight decay 0.1, gradient clipping 1.0, torch seed
  {TORCH_SEED}, {THREADS} CPU threads. Final training loss {stats['final_loss']:.3f}; {stats['train_seconds']:.0f} s on
  {stats['machine']} (torch {torch.__version__}).

## What it scores

| model | dev.txt perplexity | eval_mc.jsonl accuracy |
|---|---|---|
| this model | {stats['dev_ppl']:.2f} | {stats['eval_acc']:.1%} |
| same architecture, random init | {stats['random_ppl']:.0f} | {stats['random_acc']:.1%} |

Perplexity is over non-overlapping 256-token windows; accuracy compares the summed log-probability of each
choice after `Question: ...\\nAnswer:`.

## Samples

{samples}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps (the documented model uses the default)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)

    write_data_files()
    tokenizer = train_tokenizer()
    dev = (HERE / "dev.txt").read_text()
    quiz = [json.loads(line) for line in (HERE / "eval_mc.jsonl").read_text().splitlines()]

    torch.manual_seed(TORCH_SEED)
    model = LlamaForCausalLM(model_config()).float()
    model.eval()
    random_ppl, random_acc = perplexity(model, tokenizer, dev), accuracy(model, tokenizer, quiz)
    start = time.perf_counter()
    log = train(model, tokenizer, args.steps, quiz[:60])
    stats = {
        "params": sum(p.numel() for p in model.parameters()), "steps": args.steps, "final_loss": log[-1]["loss"],
        "train_seconds": time.perf_counter() - start, "machine": platform.processor() or platform.machine(),
        "dev_ppl": perplexity(model, tokenizer, dev), "eval_acc": accuracy(model, tokenizer, quiz),
        "random_ppl": random_ppl, "random_acc": random_acc,
        "samples": [(p, generate(model, tokenizer, p)) for p in SAMPLE_PROMPTS],
    }
    print(json.dumps({k: v for k, v in stats.items() if k != "samples"}), flush=True)

    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with atomic_dir(HERE / "model") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    write_text(HERE / "README.md", readme(stats))


if __name__ == "__main__":
    main()

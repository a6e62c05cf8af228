"""Perplexity on a text file (strided windows) and generation speed, plus the versions and hardware they ran on."""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from compresso_ops.errors import StageError, UserError
from compresso_ops.recipe.schema import PerplexitySection, SpeedSection
from compresso_ops.training.data import read_text
from compresso_ops.training.distributed import SINGLE, DistContext


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The perplexity windows over `n_tokens` tokens: (begin, end, lo, hi) when the window reads tokens
    begin..end-1 and scores tokens lo..hi-1 (token t by the logits of position t-1).

    The first window scores all its tokens (but the first); each later window ends `stride` tokens further
    and scores those `stride` new tokens with `window - stride` tokens of context, so every token is scored
    exactly once. With `stride` equal to `window` the windows do not overlap: a window's first token is then
    scored by the previous window's last position, which has the previous window as context. Each window's
    score depends on that window alone, so windows can be scored on different processes.
    """
    spans: list[list[int]] = []
    scored, end = 1, 0
    while scored < n_tokens:
        end = min(n_tokens, window if not spans else end + stride)
        begin = max(0, end - window)
        if scored == begin:  # no overlap: the previous window's last position predicts this window's first
            spans[-1][3] += 1
            scored += 1
        spans.append([begin, end, scored, end])
        scored = end
    return [(b, e, lo, hi) for b, e, lo, hi in spans]


@torch.inference_mode()
def perplexity(model: Any, tok: Any, spec: PerplexitySection, dist: DistContext = SINGLE) -> dict[str, Any]:
    """Sliding-window perplexity (see `windows`); a BOS token (when the tokenizer has one) starts the text,
    as in training.

    Under an active `dist` every rank calls this, scores the windows i with i % world == rank, and gets the
    whole result: each window's negative log-likelihood is summed across ranks (the others add exact zeros)
    and the windows are added up in order, as one process adds them.
    """
    path = Path(spec.path)
    if not path.is_file():
        raise UserError(f"eval.perplexity.path: {path} does not exist; point it at a plain text file")
    ids = tok(read_text(path), add_special_tokens=False)["input_ids"]
    has_bos = tok.bos_token_id is not None
    if has_bos:
        ids = [tok.bos_token_id, *ids]
    if spec.max_tokens is not None:
        ids = ids[: spec.max_tokens + 1]
    if len(ids) < 2:
        raise UserError(f"eval.perplexity.path: {path} has too little text to score")
    device = next(model.parameters()).device
    all_ids = torch.tensor(ids, device=device)
    spans = windows(len(ids), spec.window, spec.stride)
    nll = torch.zeros(len(spans), dtype=torch.float64)
    for i in range(dist.rank, len(spans), dist.world_size):
        begin, end, lo, hi = spans[i]
        logp = torch.log_softmax(model(all_ids[begin:end][None]).logits[0].float(), dim=-1)
        nll[i] = -logp[lo - 1 - begin: hi - 1 - begin].gather(-1, all_ids[lo:hi, None]).sum().item()
    dist.all_reduce_sum_([nll])
    total = sum(nll.tolist())
    tokens = len(ids) - 1
    return {"file": str(path), "window": spec.window, "stride": spec.stride, "tokens_scored": tokens,
            "windows": len(spans), "bos": has_bos, "nll_per_token": total / tokens,
            "perplexity": _exp(total / tokens)}


def _exp(x: float) -> float:
    """e**x, or inf past the float range: a model scoring above ~709 nats per token (logits scaled far
    beyond a trained model's) has no finite perplexity, which the report shows rather than crashing on."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _kv_width(model: Any) -> int:
    """Sum over layers of the K and V projection widths: per-token KV-cache elements (per-layer aware)."""
    return sum(m.out_features for name, m in model.named_modules()
               if name.endswith(("k_proj", "v_proj")) and hasattr(m, "out_features"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A logits processor that only timestamps: generate calls it once per new token, right after that
    token's forward pass, so one generate yields both the prefill time and the decode steps' times."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _synchronize(scores.device)  # the logits come last, on the last GPU when layers are spread
        self.times.append(time.perf_counter())
        return scores


@torch.inference_mode()
def measure_speed(model: Any, spec: SpeedSection) -> dict[str, Any]:
    """Prefill and decode throughput (median of `repeats`) and peak memory at a stated batch and length.

    One greedy `generate` of `new_tokens` tokens (forced with min_new_tokens, KV cache on) per repeat:
    prefill is the time to the first token's logits (the prompt's forward pass), decode the time of the
    remaining new_tokens - 1 cached steps. Peak memory is CUDA's max_memory_allocated on GPU (summed over
    the GPUs a spread model uses); on CPU it is the analytic weights + KV-cache bytes (activations
    excluded), because process RSS on CPU mixes in the allocator's and other libraries' memory.
    """
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    b, p, n = spec.batch_size, spec.prompt_length, spec.new_tokens
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (b, p),
                        generator=torch.Generator().manual_seed(0)).to(device)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True,
                           pad_token_id=pad, eos_token_id=model.config.eos_token_id)

    def run() -> tuple[float, float]:
        clock = _StepClock()
        _synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                             logits_processor=LogitsProcessorList([clock]))
        if out.shape[1] != p + n or len(clock.times) != n:
            raise StageError(f"speed: generate returned {out.shape[1] - p} new tokens, expected {n}")
        return clock.times[0] - start, clock.times[-1] - clock.times[0]

    run()  # warm-up: kernels, allocator, lazy initialisation
    gpus = sorted({q.device.index for q in model.parameters() if q.device.type == "cuda"})
    for gpu in gpus:
        torch.cuda.reset_peak_memory_stats(gpu)
    timings = [run() for _ in range(spec.repeats)]
    prefill_s = statistics.median(t[0] for t in timings)
    decode_s = statistics.median(t[1] for t in timings) if n > 1 else None
    elt = next(model.parameters()).element_size()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    kv = b * (p + n) * _kv_width(model) * elt
    memory = {"weights_bytes": weights, "kv_cache_bytes": kv}
    if device.type == "cuda":
        memory.update(peak_bytes=sum(torch.cuda.max_memory_allocated(gpu) for gpu in gpus),
                      method="cuda_max_memory_allocated")
    else:
        memory.update(peak_bytes=weights + kv, method="weights_plus_kv_cache")
    return {
        "batch_size": b, "prompt_length": p, "new_tokens": n, "repeats": spec.repeats,
        "prefill_s": prefill_s, "prefill_tokens_per_s": b * p / prefill_s,
        "decode_s": decode_s, "decode_tokens_per_s": b * (n - 1) / decode_s if decode_s else None,
        "memory": memory,
    }


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("compresso-ops", "torch", "transformers", "lm_eval", "peft", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def hardware() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}

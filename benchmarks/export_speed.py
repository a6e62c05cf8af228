"""How much of the ideal speed-up do the export formats deliver, and where does decode time go?

A random LLaMA (~370M parameters; `--quick`: ~28M) gets learned-like, non-uniform mask scores at two prunable
sparsities; the prune stage's final-mask selection (`select_final_masks_from_scores`, with the default
`target.multiple_of`, i.e. what `compresso-ops apply` writes for this model) turns them into masks, which are
exported in every mode through the real slice stage (`export_pruned`: written to disk, reloaded, checked) and
timed against the source in the same process. `native-unaligned` is the same selection with
`multiple_of: 1` (odd widths), so `aligned_vs_unaligned` compares equal-size exports.

The ideal speed-up is the ratio of parameters that take part in matmuls: every nn.Linear including lm_head
(the input embedding is a lookup, so it is left out unless tied to lm_head); `ideal_check` counts the same
from the Linear modules' weights and biases plus the norms' scales. fraction_of_ideal = measured speed-up /
ideal speed-up.

Measures (batch 1, fp32, one torch thread by default):
- prefill: one forward of `--prompt-length` tokens without cache;
- decode: the model's forward with its KV cache called directly, one token at a time, greedy; time per token
  after a 16-token prompt. All models decode in lockstep (token t of every model, in a rotating order, before
  token t+1 of any), so a slow spell of the machine hits every model alike;
- decode_generate: the same tokens through `model.generate()` (the user-facing path, including its 16-token
  prompt and generate()'s per-token extras), models one after the other in a rotating order.

Noise: the CPU this runs on may be shared. Every timing is taken on process CPU time (primary: on one thread it
counts the work done and hardly the waiting) and wall time. After `--warmup` untimed rounds, each of `--rounds`
rounds times every model once per measure; the speed-up is computed per round from that round's source and
export times (which cancels drifts slower than a round), and the median over rounds is reported with its
min / max and quartiles.

Where decode time goes (`decode_time_breakdown`): each model's nn.Linear modules called alone on one token
(their weights cold, as in decode) give its matmul time per token, by projection; the rest of the forward
(norms, RoPE, attention over the cache, cache bookkeeping, mask building, Python per module) is the decode
time minus that. `decode_profile_ms_per_token` splits a few decode tokens of every model by aten op under
torch.profiler (the matmuls as they run inside the forward; the profiler's own cost per op lands in
`outside_ops`). `gemv_gb_per_s_by_row_length_*` shows the one-token matmul kernel's cost per weight row. An
`overhead_probe` (same layer count and vocabulary, almost no weights) measures the fixed per-token cost no
pruning removes; decode_fraction_of_ideal_net_of_fixed_overhead leaves it out. `layout` records every
reloaded weight that is not contiguous or not 64-byte aligned.

    python -m benchmarks.export_speed [--quick] [--rounds 7] [--threads 1] [--out benchmarks/results/export_speed.json]
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from compresso_ops.infra import atomic
from compresso_ops.method.masks import Masks, select_final_masks_from_scores
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import export_pruned
from compresso_ops.models.sizes import Alignment, prunable_sparsity

SIZES = {
    # ~370M parameters: 24 layers of d=1024, 16 heads (h=64), f=2816, V=32000, untied
    "full": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "intermediate_size": 2816,
        "vocab_size": 32000,
    },
    # ~28M parameters, small vocabulary so the pruned structures dominate the cost
    "quick": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1408,
        "vocab_size": 4000,
    },
}
SPARSITIES = (0.2, 0.35)
SOURCE = "source"
PROBE = "overhead_probe"
# export name -> (export mode, selection mode, target.multiple_of; None: the prune stage's default)
EXPORTS = {
    "native": ("native", "native", None),
    "uniform": ("uniform", "uniform", None),
    "pad": ("pad", "native", None),
    "native-unaligned": ("native", "native", 1),
}
MEASURES = ("prefill", "decode", "decode_generate")
DECODE_PROMPT = 16


def learned_like_masks(arch: ArchSpec, sparsity: float, seed: int = 0) -> Masks:
    """Masks shaped like a training result: non-uniform, the first and last layers keeping more than the
    middle ones, random indices, a few hidden dims gone. The keep ratios are scaled by bisection so the
    prunable sparsity lands on the target."""
    g = torch.Generator().manual_seed(seed)
    L, G, f, d = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    hidden_keep = d - round(d * sparsity / 8)
    profile = [1.0 + 0.35 * math.cos(math.pi * i / (L - 1)) ** 2 for i in range(L)]

    def build(scale: float) -> Masks:
        heads, ffn = torch.zeros(L, G), torch.zeros(L, f)
        for i in range(L):
            keep = min(1.0, scale * profile[i])
            heads[i, torch.randperm(G, generator=g)[: max(1, round(keep * G))]] = 1
            ffn[i, torch.randperm(f, generator=g)[: max(1, round(keep * f))]] = 1
        hidden = torch.zeros(d)
        hidden[torch.randperm(d, generator=g)[:hidden_keep]] = 1
        return Masks(heads, ffn, hidden)

    lo, hi = 0.05, 1.5
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prunable_sparsity(arch, build(mid).kept()) > sparsity else (lo, mid)
    return build(hi)


def selected_masks(arch: ArchSpec, learned: Masks, mode: str, multiple_of: int | None) -> Masks:
    """The prune stage's final-mask selection on scores that rank the structures `learned` keeps first (ties
    broken by fixed noise), at `learned`'s sparsity and hidden count, in selection `mode` and alignment
    `multiple_of` (None: the default)."""
    g = torch.Generator().manual_seed(1)
    scores = {name: getattr(learned, name) + 0.5 * torch.rand(getattr(learned, name).shape, generator=g)
              for name in ("heads", "ffn", "hidden")}
    return select_final_masks_from_scores(scores, arch, prunable_sparsity(arch, learned.kept()), mode,
                                          ("heads", "ffn", "hidden"), hidden_kept=learned.kept().hidden,
                                          multiple_of=multiple_of)


class PeakRss:
    """Samples this process's resident memory while a block runs (torch allocations are invisible to
    tracemalloc)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRss:  # noqa: PYI034
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
Times = dict[str, float]  # clock -> seconds


def _now() -> Times:
    return {c: clock() for c, clock in CLOCKS.items()}


def _since(t0: Times) -> Times:
    t1 = _now()
    return {c: t1[c] - t0[c] for c in CLOCKS}


def rotated(names: list[str], k: int) -> list[str]:
    """`names` starting at position k: who runs first (or after whom) changes from round to round."""
    k %= len(names)
    return names[k:] + names[:k]


@torch.inference_mode()
def time_prefill(models: dict[str, torch.nn.Module], order: list[str], prompt: torch.Tensor) -> dict[str, Times]:
    """Seconds for one forward of `prompt` without cache, per model."""
    result = {}
    for name in order:
        t0 = _now()
        models[name](prompt, use_cache=False)
        result[name] = _since(t0)
    return result


def start_decode(model: torch.nn.Module, prompt: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """The KV cache (DynamicCache, as generate() uses) after `prompt`, and the greedy next token."""
    cache = DynamicCache(config=model.config)
    return cache, next_token(model, prompt, cache)


def next_token(model: torch.nn.Module, tokens: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """One forward of `tokens` on the cache; the greedy token after them."""
    return model(tokens, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)


@torch.inference_mode()
def time_decode(
    models: dict[str, torch.nn.Module], order: list[str], prompt: torch.Tensor, new_tokens: int
) -> dict[str, Times]:
    """Seconds per greedy token, the model's forward called directly with its KV cache, all models in
    lockstep: token t of every model before token t+1 of any, in an order that rotates per token. The
    prompt's forward is not timed."""
    state = {name: start_decode(models[name], prompt) for name in order}
    spent = {name: dict.fromkeys(CLOCKS, 0.0) for name in order}
    for t in range(new_tokens):
        for name in rotated(order, t):
            cache, token = state[name]
            t0 = _now()
            state[name] = (cache, next_token(models[name], token, cache))
            for c, dt in _since(t0).items():
                spent[name][c] += dt
    return {name: {c: s / new_tokens for c, s in spent[name].items()} for name in order}


@torch.inference_mode()
def time_generate(
    models: dict[str, torch.nn.Module], order: list[str], prompt: torch.Tensor, new_tokens: int
) -> dict[str, Times]:
    """Seconds per new token of a whole greedy `model.generate()` call (its prompt's forward included), per
    model."""
    result = {}
    for name in order:
        t0 = _now()
        out = models[name].generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, use_cache=True, pad_token_id=0)
        spent = _since(t0)
        assert out.shape[1] == prompt.shape[1] + new_tokens
        result[name] = {c: s / new_tokens for c, s in spent.items()}
    return result


def timing_round(models: dict[str, torch.nn.Module], r: int, prompt: torch.Tensor, decode_prompt: torch.Tensor,
                 new_tokens: int) -> dict[str, dict[str, Times]]:
    """One round: measure -> model -> seconds on each clock."""
    order = rotated(list(models), r)
    return {
        "prefill": time_prefill(models, order, prompt),
        "decode": time_decode(models, order, decode_prompt, new_tokens),
        "decode_generate": time_generate(models, order, decode_prompt, new_tokens),
    }


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median with min, max and quartiles."""
    v = sorted(values)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else (v[0], v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "q1": q1, "q3": q3, "max": v[-1]}


def linear_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(projection name, module) for every nn.Linear, in forward order."""
    return [(n.rsplit(".", 1)[-1], m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.inference_mode()
def matmul_times(models: dict[str, torch.nn.Module], reps: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per model and projection: CPU ms per token of its nn.Linear modules called alone on one token (median
    of `reps` passes over all models, so each weight is cold as in decode), parameters and GB/s."""
    per_call: dict[str, list[list[float]]] = {name: [] for name in models}
    for r in range(reps):
        for name in rotated(list(models), r):
            row = []
            for _, module in linear_modules(models[name]):
                x = torch.randn(1, 1, module.in_features)
                t0 = time.process_time()
                module(x)
                row.append(time.process_time() - t0)
            per_call[name].append(row)
    result = {}
    for name, model in models.items():
        by_kind: dict[str, dict[str, float]] = collections.defaultdict(lambda: {"ms": 0.0, "params": 0})
        for i, (kind, module) in enumerate(linear_modules(model)):
            by_kind[kind]["ms"] += 1000 * statistics.median(row[i] for row in per_call[name])
            by_kind[kind]["params"] += module.weight.numel()
        for entry in by_kind.values():
            entry["gb_per_s"] = entry["params"] * 4 / entry["ms"] / 1e6
        result[name] = dict(by_kind)
    return result


@torch.inference_mode()
def gemv_by_row_length(rows: int, lengths: Iterable[int], reps: int = 5) -> dict[str, float]:
    """GB/s of a one-token fp32 matmul (nn.Linear on a [rows, length] weight) by row length, weights cold
    (cycling through >= 128 MB of them): the kernel's cost per row shows as lower GB/s for short rows."""
    result = {}
    for n in lengths:
        weights = [torch.randn(rows, n) for _ in range(max(3, 2**27 // (4 * rows * n) + 1))]
        x = torch.randn(1, 1, n)
        times = []
        for _ in range(reps):
            t0 = time.process_time()
            for w in weights:
                torch.nn.functional.linear(x, w)
            times.append((time.process_time() - t0) / len(weights))
        result[str(n)] = 4 * rows * n / statistics.median(times) / 1e9
    return result


@torch.inference_mode()
def profile_decode(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> dict[str, float]:
    """CPU ms per decode token under torch.profiler, by aten op (self time; ops under 0.25 ms pooled in
    `other_ops`), and `outside_ops`: the CPU time of the loop that no op accounts for (Python between ops,
    plus the profiler's own cost per op)."""
    cache, token = start_decode(model, prompt)
    t0 = time.process_time()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(tokens):
            token = next_token(model, token, cache)
    total = 1000 * (time.process_time() - t0) / tokens
    ops = {e.key: e.self_cpu_time_total / 1000 / tokens for e in prof.key_averages()}
    result = {op: ms for op, ms in sorted(ops.items(), key=lambda kv: -kv[1]) if ms >= 0.25}
    result["other_ops"] = sum(ops.values()) - sum(result.values())
    result["outside_ops"] = total - sum(ops.values())
    result["total"] = total
    return result


def layout(model: torch.nn.Module) -> dict[str, Any]:
    """Weights the matmul kernels would read with a stride or from an address off a 64-byte cache line."""
    params = dict(model.named_parameters())
    return {
        "params_checked": len(params),
        "not_contiguous": [n for n, p in params.items() if not p.is_contiguous()],
        "not_64_byte_aligned": [n for n, p in params.items() if p.data_ptr() % 64],
    }


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: all but the input embedding table (unless it is tied to lm_head)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    return total if tied else total - emb.numel()


def linear_params(model: torch.nn.Module) -> int:
    """The same count from the other side: weights and biases of the nn.Linear modules (lm_head included) plus
    the norms' scales, which are elementwise but counted by matmul_params."""
    norms = sum(p.numel() for n, p in model.named_parameters() if n.endswith("norm.weight"))
    return sum(sum(p.numel() for p in m.parameters()) for _, m in linear_modules(model)) + norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~28M-parameter model instead of ~370M")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (the median over rounds is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (allocations, kernel choice)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time is least disturbed)"
    )
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/export_speed.json (--quick: export_speed-quick.json)")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (the spread needs two)")
    size = "quick" if args.quick else "full"
    out = args.out or Path(__file__).parent / "results" / f"export_speed{'-quick' if args.quick else ''}.json"
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()

    started = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False)
    work = Path(tempfile.mkdtemp(prefix="export_speed."))
    try:
        report = measure(args, size, config, work)
    finally:
        shutil.rmtree(work)
    report["runtime_s"] = time.perf_counter() - started
    atomic.write_json(out, report)
    print(f"runtime {report['runtime_s'] / 60:.1f} min (load average at end "
          f"{', '.join(f'{x:.1f}' for x in report['environment']['load_average_at_end'])})")
    print(f"wrote {out}")


def build_models(size: str, config: LlamaConfig, work: Path) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """The source, every export (written, reloaded, checked) and the overhead probe, with their metadata."""
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(work / SOURCE)
    source = AutoModelForCausalLM.from_pretrained(work / SOURCE, dtype=torch.float32).eval()
    arch = ArchSpec.from_hf_config(source.config)
    models: dict[str, torch.nn.Module] = {SOURCE: source}
    meta: dict[str, dict[str, Any]] = {SOURCE: {}}
    for s in SPARSITIES:
        learned = learned_like_masks(arch, s)
        for export, (mode, selection, multiple_of) in EXPORTS.items():
            name = f"{export}@{s}"
            masks = selected_masks(arch, learned, selection, multiple_of)
            t0 = time.perf_counter()
            manifest = export_pruned(source, None, masks, mode, work / name, source_info={"path": "random"})
            export_s = time.perf_counter() - t0
            models[name] = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32).eval()
            meta[name] = {
                "mode": mode,
                "multiple_of": Alignment.of(arch, multiple_of).as_dict(),
                "target_sparsity": s,
                "prunable_sparsity": manifest["params"]["prunable_sparsity"],
                "class": manifest["model_class"],
                "export_and_check_s": export_s,
                "checks_passed": manifest["checks"]["passed"],
                "max_abs_diff_vs_masked": manifest["checks"]["reloaded_vs_masked_max_abs_diff"],
                "kept_query_heads_per_layer": manifest["kept"]["query_heads_per_layer"],
                "kept_ffn_channels_per_layer": manifest["kept"]["ffn_channels_per_layer"],
                "kept_hidden": manifest["kept"]["hidden_dims"],
            }
            print(f"exported {name}: {manifest['params']['exported']['total']:,} params in {export_s:.1f}s",
                  flush=True)
            gc.collect()
    # Same layer count and vocabulary, almost no weights: its decode time per token is the framework's fixed
    # cost (module calls, cache bookkeeping, mask building), which pruning cannot shrink.
    probe = LlamaConfig(
        **{**SIZES[size], "hidden_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1,
           "intermediate_size": 64},
        head_dim=64,
        tie_word_embeddings=True,
    )
    models[PROBE] = AutoModelForCausalLM.from_config(probe, dtype=torch.float32).eval()
    meta[PROBE] = {}
    for name, model in models.items():
        meta[name] |= {
            "params": sum(p.numel() for p in model.parameters()),
            "matmul_params": matmul_params(model),
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        }
        if name != PROBE:
            meta[name]["ideal_check"] = {"matmul_params_from_linear_modules_and_norms": linear_params(model),
                                         "lm_head_params": model.get_output_embeddings().weight.numel()}
            meta[name]["layout"] = layout(model)
    return models, meta


def ratios(rounds: list[dict[str, dict[str, Times]]], measure: str, name: str, clock: str,
           net_of: str | None = None) -> list[float]:
    """Per round: the source's time over `name`'s (the speed-up), optionally both less the `net_of` model's."""
    def t(r: dict, model: str) -> float:
        return r[measure][model][clock] - (r[measure][net_of][clock] if net_of else 0.0)
    return [t(r, SOURCE) / t(r, name) for r in rounds]


def fractions(rounds: list[dict], name: str, ideal: float) -> dict[str, Any]:
    """Fraction of the ideal speed-up per measure and clock: median over rounds with its spread."""
    entry: dict[str, Any] = {}
    for measure in MEASURES:
        for c in CLOCKS:
            suffix = "" if c == "cpu" else "_wall"
            entry[f"{measure}_fraction_of_ideal{suffix}"] = spread(x / ideal for x in ratios(rounds, measure, name, c))
    entry["decode_fraction_of_ideal_net_of_fixed_overhead"] = spread(
        x / ideal for x in ratios(rounds, "decode", name, "cpu", net_of=PROBE))
    return entry


def breakdown(models: dict[str, torch.nn.Module], rounds: list[dict], reps: int) -> dict[str, Any]:
    """Where decode time goes, CPU ms per token (medians over rounds): the direct forward, generate()'s
    extras on top of it, the matmuls alone by projection, and the rest of the forward."""
    mm = matmul_times(models, reps)
    result = {}
    for name, model in models.items():
        forward = 1000 * statistics.median(r["decode"][name]["cpu"] for r in rounds)
        generate = 1000 * statistics.median(r["decode_generate"][name]["cpu"] for r in rounds)
        matmul = sum(e["ms"] for e in mm[name].values())
        params = sum(e["params"] for e in mm[name].values())
        rows = sum(m.out_features for _, m in linear_modules(model))
        result[name] = {
            "forward_ms_per_token": forward,
            "generate_ms_per_token": generate,
            "generate_extra_ms_per_token": generate - forward,
            "matmul_ms_per_token": matmul,
            "matmul_gb_per_s": params * 4 / matmul / 1e6,
            "matmul_weight_rows": rows,
            "matmul_mean_row_length": params / rows,
            "rest_of_forward_ms_per_token": forward - matmul,
            "matmul_by_projection": mm[name],
        }
    return result


def summary_line(name: str, entry: dict[str, Any]) -> str:
    """One line per export, easy to compare across runs: median [min-max] fraction of ideal, CPU time."""
    def f(key: str) -> str:
        s = entry[key]
        return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"
    return (f"{name:24s} ideal {entry['ideal_speedup']:.3f}  prefill {f('prefill_fraction_of_ideal')}  "
            f"decode {f('decode_fraction_of_ideal')}  generate {f('decode_generate_fraction_of_ideal')}")


def measure(args: argparse.Namespace, size: str, config: LlamaConfig, work: Path) -> dict[str, Any]:
    models, meta = build_models(size, config, work)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_length), generator=g)
    decode_prompt = torch.randint(0, config.vocab_size, (1, DECODE_PROMPT), generator=g)
    for r in range(args.warmup):  # first calls allocate and pick kernels
        timing_round(models, r, prompt, decode_prompt, args.new_tokens)
        print(f"warm-up round {r + 1}/{args.warmup} done", flush=True)
    rounds = []
    with PeakRss() as rss:
        for r in range(args.rounds):
            rounds.append(timing_round(models, r, prompt, decode_prompt, args.new_tokens))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    where = breakdown(models, rounds, reps=max(5, args.rounds))
    profiles = {name: profile_decode(model, decode_prompt, 8) for name, model in models.items()}
    gemv = gemv_by_row_length(config.hidden_size, sorted({128, 256, 512, 640, 768, 960, config.hidden_size,
                                                          config.intermediate_size}))

    results, summary = {}, {}
    src = meta[SOURCE]
    for name in models:
        entry = dict(meta[name])
        for measure_name in MEASURES:
            for c in CLOCKS:
                entry[f"{measure_name}_s_{c}_median"] = statistics.median(r[measure_name][name][c] for r in rounds)
        if name not in (SOURCE, PROBE):
            ideal = src["matmul_params"] / entry["matmul_params"]
            entry["ideal_speedup"] = ideal
            entry["ideal_speedup_total_params"] = src["params"] / entry["params"]
            entry |= fractions(rounds, name, ideal)
            entry["matmul_only_fraction_of_ideal"] = (
                where[SOURCE]["matmul_ms_per_token"] / where[name]["matmul_ms_per_token"] / ideal)
            summary[name] = {k: (round(v["median"], 3) if isinstance(v, dict) else round(v, 3))
                             for k, v in entry.items() if "fraction_of_ideal" in k or k == "ideal_speedup"}
            summary[name] |= {f"{k}_min_max": [round(entry[k]["min"], 3), round(entry[k]["max"], 3)]
                              for k in ("prefill_fraction_of_ideal", "decode_fraction_of_ideal",
                                        "decode_generate_fraction_of_ideal")}
            print(summary_line(name, entry), flush=True)
        results[name] = entry

    aligned_vs_unaligned = {}
    for s in SPARSITIES:
        a, u = results[f"native@{s}"], results[f"native-unaligned@{s}"]
        aligned_vs_unaligned[str(s)] = {
            "multiple_of": {"aligned": a["multiple_of"], "unaligned": u["multiple_of"]},
            "params": {"aligned": a["params"], "unaligned": u["params"]},
            "kept_ffn_channels_per_layer": {"aligned": a["kept_ffn_channels_per_layer"],
                                            "unaligned": u["kept_ffn_channels_per_layer"]},
            "kept_hidden": {"aligned": a["kept_hidden"], "unaligned": u["kept_hidden"]},
            "prefill_speedup_aligned_over_unaligned": u["prefill_s_cpu_median"] / a["prefill_s_cpu_median"],
            "decode_speedup_aligned_over_unaligned": u["decode_s_cpu_median"] / a["decode_s_cpu_median"],
            "matmul_speedup_aligned_over_unaligned": (where[f"native-unaligned@{s}"]["matmul_ms_per_token"]
                                                      / where[f"native@{s}"]["matmul_ms_per_token"]),
        }
    return {
        "benchmark": "export_speed",
        "size": size,
        "model": SIZES[size],
        "prompt_length": args.prompt_length,
        "decode_prompt_length": DECODE_PROMPT,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_at_end": os.getloadavg(),
            "note": "fractions use process CPU time (the *_wall ones wall time): per round, the source's time over "
                    "the export's from the same round; median over rounds with min, quartiles and max",
        },
        "process_peak_rss_mb_while_timed": rss.peak / 2**20,
        "decode_fixed_overhead_ms_per_token": where[PROBE]["forward_ms_per_token"],
        "decode_time_breakdown": where,
        "decode_profile_ms_per_token": profiles,
        f"gemv_gb_per_s_by_row_length_at_{config.hidden_size}_rows": gemv,
        "summary": summary,
        "aligned_vs_unaligned": aligned_vs_unaligned,
        "results": results,
    }


if __name__ == "__main__":
    main()

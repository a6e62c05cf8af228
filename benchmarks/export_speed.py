"""How much of the ideal speed-up do the three export formats deliver?

A random LLaMA (~370M parameters; `--quick`: ~28M) is pruned with learned-like, non-uniform masks at two
prunable sparsities, exported in every mode through the real slice stage (`export_pruned`: written to disk,
reloaded, checked), and timed against the source in the same process: prefill of one prompt and greedy
decode with the KV cache. The ideal speed-up is the ratio of parameters that take part in matmuls (the
input embedding is a lookup, so it is left out); fraction_of_ideal = measured speed-up / ideal speed-up.
Batch-1 decode also pays a fixed cost per token that no pruning removes; a probe model with the same layer
count and vocabulary but almost no weights measures it, and decode_fraction_of_ideal_net_of_fixed_overhead
leaves it out.

Aligned against unaligned widths (`target.multiple_of`): at each sparsity the production final-mask selection
runs twice on the same scores (those of the learned-like masks), once keeping FFN channels and hidden dims in
multiples of 64 and once unaligned, both at the learned-like masks' sparsity, so the two native exports hold
the same parameter count within one aligned unit; `aligned_vs_unaligned` compares their speed.

The CPU this runs on may be shared with other jobs, which makes wall-clock time unreliable. So every timing is
taken on both clocks: process CPU time (primary: on one torch thread, the default, it counts the work done and
hardly the waiting) and wall time; models are timed in interleaved rounds and the best round is kept.

    python -m benchmarks.export_speed [--quick] [--threads 1] [--out benchmarks/results/export_speed.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from compresso_ops.method.masks import Masks, select_final_masks_from_scores
from compresso_ops.models.architecture import ArchSpec
from compresso_ops.models.export import export_pruned
from compresso_ops.models.sizes import prunable_sparsity

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
PROBE = "overhead_probe"
MODES = ("native", "uniform", "pad")
ALIGNMENTS = {"native-aligned": 64, "native-unaligned": 1}  # export name -> target.multiple_of


def learned_like_masks(arch: ArchSpec, sparsity: float, *, uniform: bool, seed: int = 0) -> Masks:
    """Masks shaped like a training result: non-uniform, the first and last layers keeping more than the
    middle ones, random indices, a few hidden dims gone. With `uniform`, every layer keeps the
    same counts (what the prune stage selects for export.mode uniform). The keep ratios are scaled by
    bisection so the prunable sparsity lands on the target."""
    g = torch.Generator().manual_seed(seed)
    L, G, f, d = arch.num_layers, arch.num_kv_heads, arch.intermediate_size, arch.hidden_size
    hidden_keep = d - round(d * sparsity / 8)
    profile = [1.0] * L if uniform else [1.0 + 0.35 * math.cos(math.pi * i / (L - 1)) ** 2 for i in range(L)]

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


def selected_masks(arch: ArchSpec, learned: Masks, multiple_of: int) -> Masks:
    """The prune stage's final-mask selection on scores that rank the structures `learned` keeps first (ties
    broken by fixed noise), at `learned`'s sparsity and hidden count, with FFN channels and hidden dims in
    multiples of `multiple_of`."""
    g = torch.Generator().manual_seed(1)
    scores = {name: getattr(learned, name) + 0.5 * torch.rand(getattr(learned, name).shape, generator=g)
              for name in ("heads", "ffn", "hidden")}
    return select_final_masks_from_scores(scores, arch, prunable_sparsity(arch, learned.kept()), "native",
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


def _now() -> dict[str, float]:
    return {c: clock() for c, clock in CLOCKS.items()}


@torch.inference_mode()
def time_model(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    decode_prompt: torch.Tensor,
    new_tokens: int,
    prefill_repeats: int = 3,
) -> dict[str, float]:
    """Prefill seconds (best of `prefill_repeats`) and greedy decode tokens/s (KV cache), on each clock."""
    result = {f"prefill_s_{c}": math.inf for c in CLOCKS}
    for _ in range(prefill_repeats):
        t0 = _now()
        model(prompt, use_cache=False)
        t1 = _now()
        for c in CLOCKS:
            result[f"prefill_s_{c}"] = min(result[f"prefill_s_{c}"], t1[c] - t0[c])
    t1 = _now()
    out = model.generate(
        decode_prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    t2 = _now()
    assert out.shape[1] == decode_prompt.shape[1] + new_tokens
    for c in CLOCKS:
        result[f"decode_tokens_per_s_{c}"] = new_tokens / (t2[c] - t1[c])
    return result


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matmuls: all but the input embedding table (unless it is tied to lm_head)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    tied = emb is model.get_output_embeddings().weight
    return total if tied else total - emb.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~28M-parameter model instead of ~370M")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (the best is kept)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time is least disturbed)"
    )
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_speed.json")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    torch.set_num_threads(args.threads)
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()

    torch.manual_seed(0)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=1024, tie_word_embeddings=False)
    work = Path(tempfile.mkdtemp(prefix="export_speed."))
    try:
        report = measure(args, size, config, work)
    finally:
        shutil.rmtree(work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")


def measure(args: argparse.Namespace, size: str, config: LlamaConfig, work: Path) -> dict[str, Any]:
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(work / "source")
    source = AutoModelForCausalLM.from_pretrained(work / "source", dtype=torch.float32).eval()
    arch = ArchSpec.from_hf_config(source.config)

    models: dict[str, torch.nn.Module] = {"source": source}
    meta: dict[str, dict[str, Any]] = {
        "source": {
            "params": sum(p.numel() for p in source.parameters()),
            "matmul_params": matmul_params(source),
        }
    }
    exports = []
    for s in SPARSITIES:
        exports += [(f"{mode}@{s}", mode, s, learned_like_masks(arch, s, uniform=mode == "uniform")) for mode in MODES]
        exports += [(f"{name}@{s}", "native", s, selected_masks(arch, learned_like_masks(arch, s, uniform=False), n))
                    for name, n in ALIGNMENTS.items()]
    for name, mode, s, masks in exports:
        t0 = time.perf_counter()
        manifest = export_pruned(source, None, masks, mode, work / name, source_info={"path": "random"})
        export_s = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32).eval()
        models[name] = model
        meta[name] = {
            "mode": mode,
            "target_sparsity": s,
            "prunable_sparsity": manifest["params"]["prunable_sparsity"],
            "params": manifest["params"]["exported"]["total"],
            "matmul_params": matmul_params(model),
            "class": manifest["model_class"],
            "export_and_check_s": export_s,
            "checks_passed": manifest["checks"]["passed"],
            "max_abs_diff_vs_masked": manifest["checks"]["reloaded_vs_masked_max_abs_diff"],
            "kept_query_heads_per_layer": manifest["kept"]["query_heads_per_layer"],
            "kept_ffn_channels_per_layer": manifest["kept"]["ffn_channels_per_layer"],
            "kept_hidden": manifest["kept"]["hidden_dims"],
        }
        print(f"exported {name}: {meta[name]['params']:,} params in {export_s:.1f}s", flush=True)
        gc.collect()

    # Same layer count and vocabulary, almost no weights: its decode time per token is the framework's fixed
    # cost (module calls, cache bookkeeping, generate's loop), which pruning cannot shrink.
    probe = LlamaConfig(
        **{
            **SIZES[size],
            "hidden_size": 64,
            "num_attention_heads": 1,
            "num_key_value_heads": 1,
            "intermediate_size": 64,
        },
        head_dim=64,
        tie_word_embeddings=True,
    )
    models[PROBE] = AutoModelForCausalLM.from_config(probe, dtype=torch.float32).eval()
    meta[PROBE] = {"params": sum(p.numel() for p in models[PROBE].parameters())}

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_length), generator=g)
    decode_prompt = torch.randint(0, config.vocab_size, (1, 16), generator=g)
    for model in models.values():  # warm-up: first calls allocate and pick kernels
        time_model(model, prompt, decode_prompt, 2, prefill_repeats=1)
    runs: dict[str, list[dict]] = {name: [] for name in models}
    peaks: dict[str, int] = {name: 0 for name in models}
    for r in range(args.rounds):
        for name, model in models.items():
            with PeakRss() as rss:
                runs[name].append(time_model(model, prompt, decode_prompt, args.new_tokens))
            peaks[name] = max(peaks[name], rss.peak)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    results = {}
    for name, model in models.items():
        entry = {
            **meta[name],
            "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "process_peak_rss_mb_while_timed": peaks[name] / 2**20,
        }
        for c in CLOCKS:
            prefill, decode = f"prefill_s_{c}", f"decode_tokens_per_s_{c}"
            entry[f"{prefill}_best"] = min(x[prefill] for x in runs[name])
            entry[f"{prefill}_median"] = statistics.median(x[prefill] for x in runs[name])
            entry[f"{decode}_best"] = max(x[decode] for x in runs[name])
            entry[f"{decode}_median"] = statistics.median(x[decode] for x in runs[name])
        results[name] = entry
    overhead = 1 / results[PROBE]["decode_tokens_per_s_cpu_best"]
    base = results["source"]
    for name, entry in results.items():
        if name in ("source", PROBE):
            continue
        ideal = meta["source"]["matmul_params"] / meta[name]["matmul_params"]
        entry["ideal_speedup"] = ideal
        entry["ideal_speedup_total_params"] = meta["source"]["params"] / meta[name]["params"]
        for c in CLOCKS:
            suffix = "" if c == "cpu" else "_wall"
            prefill = base[f"prefill_s_{c}_best"] / entry[f"prefill_s_{c}_best"]
            decode = entry[f"decode_tokens_per_s_{c}_best"] / base[f"decode_tokens_per_s_{c}_best"]
            entry[f"prefill_speedup{suffix}"] = prefill
            entry[f"decode_speedup{suffix}"] = decode
            entry[f"prefill_fraction_of_ideal{suffix}"] = prefill / ideal
            entry[f"decode_fraction_of_ideal{suffix}"] = decode / ideal
        per_token_src = 1 / base["decode_tokens_per_s_cpu_best"]
        net = (per_token_src - overhead) / (1 / entry["decode_tokens_per_s_cpu_best"] - overhead)
        entry["decode_fraction_of_ideal_net_of_fixed_overhead"] = net / ideal

    keys = (
        "ideal_speedup",
        "prefill_fraction_of_ideal",
        "decode_fraction_of_ideal",
        "decode_fraction_of_ideal_net_of_fixed_overhead",
        "prefill_fraction_of_ideal_wall",
        "decode_fraction_of_ideal_wall",
    )
    summary = {
        f"{mode}@{s}": {k: round(results[f"{mode}@{s}"][k], 3) for k in keys}
        for s in SPARSITIES
        for mode in (*MODES, *ALIGNMENTS)
    }
    aligned_vs_unaligned = {}
    for s in SPARSITIES:
        a, u = results[f"native-aligned@{s}"], results[f"native-unaligned@{s}"]
        aligned_vs_unaligned[str(s)] = {
            "params": {"aligned": a["params"], "unaligned": u["params"]},
            "kept_ffn_channels_per_layer": {"aligned": a["kept_ffn_channels_per_layer"],
                                            "unaligned": u["kept_ffn_channels_per_layer"]},
            "kept_hidden": {"aligned": a["kept_hidden"], "unaligned": u["kept_hidden"]},
            "prefill_speedup_aligned_over_unaligned": u["prefill_s_cpu_best"] / a["prefill_s_cpu_best"],
            "decode_speedup_aligned_over_unaligned": a["decode_tokens_per_s_cpu_best"] / u["decode_tokens_per_s_cpu_best"],
        }
    return {
        "benchmark": "export_speed",
        "size": size,
        "model": SIZES[size],
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average_at_end": os.getloadavg(),
            "note": "fractions use process CPU time (robust to other jobs on the machine; load_average_at_end shows them) "
            "(the *_wall ones wall time), best of the interleaved rounds",
        },
        "decode_fixed_overhead_ms_per_token": 1000 * overhead,
        "summary": summary,
        "aligned_vs_unaligned": aligned_vs_unaligned,
        "results": results,
    }


if __name__ == "__main__":
    main()

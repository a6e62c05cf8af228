"""The headline numbers of a pruned model against its source, with their noise: what the report's decision
block and the export folder's model card both state, computed in this one place.

Standard errors are lm-eval's per-task sampling errors (stderr of the mean over the task's examples). The
pruned and the source model answer the same examples, so their scores are positively correlated; this
module has only the two per-model errors and combines them as if independent, which overstates the error of
a difference or a ratio: a delta called "within noise" here may still be real, one outside it is not noise.
"""

from __future__ import annotations

import math
from typing import Any

NOISE_Z = 1.96  # a delta within 1.96 standard errors of zero is called "within noise" (two-sided 95%)

MEMORY_METHODS = {
    "cuda_max_memory_allocated": "peak GPU memory allocated",
    "weights_plus_kv_cache": "weights + KV cache, computed for a CPU run, activations excluded",
}


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def ratio(a: Any, b: Any) -> float | None:
    """a / b when both are finite numbers and b is not zero."""
    return a / b if _finite(a, b) and b else None


def delta_stderr(pruned_se: Any, source_se: Any) -> float | None:
    """Standard error of pruned - source (independent errors: see the module docstring)."""
    return math.hypot(pruned_se, source_se) if _finite(pruned_se, source_se) else None


def within_noise(delta: Any, stderr: Any) -> bool | None:
    """Whether |delta| is within NOISE_Z standard errors; None when either is unknown."""
    return abs(delta) <= NOISE_Z * stderr if _finite(delta, stderr) else None


def retention_stderr(pruned: Any, source: Any, pruned_se: Any, source_se: Any) -> float | None:
    """Standard error of pruned / source by the delta method: sqrt(se_p^2 + r^2 se_s^2) / source."""
    r = ratio(pruned, source)
    if r is None or not _finite(pruned_se, source_se):
        return None
    return math.hypot(pruned_se, r * source_se) / abs(source)


def mean_retention(tasks_pruned: dict[str, Any], tasks_source: dict[str, Any]) -> dict[str, Any] | None:
    """Mean over the tasks both models have of pruned/source of the primary metric, and its standard error
    (None when a task has no stderr). Each task weighs the same, as the paper's averages do."""
    names = [n for n in tasks_pruned if n in tasks_source
             and ratio(tasks_pruned[n].get("value"), tasks_source[n].get("value")) is not None]
    if not names:
        return None
    per_task = [ratio(tasks_pruned[n]["value"], tasks_source[n]["value"]) for n in names]
    errors = [retention_stderr(tasks_pruned[n]["value"], tasks_source[n]["value"],
                               tasks_pruned[n].get("stderr"), tasks_source[n].get("stderr")) for n in names]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(names) if all(e is not None for e in errors) else None
    return {"mean": sum(per_task) / len(names), "stderr": stderr, "tasks": names}


def headline(pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> dict[str, Any]:
    """Retention, perplexity ratio, speed-ups and deployed memory of the pruned model vs the source, from two
    evaluate-stage result files (either may be None: the numbers that need it are None)."""
    p, s = pruned or {}, source or {}
    p_speed, s_speed = p.get("speed") or {}, s.get("speed") or {}
    p_mem, s_mem = p_speed.get("memory") or {}, s_speed.get("memory") or {}
    method = p_mem.get("method") or s_mem.get("method")
    return {
        "retention": mean_retention(p.get("tasks") or {}, s.get("tasks") or {}),
        "perplexity": {"pruned": (p.get("perplexity") or {}).get("perplexity"),
                       "source": (s.get("perplexity") or {}).get("perplexity")},
        "ppl_ratio": ratio((p.get("perplexity") or {}).get("perplexity"),
                           (s.get("perplexity") or {}).get("perplexity")),
        "prefill_speedup": ratio(p_speed.get("prefill_tokens_per_s"), s_speed.get("prefill_tokens_per_s")),
        "decode_speedup": ratio(p_speed.get("decode_tokens_per_s"), s_speed.get("decode_tokens_per_s")),
        "memory": {"pruned": p_mem.get("peak_bytes"), "source": s_mem.get("peak_bytes"),
                   "ratio": ratio(p_mem.get("peak_bytes"), s_mem.get("peak_bytes")),
                   "method": MEMORY_METHODS.get(method, method)},
    }

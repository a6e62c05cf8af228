"""The model card (README.md) of an export folder: what someone who receives only the folder needs.

A Hugging Face model card: a YAML header the Hub and tooling read (base_model, library_name, pipeline_tag,
tags), then what was pruned and the sizes, how to load the folder in its export mode, the recipe hash, and
the evaluation summary. The export writes the card without evaluation; the evaluate stage rewrites it with
the results. Everything comes from the folder's compresso_manifest.json and the evaluate results files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from compresso_ops.evaluation.summary import delta_stderr, headline, within_noise
from compresso_ops.infra import atomic
from compresso_ops.infra.units import human_bytes, spoken_list

CARD_FILE = "README.md"
TAGS = ["compresso-ops", "pruned", "structured-pruning"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

_LOAD = {
    "native": """This folder holds a `CompressoLlamaForCausalLM` (`model_type: compresso_llama`): every layer keeps its
own number of heads and FFN channels, which no stock class holds. Load it with compresso-ops installed:

```python
import compresso_ops.models.modeling_compresso  # registers compresso_llama with the Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

or without it, from the modeling code this folder carries (`modeling_compresso.py`, `auto_map`):
`AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)`.""",
    "uniform": """This folder holds a stock `{cls}` with the same number of heads and FFN channels in every layer. Load
it like any checkpoint (vLLM and other stock tooling read it too):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```""",
}
_LOAD["pad"] = _LOAD["uniform"].replace(
    "with the same number of heads and FFN channels in every layer",
    "with every layer zero-padded to the largest layer's heads and FFN channels (exact; smaller savings)")


def base_model(source_path: str | None) -> str | None:
    """The Hub id the model was pruned from; None for a local folder (the Hub's base_model must be an id)."""
    if not source_path or Path(source_path).is_absolute() or Path(source_path).exists():
        return None
    return source_path if _HUB_ID.match(source_path) else None


# How each recipe method chose what to remove, as the card says it (`method` in the manifest; older
# manifests do not record it and the card then names no method).
METHODS = {
    "compresso": "the Compresso method (LoRA + L0 gates trained to the size target)",
    "magnitude": "a one-shot magnitude ranking (LLM-Pruner's L2 criterion, no training)",
    "activation": "a one-shot activation ranking (what each structure adds to the residual stream on calibration "
                  "text, no training)",
    "random": "a random ranking (a baseline)",
}


def _with_method(manifest: dict[str, Any]) -> str:
    """' with <how the method pruned>', or '' when the manifest does not say."""
    how = METHODS.get(manifest.get("method") or "")
    return f" with {how}" if how else ""


def _header(manifest: dict[str, Any]) -> str:
    meta: dict[str, Any] = {}
    if (base := base_model(manifest.get("source", {}).get("path"))) is not None:
        meta["base_model"] = base
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _sizes(manifest: dict[str, Any]) -> list[str]:
    params = manifest.get("params", {})
    src, out = params.get("source", {}), params.get("exported", {})
    kept, shape = manifest.get("kept", {}), manifest.get("source", {}).get("shape") or {}
    layers = shape.get("layers")

    def total(key: str) -> int | None:
        return sum(kept[key]) if isinstance(kept.get(key), list) else None

    def full(per_layer: Any) -> Any:
        return per_layer * layers if isinstance(per_layer, int) and isinstance(layers, int) else None

    hidden = ("hidden dims", shape.get("hidden_dims"), kept.get("hidden_dims"))
    heads = ("query heads (all layers)", full(shape.get("query_heads_per_layer")), total("query_heads_per_layer"))
    ffn = ("FFN channels (all layers)", full(shape.get("ffn_channels_per_layer")), total("ffn_channels_per_layer"))
    rows = [("parameters", src.get("total"), out.get("total")),
            ("prunable parameters (attention and FFN projections)", src.get("prunable"), out.get("prunable")),
            hidden, heads, ffn]
    table = ["| | source | this model |", "|---|---:|---:|"]
    table += [f"| {label} | {_int(a)} | {_int(b)} |" for label, a, b in rows if b is not None]
    # what the counts show went; an older manifest without counts names all three
    removed = [name for name, (_, a, b) in (("attention heads", heads), ("FFN channels", ffn), ("hidden dims", hidden))
               if a is None or b is None or b < a] or ["nothing"]
    sparsity = params.get("prunable_sparsity")
    lines = ["## What was pruned", "",
             f"Structured pruning{_with_method(manifest)} removed {spoken_list(removed)}; export mode "
             f"`{manifest.get('mode')}`, weights in {manifest.get('dtype')}"
             + (f" ({human_bytes(manifest['weights_bytes'])})" if manifest.get("weights_bytes") else "") + ".",
             "", *table]
    if isinstance(sparsity, (int, float)):
        lines += ["", f"Prunable sparsity: {sparsity:.1%} of the attention and FFN projection parameters removed."]
    if ft := manifest.get("finetune"):
        done = (f"every weight was trained for {ft.get('steps')} steps" if ft.get("train") == "full" else
                f"LoRA fine-tuning ran {ft.get('steps')} steps and was merged into the weights")
        lines += ["", f"After pruning, {done}."]
    return lines


def _int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else "—"


def _evaluation(pruned: dict[str, Any] | None, source: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if pruned is None:
        return lines + ["Not evaluated yet: the evaluate stage of compresso-ops adds the results here."]
    prompt = (pruned.get("prompt") or {}).get("text")
    if prompt:
        lines += [("Evaluated with this prompt before every input (the model was pruned and tuned with it; use it at "
                  "inference too):"), "", "> " + " ".join(prompt.split()), ""]
    p_tasks, s_tasks = pruned.get("tasks") or {}, (source or {}).get("tasks") or {}
    if p_tasks:
        lines += ["| task | metric | source | this model | Δ (points) ± SE |", "|---|---|---:|---:|---:|"]
        for name, p in p_tasks.items():
            s = s_tasks.get(name, {})
            delta = p["value"] - s["value"] if "value" in s else None
            se = delta_stderr(p.get("stderr"), s.get("stderr"))
            noise = " (within noise)" if within_noise(delta, se) else ""
            lines.append(f"| {name} | {p.get('metric')} | {_pct(s.get('value'))} | {_pct(p['value'])} | "
                         + (f"{delta * 100:+.2f} ± {se * 100:.2f}{noise}" if delta is not None and se is not None
                            else "—") + " |")
        lines.append("")
    head = headline(pruned, source)
    facts = []
    if (ret := head["retention"]) is not None:
        se = f" ± {ret['stderr']:.1%}" if ret["stderr"] is not None else ""
        facts.append(f"mean retention {ret['mean']:.1%}{se} over {len(ret['tasks'])} task(s)")
    ppl = head["perplexity"]
    if ppl["pruned"] is not None:
        facts.append(f"perplexity {ppl['pruned']:.3f}" + (f" (source {ppl['source']:.3f}, ×{head['ppl_ratio']:.2f})"
                                                          if head["ppl_ratio"] is not None else ""))
    if head["decode_speedup"] is not None:
        facts.append(f"decode speed-up ×{head['decode_speedup']:.2f}")
    mem = head["memory"]
    if mem["pruned"] is not None:
        facts.append(f"deployed memory {human_bytes(mem['pruned'])} ({mem['method']})")
    if facts:
        lines.append("Summary: " + "; ".join(facts) + ".")
    if source is None:
        lines.append("The source model was not evaluated (eval.compare_source is false).")
    return lines


def _pct(v: Any) -> str:
    return f"{v * 100:.2f}" if isinstance(v, (int, float)) else "—"


def render_card(manifest: dict[str, Any], pruned: dict[str, Any] | None = None,
                source: dict[str, Any] | None = None) -> str:
    """The README.md of an export folder with `manifest`; `pruned`/`source` are evaluate-stage results."""
    source_path = manifest.get("source", {}).get("path") or "an unnamed model"
    mode = manifest.get("mode", "native")
    name = manifest.get("recipe_name") or "pruned model"
    body = [f"# {name}", "",
            f"A structurally pruned version of `{source_path}`, made by compresso-ops{_with_method(manifest)}.", "",
            *_sizes(manifest), "", "## How to load", "",
            _LOAD.get(mode, _LOAD["uniform"]).format(cls=manifest.get("model_class", "AutoModelForCausalLM")), "",
            *_evaluation(pruned, source), "", "## Provenance", "",
            (f"- recipe hash `{manifest.get('recipe_hash') or '—'}` (the run folder's recipe.resolved.yaml has the "
            "full recipe)"),
            (f"- export checks: {'passed' if (manifest.get('checks') or {}).get('passed') else 'not passed'} (reloaded "
            "logits equal the pruned model's; parameter count equals the size formulas'); details in "
            "compresso_manifest.json")]
    return _header(manifest) + "\n" + "\n".join(body) + "\n"


def write_card(folder: str | Path, manifest: dict[str, Any], pruned: dict[str, Any] | None = None,
               source: dict[str, Any] | None = None) -> None:
    """(Re)write `folder`/README.md for an export with `manifest` and, when given, evaluation results
    (atomically: a reader sees the old card or the new one)."""
    atomic.write_text(Path(folder) / CARD_FILE, render_card(manifest, pruned, source))

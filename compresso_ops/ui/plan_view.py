"""Rich tables for a plan (the human view of `compresso-ops plan`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from compresso_ops.infra.units import human_bytes, human_seconds


def _parallel_label(entry: dict[str, Any]) -> str:
    """How a stage uses several GPUs, where the plan says (the evaluate stage)."""
    if entry.get("parallel") == "layers":
        return f" (layers over {entry['gpus']} GPUs)"
    if entry.get("parallel") == "data":
        return f" (data-parallel over {entry['processes']} processes)"
    return ""


def render_plan(plan: dict[str, Any], console: Console) -> None:
    p, hw = plan["params"], plan["hardware"]
    console.print(f"[bold]Plan for {plan['recipe']['name']}[/] (method {plan['recipe']['method']}, "
                  f"{hw['nodes']} node(s) x {hw['gpus_per_node']} {hw['gpu']}, strategy {hw['strategy']})")

    sizes = Table(title="Parameters", title_justify="left")
    for col in ("", "total params", "prunable params", "embeddings", "prunable sparsity",
                f"checkpoint ({p['export_dtype']})"):
        sizes.add_column(col, justify="right" if col else "left")
    src, tgt = p["source"], p["target"]
    sizes.add_row("source", f"{src['total']:,}", f"{src['prunable']:,}", f"{src['embeddings']:,}", "0", "")
    sizes.add_row("target", f"{tgt['total']:,}", f"{tgt['prunable']:,}", "", f"{tgt['prunable_sparsity']:.4f}", "")
    for mode, entry in p["export"].items():
        kind = "exact" if entry["exact"] else "bound"
        sizes.add_row(f"export {mode} ({kind})", f"{entry['params']:,}", "", "", "",
                      human_bytes(entry["checkpoint_bytes"]))
    console.print(sizes)
    align = p["alignment"]
    if align["ffn_channels"] > 1 or align["hidden_dims"] > 1:
        console.print(f"Kept FFN channels in multiples of {align['ffn_channels']}, hidden dims of "
                      f"{align['hidden_dims']} (target.multiple_of)")

    t = plan["trainable"]
    trained = f"every weight {t['weights']:,}" if t["weights"] else f"LoRA {t['lora']:,}"
    console.print(f"Trainable while pruning: {trained} + gates {t['gates']:,} + lambdas "
                  f"{t['lagrangian']} = {t['total']:,}")

    limit = hw["per_gpu_memory_bytes"]
    on_gpu = limit is not None  # a CPU run has no device limit: its RAM is in the host table (render_host)
    title = (f"Memory per GPU ({plan['memory']['compute_dtype']} base, {human_bytes(limit)} available)" if on_gpu
             else f"Memory per process ({plan['memory']['compute_dtype']}, host RAM on cpu)")
    mem = Table(title=title, title_justify="left")
    for col in ("stage", "per GPU" if on_gpu else "per process", *(("fits",) if on_gpu else ()), "breakdown",
                *(("to make it fit",) if on_gpu else ())):
        mem.add_column(col)
    for stage, entry in plan["memory"]["stages"].items():
        breakdown = ", ".join(f"{k.replace('_', ' ')} {human_bytes(v)}" for k, v in entry["breakdown"].items()
                              if not k.startswith("activations_") and (on_gpu or k != "framework_overhead"))
        label = stage + _parallel_label(entry)
        fits = ("[green]yes[/]" if entry["fits"] else "[red]no[/]",) if on_gpu else ()
        mem.add_row(label, human_bytes(entry["per_gpu_bytes"]), *fits, breakdown or entry.get("note", ""),
                    *((entry.get("suggestion") or "",) if on_gpu else ()))
    console.print(mem)
    console.print(f"[dim]Evaluate assumption: {plan['memory']['stages']['evaluate']['assumption']}[/]")
    dep = plan["memory"]["deploy"]
    console.print(f"Deployed model: weights {human_bytes(dep['weights_bytes'])} + KV cache "
                  f"{human_bytes(dep['kv_cache_bytes'])} at batch {dep['batch']} x {dep['seq_len']} tokens")
    render_host(plan["memory"]["host"], console)

    steps = plan["steps"]
    st = Table(title=f"Steps ({steps['examples'] if steps['examples'] is not None else '?'} examples; "
                     f"{steps['examples_counted_by']})", title_justify="left")
    for col in ("stage", "global batch", "steps/epoch", "phases", "total steps", "est. time"):
        st.add_column(col)
    for stage in ("prune", "finetune"):
        s = steps[stage]
        phases = ", ".join(f"{k.replace('_', ' ')} {v if v is not None else '?'}" for k, v in s["phases"].items())
        one_shot = s.get("note")  # a one-shot prune stage: no epochs, the note says what it runs
        st.add_row(stage, str(s["global_batch"]), "—" if one_shot else str(s["steps_per_epoch"] or "?"),
                   "; ".join(x for x in (phases, one_shot) if x),
                   str(s["total"] if s["total"] is not None else "?"), human_seconds(s["est_seconds"]))
    console.print(st)
    console.print(f"[dim]Time assumption: {steps['assumption']}[/]")


def render_host(host: dict[str, Any], console: Console) -> None:
    """Host RAM per node at loading, slice and evaluate, against the node's RAM."""
    ram = host["node_ram_bytes"]
    table = Table(title=f"Host memory per node ({human_bytes(ram)} RAM, {host['node_ram_from']})",
                  title_justify="left")
    for col in ("peak", "per node", "fits"):
        table.add_column(col)
    label = {"load": "loading", "slice": "slice (streamed)" if host["slice_streams"] else "slice (in memory)"}
    for peak, need in host["peaks"].items():
        fits = "?" if ram is None else "[green]yes[/]" if host["fits"][peak] else "[red]no[/]"
        table.add_row(label.get(peak, peak), human_bytes(need), fits)
    console.print(table)
    console.print(f"[dim]Host assumption: {host['note']}[/]")

"""The shared-prefix forward: a micro-batch whose rows start alike computes that start once, and the loss and
every gradient (LoRA, full weights, gates) equal the plain forward's, for every supported layout, with
gradient checkpointing on or off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compresso_ops.method.gates import GateSet
from compresso_ops.method.hooks import GateHooks
from compresso_ops.method.masks import Masks
from compresso_ops.models.adapter import ModelAdapter
from compresso_ops.models.export import export_pruned, load_exact
from compresso_ops.recipe.schema import LoraSection
from compresso_ops.training.batching import Collator
from compresso_ops.training.data import IGNORE, Example
from compresso_ops.training.loop import lm_loss_sum
from compresso_ops.training.precision import Precision
from compresso_ops.training.setup import add_lora, enable_gradient_checkpointing
from compresso_ops.training.shared_prefix import MIN_SHARED_PREFIX, shared_prefix_length
from tests.tiny import tiny_model

CPU = Precision(torch.device("cpu"), torch.float32)
PAD = 258
LAYOUTS = ["llama", "qwen2", "qwen3", "mistral", "native"]
STRUCTURES = ("heads", "ffn", "hidden")


def _batch(rows: list[list[int]], unlabelled: int = 12, pad: int = PAD) -> dict[str, torch.Tensor]:
    """Right-padded rows as the Collator makes them; the first `unlabelled` tokens of each carry no loss
    (a prompt), the rest are labelled with themselves."""
    return Collator(pad)([Example(r, [IGNORE] * unlabelled + r[unlabelled:]) for r in rows])


def _rows(prefix: int, tails: list[int], seed: int = 0) -> list[list[int]]:
    """Rows of `prefix` shared tokens, then a tail of each given length (the byte tokenizer's ids)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 256, (prefix,), generator=g).tolist()
    return [head + torch.randint(0, 256, (n,), generator=g).tolist() for n in tails]


def _plain_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: Precision = CPU) -> torch.Tensor:
    """The reference: one forward over the whole micro-batch, next-token cross-entropy summed."""
    with precision.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _source(layout: str, tmp_path) -> torch.nn.Module:
    """A tiny model of `layout`; "native" is the pruned export class, with layer 0's attention removed (so its
    cache slots are not its layer numbers)."""
    if layout != "native":
        return tiny_model(layout)
    model = tiny_model("llama", layers=3, hidden=32, heads=4, ffn=48)
    g = torch.Generator().manual_seed(0)
    heads = torch.ones(3, 2)
    heads[0] = 0
    masks = Masks(heads, (torch.rand(3, 48, generator=g) < 0.6).float(), torch.ones(32))
    export_pruned(model, None, masks, "native", tmp_path / "native",
                  source_info={"path": "tiny", "revision": None, "dtype": "float32"})
    return load_exact(tmp_path / "native", torch.float32)


def _trainable(layout: str, train: str, checkpointing: bool, tmp_path, dropout: float = 0.0) -> torch.nn.Module:
    """The model as `prepare_for_training` leaves it: checkpointing, then LoRA (with B made non-zero, so
    every LoRA matrix gets a gradient) or every weight trainable."""
    model = _source(layout, tmp_path).train()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if checkpointing:
        enable_gradient_checkpointing(model)
    if train == "full":
        return model.requires_grad_(True)
    lora = LoraSection(r=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = add_lora(model, lora, "lora.target_modules")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _loss_and_grads(loss_fn, model, batch, gates: GateSet | None, hooks: GateHooks | None, seed: int = 0):
    """One micro-batch as a training step runs it: a gate sample set once (seeded), loss, backward."""
    model.zero_grad(set_to_none=True)
    if gates is not None:
        gates.zero_grad(set_to_none=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if hooks is not None:
            hooks.set(gates.sample())
        loss = loss_fn(model, batch)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if gates is not None:
        grads.update({f"gate.{n}": p.grad.clone() for n, p in gates.named_parameters()})
    return loss.detach(), grads


def _forward_calls(model: torch.nn.Module) -> list[int]:
    """Counts the decoder forwards (one per embedding lookup)."""
    calls: list[int] = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return calls


def _assert_same(model, batch, *, gates=None, hooks=None, shared: bool = True, tol: float = 1e-5) -> None:
    calls = _forward_calls(model)
    loss, grads = _loss_and_grads(lambda m, b: lm_loss_sum(m, b, CPU), model, batch, gates, hooks)
    assert len(calls) == (2 if shared else 1)
    ref_loss, ref_grads = _loss_and_grads(_plain_loss, model, batch, gates, hooks)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=tol)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item() + 1e-8
        assert (g - ref_grads[name]).abs().max().item() <= tol * scale, name
    assert any(g.abs().max() > 0 for g in grads.values())


# The prune stage gates the stock source; the fine-tune stage trains the export (native: no gates).
CASES = [(layout, gated) for layout in LAYOUTS for gated in (True, False) if not (gated and layout == "native")]


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("train", ["lora", "full"])
@pytest.mark.parametrize(("layout", "gated"), CASES)
def test_shared_prefix_gives_the_plain_forwards_loss_and_gradients(layout, train, gated, checkpointing, tmp_path):
    model = _trainable(layout, train, checkpointing, tmp_path)
    batch = _batch(_rows(24, [9, 3, 14, 1]))  # right padding on three rows; one row is the prefix + 1 token
    assert shared_prefix_length(batch["input_ids"], batch["labels"], batch["attention_mask"]) == 24
    gates = hooks = None
    if gated:
        gates = GateSet(ModelAdapter(model).arch, STRUCTURES, seed=3)
        with torch.no_grad():  # gates partly closed, so samples hit 0, 1 and values in between
            for p in gates.parameters():
                p.normal_(0.5, 2.0)
        hooks = GateHooks(ModelAdapter(model))
    _assert_same(model, batch, gates=gates, hooks=hooks)


def test_labelled_prefix_positions_count_once_per_row(tmp_path):
    """Text rows labelled from their first token: the prefix's own predictions count for every row."""
    model = _trainable("llama", "full", True, tmp_path)
    batch = _batch(_rows(20, [6, 6, 11]), unlabelled=0)
    _assert_same(model, batch)


def test_no_common_prefix_runs_one_forward(tmp_path):
    model = _trainable("qwen2", "lora", True, tmp_path)
    rows = [[i] + r for i, r in enumerate(_rows(30, [5, 8, 2]))]  # the first tokens differ
    batch = _batch(rows)
    assert shared_prefix_length(batch["input_ids"], batch["labels"], batch["attention_mask"]) == 0
    _assert_same(model, batch, shared=False)


def test_short_prefix_and_single_row_run_one_forward(tmp_path):
    model = _trainable("llama", "lora", False, tmp_path)
    _assert_same(model, _batch(_rows(MIN_SHARED_PREFIX - 1, [5, 8])), shared=False)
    _assert_same(model, _batch(_rows(40, [5])), shared=False)
    _assert_same(model, _batch(_rows(MIN_SHARED_PREFIX, [5, 8])), shared=True)


def test_prefix_stops_at_padding_differing_labels_and_the_shortest_row():
    rows = _rows(20, [1, 5])
    rows[1][20] = rows[0][20]  # the short row's last token also starts the long row's tail
    batch = _batch(rows, pad=rows[1][21])  # and the pad id equals the long row's next token
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert shared_prefix_length(ids, labels, mask) == 20  # 21 tokens agree, but each row keeps one
    other_labels = labels.clone()
    other_labels[1, 14] = IGNORE  # same token, but a loss on one row only
    assert shared_prefix_length(ids, other_labels, mask) == 14
    left_padded = mask.flip(1)
    assert shared_prefix_length(ids, labels, left_padded) == 0
    assert shared_prefix_length(ids[:1], labels[:1], mask[:1]) == 0


def test_a_model_that_drops_the_prefix_cache_stops_rather_than_training_on_wrong_logits(tmp_path, monkeypatch):
    """Checkpointed layers drop a cache unless told to keep it (transformers' `_can_checkpoint_with_cache`);
    should that ever stop working, training must not go on with suffixes that never saw their prefix."""
    from contextlib import nullcontext

    from compresso_ops.training import shared_prefix

    monkeypatch.setattr(shared_prefix, "_cache_kept_under_checkpointing", lambda model: nullcontext())
    model = _trainable("llama", "lora", True, tmp_path)
    with pytest.raises(RuntimeError, match="did not pass the shared prefix's keys and values"):
        lm_loss_sum(model, _batch(_rows(24, [9, 3])), CPU)


def test_lora_dropout_shares_one_seeded_draw_on_the_prefix(tmp_path):
    """With dropout the prefix's noise is one draw for the micro-batch: still dropout (the seed matters),
    still repeatable from the seed (resume and data-parallel runs reproduce it)."""
    model = _trainable("llama", "lora", True, tmp_path, dropout=0.3)
    batch = _batch(_rows(24, [9, 3, 14]))

    def shared(seed):
        return _loss_and_grads(lambda m, b: lm_loss_sum(m, b, CPU), model, batch, None, None, seed)

    (a, grads_a), (b, grads_b), (c, _) = shared(0), shared(0), shared(1)
    assert a == b and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert a != c
    with torch.no_grad():  # without dropout (eval mode) the plain and shared forwards agree again
        model.eval()
        assert lm_loss_sum(model, batch, CPU).item() == pytest.approx(_plain_loss(model, batch).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_shared_prefix_matches_the_plain_forward_in_that_precision(dtype, tmp_path):
    """The compute dtype of the GPU path (autocast over fp32 masters, as `train: full` uses it)."""
    model = _trainable("qwen3", "full", True, tmp_path)
    batch = _batch(_rows(24, [9, 3, 14]))
    precision = Precision(torch.device("cpu"), torch.float32, compute_dtype=dtype)
    shared, shared_grads = _loss_and_grads(lambda m, b: lm_loss_sum(m, b, precision), model, batch, None, None)
    ref, ref_grads = _loss_and_grads(lambda m, b: _plain_loss(m, b, precision), model, batch, None, None)
    assert shared.item() == pytest.approx(ref.item(), rel=2e-2)
    for name, g in shared_grads.items():
        assert (g - ref_grads[name]).norm() <= 0.05 * ref_grads[name].norm() + 1e-6, name


def test_a_prune_run_with_shared_prefixes_equals_one_without(tmp_path, monkeypatch):
    """The whole stage (gate samples, LoRA, Lagrangian, accumulation) on Alpaca rows behind a prompt: the
    trained gates and adapters are those of a run whose forwards see every row whole."""
    import json
    import random

    from safetensors.torch import load_file

    from compresso_ops.recipe.schema import Recipe
    from compresso_ops.stages.prune import run_prune
    from compresso_ops.training import loop
    from tests.tiny import save_tiny

    save_tiny(tmp_path / "model", "qwen2")
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "tree", "red", "big", "sat", "ran"]
    rows = [{"instruction": " ".join(rng.choices(words, k=rng.randint(2, 6))),
             "input": " ".join(rng.choices(words, k=3)) if i % 3 == 0 else "",
             "output": " ".join(rng.choices(words, k=rng.randint(3, 12)))} for i in range(24)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    recipe = Recipe(name="t", model={"path": str(tmp_path / "model")}, target={"sparsity": 0.4},
                    prompt={"text": "Keep answers short."},
                    data={"path": str(tmp_path / "rows.json"), "format": "alpaca", "max_seq_length": 256},
                    prune={"schedule": {"unit": "steps", "lora_only": 1, "ramp": 2, "hold": 1}, "micro_batch_size": 4,
                           "gradient_accumulation": 2, "gradient_checkpointing": True,
                           "lora": {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                           "lr": {"lora": 1e-2, "gates": 0.3, "lagrangian": 0.1}})
    shared_calls = []
    real = loop.forward_with_shared_prefix
    monkeypatch.setattr(loop, "forward_with_shared_prefix", lambda *a: shared_calls.append(1) or real(*a))
    run_prune(recipe, tmp_path / "shared")
    assert len(shared_calls) == 4 * 2  # every micro-batch of every step shared its prefix
    monkeypatch.setattr(loop, "MIN_SHARED_PREFIX", 10**9)
    run_prune(recipe, tmp_path / "plain")
    assert len(shared_calls) == 8
    for name in ("gates.safetensors", "lora/adapter_model.safetensors"):
        a, b = load_file(str(tmp_path / "shared" / name)), load_file(str(tmp_path / "plain" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")


def _fsdp_rounds() -> list[list[dict[str, torch.Tensor]]]:
    """Micro-batches of two ranks, round by round: in the first only rank 0's rows share a prefix, so neither
    rank may forward it apart (the other rank runs one forward); in the second both share."""
    distinct = [[i] + r for i, r in enumerate(_rows(20, [6, 9], seed=5))]
    return [[_batch(_rows(24, [9, 3], seed=1)), _batch(distinct)],
            [_batch(_rows(30, [4, 12], seed=2)), _batch(_rows(18, [7, 7], seed=3))]]


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: shard the tiny model (FSDP2), run this rank's micro-batches, save the
    gradients summed over the ranks (gathered whole) and the forwards this rank ran."""
    import os
    from datetime import timedelta

    import torch.distributed as torch_dist

    from compresso_ops.training.distributed import DistContext
    from compresso_ops.training.sharding import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))  # no hang
    precision = Precision(torch.device("cpu"), torch.float32, dist=DistContext(rank, 2), shard_base=True)
    result = {}
    for train in ("lora", "full"):
        model = _trainable("llama", train, True, None)
        shard_model(model, precision)
        calls = _forward_calls(model)
        for batches in _fsdp_rounds():
            lm_loss_sum(model, batches[rank], precision).backward()
        grads = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if hasattr(p.grad, "full_tensor"):  # sharded (full training): FSDP reduced it as the mean over ranks
                grads[name] = p.grad.full_tensor() * 2
            else:  # replicated (LoRA): this rank's rows only
                grads[name] = p.grad.clone()
                torch_dist.all_reduce(grads[name])
        result[train] = {"grads": grads, "forwards": len(calls)}
    if rank == 0:
        torch.save(result, out)
    torch_dist.destroy_process_group()


def test_fsdp_ranks_agree_on_sharing_and_sum_the_single_process_gradients(tmp_path):
    """Under FSDP every forward gathers the layers on every rank: a rank whose micro-batch shares no prefix
    must not leave the other waiting, and the summed gradients are those of one process running all rows."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    mp.start_processes(_fsdp_worker, args=(port, str(out)), nprocs=2, start_method="spawn", join=True)
    result = torch.load(out)
    for train in ("lora", "full"):
        assert result[train]["forwards"] == 1 + 2  # round one: one forward on each rank; round two: two
        model = _trainable("llama", train, True, None)
        model.zero_grad(set_to_none=True)
        for batches in _fsdp_rounds():
            for batch in batches:
                _plain_loss(model, batch).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(result[train]["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

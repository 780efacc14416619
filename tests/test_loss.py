"""InfoNCE against a naive reference, across 2 ranks, and GradCache against the plain loss."""

from __future__ import annotations

import math
import copy

import pytest
import torch
import torch.nn.functional as F

from b3stream.config import EncoderConfig, LoraConfig
from b3stream.dist import free_port
from b3stream.train.loss import BatchEmbedder, InfoNCE

from . import _train_util


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def naive_infonce(q, d, n, tau, symmetric):
    """Query by query, written the way the paper states it."""
    keys = d if n is None else torch.cat([d, n])
    forward = torch.stack([-torch.log_softmax(q[i] @ keys.T / tau, 0)[i] for i in range(len(q))]).mean()
    if not symmetric:
        return forward
    backward = torch.stack([-torch.log_softmax(d[j] @ q.T / tau, 0)[j] for j in range(len(d))]).mean()
    return 0.5 * (forward + backward)


@pytest.mark.parametrize("hard", [0, 7])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_matches_reference(hard, symmetric):
    q, d = unit(12, 16, seed=1), unit(12, 16, seed=2)
    n = unit(hard, 16, seed=3) if hard else None
    out = InfoNCE(0.05, symmetric)(q, d, n)
    ref = naive_infonce(q, d, n, 0.05, symmetric)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert out.global_loss == pytest.approx(ref.item(), rel=1e-5)
    assert out.batch_size == 12 and out.num_hard_negatives == hard


def test_targets_are_right_with_hard_negatives():
    """Each query equals its own positive; hard negatives are other directions. A misplaced target
    (e.g. i * (h + 1) vs i) would make the loss large and the accuracy low."""
    d = unit(8, 32, seed=4)
    q = d.clone()
    n = unit(24, 32, seed=5)  # h = 3 per example, appended after the positives
    out = InfoNCE(0.02)(q, d, n)
    assert out.accuracy == 1.0
    assert out.loss.item() < 1e-3
    assert out.pos_sim == pytest.approx(1.0, abs=1e-6)
    assert out.hardest_neg_sim < 0.99
    # A hard negative identical to a query's positive is a tie, so that query's loss rises to about log 2
    # (the other seven stay near 0): the batch mean is about log(2) / 8.
    n2 = torch.cat([n, d[:1]])
    tied = InfoNCE(0.02)(q, d, n2)
    assert tied.accuracy == pytest.approx(7 / 8)
    assert tied.loss.item() == pytest.approx(math.log(2) / 8, rel=0.02)


@pytest.mark.parametrize("sizes,neg_sizes,symmetric", [([4, 4], [3, 3], False), ([5, 3], [4, 1], True),
                                                       ([3, 3], [0, 0], False)])
@pytest.mark.slow
def test_two_rank_gather_equals_single_process(tmp_path, sizes, neg_sizes, symmetric):
    """Loss of the gathered 2-rank batch == one process holding the whole batch, and the gradients each rank
    gets for its own rows, averaged over ranks as DeepSpeed does, == the single-process gradients."""
    total, negs = sum(sizes), sum(neg_sizes)
    tensors = {"q": unit(total, 16, seed=6), "d": unit(total, 16, seed=7),
               "n": unit(negs, 16, seed=8) if negs else None}
    torch.multiprocessing.spawn(_train_util.gather_worker, nprocs=2, join=True,
                                args=(2, free_port(), tensors, sizes, neg_sizes, 0.05, symmetric, str(tmp_path)))
    q = tensors["q"].clone().requires_grad_()
    d = tensors["d"].clone().requires_grad_()
    n = tensors["n"].clone().requires_grad_() if negs else None
    single = InfoNCE(0.05, symmetric)(q, d, n)
    single.loss.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["loss"] == pytest.approx(single.global_loss, rel=1e-5)
        assert r["accuracy"] == pytest.approx(single.accuracy)
    world = 2
    torch.testing.assert_close(torch.cat([r["q"] for r in ranks]) / world, q.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["d"] for r in ranks]) / world, d.grad, rtol=1e-4, atol=1e-6)
    if negs:
        torch.testing.assert_close(torch.cat([r["n"] for r in ranks]) / world, n.grad, rtol=1e-4, atol=1e-6)


HOST_SIZE_CASES = [([5, 3], [4, 1]), ([3, 3], [0, 0])]  # (queries, hard negatives) per rank


def host_sizes_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of :func:`test_host_known_sizes_replace_the_size_gathers`: per case, the loss with the
    sizes gathered and with the sizes given, each rank's all_gather calls counted (the wrapper records who
    called and calls through), then a wrong count."""
    import os
    import sys

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls, real = [], dist.all_gather

    def counted(*args, **kwargs):
        calls.append(sys._getframe(1).f_code.co_name)
        return real(*args, **kwargs)

    dist.all_gather = counted
    results = []
    for sizes, neg_sizes in HOST_SIZE_CASES:
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        nlo, nhi = sum(neg_sizes[:rank]), sum(neg_sizes[: rank + 1])
        q, d, n = unit(sum(sizes), 16, seed=6), unit(sum(sizes), 16, seed=7), unit(sum(neg_sizes), 16, seed=8)
        keys = torch.arange(sum(sizes) + sum(neg_sizes)) % 5  # repeated texts: the same-text mask is used
        d_keys, n_keys = keys[lo:hi], keys[sum(sizes) + nlo : sum(sizes) + nhi]
        case = {}
        for mode, given in (("gathered", {}), ("given", {"sizes": sizes, "negative_sizes": neg_sizes})):
            leaves = [t[a:b].clone().requires_grad_() for t, a, b in ((q, lo, hi), (d, lo, hi), (n, nlo, nhi))]
            calls.clear()
            out = InfoNCE(0.05, symmetric=True)(*leaves, d_keys, n_keys, **given)
            out.loss.backward()
            case[mode] = {"loss": out.global_loss, "grads": [t.grad for t in leaves], "calls": list(calls)}
        wrong = list(sizes)
        wrong[rank] += 1
        try:
            InfoNCE(0.05)(q[lo:hi], d[lo:hi], n[nlo:nhi], d_keys, n_keys, sizes=wrong, negative_sizes=neg_sizes)
            case["refused"] = False
        except ValueError:
            case["refused"] = True
        results.append(case)
    dist.all_gather = real
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_host_known_sizes_replace_the_size_gathers(tmp_path):
    """The trainer knows every rank's row counts from the plan: given them, InfoNCE makes no all_gather of
    sizes (only the five of embeddings and keys: positives, negatives, their keys, the queries of the
    symmetric term) and computes the same loss and gradients as when it gathers them; a count that does not
    match this rank's rows is refused before any collective."""
    torch.multiprocessing.spawn(host_sizes_worker, nprocs=2, join=True, args=(2, free_port(), str(tmp_path)))
    for rank in (0, 1):
        for case in torch.load(tmp_path / f"rank{rank}.pt"):
            gathered, given = case["gathered"], case["given"]
            assert given["calls"] == ["all_gather_rows"] * 5, given["calls"]
            assert gathered["calls"].count("gather_sizes") == 2  # the fallback: queries, negatives
            assert given["loss"] == gathered["loss"]
            for a, b in zip(given["grads"], gathered["grads"]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            assert case["refused"]


SCATTER_CASES = [[4, 4], [5, 3], [0, 3], [0, 0]]  # rows per rank


def reduce_scatter_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of :func:`test_the_gathers_backward_is_a_reduce_scatter`: per case, the gradient the
    gather's backward hands this rank, next to the all-reduce-and-slice it replaced, and the collectives the
    backward made."""
    import os

    import torch.distributed as dist

    from b3stream.train.loss import gather

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    names = [n for n in ("all_reduce", "reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n)]
    real = {n: getattr(dist, n) for n in names}
    for n in names:
        setattr(dist, n, lambda *a, _n=n, **k: (calls.append(_n), real[_n](*a, **k))[1])
    results = []
    for sizes in SCATTER_CASES:
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        x = unit(max(1, sum(sizes)), 8, seed=3)[: sum(sizes)][lo:hi].clone().requires_grad_()
        weights = unit(max(1, sum(sizes)), 8, seed=10 + rank)[: sum(sizes)]  # a loss that differs per rank
        calls.clear()
        (gather(x, sizes) * weights).sum().backward()
        made = list(calls)
        reference = weights.clone()  # d loss / d gathered rows on this rank, summed over ranks, our rows kept
        real["all_reduce"](reference)
        results.append({"grad": x.grad, "reference": reference[lo:hi], "calls": made})
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_the_gathers_backward_is_a_reduce_scatter(tmp_path):
    """Two gloo ranks: the gather's backward gives each rank the sum over ranks of the gradients of its own
    rows, equal (1e-6) to the all-reduce of the whole gradient sliced afterwards, for equal, unequal, empty
    and all-empty slices; it makes one reduce-scatter (none when every slice is empty) and no all-reduce."""
    torch.multiprocessing.spawn(reduce_scatter_worker, nprocs=2, join=True, args=(2, free_port(), str(tmp_path)))
    for rank in (0, 1):
        for sizes, case in zip(SCATTER_CASES, torch.load(tmp_path / f"rank{rank}.pt")):
            assert case["grad"].shape == (sizes[rank], 8)
            torch.testing.assert_close(case["grad"], case["reference"], rtol=0, atol=1e-6)
            assert "all_reduce" not in case["calls"], case["calls"]
            assert len(case["calls"]) == (0 if max(sizes) == 0 else 1), (sizes, case["calls"])


# -- GradCache ------------------------------------------------------------------------------------------

TEXTS_Q = [f"how to {verb} a {noun}" for verb in ("sort", "parse", "open", "hash", "merge")
           for noun in ("list", "file")]
TEXTS_D = [f"def {verb}_{noun}(x):\n    return {verb}({noun}, x)  # {i}" for i, (verb, noun) in
           enumerate((v, n) for v in ("sort", "parse", "open", "hash", "merge") for n in ("list", "file"))]


@pytest.fixture(scope="module")
def lora_encoder():
    from b3stream.encoder import Encoder

    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(max_query_length=16, max_positive_length=24,
                                lora=LoraConfig(r=4, alpha=8, dropout=0.1)), trainable=True)
    # LoRA starts with B = 0, which zeroes A's gradient; give B values so both are exercised.
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return enc


def lora_grads(enc, chunk, train_mode, seed=0, hard=True, fuse_sides=False):
    model = BatchEmbedder(enc, chunk=chunk, fuse_sides=fuse_sides, pad_id=enc.tokenizer.pad_token_id)
    model.train(train_mode)
    model.zero_grad(set_to_none=True)
    batch = {"query": dict(enc.tokenize(TEXTS_Q, "query")), "positive": dict(enc.tokenize(TEXTS_D, "positive"))}
    if hard:
        batch["negative"] = dict(enc.tokenize(TEXTS_D[::-1][:4], "query"))
    torch.manual_seed(seed)
    emb = model(batch)
    out = InfoNCE(0.02, symmetric=True)(emb["query"], emb["positive"], emb.get("negative"))
    out.loss.backward()
    return out.global_loss, {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("hard", [True, False])
def test_one_padded_forward_for_all_sides_equals_one_forward_per_side(lora_encoder, hard):
    """fuse_sides pads the shorter side to the longer one and runs one forward: the padding is masked, so
    the loss and every gradient are those of a forward per side."""
    loss_sides, per_side = lora_grads(lora_encoder, None, train_mode=False, hard=hard)
    loss_fused, fused = lora_grads(lora_encoder, None, train_mode=False, hard=hard, fuse_sides=True)
    assert loss_fused == pytest.approx(loss_sides, rel=1e-5)
    for name in per_side:
        torch.testing.assert_close(fused[name], per_side[name], rtol=1e-4, atol=1e-6, msg=name)
    # an empty side shaped as the data loader makes it (no token_type_ids) gets its 0 rows
    model = BatchEmbedder(lora_encoder, fuse_sides=True, pad_id=lora_encoder.tokenizer.pad_token_id)
    model.eval()
    empty = {"input_ids": torch.zeros(0, 0, dtype=torch.long), "attention_mask": torch.zeros(0, 0, dtype=torch.long)}
    with torch.no_grad():
        emb = model({"query": dict(lora_encoder.tokenize(TEXTS_Q, "query")),
                     "positive": dict(lora_encoder.tokenize(TEXTS_D, "positive")), "negative": empty})
    assert emb["negative"].shape == (0, lora_encoder.dim) and emb["query"].shape[0] == len(TEXTS_Q)
    # and the widths really differ, so the padding path ran
    q, d = lora_encoder.tokenize(TEXTS_Q, "query"), lora_encoder.tokenize(TEXTS_D, "positive")
    assert q["input_ids"].shape[1] != d["input_ids"].shape[1]


def test_auto_fuses_only_sides_of_about_one_width(lora_encoder):
    """fuse_sides="auto" runs one forward when padding the sides to one width adds at most 10% tokens, and a
    forward per side otherwise (short queries beside long positives): counted at the encoder."""
    from b3stream.train.loss import fusing_pays

    calls = []
    handle = lora_encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs["input_ids"].shape), with_kwargs=True)
    model = BatchEmbedder(lora_encoder, fuse_sides="auto", pad_id=lora_encoder.tokenizer.pad_token_id).eval()
    q, d = dict(lora_encoder.tokenize(TEXTS_Q, "query")), dict(lora_encoder.tokenize(TEXTS_D, "positive"))
    try:
        with torch.no_grad():
            assert not fusing_pays({"query": q, "positive": d})
            model({"query": q, "positive": d})
            assert len(calls) == 2  # short queries, long positives: apart
            calls.clear()
            model({"query": d, "positive": d})  # one width (a symmetric task)
            assert len(calls) == 1 and calls[0][0] == 2 * len(TEXTS_D)
    finally:
        handle.remove()
    wide = {"input_ids": torch.ones(10, 100, dtype=torch.long)}
    assert fusing_pays({"query": {"input_ids": torch.ones(10, 95, dtype=torch.long)}, "positive": wide})
    assert not fusing_pays({"query": {"input_ids": torch.ones(10, 60, dtype=torch.long)}, "positive": wide})
    assert BatchEmbedder(lora_encoder, chunk=4, fuse_sides="auto").fuse_sides is False  # never with GradCache


@pytest.mark.parametrize("chunk", [3, 4, 100])
def test_gradcache_gradients_equal_plain(lora_encoder, chunk):
    loss_plain, plain = lora_grads(lora_encoder, None, train_mode=False)
    loss_cached, cached = lora_grads(lora_encoder, chunk, train_mode=False)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-5)
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "lora_A" in n)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradcache_replays_dropout_masks(lora_encoder):
    """In train mode the recomputed chunks must see the dropout masks of the first pass: the cached
    gradients equal those of the same chunked forward kept entirely in memory."""
    _, cached = lora_grads(lora_encoder, 4, train_mode=True, seed=11)

    enc = copy.deepcopy(lora_encoder)
    model = BatchEmbedder(enc, chunk=None)
    model.train()
    batch = {"query": dict(enc.tokenize(TEXTS_Q, "query")), "positive": dict(enc.tokenize(TEXTS_D, "positive")),
             "negative": dict(enc.tokenize(TEXTS_D[::-1][:4], "query"))}
    torch.manual_seed(11)
    # Same chunking and order as BatchEmbedder, without checkpointing.
    from b3stream.train.loss import _trim

    emb = {}
    for side in ("query", "positive", "negative"):
        f = batch[side]
        n = f["input_ids"].shape[0]
        emb[side] = torch.cat([enc(**_trim({k: v[s:s + 4] for k, v in f.items()})) for s in range(0, n, 4)]) \
            if n > 4 else enc(**f)
    out = InfoNCE(0.02, symmetric=True)(emb["query"], emb["positive"], emb["negative"])
    out.loss.backward()
    for name, p in enc.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(cached[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

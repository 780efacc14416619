"""quality.py: the Theorem-1 bound and in-batch negative similarity; b3 beats random on real code data.

None of these comparisons holds by construction: B3++ batches are B3 batches plus candidates, so "b3pp beats
b3" and "bound >= floor" (the batch's negatives are a subset of the data's) can never fail. Instead B3++ is
measured against the same batches with as many *random* negatives from the same allowed pool, the bound is
checked to reach its floor exactly when batches hold each query's K nearest negatives, and GCBS is held to a
margin over random batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from b3stream.config import MineConfig
from b3stream.mining.embed import load_embeddings
from b3stream.mining.negatives import excluded_ids
from b3stream.mining.pipeline import load_rank, run_all, schedule_stage
from b3stream.mining.quality import batch_quality
from b3stream.schedule import load_schedule

from ._mining_synth import clustered
from .test_mining_strategies import mined, schedule


def lse(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def theorem1_by_definition(ids, offsets, q, p, K, tau, negatives=None, universe=None) -> dict:
    """The B3 paper's Theorem-1 bound and the in-batch similarities straight from their definitions, with plain
    numpy over the full similarity matrix (small inputs only; independent of quality.py):
    bound_i = log(N/K * H_i^K / H_{B_i,i}^K), H_i^K the K largest exp(s_ij / tau) over every j != i of the
    universe (all ids, or the ids to come), H_{B_i,i}^K the same over i's batch negatives (the other members'
    positives and the batch's hard negatives, -1 slots left out)."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    universe = np.arange(len(p)) if universe is None else np.asarray(universe)
    N = len(universe)
    sims = q @ p.T
    bounds, means, maxes = [], [], []
    for lo, hi in zip(offsets[:-1], offsets[1:]):
        members = np.asarray(ids[lo:hi])
        cand = set(members.tolist())
        if negatives is not None:
            cand |= {j for j in np.asarray(negatives[lo:hi]).ravel().tolist() if j >= 0}
        for i in members:
            everyone = sims[i, universe[universe != i]]
            in_batch = sims[i, sorted(cand - {int(i)})]
            h_all = lse(np.sort(everyone)[-K:] / tau)
            h_b = lse(np.sort(in_batch)[-K:] / tau)  # all of them where the batch offers fewer than K
            bounds.append(np.log(N / K) + h_all - h_b)
            means.append(in_batch.mean())
            maxes.append(in_batch.max())
    return {"theorem1_bound": np.mean(bounds), "theorem1_floor": np.log(N / K), "neg_sim_mean": np.mean(means),
            "neg_sim_hardest_mean": np.mean(maxes), "neg_sim_max": np.max(maxes), "queries": len(bounds), "N": N}


def assert_matches_definition(got: dict, want: dict, rel: float = 2e-5) -> None:
    """A batch_quality record (every query scored, so exact) against :func:`theorem1_by_definition` (the record
    keeps 6 significant digits)."""
    assert got["global_top_k"] == "exact" and got["theorem1_bound_ci95"] is None
    assert (got["queries"], got["N"]) == (want["queries"], want["N"])
    for key in ("theorem1_bound", "theorem1_floor", "neg_sim_mean", "neg_sim_hardest_mean", "neg_sim_max"):
        assert got[key] == pytest.approx(want[key], rel=rel), (key, got[key], want[key])


def test_bound_matches_brute_force():
    q, p, _ = clustered(150, d=16, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.permutation(150)
    offsets = np.array([0, 40, 80, 120, 150])
    negatives = rng.integers(0, 150, size=(150, 2))
    tau, K = 0.1, 5
    for negs in (None, negatives):
        got = batch_quality(ids, offsets, q, p, K, temperature=tau, negatives=negs, sample=None)
        assert_matches_definition(got, theorem1_by_definition(ids, offsets, q, p, K, tau, negs))


def tight_clusters(clusters: int, size: int, d: int = 32, seed: int = 0):
    """Well separated clusters of exactly ``size`` examples: every query's ``size - 1`` most similar other
    positives are its cluster mates (cosine about 0.99, against at most about 0.7 to anything else)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    q = np.repeat(centres, size, axis=0) + 0.05 * rng.standard_normal((clusters * size, d)) / np.sqrt(d)
    p = q + 0.02 * rng.standard_normal(q.shape) / np.sqrt(d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return q.astype(np.float32), p.astype(np.float32)


def test_bound_reaches_its_floor_only_when_batches_hold_each_querys_nearest_negatives():
    # The floor log(N/K) is reached when a query's batch holds its K strongest negatives (H_B = H). That
    # needs the global top-K to leave out the query's own positive and the batch part to do the same; a
    # random batch of the same size misses them and must sit far above the floor.
    K, clusters = 5, 30
    q, p = tight_clusters(clusters, K + 1)
    N = len(q)
    ids = np.arange(N)  # cluster c is ids 6c..6c+5: two whole clusters per batch of 12
    offsets = np.arange(0, N + 1, 2 * (K + 1))
    oracle = batch_quality(ids, offsets, q, p, K, sample=None)
    assert oracle["theorem1_bound"] == pytest.approx(oracle["theorem1_floor"], abs=1e-4)
    shuffled = np.random.default_rng(0).permutation(N)
    rand = batch_quality(shuffled, offsets, q, p, K, sample=None)
    assert rand["theorem1_bound"] > rand["theorem1_floor"] + 5
    # hard negatives count as the batch's negatives: random batches whose hard negatives are each member's
    # cluster mates reach the floor too; the same number of random hard negatives does not
    mates = np.stack([np.setdiff1d(np.arange(i // (K + 1) * (K + 1), (i // (K + 1) + 1) * (K + 1)), [i])
                      for i in shuffled])
    helped = batch_quality(shuffled, offsets, q, p, K, negatives=mates, sample=None)
    assert helped["theorem1_bound"] == pytest.approx(helped["theorem1_floor"], abs=1e-4)
    noise = np.random.default_rng(1).integers(0, N, size=mates.shape)
    unhelped = batch_quality(shuffled, offsets, q, p, K, negatives=noise, sample=None)
    assert unhelped["theorem1_bound"] > unhelped["theorem1_floor"] + 2


def random_negatives_like(sched, tasks: np.ndarray, top: np.ndarray, seed: int = 0) -> np.ndarray:
    """As many negatives per batch as B3++ drew, but uniformly at random from the pool B3++ draws from: the
    batch's task without the members and their top-p (X(B), :mod:`b3stream.mining.negatives`)."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(sched.negative_ids)
    for lo, hi in zip(sched.offsets[:-1], sched.offsets[1:]):
        members = sched.ids[lo:hi]
        pool = np.setdiff1d(np.flatnonzero(np.isin(tasks, np.unique(tasks[members]))), excluded_ids(members, top))
        out[lo:hi] = rng.choice(pool, size=out[lo:hi].size, replace=False).reshape(hi - lo, -1)
    return out


def test_b3pp_negatives_beat_random_negatives_of_the_same_size():
    # Same batches, same number of extra negatives, same exclusions: only *which* ids B3++ picks differs.
    # Negatives drawn without regard to the members' neighbour lists (or from another batch's rows) lose.
    inp = mined(n=1000, tasks=1)
    q, pos, _ = clustered(1000, clusters=30, seed=0)
    s = schedule(inp, "b3pp")
    hard = batch_quality(s.ids, s.offsets, q, pos, 8, negatives=s.negative_ids, sample=None)
    rand = random_negatives_like(s, inp.tasks, inp.top)
    base = batch_quality(s.ids, s.offsets, q, pos, 8, negatives=rand, sample=None)
    assert hard["theorem1_bound"] < base["theorem1_bound"] - 0.3, (hard, base)

    def sim_to_negatives(negs):  # mean cosine of a batch's queries to its extra negatives' positives
        return np.mean([(q[s.ids[lo:hi]] @ pos[negs[lo:hi].ravel()].T).mean()
                        for lo, hi in zip(s.offsets[:-1], s.offsets[1:])])

    assert sim_to_negatives(s.negative_ids) > 2 * sim_to_negatives(rand) + 0.02


def test_sampled_estimate_is_close_and_memory_is_chunked():
    q, p, _ = clustered(3000, d=16, seed=1)
    ids = np.random.default_rng(0).permutation(3000)
    offsets = np.arange(0, 3001, 100)
    full = batch_quality(ids, offsets, q, p, 8, sample=None)
    part = batch_quality(ids, offsets, q, p, 8, sample=1000, seed=3)
    assert part["queries"] == 1000
    assert part["theorem1_bound"] == pytest.approx(full["theorem1_bound"], rel=0.05)


def count_exact_searches(monkeypatch) -> list:
    """Count the exact top-K passes over all positives (``rank.exact_search``, or ``quality.screened_topk`` on
    float16 embeddings on the CPU, which the global part of the bound runs): the wrappers record each call
    and run the real search."""
    from b3stream.mining import quality, rank

    calls, real, real_screened = [], rank.exact_search, quality.screened_topk

    def counted(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    def counted_screened(*args, **kwargs):
        calls.append("screened")
        return real_screened(*args, **kwargs)

    monkeypatch.setattr(rank, "exact_search", counted)
    monkeypatch.setattr(quality, "screened_topk", counted_screened)
    return calls


def test_one_query_sample_scores_two_schedules_as_two_independent_calls(monkeypatch):
    """H_i^K does not depend on the batches: one query_sample (one exact top-K pass) serves a schedule and
    the one it replaces, with the values of two independent batch_quality calls; a sample drawn for other
    parameters is refused."""
    from b3stream.mining.quality import query_sample

    q, p, _ = clustered(600, d=16, seed=2)
    rng = np.random.default_rng(0)
    new_ids, old_ids = rng.permutation(600), rng.permutation(600)
    offsets = np.arange(0, 601, 40)
    negatives = rng.integers(0, 600, size=(600, 3))
    calls = count_exact_searches(monkeypatch)
    alone = [batch_quality(new_ids, offsets, q, p, 6, temperature=0.05, negatives=negatives, sample=200, seed=3),
             batch_quality(old_ids, offsets, q, p, 6, temperature=0.05, sample=200, seed=3)]
    assert len(calls) == 2
    calls.clear()
    scored = query_sample(q, p, 6, sample=200, seed=3)
    shared = [batch_quality(new_ids, offsets, q, p, 6, temperature=0.05, negatives=negatives, sample=200, seed=3,
                            scored=scored),
              batch_quality(old_ids, offsets, q, p, 6, temperature=0.05, sample=200, seed=3, scored=scored)]
    assert len(calls) == 1
    assert shared == alone
    assert shared[0]["theorem1_bound"] != shared[1]["theorem1_bound"]  # two schedules, not one scored twice
    for other in ({"K": 7}, {"seed": 4}, {"sample": 300}):
        args = {"K": 6, "seed": 3, "sample": 200, **other}
        with pytest.raises(ValueError, match="shared query sample"):
            batch_quality(new_ids, offsets, q, p, args["K"], sample=args["sample"], seed=args["seed"],
                          scored=scored)


def test_schedule_stage_scores_the_replaced_schedule_with_the_same_top_k_pass(tmp_path, monkeypatch):
    """`b3stream mine schedule` over a folder with a previous version: one exact top-K pass for both
    ``quality`` and ``quality_previous``, and each equals batch_quality of its schedule computed alone."""
    from b3stream.cli import main
    from b3stream.schedule import version_path

    q, p, _ = clustered(400, d=16, clusters=20, seed=0)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    out = tmp_path / "mine"
    flags = ["--query-embeddings", str(tmp_path / "q.npy"), "--positive-embeddings", str(tmp_path / "p.npy"),
             "--out", str(out), "--K", "4", "--batch-size", "16", "--quiet"]
    assert main(["mine", "--strategy", "random", *flags]) == 0
    calls = count_exact_searches(monkeypatch)
    assert main(["mine", "schedule", "--strategy", "random", "--seed", "1", *flags]) == 0
    assert len(calls) == 1, calls
    old, new = (load_schedule(version_path(out / "schedules", v)) for v in (0, 1))
    emb = load_embeddings(out / "embeddings")
    # quality_sample (2048) >= N (400): every query is scored and the bound is exact, so each record must equal
    # the bound computed from its definition over the stored (float16) embeddings
    tau = new.meta["quality"]["temperature"]
    assert MineConfig().quality_sample >= 400
    for sched, got in ((new, new.meta["quality"]), (old, new.meta["quality_previous"])):
        assert_matches_definition(got, theorem1_by_definition(sched.ids, sched.offsets, emb.queries, emb.positives,
                                                              4, tau, sched.negative_ids))
    assert new.meta["quality"]["scope"] == new.meta["quality_previous"]["scope"] == "all ids"
    assert new.meta["quality_previous"]["version"] == 0
    assert new.meta["quality"]["theorem1_bound"] != new.meta["quality_previous"]["theorem1_bound"]


def test_a_refresh_scores_only_the_batches_still_to_come(tmp_path):
    """With the ids already trained this epoch (a refresh), the bound of the new schedule and of the one it
    replaces covers the untrained ids only, batched as each schedule batches them: what the rest of the
    epoch trains on, not the whole schedule."""
    from b3stream.schedule import version_path

    q, p, _ = clustered(400, d=16, clusters=20, seed=0)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    trained = np.random.default_rng(0).choice(400, size=160, replace=False)
    np.save(tmp_path / "trained.npy", trained)
    base = MineConfig(query_embeddings=str(tmp_path / "q.npy"), positive_embeddings=str(tmp_path / "p.npy"),
                      out=str(tmp_path / "mine"), strategy="b3", p=1, m=10, K=4, batch_size=16, quality_sample=None)
    run_all(base, progress=False)
    cfg = MineConfig(**{**base.__dict__, "trained_ids": str(tmp_path / "trained.npy"), "seed": 1})
    run_all(cfg, progress=False)
    old, new = (load_schedule(version_path(tmp_path / "mine" / "schedules", v)) for v in (0, 1))
    emb = load_embeddings(tmp_path / "mine" / "embeddings")
    to_come = np.ones(400, bool)
    to_come[trained] = False

    def upcoming(s):
        keep = to_come[s.ids]
        sizes = np.add.reduceat(keep.astype(int), s.offsets[:-1])
        return s.ids[keep], np.concatenate([[0], np.cumsum(sizes[sizes > 0])])

    for s, got in ((new, new.meta["quality"]), (old, new.meta["quality_previous"])):
        ids, offsets = upcoming(s)
        assert_matches_definition(got, theorem1_by_definition(ids, offsets, emb.queries, emb.positives, 4,
                                                              got["temperature"], universe=np.flatnonzero(to_come)))
        assert got["scope"] == "ids to come" and got["queries"] == got["N"] == 240
    whole = batch_quality(new.ids, new.offsets, emb.queries, emb.positives, 4, sample=None)
    assert whole["queries"] == 400 and whole["theorem1_bound"] != new.meta["quality"]["theorem1_bound"]


def test_the_bound_of_the_ids_to_come_is_the_bound_of_their_data_alone():
    """A refresh's bound ranges over the ids to come only (issue 32): scoring with ``only`` gives what scoring
    the data made of those ids alone gives: queries, global top-K (no stale trained row in it) and the floor
    log(N/K) with N the ids to come."""
    q, p, _ = clustered(300, d=16, clusters=15, seed=4)
    rng = np.random.default_rng(1)
    to_come = np.zeros(300, bool)
    to_come[rng.choice(300, size=170, replace=False)] = True
    universe = np.flatnonzero(to_come)
    ids = universe[rng.permutation(len(universe))]
    offsets = np.array([0, 40, 80, 120, 160, 170])
    negatives = rng.choice(universe, size=(170, 2))
    got = batch_quality(ids, offsets, q, p, 5, temperature=0.05, negatives=negatives, sample=None, only=to_come)
    local = np.full(300, -1)
    local[universe] = np.arange(len(universe))
    alone = batch_quality(local[ids], offsets, q[universe], p[universe], 5, temperature=0.05,
                          negatives=local[negatives], sample=None)
    assert got == alone and got["N"] == 170 and got["theorem1_floor"] == pytest.approx(np.log(170 / 5), rel=1e-5)
    sampled = batch_quality(ids, offsets, q, p, 5, temperature=0.05, sample=50, seed=2, only=to_come)
    assert sampled["queries"] == 50 and sampled["N"] == 170


@pytest.fixture(scope="module")
def code_mined(code_dataset, tmp_path_factory):
    """The code-search fixture mined once with the real MiniLM teacher (short max lengths for speed)."""
    out = tmp_path_factory.mktemp("code_mine")
    cfg = MineConfig(data=str(code_dataset), out=str(out), strategy="b3", p=2, m=30, K=8, batch_size=64, h=2,
                     quality_sample=None)
    cfg.teacher.max_query_length = 32
    cfg.teacher.max_positive_length = 64
    run_all(cfg, progress=False)
    return cfg


@pytest.mark.slow
def test_b3_beats_random_and_task_on_code_search(code_mined):
    quality, scheds = {}, {}
    for version, name in enumerate(["random", "task", "gcbs", "b3", "b3pp"], start=1):
        cfg = MineConfig(**{**code_mined.__dict__, "strategy": name, "version": version})
        scheds[name] = load_schedule(schedule_stage(cfg, progress=False))
        quality[name] = scheds[name].meta["quality"]
    for good in ("b3", "b3pp", "gcbs"):
        for base in ("random", "task"):
            assert quality[good]["theorem1_bound"] < quality[base]["theorem1_bound"] - 1.0, (good, base, quality)
            assert quality[good]["neg_sim_mean"] > quality[base]["neg_sim_mean"] + 0.005, (good, base, quality)
            assert quality[good]["neg_sim_hardest_mean"] > quality[base]["neg_sim_hardest_mean"] + 0.02
    # B3++ against the same b3 batches with as many random negatives from its own pool (not against b3
    # alone: extra candidates can only lower the bound, so that comparison could never fail)
    emb = load_embeddings(Path(code_mined.out) / "embeddings")
    _, _, top, _ = load_rank(code_mined)
    sched = scheds["b3pp"]
    rand = random_negatives_like(sched, np.asarray(emb.tasks), top)
    base = batch_quality(sched.ids, sched.offsets, emb.queries, emb.positives, code_mined.K, negatives=rand,
                         sample=None)
    assert quality["b3pp"]["theorem1_bound"] < base["theorem1_bound"] - 0.2, (quality["b3pp"], base)


def test_two_phase_estimate_covers_the_exact_bound_and_is_exact_with_exact_candidates(monkeypatch):
    """A sample of q queries with fewer than N positives in 16 q (quality.py, module docstring): the bound
    is the two-phase estimate. Over seeds its 95% interval holds the exact bound of every query most of the
    time; with neighbour lists that hold every query's exact top-K the correction is 0 and the estimate is
    the exact bound of the sampled queries; with every sampled query exact it is that exact value too."""
    from b3stream.mining import quality
    from b3stream.mining.rank import exact_search

    N, K, tau = 6000, 8, 0.05
    q, p, _ = clustered(N, d=16, clusters=40, seed=5)
    ids = np.random.default_rng(0).permutation(N)
    offsets = np.arange(0, N + 1, 60)
    truth = batch_quality(ids, offsets, q, p, K, temperature=tau, sample=None)
    assert truth["global_top_k"] == "exact" and truth["theorem1_bound_ci95"] is None
    covered, widths = 0, []
    for seed in range(12):
        est = batch_quality(ids, offsets, q, p, K, temperature=tau, sample=150, seed=seed)
        assert est["global_top_k"] == "two-phase" and est["queries"] == 150
        assert est["global_exact_queries"] == quality.MIN_EXACT and est["global_positives"] == 16 * 150
        assert est["global_correction"] > 0  # a sample of 2400 of 6000 positives misses some of the top-K
        lo, hi = est["theorem1_bound_ci95"]
        assert lo < est["theorem1_bound"] < hi
        covered += lo <= truth["theorem1_bound"] <= hi
        widths.append(hi - lo)
    assert covered >= 10, (covered, truth["theorem1_bound"])
    assert np.median(widths) < 1.5  # 150 queries: the query sample's spread is most of it

    # neighbour lists holding each query's exact top-K (here: the exact top-K ids themselves): no gap
    _, top_ids = exact_search(q, p, K, exclude=np.arange(N))
    with_nb = batch_quality(ids, offsets, q, p, K, temperature=tau, sample=150, seed=3, neighbours=(top_ids,))
    assert with_nb["global_neighbours"] is True and abs(with_nb["global_correction"]) < 1e-5
    monkeypatch.setattr(quality, "POSITIVES_PER_QUERY", N)  # the positive sample is every positive: exact
    exact_sample = batch_quality(ids, offsets, q, p, K, temperature=tau, sample=150, seed=3)
    assert exact_sample["global_top_k"] == "exact" and exact_sample["global_positives"] == N
    assert with_nb["theorem1_bound"] == pytest.approx(exact_sample["theorem1_bound"], abs=1e-4)
    assert exact_sample["theorem1_bound_ci95"] is not None  # still a sample of the queries
    monkeypatch.setattr(quality, "POSITIVES_PER_QUERY", 16)
    monkeypatch.setattr(quality, "MIN_EXACT", 150)  # every sampled query exact: the gap is measured for all
    all_exact = batch_quality(ids, offsets, q, p, K, temperature=tau, sample=150, seed=3)
    assert all_exact["global_exact_queries"] == 150
    assert all_exact["theorem1_bound"] == pytest.approx(exact_sample["theorem1_bound"], abs=1e-4)


def test_neighbour_lists_outside_the_universe_or_naming_the_query_are_skipped():
    """Candidates from the neighbour lists count only inside the bound's universe (a refresh's ids to come)
    and never the query's own positive: lists naming only such ids change nothing."""
    from b3stream.mining.quality import query_sample

    N, K = 3000, 6
    q, p, _ = clustered(N, d=16, clusters=30, seed=6)
    only = np.zeros(N, bool)
    only[np.random.default_rng(2).choice(N, size=2500, replace=False)] = True
    universe = np.flatnonzero(only)
    outside = np.flatnonzero(~only)
    nb = np.full((N, 4), -1, np.int64)
    nb[:, 0] = np.arange(N)  # the query itself
    nb[:, 1:] = np.random.default_rng(3).choice(outside, size=(N, 3))
    plain = query_sample(q, p, K, sample=100, seed=1, universe=universe)
    listed = query_sample(q, p, K, sample=100, seed=1, universe=universe, neighbours=(nb,))
    assert not plain.exact and listed.neighbours
    np.testing.assert_allclose(listed.top, plain.top, rtol=1e-6)
    no_top = query_sample(q, p, K, sample=100, seed=1, universe=universe,
                          neighbours=(np.zeros((N, 0), np.int32), nb))  # T of p = 0 has no columns
    np.testing.assert_allclose(no_top.top, plain.top, rtol=1e-6)


@pytest.mark.parametrize("chunk,K", [(65536, 8), (50, 8), (5, 8), (37, 1)])
def test_the_float16_screen_gives_the_exact_top_k(chunk, K):
    """quality.screened_topk (the CPU global top-K on float16 embeddings): a float16 screen and float32
    rescoring give the values of the float32 search, whatever the block size (blocks smaller than K too),
    the own positive left out; a screen whose assumed error is too small says so (None) instead of answering."""
    from b3stream.mining.quality import global_topk, screened_topk
    from b3stream.mining.rank import exact_search

    q, p, _ = clustered(900, d=24, clusters=12, seed=7)  # tight clusters: many near-ties around the K-th value
    q16, p16 = q.astype(np.float16), p.astype(np.float16)
    qs = q16[::7].astype(np.float32)
    own = np.arange(0, 900, 7)
    want, _ = exact_search(qs, p16, K, exclude=own)
    got = screened_topk(qs, p16, K, exclude=own, chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_allclose(global_topk(qs, own, p16, K), want, rtol=0, atol=2e-6)
    assert screened_topk(qs, p16, K, exclude=own, chunk=chunk, eps=1e-7) is None

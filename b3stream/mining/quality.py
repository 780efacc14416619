"""Batch quality before any training: the B3 paper's Theorem-1 bound and in-batch negative similarity.

Let ``s_ij = <x_i, y_j>`` be the teacher's cosine between query i and positive j, ``tau`` a temperature,
``N`` the number of examples and ``B_i`` the negatives query i sees in its batch (the other members' positives,
plus the batch's B3++ hard negatives when the schedule has them). Our reading of Theorem 1:

    H_i^K      = sum of the K largest exp(s_ij / tau) over all j != i           (the whole data)
    H_{B_i,i}^K = sum of the K largest exp(s_ij / tau) over j in B_i              (the batch)
    bound_i    = log( N/K * H_i^K / H_{B_i,i}^K )

It bounds how much of query i's full-data negative mass its batch misses:
``sum_{j != i} exp(s_ij/tau) <= (N/K) H_i^K`` (the mean of all N-1 < N terms is at most the mean of the K
largest) and ``sum_{j in B_i} exp(s_ij/tau) >= H_{B_i,i}^K``, so ``log`` of the ratio of full-data to in-batch
negative mass, the gap between the full-data and the in-batch InfoNCE denominators, is at most ``bound_i``.
A batch that holds query i's hardest negatives makes ``H_{B_i,i}^K`` close to ``H_i^K`` and the bound close
to its floor ``log(N/K)``; random batches leave it far above. We report the mean of ``bound_i`` over queries
(lower is better), computed in log space (``tau = 0.02`` makes the exponentials overflow otherwise). When a
batch offers fewer than K negatives, all of them are summed. K defaults to the community size K.

Also reported, over the same queries: the mean in-batch negative similarity (mean over queries of the mean
``s_ij``, j in B_i), the mean over queries of the *hardest* in-batch negative's similarity, and the maximum.

Bounded memory: the global part is a top-K over positives for a seeded sample of queries, in blocks of
positives (never N x N); the batch part multiplies each sampled query with its own batch only.

**Every query (``sample=None``, or a sample of at least N)**: the bound is exact, every ``H_i^K`` an exact
top-K over all positives (one pass over them per query block): O(N^2 d), meant for small data.

**A sample of q queries** (the schedule stage's ``quality_sample``, 2048): the bound is an *estimate* of the
mean over all queries, with a 95% interval. An exact ``H_i^K`` for every sampled query would cost
O(q N d), a pass over every positive for every sampled query (91 of the 92 s of the schedule stage at
N = 10M on 2 cores). A uniformly sampled set of positives alone does not estimate ``H_i^K`` well: at
tau = 0.02 it is carried by the few most similar positives, which a sample of 1/16 of the positives mostly
misses (on the synthetic 1M data of ``tools/bench_mining.py``: -0.4 nats on average, 0.9 nats spread). So
the global term is a two-phase (double sampling) difference estimate:

1. *candidates*, every sampled query: the top-K of ``s_ij`` over a seeded sample of ``16 q`` positives
   (``POSITIVES_PER_QUERY``) together with the query's neighbour lists of the rank stage when the schedule
   stage passes them (``T[i]`` and ``S[i]``: its top ``p + m`` positives of its rank group, which hold its
   global top-K whenever the ranking was exact, one task, no same-text duplicate): ``H~_i^K <= H_i^K``;
2. *exact*, a seeded subsample of ``max(64, q / 16)`` of those queries (``EXACT_SHARE``, ``MIN_EXACT``):
   ``H_i^K`` by the exact search over all positives, O(q/16 N d);
3. the estimate: the mean over the sampled queries of the bound computed with ``H~_i^K``, plus the mean over
   the exact subsample of the gap ``log H_i^K - log H~_i^K`` (>= 0; recorded as ``global_correction``):
   unbiased for the mean over the q queries, and with them for the mean over all N queries. Its variance
   is the double-sampling one, ``S_y^2 (1/q - 1/N) + S_d^2 (1/q_e - 1/q)`` (``y`` the exact bound of a
   query, ``d`` its gap, ``q_e`` the exact subsample), estimated from the samples; the record's
   ``theorem1_bound_ci95`` is the estimate +- 1.96 standard errors (normal approximation). When the
   candidates hold the exact top-K (good neighbour lists) the gap is 0 and the interval is that of the
   query sample alone; when the positive sample covers every positive the candidates are the exact search
   and there is no gap to estimate.

The in-batch similarities (``neg_sim_*``) are means over the sampled queries, as before (no interval).

Record fields (:func:`batch_quality`): ``theorem1_bound`` (the mean bound, exact or estimated),
``theorem1_bound_ci95`` (``[lo, hi]``, or null when the bound is exact), ``theorem1_floor``,
``global_top_k`` (``exact``: every scored query's ``H_i^K`` exact; ``two-phase``: the estimate above),
``global_exact_queries`` (queries with an exact ``H_i^K``), ``global_positives`` (positives in the
candidates' sample; N when exact), ``global_neighbours`` (whether the rank stage's neighbour lists joined
the candidates), ``global_correction`` (the mean gap added; 0 when exact), and as before ``K``,
``temperature``, ``queries``, ``N``, ``neg_sim_*``, ``with_hard_negatives``.

A refresh in the middle of an epoch scores the ids still to come (``only``): the rest of the epoch trains
them, and only them, so they are the whole data of the bound: the queries, the global top-K ``H_i^K`` (over
their positives only; the trained ids' rows are stale, kept from an earlier model, and never trained again
this epoch) and the floor ``log(N/K)`` (N = the number of ids to come) all range over them; the record's
``N`` says how many.

One global part, several schedules: ``H_i^K`` depends on the embeddings, the sample and K, not on the
batches, so scoring a new schedule and the one it replaces under the same embeddings (refreshed mode's
``quality`` and ``quality_previous``) shares one :func:`query_sample` (the top-K passes, the costly part)
and only the batch part runs twice.

Everything is a pure function of the embeddings, the neighbour lists, K, the sample size and the seed (the
samples are drawn from ``numpy.random.default_rng(seed)``), so reruns record the same numbers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    return (mx + np.log(np.sum(np.exp(x - mx), axis=axis, keepdims=True))).squeeze(axis)


def _sig(x: float, digits: int = 6) -> float:
    """Round to significant digits so metadata is stable across BLAS summation orders."""
    return float(f"{float(x):.{digits}g}")


POSITIVES_PER_QUERY = 16  # the candidates' positive sample: this many positives per sampled query
EXACT_SHARE = 16  # one sampled query in this many gets an exact H_i^K (the two-phase estimate's second phase)
MIN_EXACT = 64  # ... and at least this many


def global_topk(query_vecs: np.ndarray, query_ids: np.ndarray, positives: np.ndarray, K: int,
                progress: bool = False, device=None) -> np.ndarray:
    """The K largest s_ij over all j != i for each given query (float32, (len(query_ids), K)), exact.

    On the CPU, with float16 positives and queries (the embed stage's), by :func:`screened_topk`; else (or if
    its check fails) by the float32 search of :func:`~b3stream.mining.rank.exact_search`."""
    from .rank import exact_search

    query_vecs = np.asarray(query_vecs, dtype=np.float32)
    if (device is None or str(device) == "cpu") and np.asarray(positives[:1]).dtype == np.float16 and \
            np.array_equal(query_vecs.astype(np.float16).astype(np.float32), query_vecs):
        top = screened_topk(query_vecs, positives, K, exclude=query_ids)
        if top is not None:
            return top
    top, _ = exact_search(query_vecs, positives, K, exclude=query_ids, progress=progress,
                          desc="quality: global top-K", device=device)
    return top


SCREEN_EPS = 1e-3  # a bound on |float16 product - exact| for unit vectors (2^-11 output rounding, fp32 sums)


def screened_topk(queries: np.ndarray, base: np.ndarray, K: int, exclude: np.ndarray | None = None,
                  chunk: int = 65536, eps: float = SCREEN_EPS) -> np.ndarray | None:
    """The exact top-``K`` values of ``queries @ base.T`` (float16 rows, L2-normalised; own rows
    ``exclude[r]`` skipped), by a float16 screen and float32 rescoring: None when the screen's own check fails.

    Converting every float16 positive to float32 is most of an exact search on the CPU (and its float32
    products three times the float16 ones). Here each block's products are taken in float16 (torch's CPU
    kernel sums in float32 and rounds the result: off by at most 2^-11 |s| plus the sum's rounding, under
    ``eps`` for unit vectors), and only the entries that may still enter a query's top-K are recomputed in
    float32: those whose float16 product is at least (the K-th best exact value so far) - ``eps``, or, before
    a query has K values, (the block's K-th best float16 product) - 2 ``eps``. An entry of the exact top-K
    always passes (its float16 product is within ``eps`` of its value, which is at least the final K-th
    best, itself at least either threshold), so the result is the exact top-K. The assumed ``eps`` is
    checked on every recomputed entry; a larger difference (another kernel) returns None and the caller
    searches in float32."""
    import torch

    nq = len(queries)
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    q16 = torch.from_numpy(q32.astype(np.float16))
    best_v = np.full((nq, K), -np.inf, dtype=np.float32)
    best_i = np.full((nq, K), -1, dtype=np.int64)
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64)
    rows_all = np.arange(nq)
    for lo in range(0, len(base), chunk):
        block = np.ascontiguousarray(base[lo : lo + chunk])
        width = len(block)
        with warnings.catch_warnings():  # a read-only memmap's rows: only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            s16 = (q16 @ torch.from_numpy(block).T).float().numpy()
        if ex is not None:
            inside = np.flatnonzero((ex >= lo) & (ex < lo + width))
            s16[inside, ex[inside] - lo] = -np.inf
        cut = best_v[:, -1] - eps  # -inf where a query has fewer than K values yet
        fresh = ~np.isfinite(best_v[:, -1])
        if fresh.any():
            if width >= K:
                kth = -np.partition(-s16[fresh], K - 1, axis=1)[:, K - 1]
                cut[fresh] = np.where(np.isfinite(kth), kth - 2 * eps, -np.inf)
            else:
                cut[fresh] = -np.inf
        qi, col = np.nonzero((s16 >= cut[:, None]) & np.isfinite(s16))
        if not len(qi):
            continue
        exact = np.einsum("nd,nd->n", q32[qi], block[col].astype(np.float32))
        if np.any(np.abs(exact - s16[qi, col]) > eps):
            return None
        # merge: each query's K best of what it had and its new entries
        all_q = np.concatenate([np.repeat(rows_all, K), qi])
        all_v = np.concatenate([best_v.ravel(), exact.astype(np.float32)])
        all_i = np.concatenate([best_i.ravel(), col + lo])
        order = np.lexsort((all_i, -all_v, all_q))
        sq = all_q[order]
        starts = np.flatnonzero(np.concatenate([[True], sq[1:] != sq[:-1]]))
        rank = np.arange(len(sq)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(sq)]])))
        keep = order[rank < K]
        best_v[all_q[keep], rank[rank < K]] = all_v[keep]
        best_i[all_q[keep], rank[rank < K]] = all_i[keep]
    return best_v


@dataclass
class QuerySample:
    """The scored queries and their global top-K: everything of the bound that does not depend on the
    schedule (module docstring), to share between schedules scored under the same embeddings."""

    chosen: np.ndarray  # the sampled query ids, sorted
    vectors: np.ndarray  # their embeddings, float32
    top: np.ndarray  # (len(chosen), K): the K largest s_ij over the candidates (all j != i when exact)
    K: int  # the top-K size, after clipping to N - 1
    N: int  # the universe's size
    sample: int | None  # queries asked for (None: every query)
    seed: int
    universe: np.ndarray | None = None  # the ids the bound ranges over, sorted (None: all)
    # The two-phase estimate (module docstring); None / N / False when ``top`` is exact for every query.
    exact_rows: np.ndarray | None = None  # rows of ``chosen`` with an exact H_i^K, sorted
    exact_top: np.ndarray | None = None  # (len(exact_rows), K): their exact top-K
    positives: int = 0  # positives in the candidates' sample (N: all, the search is exact)
    neighbours: bool = False  # whether the rank stage's neighbour lists joined the candidates

    def fits(self, N: int, K: int, sample: int | None, seed: int, universe: np.ndarray | None = None) -> bool:
        """Whether this is the sample :func:`query_sample` would compute for these arguments."""
        same = (universe is None and self.universe is None) or (
            universe is not None and self.universe is not None and np.array_equal(universe, self.universe))
        return same and (self.N, self.K, self.sample, self.seed) == (N, _clip_k(K, N), _all_or(sample, N), seed)

    @property
    def exact(self) -> bool:
        return self.exact_rows is None


def _clip_k(K: int, N: int) -> int:
    return int(max(1, min(K, N - 1)))


def _all_or(sample: int | None, N: int) -> int | None:
    """``sample`` with every way of asking for all N queries written as None."""
    return None if sample is None or sample >= N else int(sample)


def query_sample(queries: np.ndarray, positives: np.ndarray, K: int, sample: int | None = 2048, seed: int = 0,
                 progress: bool = False, universe: np.ndarray | None = None,
                 neighbours: tuple[np.ndarray, ...] | None = None, device=None) -> QuerySample:
    """The seeded query sample of :func:`batch_quality` and its global top-K (the costly part), for one or
    more ``batch_quality(..., scored=...)`` calls. Every query: exact. A sample: the two-phase estimate's
    candidates and exact subsample (module docstring).

    Args:
        universe: the sorted ids the bound ranges over (queries and positives; None: all).
        neighbours: arrays of global ids with one row per id (the rank stage's ``T`` and ``S``, -1 padded)
            whose entries join each sampled query's candidates (ids outside the universe, and the query
            itself, are skipped); None: the positive sample alone.
        device: where the products run (None: the CPU; the miner passes its own device).
    """
    N = len(positives) if universe is None else len(universe)
    rng = np.random.default_rng(seed)
    pick = np.arange(N) if sample is None or sample >= N else np.sort(rng.choice(N, size=sample, replace=False))
    uni = None if universe is None else np.asarray(universe, np.int64)
    chosen = pick if uni is None else uni[pick]
    qv = np.asarray(queries[chosen], dtype=np.float32)
    K = _clip_k(K, N)
    base = positives if uni is None else np.asarray(positives[uni])
    common = dict(chosen=chosen, vectors=qv, K=K, N=N, sample=_all_or(sample, N), seed=seed, universe=uni)
    n_pos = min(N, POSITIVES_PER_QUERY * len(pick))
    if len(pick) == N or n_pos >= N:  # every query, or a positive sample of every positive: exact
        top = global_topk(qv, pick, base, K, progress=progress, device=device)  # own positive excluded
        return QuerySample(top=top, positives=N, **common)
    # Phase 1, every sampled query: the top-K over a seeded sample of positives and its neighbour lists.
    drawn = np.sort(rng.choice(N, size=n_pos, replace=False))
    at = np.minimum(np.searchsorted(drawn, pick), n_pos - 1)
    own = np.where(drawn[at] == pick, at, -1)  # the query's own positive, where the sample holds it
    from .rank import exact_search

    top, idx = exact_search(qv, base[drawn], K, exclude=own, progress=progress,
                            desc="quality: sampled top-K", device=device)
    cand_ids = np.where(idx >= 0, drawn[np.maximum(idx, 0)], -1)  # universe positions
    use_neighbours = neighbours is not None and len(neighbours) > 0
    if use_neighbours:
        top = _with_neighbours(top, cand_ids, qv, pick, chosen, base, uni, neighbours, K)
    # Phase 2, a seeded subsample: the exact top-K over every positive.
    n_exact = min(len(pick), max(MIN_EXACT, len(pick) // EXACT_SHARE))
    rows = np.sort(rng.choice(len(pick), size=n_exact, replace=False))
    exact_top = global_topk(qv[rows], pick[rows], base, K, progress=progress, device=device)
    return QuerySample(top=top, exact_rows=rows, exact_top=exact_top, positives=n_pos, neighbours=use_neighbours,
                       **common)


def _with_neighbours(top: np.ndarray, cand_ids: np.ndarray, qv: np.ndarray, pick: np.ndarray, chosen: np.ndarray,
                     base: np.ndarray, uni: np.ndarray | None, neighbours: tuple[np.ndarray, ...], K: int,
                     chunk: int = 256) -> np.ndarray:
    """The top-K over the union of each query's sampled candidates (``top``, ids ``cand_ids``, universe
    positions) and its neighbour lists' entries inside the universe, each id once, the query's own left out."""
    nb = np.concatenate([np.asarray(a[chosen], dtype=np.int64).reshape(len(chosen), a.shape[1] if np.ndim(a) > 1
                                                                          else 1) for a in neighbours], 1)
    if uni is not None:  # global ids -> universe positions (-1 outside it)
        at = np.minimum(np.searchsorted(uni, nb), len(uni) - 1)
        nb = np.where((nb >= 0) & (uni[at] == nb), at, -1)
    nb = np.where(nb == pick[:, None], -1, nb)
    out = np.empty_like(top)
    for lo in range(0, len(pick), chunk):
        part = nb[lo : lo + chunk]
        vecs = np.asarray(base[np.maximum(part, 0).ravel()], dtype=np.float32).reshape(*part.shape, -1)
        # the search's own values for its candidates, then the neighbour lists' products
        sims = np.concatenate([top[lo : lo + chunk], np.einsum("qd,qcd->qc", qv[lo : lo + chunk], vecs)], 1)
        ids = np.concatenate([cand_ids[lo : lo + chunk], part], 1)
        valid = ids >= 0
        order = np.argsort(np.where(valid, ids, np.iinfo(np.int64).max), axis=1, kind="stable")
        ids, sims, valid = (np.take_along_axis(a, order, 1) for a in (ids, sims, valid))
        valid[:, 1:] &= ids[:, 1:] != ids[:, :-1]  # each id once
        sims = np.where(valid, sims, -np.inf).astype(np.float32)
        out[lo : lo + chunk] = -np.sort(-sims, axis=1)[:, :K]
    return out


def batch_quality(ids: np.ndarray, offsets: np.ndarray, queries: np.ndarray, positives: np.ndarray, K: int,
                  temperature: float = 0.02, negatives: np.ndarray | None = None, sample: int | None = 2048,
                  seed: int = 0, progress: bool = False, scored: QuerySample | None = None,
                  only: np.ndarray | None = None, neighbours: tuple[np.ndarray, ...] | None = None,
                  device=None) -> dict:
    """Theorem-1 bound and in-batch negative similarity of a schedule (module docstring).

    Args:
        ids, offsets: the schedule's flat batches (batch b = ids[offsets[b]:offsets[b+1]]).
        queries, positives: teacher embeddings (N x d, L2-normalised; memmaps fine).
        K: top-K size of the bound.
        negatives: B3++ hard negatives aligned with ``ids`` (they join every query's batch negatives).
        sample: number of queries scored (seeded); None or >= N: all.
        scored: the :func:`query_sample` of these embeddings for the same K, sample and seed, computed once
            for several schedules (the values are those of computing it here); None computes it.
        only: a boolean mask over the ids: the universe of the bound (the ids a refreshed trainer has still
            to train this epoch; ``ids`` then holds those only): queries, global top-K and N range over it.
        neighbours, device: :func:`query_sample`'s, when ``scored`` is None.
    """
    universe = None if only is None else np.flatnonzero(only)
    N = len(positives) if universe is None else len(universe)
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if scored is None:
        scored = query_sample(queries, positives, K, sample, seed, progress=progress, universe=universe,
                              neighbours=neighbours, device=device)
    elif not scored.fits(N, K, sample, seed, universe):
        raise ValueError(f"the shared query sample was drawn for N={scored.N}, K={scored.K}, "
                         f"sample={scored.sample}, seed={scored.seed}"
                         f"{'' if scored.universe is None else ' over a subset'}, not N={N}, K={_clip_k(K, N)}, "
                         f"sample={sample}, seed={seed}{'' if universe is None else ' over a subset'}")
    K, chosen, qv, top = scored.K, scored.chosen, scored.vectors, scored.top
    log_h_global = _logsumexp(top / temperature, axis=1)

    where = np.empty(len(positives), dtype=np.int64)
    where[ids] = np.arange(len(ids))
    batch_of = np.searchsorted(offsets, where[chosen], side="right") - 1
    order = np.argsort(batch_of, kind="stable")
    starts = np.flatnonzero(np.concatenate([[True], batch_of[order][1:] != batch_of[order][:-1]]))
    log_h_batch = np.empty(len(chosen))
    neg_mean = np.empty(len(chosen))
    neg_max = np.empty(len(chosen))
    bounds = list(starts) + [len(order)]

    def score_batches(first: int, last: int) -> None:  # the batches bounds[first:last] (their rows only)
        for a, b in zip(bounds[first:last], bounds[first + 1 : last + 1]):
            rows = order[a:b]
            bidx = batch_of[rows[0]]
            lo, hi = offsets[bidx], offsets[bidx + 1]
            cand = np.sort(ids[lo:hi])  # in id order: the rows are read from the file in order
            if negatives is not None:
                cand = np.unique(np.concatenate([cand, negatives[lo:hi].ravel()]))
                cand = cand[cand >= 0]  # -1: a slot a small task could not fill
            # einsum, not a BLAS gemm: a few rows times one batch, where a threaded BLAS (waking its threads
            # beside torch's) took 30x longer
            sims = np.einsum("rd,cd->rc", qv[rows], np.asarray(positives[cand], dtype=np.float32))
            own = cand[None, :] == chosen[rows][:, None]
            sims[own] = -np.inf
            n_neg = sims.shape[1] - 1
            if n_neg <= 0:  # a batch of one has no negatives
                log_h_batch[rows], neg_mean[rows], neg_max[rows] = -np.inf, np.nan, np.nan
                continue
            kk = min(K, n_neg)
            part = -np.partition(-sims, kk - 1, axis=1)[:, :kk]
            log_h_batch[rows] = _logsumexp(part / temperature, axis=1)
            finite = np.where(own, 0.0, sims)
            neg_mean[rows] = finite.sum(1) / n_neg
            neg_max[rows] = sims.max(1)

    # the batches side by side on the process's threads (each writes its own queries' rows only)
    from .graph import _in_threads

    _in_threads(score_batches, len(starts))
    bound = np.log(N / K) + log_h_global - log_h_batch
    ok = np.isfinite(bound)
    estimate, interval, correction = _estimate(bound, ok, scored, temperature, log_h_global)
    return {
        "theorem1_bound": estimate,
        "theorem1_bound_ci95": interval,
        "theorem1_floor": _sig(np.log(N / K)),
        "neg_sim_mean": _sig(np.nanmean(neg_mean)) if ok.any() else None,
        "neg_sim_hardest_mean": _sig(np.nanmean(neg_max)) if ok.any() else None,
        "neg_sim_max": _sig(np.nanmax(neg_max)) if ok.any() else None,
        "K": K, "temperature": temperature, "queries": int(len(chosen)), "N": int(N),
        "with_hard_negatives": negatives is not None,
        "global_top_k": "exact" if scored.exact else "two-phase",
        "global_exact_queries": int(len(chosen) if scored.exact else len(scored.exact_rows)),
        "global_positives": int(scored.positives), "global_neighbours": bool(scored.neighbours),
        "global_correction": correction,
    }


def _estimate(bound: np.ndarray, ok: np.ndarray, scored: QuerySample, temperature: float,
              log_h_global: np.ndarray) -> tuple[float | None, list[float] | None, float]:
    """(mean bound, its 95% interval or None when exact, the two-phase correction) from the per-query bounds
    (``ok``: the queries whose batch has a negative; module docstring)."""
    if not ok.any():
        return None, None, 0.0
    n1, N = int(ok.sum()), scored.N
    if scored.exact:
        y = bound[ok]
        if scored.sample is None or len(y) < 2:  # every query: the bound itself
            return _sig(y.mean()), None, 0.0
        se = np.sqrt(np.var(y, ddof=1) * (1 / n1 - 1 / N))
        return _sig(y.mean()), [_sig(y.mean() - 1.96 * se), _sig(y.mean() + 1.96 * se)], 0.0
    rows = scored.exact_rows[ok[scored.exact_rows]]
    gap = _logsumexp(scored.exact_top[ok[scored.exact_rows]] / temperature, axis=1) - log_h_global[rows]
    x = bound[ok]
    estimate = x.mean() + (gap.mean() if len(gap) else 0.0)
    if len(gap) < 2:
        return _sig(estimate), None, _sig(gap.mean()) if len(gap) else 0.0
    # S_y^2 from the exact subsample's y = x + gap: var(x) over every query, var(gap) and cov(x, gap) over
    # the subsample
    xs = bound[rows]
    var_y = np.var(x, ddof=1) + np.var(gap, ddof=1) + 2 * np.cov(xs, gap, ddof=1)[0, 1]
    var = max(var_y, 0.0) * (1 / n1 - 1 / N) + np.var(gap, ddof=1) * (1 / len(gap) - 1 / n1)
    se = float(np.sqrt(max(var, 0.0)))
    return _sig(estimate), [_sig(estimate - 1.96 * se), _sig(estimate + 1.96 * se)], _sig(gap.mean())


def schedule_quality(schedule, queries: np.ndarray, positives: np.ndarray, K: int | None = None,
                     temperature: float = 0.02, sample: int | None = 2048, seed: int = 0,
                     progress: bool = False) -> dict:
    """:func:`batch_quality` of a :class:`~b3stream.schedule.Schedule` (K from its metadata)."""
    K = K or int(schedule.meta.get("K") or 32)
    return batch_quality(schedule.ids, schedule.offsets, queries, positives, K, temperature,
                         negatives=schedule.negative_ids, sample=sample, seed=seed, progress=progress)

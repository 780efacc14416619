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

Bounded memory: the global part is an exact top-K over all positives for a seeded sample of queries, in
blocks of positives (never N x N; ``sample=None`` uses every query); the batch part multiplies each sampled
query with its own batch only.

A refresh in the middle of an epoch scores the ids still to come (``only``): the rest of the epoch trains
them, and only them, so they are the whole data of the bound: the queries, the global top-K ``H_i^K`` (over
their positives only; the trained ids' rows are stale, kept from an earlier model, and never trained again
this epoch) and the floor ``log(N/K)`` (N = the number of ids to come) all range over them; the record's
``N`` says how many.

One global part, several schedules: ``H_i^K`` depends on the embeddings, the sample and K, not on the
batches, so scoring a new schedule and the one it replaces under the same embeddings (refreshed mode's
``quality`` and ``quality_previous``) shares one :func:`query_sample` (the exact top-K, the costly pass)
and only the batch part runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    mx = np.max(x, axis=axis, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    return (mx + np.log(np.sum(np.exp(x - mx), axis=axis, keepdims=True))).squeeze(axis)


def _sig(x: float, digits: int = 6) -> float:
    """Round to significant digits so metadata is stable across BLAS summation orders."""
    return float(f"{float(x):.{digits}g}")


def global_topk(query_vecs: np.ndarray, query_ids: np.ndarray, positives: np.ndarray, K: int,
                progress: bool = False) -> np.ndarray:
    """The K largest s_ij over all j != i for each given query (float32, (len(query_ids), K))."""
    from .rank import exact_search

    top, _ = exact_search(query_vecs, positives, K, exclude=query_ids, progress=progress,
                          desc="quality: global top-K")
    return top


@dataclass
class QuerySample:
    """The scored queries and their global top-K: everything of the bound that does not depend on the
    schedule (module docstring), to share between schedules scored under the same embeddings."""

    chosen: np.ndarray  # the sampled query ids, sorted
    vectors: np.ndarray  # their embeddings, float32
    top: np.ndarray  # (len(chosen), K): the K largest s_ij over all j != i in the universe
    K: int  # the top-K size, after clipping to N - 1
    N: int  # the universe's size
    sample: int | None  # queries asked for (None: every query)
    seed: int
    universe: np.ndarray | None = None  # the ids the bound ranges over, sorted (None: all)

    def fits(self, N: int, K: int, sample: int | None, seed: int, universe: np.ndarray | None = None) -> bool:
        """Whether this is the sample :func:`query_sample` would compute for these arguments."""
        same = (universe is None and self.universe is None) or (
            universe is not None and self.universe is not None and np.array_equal(universe, self.universe))
        return same and (self.N, self.K, self.sample, self.seed) == (N, _clip_k(K, N), _all_or(sample, N), seed)


def _clip_k(K: int, N: int) -> int:
    return int(max(1, min(K, N - 1)))


def _all_or(sample: int | None, N: int) -> int | None:
    """``sample`` with every way of asking for all N queries written as None."""
    return None if sample is None or sample >= N else int(sample)


def query_sample(queries: np.ndarray, positives: np.ndarray, K: int, sample: int | None = 2048, seed: int = 0,
                 progress: bool = False, universe: np.ndarray | None = None) -> QuerySample:
    """The seeded query sample of :func:`batch_quality` and its exact top-K over all positives (the costly
    part: one pass over every positive), for one or more ``batch_quality(..., scored=...)`` calls.
    ``universe``: the sorted ids the bound ranges over (queries and positives; None: all)."""
    N = len(positives) if universe is None else len(universe)
    rng = np.random.default_rng(seed)
    pick = np.arange(N) if sample is None or sample >= N else np.sort(rng.choice(N, size=sample, replace=False))
    chosen = pick if universe is None else np.asarray(universe, np.int64)[pick]
    qv = np.asarray(queries[chosen], dtype=np.float32)
    K = _clip_k(K, N)
    base = positives if universe is None else np.asarray(positives[np.asarray(universe, np.int64)])
    top = global_topk(qv, pick, base, K, progress=progress)  # own positive excluded by its row in ``base``
    return QuerySample(chosen=chosen, vectors=qv, top=top, K=K, N=N, sample=_all_or(sample, N), seed=seed,
                       universe=None if universe is None else np.asarray(universe, np.int64))


def batch_quality(ids: np.ndarray, offsets: np.ndarray, queries: np.ndarray, positives: np.ndarray, K: int,
                  temperature: float = 0.02, negatives: np.ndarray | None = None, sample: int | None = 2048,
                  seed: int = 0, progress: bool = False, scored: QuerySample | None = None,
                  only: np.ndarray | None = None) -> dict:
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
    """
    universe = None if only is None else np.flatnonzero(only)
    N = len(positives) if universe is None else len(universe)
    ids = np.asarray(ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if scored is None:
        scored = query_sample(queries, positives, K, sample, seed, progress=progress, universe=universe)
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
    for a, b in zip(bounds[:-1], bounds[1:]):
        rows = order[a:b]
        bidx = batch_of[rows[0]]
        lo, hi = offsets[bidx], offsets[bidx + 1]
        cand = ids[lo:hi]
        if negatives is not None:
            cand = np.unique(np.concatenate([cand, negatives[lo:hi].ravel()]))
            cand = cand[cand >= 0]  # -1: a slot a small task could not fill
        sims = qv[rows] @ np.asarray(positives[cand], dtype=np.float32).T
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
    bound = np.log(N / K) + log_h_global - log_h_batch
    ok = np.isfinite(bound)
    return {
        "theorem1_bound": _sig(bound[ok].mean()) if ok.any() else None,
        "theorem1_floor": _sig(np.log(N / K)),
        "neg_sim_mean": _sig(np.nanmean(neg_mean)) if ok.any() else None,
        "neg_sim_hardest_mean": _sig(np.nanmean(neg_max)) if ok.any() else None,
        "neg_sim_max": _sig(np.nanmax(neg_max)) if ok.any() else None,
        "K": K, "temperature": temperature, "queries": int(len(chosen)), "N": int(N),
        "with_hard_negatives": negatives is not None,
    }


def schedule_quality(schedule, queries: np.ndarray, positives: np.ndarray, K: int | None = None,
                     temperature: float = 0.02, sample: int | None = 2048, seed: int = 0,
                     progress: bool = False) -> dict:
    """:func:`batch_quality` of a :class:`~b3stream.schedule.Schedule` (K from its metadata)."""
    K = K or int(schedule.meta.get("K") or 32)
    return batch_quality(schedule.ids, schedule.offsets, queries, positives, K, temperature,
                         negatives=schedule.negatives, sample=sample, seed=seed, progress=progress)

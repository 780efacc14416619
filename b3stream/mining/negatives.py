"""B3++ hard negatives: ``h`` extra negatives per example, drawn per batch (B3 paper, section 3.2).

For a batch ``B`` the rows ``S[i]`` of its members are pooled into one *unified* distribution

    Pr(j) proportional to  #{ (i, c) : i in B, S[i, c] = j },     j not in X(B),
    X(B) = B  union  { T[i, c] : i in B },

so an example that many members rank among their strong negatives is the most likely pick. Excluded are the
members (they are in-batch negatives already), every member's top-p ranks ``T[i]`` (likely false negatives of
``i``: paraphrases, duplicates) and every id whose positive text equals a member's (same content key,
:mod:`b3stream.data.dedup`: a correct answer under another id) or one of a member's known positives (the
other positives of its query). ``T[i]`` never entered ``S[i]``, but it can
enter *another* member's row ``S[k]``, and since the trainer shares the ``h * |B|`` negatives with every query
of the global batch, a ``j`` in ``T[i]`` drawn through ``S[k]`` would be a negative for ``i`` after all; hence
the union. ``h * |B|`` *distinct* ids are drawn without replacement and reshaped to ``(|B|, h)``, row ``i``
aligned with the batch's ``i``-th id; the row assignment only decides whose text carries which negative.

Drawing without replacement with probabilities proportional to counts is done with the Gumbel-top-k trick
(the k largest of ``log count_j + Gumbel noise`` are a weighted sample without replacement), vectorised over
the unique candidates of the batch; ``X(B)`` is one sort of the members and the pooled rows ``T[B]``, and
the candidates are tested against it by ``searchsorted``. The work is O(|B| (p+m) log(|B| (p+m))) per batch,
never O(N).

When the pooled rows hold fewer than ``h |B|`` distinct candidates (small tasks, heavy padding), every
candidate is taken and the rest is drawn uniformly from ``pool`` (the ids of the batch's tasks), still
distinct and outside ``X(B)``, by rejection sampling. When even the pool has fewer than ``h |B|`` ids
outside ``X(B)`` (a task of fewer than about (h+1+p)|B| examples), all of them are taken and the remaining
slots are ``-1``, which the trainer skips: negatives never repeat and are never a member nor a member's
top-p; S candidates come from the members' rank group (their task when ranked per task), the fill-up from
the batch's tasks.
"""

from __future__ import annotations

import numpy as np

from ..data.dedup import KnownKeys


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique(x)`` by sort and adjacent compare: numpy 2.x's plain ``np.unique`` of integers goes
    through a hash table and then sorts, about 20x slower than this for the ~|B| p ids of a batch."""
    x = np.sort(x)
    return x[np.concatenate([[True], x[1:] != x[:-1]])] if len(x) else x


def _contains(sorted_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``x in sorted_ids`` elementwise, by binary search (``sorted_ids`` sorted and unique)."""
    if len(sorted_ids) == 0:
        return np.zeros(len(x), dtype=bool)
    pos = np.searchsorted(sorted_ids, x)
    pos[pos == len(sorted_ids)] = 0
    return sorted_ids[pos] == x


def excluded_ids(batch: np.ndarray, top: np.ndarray | None = None) -> np.ndarray:
    """X(B): the sorted ids no query of ``batch`` may get as a hard negative, the members and the union of
    their top-p rows ``top[i]`` (module docstring); -1 padding dropped. ``top=None``: the members only."""
    members = _sorted_unique(np.asarray(batch, dtype=np.int64))
    if top is None or top.shape[1] == 0 or len(members) == 0:
        return members
    t = np.asarray(top[members], dtype=np.int64).ravel()  # sorted rows: sequential reads from a memmap
    return _sorted_unique(np.concatenate([members, t[t >= 0]]))


def member_keys(batch: np.ndarray, keys: np.ndarray, known: KnownKeys | None = None) -> np.ndarray:
    """The sorted content keys that are positives of some member of ``batch``: the members' own and, with
    ``known``, their known positives' (the other positives of their queries)."""
    batch = np.asarray(batch, dtype=np.int64)
    own = keys[batch]
    return _sorted_unique(own if known is None else np.concatenate([own, known.of(batch)]))


def same_text(ids: np.ndarray, batch: np.ndarray, keys: np.ndarray | None,
              known: KnownKeys | None = None) -> np.ndarray:
    """Whether each of ``ids`` has the same positive text (content key) as some member of ``batch``, or as
    one of a member's known positives."""
    if keys is None or len(ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    return _contains(member_keys(batch, keys, known), keys[ids])


def candidate_counts(batch: np.ndarray, S: np.ndarray, top: np.ndarray | None = None,
                     excluded: np.ndarray | None = None, keys: np.ndarray | None = None,
                     known: KnownKeys | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids in the S rows of ``batch`` outside X(B) (members, their top-p, padding, and with ``keys``
    the ids sharing a member's positive text or, with ``known``, one of a member's known positives' texts)
    and how often each occurs. ``excluded``: X(B) when the caller has it already (else built from ``top``)."""
    members = _sorted_unique(np.asarray(batch, dtype=np.int64))
    cand = np.asarray(S[members]).ravel()
    cand = cand[cand >= 0]
    uniq, counts = np.unique(cand, return_counts=True)
    if excluded is None:
        excluded = excluded_ids(members, top)
    outside = ~_contains(excluded, uniq) & ~same_text(uniq, members, keys, known)
    return uniq[outside], counts[outside]


def draw_hard_negatives(batch: np.ndarray, S: np.ndarray, h: int, rng: np.random.Generator,
                        pool: np.ndarray | None = None, top: np.ndarray | None = None,
                        keys: np.ndarray | None = None, key_index: KeyIndex | None = None,
                        known: KnownKeys | None = None) -> np.ndarray:
    """``(len(batch), h)`` distinct hard negatives for one batch (module docstring).

    Args:
        batch: the batch's ids.
        S: neighbour lists (N x m, -1 padded).
        h: negatives per example.
        rng: the schedule's generator (consumed deterministically).
        pool: sorted ids the uniform fill-up may draw from (default: all ids 0..N-1).
        top: the skipped top-p ranks T (N x p, -1 padded); every member's row is excluded along with the
            members. None excludes the members only (for callers without T; b3pp always passes it).
        keys: content keys of every id's positive (N,); ids sharing a member's key are never drawn.
        key_index: ``KeyIndex(keys)``, built once per schedule by the caller (else per call, O(N log N)).
        known: content keys of every id's known positives; ids with a member's known positive text are
            never drawn either (needs ``keys``).
    """
    batch = np.asarray(batch, dtype=np.int64)
    need = h * len(batch)
    if need == 0:
        return np.empty((len(batch), 0), dtype=np.int64)
    excluded = excluded_ids(batch, top)
    uniq, counts = candidate_counts(batch, S, excluded=excluded, keys=keys, known=known)
    gumbel_keys = np.log(counts) + rng.gumbel(size=len(uniq))
    if len(uniq) > need:
        top_k = np.argpartition(-gumbel_keys, need - 1)[:need]
    else:
        top_k = np.arange(len(uniq))
    top_k = top_k[np.lexsort((uniq[top_k], -gumbel_keys[top_k]))]  # most likely first; deterministic order
    chosen = uniq[top_k]
    if len(chosen) < need:
        chosen = np.concatenate([chosen, _uniform_fill(excluded, chosen, need - len(chosen), rng, pool, len(S),
                                                       batch, keys, key_index, known)])
    return chosen.reshape(len(batch), h)


def _positions(ids: np.ndarray, pool: np.ndarray | None, n: int) -> np.ndarray:
    """Sorted positions in ``pool`` (sorted; None: ``0..n-1``) of the sorted ``ids`` that are in it."""
    if pool is None:
        return ids[(ids >= 0) & (ids < n)]
    at = np.searchsorted(pool, ids)
    inside = at < len(pool)
    inside[inside] = pool[at[inside]] == ids[inside]
    return at[inside]


class KeyIndex:
    """Every id's content key, sorted once, so the ids sharing a batch member's positive text are found by
    binary search instead of a pass over all N keys."""

    def __init__(self, keys: np.ndarray):
        self.order = np.argsort(keys, kind="stable")
        self.sorted = np.asarray(keys)[self.order]

    def ids_with(self, wanted: np.ndarray) -> np.ndarray:
        lo, hi = np.searchsorted(self.sorted, wanted, "left"), np.searchsorted(self.sorted, wanted, "right")
        return np.concatenate([self.order[a:b] for a, b in zip(lo, hi)]) if len(wanted) else lo


def same_text_ids(batch: np.ndarray, keys: np.ndarray, index: KeyIndex | None = None,
                  known: KnownKeys | None = None) -> np.ndarray:
    """Every id whose positive has a member's content key or one of a member's known positive keys (the
    members included)."""
    index = index or KeyIndex(keys)
    return index.ids_with(member_keys(batch, keys, known)).astype(np.int64)


def _uniform_fill(excluded: np.ndarray, chosen: np.ndarray, k: int, rng: np.random.Generator,
                  pool: np.ndarray | None, n: int, batch: np.ndarray | None = None,
                  keys: np.ndarray | None = None, key_index: KeyIndex | None = None,
                  known: KnownKeys | None = None) -> np.ndarray:
    """``k`` more distinct ids from ``pool`` outside X(B) (``excluded``), ``chosen`` and the members'
    same-text ids (their known positives' included); -1 for what the pool lacks."""
    size = n if pool is None else len(pool)
    taken = _sorted_unique(np.concatenate([excluded, chosen]))
    if keys is not None and batch is not None:
        # Draw k of the pool's ids outside ``taken`` and the members' same-text ids, by position in the
        # pool: the ids to skip are few (|B| p plus duplicates), so the j-th id left is found from their
        # positions alone, never listing the pool (which made this O(N) per batch).
        skip = _sorted_unique(np.concatenate([taken, same_text_ids(batch, keys, key_index, known)]))
        skip = _positions(skip, pool, n)
        left = size - len(skip)
        if left <= k:  # a small pool: list what is left (at most k ids), in random order, and pad
            keep = np.ones(size, dtype=bool)
            keep[skip] = False
            rest = np.flatnonzero(keep) if pool is None else pool[keep]
            rest = rest[rng.permutation(len(rest))]
            return np.concatenate([rest, np.full(k - len(rest), -1, dtype=np.int64)])
        j = np.sort(rng.choice(left, size=k, replace=False))
        at = j + np.searchsorted(skip - np.arange(len(skip)), j, side="right")  # j-th position not skipped
        return (at if pool is None else pool[at])[rng.permutation(k)]
    # X(B) may hold ids outside the pool (a member's top-p from another task of a merged small-task
    # group): only the taken ids inside the pool reduce what is left to draw
    free = size - (len(taken) if pool is None else int(np.isin(taken, pool).sum()))
    if free <= k:  # small task: take all that is left (in random order) and pad
        rest = np.setdiff1d(np.arange(n) if pool is None else pool, taken)
        rest = rest[rng.permutation(len(rest))]
        return np.concatenate([rest, np.full(k - len(rest), -1, dtype=np.int64)])
    out = np.empty(0, dtype=np.int64)
    while len(out) < k:
        draw = rng.integers(0, size, size=2 * (k - len(out)) + 16)
        ids = draw if pool is None else pool[draw]
        ids = ids[~np.isin(ids, taken)]
        ids = ids[~np.isin(ids, out)]
        _, first = np.unique(ids, return_index=True)
        ids = ids[np.sort(first)]  # distinct, in draw order
        out = np.concatenate([out, ids[: k - len(out)]])
    return out

"""B3++ hard negatives: ``h`` extra negatives per example, drawn per batch (B3 paper, section 3.3).

For a batch ``B`` the rows ``S[i]`` of its members are pooled into one *unified* distribution

    Pr(j) proportional to  #{ (i, c) : i in B, S[i, c] = j },     j not in B,

so an example that many members rank among their strong negatives is the most likely pick. Members are
excluded (they are in-batch negatives already); the members' top-p ranks never entered ``S``, so they are
excluded by construction. ``h * |B|`` *distinct* ids are drawn without replacement and reshaped to
``(|B|, h)``, row ``i`` aligned with the batch's ``i``-th id. The trainer shares all of them with every query
of the global batch, so the row assignment only decides whose text carries which negative.

Drawing without replacement with probabilities proportional to counts is done with the Gumbel-top-k trick
(the k largest of ``log count_j + Gumbel noise`` are a weighted sample without replacement), vectorised over
the unique candidates of the batch: the work is O(|B| m log(|B| m)) per batch, never O(N).

When the pooled rows hold fewer than ``h |B|`` distinct candidates (small tasks, heavy padding), every
candidate is taken and the rest is drawn uniformly from ``pool`` (the ids of the batch's tasks), still
distinct and outside the batch, by rejection sampling. When even the pool has fewer than ``h |B|`` ids
outside the batch (a task of fewer than (h+1)|B| examples), all of them are taken and the remaining slots
are ``-1``, which the trainer skips: negatives never repeat and never come from another task.
"""

from __future__ import annotations

import numpy as np



def candidate_counts(batch: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique ids in the S rows of ``batch`` (minus the members and padding) and how often each occurs."""
    cand = np.asarray(S[np.sort(batch)]).ravel()
    cand = cand[cand >= 0]
    uniq, counts = np.unique(cand, return_counts=True)
    members = np.sort(batch)
    pos = np.searchsorted(members, uniq)
    pos[pos == len(members)] = 0
    outside = members[pos] != uniq
    return uniq[outside], counts[outside]


def draw_hard_negatives(batch: np.ndarray, S: np.ndarray, h: int, rng: np.random.Generator,
                        pool: np.ndarray | None = None) -> np.ndarray:
    """``(len(batch), h)`` distinct hard negatives for one batch (module docstring).

    Args:
        batch: the batch's ids.
        S: neighbour lists (N x m, -1 padded).
        h: negatives per example.
        rng: the schedule's generator (consumed deterministically).
        pool: sorted ids the uniform fill-up may draw from (default: all ids 0..N-1).
    """
    batch = np.asarray(batch, dtype=np.int64)
    need = h * len(batch)
    if need == 0:
        return np.empty((len(batch), 0), dtype=np.int64)
    uniq, counts = candidate_counts(batch, S)
    keys = np.log(counts) + rng.gumbel(size=len(uniq))
    if len(uniq) > need:
        top = np.argpartition(-keys, need - 1)[:need]
    else:
        top = np.arange(len(uniq))
    top = top[np.lexsort((uniq[top], -keys[top]))]  # most likely first; deterministic order
    chosen = uniq[top]
    if len(chosen) < need:
        chosen = np.concatenate([chosen, _uniform_fill(batch, chosen, need - len(chosen), rng, pool, len(S))])
    return chosen.reshape(len(batch), h)


def _uniform_fill(batch: np.ndarray, chosen: np.ndarray, k: int, rng: np.random.Generator,
                  pool: np.ndarray | None, n: int) -> np.ndarray:
    """``k`` more distinct ids from ``pool`` outside the batch and ``chosen``; -1 for what the pool lacks."""
    size = n if pool is None else len(pool)
    taken = np.unique(np.concatenate([batch, chosen]))
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

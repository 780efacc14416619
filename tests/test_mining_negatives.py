"""negatives.py: B3++ hard negatives per batch."""

from __future__ import annotations

import numpy as np
from b3stream.mining.negatives import candidate_counts, draw_hard_negatives, excluded_ids

from ._mining_synth import random_S


def test_negatives_outside_batch_distinct_and_aligned():
    S = random_S(2000, 30, seed=0)
    rng = np.random.default_rng(0)
    batch = rng.choice(2000, size=64, replace=False)
    neg = draw_hard_negatives(batch, S, 5, np.random.default_rng(1))
    assert neg.shape == (64, 5)
    assert len(np.unique(neg)) == neg.size, "distinct across the whole batch, so within every row"
    assert not np.isin(neg, batch).any()
    cands, _ = candidate_counts(batch, S)
    assert np.isin(neg, cands).all(), "drawn from the batch's S rows"


def test_frequent_candidates_are_preferred():
    n, m = 500, 6
    batch = np.arange(20)
    S = np.full((n, m), -1, dtype=np.int32)
    S[batch, 0] = 400  # every member ranks 400: count 20
    S[batch, 1:] = (300 + np.arange(100)).reshape(20, 5)  # 100 candidates of count 1
    heavy = light = 0
    for seed in range(50):
        neg = draw_hard_negatives(batch, S, 1, np.random.default_rng(seed)).ravel()  # 20 of 101
        heavy += 400 in neg
        light += np.isin(neg, 300 + np.arange(100)).sum()
    assert heavy >= 45  # Pr(a count-20 candidate is among 20 of 101) is about 0.97
    assert light / (50 * 100) < 0.25  # a count-1 candidate is picked about 19 % of the time


def test_fill_up_when_too_few_candidates_and_pad_when_the_task_is_exhausted():
    S = np.full((100, 5), -1, dtype=np.int32)
    S[0, 0] = 50
    batch = np.arange(10)
    neg = draw_hard_negatives(batch, S, 3, np.random.default_rng(0))
    assert neg.shape == (10, 3) and 50 in neg and len(np.unique(neg)) == 30 and not np.isin(neg, batch).any()
    pool = np.arange(40)
    neg = draw_hard_negatives(batch, S, 2, np.random.default_rng(0), pool=pool)
    assert np.isin(neg[neg != 50], pool).all()
    # 40 needed: the S candidate 50 plus a pool of 45 with 35 ids outside the batch; 4 slots stay -1
    neg = draw_hard_negatives(batch, S, 4, np.random.default_rng(0), pool=np.arange(45))
    assert (neg == -1).sum() == 4
    assert np.array_equal(np.sort(neg[neg >= 0]), np.append(np.arange(10, 45), 50))


def test_deterministic_for_a_seed():
    S = random_S(1000, 20, seed=3)
    batch = np.arange(0, 1000, 31)
    a = draw_hard_negatives(batch, S, 4, np.random.default_rng(7))
    b = draw_hard_negatives(batch, S, 4, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_a_members_top_p_is_never_drawn_through_another_members_row():
    # member 0 skipped 400 and 401 (its top-p, likely false negatives: T[0]); member 1 ranks 400 among its
    # strong negatives (S[1]) and every member ranks 401, the batch's most frequent candidate. Both must stay
    # out, because the drawn negatives are shared with every query of the batch, query 0 included.
    n, m, p = 500, 6, 2
    batch = np.arange(20)
    S = np.full((n, m), -1, dtype=np.int32)
    S[batch, 0] = 401
    S[1, 1] = 400
    S[batch, 2:] = (300 + np.arange(80)).reshape(20, 4)  # 80 ordinary candidates of count 1
    T = np.full((n, p), -1, dtype=np.int32)
    T[0] = [400, 401]
    T[5] = [350, -1]  # a padded top-p row: the -1 excludes nothing
    T[450] = [302, 303]  # not a member: its top-p stays a candidate
    assert excluded_ids(batch, T).tolist() == [*range(20), 350, 400, 401]
    cands, counts = candidate_counts(batch, S, top=T)
    assert not np.isin([400, 401, 350], cands).any() and np.isin([302, 303], cands).all()
    assert len(cands) == 79 and np.all(counts == 1)
    for seed in range(30):
        neg = draw_hard_negatives(batch, S, 1, np.random.default_rng(seed), top=T)
        assert not np.isin(neg, [400, 401, 350]).any() and not np.isin(neg, batch).any()
        assert len(np.unique(neg)) == neg.size
    # without T, the frequent 401 is (almost surely) drawn: the exclusion is what keeps it out
    assert 401 in draw_hard_negatives(batch, S, 1, np.random.default_rng(0))
    # the uniform fill-up respects the exclusion too: 79 candidates cannot fill 20 x 5 slots
    for seed in range(10):
        neg = draw_hard_negatives(batch, S, 5, np.random.default_rng(seed), top=T)
        assert not np.isin(neg, [400, 401, 350]).any() and not np.isin(neg, batch).any()
        assert len(np.unique(neg)) == neg.size == 100


def test_top_p_exclusion_with_a_small_pool_pads_and_p0_changes_nothing():
    S = np.full((100, 5), -1, dtype=np.int32)
    S[0, 0] = 50
    S[1, 0] = 12  # 12 is member 0's top-p: excluded although member 1 ranks it
    T = np.full((100, 3), -1, dtype=np.int32)
    T[0] = [12, 13, -1]
    T[99] = [14, 15, 16]  # not a member: excludes nothing
    batch = np.arange(10)
    # 40 needed: the S candidate 50, then a pool of 45 with 35 ids outside the batch, minus 12 and 13 (member
    # 0's top-p): 33 to draw, so 6 slots stay -1
    neg = draw_hard_negatives(batch, S, 4, np.random.default_rng(0), pool=np.arange(45), top=T)
    assert (neg == -1).sum() == 6
    assert np.array_equal(np.sort(neg[neg >= 0]), np.append(np.setdiff1d(np.arange(10, 45), [12, 13]), 50))
    # p = 0: T is (N, 0) and the draw is the members-only one, byte for byte
    T0 = np.empty((100, 0), dtype=np.int32)
    for h, pool in ((3, None), (2, np.arange(40)), (4, np.arange(45))):
        a = draw_hard_negatives(batch, S, h, np.random.default_rng(0), pool=pool, top=T0)
        b = draw_hard_negatives(batch, S, h, np.random.default_rng(0), pool=pool)
        assert np.array_equal(a, b)


def test_deterministic_for_a_seed_with_top_p():
    S = random_S(1000, 20, seed=3)
    T = random_S(1000, 4, seed=4, pad_rows=10)
    batch = np.arange(0, 1000, 31)
    a = draw_hard_negatives(batch, S, 4, np.random.default_rng(7), top=T)
    b = draw_hard_negatives(batch, S, 4, np.random.default_rng(7), top=T)
    assert np.array_equal(a, b)
    assert not np.isin(a, T[batch][T[batch] >= 0]).any() and not np.isin(a, batch).any()


def _old_keyed_fill(excluded, chosen, k, rng, pool, n, batch, keys):
    """The fill-up with content keys as it was: it listed every id of the pool (O(N) per batch)."""
    from b3stream.mining.negatives import _sorted_unique, same_text

    taken = _sorted_unique(np.concatenate([excluded, chosen]))
    rest = np.setdiff1d(np.arange(n) if pool is None else pool, taken)
    rest = rest[~same_text(rest, batch, keys)]
    if len(rest) <= k:
        rest = rest[rng.permutation(len(rest))]
        return np.concatenate([rest, np.full(k - len(rest), -1, dtype=np.int64)])
    return rest[np.sort(rng.choice(len(rest), size=k, replace=False))][rng.permutation(k)]


def test_keyed_fill_up_draws_what_listing_the_pool_drew():
    """Issue 23: the uniform fill-up with content keys no longer lists the pool, and returns the very ids the
    listing did (same generator calls), for the whole id range, a task's pool, and a pool too small."""
    from b3stream.mining.negatives import KeyIndex, _uniform_fill, excluded_ids

    gen = np.random.default_rng(3)
    for trial in range(60):
        n = int(gen.integers(40, 400))
        keys = gen.integers(0, n // 2, size=n).astype(np.int64)  # many same-text positives
        top = np.where(gen.random((n, 2)) < 0.8, gen.integers(0, n, size=(n, 2)), -1)
        batch = gen.choice(n, size=int(gen.integers(2, 12)), replace=False)
        chosen = gen.choice(n, size=int(gen.integers(0, 6)), replace=False)
        pool = None if trial % 3 == 0 else np.sort(gen.choice(n, size=int(gen.integers(5, n)), replace=False))
        excluded = excluded_ids(batch, top)
        k = int(gen.integers(1, 40))
        seed = int(gen.integers(1 << 30))
        old = _old_keyed_fill(excluded, chosen, k, np.random.default_rng(seed), pool, n, batch, keys)
        new = _uniform_fill(excluded, chosen, k, np.random.default_rng(seed), pool, n, batch, keys, KeyIndex(keys))
        np.testing.assert_array_equal(new, old)


def test_relabelled_rows_are_the_same_with_a_shared_map():
    from b3stream.mining.graph import Relabel, subgraph_rows

    S = random_S(300, 8, seed=1)
    gen = np.random.default_rng(0)
    relabel = Relabel(300)
    for i in range(6):
        ids = np.sort(gen.choice(300, size=int(gen.integers(1, 300)), replace=False)) if i else np.arange(300)
        local = np.full(301, -1, dtype=np.int32)
        local[ids] = np.arange(len(ids))
        np.testing.assert_array_equal(subgraph_rows(S, ids, 300, relabel), local[np.asarray(S[ids])])
    assert (relabel.local == -1).all()  # every group cleared its entries

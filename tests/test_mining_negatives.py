"""negatives.py: B3++ hard negatives per batch."""

from __future__ import annotations

import numpy as np
from b3stream.mining.negatives import candidate_counts, draw_hard_negatives

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

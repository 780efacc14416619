"""strategies.py: random / random_hn / task / task_hn / gcbs / b3 / b3pp behind one interface."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from b3stream.config import ConfigError
from b3stream.mining.embed import Embeddings
from b3stream.mining.graph import build_graph, subgraph_rows
from b3stream.mining.partition import partition
from b3stream.mining.rank import RankParams, rank, task_groups
from b3stream.schedule import Schedule
from b3stream.mining.strategies import STRATEGIES, BatchInputs, BatchParams, make_batches

from ._mining_synth import clustered

STRATS = sorted(STRATEGIES)


def mined(n=1000, tasks=3, K=8, p=2, m=20, seed=0) -> BatchInputs:
    q, pos, _ = clustered(n, clusters=30, seed=seed)
    t = (np.arange(n) % tasks).astype(np.int32)
    names = [f"t{i}" for i in range(tasks)]
    emb = Embeddings(queries=q.astype(np.float16), positives=pos.astype(np.float16), tasks=t, task_names=names,
                     stamp={}, record={}, folder=Path("memory"))
    S, scores, T, _ = rank(emb, RankParams(p=p, m=m, index="flat"), progress=False)
    comms, ctask = [], []
    for name, ids in task_groups(t, names, True):
        c, _ = partition(build_graph(subgraph_rows(S, ids, n)), K, ids=ids)
        comms.append(c)
        ctask.append(np.full(len(c), names.index(name), dtype=np.int32))
    return BatchInputs(n=n, tasks=t, task_names=names, S=S, scores=scores, top=T, communities=np.concatenate(comms),
                       community_task=np.concatenate(ctask))


@pytest.fixture(scope="module")
def inputs():
    return mined()


def schedule(inputs, name, **kw):
    prm = BatchParams(**{"batch_size": 64, "K": 8, "h": 2, "seed": 0, **kw})
    batches, negatives, meta = make_batches(name, inputs, prm)
    return Schedule.from_batches(batches, {"strategy": name, **meta}, negatives)


@pytest.mark.parametrize("name", STRATS)
def test_every_id_exactly_once_and_full_batches(inputs, name):
    s = schedule(inputs, name)
    s.check_epoch(inputs.n)
    sizes = np.diff(s.offsets)
    assert np.all(sizes[:-1] == 64) and 0 < sizes[-1] <= 64, "only the last batch may be short"
    assert (s.negative_ids is not None) == (name in ("b3pp", "random_hn", "task_hn"))


@pytest.mark.parametrize("name", STRATS)
def test_byte_identical_reruns_and_seed_matters(inputs, name):
    a = schedule(inputs, name).to_bytes()
    assert a == schedule(inputs, name).to_bytes()
    if name != "gcbs":  # gcbs only shuffles the batch order; still a different file
        assert a != schedule(inputs, name, seed=1).to_bytes()


@pytest.mark.parametrize("name", ["task", "task_hn", "b3", "b3pp", "gcbs"])
def test_batches_stay_within_one_task(inputs, name):
    s = schedule(inputs, name)
    mixed = [len(np.unique(inputs.tasks[b])) > 1 for b in s.batches]
    # per task: 333/334 ids -> 5 full batches each; the tails are pooled into a few mixed batches at the end
    assert not any(mixed[: -3])
    assert sum(mixed) <= 3


def test_b3_batches_are_whole_communities_and_b3pp_shares_them(inputs):
    b3 = schedule(inputs, "b3")
    comm_of = np.empty(inputs.n, dtype=np.int64)
    for c, members in enumerate(inputs.communities):
        comm_of[members[members >= 0]] = c
    full = [b for b in b3.batches if len(b) == 64]
    for b in full[:-2]:
        runs = comm_of[b].reshape(8, 8)
        assert np.all(runs == runs[:, :1]), "each run of K is one community"
    b3pp = schedule(inputs, "b3pp")
    assert np.array_equal(b3.ids, b3pp.ids) and np.array_equal(b3.offsets, b3pp.offsets)
    for b, negs in zip(b3pp.batches, b3pp.hard_negatives):
        assert negs.shape == (len(b), 2)
        assert not np.isin(negs, b).any() and len(np.unique(negs)) == negs.size
        top = inputs.top[b]
        assert not np.isin(negs, top[top >= 0]).any(), "no member's top-p is a hard negative of the batch"


@pytest.mark.parametrize("base", ["random", "task"])
def test_random_hn_and_task_hn_are_their_base_batches_with_hard_negatives_from_S(inputs, base):
    """The B3 paper's Table 2 baseline: the base strategy's batches (random, or one task at a time as MMEB
    trains), plus h negatives per example drawn from the batch's S rows, never a member or a member's top-p."""
    plain, hn = schedule(inputs, base), schedule(inputs, f"{base}_hn")
    assert np.array_equal(plain.ids, hn.ids) and np.array_equal(plain.offsets, hn.offsets)
    from_s = 0
    for b, negs in zip(hn.batches, hn.hard_negatives):
        assert negs.shape == (len(b), 2)
        assert not np.isin(negs, b).any() and len(np.unique(negs)) == negs.size
        top = inputs.top[b]
        assert not np.isin(negs, top[top >= 0]).any()
        rows = inputs.S[b]
        from_s += np.isin(negs, rows[rows >= 0]).sum()
    assert from_s > 0.9 * hn.ids.size * 2, "the negatives come from the members' ranks p..p+m"
    with pytest.raises(ConfigError, match=f"h=0: {base}_hn needs h >= 1"):
        make_batches(f"{base}_hn", inputs, BatchParams(batch_size=64, h=0))
    with pytest.raises(ConfigError, match="needs S"):
        make_batches(f"{base}_hn", replace(inputs, S=None), BatchParams(batch_size=64))


def test_mix_tasks_draws_communities_from_all_tasks(inputs):
    s = schedule(inputs, "b3", mix_tasks=True)
    s.check_epoch(inputs.n)
    assert sum(len(np.unique(inputs.tasks[b])) > 1 for b in s.batches) > 5


def test_gcbs_records_its_threshold(inputs):
    _, _, meta = make_batches("gcbs", inputs, BatchParams(batch_size=64))
    valid = inputs.S >= 0
    assert meta["gcbs_threshold"] == pytest.approx(np.median(inputs.scores[valid].astype(np.float32)), abs=1e-3)
    _, _, meta = make_batches("gcbs", inputs, BatchParams(batch_size=64, gcbs_threshold=0.5))
    assert meta["gcbs_threshold"] == 0.5


def test_bad_parameters(inputs):
    with pytest.raises(ConfigError, match="between 1 and the batch size"):
        make_batches("b3", inputs, BatchParams(batch_size=4, K=8))
    with pytest.raises(ConfigError, match="not a multiple of K"):
        make_batches("b3", inputs, BatchParams(batch_size=60, K=8))
    with pytest.raises(ConfigError, match="K = 8 but K = 16"):
        make_batches("b3", inputs, BatchParams(batch_size=64, K=16))
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_batches("hardest", inputs, BatchParams())
    with pytest.raises(ConfigError, match="needs communities"):
        make_batches("b3", BatchInputs(n=10, tasks=np.zeros(10, np.int32), task_names=["a"]), BatchParams(64, 8))
    with pytest.raises(ConfigError, match="h >= 1"):
        make_batches("b3pp", inputs, BatchParams(batch_size=64, K=8, h=0))
    with pytest.raises(ConfigError, match="needs top"):
        make_batches("b3pp", replace(inputs, top=None), BatchParams(batch_size=64, K=8))


def test_short_communities_and_tails_close_the_epoch():
    inp = mined(n=203, tasks=2, K=8)  # tasks of 102 and 101 ids: 6 communities of 8 + 1 short community each
    for name in ("b3", "b3pp", "task"):
        s = schedule(inp, name, batch_size=32)
        s.check_epoch(203)
        sizes = np.diff(s.offsets)
        assert np.all(sizes[:-1] == 32) and sizes[-1] == 203 % 32


def test_b3pp_fill_up_stays_in_the_batch_task_only_when_tasks_are_mined_apart():
    # no neighbour lists at all: every hard negative comes from the uniform fill-up; each community (and so
    # each batch, |B| = K) holds one task's ids
    n, K = 256, 32
    tasks = (np.arange(n) >= n // 2).astype(np.int32)
    inp = BatchInputs(n=n, tasks=tasks, task_names=["a", "b"], S=np.full((n, 4), -1, np.int32),
                      scores=np.zeros((n, 4), np.float16), top=np.full((n, 1), -1, np.int32),
                      communities=np.arange(n, dtype=np.int32).reshape(-1, K))
    for per_task in (True, False):
        # mined apart, communities carry their task; mined together, the partition's task is -1 (all)
        ctask = np.repeat([0, 1], n // (2 * K)) if per_task else np.full(n // K, -1)
        s = schedule(replace(inp, community_task=ctask.astype(np.int32)), "b3pp", batch_size=K, K=K,
                     per_task=per_task)
        crossed = [np.any(tasks[negs] != tasks[b[0]]) for b, negs in zip(s.batches, s.hard_negatives)]
        # apart, a task's S rows hold only that task and so does the fill-up; together, any id may be drawn
        assert all(len(np.unique(tasks[b])) == 1 for b in s.batches)
        assert not any(crossed) if per_task else all(crossed)

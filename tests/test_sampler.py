"""The schedule consumer: rank slices, exactly-once epochs, resume, hot swap, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from b3stream.refresh.swap import swap
from b3stream.schedule import Schedule, ScheduleError
from b3stream.train.sampler import ScheduleSampler, split_bounds


def make_schedule(n: int, batch_size: int, K: int, seed: int = 0, h: int = 0, version: int = 0) -> Schedule:
    """Random communities of K, |B|/K of them per batch; the last batch takes what is left."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n)
    batches = [ids[i:i + batch_size] for i in range(0, n, batch_size)]
    negatives = [rng.integers(0, n, size=(len(b), h)) for b in batches] if h else None
    meta = {"strategy": "random", "K": K, "batch_size": batch_size, "h": h, "version": version}
    return Schedule.from_batches(batches, meta, negatives)


def run_epoch(samplers: list[ScheduleSampler]) -> list[list[np.ndarray]]:
    """Step every rank's sampler through one epoch; per step, each rank's slice."""
    steps = []
    epoch = samplers[0].epoch
    while samplers[0].epoch == epoch:
        assert len({s.steps_left for s in samplers}) == 1, "ranks disagree on the steps left"
        steps.append([s.batch_at().ids for s in samplers])
        for s in samplers:
            s.advance()
    return steps


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_id_once_per_epoch_and_same_steps_on_every_rank(world):
    n, size, K = 1000, 64, 8  # 15 full batches + a tail of 40
    sched = make_schedule(n, size, K)
    samplers = [ScheduleSampler(sched, n, rank, world, seed=3) for rank in range(world)]
    for epoch in range(2):
        steps = run_epoch(samplers)
        assert len(steps) == 16
        seen = np.concatenate([ids for step in steps for ids in step])
        assert np.array_equal(np.sort(seen), np.arange(n)), f"epoch {epoch}: not each id exactly once"
        assert all(len(ids) > 0 for step in steps for ids in step)
    assert samplers[0].epoch == 2


def test_rank_slices_are_whole_communities():
    n, size, K, world = 512, 64, 8, 4  # |B|/K = 8 communities, 2 per rank
    sched = make_schedule(n, size, K)
    sampler = ScheduleSampler(sched, n, rank=1, world_size=world)
    assert sampler.whole_communities
    for index in range(sampler.steps_per_epoch):
        batch = sampler.global_batch(index)
        communities = {tuple(batch[i:i + K]) for i in range(0, size, K)}
        mine = sampler.batch_at(index).ids
        assert len(mine) == size // world
        assert {tuple(mine[i:i + K]) for i in range(0, len(mine), K)} <= communities


def test_epochs_reorder_batches_but_keep_them():
    n, size = 256, 32
    sched = make_schedule(n, size, 8)
    sampler = ScheduleSampler(sched, n, seed=1)
    first = [tuple(sampler.global_batch(i)) for i in range(sampler.steps_per_epoch)]
    for _ in range(sampler.steps_per_epoch):
        sampler.advance()
    second = [tuple(sampler.global_batch(i)) for i in range(sampler.steps_per_epoch)]
    assert set(first) == set(second) == {tuple(b) for b in sched.batches}
    assert first != second


def test_state_dict_resume_continues_same_ids():
    n, size = 600, 32
    sched = make_schedule(n, size, 4)
    reference = ScheduleSampler(sched, n, rank=0, world_size=2, seed=5)
    stopped = ScheduleSampler(sched, n, rank=0, world_size=2, seed=5)
    for _ in range(7):
        stopped.advance()
    state = stopped.state_dict()
    resumed = ScheduleSampler(sched, n, rank=0, world_size=2, seed=5)
    resumed.load_state_dict(state)
    for _ in range(7):
        reference.advance()
    assert resumed.position == 7
    for a, b in zip(reference, resumed):
        assert np.array_equal(a.ids, b.ids)
    assert np.array_equal(resumed.consumed(), reference.consumed())


def test_tail_smaller_than_world_is_merged():
    n, size, world = 66, 32, 4  # a 2-id tail would starve two ranks
    sched = make_schedule(n, size, 4)
    samplers = [ScheduleSampler(sched, n, r, world) for r in range(world)]
    steps = run_epoch(samplers)
    assert len(steps) == 2
    assert all(len(ids) >= 1 for step in steps for ids in step)
    assert sorted(np.concatenate([i for s in steps for i in s]).tolist()) == list(range(n))


def test_hard_negative_pool_is_shared_unique_and_outside_the_batch():
    n, size, world = 400, 40, 2
    sched = make_schedule(n, size, 4, h=5)
    samplers = [ScheduleSampler(sched, n, r, world) for r in range(world)]
    for index in range(samplers[0].steps_per_epoch):
        pool = samplers[0].negative_pool(index)
        batch = samplers[0].global_batch(index)
        assert len(np.unique(pool)) == len(pool) and not np.isin(pool, batch).any()
        shares = [s.batch_at(index).hard_negative_ids for s in samplers]
        assert np.array_equal(np.concatenate(shares), pool)


def test_swap_rebatches_only_unconsumed_ids_exactly_once():
    n, size = 800, 64
    old = make_schedule(n, size, 8, seed=0, version=0)
    new = make_schedule(n, size, 4, seed=1, version=1)
    world = 2
    samplers = [ScheduleSampler(old, n, r, world, seed=2) for r in range(world)]
    steps = samplers[0].epoch_steps
    for _ in range(5):
        for s in samplers:
            s.advance()
    consumed = samplers[0].consumed()
    for s in samplers:
        swap(s, new)
    assert samplers[0].version == 1 and samplers[0].position == 0
    rest = run_epoch(samplers)
    after = np.concatenate([ids for step in rest for ids in step])
    assert not np.isin(after, consumed).any()
    assert np.array_equal(np.sort(np.concatenate([consumed, after])), np.arange(n))
    # The epoch keeps its number of steps; the new batches are |B|, except one short one.
    assert 5 + len(rest) == steps == samplers[0].epoch_steps
    assert sum(sum(len(i) for i in step) != size for step in rest) <= 1

    # A sampler resumed from a post-swap state on the new schedule replays the same plan.
    fresh = ScheduleSampler(old, n, 0, world, seed=2)
    for _ in range(5):
        fresh.advance()
    swap(fresh, new)
    fresh.advance()
    state = fresh.state_dict()
    resumed = ScheduleSampler(new, n, 0, world, seed=2)
    resumed.load_state_dict(state)
    assert np.array_equal(resumed.batch_at().ids, rest[1][0])


def test_a_swap_to_another_batch_size_or_an_older_version_is_refused():
    """The run's step budget, LR schedule and DeepSpeed batch size are built for one |B|."""
    n = 800
    s = ScheduleSampler(make_schedule(n, 64, 8, version=3), n)
    with pytest.raises(ScheduleError, match="[|]B[|]=32, this run trains [|]B[|]=64"):
        swap(s, make_schedule(n, 32, 4, version=4))
    with pytest.raises(ScheduleError, match="older than v3"):
        swap(s, make_schedule(n, 64, 8, version=2))


def test_resume_onto_a_newer_schedule_swaps():
    n = 300
    old, new = make_schedule(n, 30, 3, seed=0, version=0), make_schedule(n, 30, 3, seed=9, version=4)
    s = ScheduleSampler(old, n)
    for _ in range(3):
        s.advance()
    state = s.state_dict()
    other = ScheduleSampler(new, n)
    other.load_state_dict(state)  # version 0 is gone: continue on version 4 with the 210 ids left
    left = np.concatenate([b.ids for b in other])
    assert len(left) == 210 and not np.isin(left, state["consumed"]).any()


def test_refuses_bad_schedules():
    n = 100
    with pytest.raises(ScheduleError, match="does not divide over 2 ranks"):
        ScheduleSampler(make_schedule(n, 25, 5), n, 0, 2)
    with pytest.raises(ScheduleError, match="exactly once"):
        ScheduleSampler(make_schedule(n, 20, 5), n + 1)


def test_split_bounds_cover_and_balance():
    for n in range(0, 20):
        for world in range(1, 5):
            bounds = [split_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def two_task_schedule(n: int, size: int, K: int, seed: int, version: int, h: int = 0,
                      apart: np.ndarray | None = None) -> Schedule:
    """Tasks 0 (ids below n/2) and 1 (the rest) kept apart: each batch of one task, as the miner records it
    (``batch_task``); with ``h``, each batch's negatives drawn from its own task outside the batch. ``apart``:
    ids batched apart from the others (what a refresh does with the ids already trained this epoch)."""
    rng = np.random.default_rng(seed)
    batches, tasks, negatives = [], [], []
    for t, task_ids in enumerate((np.arange(n // 2), np.arange(n // 2, n))):
        parts = [task_ids] if apart is None else [np.setdiff1d(task_ids, apart), np.intersect1d(task_ids, apart)]
        ids = np.concatenate([rng.permutation(part) for part in parts])
        for i in range(0, len(ids), size):
            b = ids[i:i + size]
            batches.append(b)
            tasks.append(t)
            if h:
                others = np.setdiff1d(task_ids, b)
                negatives.append(rng.choice(others, size=(len(b), h), replace=False))
    order = rng.permutation(len(batches))
    meta = {"strategy": "b3pp" if h else "b3", "K": K, "batch_size": size, "h": h or None, "version": version}
    return Schedule.from_batches([batches[i] for i in order], meta,
                                 [negatives[i] for i in order] if h else None,
                                 batch_task=np.asarray(tasks)[order])


@pytest.mark.parametrize("world", [1, 2])
def test_a_swap_keeps_one_task_per_batch(world):
    """Post-swap batches are re-cut within each task of the new schedule; only what is left of each task
    (fewer than |B| ids) is pooled, as the miner pools its tails, into the last steps. Tasks interleave."""
    n = 800
    old, new = two_task_schedule(n, 32, 4, seed=0, version=0), two_task_schedule(n, 32, 4, seed=1, version=1)
    samplers = [ScheduleSampler(old, n, r, world, seed=2) for r in range(world)]
    for _ in range(7):
        for s in samplers:
            s.advance()
    for s in samplers:
        swap(s, new)
    rest = run_epoch(samplers)
    tasks = [set((np.concatenate(step) >= n // 2).tolist()) for step in rest]
    mixed = [i for i, t in enumerate(tasks) if len(t) > 1]
    assert mixed == list(range(len(rest) - len(mixed), len(rest))) and len(mixed) <= 2, \
        "a post-swap batch mixes tasks (other than the pooled tails at the end)"
    order = [t.pop() for t in tasks if len(t) == 1]
    assert sum(a != b for a, b in zip(order, order[1:])) >= 4, f"tasks one after the other: {order}"
    assert 7 + len(rest) == samplers[0].epoch_steps
    seen = np.concatenate([np.concatenate(s) for s in rest])
    assert len(seen) == n - 7 * 32 and len(np.unique(seen)) == len(seen)


def test_after_a_swap_only_the_miners_own_batches_keep_their_hard_negatives():
    """A post-swap batch that is one of the new schedule's batches keeps exactly the negatives drawn for it;
    a re-cut batch (members from several mined batches) gets none: its pooled rows were drawn for other
    members and may hold a new member's likely false negative."""
    n = 800
    old = two_task_schedule(n, 32, 4, seed=0, version=0, h=2)
    s = ScheduleSampler(old, n, seed=2)
    for _ in range(5):
        s.advance()
    # Mined while the trainer went on: the ids trained by the snapshot are apart, one more step is not.
    new = two_task_schedule(n, 32, 4, seed=1, version=1, h=2, apart=s.consumed())
    s.advance()
    swap(s, new)
    mined = {frozenset(b.tolist()): np.unique(negs) for b, negs in zip(new.batches, new.hard_negatives)}
    kept = recut = 0
    for index in range(s.steps_per_epoch):
        batch, pool = s.global_batch(index), s.negative_pool(index)
        drawn = mined.get(frozenset(batch.tolist()))
        if drawn is not None:
            kept += 1
            assert np.array_equal(pool, drawn[~np.isin(drawn, batch)])
        else:
            recut += 1
            assert len(pool) == 0, "a re-cut batch got negatives drawn for other members"
    assert kept >= 5 and recut >= 1

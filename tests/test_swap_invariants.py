"""Refreshed mode's promises across hot swaps, as properties (hypothesis) of the project's real code.

Schedules are mined as the refreshed miner mines them: the real rank stage (FAISS, ranks [p, p+m) with the
ids trained at the snapshot ranked apart), the partition stage's cut (real METIS through pymetis, trained and
untrained ids apart) and the schedule stage's batching (``plan_batches``: every strategy, the ids to come
apart from the trained ones), on small clustered data of 1-6 tasks of unequal sizes. Then
:class:`ScheduleSampler` runs them on 1-4 ranks over 1-3 epochs with 0-4 swaps at random steps (at an epoch
boundary, two in a row, later than their snapshot, refused as the trainer refuses them) and a resume from
``state_dict`` at a random step. The invariants:

- every id exactly once per epoch;
- the steps trained are the steps the run's budget was built for (``epochs * epoch_steps`` at the start);
- every rank the same steps, each with a non-empty slice;
- a miner's batch whose members are all still to come at a swap is a step, with its hard negatives;
- post-swap steps keep to one task (bar the pooled tails) and tasks interleave as in the plan's order of
  the miner's batches;
- versions never go backwards; a resumed run trains exactly what the uninterrupted run trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from b3stream.config import MineConfig
from b3stream.mining.embed import Embeddings
from b3stream.mining.pipeline import NEEDS, cut_communities, plan_batches
from b3stream.mining.rank import RankParams, merge_threshold, rank
from b3stream.mining.strategies import BatchInputs, get_strategy
from b3stream.refresh.swap import check_swap as swappable, swap
from b3stream.refresh.trainer import fits_now
from b3stream.schedule import Schedule, ScheduleError
from b3stream.train.sampler import ScheduleSampler

from ._mining_synth import clustered

STRATEGIES = ["random", "random_hn", "task", "task_hn", "gcbs", "b3", "b3pp"]


# -- the data and the miner ----------------------------------------------------------------------------


@dataclass
class Setting:
    strategy: str
    task_sizes: list[int]
    batch_size: int
    K: int
    p: int
    m: int
    h: int
    world: int
    seed: int
    epochs: int
    emb: Embeddings = field(repr=False, default=None)

    @property
    def n(self) -> int:
        return sum(self.task_sizes)


def make_data(task_sizes: list[int], seed: int) -> Embeddings:
    """Clustered unit vectors; task ids assigned in a seeded order (tasks interleave in the id space)."""
    n = sum(task_sizes)
    q, p, _ = clustered(n, d=16, clusters=max(2, n // 12), seed=seed)
    tasks = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(task_sizes)), task_sizes))
    return Embeddings(queries=q, positives=p, tasks=tasks.astype(np.int32),
                      task_names=[f"t{i}" for i in range(len(task_sizes))], stamp={}, record={}, folder=Path("."))


def mine_config(s: Setting, seed: int) -> MineConfig:
    """The MineConfig refreshed mode's miner uses (refresh.trainer.miner_config): the schedule's parameters,
    small tasks merged; exact search."""
    return MineConfig(strategy=s.strategy, p=s.p, m=s.m, K=s.K, batch_size=s.batch_size, h=s.h, seed=seed,
                      small_tasks="merge", index="flat", quality_sample=0)


def mine(s: Setting, version: int, trained: np.ndarray | None = None, source_step: int | None = None,
         source_epoch: int | None = None) -> Schedule:
    """One schedule version, mined like the pipeline's stages (rank -> partition -> schedule) on arrays."""
    cfg = mine_config(s, seed=s.seed + (source_step or 0))  # the miner seeds with seed + snapshot step
    needs = NEEDS[s.strategy]
    emb, n = s.emb, s.n
    S = scores = top = comm = ctask = None
    if "rank" in needs:
        S, scores, top, _ = rank(emb, RankParams.from_config(cfg), progress=False, trained=trained)
    if "partition" in needs:
        comm, ctask, _ = cut_communities(S, emb.tasks, emb.task_names, cfg, merge_threshold("merge", s.p, s.m),
                                         trained)
    inputs = BatchInputs(n=n, tasks=emb.tasks, task_names=emb.task_names, S=S, scores=scores, top=top,
                         communities=comm, community_task=ctask, trained=trained)
    batches, negatives, _, batch_task = plan_batches(cfg, inputs)
    meta = {"strategy": s.strategy, "batch_size": s.batch_size, "seed": cfg.seed, "version": version,
            "K": s.K if get_strategy(s.strategy).uses_communities else None,
            "h": s.h if negatives is not None else None, "source_step": source_step}
    if source_epoch is not None:
        meta.update(source_epoch=source_epoch, trained_apart=int(trained.sum()) if trained is not None else 0)
    schedule = Schedule.from_batches(batches, meta, negatives, batch_task=batch_task)
    schedule.check_epoch(n)
    return schedule


# -- the trainer, as far as batches go -----------------------------------------------------------------


@dataclass
class Event:
    snapshot: int  # the step after which the trainer wrote the snapshot
    lag: int  # steps until the miner's schedule is published


@dataclass
class Run:
    steps: list = field(default_factory=list)  # per step: (epoch, version, global batch, hard-negative pool)
    swaps: list = field(default_factory=list)  # per swap: (sampler after it, consumed before it)
    total: int = 0
    epoch_steps: int = 0


def simulate(s: Setting, start: Schedule, events: list[Event], resume_at: int | None,
             mined: dict[int, Schedule]) -> Run:
    """Train ``s.epochs`` epochs of ``start`` on ``s.world`` ranks in lockstep, with refreshed mode's snapshots
    and swaps (the watcher takes the newest published version above the one in use that the trainer
    accepts: fits_now and the sampler's own check), optionally resumed from ``state_dict`` at a step.
    ``mined``: the versions mined so far, by snapshot index (shared between runs of one setting)."""
    samplers = [ScheduleSampler(start, s.n, r, s.world, seed=s.seed) for r in range(s.world)]
    run = Run(epoch_steps=samplers[0].epoch_steps)
    run.total = s.epochs * run.epoch_steps  # the step budget and the LR schedule's length, fixed at the start
    versions = {start.version: start}
    published: dict[int, int] = {}  # version -> step it appears
    rejected: set[int] = set()
    snapshots: dict[int, tuple[np.ndarray, int]] = {}
    step = 0
    while step < run.total:
        head = samplers[0]
        assert len({(x.epoch, x.position, x.steps_left, x.epoch_steps, x.version) for x in samplers}) == 1
        parts = [x.batch_at() for x in samplers]
        assert all(len(p.ids) for p in parts), "a rank without data"
        batch = head.global_batch(head.position)
        assert np.array_equal(np.concatenate([p.ids for p in parts]), batch)
        pool = head.negative_pool(head.position)
        assert np.array_equal(np.concatenate([p.hard_negative_ids for p in parts]), pool)
        run.steps.append((head.epoch, head.version, batch.copy(), pool.copy()))
        for x in samplers:
            x.advance()
        step += 1
        for k, ev in enumerate(events):  # snapshots written after this step, mined (once per setting)
            if ev.snapshot == step:
                consumed, epoch = samplers[0].consumed(), samplers[0].epoch
                if k not in mined:
                    trained = np.zeros(s.n, bool)
                    trained[consumed] = True
                    mined[k] = mine(s, version=start.version + 1 + k, trained=trained if trained.any() else None,
                                    source_step=step, source_epoch=epoch)
                snapshots[k] = (consumed, epoch)
                published[mined[k].version] = step + ev.lag
                versions[mined[k].version] = mined[k]
        current = samplers[0].version
        for version in sorted((v for v, at in published.items() if at <= step and v > current and v not in rejected),
                              reverse=True):
            schedule = versions[version]
            try:
                fits_now(schedule, step, samplers[0].epoch)
                swappable(samplers[0], schedule)
            except ScheduleError:
                rejected.add(version)
                continue
            before = samplers[0].consumed()
            for x in samplers:
                swap(x, schedule, step=step)
            run.swaps.append((_copy_plan(samplers[0]), before))
            break
        if resume_at == step:
            states = [x.state_dict() for x in samplers]
            saved = versions[states[0]["version"]]  # as the trainer's _restore: the saved version's file
            samplers = [ScheduleSampler(saved, s.n, r, s.world, seed=s.seed, epoch_steps=run.epoch_steps)
                        for r in range(s.world)]
            for x, state in zip(samplers, states):
                x.load_state_dict(state)
    assert all(x.epoch == s.epochs and x.position == 0 for x in samplers), "the budget ended inside an epoch"
    return run


def _copy_plan(x: ScheduleSampler) -> dict:
    return {"schedule": x.schedule, "swaps": x.swaps, "epoch": x.epoch, "world": x.world, "seed": x.seed,
            "batches": [x.global_batch(i).copy() for i in range(x.steps_per_epoch)],
            "pools": [x.negative_pool(i).copy() for i in range(x.steps_per_epoch)]}


# -- the invariants ------------------------------------------------------------------------------------


def check_run(s: Setting, run: Run) -> None:
    assert len(run.steps) == run.total
    versions = [v for _, v, _, _ in run.steps]
    assert all(a <= b for a, b in zip(versions, versions[1:])), f"versions went backwards: {versions}"
    for epoch in range(s.epochs):
        ids = [b for e, _, b, _ in run.steps if e == epoch]
        assert len(ids) == run.epoch_steps, f"epoch {epoch}: {len(ids)} steps, the budget has {run.epoch_steps}"
        ids = np.concatenate(ids)
        assert len(ids) == s.n and np.array_equal(np.sort(ids), np.arange(s.n)), f"epoch {epoch}: not each id once"
    for plan, before in run.swaps:
        check_swap(s, plan, before)


def _runs(seq: list[int]) -> int:
    """The longest run of one task (-1, a step of several tasks, breaks runs and makes none)."""
    best = cur = 0
    for i, t in enumerate(seq):
        cur = 0 if t < 0 else cur + 1 if i and t == seq[i - 1] else 1
        best = max(best, cur)
    return best


def check_swap(s: Setting, plan: dict, before: np.ndarray) -> None:
    """The plan made at a swap, against the schedule it swapped to."""
    sched: Schedule = plan["schedule"]
    consumed = np.zeros(s.n, bool)
    consumed[before] = True
    steps = {frozenset(b.tolist()): i for i, b in enumerate(plan["batches"])}
    oversized = sum(len(b) > s.batch_size for b in plan["batches"])  # a tail smaller than the world merged in
    alive = [(~consumed[b]) for b in sched.batches]
    broken = sum(a.any() and not a.all() for a in alive)
    # 1. the miner's batches of ids still to come are steps, with the hard negatives drawn for them
    lost = 0
    for b, (ids, a) in enumerate(zip(sched.batches, alive)):
        if not a.all() or (len(ids) < s.batch_size and broken):
            continue  # (a short batch of the miner's may join the pooled tails of a broken plan)
        i = steps.get(frozenset(ids.tolist()))
        if i is None:
            lost += 1
            continue
        if sched.negative_ids is not None:
            drawn = np.unique(sched.hard_negatives[b])
            drawn = drawn[(drawn >= 0) & ~np.isin(drawn, ids)]
            if len(drawn) < s.world:
                drawn = drawn[:0]
            if not np.array_equal(plan["pools"][i], drawn):
                lost += 1
    # a tail smaller than the world size merged into a batch costs both their negatives, nothing else does
    assert lost <= 2 * oversized, f"{lost} whole batches of the miner's lost (or lost their negatives)"
    if sched.batch_task is None:
        return
    # 2. one task per step but the pooled tails (where the miner keeps tasks apart); tasks interleave as in the
    # plan's order of the miner's batches
    tasks = s.emb.tasks
    kinds = [int(tasks[b[0]]) if (tasks[b] == tasks[b[0]]).all() else -1 for b in plan["batches"]]
    if s.strategy not in ("random", "random_hn"):  # their batches mix tasks by design
        mined = {frozenset(x.tolist()) for x in sched.batches}
        mixed_recut = sum(k == -1 and frozenset(b.tolist()) not in mined for k, b in zip(kinds, plan["batches"]))
        assert mixed_recut <= len(s.task_sizes), f"{mixed_recut} re-cut steps mix tasks"
    order = np.random.default_rng([plan["seed"], plan["epoch"], plan["swaps"]]).permutation(len(sched.offsets) - 1)
    reference = [int(sched.batch_task[b]) for b in order if alive[b].any()]
    assert _runs(kinds) <= _runs(reference) + broken, \
        f"a run of one task after the swap ({kinds}) longer than in the miner's batches ({reference})"


# -- the property --------------------------------------------------------------------------------------


@st.composite
def settings_for(draw, strategy: str) -> Setting:
    communities = get_strategy(strategy).uses_communities
    K = draw(st.sampled_from([1, 2, 3, 4])) if communities else 1
    batch_size = K * draw(st.integers(1 if K > 1 else 2, 6))
    world = draw(st.sampled_from([w for w in (1, 2, 3, 4) if batch_size % w == 0]))
    sizes = draw(st.lists(st.integers(1, 3 * batch_size), min_size=1, max_size=6))
    p, m = draw(st.integers(0, 2)), draw(st.integers(2, 6))
    floor = max(batch_size, p + m + 2, world, 12)
    if sum(sizes) < floor:
        sizes[int(np.argmax(sizes))] += floor - sum(sizes)
    return Setting(strategy=strategy, task_sizes=sizes, batch_size=batch_size, K=K, p=p, m=m,
                   h=draw(st.integers(1, 2)), world=world, seed=draw(st.integers(0, 1000)),
                   epochs=draw(st.integers(1, 3)))


def run_setting(s: Setting, data) -> None:
    s.emb = make_data(s.task_sizes, s.seed)
    start = mine(s, version=0)
    epoch_steps = ScheduleSampler(start, s.n, 0, s.world, seed=s.seed).epoch_steps
    total = s.epochs * epoch_steps
    boundary = st.sampled_from([e * epoch_steps for e in range(1, s.epochs)] or [max(1, total - 1)])
    step = st.one_of(st.integers(1, max(1, total - 1)), boundary)
    events = data.draw(st.lists(st.builds(Event, step, st.sampled_from([0, 0, 0, 1, 2, 5])), max_size=4),
                       label="events")
    events.sort(key=lambda e: e.snapshot)
    resume_at = data.draw(st.one_of(st.none(), st.integers(1, max(1, total - 1))), label="resume")
    mined: dict[int, Schedule] = {}
    plain = simulate(s, start, events, None, mined)
    check_run(s, plain)
    if resume_at is not None:
        resumed = simulate(s, start, events, resume_at, mined)
        assert [(e, v, b.tolist(), p.tolist()) for e, v, b, p in resumed.steps] == \
            [(e, v, b.tolist(), p.tolist()) for e, v, b, p in plain.steps], "the resumed run trained otherwise"


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(data=st.data())
def test_swaps_keep_every_promise(strategy, data):
    run_setting(data.draw(settings_for(strategy), label="setting"), data)


# -- regressions: cases the properties found in the sampler and miner before issue 32's fix ----------------


def check(s: Setting, events: list[Event], resume_at: int | None = None) -> Run:
    s.emb = make_data(s.task_sizes, s.seed)
    start = mine(s, version=0)
    mined: dict[int, Schedule] = {}
    run = simulate(s, start, events, None, mined)
    check_run(s, run)
    if resume_at is not None:
        resumed = simulate(s, start, events, resume_at, mined)
        assert [b.tolist() for _, _, b, _ in resumed.steps] == [b.tolist() for _, _, b, _ in run.steps]
    return run


def test_the_ids_to_come_keep_their_hard_negatives_task_hn():
    """task_hn batched the trained and the untrained ids of a task together: no batch survived the swap."""
    check(Setting("task_hn", [9, 3], batch_size=5, K=1, p=0, m=2, h=1, world=1, seed=0, epochs=1), [Event(2, 0)])


def test_an_epoch_keeps_its_steps_across_a_swap_b3pp():
    """Each task's tail batch after a swap made the epoch longer than the step budget: ids never trained."""
    check(Setting("b3pp", [1, 12], batch_size=4, K=2, p=0, m=2, h=1, world=1, seed=0, epochs=2),
          [Event(1, 0), Event(4, 1)])


def test_no_task_after_task_curriculum_after_a_swap():
    """After a swap the plan was sorted by task."""
    check(Setting("b3pp", [11, 1, 14, 9], batch_size=2, K=2, p=0, m=2, h=1, world=1, seed=0, epochs=1),
          [Event(1, 0)])


def test_b3pp_half_trained_synchronous_swap_keeps_every_hard_negative():
    """Issue 32: b3pp, K 8, |B| 64, half the ids trained at the snapshot, a synchronous swap: 32 of 32 miner
    batches mixed trained and untrained ids and 0 of 16 post-swap steps had hard negatives."""
    s = Setting("b3pp", [1024], batch_size=64, K=8, p=2, m=10, h=1, world=1, seed=0, epochs=1)
    run = check(s, [Event(8, 0)])
    after = [pool for _, v, _, pool in run.steps if v == 1]
    assert len(after) == 8 and all(len(pool) == 64 for pool in after)


def test_four_tasks_interleave_after_a_swap():
    """Issue 32: four tasks, before the swap 2132011202331330..., after it 0000000013333333111111222222."""
    s = Setting("b3", [260, 190, 150, 100], batch_size=16, K=4, p=2, m=8, h=1, world=1, seed=3, epochs=1)
    run = check(s, [Event(12, 0)])
    tasks = [int(s.emb.tasks[b[0]]) for _, v, b, _ in run.steps if v == 1 and len(set(s.emb.tasks[b])) == 1]
    assert sum(a != b for a, b in zip(tasks, tasks[1:])) > len(tasks) // 2, tasks


def test_five_tasks_three_swaps_keep_the_step_budget():
    """Issue 32: five tasks, |B| 32, N 1000, three swaps: 32 -> 37 steps, and the budget of 32 left 142 ids
    untrained. Also two of the swaps lagging behind their snapshots, and a resume."""
    s = Setting("b3pp", [310, 250, 200, 140, 100], batch_size=32, K=4, p=2, m=8, h=1, world=2, seed=1, epochs=1)
    run = check(s, [Event(5, 0), Event(12, 2), Event(20, 3)], resume_at=16)
    assert run.total == run.epoch_steps == 32


# -- refusals and older sampler states -----------------------------------------------------------------------


def test_the_watcher_skips_a_schedule_of_another_batch_size(tmp_path, toy_dataset):
    """The trainer's accept (BetweenSteps) asks the swap's check too: a newer version of another |B| is skipped with a
    message, and the next good one is taken."""
    import torch

    from b3stream.data.manifest import Manifest
    from b3stream.dist import DistInfo
    from b3stream.refresh.hotswap import ScheduleWatcher
    from b3stream.schedule import load_schedule

    from ._train_util import random_schedule

    folder = tmp_path / "schedules"
    manifest = Manifest.load(toy_dataset)
    first = load_schedule(random_schedule(toy_dataset, batch_size=16, K=4, seed=0, folder=folder, version=0))
    sampler = ScheduleSampler(first, manifest.split("train").n, seed=0)
    said = []
    watcher = ScheduleWatcher(folder, manifest, DistInfo(rank=0, world_size=1, local_rank=0,
                                                         device=torch.device("cpu"), backend="gloo"), say=said.append,
                               background=False)
    watcher.accept = partial(swappable, sampler)
    random_schedule(toy_dataset, batch_size=8, K=4, seed=1, folder=folder, version=1)
    assert watcher.check(0) is None and 1 in watcher.rejected
    assert "|B|=8, this run trains |B|=16" in said[-1]
    random_schedule(toy_dataset, batch_size=16, K=4, seed=2, folder=folder, version=2)
    assert watcher.check(0).version == 2


def test_refresh_mine_may_not_change_the_batch_size():
    from b3stream.config import ConfigError, TrainConfig, from_dict
    from b3stream.refresh.trainer import miner_config

    schedule = Schedule.from_batches([np.arange(16), np.arange(16, 32)], {"strategy": "b3", "K": 4, "batch_size": 16})
    cfg = from_dict(TrainConfig, {"data": "d", "schedule": "s", "mode": "refreshed",
                                  "refresh": {"every_steps": 4, "mine": {"batch_size": 32}}})
    with pytest.raises(ConfigError, match="refresh.mine.batch_size=32: the run trains [|]B[|]=16"):
        miner_config(cfg, schedule)


def test_a_sampler_state_saved_before_fixed_epoch_steps_resumes():
    """States saved by the older sampler (no epoch_steps, no done): a plan without a swap is rebuilt exactly; a
    post-swap plan (which the older sampler cut otherwise) is re-batched into the epoch's steps left."""
    s = Setting("b3pp", [70, 50, 30], batch_size=8, K=4, p=1, m=6, h=1, world=1, seed=4, epochs=1)
    s.emb = make_data(s.task_sizes, s.seed)
    start = mine(s, version=0)
    a = ScheduleSampler(start, s.n, seed=s.seed)
    for _ in range(3):
        a.advance()
    old = {k: v for k, v in a.state_dict().items() if k not in ("epoch_steps", "done")}
    b = ScheduleSampler(start, s.n, seed=s.seed)
    b.load_state_dict(old)
    assert [x.ids.tolist() for x in b] == [x.ids.tolist() for x in a]
    trained = np.zeros(s.n, bool)
    trained[a.consumed()] = True
    new = mine(s, version=1, trained=trained, source_step=3, source_epoch=0)
    swap(a, new, step=3)
    a.advance()
    old = {k: v for k, v in a.state_dict().items() if k not in ("epoch_steps", "done")}
    c = ScheduleSampler(new, s.n, seed=s.seed, epoch_steps=a.epoch_steps)  # as the trainer's _restore makes it
    c.load_state_dict(old)
    assert c.epoch_steps == a.epoch_steps and 4 + c.steps_per_epoch == a.epoch_steps
    left = np.concatenate([x.ids for x in c])
    assert np.array_equal(np.sort(np.concatenate([a.consumed(), left])), np.arange(s.n))

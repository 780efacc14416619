"""Hot swap in the sampler and the loop's schedule watcher: only strictly newer versions, re-batching along
the new schedule's communities, exactly once per epoch, the swap history."""

from __future__ import annotations

import numpy as np

from b3stream.schedule import Schedule
from b3stream.train.sampler import ScheduleSampler


def community_schedule(n: int, K: int, size: int, seed: int, version: int) -> Schedule:
    """Batches of |B| = size made of communities of K consecutive ids of a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    batches = [perm[i : i + size] for i in range(0, n, size)]
    s = Schedule.from_batches(batches, {"strategy": "b3", "K": K, "batch_size": size, "version": version,
                                        "data": {"n": n, "fingerprint": "x"}})
    return s


def communities_of(s: Schedule, K: int) -> dict[int, int]:
    """id -> community index (runs of K inside each batch)."""
    out = {}
    for b, batch in enumerate(s.batches):
        for j, i in enumerate(batch):
            out[int(i)] = b * 1000 + j // K
    return out


def test_swap_rebatches_along_the_new_communities():
    n, K, B = 480, 8, 32
    old, new = community_schedule(n, K, B, 0, 0), community_schedule(n, K, B, 1, 1)
    sampler = ScheduleSampler(old, n, seed=5)
    sampler.advance()
    consumed = set(sampler.consumed().tolist())
    sampler.swap(new, step=1)
    assert sampler.history == [{"epoch": 0, "position": 1, "step": 1, "from": 0, "to": 1}]
    comm = communities_of(new, K)
    members: dict[int, list[int]] = {}
    for i, c in comm.items():
        members.setdefault(c, []).append(i)
    intact = {c for c, ids in members.items() if not consumed & set(ids)}
    seen = []
    for step in sampler:
        batch = step.ids.tolist()
        seen += batch
        for c in {comm[i] for i in batch} & intact:  # a community untouched by the old plan stays whole
            assert set(members[c]) <= set(batch)
    assert len(intact) > 15
    assert sorted(seen + sorted(consumed)) == list(range(n))  # exactly once in the epoch
    # The survivors of broken communities come after all whole ones.
    broken = [i for i in seen if comm[i] not in intact]
    assert seen[-len(broken):] == broken


def test_sampler_state_keeps_the_swap_history():
    n = 160
    old, new = community_schedule(n, 4, 16, 0, 0), community_schedule(n, 4, 16, 1, 1)
    a = ScheduleSampler(old, n, seed=1)
    a.advance()
    a.swap(new, step=1)
    a.advance()
    b = ScheduleSampler(new, n, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.history == a.history and [s.ids.tolist() for s in b] == [s.ids.tolist() for s in a]

"""Hot swap in the sampler and the loop's schedule watcher: only strictly newer versions, re-batching along
the new schedule's communities, exactly once per epoch, the swap history."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save

from b3stream.data.manifest import Manifest
from b3stream.schedule import META_KEY, Schedule, load_schedule, version_path
from b3stream.dist import DistInfo
from b3stream.refresh.swap import swap
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
    swap(sampler, new, step=1)
    assert sampler.history == [{"epoch": 0, "position": 1, "step": 1, "from": 0, "to": 1}]
    comm = communities_of(new, K)
    members: dict[int, list[int]] = {}
    for i, c in comm.items():
        members.setdefault(c, []).append(i)
    intact = {c for c, ids in members.items() if not consumed & set(ids)}
    seen, steps = [], []
    for step in sampler:
        batch = step.ids.tolist()
        seen += batch
        steps.append(set(batch))
        for c in {comm[i] for i in batch} & intact:  # a community untouched by the old plan stays whole
            assert set(members[c]) <= set(batch)
    assert len(intact) > 15
    assert sorted(seen + sorted(consumed)) == list(range(n))  # exactly once in the epoch
    assert 1 + len(steps) == sampler.epoch_steps  # the epoch keeps its number of steps
    # The survivors of broken communities are packed together, not spread over the batches.
    broken = {i for i in seen if comm[i] not in intact}
    assert sum(bool(broken & s) for s in steps) <= -(-len(broken) // B) + 1


def test_sampler_state_keeps_the_swap_history():
    n = 160
    old, new = community_schedule(n, 4, 16, 0, 0), community_schedule(n, 4, 16, 1, 1)
    a = ScheduleSampler(old, n, seed=1)
    a.advance()
    swap(a, new, step=1)
    a.advance()
    b = ScheduleSampler(new, n, seed=1)
    b.load_state_dict(a.state_dict())
    assert b.history == a.history and [s.ids.tolist() for s in b] == [s.ids.tolist() for s in a]


# -- a bad newer version never stops training (issue 19, item 5) ----------------------------------------


def _with_header(good: Path, change) -> bytes:
    """The bytes of the schedule file ``good`` with ``change(entry)`` applied to its metadata entry (the
    checksum is then stale, but metadata that does not fit the format is refused before that matters)."""
    with safe_open(good, framework="numpy") as f:
        arrays, entry = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META_KEY])
    change(entry)
    return save(arrays, metadata={META_KEY: json.dumps(entry)})


def _with_ids(good: Path, version: int, change) -> bytes:
    """A schedule with a valid checksum: ``good`` loaded, ``change(ids)`` applied, written again as
    ``version`` (so only its ids are wrong)."""
    sched = load_schedule(good)
    ids = sched.ids.copy()
    change(ids)
    meta = {**{k: v for k, v in sched.meta.items() if k != "timings"}, "version": version}
    return Schedule(ids=ids, offsets=sched.offsets, meta=meta).to_bytes()


def test_the_watcher_skips_any_bad_newer_version_and_training_goes_on(tmp_path, toy_dataset):
    from b3stream.refresh.hotswap import ScheduleWatcher

    from ._train_util import random_schedule

    folder = tmp_path / "schedules"
    manifest = Manifest.load(toy_dataset)
    n = manifest.split("train").n
    first = random_schedule(toy_dataset, batch_size=16, K=4, seed=0, folder=folder, version=0)
    crafted = {  # version -> (bytes dropped into the folder, what the message names)
        1: (_with_header(first, lambda h: h.update(sha256=[])), "sha256 is not 64 hex digits"),
        2: (_with_header(first, lambda h: h.update(meta=[1, 2])), "Input should be a valid dictionary"),
        3: (struct.pack("<Q", 400_000) + b"[" * 200_000 + b"]" * 200_000, "not a readable safetensors file"),
        4: (_with_ids(first, 4, lambda ids: ids.__setitem__(0, -5)), r"1 ids outside 0\.\.\d+ \(e\.g\. -5\)"),
        5: (_with_ids(first, 5, lambda ids: ids.__setitem__(0, 10**6)), r"1 ids outside 0\.\.\d+ \(e\.g\. 1000000\)"),
        6: (_with_ids(first, 6, lambda ids: ids.__setitem__(0, ids[1])), "1 missing, 1 repeated"),  # swap would fail
        7: (first.read_bytes(), "holds version 0, not the one its name says"),  # a copy of v0 under a newer name
    }
    said = []
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    watcher = ScheduleWatcher(folder, manifest, dist, say=said.append, background=False)  # the decisions, inline
    for version, (data, message) in crafted.items():  # dropped in one at a time, as a running trainer sees them
        version_path(folder, version).write_bytes(data)
        assert watcher.check(0) is None  # not it, and never back to an older one
        assert len(said) == version and version in watcher.rejected
        assert re.search(rf"^schedule v{version} not used: .*v{version:06d}\.b3s: .*{message}", said[-1]), said[-1]
    assert watcher.check(0) is None and len(said) == len(crafted)  # each is read once, not at every step
    # A good version published after them is taken, and the sampler swaps to it.
    good = random_schedule(toy_dataset, batch_size=16, K=4, seed=8, folder=folder, version=8)
    new = watcher.check(0)
    assert new is not None and new.version == 8 and new.path == good
    sampler = ScheduleSampler(load_schedule(first), n, seed=0)
    sampler.advance()
    swap(sampler, new, step=1)
    assert sampler.version == 8



# -- a version that does not fit now, and a read that fails on one rank ------------------------------------


def _publish(folder: Path, data: Path, version: int, seed: int, **meta) -> Path:
    from ._train_util import random_schedule

    path = random_schedule(data, batch_size=16, K=4, seed=seed, folder=folder, version=version)
    if meta:
        from b3stream.schedule import publish_schedule

        s = load_schedule(path)
        s.meta.update(meta)
        path.unlink()
        path.with_suffix(".json").unlink(missing_ok=True)
        publish_schedule(s, folder, version)
    return path


def test_a_version_from_a_later_snapshot_waits_and_one_from_another_epoch_is_refused(tmp_path, toy_dataset):
    """The trainer's accept rule (refreshing.fits_now): a schedule mined from a snapshot of a step not reached yet
    (a resumed run) is passed over until that step, not rejected; one mined apart for another epoch's
    remainder is refused for good."""
    from b3stream.refresh.hotswap import ScheduleWatcher
    from b3stream.refresh.trainer import fits_now as _fits_now

    folder = tmp_path / "schedules"
    _publish(folder, toy_dataset, 0, seed=0)
    _publish(folder, toy_dataset, 1, seed=1, source_step=60, source_epoch=0, trained_apart=0)
    said, position = [], {"step": 50, "epoch": 0}
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    watcher = ScheduleWatcher(folder, Manifest.load(toy_dataset), dist, say=said.append, background=False)
    watcher.accept = lambda s: _fits_now(s, position["step"], position["epoch"])
    assert watcher.check(0) is None and not said  # step 50 < 60: not yet, and not rejected
    position["step"] = 60
    assert watcher.check(0).version == 1
    _publish(folder, toy_dataset, 2, seed=2, source_step=70, source_epoch=0, trained_apart=40)
    position.update(step=80, epoch=1)
    assert watcher.check(1) is None and "for the rest of epoch 0" in said[-1]
    assert 2 in watcher.rejected


def _two_rank_watch(rank: int, world: int, port: int, root: str, data: str, out: str) -> None:
    """Each rank watches its own copy of a folder with its loader on a thread; rank 1's copy of v1 is
    unreadable when rank 0 first announces it (a transient fault on one rank), readable after: the failure is
    reported at the next check, counted on both ranks, read again, and v1 swapped at the same check on both."""
    import os

    import torch.distributed as tdist

    from b3stream.refresh.hotswap import ScheduleWatcher

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    folder = Path(root) / f"rank{rank}"
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), backend="gloo")
    watcher = ScheduleWatcher(folder, Manifest.load(data), dist, say=lambda m: None)  # loaders on threads
    v1 = version_path(folder, 1)
    good = v1.read_bytes()
    if rank == 1:
        v1.write_bytes(good[:100])
    seen = []
    assert watcher.settle()  # rank 0's loader has v1
    seen.append(watcher.check(0))  # rank 0 announces v1
    assert watcher.settle()  # rank 1's loader fails to read its copy
    tdist.barrier()
    if rank == 1:
        v1.write_bytes(good)
    seen.append(watcher.check(0))  # the failure is counted on both ranks; rank 1 reads it again
    assert watcher.settle()
    seen.append(watcher.check(0))  # every rank has it: both swap, at this same check
    watcher.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"seen": [s and s.version for s in seen], "failures": watcher.failures.get(1, 0)}))
    tdist.barrier()
    tdist.destroy_process_group()


@pytest.mark.slow
def test_a_version_one_rank_could_not_read_is_tried_again(tmp_path, toy_dataset):
    import shutil

    import torch.multiprocessing as mp

    from b3stream.dist import free_port

    for version in (0, 1):
        _publish(tmp_path / "rank0", toy_dataset, version, seed=version)
    shutil.copytree(tmp_path / "rank0", tmp_path / "rank1")
    mp.spawn(_two_rank_watch, args=(2, free_port(), str(tmp_path), str(toy_dataset), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"seen": [None, None, 1], "failures": 1}

"""The schedule file contract: versioned, atomic, checksummed, byte-identical, stamped with its data."""

import json
import multiprocessing as mp
import os

import numpy as np
import pytest

from b3stream import load_schedule
from b3stream.schedule import (
    Schedule, ScheduleError, VersionExistsError, latest_schedule, list_versions, publish_schedule, sidecar,
    version_path,
)

STAMP = {"dataset": "toy", "split": "train", "n": 12, "fingerprint": "ab" * 32}


def _schedule(seed=0, h=None):
    ids = np.random.default_rng(seed).permutation(12)
    batches = [ids[:4], ids[4:8], ids[8:]]
    negs = None
    if h:
        negs = [np.stack([np.setdiff1d(np.arange(12), b)[:h]] * len(b)) for b in batches]
    return Schedule.from_batches(batches, meta={"strategy": "random", "K": 2, "batch_size": 4, "seed": seed,
                                                "data": STAMP, "timings": {"total_s": 0.1}}, negatives=negs)


def test_round_trip_with_hard_negatives(tmp_path):
    s = _schedule(h=3)
    path = publish_schedule(s, tmp_path)
    back = load_schedule(path, expect=STAMP)
    assert back.version == 0 and back.meta["strategy"] == "random"
    assert [b.tolist() for b in back.batches] == [b.tolist() for b in s.batches]
    assert back.hard_negatives[1].shape == (4, 3)
    assert back.meta["timings"] == {"total_s": 0.1}  # from the sidecar
    back.check_epoch(12)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by whoever may read the folder


def test_versions_and_byte_identical_content(tmp_path):
    a = publish_schedule(_schedule(seed=1), tmp_path)
    s = _schedule(seed=1)
    s.meta["timings"] = {"total_s": 99.0}  # wall-clock differs, content does not
    b = publish_schedule(s, tmp_path)
    assert list_versions(tmp_path) == [0, 1]
    assert a.read_bytes().replace(b'"version":0', b'"version":1') != b""  # both exist
    c = publish_schedule(_schedule(seed=1), tmp_path / "other", version=1)
    assert c.read_bytes() == b.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_corrupt_schedule_rejected_and_last_good_kept(tmp_path):
    publish_schedule(_schedule(seed=0), tmp_path)
    bad = publish_schedule(_schedule(seed=1), tmp_path)
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ScheduleError, match="checksum mismatch"):
        load_schedule(bad)
    with pytest.warns(UserWarning, match="skipping schedule"):
        assert latest_schedule(tmp_path) == version_path(tmp_path, 0)
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ScheduleError, match="truncated|corrupt"):
        load_schedule(bad)
    with pytest.warns(UserWarning):
        assert load_schedule(tmp_path).version == 0


def test_schedule_for_other_data_is_refused(tmp_path):
    path = publish_schedule(_schedule(), tmp_path)
    other = {**STAMP, "fingerprint": "cd" * 32}
    with pytest.raises(ScheduleError, match="built for data .* rebuild it"):
        load_schedule(path, expect=other)


def test_epoch_check_finds_missing_and_repeated_ids():
    s = Schedule.from_batches([np.array([0, 1, 2]), np.array([2, 3, 4])])
    with pytest.raises(ScheduleError, match="1 missing, 1 repeated"):
        s.check_epoch(6)
    with pytest.raises(ScheduleError, match="offsets"):
        Schedule(ids=np.arange(3), offsets=np.array([0, 5]))


def _publisher(folder, worker, count, barrier, out):
    """One of several processes publishing ``count`` schedules into the same folder, starting together."""
    barrier.wait()
    for i in range(count):
        seed = 1000 * worker + i
        out.put((seed, str(publish_schedule(_schedule(seed=seed), folder))))


def test_concurrent_publishers_never_share_a_version(tmp_path):
    # Real processes, started together by a barrier, each choosing "the next version" many times: without
    # an atomic claim two of them pick the same number and one schedule silently replaces the other.
    workers, count = 4, 15
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_publisher, args=(tmp_path, w, count, barrier, out)) for w in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(workers * count)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    paths = [path for _, path in results]
    assert len(set(paths)) == workers * count, "two publishers were handed the same version"
    assert list_versions(tmp_path) == list(range(workers * count))
    for seed, path in results:  # none lost: each file is the schedule its publisher was told it wrote
        back = load_schedule(path)
        assert back.meta["seed"] == seed and str(version_path(tmp_path, back.version)) == path
        assert json.loads(sidecar(back.path).read_text())["meta"]["seed"] == seed
    assert sorted(load_schedule(p).meta["seed"] for p in paths) == sorted(s for s, _ in results)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_explicit_version_over_an_existing_one_is_refused_unless_overwrite(tmp_path):
    first = publish_schedule(_schedule(seed=1), tmp_path, version=3)
    before, side_before = first.read_bytes(), sidecar(first).read_text()
    other = _schedule(seed=2)
    other.meta["timings"] = {"total_s": 42.0}
    with pytest.raises(VersionExistsError, match=r"v000003\.b3s already exists.*overwrite"):
        publish_schedule(other, tmp_path, version=3)
    # the refused schedule left nothing: the file and its sidecar are those of the first publish
    assert first.read_bytes() == before and sidecar(first).read_text() == side_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000003.b3s", "v000003.json"]
    assert publish_schedule(other, tmp_path, version=3, overwrite=True) == first
    back = load_schedule(first)
    assert back.meta["seed"] == 2 and back.meta["timings"] == {"total_s": 42.0}
    assert publish_schedule(_schedule(seed=3), tmp_path) == version_path(tmp_path, 4)  # next free still works


@pytest.mark.parametrize("version", [-3, 1.5, True])
def test_a_version_that_is_not_a_non_negative_integer_is_refused(tmp_path, version):
    with pytest.raises(ScheduleError, match="non-negative integer"):
        publish_schedule(_schedule(), tmp_path, version=version)
    assert not list(tmp_path.iterdir())


def test_a_failed_publish_leaves_no_sidecar_and_orphans_are_removed(tmp_path):
    bad = _schedule()
    bad.meta["note"] = np.int64(3)  # the sidecar writer can serialise this, the schedule writer cannot
    with pytest.raises(TypeError):
        publish_schedule(bad, tmp_path)
    assert not list(tmp_path.iterdir()), "a schedule that was never written left its sidecar behind"
    # a sidecar whose schedule is gone (deleted, or left by a crashed writer) would lend its stale timings
    # to the next schedule published under that version
    path = publish_schedule(_schedule(seed=1), tmp_path)
    path.unlink()
    orphan = tmp_path / "v000007.json"
    orphan.write_text(json.dumps({"timings": {"total_s": 1.0}}))
    fresh = _schedule(seed=2)
    fresh.meta["timings"] = {}
    publish_schedule(fresh, tmp_path, version=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000009.b3s", "v000009.json"]

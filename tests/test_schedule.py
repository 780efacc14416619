"""The schedule file contract: versioned, atomic, checksummed, byte-identical, stamped with its data."""

import numpy as np
import pytest

from b3stream import load_schedule
from b3stream.schedule import (
    Schedule, ScheduleError, latest_schedule, list_versions, publish_schedule, version_path,
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

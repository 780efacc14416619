"""The schedule file contract: versioned, atomic, checksummed, byte-identical, stamped with its data."""

import json
import multiprocessing as mp
import os
import struct

import numpy as np
import pytest

from b3stream import load_schedule
from b3stream.cli import main
from b3stream.schedule import (
    MAGIC, Schedule, ScheduleError, VersionExistsError, latest_schedule, list_versions, publish_schedule, sidecar,
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


# -- crafted files: every failure is a ScheduleError naming the file (issue 19, item 5) -------------------


def _header_of(schedule: Schedule) -> tuple[dict, bytes]:
    """The header dict and the array bytes of a real schedule file."""
    data = schedule.to_bytes()
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    start = len(MAGIC) + 8
    return json.loads(data[start : start + hlen]), data[start + hlen :]


def _craft(path, header, body: bytes = b"", length: int | None = None):
    """A file with the real magic and ``header`` (a dict, or raw bytes) in place of the writer's."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(MAGIC + struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


def _edit(change):
    """A crafted file: the header of a real schedule with ``change(header)`` applied, its body kept."""
    def make(path):
        header, body = _header_of(_schedule(h=2))
        change(header)
        return _craft(path, header, body)
    return make


def _set(keys, value):
    def change(header):
        d = header
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return change


CRAFTED = {
    "arrays is a list": (_edit(_set(["arrays"], [])), "arrays must name ids, offsets"),
    "meta is a list": (_edit(_set(["meta"], [1, 2])), "meta must be an object"),
    "200000 nested brackets": (lambda p: _craft(p, b"[" * 200_000 + b"]" * 200_000), "nested too deeply"),
    "nested 100 deep": (lambda p: _craft(p, b'{"meta": ' + b"[" * 100 + b"]" * 100 + b"}"), "nested deeper"),
    "header longer than the file": (lambda p: _craft(p, b"{}", length=1 << 40), "truncated"),
    "header not JSON": (lambda p: _craft(p, b"\xff\xfe{"), "corrupt header"),
    "no header length": (lambda p: p.write_bytes(MAGIC + b"\x01") and p, "truncated"),
    "unknown array": (_edit(_set(["arrays", "weights"], {"dtype": "<i8", "shape": [0], "offset": 0, "nbytes": 0})),
                      "arrays must name ids, offsets"),
    "missing ids": (_edit(lambda h: h["arrays"].pop("ids")), "arrays must name ids, offsets"),
    "float ids": (_edit(_set(["arrays", "ids", "dtype"], "<f8")), "dtype '<f8', expected '<i8'"),
    "big-endian ids": (_edit(_set(["arrays", "ids", "dtype"], ">i8")), "dtype '>i8'"),
    "ids of rank 2": (_edit(_set(["arrays", "ids", "shape"], [3, 4])), "is not 1 non-negative integers"),
    "negative shape": (_edit(_set(["arrays", "offsets", "shape"], [-4])), "is not 1 non-negative integers"),
    "shape as text": (_edit(_set(["arrays", "ids", "shape"], "12")), "is not 1 non-negative integers"),
    "negatives of rank 1": (_edit(_set(["arrays", "hard_negatives", "shape"], [24])), "is not 2 non-negative"),
    "nbytes off": (_edit(_set(["arrays", "ids", "nbytes"], 8)), "nbytes 8 does not match shape"),
    "negative offset": (_edit(_set(["arrays", "ids", "offset"], -8)), "at byte -8 of the body"),
    "overlapping arrays": (_edit(_set(["arrays", "offsets", "offset"], 0)), "at byte 0 of the body, expected"),
    "array past the end": (_edit(_set(["arrays", "offsets", "shape"], [400])), "nbytes .* does not match"),
    "sha256 a number": (_edit(_set(["sha256"], 5)), "sha256 is not 64 hex digits"),
    "extra key": (_edit(_set(["more"], 1)), "exactly the keys arrays, meta, sha256"),
    "version as text": (_edit(_set(["meta", "version"], "7")), "meta 'version' is '7', expected an integer"),
    "batch size zero": (_edit(_set(["meta", "batch_size"], 0)), "meta 'batch_size' is 0"),
    "data a list": (_edit(_set(["meta", "data"], [12])), "meta 'data' is \\[12\\], expected an object"),
    "data n as text": (_edit(_set(["meta", "data", "n"], "12")), "meta data 'n' is '12'"),
    "a header of null": (lambda p: _craft(p, b"null"), "exactly the keys arrays, meta, sha256"),
}


@pytest.mark.parametrize("craft, message", CRAFTED.values(), ids=list(CRAFTED))
def test_a_crafted_header_is_a_schedule_error_naming_the_file(tmp_path, capsys, craft, message):
    path = craft(tmp_path / "v000001.b3s")
    with pytest.raises(ScheduleError, match=message) as err:
        load_schedule(path)
    assert str(err.value).startswith(f"{path}: ")
    with pytest.raises(ScheduleError, match=message):
        load_schedule(path, expect=STAMP)
    # `b3stream inspect` says so in one line (no traceback) and a folder falls back to the good version.
    assert main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"b3stream inspect: error: {err.value}"
    publish_schedule(_schedule(seed=3), tmp_path, version=0)
    with pytest.warns(UserWarning, match=f"skipping schedule .*v000001.b3s: .*{message}"):
        assert load_schedule(tmp_path).version == 0


def _checksummed(ids, stamp_n: int | None = 6, negatives=None) -> Schedule:
    """A schedule with a valid checksum holding whatever ids it is given (the writer does not check them)."""
    meta = {"strategy": "random", "batch_size": 3}
    if stamp_n is not None:
        meta["data"] = {**STAMP, "n": stamp_n}
    ids = np.asarray(ids)
    negatives = None if negatives is None else [negatives[:3], negatives[3:]]
    return Schedule.from_batches([ids[:3], ids[3:]], meta=meta, negatives=negatives)


@pytest.mark.parametrize("ids, bad, count", [([0, 1, 2, 3, -5, 5], -5, 1), ([0, 1, 2, 3, 10**6, 5], 10**6, 1),
                                             ([-1, 1, 2, 3, 6, 7], -1, 3)])
def test_ids_outside_the_data_are_counted_and_named(tmp_path, ids, bad, count):
    sched = _checksummed(ids)
    with pytest.raises(ScheduleError, match=rf"^schedule holds {count} ids outside 0\.\.5 \(e\.g\. {bad}\)"):
        sched.check_epoch(6)  # was a bincount ValueError (-5) or "999637 missing" (10^6)
    path = publish_schedule(sched, tmp_path)
    with pytest.raises(ScheduleError, match=rf"^{path}: {count} ids outside 0\.\.5 \(e\.g\. {bad}\)"):
        load_schedule(path)
    with pytest.raises(ScheduleError, match="ids outside"):
        load_schedule(path, expect={**STAMP, "n": 6})
    unstamped = publish_schedule(_checksummed(ids, stamp_n=None), tmp_path)
    if bad < 0:  # without a data stamp only the sign is known
        with pytest.raises(ScheduleError, match=rf"{unstamped}: \d+ ids outside 0 or above \(e\.g\. -"):
            load_schedule(unstamped)
    else:
        with pytest.raises(ScheduleError, match=rf"{unstamped}: schedule holds 1 ids outside 0\.\.5"):
            load_schedule(unstamped).check_epoch(6)


def test_hard_negatives_outside_the_data_are_refused_but_minus_one_padding_is_kept(tmp_path):
    negs = np.array([[1, -1], [2, 0], [0, 1], [4, 5], [3, 5], [3, 4]])
    ok = publish_schedule(_checksummed(range(6), negatives=negs), tmp_path)
    assert load_schedule(ok).negatives.tolist() == negs.tolist()
    negs[4, 1] = 6
    bad = publish_schedule(_checksummed(range(6), negatives=negs), tmp_path)
    with pytest.raises(ScheduleError, match=rf"{bad}: 1 hard negatives outside -1\.\.5 \(e\.g\. 6\)"):
        load_schedule(bad)


def test_an_unreadable_sidecar_does_not_stop_a_good_schedule(tmp_path):
    path = publish_schedule(_schedule(), tmp_path)
    for text in ("[1, 2]", "[" * 100_000, '{"timings": [3]}', "\udcff"):
        sidecar(path).write_text(text, errors="surrogateescape")
        assert load_schedule(path).meta["timings"] == {}

"""The schedule file contract: versioned, atomic, checksummed, byte-identical, stamped with its data."""

import json
import multiprocessing as mp
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save

from b3stream import load_schedule
from b3stream.cli import main
from b3stream.schedule import (
    META_KEY, OLD_MAGIC, Schedule, ScheduleError, VersionExistsError, latest_schedule_path, list_versions,
    publish_schedule, sidecar, version_path,
)

STAMP = {"dataset": "toy", "split": "train", "n": 12, "fingerprint": "ab" * 32}


def _schedule(seed=0, h=None):
    ids = np.random.default_rng(seed).permutation(12)
    batches = [ids[:4], ids[4:8], ids[8:]]
    negs = None
    if h:
        negs = [np.stack([np.setdiff1d(np.arange(12), b)[:h]] * len(b)) for b in batches]
    return Schedule.from_batches(batches, meta={"strategy": "random", "K": 2, "batch_size": 4, "seed": seed,
                                                "data": STAMP, "timings": {"total_s": 0.1}}, negative_ids=negs)


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


def test_the_file_is_a_safetensors_file_and_every_array_round_trips(tmp_path):
    s = _schedule(h=2)
    s.batch_task = np.array([0, -1, 1])
    path = publish_schedule(s, tmp_path)
    plain = load_file(path)  # any safetensors reader reads it
    assert sorted(plain) == ["batch_task", "hard_negatives", "ids", "offsets"]
    assert plain["ids"].tolist() == s.ids.tolist() and plain["hard_negatives"].shape == (12, 2)
    back = load_schedule(path)
    for name in ("ids", "offsets", "hard_negatives", "batch_task"):
        assert np.array_equal(getattr(back, name), getattr(s, name)), name
    with safe_open(path, framework="numpy") as f:
        entry = json.loads(f.metadata()[META_KEY])
    assert set(entry) == {"meta", "sha256"} and entry["meta"]["seed"] == 0 and "timings" not in entry["meta"]


def test_empty_arrays_round_trip(tmp_path):
    # no batches at all, and hard negatives with h = 0: zero-byte tensors are valid safetensors
    empty = load_schedule(publish_schedule(Schedule.from_batches([]), tmp_path))
    assert empty.ids.shape == (0,) and empty.offsets.tolist() == [0]
    s = _schedule(h=None)
    s.negative_ids = np.zeros((12, 0), np.int64)
    back = load_schedule(publish_schedule(s, tmp_path))
    assert back.negative_ids.shape == (12, 0) and back.ids.tolist() == s.ids.tolist()


def _publish_elsewhere(folder) -> bytes:
    """The bytes of ``_schedule(seed=1, h=2)`` published by a fresh interpreter (its own hash seeds)."""
    code = ("import sys; from tests.test_schedule import _schedule; from b3stream.schedule import publish_schedule;"
            "print(publish_schedule(_schedule(seed=1, h=2), sys.argv[1], version=0))")
    out = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=Path(__file__).resolve().parents[1],
                         check=True, capture_output=True, text=True).stdout
    return Path(out.strip()).read_bytes()


def test_republishing_is_byte_identical_across_processes(tmp_path):
    here = publish_schedule(_schedule(seed=1, h=2), tmp_path / "here", version=0).read_bytes()
    assert _publish_elsewhere(tmp_path / "a") == here
    assert _publish_elsewhere(tmp_path / "b") == here
    assert publish_schedule(_schedule(seed=2, h=2), tmp_path / "c", version=0).read_bytes() != here


def test_corrupt_schedule_rejected_and_last_good_kept(tmp_path):
    publish_schedule(_schedule(seed=0), tmp_path)
    bad = publish_schedule(_schedule(seed=1), tmp_path)
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ScheduleError, match="checksum mismatch"):
        load_schedule(bad)
    with pytest.warns(UserWarning, match="skipping schedule"):
        assert latest_schedule_path(tmp_path) == version_path(tmp_path, 0)
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ScheduleError, match="not a readable safetensors file"):
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


# -- crafted files: every failure is a ScheduleError naming the file (issue 19 item 5, issue 36 item 3) -------


def _parts_of(schedule: Schedule) -> tuple[dict, dict]:
    """The arrays and the ``b3stream`` metadata entry (meta, sha256) of a real schedule file."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.b3s"
        path.write_bytes(schedule.to_bytes())
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[META_KEY])


def _edit(change, entry_text=None):
    """A crafted file: a real schedule's arrays and metadata entry with ``change(arrays, entry)`` applied,
    written by safetensors itself (so only what is ours is wrong); ``entry_text`` replaces the entry's JSON."""
    def make(path):
        arrays, entry = _parts_of(_schedule(h=2))
        change(arrays, entry)
        text = json.dumps(entry) if entry_text is None else entry_text
        path.write_bytes(save(arrays, metadata=None if text is False else {META_KEY: text}))
        return path
    return make


def _meta(key, value):
    return _edit(lambda arrays, entry: entry["meta"].__setitem__(key, value))


def _file(data: bytes):
    def make(path):
        path.write_bytes(data)
        return path
    return make


def _raw(header: bytes, body: bytes = b"", length: int | None = None):
    """A file in safetensors' framing (u64 little-endian header length, header, body) with any header."""
    return _file(struct.pack("<Q", len(header) if length is None else length) + header + body)


def _tensor_header(**tensors) -> bytes:
    return json.dumps({name: {"dtype": "I64", "shape": [(end - start) // 8], "data_offsets": [start, end]}
                       for name, (start, end) in tensors.items()}).encode()


NOT_SAFETENSORS = "not a readable safetensors file"
CRAFTED = {
    "old format": (_file(OLD_MAGIC + b"\n" + bytes(100)),
                   r"schedule of the old format \(B3SCHED1\).*re-mine it: b3stream mine schedule"),
    "random bytes": (_file(b"\x07garbage, not a schedule at all"), NOT_SAFETENSORS),
    "empty file": (_file(b""), NOT_SAFETENSORS),
    "huge header length": (_raw(b"{}", length=1 << 40), NOT_SAFETENSORS),
    "header longer than the file": (_raw(b"{}", length=4096), NOT_SAFETENSORS),
    "header not JSON": (_raw(b"\xff\xfe{   "), NOT_SAFETENSORS),
    "200000 nested brackets": (_raw(b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"), NOT_SAFETENSORS),
    "a header of null": (_raw(b"null    "), NOT_SAFETENSORS),
    "offsets out of range": (_raw(_tensor_header(ids=(0, 80), offsets=(80, 96)), bytes(16)), NOT_SAFETENSORS),
    "overlapping ranges": (_raw(_tensor_header(ids=(0, 16), offsets=(8, 24)), bytes(24)), NOT_SAFETENSORS),
    "metadata not text": (_raw(b'{"__metadata__": {"b3stream": 5}}'), NOT_SAFETENSORS),
    "float ids": (_edit(lambda a, e: a.__setitem__("ids", a["ids"].astype(np.float64))), "'ids' is 'F64', expected I64"),
    "int32 offsets": (_edit(lambda a, e: a.__setitem__("offsets", a["offsets"].astype(np.int32))), "'I32', expected"),
    "ids of rank 2": (_edit(lambda a, e: a.__setitem__("ids", a["ids"].reshape(3, 4))), "'ids' has shape \\[3, 4\\]"),
    "negatives of rank 1": (_edit(lambda a, e: a.__setitem__("hard_negatives", a["hard_negatives"].ravel())),
                            "'hard_negatives' has shape \\[24\\], expected 2 dimension"),
    "unknown array": (_edit(lambda a, e: a.__setitem__("weights", np.zeros(2, np.int64))), "arrays must be ids, off"),
    "missing ids": (_edit(lambda a, e: a.pop("ids")), "arrays must be ids, offsets"),
    "no b3stream metadata": (_edit(lambda a, e: None, entry_text=False), "without the 'b3stream' metadata"),
    "metadata not JSON": (_edit(lambda a, e: None, entry_text="{meta: 1"), "corrupt metadata \\(Expecting"),
    "metadata nested 200000 deep": (_edit(lambda a, e: None, entry_text="[" * 200_000 + "]" * 200_000),
                                    "nested too deeply"),
    "metadata nested 100 deep": (_edit(lambda a, e: e["meta"].__setitem__("x", json.loads("[" * 100 + "]" * 100))),
                                 "nested deeper than 32"),
    "entry a list": (_edit(lambda a, e: None, entry_text="[1, 2]"), "exactly the keys meta, sha256"),
    "extra key": (_edit(lambda a, e: e.__setitem__("more", 1)), "exactly the keys meta, sha256"),
    "sha256 a number": (_edit(lambda a, e: e.__setitem__("sha256", 5)), "sha256 is not 64 hex digits"),
    "meta a list": (_edit(lambda a, e: e.__setitem__("meta", [1, 2])), "top level: Input should be a valid dict"),
    "version as text": (_meta("version", "7"), "version: Input should be a valid integer"),
    "K a boolean": (_meta("K", True), "K: Input should be a valid integer"),
    "batch size zero": (_meta("batch_size", 0), "batch_size: Input should be greater than or equal to 1"),
    "data a list": (_meta("data", [12]), "data: Input should be a valid dictionary"),
    "data n as text": (_meta("data", {**STAMP, "n": "12"}), "data.n: Input should be a valid integer"),
    "strategy a number": (_meta("strategy", 3), "strategy: Input should be a valid string"),
}


@pytest.mark.parametrize("craft, message", CRAFTED.values(), ids=list(CRAFTED))
def test_a_crafted_file_is_a_schedule_error_naming_the_file(tmp_path, capsys, craft, message):
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


def test_tampered_metadata_fails_the_checksum(tmp_path):
    path = _edit(lambda arrays, entry: entry["meta"].__setitem__("seed", 5))(tmp_path / "v000000.b3s")
    with pytest.raises(ScheduleError, match=rf"^{path}: checksum mismatch"):
        load_schedule(path)


def _checksummed(ids, stamp_n: int | None = 6, negatives=None) -> Schedule:
    """A schedule with a valid checksum holding whatever ids it is given (the writer does not check them)."""
    meta = {"strategy": "random", "batch_size": 3}
    if stamp_n is not None:
        meta["data"] = {**STAMP, "n": stamp_n}
    ids = np.asarray(ids)
    negatives = None if negatives is None else [negatives[:3], negatives[3:]]
    return Schedule.from_batches([ids[:3], ids[3:]], meta=meta, negative_ids=negatives)


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
    assert load_schedule(ok).negative_ids.tolist() == negs.tolist()
    negs[4, 1] = 6
    bad = publish_schedule(_checksummed(range(6), negatives=negs), tmp_path)
    with pytest.raises(ScheduleError, match=rf"{bad}: 1 hard negatives outside -1\.\.5 \(e\.g\. 6\)"):
        load_schedule(bad)


def test_an_unreadable_sidecar_does_not_stop_a_good_schedule(tmp_path):
    path = publish_schedule(_schedule(), tmp_path)
    for text in ("[1, 2]", "[" * 100_000, '{"timings": [3]}', "\udcff"):
        sidecar(path).write_text(text, errors="surrogateescape")
        assert load_schedule(path).meta["timings"] == {}

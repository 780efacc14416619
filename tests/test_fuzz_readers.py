"""Fuzzing every reader of a file b3stream reads back (hypothesis): any bytes give a value or the reader's
own error class (or its documented "none"), never another exception.

Inputs are drawn three ways: arbitrary bytes; arbitrary JSON (or YAML) documents; and the *real* file as
b3stream writes it with one field replaced by an arbitrary value, which is what reaches the typed checks
behind the parser. The fast set runs a few dozen examples per reader; the slow variant runs many more.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save

from b3stream.config import ConfigError, MineConfig, RefreshConfig, TrainConfig, load_config
from b3stream.data.manifest import DataError, Manifest
from b3stream.data.reader import decode_sample
from b3stream.files import HOST, read_json
from b3stream.mining import artefacts
from b3stream.records import (Lease, MinerStatus, RecordError, RunMarker, Sidecar, SnapshotMeta, StageRecord,
                              read_record)
from b3stream.refresh.drift import Probe
from b3stream.refresh.miner import read_settings
from b3stream.schedule import META_KEY, Schedule, ScheduleError, load_schedule
from b3stream.run_paths import RunPaths
from b3stream.refresh.snapshot import SnapshotError, list_snapshots, pinned_steps, read_snapshot
from b3stream.train import run_folder

FAST, SLOW = 40, 250

scalars = st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def dumps(value) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity as JSON spells them in Python (readers must refuse)


def mutated(valid: dict):
    """``valid`` with one key (maybe nested one level) set to an arbitrary value, or dropped."""
    keys = sorted(valid)

    @st.composite
    def draw(draw_):
        d = json.loads(json.dumps(valid))
        key = draw_(st.sampled_from(keys))
        if isinstance(d[key], dict) and d[key] and draw_(st.booleans()):
            inner = draw_(st.sampled_from(sorted(d[key])))
            d[key][inner] = draw_(json_values)
        elif draw_(st.booleans()):
            d[key] = draw_(json_values)
        else:
            del d[key]
        return dumps(d)

    return draw()


def payloads(valid: dict | None = None):
    options = [st.binary(max_size=300), json_values.map(dumps)]
    if valid is not None:
        options += [mutated(valid)] * 2
    return st.one_of(*options)


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


STAMP = {"dataset": "toy", "split": "train", "n": 10, "fingerprint": "ab" * 8}
VALID = {
    "lease": {"step": 4, "pid": 123, "host": HOST, "time": 1.5},
    "status": {"state": "embed", "pid": 5, "refreshes": 1},
    "marker": {"format": 1, "run_id": "0" * 32, "created": 1.0, "pid": 7, "host": HOST},
    "snapshot": {"step": 3, "epoch": 0, "kind": "lora", "data": STAMP, "created": 1.0,
                 "encoder": {"model": None, "max_query_length": 16}, "weights_sha256": "f" * 64},
    "stage": {"stamp": STAMP, "params": {"p": 1}, "token": "t", "complete": True, "n": 10, "seconds": 0.5,
              "top": {"p": 2, "file": "top.npy"}},
    "sidecar": {"meta": {"source_step": 3}, "timings": {"rank": 0.1}},
    "refresh": dataclasses.asdict(RefreshConfig(every_steps=3)),
    "manifest": {"name": "toy", "N": 2, "fingerprint": "f", "schema_version": 1, "tasks": {"a": 2},
                 "splits": {"train": {"n": 2, "fingerprint": "g", "tasks": {"a": 2}, "groups": 1,
                                      "shards": [{"url": "train-000000.tar", "nsamples": 2, "first_id": 0,
                                                  "bytes": 10, "sha256": "0" * 64}]}}},
    "probe": {"version": 0, "ids": [0, 1, 2, 3], "offsets": [0, 2, 4], "reference": 1.5},
}


# One root per worker, removed when the worker exits: thousands of examples must not leave thousands of folders.
_ROOT = tempfile.TemporaryDirectory(prefix="fuzz-")


def in_folder(write):
    """Run ``write(folder)`` then return the folder (a fresh one per example, under the worker's root)."""
    folder = Path(tempfile.mkdtemp(dir=_ROOT.name))
    write(folder)
    return folder


# Each reader: (valid example, function of the bytes that must return normally or raise the allowed errors).
def typed(schema):
    def check(data: bytes):
        folder = in_folder(lambda f: (f / "x.json").write_bytes(data))
        try:
            value = read_record(folder / "x.json", schema)
        except RecordError as e:
            assert "x.json" in str(e)
            return
        assert isinstance(value, schema)
        for field in value.model_dump().values():  # no NaN or infinity got through
            assert not (isinstance(field, float) and not math.isfinite(field))
    return check


def check_read_json(data: bytes):
    folder = in_folder(lambda f: (f / "x.json").write_bytes(data))
    assert read_json(folder / "x.json") is None or isinstance(read_json(folder / "x.json"), dict)


def check_lease(data: bytes):
    folder = in_folder(lambda f: (f / "refresh").mkdir() or (f / "refresh" / "lease.json").write_bytes(data))
    assert pinned_steps(folder) <= {4}


def check_marker(data: bytes):
    folder = in_folder(lambda f: (f / run_folder.MARKER).write_bytes(data))
    found = run_folder.marker(folder)
    try:
        how = run_folder.plan(folder, resume=True, overwrite=True)
    except ConfigError:
        assert found is None  # a folder with a crafted marker is no run: refused, not emptied
        return
    assert how == "replace" and found is not None


def check_snapshot(data: bytes):
    def write(f):
        (f / "snapshots" / "step-0000003").mkdir(parents=True)
        (f / "snapshots" / "step-0000003" / "snapshot.json").write_bytes(data)

    folder = in_folder(write)
    listed = list_snapshots(folder)
    try:
        snap = read_snapshot(folder / "snapshots" / "step-0000003")
    except SnapshotError:
        assert listed == []
        return
    assert [s.step for s in listed] == [3] and snap.step == 3
    try:
        cfg = snap.encoder_config
    except SnapshotError:
        return
    assert cfg.trust_remote_code is False  # never taken from the file


def check_stage_record(data: bytes):
    folder = in_folder(lambda f: (f / "rank.json").write_bytes(data))
    assert artefacts.read_record(folder / "rank.json") is None or isinstance(artefacts.read_record(folder / "rank.json"), dict)


def check_refresh_settings(data: bytes):
    def write(f):
        (f / "refresh").mkdir()
        (f / "refresh" / "refresh.json").write_bytes(data)

    folder = in_folder(write)
    try:
        settings_ = read_settings(RunPaths(folder))
    except ConfigError as e:
        assert "refresh.json" in str(e)
        return
    assert isinstance(settings_, RefreshConfig) and 0 <= settings_.nice <= 19 and settings_.poll_seconds > 0


def check_yaml_config(cls):
    def check(data: bytes):
        folder = in_folder(lambda f: (f / "c.yaml").write_bytes(data))
        try:
            assert isinstance(load_config(cls, folder / "c.yaml"), cls)
        except ConfigError:
            pass
    return check


def check_manifest(data: bytes):
    try:
        m = Manifest.from_json(data, where="manifest.json")
    except DataError as e:
        assert "manifest.json" in str(e)
        return
    assert isinstance(m, Manifest) and all(isinstance(s.n, int) for s in m.splits.values())


class _Sched:
    version, ids = 0, np.arange(10)


def check_probe(data: bytes):
    folder = in_folder(lambda f: (f / "probe.json").write_bytes(data))
    probe = Probe.load(folder / "probe.json", _Sched)
    assert probe is None or (np.isfinite(probe.reference) and probe.offsets[-1] == len(probe.ids))


READERS = {
    "read_json": (None, check_read_json),
    "lease": (VALID["lease"], check_lease),
    "lease record": (VALID["lease"], typed(Lease)),
    "status": (VALID["status"], typed(MinerStatus)),
    "run marker": (VALID["marker"], check_marker),
    "run marker record": (VALID["marker"], typed(RunMarker)),
    "snapshot.json": (VALID["snapshot"], check_snapshot),
    "snapshot record": (VALID["snapshot"], typed(SnapshotMeta)),
    "stage record": (VALID["stage"], check_stage_record),
    "stage record typed": (VALID["stage"], typed(StageRecord)),
    "schedule sidecar": (VALID["sidecar"], typed(Sidecar)),
    "refresh.json": (VALID["refresh"], check_refresh_settings),
    "manifest": (VALID["manifest"], check_manifest),
    "probe.json": (VALID["probe"], check_probe),
    "mine.yaml": (None, check_yaml_config(MineConfig)),
    "config.yaml": (None, check_yaml_config(TrainConfig)),
}


def _run(name: str, data: bytes) -> None:
    READERS[name][1](data)


@pytest.mark.parametrize("name", sorted(READERS))
@fuzz(FAST)
@given(data=st.data())
def test_a_reader_takes_any_bytes(name, data):
    _run(name, data.draw(payloads(READERS[name][0])))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(READERS))
@fuzz(SLOW)
@given(data=st.data())
def test_a_reader_takes_any_bytes_longer(name, data):
    _run(name, data.draw(payloads(READERS[name][0])))


def test_the_valid_examples_are_valid():
    """The seeds of the mutations are what b3stream writes: each reads back as a value (so the mutations
    start from the accepted side of every check)."""
    for name in ("lease record", "status", "run marker record", "snapshot record", "stage record typed",
                 "schedule sidecar"):
        valid, _ = READERS[name]
        folder = in_folder(lambda f: (f / "x.json").write_bytes(dumps(valid)))
        schema = {"lease record": Lease, "status": MinerStatus, "run marker record": RunMarker,
                  "snapshot record": SnapshotMeta, "stage record typed": StageRecord, "schedule sidecar": Sidecar}[name]
        assert read_record(folder / "x.json", schema) is not None
    assert isinstance(Manifest.from_json(dumps(VALID["manifest"])), Manifest)
    assert Probe.load(in_folder(lambda f: (f / "p.json").write_bytes(dumps(VALID["probe"]))) / "p.json", _Sched)


# -- schedules and shard members ---------------------------------------------------------------------------


def _valid_arrays(h: int = 2) -> dict[str, np.ndarray]:
    batches = [np.arange(0, 4), np.arange(4, 8), np.arange(8, 10)]
    negs = [np.full((len(b), h), 9 - b[0], np.int64) for b in batches] if h else None
    return Schedule.from_batches(batches, {}, negs, batch_task=np.zeros(3, np.int64))._arrays()


def _valid_schedule(meta: dict | None = None, h: int = 2, arrays: dict | None = None) -> bytes:
    arrays = arrays if arrays is not None else _valid_arrays(h)
    meta = meta if meta is not None else {"strategy": "b3pp", "K": 2, "batch_size": 4, "h": h, "data": STAMP,
                                          "version": 0}
    return Schedule(ids=arrays["ids"], offsets=arrays["offsets"], meta=meta, negative_ids=arrays.get("hard_negatives"),
                    batch_task=arrays.get("batch_task")).to_bytes()


def _metadata_of(data: bytes) -> dict:
    """The safetensors metadata map of a schedule file's bytes."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "v.b3s").write_bytes(data)
        with safe_open(Path(folder) / "v.b3s", framework="numpy") as f:
            return f.metadata()


# A crafted safetensors tensor table: any names, dtypes, shapes and byte ranges (overlapping, out of range).
tensor_tables = st.dictionaries(
    st.sampled_from(["ids", "offsets", "hard_negatives", "batch_task", "weights", "__metadata__"]),
    st.fixed_dictionaries({"dtype": st.sampled_from(["I64", "I32", "F64", "U8", "BOOL", "X"]) | json_values,
                           "shape": st.lists(st.integers(-1, 12), max_size=3) | json_values,
                           "data_offsets": st.lists(st.integers(-8, 200) | st.just(2**64 + 8), min_size=2,
                                                    max_size=2) | json_values}),
    max_size=4)


@st.composite
def schedule_bytes(draw):
    valid = _valid_schedule()
    how = draw(st.sampled_from(["flip", "cut", "splice", "table", "entry", "arrays", "ids", "meta", "raw", "old"]))
    if how == "raw":
        return draw(st.binary(max_size=400))
    if how == "old":  # the container before safetensors
        return b"B3SCHED1\n" + draw(st.binary(max_size=64))
    if how == "cut":
        return valid[: draw(st.integers(0, len(valid)))]
    if how == "flip":
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return bytes(data)
    if how in ("splice", "table"):  # a crafted header: a length (maybe huge), any JSON or a tensor table
        header = dumps(draw(json_values if how == "splice" else tensor_tables))
        length = draw(st.sampled_from([len(header), 0, 2**64 - 1, 2**40, len(header) + 7]))
        return length.to_bytes(8, "little") + header + draw(st.binary(max_size=200))
    if how == "entry":  # safetensors' own writer, our metadata entry any JSON or text (or missing)
        text = draw(json_values.map(json.dumps) | st.text(max_size=40) | st.none())
        return save(_valid_arrays(), metadata=None if text is None else {META_KEY: text})
    if how == "arrays":  # a valid entry over arrays of other names, dtypes or ranks
        arrays = _valid_arrays()
        name = draw(st.sampled_from(["ids", "offsets", "hard_negatives", "batch_task", "weights"]))
        dtype = draw(st.sampled_from([np.int64, np.int32, np.float64, np.uint8]))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        arrays[name] = np.zeros(shape, dtype)
        return save(arrays, metadata=_metadata_of(valid))
    if how == "ids":  # ids and hard negatives anywhere, checksum recomputed: what reaches the range checks
        arrays = _valid_arrays()
        for name in ("ids", "hard_negatives"):
            flat = arrays[name].reshape(-1).copy()
            flat[draw(st.integers(0, len(flat) - 1))] = draw(st.integers(-2**63, 2**63 - 1))
            arrays[name] = flat.reshape(arrays[name].shape)
        return _valid_schedule(arrays=arrays)
    meta = json.loads(dumps({"strategy": "b3pp", "K": 2, "batch_size": 4, "h": 2, "data": STAMP, "version": 0}))
    key = draw(st.sampled_from(sorted(meta)))
    meta[key] = draw(json_values)
    try:  # a crafted metadata with its checksum recomputed: what reaches the checks behind the checksum
        return _valid_schedule(meta)
    except (ScheduleError, TypeError, ValueError):
        return valid


def _check_schedule(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "crafted.b3s"
        path.write_bytes(data)
        try:
            sched = load_schedule(path)
        except ScheduleError as e:
            assert str(e).startswith(f"{path}: ")
            return
    assert sched.offsets[0] == 0 and sched.offsets[-1] == len(sched.ids)
    n = (sched.meta.get("data") or {}).get("n")
    assert (sched.ids >= 0).all() and (n is None or (sched.ids < n).all())
    sched.batch_size, sched.version  # the fields the trainer computes with are usable


@fuzz(FAST * 3)
@given(data=schedule_bytes())
def test_schedule_headers_take_any_bytes(data):
    _check_schedule(data)


@pytest.mark.slow
@fuzz(SLOW * 3)
@given(data=schedule_bytes())
def test_schedule_headers_take_any_bytes_longer(data):
    _check_schedule(data)


members = st.dictionaries(st.sampled_from(["json", "txt", "query_image.png", "positive_image.jpg", "x y"]),
                          st.binary(max_size=80) | json_values.map(dumps), max_size=3)


def _check_sample(key: str, parts: dict) -> None:
    try:
        rec = decode_sample({"__key__": key, **parts}, "shard-000000.tar")
    except DataError as e:
        assert "shard-000000.tar" in str(e)
        return
    assert isinstance(rec, dict)


@fuzz(FAST * 2)
@given(key=st.text(max_size=12), parts=members)
def test_shard_members_take_any_bytes(key, parts):
    _check_sample(key, parts)


@pytest.mark.slow
@fuzz(SLOW * 2)
@given(key=st.text(max_size=12), parts=members)
def test_shard_members_take_any_bytes_longer(key, parts):
    _check_sample(key, parts)

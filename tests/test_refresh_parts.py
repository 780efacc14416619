"""Refreshed mode's pieces without a training run: snapshots, the schedule watcher, the embed stage keyed on
the weights and re-embedding only the ids to come, the bound probe, the lag rule and the trainer's share of
the cores (the end-to-end runs: tests/test_refresh.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from b3stream.config import EncoderConfig, LoraConfig, MineConfig, TrainConfig
from b3stream.data.manifest import Manifest
from b3stream.dist import DistInfo
from b3stream.schedule import list_versions, load_schedule, publish_schedule, version_path
from b3stream.run_paths import RunPaths
from b3stream.refresh.miner import snapshot_model
from b3stream.refresh.snapshot import latest_snapshot, list_snapshots, load_snapshot_encoder, write_snapshot

from ._train_util import REFRESH_STUDENT as STUDENT, perturbed_student, random_schedule


def test_trained_ids_from_another_dataset_are_refused(tmp_path):
    from b3stream.data.manifest import DataError
    from b3stream.mining.pipeline import load_trained_ids
    from b3stream.mining.rank import split_trained

    path = tmp_path / "trained.npy"
    np.save(path, np.array([3, 99]))
    with pytest.raises(DataError, match="outside 0..9"):
        load_trained_ids(str(path), 10)
    np.save(path, np.array([1.5]))
    with pytest.raises(DataError, match="integer"):
        load_trained_ids(str(path), 10)
    np.save(path, np.array([1, 4]))
    groups = split_trained([("all", np.arange(6))], load_trained_ids(str(path), 10))
    assert [(label, ids.tolist()) for label, _, ids in groups] == [("all", [0, 2, 3, 5]), ("all (trained)", [1, 4])]


def test_watcher_takes_only_strictly_newer_good_versions(tmp_path, code_dataset):
    from b3stream.refresh.hotswap import ScheduleWatcher

    from ._train_util import random_schedule

    folder = tmp_path / "schedules"
    manifest = Manifest.load(code_dataset)
    for v in (0, 1):
        random_schedule(code_dataset, batch_size=16, K=4, seed=v, folder=folder, version=v)
    said = []
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    watcher = ScheduleWatcher(folder, manifest, dist, say=said.append, background=False)  # the decisions, inline
    assert watcher.check(1) is None  # nothing newer than v1
    assert watcher.check(0).version == 1
    # A newer version whose file is corrupt (same size, one byte flipped) and a half-written temp file.
    good = random_schedule(code_dataset, batch_size=16, K=4, seed=2, folder=folder, version=2)
    data = bytearray(good.read_bytes())
    data[-5] ^= 0xFF
    good.write_bytes(bytes(data))
    (folder / ".v000003.b3s.tmp-123").write_bytes(bytes(data[: len(data) // 2]))
    assert watcher.check(1) is None  # neither the corrupt v2, nor back to v0
    assert said and "v2 not used" in said[0] and "checksum" in said[0]
    assert watcher.check(1) is None and len(said) == 1  # not re-read every step
    random_schedule(code_dataset, batch_size=16, K=4, seed=3, folder=folder, version=3)
    assert watcher.check(1).version == 3
    # A newer schedule for other data is refused too.
    other = load_schedule(version_path(folder, 3))
    other.meta["data"] = {**other.meta["data"], "fingerprint": "0" * 64}
    publish_schedule(other, folder, 4)
    assert watcher.check(3) is None and "v4 not used" in said[-1]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_snapshot_round_trip(tmp_path, lora):
    """A snapshot loads back into an encoder that embeds exactly like the student that wrote it; old
    snapshots are pruned; a half-written one is invisible."""
    cfg, student = perturbed_student(lora, seed=0)
    texts = ["open a file and read its lines", "def read(path):\n    return open(path).read()"]
    (tmp_path / "snapshots").mkdir()
    (tmp_path / "snapshots" / ".step-0000009.tmp-1").mkdir()  # a writer that died
    for step in (3, 6, 9):
        write_snapshot(tmp_path, step, student.model, cfg, {"dataset": "toy", "split": "train", "n": 1, "fingerprint": "0" * 16}, keep=2)
    assert [s.step for s in list_snapshots(tmp_path)] == [6, 9]
    snap = latest_snapshot(tmp_path)
    assert snap.meta["kind"] == ("lora" if lora else "full")
    if lora:
        assert sum(f.stat().st_size for f in (snap.path / "adapter").iterdir()) < 2_000_000
    np.testing.assert_allclose(load_snapshot_encoder(snap).encode(texts, "positive"),
                               student.encode(texts, "positive"), atol=1e-5)


@pytest.mark.slow
def test_embed_stage_keys_on_the_weights_not_the_path(tmp_path, toy_dataset):
    """A teacher folder overwritten in place is a new teacher: its embeddings are recomputed."""
    import shutil

    from safetensors.torch import load_file, save_file

    from b3stream.encoder import default_model_path
    from b3stream.mining.embed import load_embeddings
    from b3stream.mining.pipeline import embed_stage

    model = tmp_path / "teacher"
    shutil.copytree(default_model_path(), model)
    cfg = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"),
                     teacher=EncoderConfig(model=str(model), max_query_length=16, max_positive_length=16,
                                           lora=LoraConfig(enabled=False)))
    embed_stage(cfg, progress=False)
    first = load_embeddings(tmp_path / "mine")
    token, before = first.record["token"], np.asarray(first.positives[:8], dtype=np.float32)
    embed_stage(cfg, progress=False)
    assert load_embeddings(tmp_path / "mine").record["token"] == token  # unchanged weights: reused
    weights = load_file(str(model / "model.safetensors"))
    for name in weights:
        if name.endswith("encoder.layer.5.output.dense.weight"):
            weights[name] = weights[name] * 1.5
    save_file(weights, str(model / "model.safetensors"))
    embed_stage(cfg, progress=False)
    second = load_embeddings(tmp_path / "mine")
    assert second.record["token"] != token
    assert np.abs(np.asarray(second.positives[:8], dtype=np.float32) - before).max() > 1e-3


def test_refresh_due_bounds_the_lag():
    from b3stream.refresh.hotswap import refresh_due

    assert refresh_due([10, 20], 25, None) is None  # unbounded: never wait
    assert refresh_due([10, 20], 20, 0) == 20 and refresh_due([10, 20], 19, 0) == 10
    assert refresh_due([10, 20], 14, 5) is None and refresh_due([10, 20], 15, 5) == 10


@pytest.mark.slow
def test_a_snapshot_missing_adapter_weights_is_refused(tmp_path):
    """An adapter file without some of the student's adapter weights (its digest updated to match) would
    leave them at LoRA's initialisation and embed with the base model: refused."""
    from safetensors.torch import load_file, save_file

    from b3stream.encoder import weights_digest
    from b3stream.refresh.snapshot import SnapshotError

    cfg, student = perturbed_student(lora=True, seed=0)
    path = write_snapshot(tmp_path, 3, student.model, cfg, {"dataset": "toy", "split": "train", "n": 1, "fingerprint": "0" * 16})
    adapter = path / "adapter" / "adapter_model.safetensors"
    weights = load_file(str(adapter))
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, str(adapter))
    meta = json.loads((path / "snapshot.json").read_text())
    meta["weights_sha256"] = weights_digest(path)[0]
    (path / "snapshot.json").write_text(json.dumps(meta))
    with pytest.raises(SnapshotError, match="lacks 1 of the student's adapter weights"):
        load_snapshot_encoder(latest_snapshot(tmp_path))


@pytest.mark.slow
def test_refresh_when_bound_mines_only_a_snapshot_that_drifted(tmp_path, toy_dataset):
    """refresh.when: bound. The probe of the schedule in use (v0, its reference bound under the teacher that
    mined it) is embedded with each snapshot: below the drift threshold the snapshot is skipped (no version,
    the drift in the status), at or above it the miner re-mines, and the new version gets its own probe."""
    from b3stream.config import dump_config
    from b3stream.mining.pipeline import run_all
    from b3stream.refresh.miner import Miner

    run_dir = tmp_path / "run"
    paths = RunPaths(run_dir)
    teacher = EncoderConfig(max_query_length=32, max_positive_length=48, lora=LoraConfig(enabled=False))
    mine = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"), strategy="random", batch_size=8,
                      teacher=teacher, quality_sample=0, schedule_dir=str(paths.schedules))
    run_all(mine, progress=False)
    paths.refresh.mkdir(parents=True)
    dump_config(MineConfig(data=str(toy_dataset), strategy="random", batch_size=8, teacher=teacher, quality_sample=0),
                paths.mine_config)
    cfg, student = perturbed_student(lora=True, seed=0)
    dump_config(TrainConfig(data=str(toy_dataset), student=cfg), paths.run_config)  # as the trainer writes it
    write_snapshot(run_dir, 5, student.model, cfg, Manifest.load(toy_dataset).stamp("train"))

    def serve(threshold: float) -> dict:
        paths.refresh_config.write_text(json.dumps({"when": "bound", "bound_drift": threshold, "probe_batches": 6,
                                                    "poll_seconds": 0.1}))
        assert Miner(run_dir, progress=False).serve(once=True) == 0
        return json.loads(paths.status.read_text())

    status = serve(1e6)  # measures the drift (no decision to check yet: the threshold is out of reach)
    probe = status["probe"]
    assert probe["snapshot_step"] == 5 and probe["version"] == 0 and probe["refresh"] is False
    assert probe["drift"] == pytest.approx(probe["bound"] - probe["reference"], abs=1e-4) and probe["drift"] != 0
    assert list_versions(paths.schedules) == [0] and status["refreshes"] == 0
    saved = json.loads((paths.refresh / "probe.json").read_text())
    assert saved["version"] == 0 and len(saved["offsets"]) == 7 and saved["reference"] == pytest.approx(probe["reference"])
    # thresholds just either side of the measured drift (the same snapshot, probe and reference embed the
    # same to ~1e-6 on a rerun): the decision flips between them
    drift, margin = probe["drift"], 2e-3

    # A crafted probe.json (ids of no batch of v0) is not used: the miner makes the probe anew. Threshold just
    # above the drift: skipped.
    (paths.refresh / "probe.json").write_text(json.dumps({**saved, "ids": [10**9] * len(saved["ids"])}))
    status = serve(drift + margin)
    assert status["probe"]["reference"] == pytest.approx(probe["reference"], abs=1e-4)
    assert status["probe"]["drift"] == pytest.approx(drift, abs=1e-4)
    assert status["probe"]["refresh"] is False and list_versions(paths.schedules) == [0]
    assert json.loads((paths.refresh / "probe.json").read_text())["ids"] == saved["ids"]

    status = serve(drift - margin)  # just below: the same snapshot is now re-mined
    assert status["probe"]["drift"] == pytest.approx(drift, abs=1e-4)
    assert status["probe"]["refresh"] is True and list_versions(paths.schedules) == [0, 1]
    assert json.loads((paths.refresh / "probe.json").read_text())["version"] == 1


@pytest.mark.slow
def test_a_mid_epoch_refresh_embeds_only_the_ids_to_come(tmp_path, toy_dataset, monkeypatch):
    """The rows of ids already trained this epoch are kept from the miner's previous embedding (the trainer
    skips those ids until the epoch ends); only the ids to come are embedded with the snapshot, and the
    next epoch's first refresh (nothing trained yet) embeds every row again."""
    from dataclasses import replace

    from b3stream.encoder import Encoder
    from b3stream.mining.embed import load_embeddings
    from b3stream.mining.pipeline import embed_stage

    lengths = {k: STUDENT[k] for k in ("max_query_length", "max_positive_length")}
    first = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"), teacher=EncoderConfig(**lengths))
    embed_stage(first, progress=False)
    teacher = load_embeddings(tmp_path / "mine")
    teacher_q, teacher_p = np.array(teacher.queries), np.array(teacher.positives)

    cfg, student = perturbed_student(lora=True, seed=0)
    n = teacher.n
    trained = np.arange(0, n, 3)
    stamp = Manifest.load(toy_dataset).stamp("train")
    write_snapshot(tmp_path / "run", 5, student.model, cfg, stamp, trained=trained)
    snap = latest_snapshot(tmp_path / "run")
    encoded = []
    real_encode = Encoder.encode
    monkeypatch.setattr(Encoder, "encode", lambda self, texts, *a, **k: encoded.append(len(texts))
                        or real_encode(self, texts, *a, **k))
    refresh = replace(first, student_snapshot=str(snap.path), trained_ids=str(snap.trained_ids))
    embed_stage(refresh, progress=False, student=snapshot_model(refresh))
    assert sum(encoded) == 2 * (n - len(trained))  # queries and positives of the ids to come, nothing else

    mixed = load_embeddings(tmp_path / "mine")
    assert mixed.record["kept"]["rows"] == len(trained)
    np.testing.assert_array_equal(np.array(mixed.queries)[trained], teacher_q[trained])
    np.testing.assert_array_equal(np.array(mixed.positives)[trained], teacher_p[trained])
    # the ids to come carry the snapshot's embeddings, exactly as a full pass writes them
    full = replace(first, out=str(tmp_path / "full"), student_snapshot=str(snap.path))
    embed_stage(full, progress=False, student=snapshot_model(full))
    whole = load_embeddings(tmp_path / "full")
    to_come = np.setdiff1d(np.arange(n), trained)
    np.testing.assert_array_equal(np.array(mixed.queries)[to_come], np.array(whole.queries)[to_come])
    np.testing.assert_array_equal(np.array(mixed.positives)[to_come], np.array(whole.positives)[to_come])
    assert not np.allclose(np.array(whole.queries, np.float32)[trained], teacher_q[trained], atol=1e-3)

    encoded.clear()  # the next epoch's first refresh: nothing trained, every row from the new snapshot
    _, moved = perturbed_student(lora=True, seed=1)
    write_snapshot(tmp_path / "run", 9, moved.model, cfg, stamp, epoch=1)
    later = latest_snapshot(tmp_path / "run")
    nxt = replace(first, student_snapshot=str(later.path))
    embed_stage(nxt, progress=False, student=snapshot_model(nxt))
    assert sum(encoded) == 2 * n and "kept" not in load_embeddings(tmp_path / "mine").record


def test_the_trainer_steps_aside_while_a_cpu_miner_works(tmp_path, monkeypatch):
    """A spawned CPU miner beside a CPU trainer: while the miner's status says it works the trainer uses the
    cores the miner leaves; while it waits, all of its threads again (round 8: ten times slower steps when the
    two together oversubscribed the cores)."""
    from b3stream.config import TrainConfig, from_dict
    from b3stream.files import write_json
    from b3stream.refresh.trainer import ThreadShare

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    torch.set_num_threads(8)
    try:
        cfg = from_dict(TrainConfig, {"mode": "refreshed", "refresh": {"every_steps": 5, "threads": 3}})
        paths = RunPaths(tmp_path)
        cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
        share = ThreadShare.for_run(cfg, cpu, paths)
        assert (share.full, share.shared) == (8, 5)
        paths.refresh.mkdir(parents=True)
        for state, threads in (("embed", 5), ("rank", 5), ("waiting", 8), ("probe", 5), ("stopped", 8)):
            write_json(paths.status, {"state": state})
            assert share.update() == threads == torch.get_num_threads()
        assert ThreadShare.for_run(from_dict(TrainConfig, {"mode": "refreshed", "refresh": {
            "every_steps": 5, "threads": 3, "device": "cuda:1"}}), cpu, paths) is None  # the miner has a GPU
        assert ThreadShare.for_run(from_dict(TrainConfig, {}), cpu, paths) is None  # static mode
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_a_pinned_snapshot_survives_a_resume_that_re_reaches_its_step(tmp_path):
    """A resumed run re-reaching a step it snapshotted replaced that folder whatever its pin; a miner reading
    it lost it mid-refresh. Now the pinned folder stays (the new copy is dropped), and an unpinned one is
    replaced. A pin on a snapshot already pruned is refused (pin_snapshot says so) instead of pinning air."""
    from b3stream.refresh.snapshot import pin_snapshot, pinned_steps

    cfg, student = perturbed_student(lora=True, seed=0)
    stamp = {"dataset": "toy", "split": "train", "n": 1, "fingerprint": "0" * 16}
    first = write_snapshot(tmp_path, 5, student.model, cfg, stamp, keep=3)
    marker = first / "miner-reads-this"
    marker.write_text("x")
    assert pin_snapshot(tmp_path, 5) and pinned_steps(tmp_path) == {5}
    write_snapshot(tmp_path, 5, student.model, cfg, stamp, keep=3)  # the resumed run, same step
    assert marker.exists()
    pin_snapshot(tmp_path, None)
    write_snapshot(tmp_path, 5, student.model, cfg, stamp, keep=3)
    assert not marker.exists() and latest_snapshot(tmp_path).step == 5
    assert not pin_snapshot(tmp_path, 7) and pinned_steps(tmp_path) == set()


def test_when_bound_with_the_teacher_is_refused():
    """refresh.when: bound with refresh.model: teacher compared a student probe with a teacher reference (the
    gap between them, not staleness): refused when the config loads."""
    from b3stream.config import ConfigError, RefreshConfig, validate

    with pytest.raises(ConfigError, match="when: bound measures how far the student drifted"):
        validate(RefreshConfig(every_steps=5, when="bound", model="teacher"))
    validate(RefreshConfig(every_steps=5, when="bound", model="student"))


def test_a_wait_for_a_snapshot_the_miner_skipped_ends_at_once(tmp_path, code_dataset):
    """refresh.when: bound with max_lag_steps: a snapshot the miner decided not to re-mine never gets a
    schedule, and the trainer waited wait_timeout (1800 s) for it at every such step. The miner's decision
    in its status ends the wait; a status that does not decide that snapshot (or a crafted one) does not."""
    import time

    from b3stream.refresh.hotswap import ScheduleWatcher, wait_for_refresh
    from b3stream.refresh.trainer import miner_skipped

    paths = RunPaths(tmp_path / "run")
    paths.refresh.mkdir(parents=True)
    random_schedule(code_dataset, batch_size=16, K=4, folder=paths.schedules, version=0)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    watcher = ScheduleWatcher(paths.schedules, Manifest.load(code_dataset), dist, say=lambda *_: None)
    said = []

    def wait(timeout: float) -> float:
        t0 = time.monotonic()
        found, _ = wait_for_refresh(watcher, 0, None, 10, 0.05, timeout, say=said.append,
                                    skipped=lambda s: miner_skipped(paths, s))
        assert found is None
        return time.monotonic() - t0

    for status in ({"state": "probe", "probes": [{"snapshot_step": 10, "refresh": True}]},
                   {"state": "waiting", "probes": [{"snapshot_step": 5, "refresh": False}]},
                   {"state": "waiting", "probes": "x"}):
        paths.status.write_text(json.dumps(status))
        assert wait(0.5) >= 0.5 and "wait_timeout" in said[-1]
    paths.status.write_text(json.dumps({"state": "waiting", "probes": [
        {"snapshot_step": 5, "refresh": False}, {"snapshot_step": 10, "refresh": False, "drift": 0.01}]}))
    assert wait(600) < 5 and "found no drift" in said[-1]


def test_mining_imports_no_refresh_and_embeds_a_snapshot_only_as_handed_in(tmp_path, toy_dataset):
    """Dependencies one way: loading the mining stages loads nothing of refreshed mode (the miner reads a
    student snapshot and hands it to the embed stage, refresh.miner.snapshot_model), and a config naming a
    snapshot the stage was not handed is refused before anything is written."""
    import subprocess
    import sys

    from b3stream.config import ConfigError
    from b3stream.mining.pipeline import embed_stage

    code = "import sys, b3stream.mining.pipeline; print([m for m in sys.modules if m.startswith('b3stream.refresh')])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    cfg = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"), student_snapshot=str(tmp_path / "step-0000001"))
    with pytest.raises(ConfigError, match="student_snapshot"):
        embed_stage(cfg, progress=False)
    assert not (tmp_path / "mine").exists()

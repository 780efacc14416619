"""Refreshed mode off the step loop, counted on the CPU: a snapshot step costs the copy of the snapshot's
weights to host memory (under ZeRO-3 a gather of the adapter's weights only, for a LoRA student) and returns
before the files are written and hashed on rank 0's writer thread; the snapshot so written is byte for byte
the one a synchronous write gives; a failed write surfaces at the next snapshot or at the end; a new schedule
version is listed, parsed and checksummed on the loader's thread, and the step only asks whether it is
ready."""

from __future__ import annotations

import hashlib
import threading
import time
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from b3stream.config import TrainConfig, from_dict
from b3stream.data.manifest import Manifest
from b3stream.dist import DistInfo
from b3stream.run_paths import RunPaths
from b3stream.refresh.snapshot import latest_snapshot, list_snapshots, snapshot_parameters, write_snapshot

from ._train_util import perturbed_student, random_schedule

CPU1 = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _cfg(every: int = 2) -> TrainConfig:
    return from_dict(TrainConfig, {"data": "d", "schedule": "s", "mode": "refreshed",
                                   "refresh": {"every_steps": every, "keep": 5}})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("snapshot.json", "README.md")}


@contextmanager
def _gate(monkeypatch):
    """Hold every snapshot write at its start until the block's gate is opened; records the writing
    threads and those that hashed the weight files."""
    import b3stream.encoder as encoder_module
    import b3stream.refresh.snapshot as snapshot_module

    gate, threads = threading.Event(), {"write": [], "hash": []}
    real_write, real_digest = snapshot_module._write_weights, encoder_module.weights_digest

    def held_write(weights, folder):
        threads["write"].append(threading.current_thread().name)
        assert gate.wait(60)
        real_write(weights, folder)

    def digest(*args, **kwargs):
        threads["hash"].append(threading.current_thread().name)
        return real_digest(*args, **kwargs)

    monkeypatch.setattr(snapshot_module, "_write_weights", held_write)
    monkeypatch.setattr(snapshot_module, "weights_digest", digest)
    yield gate, threads
    gate.set()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False])
def test_a_snapshot_step_returns_before_the_write_and_writes_what_a_synchronous_write_does(
        tmp_path, toy_dataset, monkeypatch, lora):
    """snapshot() with a writer returns while the write is held; the model then trains on (its weights
    change), and the snapshot written afterwards holds the weights of the snapshot step, byte for byte what
    PEFT's save_pretrained / safetensors' save_model wrote from the model at that step, with the same
    SHA-256 as write_snapshot of the model itself. Files and hash on the writer's thread, not this one."""
    from safetensors.torch import save_model

    from b3stream.refresh.trainer import SnapshotWriter, snapshot

    cfg, student = perturbed_student(lora, seed=1)
    manifest = Manifest.load(toy_dataset)
    run = tmp_path / "run"
    reference = tmp_path / "reference"  # the synchronous writes of the model at the snapshot step
    if lora:
        student.model.save_pretrained(str(reference / "adapter"))
    else:
        reference.mkdir()
        save_model(student.model, str(reference / "model.safetensors"))
    sync = write_snapshot(tmp_path / "sync", 4, student.model, cfg, manifest.stamp("train"), epoch=0, keep=5,
                          trained=np.arange(6))
    enc = types.SimpleNamespace(model=student.model, cfg=cfg)
    writer = SnapshotWriter()
    with _gate(monkeypatch) as (gate, threads):
        t0 = time.perf_counter()
        snapshot(enc, _cfg(), manifest, RunPaths(run), 4, 0, stage=0, dist=CPU1, trained=np.arange(6),
                 writer=writer)
        assert time.perf_counter() - t0 < 5 and writer.busy() and list_snapshots(run) == []
        with torch.no_grad():  # the next optimizer step, while the snapshot is written
            for p in student.model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
        gate.set()
        writer.wait()
    assert threads["write"] == ["b3stream-snapshot-4"] and threads["hash"] == ["b3stream-snapshot-4"]
    snap = latest_snapshot(run)
    assert snap.step == 4 and snap.meta["kind"] == ("lora" if lora else "full")
    written = _files(snap.path)
    assert written == _files(sync) and snap.weights_sha256 == latest_snapshot(tmp_path / "sync").weights_sha256
    if lora:
        assert {k: v for k, v in written.items() if k.startswith("adapter/")} == \
            {f"adapter/{k}": v for k, v in _files(reference / "adapter").items()}
    else:
        assert written["model.safetensors"] == (reference / "model.safetensors").read_bytes()
    assert np.load(snap.path / "trained.npy").tolist() == list(range(6))


def test_a_failed_write_surfaces_at_the_next_snapshot_and_at_the_end(tmp_path, toy_dataset, monkeypatch):
    import b3stream.refresh.snapshot as snapshot_module
    from b3stream.refresh.trainer import SnapshotWriter, snapshot

    cfg, student = perturbed_student(True, seed=2)
    manifest = Manifest.load(toy_dataset)
    enc = types.SimpleNamespace(model=student.model, cfg=cfg)

    def broken(weights, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot_module, "_write_weights", broken)
    writer = SnapshotWriter()
    snapshot(enc, _cfg(), manifest, RunPaths(tmp_path), 2, 0, stage=0, dist=CPU1, writer=writer)
    with pytest.raises(RuntimeError, match="snapshot of step 2 could not be written: OSError.*No space"):
        snapshot(enc, _cfg(), manifest, RunPaths(tmp_path), 4, 0, stage=0, dist=CPU1, writer=writer)
    writer.wait()  # raised once: step 4's write had not started
    snapshot(enc, _cfg(), manifest, RunPaths(tmp_path), 6, 0, stage=0, dist=CPU1, writer=writer)
    with pytest.raises(RuntimeError, match="step 6"):
        writer.wait()  # the end of training
    assert list_snapshots(tmp_path) == [] and not any((tmp_path / "snapshots").iterdir())  # no temp left


@pytest.mark.parametrize("lora", [True, False])
def test_under_zero3_a_lora_snapshot_gathers_only_the_adapter(tmp_path, toy_dataset, monkeypatch, lora):
    """Stage 3: the gather every rank takes part in covers the adapter's parameters (the trainable ones)
    of a LoRA student, every parameter of a full fine-tune; every rank gathers, only rank 0 copies."""
    import deepspeed

    from b3stream.refresh.trainer import snapshot

    cfg, student = perturbed_student(lora, seed=3)
    gathered = []

    @contextmanager
    def recording(params, modifier_rank=None):
        gathered.append([p for p in params])
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    enc = types.SimpleNamespace(model=student.model, cfg=cfg)
    other = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), backend="gloo")
    snapshot(enc, _cfg(), Manifest.load(toy_dataset), RunPaths(tmp_path), 2, 0, stage=3, dist=other)
    assert list_snapshots(tmp_path) == []  # rank 1 gathers, writes nothing
    names = {id(p): n for n, p in student.model.named_parameters()}
    picked = [names[id(p)] for p in gathered[0]]
    if lora:
        trainable = [n for n, p in student.model.named_parameters() if p.requires_grad]
        assert picked == trainable and all("lora_" in n for n in picked)
        assert len(picked) < len(names) / 3
    else:
        assert picked == list(names.values())
    assert snapshot_parameters(student.model) == gathered[0]


# -- the schedule loader -----------------------------------------------------------------------------------


def test_a_new_version_is_listed_loaded_and_verified_off_the_loop_thread(tmp_path, toy_dataset, monkeypatch):
    """The watcher's check on the loop's thread never lists the folder, parses or checksums a schedule:
    with the load held, check() returns at once (None); once the loader has it, the next check swaps."""
    import b3stream.refresh.hotswap as hotswap
    from b3stream.refresh.hotswap import ScheduleWatcher

    folder = tmp_path / "schedules"
    random_schedule(toy_dataset, batch_size=16, K=4, seed=0, folder=folder, version=0)
    gate, calls = threading.Event(), []
    real_load, real_list = hotswap.load_schedule, hotswap.list_versions

    def load(*args, **kwargs):
        calls.append(("load", threading.current_thread().name))
        assert gate.wait(60)
        return real_load(*args, **kwargs)

    def listing(*args, **kwargs):
        calls.append(("list", threading.current_thread().name))
        return real_list(*args, **kwargs)

    sha = hashlib.sha256

    def counted_sha(*args, **kwargs):
        calls.append(("sha256", threading.current_thread().name))
        return sha(*args, **kwargs)

    monkeypatch.setattr(hotswap, "load_schedule", load)
    monkeypatch.setattr(hotswap, "list_versions", listing)
    monkeypatch.setattr(hashlib, "sha256", counted_sha)
    watcher = ScheduleWatcher(folder, Manifest.load(toy_dataset), CPU1, say=lambda m: None)
    assert watcher.check(0) is None and watcher.settle(5)  # nothing newer than v0
    random_schedule(toy_dataset, batch_size=16, K=4, seed=1, folder=folder, version=1)
    calls.clear()  # publishing hashed v1 here; from now on only the trainer's side counts
    t0 = time.perf_counter()
    for _ in range(5):  # steps go on while v1 loads
        assert watcher.check(0) is None
    assert time.perf_counter() - t0 < 1.0
    gate.set()
    assert watcher.settle(30)
    new = watcher.check(0)
    assert new is not None and new.version == 1
    watcher.close()
    main = threading.current_thread().name
    assert {kind for kind, _ in calls} >= {"list", "load", "sha256"}
    assert all(thread == "b3stream-schedule-loader" for _, thread in calls), [c for c in calls if c[1] == main]


def test_step_end_at_a_snapshot_step_leaves_the_files_to_the_writer(tmp_path, toy_dataset, monkeypatch):
    """The trainer's between-steps work (BetweenSteps.after_step) at a snapshot step with a new version published:
    it returns with the snapshot's write held, lists no folder and loads no schedule on the loop's thread,
    and swaps at a later step once the loader has the version; flush() waits for the write."""
    import b3stream.refresh.hotswap as hotswap
    from b3stream.refresh.trainer import BetweenSteps
    from b3stream.schedule import load_schedule
    from b3stream.train.sampler import ScheduleSampler

    cfg, student = perturbed_student(True, seed=4)
    manifest = Manifest.load(toy_dataset)
    paths = RunPaths(tmp_path / "run")
    first = load_schedule(random_schedule(toy_dataset, batch_size=16, K=4, seed=0, folder=paths.schedules,
                                          version=0))
    sampler = ScheduleSampler(first, manifest.split("train").n, seed=0)
    said = []
    monitor = types.SimpleNamespace(write=said.append, scalars=lambda *a, **k: None)
    encoder = types.SimpleNamespace(model=student.model, cfg=cfg)
    loop_thread = threading.current_thread().name
    on_loop = []
    for name in ("load_schedule", "list_versions"):
        real = getattr(hotswap, name)
        monkeypatch.setattr(hotswap, name, lambda *a, _real=real, _name=name, **k: (
            on_loop.append(_name) if threading.current_thread().name == loop_thread else None, _real(*a, **k))[1])
    end = BetweenSteps(_cfg(every=2), sampler, CPU1, monitor, manifest, paths, encoder, stage=0,
                       watch_folder=paths.schedules, watch_every=1)
    with _gate(monkeypatch) as (gate, threads):
        for step in (1, 2):
            sampler.advance()
            t0 = time.perf_counter()
            assert end.after_step(step, epoch_ended=False) is False
            assert time.perf_counter() - t0 < 2
        assert end.writer.busy() and list_snapshots(paths.run) == []  # step 2's snapshot: still being written
        gate.set()
    random_schedule(toy_dataset, batch_size=16, K=4, seed=1, folder=paths.schedules, version=1)
    swapped_at = None
    for step in range(3, sampler.steps_per_epoch):
        sampler.advance()
        end.watcher.settle(30)
        if end.after_step(step, epoch_ended=False):
            swapped_at = step
            break
    end.close()
    assert swapped_at is not None and sampler.version == 1 and on_loop == []
    assert [s.step for s in list_snapshots(paths.run)] == list(range(2, swapped_at + 1, 2))
    assert threads["write"] == ["b3stream-snapshot-2"] and threads["hash"] == ["b3stream-snapshot-2"]

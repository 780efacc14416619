"""Nothing lost, nothing trusted that should not be: stages delete only what they wrote, killed writers'
temporary files are swept by the next writer (never a live writer's), corrupt snapshots are refused, resume
unpickles no code, one miner per run, and miner restarts are counted in a window."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from b3stream.cli import main
from b3stream.config import ConfigError, EncoderConfig, LoraConfig, MineConfig, RefreshConfig, TrainConfig, dump_config
from b3stream.files import tmp_name
from b3stream.schedule import list_versions
from b3stream.run_paths import RunPaths
from b3stream.refresh.miner import snapshot_model
from b3stream.refresh.snapshot import SnapshotError, latest_snapshot, write_snapshot
from b3stream.train import run_folder

from ._train_util import env, random_schedule, read_trace, refused_in_process, run, run_side_by_side, write_config

B3 = [sys.executable, "-m", "b3stream"]
TINY = dict(max_query_length=16, max_positive_length=16)


def dead_writer(path: Path, folder: bool = False) -> Path:
    """A real process writes ``path``'s temporary file (or folder) under its own name and is killed with
    SIGKILL mid-write; returns what it left behind."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from b3stream.files import tmp_name
        tmp = tmp_name(Path({str(path)!r}))
        if {folder}:
            tmp.mkdir(); (tmp / "part.tar").write_bytes(b"x" * 1000)
        else:
            tmp.write_bytes(b"half a file")
        print(tmp, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env())
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert left.exists()
    return left


# -- outputs are owned -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mine_embed_keeps_files_it_did_not_write(tmp_path, toy_dataset):
    """Re-embedding (other teacher settings, other own embeddings) replaces the stage's files only."""
    out = tmp_path / "M"
    assert main(["mine", "embed", "--data", str(toy_dataset), "--out", str(out), "--quiet",
                 "--set", "teacher.max_query_length=16", "--set", "teacher.max_positive_length=16"]) == 0
    notes = out / "embeddings" / "notes.txt"
    notes.write_text("mine")
    token = json.loads((out / "embeddings" / "embeddings.json").read_text())["token"]
    assert main(["mine", "embed", "--data", str(toy_dataset), "--out", str(out), "--quiet",
                 "--set", "teacher.max_query_length=12", "--set", "teacher.max_positive_length=16"]) == 0
    assert json.loads((out / "embeddings" / "embeddings.json").read_text())["token"] != token
    assert notes.read_text() == "mine"

    rng = np.random.default_rng(0)
    for seed in (1, 2):  # bring-your-own embeddings: the import path starts over too
        q, p = tmp_path / f"q{seed}.npy", tmp_path / f"p{seed}.npy"
        np.save(q, rng.normal(size=(50, 8)).astype(np.float32))
        np.save(p, rng.normal(size=(50, 8)).astype(np.float32))
        assert main(["mine", "embed", "--query-embeddings", str(q), "--positive-embeddings", str(p), "--out",
                     str(tmp_path / "byo"), "--quiet"]) == 0
        (tmp_path / "byo" / "embeddings" / "notes.txt").write_text("byo")
    assert (tmp_path / "byo" / "embeddings" / "notes.txt").read_text() == "byo"


@pytest.mark.slow
def test_train_refuses_a_folder_holding_files_it_did_not_write(tmp_path, toy_dataset, capfd):
    """config.yaml and summary.json already in `out` are not overwritten without a word: refused before the
    model loads, and nothing in the folder changes (the command's entry in this process)."""
    sched = random_schedule(toy_dataset, batch_size=8, K=2, folder=tmp_path / "sched")
    out = tmp_path / "T"
    out.mkdir()
    (out / "config.yaml").write_text("mine: 1\n")
    (out / "summary.json").write_text('{"mine": 1}')
    cfg = write_config(tmp_path / "t.yaml", data=str(toy_dataset), schedule=str(sched), out=str(out), max_steps=1)
    code, err = refused_in_process(["train", "--config", str(cfg)], capfd)
    assert code == 2, err[-2000:]
    assert "files no b3stream run wrote" in err and "overwrite=true" in err
    assert "Traceback" not in err and "Loading weights" not in err
    assert (out / "config.yaml").read_text() == "mine: 1\n" and (out / "summary.json").read_text() == '{"mine": 1}'
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "summary.json"]


@pytest.mark.slow
def test_refreshed_mode_never_deletes_a_mining_folder(tmp_path, toy_dataset, capfd):
    """`train mode=refreshed out=H` with H a mining folder: refused even with overwrite=true (the run would
    publish into and prune H/schedules, H/snapshots); every file stays (the command's entry in this process)."""
    H = tmp_path / "H"
    for v in (1, 2):
        random_schedule(toy_dataset, batch_size=8, K=2, folder=H / "schedules", version=v)
    (H / "schedules" / "NOTES.txt").write_text("notes")
    (H / "snapshots").mkdir()
    (H / "snapshots" / "user.txt").write_text("user")
    before = sorted(str(p.relative_to(H)) for p in H.rglob("*"))
    start = random_schedule(toy_dataset, batch_size=8, K=2, folder=tmp_path / "start")
    cfg = write_config(tmp_path / "r.yaml", data=str(toy_dataset), schedule=str(start), out=str(H), max_steps=2,
                       mode="refreshed", refresh={"every_steps": 1, "spawn": False})
    for extra in ([], ["overwrite=true"]):
        code, err = refused_in_process(["train", "--config", str(cfg), *extra], capfd)
        assert code == 2, err[-2000:]
        assert "Traceback" not in err
        assert sorted(str(p.relative_to(H)) for p in H.rglob("*")) == before
    assert "schedules, snapshots hold files" in err  # overwrite=true: refused for being a mining folder


def test_overwrite_replaces_an_earlier_run_but_keeps_other_files(tmp_path):
    run_dir = tmp_path / "R"
    run_folder.claim(run_dir, "new")
    (run_dir / "checkpoints" / "step00000500").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step00000500")
    (run_dir / "trace.jsonl").write_text("{}\n")
    (run_dir / "summary.json").write_text("{}")
    (run_dir / "schedules").mkdir()
    (run_dir / "schedules" / "v000003.b3s").write_bytes(b"x")
    (run_dir / "schedules" / "mine.txt").write_text("kept")
    (run_dir / "snapshots" / "step-0000010").mkdir(parents=True)
    (run_dir / "notes.txt").write_text("kept")
    assert run_folder.plan(run_dir, resume=True, overwrite=False) == "resume"
    with pytest.raises(ConfigError, match="an earlier b3stream run.*resume=true continues it"):
        run_folder.plan(run_dir, resume=False, overwrite=False)
    how = run_folder.plan(run_dir, resume=False, overwrite=True)
    assert how == "replace"
    run_folder.claim(run_dir, how)
    left = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))
    assert left == [".b3stream-run.json", "checkpoints", "notes.txt", "schedules", "schedules/mine.txt", "snapshots"]
    # A schedule given from inside the run's own schedules would be removed by the replace: refused.
    with pytest.raises(ConfigError, match="lies in"):
        run_folder.plan(run_dir, resume=False, overwrite=True, schedule=run_dir / "schedules" / "v000000.b3s")


# -- temporary files of killed writers -------------------------------------------------------------------------


def test_a_killed_publishers_temp_file_is_swept_by_the_next_but_a_live_ones_is_not(tmp_path, toy_dataset):
    folder = tmp_path / "schedules"
    folder.mkdir()
    left = dead_writer(folder / "v000001.b3s")
    live = tmp_name(folder / "v000009.b3s", token="0a0b0c0d")  # this process: alive
    live.write_bytes(b"being written")
    random_schedule(toy_dataset, batch_size=8, K=2, folder=folder)
    assert not left.exists() and live.exists()
    assert list_versions(folder) == [0]


def test_a_killed_prepare_leaves_nothing_for_good(tmp_path):
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap

    from .conftest import toy_rows, write_jsonl

    out = tmp_path / "ds"
    left = dead_writer(out, folder=True)
    src = write_jsonl(tmp_path / "src.jsonl", toy_rows(60))
    prepare_file(str(src), "jsonl", str(out), FieldMap(query="q", positive="p", task="task", group="g"),
                 progress=False)
    assert not left.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src.jsonl"]


# -- snapshots -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """A run folder holding one real LoRA snapshot of a student whose adapter moved off zero."""
    from ._train_util import moved_student

    root = tmp_path_factory.mktemp("snap")
    cfg = EncoderConfig(**TINY, lora=LoraConfig(enabled=True, r=4, alpha=8))
    student = moved_student(cfg, seed=0)
    write_snapshot(root, 4, student.model, cfg, {"dataset": "toy", "split": "train", "n": 400, "fingerprint": "0" * 16})
    return root


def corrupt(run: Path, how: str) -> Path:
    """A copy of the snapshot run whose adapter has one byte flipped, or is cut in half."""
    copy = run.parent / f"{run.name}-{how}"
    if not copy.exists():
        shutil.copytree(run, copy)
        adapter = latest_snapshot(copy).path / "adapter" / "adapter_model.safetensors"
        data = bytearray(adapter.read_bytes())
        if how == "flipped":
            data[-100] ^= 0x01
        else:
            data = data[: len(data) // 2]
        adapter.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("how", ["flipped", "truncated"])
def test_a_corrupt_snapshot_is_never_embedded(snapshot_run, toy_dataset, tmp_path, how):
    from b3stream.mining.pipeline import embed_stage

    snap = latest_snapshot(corrupt(snapshot_run, how))
    cfg = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"), student_snapshot=str(snap.path))
    with pytest.raises(SnapshotError, match="do not match the SHA-256"):
        embed_stage(cfg, progress=False, student=snapshot_model(cfg))
    assert not (tmp_path / "mine" / "embeddings" / "embeddings.json").exists()


@pytest.mark.slow
def test_corruption_after_a_snapshot_was_embedded_is_seen(snapshot_run, toy_dataset, tmp_path):
    from b3stream.mining.pipeline import embed_stage

    run = tmp_path / "run"
    shutil.copytree(snapshot_run, run)
    snap = latest_snapshot(run)
    cfg = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"), student_snapshot=str(snap.path),
                     teacher=EncoderConfig(**TINY))  # the student the snapshot was written by
    embed_stage(cfg, progress=False, student=snapshot_model(cfg))
    adapter = snap.path / "adapter" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-100] ^= 0x01
    adapter.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        embed_stage(cfg, progress=False, student=snapshot_model(cfg))  # not "up to date" on the recorded digest


def miner_run(root: Path, data: Path) -> Path:
    """A run folder with the miner's settings, as a refreshed trainer writes them."""
    paths = RunPaths(root)
    paths.refresh.mkdir(parents=True, exist_ok=True)
    dump_config(MineConfig(data=str(data), strategy="random", batch_size=8, quality_sample=0,
                           teacher=EncoderConfig(**TINY, lora=LoraConfig(enabled=False))), paths.mine_config)
    paths.refresh_config.write_text(json.dumps({"poll_seconds": 0.1}))
    # the trainer's settled config: the student every snapshot of the run must have been written by
    dump_config(TrainConfig(data=str(data), student=EncoderConfig(**TINY, lora=LoraConfig(r=4, alpha=8))),
                paths.run_config)
    return root


def test_the_miner_refuses_a_corrupt_snapshot_and_waits_for_the_next(snapshot_run, toy_dataset):
    from b3stream.refresh.miner import Miner

    run_dir = miner_run(corrupt(snapshot_run, "flipped"), toy_dataset)
    assert Miner(run_dir).serve(once=True) == 0
    status = json.loads(RunPaths(run_dir).status.read_text())
    assert status["rejected"]["step"] == 4 and "SHA-256" in status["rejected"]["reason"]
    assert status["refreshes"] == 0 and list_versions(RunPaths(run_dir).schedules) == []


@pytest.mark.slow
def test_two_miners_never_serve_one_run(tmp_path, toy_dataset):
    run_dir = miner_run(tmp_path / "run", toy_dataset)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from b3stream.refresh.miner import hold_lock
        hold_lock(Path({str(run_dir / 'refresh' / 'miner.lock')!r})); print("held", flush=True); time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        res = run([*B3, "refresh", str(run_dir), "--once", "--quiet"], timeout=120)
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"another miner (pid {holder.pid})" in res.stderr and "Traceback" not in res.stderr
        assert not RunPaths(run_dir).status.exists()  # the refused miner wrote nothing of the other's
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder (SIGKILL included): the next miner serves.
    from b3stream.refresh.miner import hold_lock

    os.close(hold_lock(run_dir / "refresh" / "miner.lock"))


def test_miner_restarts_are_counted_in_a_window():
    """A spawned miner that crashes now and then over a long run is always restarted; one that crashes
    max_restarts times within the window is given up on."""
    from b3stream.refresh.trainer import MinerProcess

    class Crashing(MinerProcess):
        def command(self):
            return [sys.executable, "-c", "raise SystemExit(3)"]

    def crashes(gap: float, times: int, max_restarts: int = 2) -> MinerProcess:
        now = [0.0]
        cfg = TrainConfig(mode="refreshed", refresh=RefreshConfig(every_steps=1, max_restarts=max_restarts,
                                                                   restart_window=100.0))
        miner = Crashing(RunPaths(Path(tempdir)), cfg, say=lambda m: None, clock=lambda: now[0])
        miner.start()
        for _ in range(times):
            miner.proc.wait()
            miner.check()  # notices the exit, schedules a restart
            if miner.gave_up:
                break
            now[0] += gap
            miner.check()  # restarts it
        return miner

    import tempfile

    with tempfile.TemporaryDirectory() as tempdir:
        RunPaths(Path(tempdir)).refresh.mkdir()
        rare = crashes(gap=150.0, times=6)
        assert not rare.gave_up and rare.restarts == 6
        frequent = crashes(gap=70.0, times=6)  # the wait before a restart is at most 60 s
        assert frequent.gave_up and frequent.restarts == 2


# -- checkpoints --------------------------------------------------------------------------------------------


class Planted:
    """What an attacker plants in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_resume_loads_no_code_from_a_checkpoint(tmp_path, toy_dataset):
    """ZeRO-3, full fine-tuning: a resume from the run's own checkpoint works (model and optimizer states
    through the restricted unpickler); the same checkpoint with a planted object is refused, and the object's
    code never runs."""
    sched = random_schedule(toy_dataset, batch_size=8, K=2, folder=tmp_path / "sched")
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "t.yaml", data=str(toy_dataset), schedule=str(sched), out=str(out), max_steps=1,
                       trace_ids=True, deepspeed="zero3",
                       student={**TINY, "lora": {"enabled": False}})
    first = run([*B3, "train", "--config", str(cfg), "--quiet"], threads=2)
    assert first.returncode == 0, first.stderr[-3000:]
    planted = tmp_path / "planted"
    shutil.copytree(out, planted)
    marker = tmp_path / "PWNED"
    tag = (planted / "checkpoints" / "latest").read_text().strip()
    states = next((planted / "checkpoints" / tag).glob("*model_states.pt"))
    sd = torch.load(states, weights_only=False)  # our own file, trusted here
    sd["extra"] = Planted(marker)
    torch.save(sd, states)

    # the honest resume and the planted one are independent: side by side
    resumed, res = run_side_by_side([*B3, "train", "--config", str(cfg), "--quiet", "max_steps=2"],
                                    [*B3, "train", "--config", str(cfg), "--quiet", f"out={planted}", "max_steps=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 1" in resumed.stderr and [t["step"] for t in read_trace(out)] == [1, 2]
    assert res.returncode == 2, res.stderr[-3000:]
    assert "refused to load" in res.stderr and "posix.system" in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()

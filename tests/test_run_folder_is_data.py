"""A run folder is data, never code or orders (issue: "A run folder is data").

Every case here failed before its fix: a planted ``snapshot.json``, a schedule's teacher or ``mine.yaml`` made
the miner import a model folder's own code; crafted run-folder JSON was a traceback (or killed the trainer at
its next snapshot); ``[]`` was a run marker; ``overwrite`` replaced a stranger's ``summary.json``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from b3stream.config import ConfigError, EncoderConfig, LoraConfig, MineConfig, TrainConfig, dump_config
from b3stream.data.manifest import Manifest
from b3stream.files import HOST, pid_alive, sweep_temps
from b3stream.refresh.miner import read_settings
from b3stream.schedule import list_versions, load_schedule, publish_schedule, version_path
from b3stream.run_paths import RunPaths
from b3stream.refresh.snapshot import latest_snapshot, list_snapshots, pinned_steps, write_snapshot
from b3stream.train import run_folder

from ._train_util import env, moved_student, random_schedule

B3 = [sys.executable, "-m", "b3stream"]
STUDENT = EncoderConfig(max_query_length=16, max_positive_length=16, lora=LoraConfig(r=4, alpha=8))
TEACHER = EncoderConfig(max_query_length=16, max_positive_length=16, lora=LoraConfig(enabled=False))


# -- 1. nothing read from a run folder runs code ----------------------------------------------------------


def evil_model(root: Path) -> tuple[Path, Path]:
    """A copy of the bundled model whose config maps AutoModel to its own ``evil.py``, which leaves a file
    when Python imports it; returns (model folder, the file the code would write)."""
    from b3stream.encoder import default_model_path

    folder = root / "evil-model"
    ran = root / "EVIL-CODE-RAN"
    if not folder.exists():
        shutil.copytree(default_model_path(), folder)
        (folder / "evil.py").write_text(textwrap.dedent(f"""
            from pathlib import Path
            Path({str(ran)!r}).write_text("imported")
            from transformers import BertModel
            class EvilModel(BertModel):
                pass
        """))
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModel": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(config))
    return folder, ran


def refreshed_run(root: Path, data: Path, **refresh) -> RunPaths:
    """A run folder as a refreshed trainer leaves it: its config, the miner's settings, the starting schedule
    (mined by the teacher) and one real LoRA snapshot of a student whose adapter moved."""
    paths = RunPaths(root)
    random_schedule(data, batch_size=8, K=2, folder=paths.schedules)
    paths.refresh.mkdir(parents=True, exist_ok=True)
    dump_config(MineConfig(data=str(data), strategy="random", batch_size=8, quality_sample=0, teacher=TEACHER),
                paths.mine_config)
    paths.refresh_config.write_text(json.dumps({"poll_seconds": 0.1, **refresh}))
    dump_config(TrainConfig(data=str(data), student=STUDENT), paths.run_config)
    write_snapshot(root, 4, moved_student(STUDENT, seed=0).model, STUDENT, Manifest.load(data).stamp("train"))
    return paths


def edit_json(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = d
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(json.dumps(d))


def refresh_once(run: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*B3, "refresh", "--run", str(run), "--once", "--quiet", *extra], capture_output=True,
                          text=True, env=env(), timeout=300)


@pytest.mark.slow
def test_a_planted_snapshot_json_runs_no_code(tmp_path, toy_dataset):
    """A genuine snapshot with only its snapshot.json edited (the model -> a folder whose auto_map names its
    own evil.py, trust_remote_code: true) passes the weights' digest, but the miner loads snapshots into the
    run's own student: refused, nothing imported, with or without --trust-remote-code on the command line."""
    evil, ran = evil_model(tmp_path)
    paths = refreshed_run(tmp_path / "run", toy_dataset)
    edit_json(latest_snapshot(paths.run).path / "snapshot.json", encoder__model=str(evil),
              encoder__trust_remote_code=True)
    for extra in ([], ["--trust-remote-code"]):
        res = refresh_once(paths.run, *extra)
        assert res.returncode == 0, res.stderr[-2000:]
        status = json.loads(paths.status.read_text())
        assert "not this run's" in status["rejected"]["reason"] and "model" in status["rejected"]["reason"]
        assert list_versions(paths.schedules) == [0] and not ran.exists()

    # The control: the same folder does run its code when remote code is allowed, so the test can fail (here,
    # in this process, which has transformers imported already: the code is Python's to import either way).
    from transformers import AutoModel

    AutoModel.from_pretrained(str(evil), trust_remote_code=True)
    assert ran.exists()


@pytest.mark.slow
def test_a_schedules_teacher_and_mine_yaml_run_no_code(tmp_path, toy_dataset):
    """The two other doors: the starting schedule's recorded teacher (read by refresh.when: bound for its
    reference) and RUN/refresh/mine.yaml's teacher (refresh.model: teacher), each naming the evil folder
    with trust_remote_code: true. Neither imports evil.py: a schedule's teacher is used only when it is
    mine.yaml's, and trust_remote_code comes from the command alone."""
    evil, ran = evil_model(tmp_path)
    paths = refreshed_run(tmp_path / "run", toy_dataset, when="bound", bound_drift=-1e9, probe_batches=2)
    v0 = load_schedule(version_path(paths.schedules, 0))
    v0.meta["teacher"] = {**v0.meta.get("teacher", {}), "model": str(evil), "trust_remote_code": True}
    version_path(paths.schedules, 0).unlink()
    publish_schedule(v0, paths.schedules, 0)  # a crafted schedule: its checksum is its own again
    res = refresh_once(paths.run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not ran.exists()
    assert json.loads(paths.status.read_text())["refreshes"] == 1  # the refresh itself went on

    mine = paths.mine_config.read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    paths.mine_config.write_text(mine.replace("model: null", f"model: {evil}", 1))
    assert f"model: {evil}" in paths.mine_config.read_text()
    write_snapshot(paths.run, 8, moved_student(STUDENT, seed=1).model, STUDENT, Manifest.load(toy_dataset).stamp("train"))
    refresh_once(paths.run, "--model", "teacher")
    assert not ran.exists()


# -- 2. crafted run-folder JSON is an error that names the file, or ignored where it is polled --------------


def test_a_crafted_lease_never_stops_a_snapshot(tmp_path):
    """lease.json with "time": "soon" killed the trainer at its next snapshot (ValueError); a pid of 10^20 was
    an OverflowError. A lease that is not one pins nothing, and pruning goes on."""
    cfg, student = STUDENT, moved_student(STUDENT, seed=0)
    stamp = {"dataset": "toy", "split": "train", "n": 1, "fingerprint": "0" * 16}
    paths = RunPaths(tmp_path)
    paths.refresh.mkdir(parents=True)
    for lease in ({"step": 1, "pid": os.getpid(), "host": HOST, "time": "soon"},
                  {"step": 1, "pid": 10**20, "host": HOST, "time": 0},
                  {"step": 1, "pid": os.getpid(), "host": HOST, "time": float("nan")},
                  [1], "x", None):
        paths.lease.write_text(json.dumps(lease))
        assert pinned_steps(tmp_path) == set()
    paths.lease.write_bytes(b"\xff\xfe{")
    assert pinned_steps(tmp_path) == set()
    for step in (1, 2, 3):
        write_snapshot(tmp_path, step, student.model, cfg, stamp, keep=1)
    assert [s.step for s in list_snapshots(tmp_path)] == [3]
    paths.lease.write_text(json.dumps({"step": 3, "pid": os.getpid(), "host": HOST, "time": 1.0}))
    assert pinned_steps(tmp_path) == {3}  # a real lease still pins


def test_pids_no_process_can_have_are_no_process(tmp_path):
    """A temporary name with a pid of 10^20 was an OverflowError in every folder swept (os.kill)."""
    assert not pid_alive(10**20) and not pid_alive(0) and not pid_alive(-1) and pid_alive(os.getpid())
    crafted = tmp_path / f".x.tmp-99999999999@{HOST}"  # beyond any pid_max: its writer is no process
    crafted.write_bytes(b"")
    huge = tmp_path / f".y.tmp-99999999999999999999@{HOST}"  # 20 digits: no temporary name b3stream writes
    huge.write_bytes(b"")
    assert sweep_temps(tmp_path) == [crafted]
    assert huge.exists()


@pytest.mark.parametrize("status", [b"[]", b'"x"', b"{\"state\": 5}", b"\xff\xfe", b"{" * 100000, b"null"])
def test_a_crafted_miner_status_never_stops_a_step(tmp_path, status):
    """status.json as a list or a string was an AttributeError at every step of a CPU refreshed run."""
    import torch

    from b3stream.refresh.trainer import ThreadShare

    path = tmp_path / "status.json"
    path.write_bytes(status)
    threads = torch.get_num_threads()
    share = ThreadShare(path, full=threads, shared=max(1, threads - 1))
    try:
        assert share.update() == threads  # as good as no status: the miner is taken to be waiting
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("content, says", [
    (b"[1]", "not a JSON object"),
    (b'{"threads": "x"}', "threads: expected int"),
    (b'{"nice": -5}', "nice: must be in [0, 19]"),
    (b'{"poll_seconds": -1}', "poll_seconds: must be > 0"),
    (b'{"keep": 100000000000000000000000}', "keep: 100000000000000000000000 is out of range"),
    (b'{"when": "sometimes"}', "when: must be one of"),
    (b'\xff\xfe{"nice": 1}', "not a JSON object"),
    (b'{"bound_drift": NaN}', "bound_drift: must be a finite number"),
])
def test_crafted_refresh_settings_are_refused_naming_the_file(tmp_path, content, says):
    """refresh.json was read raw: [1], {"threads": "x"}, {"nice": "5"}, {"poll_seconds": -1} each crashed
    `b3stream refresh` differently, and a negative nice would have raised the miner's priority."""
    paths = RunPaths(tmp_path)
    paths.refresh.mkdir(parents=True)
    paths.refresh_config.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        read_settings(paths)
    assert str(paths.refresh_config) in str(e.value) and says in str(e.value)


def test_refresh_settings_as_the_trainer_writes_them_load(tmp_path):
    import dataclasses

    from b3stream.config import RefreshConfig

    paths = RunPaths(tmp_path)
    paths.refresh.mkdir(parents=True)
    written = RefreshConfig(every_steps=3, nice=5, when="bound", mine={"index": "flat"})
    paths.refresh_config.write_text(json.dumps(dataclasses.asdict(written)))
    assert read_settings(paths) == written


@pytest.mark.slow
def test_the_refresh_command_names_a_crafted_file_without_a_traceback(tmp_path, toy_dataset, capsys):
    """A crafted refresh.json is refused by the command's entry (in this process: it stops before the miner
    renices itself or loads anything); a crafted mine.yaml, read after that, by the launched command: exit 2,
    the file named, no traceback."""
    from b3stream.cli import main

    paths = RunPaths(tmp_path / "run")
    paths.refresh.mkdir(parents=True)
    dump_config(MineConfig(data=str(toy_dataset), teacher=TEACHER), paths.mine_config)
    for name, content in (("refresh.json", b'{"nice": "five"}'), ("mine.yaml", b"\xff\xfe: [")):
        target = paths.refresh / name
        saved = target.read_bytes() if target.exists() else None
        target.write_bytes(content)
        if name == "refresh.json":
            code, err = main(["refresh", "--run", str(paths.run), "--once", "--quiet"]), capsys.readouterr().err
        else:
            res = refresh_once(paths.run)
            code, err = res.returncode, res.stderr
        assert code == 2, err[-2000:]
        assert "Traceback" not in err and str(target) in err
        target.unlink() if saved is None else target.write_bytes(saved)


# -- 3 and 4. a run marker is a record; overwrite keeps what no run of the folder wrote -----------------------


@pytest.mark.parametrize("marker", [b"[]", b"{}", b'{"created": "now", "pid": 1}', b"\xff", b'{"x": 1}'])
def test_any_json_is_no_run_marker(tmp_path, toy_dataset, marker):
    """`[]` as .b3stream-run.json made a mining folder "a run", and overwrite=true then deleted its
    schedules/v000000.b3s. A marker is a record b3stream writes, or the folder is no run."""
    folder = tmp_path / "mining"
    random_schedule(toy_dataset, batch_size=8, K=2, folder=folder / "schedules")
    (folder / run_folder.MARKER).write_bytes(marker)
    assert run_folder.marker(folder) is None
    with pytest.raises(ConfigError, match="not a b3stream run folder"):
        run_folder.plan(folder, resume=False, overwrite=True)
    assert list_versions(folder / "schedules") == [0]


def test_overwrite_keeps_a_strangers_summary_config_and_trace(tmp_path):
    """overwrite=true on a folder that was never a run replaced the user's summary.json and config.yaml and
    deleted their trace.jsonl: refused now, every file kept."""
    out = tmp_path / "notes"
    out.mkdir()
    files = {"summary.json": '{"mine": 1}', "config.yaml": "mine: 1\n", "trace.jsonl": "{}\n", "notes.md": "n"}
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(ConfigError, match="config.yaml, summary.json, trace.jsonl, names the run writes"):
        run_folder.plan(out, resume=False, overwrite=True)
    assert {p.name: p.read_text() for p in out.iterdir()} == files
    (out / "summary.json").unlink(), (out / "config.yaml").unlink(), (out / "trace.jsonl").unlink()
    assert run_folder.plan(out, resume=False, overwrite=True) == "replace"  # notes alone: the run may start


def test_a_marker_is_a_record_with_a_run_id_and_an_older_one_is_upgraded(tmp_path):
    run = tmp_path / "R"
    run_folder.claim(run, "new")
    first = run_folder.marker(run)
    assert first.format == 1 and len(first.run_id) == 32 and first.host == HOST
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step00000002")
    assert run_folder.plan(run, resume=True, overwrite=False) == "resume"
    run_folder.claim(run, "resume")
    assert run_folder.marker(run) == first  # a resume keeps its run id
    (run / run_folder.MARKER).write_text(json.dumps({"created": 1.0, "pid": 4242}))  # b3stream before this one
    assert run_folder.plan(run, resume=True, overwrite=False) == "resume"
    run_folder.claim(run, "resume")
    assert run_folder.marker(run).format == 1


def test_snapshots_with_crafted_records_are_passed_over(tmp_path):
    """A snapshot folder whose snapshot.json is not a record (a string step, a NaN time, a list, bad bytes)
    is no snapshot: the watcher passes over it instead of failing on it."""
    stamp = {"dataset": "toy", "split": "train", "n": 1, "fingerprint": "0" * 16}
    write_snapshot(tmp_path, 2, moved_student(STUDENT, seed=0).model, STUDENT, stamp)
    good = latest_snapshot(tmp_path)
    for i, meta in enumerate([[], {**good.meta, "step": "3"}, {**good.meta, "created": float("nan")},
                              {**good.meta, "kind": "pickle"}, {**good.meta, "weights_sha256": "x"}]):
        bad = tmp_path / "snapshots" / f"step-{10 + i:07d}"
        shutil.copytree(good.path, bad)
        (bad / "snapshot.json").write_text(json.dumps(meta if not isinstance(meta, dict) else
                                                      {**meta, "step": meta["step"] if meta["step"] == "3" else 10 + i}))
    (tmp_path / "snapshots" / "step-0000099").mkdir()
    (tmp_path / "snapshots" / "step-0000099" / "snapshot.json").write_bytes(b"\xff{")
    assert [s.step for s in list_snapshots(tmp_path)] == [2]
    assert np.array_equal(sorted(p.name for p in (tmp_path / "snapshots").iterdir())[:1], ["step-0000002"])


def test_the_trainer_hands_the_miner_remote_code_only_from_its_own_config(tmp_path, toy_dataset):
    """The spawned miner gets --trust-remote-code only when the trainer's own config sets it; a starting
    schedule whose metadata records a teacher with trust_remote_code: true does not turn it on."""
    from b3stream.config import RefreshConfig
    from b3stream.refresh.trainer import MinerProcess, miner_config

    path = random_schedule(toy_dataset, batch_size=8, K=2, folder=tmp_path / "s")
    sched = load_schedule(path)
    sched.meta["teacher"] = {"model": None, "trust_remote_code": True}
    cfg = TrainConfig(data=str(toy_dataset), schedule=str(path), out=str(tmp_path / "run"), mode="refreshed",
                      refresh=RefreshConfig(every_steps=2, model="teacher"))
    assert miner_config(cfg, sched).teacher.trust_remote_code is False
    named = TrainConfig(**{**cfg.__dict__, "refresh": RefreshConfig(every_steps=2, model="teacher",
                                                                    mine={"teacher.trust_remote_code": True})})
    assert miner_config(named, sched).teacher.trust_remote_code is True
    paths = RunPaths(tmp_path / "run")
    assert "--trust-remote-code" not in MinerProcess(paths, cfg).command()
    assert "--trust-remote-code" in MinerProcess(paths, cfg, trust_remote_code=True).command()

"""Refreshed mode end to end: a real DeepSpeed trainer, a real separate miner process (`b3stream refresh`)
embedding with the student's snapshots, real FAISS / METIS, hot swaps (the pieces on their own, without a
training run: tests/test_refresh_parts.py).

The runs are small (200 code-search pairs, all of them train pairs: 25 steps an epoch at |B| = 8, K = 4;
MiniLM with texts cut to 24 / 32 tokens) so that a refresh takes seconds on two cores; trainer and miner share
those cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from b3stream.config import ConfigError, EncoderConfig, LoraConfig, MineConfig
from b3stream.data.manifest import Manifest
from b3stream.schedule import list_versions, load_schedule, version_path
from b3stream.run_paths import RunPaths
from b3stream.refresh.snapshot import latest_snapshot, list_snapshots, load_snapshot_encoder, write_snapshot
from b3stream.dist import free_port

from ._train_util import env, moved_student, read_trace, run, torchrun, write_config

B3 = [sys.executable, "-m", "b3stream"]
# the student of these runs, and the teacher that mined their starting schedule, read texts this short
STUDENT = {"max_query_length": 24, "max_positive_length": 32, "lora": {"r": 4, "alpha": 8}}
STOP = 30  # the fixture run stops here (5 steps into its second epoch of 25) and is resumed


@pytest.fixture(scope="module")
def mined(tmp_path_factory):
    """200 training pairs and a static b3 schedule mined with the bundled MiniLM teacher."""
    from b3stream.data.prepare import prepare_codesearch
    from b3stream.mining.pipeline import run_all

    root = tmp_path_factory.mktemp("refresh")
    data = root / "data"
    prepare_codesearch(str(data), packages=["stdlib"], max_pairs=200, samples_per_shard=200, progress=False,
                       held_out={})  # nothing is evaluated: every pair a train pair
    teacher = EncoderConfig(max_query_length=STUDENT["max_query_length"],
                            max_positive_length=STUDENT["max_positive_length"], lora=LoraConfig(enabled=False))
    sched = run_all(MineConfig(data=str(data), out=str(root / "mine"), teacher=teacher, strategy="b3", p=2, m=20,
                               K=4, batch_size=8, per_task=False), progress=False)
    return {"root": root, "data": data, "schedule": sched}


def run_student(seed: int):
    """(config, Encoder) of these runs' student (LoRA) with its trainable weights moved off the bundled model's."""
    cfg = EncoderConfig(**{**STUDENT, "lora": LoraConfig(enabled=True, r=4, alpha=8)})
    return cfg, moved_student(cfg, seed)


def refreshed_config(mined, name: str, **extra) -> Path:
    values = dict(data=str(mined["data"]), schedule=str(mined["schedule"]), out=str(mined["root"] / name),
                  student=STUDENT, trace_ids=True, seed=1, mode="refreshed",
                  refresh={"every_steps": 6, "poll_seconds": 0.3, "keep": 100, "nice": 0})
    # Not niced here: on two shared cores a niced miner can starve behind the trainer for a whole test.
    for key, value in extra.pop("refresh", {}).items():
        values["refresh"][key] = value
    values.update(extra)
    return write_config(mined["root"] / f"{name}.yaml", **values)


def assert_exactly_once_per_epoch(trace: list[dict], n: int) -> None:
    for epoch in sorted({t["epoch"] for t in trace}):
        ids = [i for t in trace if t["epoch"] == epoch for i in t["ids"]]
        full = epoch < max(t["epoch"] for t in trace) or len(ids) == n
        assert len(ids) == len(set(ids)), f"an id twice in epoch {epoch}"
        if full:
            assert sorted(ids) == list(range(n)), f"epoch {epoch} does not cover every id once"


@pytest.fixture(scope="module")
def refreshed_run(mined):
    """Two epochs in refreshed mode, stopped after STOP steps and resumed (one run serves the swap, the
    exactly-once and the resume assertions: refreshed runs are the suite's slowest tests). ``max_lag_steps``
    only bounds how late a refresh may land (the first swap lands before STOP however loaded the machine);
    a miner that keeps up never makes the trainer wait."""
    cfg = refreshed_config(mined, "run", epochs=2, refresh={"max_lag_steps": 12, "wait_timeout": 300})
    first = run([*B3, "train", "--config", str(cfg), f"max_steps={STOP}"], threads=1, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    out = mined["root"] / "run"
    before = json.loads((out / "summary.json").read_text())
    second = run([*B3, "train", "--config", str(cfg)], threads=1, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    return {"first": first, "second": second, "out": out, "before": before,
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow
def test_refreshed_run_swaps_mid_epoch_and_trains_each_id_once(mined, refreshed_run):
    out, summary = refreshed_run["out"], refreshed_run["summary"]
    n = Manifest.load(mined["data"]).split("train").n
    swaps = summary["swaps"]
    assert len([s for s in swaps if s["position"] > 0]) >= 2, swaps  # mid-epoch
    assert [s["to"] for s in swaps] == sorted(s["to"] for s in swaps)  # only ever newer versions
    trace = read_trace(out)
    assert_exactly_once_per_epoch(trace, n)
    # The trace's versions change exactly at the recorded swaps.
    for s in swaps:
        assert trace[s["step"]]["version"] == s["to"] and trace[s["step"] - 1]["version"] == s["from"]
    # Every published version verifies and came from a snapshot of this run.
    versions = list_versions(out / "schedules")
    assert len(versions) >= 3
    for v in versions[1:]:
        meta = load_schedule(version_path(out / "schedules", v)).meta
        assert meta["source_step"] % 6 == 0 and meta["strategy"] == "b3" and meta["K"] == 4
        assert meta["source_epoch"] in (0, 1) and 0 <= meta["trained_apart"] < n
        assert meta["quality"]["theorem1_bound"] > 0 and meta["quality_previous"]["version"] == v - 1
        assert {"embed", "rank", "partition", "schedule"} <= set(meta["timings"])
    assert any(load_schedule(version_path(out / "schedules", v)).meta["trained_apart"] for v in versions[1:])
    stderr = refreshed_run["first"].stderr + refreshed_run["second"].stderr
    assert "swapped to schedule v1" in stderr and "under the same embeddings" in stderr
    status = json.loads((out / "refresh" / "status.json").read_text())
    assert status["state"] == "stopped" and status["refreshes"] >= 2


@pytest.mark.slow
def test_the_refreshed_schedule_comes_from_the_student_snapshot(mined, refreshed_run):
    """The miner's refresh from a snapshot (the code the spawned miner ran, here called directly on the
    finished run): its embeddings are the snapshot student's own embeddings of the data, not the teacher's,
    and its schedule differs from the static one."""
    from b3stream.data.reader import ShardedDataset
    from b3stream.encoder import Encoder
    from b3stream.mining.embed import load_embeddings
    from b3stream.refresh.miner import Miner

    out = refreshed_run["out"]
    RunPaths(out).finished.unlink()
    snap = latest_snapshot(out)
    path = Miner(out).refresh(snap)
    emb = load_embeddings(out / "refresh" / "mine")
    assert emb.record["source_step"] == snap.step
    assert emb.record["params"]["snapshot_weights"] == snap.weights_sha256
    ds = ShardedDataset(mined["data"], "train")
    # the ids to come (a mid-epoch snapshot's trained ids keep the rows of the miner's previous embedding)
    trained = np.load(snap.trained_ids) if snap.trained_ids else np.zeros(0, np.int64)
    assert (emb.record.get("kept") or {}).get("rows", 0) in (0, len(trained))
    ids = np.setdiff1d(np.arange(len(ds)), trained)[:12]
    texts = [ds.manifest.prompted(ds[int(i)], "positive") for i in ids]
    student = load_snapshot_encoder(snap).encode(texts, "positive")
    teacher = Encoder(EncoderConfig(**{**STUDENT, "lora": LoraConfig(enabled=False)})).encode(texts, "positive")
    stored = np.asarray(emb.positives[ids], dtype=np.float32)
    off_student, off_teacher = np.abs(stored - student).max(), np.abs(stored - teacher).max()
    assert off_student < 1e-3  # float16 storage
    assert off_teacher > 3e-3 and off_student < off_teacher / 3  # training moved them from the teacher's
    refreshed = load_schedule(path)
    assert refreshed.meta["source_step"] == snap.step
    assert not np.array_equal(load_schedule(mined["schedule"]).ids, refreshed.ids)


def test_the_ids_trained_before_a_snapshot_get_communities_of_their_own(mined, refreshed_run):
    """A mid-epoch snapshot carries the ids trained so far in its epoch, and the schedule mined from it never
    mixes them with untrained ids in one community: after the swap the trainer skips the trained ids, so the
    rest of the epoch meets whole communities instead of fragments."""
    out = refreshed_run["out"]
    trace = read_trace(out)
    checked = 0
    for v in list_versions(out / "schedules")[1:]:
        sched = load_schedule(version_path(out / "schedules", v))
        step = sched.meta["source_step"]
        snap = out / "snapshots" / f"step-{step:07d}"
        epoch = json.loads((snap / "snapshot.json").read_text())["epoch"]
        before = [i for t in trace[:step] if t["epoch"] == epoch for i in t["ids"]]
        if not before:  # a snapshot at an epoch's start: nothing trained yet, nothing written
            assert not (snap / "trained.npy").exists()
            continue
        assert sorted(np.load(snap / "trained.npy").tolist()) == sorted(before)
        trained = np.zeros(len(sched.ids), bool)
        trained[before] = True
        K = sched.meta["K"]
        offsets = sched.offsets
        for b in range(len(offsets) - 3):  # the last batches are the tail, where short communities sit
            batch = sched.ids[offsets[b]:offsets[b + 1]]
            for members in batch.reshape(-1, K):
                assert trained[members].all() or not trained[members].any(), (v, b, members, trained[members])
        checked += 1
    assert checked >= 1
    part = json.loads((out / "refresh" / "mine" / "partition" / "partition.json").read_text())
    assert any(name.endswith("(trained)") for name in part["groups"])  # the newest refresh had trained ids
    # ... and ranked them apart: the neighbour lists of the ids still to come point only at each other
    from b3stream.data.manifest import sha256_file

    rank_record = json.loads((out / "refresh" / "mine" / "rank" / "rank.json").read_text())
    assert any(name.endswith("(trained)") for name in rank_record["info"]["groups"])
    source = [f for f in (out / "snapshots").glob("step-*/trained.npy")
              if sha256_file(f)[:16] == rank_record["params"]["trained_ids"]]
    S = np.load(out / "refresh" / "mine" / "rank" / "S.npy")
    trained = np.zeros(len(S), bool)
    trained[np.load(source[0])] = True
    rows = S[~trained]
    assert (rows >= 0).any() and not trained[rows[rows >= 0]].any()


def test_batch_hardness_replays_the_batches_a_refreshed_run_trained(refreshed_run):
    """tools/batch_hardness.py rebuilds a run's batches from its schedules, seed and recorded swaps; it must
    reproduce the trainer's own trace, swaps and epochs included."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import batch_hardness

    out = refreshed_run["out"]
    trace = read_trace(out)
    replay = batch_hardness.trained_batches(out)
    assert len(replay) == len(trace) and len(refreshed_run["summary"]["swaps"]) >= 2
    assert all(sorted(b.tolist()) == sorted(t["ids"]) for b, t in zip(replay, trace))


@pytest.mark.slow
def test_two_ranks_swap_at_the_same_step(mined):
    # one epoch; max_lag_steps makes the first swap certain however slow the miner is on a loaded machine
    cfg = refreshed_config(mined, "run2", epochs=1, max_steps=16, deepspeed="zero2",
                           refresh={"every_steps": 4, "max_lag_steps": 8, "wait_timeout": 300})
    res = torchrun(2, ["-m", "b3stream.train", "--config", str(cfg)], free_port(), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = mined["root"] / "run2"
    rank0, rank1 = read_trace(out), [json.loads(line) for line in (out / "trace.rank1.jsonl").read_text().splitlines()]
    assert [(t["step"], t["version"], t["ids"]) for t in rank0] == [(t["step"], t["version"], t["ids"]) for t in rank1]
    assert len({t["version"] for t in rank0}) >= 2, "no swap happened"
    assert_exactly_once_per_epoch(rank0, Manifest.load(mined["data"]).split("train").n)
    assert json.loads((out / "summary.json").read_text())["ranks_in_sync"] is True


@pytest.mark.slow
def test_a_slow_miner_killed_twice_comes_back_and_lands_its_refreshes(mined):
    """A miner under pressure. A snapshot every step with the default keep (2): each refresh outlasts many
    snapshot intervals, so the snapshot it mines from would be pruned under it; the miner's lease keeps it.
    And the miner is SIGKILLed twice while it embeds: training goes on, the miner is restarted, its refreshes
    land (``max_lag_steps`` makes the trainer wait for them, so this does not hang on timing), and no partial
    schedule is ever read."""
    # within one epoch (25 steps): the first refresh is in use by step 9, one from a later snapshot by step 19
    cfg = refreshed_config(mined, "killed", refresh={"every_steps": 1, "keep": 2, "max_lag_steps": 8,
                                                     "wait_timeout": 120, "poll_seconds": 0.2})
    out = mined["root"] / "killed"
    status_file = RunPaths(out).status
    proc = subprocess.Popen([*B3, "train", "--config", str(cfg), "max_steps=24"], env=env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed: list[int] = []
    deadline = time.time() + 400
    try:
        while len(killed) < 2 and proc.poll() is None and time.time() < deadline:
            try:
                status = json.loads(status_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                status = {}
            pid = status.get("pid")
            if status.get("state") == "embed" and pid and pid not in killed:
                time.sleep(1.0 + len(killed))  # into the embedding, at a different point each time
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(killed) == 2, "the miner was not seen embedding twice"
    assert proc.returncode == 0, stderr[-4000:]
    assert stderr.count("miner exited with code -9; restarting it") == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["miner_restarts"] == 2
    trained_on = {t["version"] for t in read_trace(out)}
    assert len(trained_on - {0}) >= 2, (trained_on, stderr[-2000:])  # the restarted miner published, twice
    for v in list_versions(out / "schedules"):
        load_schedule(version_path(out / "schedules", v))  # verifies the checksum
    assert not list((out / "schedules").glob(".*tmp*"))
    assert "vanished" not in (out / "refresh" / "miner.log").read_text()
    assert len(list_snapshots(out)) <= 3  # pruning goes on: keep, and the one pinned when training ended
    assert not (out / "refresh" / "lease.json").exists()
    assert_exactly_once_per_epoch(read_trace(out), Manifest.load(mined["data"]).split("train").n)


# -- the miner on its own, on a refreshed run's folder ------------------------------------------------------


@pytest.mark.slow
def test_two_process_miner_embeds_like_the_snapshot(mined, refreshed_run, tmp_path):
    """`torchrun --nproc_per_node 2 -m b3stream refresh --once`: the two processes each embed half of the
    split with a new snapshot, rank 0 publishes; the embeddings equal the snapshot model's own."""
    from b3stream.data.reader import ShardedDataset
    from b3stream.mining.embed import load_embeddings

    out = refreshed_run["out"]
    RunPaths(out).finished.unlink(missing_ok=True)
    cfg, student = run_student(seed=7)
    before = max(list_versions(out / "schedules"))
    snap = write_snapshot(out, 9999, student.model, cfg, Manifest.load(mined["data"]).stamp("train"), keep=100)
    res = torchrun(2, ["-m", "b3stream", "refresh", str(out), "--once", "--quiet", "--nice", "0"],
                   free_port(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert max(list_versions(out / "schedules")) == before + 1
    emb = load_embeddings(out / "refresh" / "mine")
    assert emb.record["processes"] == 2 and emb.record["source_step"] == 9999
    ds = ShardedDataset(mined["data"], "train")
    rows = [0, 1, emb.n // 2 - 1, emb.n // 2, emb.n - 1]  # both processes' shares and their seam
    texts = [ds.manifest.prompted(ds[i], "positive") for i in rows]
    expected = load_snapshot_encoder(latest_snapshot(out)).encode(texts, "positive")
    np.testing.assert_allclose(np.asarray(emb.positives[rows], dtype=np.float32), expected, atol=1e-3)
    assert snap.name == "step-0009999"


@pytest.mark.slow
def test_mine_embed_on_two_processes_equals_one(mined, tmp_path):
    """`torchrun --nproc_per_node 2 -m b3stream mine embed` writes the embeddings one process wrote (the
    fixture's, same teacher and lengths)."""
    args = ["mine", "embed", "--data", str(mined["data"]), "--set",
            f"teacher.max_positive_length={STUDENT['max_positive_length']}", "--set",
            f"teacher.max_query_length={STUDENT['max_query_length']}", "--set", "teacher.lora.enabled=false", "--quiet"]
    two = torchrun(2, ["-m", "b3stream", *args, "--out", str(tmp_path / "two")], free_port(), timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = mined["root"] / "mine"
    assert json.loads((one / "embeddings" / "embeddings.json").read_text())["processes"] == 1
    for name in ("queries", "positives", "positive_keys", "tasks"):
        a = np.load(one / "embeddings" / f"{name}.npy").astype(np.float64)
        b = np.load(tmp_path / "two" / "embeddings" / f"{name}.npy").astype(np.float64)
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=name)  # float16: padding may move the last bit
    record = json.loads((tmp_path / "two" / "embeddings" / "embeddings.json").read_text())
    assert record["complete"] and record["processes"] == 2
    refused = torchrun(2, ["-m", "b3stream", "mine", "rank", "--data", str(mined["data"]), "--out",
                           str(tmp_path / "two")], free_port(), timeout=120)
    assert refused.returncode != 0 and "only the embed stage runs on several processes" in refused.stderr


@pytest.mark.slow
def test_a_resumed_refreshed_run_continues_the_epoch_on_its_swapped_schedule(mined, refreshed_run):
    """A refreshed run stopped after its first swaps and resumed: the resumed run starts on the schedule
    version it had swapped to, keeps the swap history, restarts the miner, and the epoch still trains
    every id exactly once."""
    before, after, out = refreshed_run["before"], refreshed_run["summary"], refreshed_run["out"]
    assert before["swaps"], f"no swap in the first {STOP} steps"
    assert before["steps"] == STOP and before["epoch"] == 1 and after["steps"] > STOP  # stopped mid-epoch
    second = refreshed_run["second"].stderr
    assert f"resuming at step {STOP}" in second and "miner started" in second
    assert after["swaps"][: len(before["swaps"])] == before["swaps"]
    trace = read_trace(out)
    assert [t["step"] for t in trace] == list(range(1, len(trace) + 1))
    assert trace[STOP]["version"] >= before["schedule_version"]
    assert_exactly_once_per_epoch(trace, Manifest.load(mined["data"]).split("train").n)


@pytest.mark.slow
def test_refreshed_mode_refuses_bad_settings_before_anything_is_written(mined, capsys):
    """Each refusal through the command's own entry point (``b3stream.cli.main``) in this process; one of them
    launched, for the exit code and stderr of the real command."""
    import logging

    import torch

    from b3stream.cli import main

    cfg = refreshed_config(mined, "bad")
    launched = run([*B3, "train", "--config", str(cfg), "refresh.every_steps=0"], threads=1, timeout=120)
    assert launched.returncode == 2, launched.stderr[-2000:]
    assert "every_steps" in launched.stderr and "Traceback" not in launched.stderr
    assert not (mined["root"] / "bad").exists()
    for override, named in (("refresh.mine={strategi: b3}", "strategi"), ("refresh.every_steps=0", "every_steps"),
                            ("refresh.model=oracle", "refresh.model"), ("mode=sometimes", "mode"),
                            ("refresh.max_lag_steps=-1", "max_lag_steps")):
        assert main(["train", "--config", str(cfg), override]) == 2, (override, capsys.readouterr().err[-2000:])
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (override, err[-2000:])
        assert not (mined["root"] / "bad").exists()
    # `b3stream refresh` sets its niceness, torch's threads and a log handler before it looks at the folder:
    # given as this process has them, and the handler taken off again
    logger = logging.getLogger("b3stream.mining")
    kept = (list(logger.handlers), logger.level, logger.propagate)
    try:
        code = main(["refresh", str(mined["root"] / "nowhere"), "--nice", "0", "--threads",
                     str(torch.get_num_threads())])
    finally:
        logger.handlers[:], logger.level, logger.propagate = kept
    assert code == 2 and "no miner configuration" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("model", ["student", "teacher"])
def test_max_lag_zero_trains_every_refresh_from_the_step_of_its_snapshot(mined, model):
    """refresh.max_lag_steps = 0 (synchronous): the trainer waits at each snapshot until the schedule mined
    from it is published, so every swap happens at its snapshot's own step, whatever the miner's speed; the
    ids are still trained exactly once. With ``refresh.model: teacher`` the embeddings carry no snapshot step,
    and the schedule must still say which snapshot it answers (else the trainer waits until its timeout)."""
    # two refreshes from the student; one from the teacher, whose point is which snapshot it answers
    every, steps = (8, 20) if model == "student" else (8, 12)
    cfg = refreshed_config(mined, f"sync-{model}", epochs=1, max_steps=steps,
                           refresh={"every_steps": every, "max_lag_steps": 0, "model": model, "wait_timeout": 300})
    res = run([*B3, "train", "--config", str(cfg)], threads=1, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = mined["root"] / f"sync-{model}"
    summary = json.loads((out / "summary.json").read_text())
    n = Manifest.load(mined["data"]).split("train").n
    snapshots = list(range(every, summary["steps"], every))  # no snapshot at the last step: training has ended
    assert len(snapshots) == (2 if model == "student" else 1)
    swaps = summary["swaps"]
    assert [s["step"] for s in swaps] == snapshots, swaps
    for s in swaps:
        meta = load_schedule(version_path(out / "schedules", s["to"])).meta
        assert meta["source_step"] == s["step"]
        assert meta["source_model"].startswith("student@" if model == "student" else "all-MiniLM")
    assert 0 < summary["refresh_wait_seconds"] < 250  # never the 300 s timeout
    assert "waiting for the schedule mined from the snapshot" in res.stderr
    assert_exactly_once_per_epoch(read_trace(out), n)


# -- right after every swap ---------------------------------------------------------------------------------


def test_refresh_with_the_teacher_embeds_with_the_teacher_that_mined_the_schedule(mined):
    from b3stream.config import TrainConfig, from_dict
    from b3stream.refresh.trainer import miner_config

    schedule = load_schedule(mined["schedule"])
    assert schedule.meta["teacher"]["lora"]["enabled"] is False and schedule.meta["teacher"]["max_query_length"] == 24
    student = {**STUDENT, "pooling": "cls", "max_query_length": 16}
    cfg = from_dict(TrainConfig, {"data": str(mined["data"]), "schedule": str(mined["schedule"]), "student": student,
                                  "mode": "refreshed", "refresh": {"every_steps": 4, "model": "teacher"}})
    mine = miner_config(cfg, schedule)
    assert mine.teacher.pooling == "mean" and mine.teacher.max_query_length == 24  # the teacher's, not the student's
    assert mine.partitioner == schedule.meta["partitioner"] == "metis"
    schedule.meta["partitioner"] = "kaminpar"  # the miner partitions as the running schedule was partitioned
    assert miner_config(cfg, schedule).partitioner == "kaminpar"
    del schedule.meta["teacher"]
    with pytest.raises(ConfigError, match="does not record one"):
        miner_config(cfg, schedule)
    with pytest.raises(ConfigError, match="does not divide over 3 ranks"):
        miner_config(cfg, load_schedule(mined["schedule"]), world_size=3)



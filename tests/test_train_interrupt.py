"""Ctrl-C (SIGINT) and SIGTERM during `b3stream train`: the step finishes, a checkpoint is written there, one
line is printed, the exit status is 130 / 143, and running the same command resumes, training every id of
each epoch exactly once over the two runs (b3stream/train/interrupt.py).

The runs are real (the bundled MiniLM with LoRA, DeepSpeed ZeRO-0 on gloo, one DataLoader worker) on 32
prepared toy pairs, 4 steps an epoch (two epochs: a resume crosses an epoch boundary), so a whole run takes
seconds on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from b3stream.train.interrupt import Interrupted, StopSignals

from ._train_util import REPO, env, random_schedule, read_trace, run, write_config
from .conftest import toy_rows, write_jsonl

B3 = [sys.executable, "-m", "b3stream"]
N = 32  # training pairs: 4 steps of |B| = 8 an epoch
STEPS = 2 * N // 8  # two epochs


def test_stop_signals_flag_the_first_signal_and_restore_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals() as caught:
        assert caught.signum == 0
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread: the handler has run on return
        assert caught.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_signal_takes_its_default_action_at_once():
    code = ("import os, signal, time\n"
            "from b3stream.train.interrupt import StopSignals\n"
            "with StopSignals() as s:\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    assert s.signum == signal.SIGINT\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    time.sleep(30)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == -signal.SIGINT, res.stderr


def test_interrupted_says_where_to_resume():
    e = Interrupted(signal.SIGTERM, 12, Path("RUN/checkpoints/step00000012"), True, {})
    assert e.code == 143 and Interrupted(signal.SIGINT, 1, Path("x"), True, {}).code == 130
    assert str(e) == ("stopped by SIGTERM at step 12; checkpoint written to RUN/checkpoints/step00000012; "
                      "run the same command to resume")
    assert "resume=true" in str(Interrupted(signal.SIGINT, 1, Path("x"), False, {}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """32 toy pairs, all in the train split, and a random schedule of |B| = 8 (K = 2)."""
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap

    root = tmp_path_factory.mktemp("interrupt")
    src = write_jsonl(root / "pairs.jsonl", toy_rows(N, tasks=1, groups=N))
    data = root / "data"
    prepare_file(str(src), "jsonl", str(data), FieldMap(query="q", positive="p", group="g"),
                 held_out={"validation": 0.0, "test": 0.0}, samples_per_shard=16, progress=False)
    sched = random_schedule(data, batch_size=8, K=2, folder=root / "schedules")
    return {"root": root, "data": data, "schedule": sched}


def _config(tiny, name: str, **extra) -> Path:
    return write_config(tiny["root"] / f"{name}.yaml", data=str(tiny["data"]), schedule=str(tiny["schedule"]),
                        out=str(tiny["root"] / name), epochs=2, trace_ids=True, seed=5, num_workers=1,
                        student={"max_query_length": 16, "max_positive_length": 24}, **extra)


def _steps_traced(run_dir: Path) -> int:
    path = run_dir / "trace.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _interrupt(args: list[str], run_dir: Path, sig: int, after_steps: int = 2, threads: int = 2
               ) -> subprocess.CompletedProcess:
    """Start ``args`` in a process group of its own and, once ``after_steps`` steps are traced, send ``sig`` to
    the whole group (as Ctrl-C in a terminal and a cluster's stop do: the DataLoader worker too)."""
    proc = subprocess.Popen(args, cwd=REPO, env=env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while _steps_traced(run_dir) < after_steps and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before the signal"
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _assert_stopped_cleanly(res, run_dir: Path, name: str, code: int | None) -> int:
    """Exit status ``code``, one line naming the signal, no traceback, a checkpoint (the latest) at the step the
    trace ends at, and a summary that does not claim the run completed. Returns that step. ``code`` None:
    under torchrun, whose own exit status and traceback (of the launcher, stopped by the signal) are not ours."""
    if code is not None:
        assert res.returncode == code, res.stderr[-4000:]
        assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr[-4000:]
    frames = [line for line in res.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "torch/distributed" not in f and "<frozen runpy>" not in f], res.stderr[-4000:]
    said = [line for line in res.stderr.splitlines() if name in line and "torch" not in line]  # not torchrun's
    trace = read_trace(run_dir)
    step = trace[-1]["step"]
    assert [t["step"] for t in trace] == list(range(1, step + 1))
    assert said == [f"b3stream train: stopped by {name} at step {step}; checkpoint written to "
                    f"{run_dir / 'checkpoints' / f'step{step:08d}'}; run the same command to resume"], res.stderr
    assert "trained" not in res.stdout  # no claim of a finished run
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{step:08d}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and summary["steps"] == step and summary["export"] == {}
    assert summary["stopped"] == {"signal": name, "step": step,
                                  "checkpoint": str(run_dir / "checkpoints" / f"step{step:08d}")}
    assert "after" not in summary["eval"]
    return step


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_the_same_command_resumes_each_id_once_per_epoch(tiny):
    cfg, run_dir = _config(tiny, "term"), tiny["root"] / "term"
    res = _interrupt([*B3, "train", "--config", str(cfg), "--quiet"], run_dir, signal.SIGTERM)
    step = _assert_stopped_cleanly(res, run_dir, "SIGTERM", 143)
    assert 2 <= step < STEPS

    again = run([*B3, "train", "--config", str(cfg), "--quiet"], threads=2)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"resuming at step {step}" in again.stderr
    trace = read_trace(run_dir)
    assert [t["step"] for t in trace] == list(range(1, STEPS + 1))
    for epoch in (0, 1):
        ids = [i for t in trace if t["epoch"] == epoch for i in t["ids"]]
        assert sorted(ids) == list(range(N)), f"epoch {epoch}: not every id exactly once"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is True and summary["stopped"] is None and summary["steps"] == STEPS


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130(tiny):
    cfg, run_dir = _config(tiny, "int"), tiny["root"] / "int"
    res = _interrupt([*B3, "train", "--config", str(cfg), "--quiet"], run_dir, signal.SIGINT, after_steps=1)
    assert _assert_stopped_cleanly(res, run_dir, "SIGINT", 130) < STEPS


@pytest.mark.slow
def test_two_ranks_under_torchrun_stop_at_the_same_step_and_resume(tiny):
    """SIGTERM to torchrun's process group (the launcher forwards it to each rank, which runs in a session of
    its own): both ranks stop after the same step, write their shares of a ZeRO-2 checkpoint there, rank 0
    prints the line; torchrun again resumes, and each epoch trains every id once."""
    from b3stream.dist import free_port

    cfg, run_dir = _config(tiny, "two", deepspeed="zero2"), tiny["root"] / "two"

    def torchrun() -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                "-m", "b3stream.train", "--config", str(cfg), "--quiet"]

    res = _interrupt(torchrun(), run_dir, signal.SIGTERM, threads=1)
    step = _assert_stopped_cleanly(res, run_dir, "SIGTERM", None)
    assert 2 <= step < STEPS
    assert [json.loads(line)["step"] for line in (run_dir / "trace.rank1.jsonl").read_text().splitlines()] == \
        list(range(1, step + 1))
    tag = run_dir / "checkpoints" / f"step{step:08d}"
    assert {p.name for p in tag.glob("*optim_states.pt")} == {
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}

    again = run(torchrun(), threads=1)
    assert again.returncode == 0, again.stderr[-4000:]
    trace = read_trace(run_dir)
    assert [t["step"] for t in trace] == list(range(1, STEPS + 1))
    assert [json.loads(line)["ids"] for line in (run_dir / "trace.rank1.jsonl").read_text().splitlines()] == \
        [t["ids"] for t in trace]
    for epoch in (0, 1):
        assert sorted(i for t in trace if t["epoch"] == epoch for i in t["ids"]) == list(range(N))

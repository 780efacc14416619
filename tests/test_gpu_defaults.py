"""Defaults for the GPU the trainer was built for, checked on the CPU: ZeRO 2 and 3 overlap their gradient
communication with the backward (and DeepSpeed takes that on CPU / gloo too, tested by the two-rank ZeRO
runs), and the DataLoader workers come from the cores per local rank unless ``num_workers`` is set."""

from __future__ import annotations

import json

import pytest

from b3stream.config import TrainConfig, validate
from b3stream.train.collate import MAX_WORKERS, auto_workers, loader_workers
from b3stream.train.ds_config import build_ds_config, resolve_ds_path


@pytest.mark.parametrize("name,overlap", [("zero0", None), ("zero1", None), ("zero2", True), ("zero3", True),
                                          ("zero2_offload", True)])
def test_zero2_and_3_overlap_their_communication(name, overlap):
    raw = json.loads(resolve_ds_path(name).read_text())
    assert raw["zero_optimization"].get("overlap_comm") is overlap
    ds = build_ds_config(TrainConfig(), resolve_ds_path(name), 2, 32, 10, "fp32")  # DeepSpeed's parser agrees
    assert ds["zero_optimization"].get("overlap_comm") is overlap


@pytest.mark.parametrize("cores,ranks,workers", [(2, 1, 1), (2, 2, 1), (1, 1, 1), (4, 1, 3), (16, 1, 8),
                                                 (16, 2, 7), (16, 8, 1), (128, 8, MAX_WORKERS)])
def test_auto_workers_from_the_cores_per_local_rank(cores, ranks, workers):
    assert auto_workers(cores, ranks) == workers


def test_num_workers_null_is_auto_and_a_number_wins(monkeypatch):
    import os

    validate(TrainConfig(num_workers=None))
    assert TrainConfig().num_workers is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert loader_workers(None) == 7 and loader_workers(0) == 0 and loader_workers(3) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert loader_workers(None) == 8


@pytest.mark.slow
def test_the_gpu_step_check_attributes_host_waits_and_runs_on_the_cpu(code_dataset, tmp_path):
    """tests/_gpu_step_check.py (run by the gpu-marked test on a CUDA machine): each host wait goes to the
    innermost package outside torch; on the CPU the script trains its steps without watching any."""
    import subprocess
    import sys
    import traceback

    from ._gpu_step_check import owner_of
    from ._train_util import REPO, env, random_schedule, write_config

    def frames(*paths):
        return [traceback.FrameSummary(p, 10, "f") for p in paths]

    site = "/x/site-packages"
    assert owner_of(frames(f"{REPO}/b3stream/train/loop.py", f"{site}/deepspeed/runtime/engine.py",
                           f"{site}/torch/nn/utils/clip_grad.py"))[0] == "deepspeed"
    assert owner_of(frames(f"{REPO}/b3stream/train/loop.py", f"{REPO}/b3stream/train/loss.py",
                           f"{site}/torch/functional.py", "/usr/lib/python3/warnings.py")) == \
        ("b3stream", "train/loss.py:10 f")
    sched = random_schedule(code_dataset, batch_size=8, K=2, h=1, folder=tmp_path / "schedules")
    config = write_config(tmp_path / "plain.yaml", data=str(code_dataset), schedule=str(sched), out=str(tmp_path / "run"),
                          max_steps=100, log_every=100, num_workers=0,
                          student={"max_query_length": 16, "max_positive_length": 16})
    out = tmp_path / "syncs.json"
    (tmp_path / "args.json").write_text(json.dumps({"out": str(out), "variants": {"plain": str(config)},
                                                    "warmup": 1, "steps": 1}))
    res = subprocess.run([sys.executable, "-m", "tests._gpu_step_check", str(tmp_path / "args.json")], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())["plain"]
    assert r.get("steps") == 2 and r["syncs"] == {} and r["precision"] == "fp32", r


def test_gpu_check_script_parses_and_asks_the_tools_only_for_options_they_have():
    """tools/gpu_check.sh (what a lent GPU machine runs; `bash tools/gpu_check.sh --dry-run` runs its CPU part
    here in about 4 minutes): bash accepts it, and every option it passes to a tool is one that tool takes, in
    the GPU run and in the dry run alike."""
    import re
    import subprocess
    import sys

    from ._train_util import REPO

    script = REPO / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    used: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.search(r"tools/(\w+)\.py(.*)", line)
        if m and not line.lstrip().startswith("#"):
            used.setdefault(m.group(1), set()).update(re.findall(r"\s(--[a-z][a-z-]*)", m.group(2)))
    assert set(used) == {"bench_train", "profile_train_gpu", "bench_refresh"}, used
    for tool, flags in used.items():
        res = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        missing = {f for f in flags if f not in res.stdout}
        assert not missing, (tool, missing)
    res = subprocess.run(["bash", str(script), "--no-such-option"], capture_output=True, text=True)
    assert res.returncode == 2 and "usage" in res.stderr

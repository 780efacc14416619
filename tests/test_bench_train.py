"""tools/bench_train.py end to end (tiny): the trainer (DeepSpeed, the bundled MiniLM) and a plain
sentence-transformers loop, each in a fresh process. GradCache's peak memory against |B| is a measurement,
not a test: `python tools/bench_train.py --full --grad-cache 64 --memory 64,256,1024 --no-compare`.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from ._train_util import REPO, run

BENCH = [sys.executable, str(REPO / "tools" / "bench_train.py")]


@pytest.mark.slow
def test_bench_train_tiny_reports_both_loops(code_dataset, tmp_path):
    out = tmp_path / "report.json"
    res = run([*BENCH, "--data", str(code_dataset), "--batch-size", "8", "--steps", "2", "--warmup", "1",
               "--max-query-length", "32", "--max-positive-length", "48", "--out", str(tmp_path / "work"),
               "--json", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["batch_size"] == 8 and report["config"]["lora"] is True
    for side in ("trainer", "st"):
        figures = report[side]
        assert figures["steps_timed"] == 2, side
        for key in ("examples_per_s", "wall_examples_per_s", "step_s", "data_s", "fwd_bwd_s", "optimizer_s",
                    "peak_rss_gb"):
            assert figures[key] is not None and figures[key] > 0, (side, key)
        # The split adds up to the step, and the rate is |B| over it.
        assert figures["data_s"] + figures["fwd_bwd_s"] + figures["optimizer_s"] == pytest.approx(
            figures["step_s"], rel=0.05)
        assert figures["examples_per_s"] == pytest.approx(8 / figures["step_s"], rel=0.3)
        assert (figures["peak_gpu_gb"] is None) == (not torch.cuda.is_available())  # measured where a GPU is
    assert report["ratio"] == pytest.approx(report["trainer"]["examples_per_s"] / report["st"]["examples_per_s"])
    table = res.stdout
    for label in ("examples/s (median step)", "fwd+bwd s", "optimizer s", "peak RSS GB", "trainer", "st-loop"):
        assert label in table

"""Two ranks on CPU (gloo) with real DeepSpeed engines: gradients, a ZeRO-2 LoRA run, refusals.

Each test launches ``torchrun --nproc_per_node 2`` in a subprocess on a free port, one thread per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from b3stream.data.manifest import Manifest
from b3stream.schedule import load_schedule
from b3stream.dist import free_port
from b3stream.train.sampler import ScheduleSampler

from ._train_util import REPO, random_schedule, read_trace, torchrun, write_config


@pytest.mark.slow
def test_gradients_match_one_process_and_gradcache_under_zero(tmp_path):
    """Per ZeRO stage: plain-loss gradients of the 2-rank gathered batch == one process holding the whole
    batch, and GradCache gradients == plain gradients (ZeRO 0-3), read with ``safe_get_full_grad``."""
    out = tmp_path / "grads.json"
    res = torchrun(2, [str(REPO / "tests" / "_ds_check.py"), str(out)], free_port(), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    for stage in (0, 1, 2, 3):
        scale = r[f"zero{stage}_grad_scale"]
        assert scale > 0
        assert r[f"zero{stage}_plain_vs_ref"] <= 1e-4 * scale, (stage, r)
        assert r[f"zero{stage}_chunkNone_loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
        # GradCache under every stage (ZeRO-3 gathers the parameters again for each recomputed chunk)
        assert r[f"zero{stage}_cached_vs_plain"] <= 1e-4 * scale, (stage, r)
        assert r[f"zero{stage}_chunk2_loss"] == pytest.approx(r["ref_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_rank_zero2_lora_training(tmp_path, code_dataset):
    """torchrun, 2 ranks, ZeRO-2, LoRA, B3++-style hard negatives, GradCache, distributed evaluation:
    both ranks end with identical weights, the ids follow the schedule, and the processes exit cleanly."""
    sched = random_schedule(code_dataset, batch_size=16, K=4, h=2, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), deepspeed="zero2", max_steps=3, trace_ids=True,
                       grad_cache_chunk=4, eval_split="test", eval_max_queries=16, num_workers=1,
                       # the test split's own corpus (a few hundred documents, not every split's ~1,200) and
                       # short texts: the evaluation is still split over both ranks, before and after
                       eval_corpus="split", student={"max_query_length": 16, "max_positive_length": 32})
    res = torchrun(2, ["-m", "b3stream.train", "--config", str(cfg)], free_port(), timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "terminate called" not in res.stderr
    assert "2 rank(s)" in res.stderr and "ZeRO-2" in res.stderr and "whole communities per rank" in res.stderr

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2
    assert summary["ranks_in_sync"] is True
    assert set(summary["eval"]) == {"before", "after"}

    n = Manifest.load(code_dataset).split("train").n
    sampler = ScheduleSampler(load_schedule(sched), n, seed=0)
    assert [t["ids"] for t in read_trace(tmp_path / "run")] == [sampler.global_batch(i).tolist() for i in range(3)]

    # The adapter moved away from its initialisation (LoRA B starts at zero).
    ckpt = tmp_path / "run" / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    lora_b = [v for k, v in states["module"].items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0
    assert states["sampler"]["position"] == 3


@pytest.mark.slow
def test_batch_not_divisible_by_world_is_refused(tmp_path, code_dataset):
    sched = random_schedule(code_dataset, batch_size=7, K=7, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched),
                       out=str(tmp_path / "run"))
    res = torchrun(2, ["-m", "b3stream.train", "--config", str(cfg)], free_port(), timeout=120)
    assert res.returncode != 0
    assert "|B|=7, which does not divide over 2 ranks" in res.stderr
    assert "Loading weights" not in res.stderr and "step 1/" not in res.stderr


@pytest.mark.slow
def test_deepspeed_launcher(tmp_path, code_dataset):
    """`deepspeed --module b3stream.train ... --deepspeed ds_configs/zero2.json` (one CPU process)."""
    from ._train_util import run

    launcher = str(Path(sys.executable).parent / "deepspeed")  # installed with the deepspeed package
    sched = random_schedule(code_dataset, batch_size=8, K=2, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched),
                       out=str(tmp_path / "run"), max_steps=1,
                       student={"max_query_length": 16, "max_positive_length": 16})
    res = run([sys.executable, launcher, "--master_port", str(free_port()), "--module", "b3stream.train",
               "--config", str(cfg), "--deepspeed", "ds_configs/zero2.json"], threads=2, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["zero_stage"] == 2 and summary["steps"] == 1

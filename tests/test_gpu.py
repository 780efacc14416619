"""What only a GPU can show (marker ``gpu``; skipped where torch sees no CUDA device). Run on a GPU machine:

    .venv/bin/python -m pytest -q -m gpu tests

bf16 training through DeepSpeed on CUDA, one fused forward for all sides against separate ones, the
training step's embedding + loss + backward without a host sync, whole training steps of the real trainer
(the batch's copy, the forward - plain, GradCache, fused sides -, the loss, ``engine.backward``,
``engine.step()`` under ZeRO-0 and ZeRO-2, the monitor, the work between steps) with no host wait of
b3stream's own, a refreshed run whose miner shares the GPU and whose swaps land at their snapshots' steps,
and exact ranking with torch on the GPU against FAISS's flat index on the CPU. ``tools/gpu_check.sh`` runs
them (and the benchmarks) on a lent GPU machine.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from b3stream.config import EncoderConfig, LoraConfig

from ._mining_synth import clustered
from ._train_util import REPO, env, random_schedule, read_trace, run, write_config

pytestmark = pytest.mark.gpu
B3 = [sys.executable, "-m", "b3stream"]
TEXTS = ["open a file and read its lines", "def read(path):\n    return open(path).read()",
         "parse a date string", "def parse(s):\n    return datetime.fromisoformat(s)"]


def test_bf16_training_on_cuda(code_dataset, tmp_path):
    """`b3stream train` on the GPU: bf16 by default (precision auto), a finite loss every step."""
    sched = random_schedule(code_dataset, batch_size=16, K=4, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), max_steps=4, trace_ids=True)
    res = run([*B3, "train", "--config", str(cfg)], threads=2, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 4
    assert all(np.isfinite(t["loss"]) for t in read_trace(tmp_path / "run"))


def _encoder():
    from b3stream.encoder import Encoder

    return Encoder(EncoderConfig(max_query_length=16, max_positive_length=48, lora=LoraConfig(enabled=False)),
                   trainable=False, device="cuda")


def _batch(encoder):
    return {side: {k: v.cuda() for k, v in encoder.tokenize(TEXTS, side).items()}
            for side in ("query", "positive", "negative")}


def test_one_fused_forward_equals_separate_forwards():
    from b3stream.train.loss import BatchEmbedder

    encoder = _encoder()
    batch = _batch(encoder)
    with torch.no_grad():
        fused = BatchEmbedder(encoder, fuse_sides=True, pad_id=encoder.tokenizer.pad_token_id)(batch)
        apart = BatchEmbedder(encoder, fuse_sides=False)(batch)
    for side in batch:
        torch.testing.assert_close(fused[side], apart[side], atol=1e-4, rtol=1e-4)


def test_the_step_does_not_wait_for_the_gpu():
    """Embedding, InfoNCE with host-known sizes and the backward run with CUDA's sync debug mode set to error:
    any operation that makes the host wait for the GPU (``.item()``, a boolean index, a copy to the host)
    raises instead of passing unseen."""
    from b3stream.data.dedup import content_keys
    from b3stream.encoder import Encoder
    from b3stream.train.loss import BatchEmbedder, InfoNCE

    encoder = Encoder(EncoderConfig(max_query_length=16, max_positive_length=48, lora=LoraConfig(r=4, alpha=8)),
                      trainable=True, device="cuda")
    batch = _batch(encoder)
    keys = {side: torch.from_numpy(content_keys(TEXTS)).cuda() for side in ("positive", "negative")}
    model, loss_fn = BatchEmbedder(encoder), InfoNCE(temperature=0.05)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        emb = model(batch)
        out = loss_fn(emb["query"], emb["positive"], emb["negative"], keys["positive"], keys["negative"],
                      sizes=[len(TEXTS)], negative_sizes=[len(TEXTS)])
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


def test_torch_ranking_on_the_gpu_matches_faiss_flat_on_the_cpu(monkeypatch):
    from pathlib import Path

    from b3stream.mining.embed import Embeddings
    from b3stream.mining.rank import RankParams, choose_index, rank

    q, p, _ = clustered(3000, clusters=40, seed=0)
    emb = Embeddings(queries=q.astype(np.float16), positives=p.astype(np.float16),
                     tasks=np.zeros(3000, np.int32), task_names=["t"], stamp={}, record={}, folder=Path("memory"))
    assert choose_index(3000, RankParams(p=2, m=20, index="flat"), faiss_gpu=False) == "torch"
    S_gpu, scores_gpu, _, info = rank(emb, RankParams(p=2, m=20, index="torch"), progress=False)
    import b3stream.mining.rank as rank_module

    monkeypatch.setattr(rank_module, "torch_cuda_available", lambda: False)  # the CPU path: FAISS flat
    S_cpu, scores_cpu, _, _ = rank(emb, RankParams(p=2, m=20, index="flat"), progress=False)
    same = np.mean([len(set(a) & set(b)) / len(set(b)) for a, b in zip(S_gpu, S_cpu)])
    assert same > 0.99  # ties at the list's end may order differently
    np.testing.assert_allclose(np.sort(scores_gpu.astype(np.float32), 1), np.sort(scores_cpu.astype(np.float32), 1),
                               atol=2e-3)


# -- whole training steps: no host wait of b3stream's own -------------------------------------------------------

STEP_VARIANTS = {  # name -> config overrides
    "plain": {"fuse_sides": False},
    "gradcache": {"grad_cache_chunk": 4},
    "fused": {"fuse_sides": True},
    "zero2": {"fuse_sides": False, "deepspeed": "zero2"},  # overlap_comm: the reduction on its own stream
}


def test_whole_training_steps_do_not_wait_for_the_gpu(code_dataset, tmp_path):
    """The real trainer, one process per machine, bf16, B3++-style hard negatives: after 3 warm-up steps, 3
    steps under CUDA's sync debug mode (tests/_gpu_step_check.py), from the loader's pinned batch through
    ``engine.step()`` and the work between steps, on steps that do not log. No host wait comes from
    b3stream's code or the model's forward; DeepSpeed's own (inside ``engine.step()``, if any) are listed in
    the output, not failed: they are DeepSpeed's to remove."""
    import subprocess

    sched = random_schedule(code_dataset, batch_size=16, K=4, h=2, folder=tmp_path / "schedules")
    variants = {}
    for name, extra in STEP_VARIANTS.items():
        variants[name] = str(write_config(tmp_path / f"{name}.yaml", data=str(code_dataset), schedule=str(sched),
                                          out=str(tmp_path / f"run-{name}"), max_steps=1000, log_every=1000,
                                          num_workers=1, **extra))
    out = tmp_path / "syncs.json"
    (tmp_path / "args.json").write_text(json.dumps({"out": str(out), "variants": variants, "warmup": 3, "steps": 3}))
    res = subprocess.run([sys.executable, "-m", "tests._gpu_step_check", str(tmp_path / "args.json")], cwd=REPO,
                         env=env(threads=2), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and out.is_file(), res.stderr[-3000:]
    results = json.loads(out.read_text())
    print(json.dumps({k: {"syncs": v.get("syncs"), "where": v.get("where")} for k, v in results.items()}, indent=1))
    for name, r in results.items():
        assert "error" not in r, (name, r.get("traceback"))
        assert r["steps"] == 6 and r["precision"] == "bf16", (name, r)
        ours = {k: v for k, v in r["syncs"].items() if k not in ("deepspeed", "torch")}
        assert ours == {}, (name, ours, {k: r["where"][k] for k in ours})
    assert results["fused"]["fuse"] is True and results["gradcache"]["chunk"] == 4 and results["zero2"]["stage"] == 2


# -- refreshed mode on the GPU --------------------------------------------------------------------------------


def test_a_refreshed_run_with_the_miner_on_the_trainers_gpu_swaps_at_its_snapshots(code_dataset, tmp_path):
    """One GPU: refresh.device cuda shares it with the trainer (the default would put the miner on the CPU);
    with max_lag_steps 0 every refresh is swapped in at the step of its snapshot, every id trained once in
    the epoch, and the miner ran on the GPU (its CUDA_VISIBLE_DEVICES is the trainer's GPU)."""
    from b3stream.data.manifest import Manifest

    sched = random_schedule(code_dataset, batch_size=16, K=4, folder=tmp_path / "schedules")
    n = Manifest.load(code_dataset).split("train").n
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), epochs=1, max_steps=12, trace_ids=True, num_workers=1,
                       mode="refreshed", refresh={"every_steps": 4, "device": "cuda", "max_lag_steps": 0,
                                                  "poll_seconds": 0.2, "wait_timeout": 240})
    res = run([*B3, "train", "--config", str(cfg)], threads=2, timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "miner started" in res.stderr and "on GPU 0" in res.stderr, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["precision"] == "bf16"
    swaps = summary["swaps"]
    assert [s["step"] for s in swaps] == [4, 8], swaps  # step 12 is the last: no swap after it
    trace = read_trace(tmp_path / "run")
    ids = [i for t in trace for i in t["ids"]]
    assert len(ids) == len(set(ids)) and len(ids) <= n  # each id at most once within the epoch
    assert [t["version"] for t in trace] == [0] * 4 + [1] * 4 + [2] * 4
    log = (tmp_path / "run" / "refresh" / "miner.log").read_text()
    assert "device cuda" in log, log[-2000:]

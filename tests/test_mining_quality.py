"""quality.py: the Theorem-1 bound and in-batch negative similarity; b3 beats random on real code data."""

from __future__ import annotations

import numpy as np
import pytest

from b3stream.config import MineConfig
from b3stream.mining.pipeline import run_all, schedule_stage
from b3stream.mining.quality import batch_quality
from b3stream.schedule import load_schedule

from ._mining_synth import clustered


def lse(x):
    m = x.max()
    return m + np.log(np.exp(x - m).sum())


def test_bound_matches_brute_force():
    q, p, _ = clustered(150, d=16, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.permutation(150)
    offsets = np.array([0, 40, 80, 120, 150])
    negatives = rng.integers(0, 150, size=(150, 2))
    tau, K = 0.1, 5
    for negs in (None, negatives):
        got = batch_quality(ids, offsets, q, p, K, temperature=tau, negatives=negs, sample=None)
        sims = q @ p.T
        bounds, means, maxes = [], [], []
        for b in range(4):
            members = ids[offsets[b] : offsets[b + 1]]
            cand = members if negs is None else np.unique(np.concatenate([members, negs[offsets[b] : offsets[b + 1]].ravel()]))
            for i in members:
                others = np.delete(sims[i], i)
                h_all = lse(np.sort(others)[-K:] / tau)
                inb = sims[i, cand[cand != i]]
                h_b = lse(np.sort(inb)[-K:] / tau)
                bounds.append(np.log(150 / K) + h_all - h_b)
                means.append(inb.mean())
                maxes.append(inb.max())
        assert got["theorem1_bound"] == pytest.approx(np.mean(bounds), rel=1e-4)
        assert got["neg_sim_mean"] == pytest.approx(np.mean(means), rel=1e-4)
        assert got["neg_sim_hardest_mean"] == pytest.approx(np.mean(maxes), rel=1e-4)
        assert got["neg_sim_max"] == pytest.approx(np.max(maxes), rel=1e-4)
        assert got["theorem1_bound"] >= got["theorem1_floor"]


def test_sampled_estimate_is_close_and_memory_is_chunked():
    q, p, _ = clustered(3000, d=16, seed=1)
    ids = np.random.default_rng(0).permutation(3000)
    offsets = np.arange(0, 3001, 100)
    full = batch_quality(ids, offsets, q, p, 8, sample=None)
    part = batch_quality(ids, offsets, q, p, 8, sample=1000, seed=3)
    assert part["queries"] == 1000
    assert part["theorem1_bound"] == pytest.approx(full["theorem1_bound"], rel=0.05)


@pytest.fixture(scope="module")
def code_mined(code_dataset, tmp_path_factory):
    """The code-search fixture mined once with the real MiniLM teacher (short max lengths for speed)."""
    out = tmp_path_factory.mktemp("code_mine")
    cfg = MineConfig(data=str(code_dataset), out=str(out), strategy="b3", p=2, m=30, K=8, batch_size=64, h=2,
                     quality_sample=None)
    cfg.teacher.max_query_length = 32
    cfg.teacher.max_positive_length = 64
    run_all(cfg, progress=False)
    return cfg


def test_b3_beats_random_and_task_on_code_search(code_mined):
    quality = {}
    for version, name in enumerate(["random", "task", "gcbs", "b3", "b3pp"], start=1):
        cfg = MineConfig(**{**code_mined.__dict__, "strategy": name, "version": version})
        quality[name] = load_schedule(schedule_stage(cfg, progress=False)).meta["quality"]
    for good in ("b3", "b3pp"):
        for base in ("random", "task"):
            assert quality[good]["theorem1_bound"] < quality[base]["theorem1_bound"], (good, base, quality)
            assert quality[good]["neg_sim_mean"] > quality[base]["neg_sim_mean"], (good, base, quality)
            assert quality[good]["neg_sim_hardest_mean"] > quality[base]["neg_sim_hardest_mean"]
    assert quality["b3pp"]["theorem1_bound"] < quality["b3"]["theorem1_bound"]

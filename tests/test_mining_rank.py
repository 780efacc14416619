"""rank.py: FAISS top-(p+m) -> S and the skipped top-p T, own positive removed, per task, margin, padding,
bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from b3stream.config import ConfigError, MineConfig
from b3stream.data.manifest import DataError
from b3stream.mining.embed import Embeddings, check_vectors
from b3stream.mining.pipeline import embed_stage, rank_stage
from b3stream.mining.rank import RankParams, rank, rank_group, select_ranks

from ._mining_synth import clustered


def brute_S(q, p, pp, m):
    sims = q @ p.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")
    return order[:, pp : pp + m]


def test_flat_matches_brute_force_and_skips_own_positive():
    q, p, _ = clustered(300, seed=1)
    S, scores, T, info = rank_group(q, p, RankParams(p=5, m=20, index="flat"))
    ref = brute_S(q, p, 5, 20)
    assert S.shape == (300, 20) and info["kind"] == "flat"
    assert np.mean([len(np.intersect1d(a, b)) / 20 for a, b in zip(S, ref)]) > 0.98  # float ties aside
    assert not (S == np.arange(300)[:, None]).any()
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "rank order kept"
    np.testing.assert_allclose(scores[:, 0], np.take_along_axis(q @ p.T, S[:, :1], 1)[:, 0], atol=1e-5)


def test_top_p_holds_ranks_0_to_p_without_the_own_positive():
    q, p, _ = clustered(300, seed=1)
    S, _, T, _ = rank_group(q, p, RankParams(p=5, m=20, index="flat"))
    ref = brute_S(q, p, 0, 5)  # ranks [0, p) with the own positive removed
    assert T.shape == (300, 5) and T.dtype == np.int32 and np.all(T >= 0)
    assert np.mean([len(np.intersect1d(a, b)) / 5 for a, b in zip(T, ref)]) > 0.98  # float ties aside
    assert not (T == np.arange(300)[:, None]).any()
    assert not any(np.intersect1d(t, s).size for t, s in zip(T, S)), "T and S are disjoint rank ranges"
    sims = q @ p.T
    t_sc, s_sc = np.take_along_axis(sims, T, 1), np.take_along_axis(sims, S, 1)
    assert np.all(np.diff(t_sc, axis=1) <= 1e-6) and np.all(t_sc[:, -1] >= s_sc[:, 0] - 1e-6), "rank order"
    _, _, T0, _ = rank_group(q, p, RankParams(p=0, m=20, index="flat"))
    assert T0.shape == (300, 0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_report_recall(kind):
    q, p, _ = clustered(3000, d=32, clusters=30, seed=2)
    S, _, _, info = rank_group(q, p, RankParams(p=3, m=20, index=kind, recall_sample=200, ivf_nprobe=16))
    assert info["kind"] == kind and 0.5 < info["recall"] <= 1.0 and info["recall_sample"] == 200
    valid = S >= 0
    assert valid.mean() > 0.99 and not (S == np.arange(3000)[:, None]).any()


def test_auto_picks_flat_below_threshold_and_ivf_above():
    q, p, _ = clustered(2000, d=16, seed=3)
    assert rank_group(q, p, RankParams(p=1, m=5, exact_threshold=5000))[3]["kind"] == "flat"
    assert rank_group(q, p, RankParams(p=1, m=5, exact_threshold=1000, recall_sample=50))[3]["kind"] == "ivf"


def embeddings(n=600, tasks=3, seed=4) -> Embeddings:
    q, p, _ = clustered(n, seed=seed)
    t = (np.arange(n) * 7 % tasks).astype(np.int32)
    return Embeddings(queries=q.astype(np.float16), positives=p.astype(np.float16), tasks=t,
                      task_names=[f"t{i}" for i in range(tasks)], stamp={}, record={}, folder=Path("memory"))


def test_per_task_neighbours_stay_in_task_with_global_ids():
    emb = embeddings()
    S, _, T, info = rank(emb, RankParams(p=2, m=10, index="flat"), progress=False)
    assert set(info["groups"]) == {"t0", "t1", "t2"}
    assert np.all(S >= 0)
    assert np.all(emb.tasks[S] == emb.tasks[:, None])
    assert not (S == np.arange(600)[:, None]).any()
    assert T.shape == (600, 2) and np.all(T >= 0) and np.all(emb.tasks[T] == emb.tasks[:, None])
    assert not (T == np.arange(600)[:, None]).any()
    S_all, _, _, _ = rank(emb, RankParams(p=2, m=10, index="flat", per_task=False), progress=False)
    assert (emb.tasks[S_all] != emb.tasks[:, None]).any()


def test_trained_ids_are_ranked_apart_from_the_rest():
    """Refreshed mode's mid-epoch snapshot: an untrained query's ranks [p, p+m) come from the untrained
    positives only, so its neighbour list stays full (ranked among all ids, the entries pointing at trained
    ids would be lost to the partition); a part too small for p + m gets padded rows, not an error."""
    emb = embeddings(n=600, tasks=1)
    trained = np.zeros(600, bool)
    trained[np.random.default_rng(0).choice(600, 360, replace=False)] = True
    S, _, T, info = rank(emb, RankParams(p=2, m=10, index="flat"), progress=False, trained=trained)
    assert set(info["groups"]) == {"t0", "t0 (trained)"}
    assert np.all(S >= 0) and np.all(T >= 0)
    assert np.all(trained[S] == trained[:, None]) and np.all(trained[T] == trained[:, None])
    before, _, _, _ = rank(emb, RankParams(p=2, m=10, index="flat"), progress=False)
    assert (trained[before[~trained]]).mean() > 0.3  # what ranking among all ids would have spent on them
    few = np.ones(600, bool)
    few[:8] = False  # 8 untrained ids: 7 candidates each, fewer than p + m
    S, _, _, _ = rank(emb, RankParams(p=2, m=10, index="flat"), progress=False, trained=few)
    assert np.all((S[:8] >= 0).sum(1) == 5) and np.all(S[:8][S[:8] >= 0] < 8)


def test_p_plus_m_must_fit_in_every_task():
    emb = embeddings(n=300, tasks=3)  # 100 per task
    with pytest.raises(ConfigError, match=r"task 't0' has only 100 examples"):
        rank(emb, RankParams(p=30, m=70), progress=False)
    rank(emb, RankParams(p=30, m=69), progress=False)  # 99 others: fits exactly


def test_margin_filter_and_padding():
    I = np.array([[0, 5, 6, 7, 8], [9, 3, -1, -1, -1]])
    D = np.array([[1.0, 0.9, 0.8, 0.5, 0.4], [0.9, 0.7, 0, 0, 0]], dtype=np.float32)
    S, sc, T = select_ranks(I, D, own=np.array([0, 1]), p=1, m=3)
    assert S.tolist() == [[6, 7, 8], [3, -1, -1]]
    assert sc[1].tolist() == [pytest.approx(0.7), 0, 0]
    assert T.tolist() == [[5], [9]], "rank 0 after the own positive is removed"
    _, _, T = select_ranks(I, D, own=np.array([0, 1]), p=4, m=1)
    assert T.tolist() == [[5, 6, 7, 8], [9, 3, -1, -1]], "short rows padded with -1"
    S, _, T = select_ranks(I, D, own=np.array([0, 1]), p=0, m=3, margin=0.95,
                        positive_scores=np.array([0.9, 0.8], dtype=np.float32))
    # row 0: ranks [0, 3) are 5, 6, 7; 5 scores 0.9 > 0.855 and is dropped, the row is padded (8 was never
    # among the p+m candidates); row 1: 9 scores 0.9 > 0.76 but is its own positive anyway
    assert S.tolist() == [[6, 7, -1], [3, -1, -1]]
    assert T.shape == (2, 0)


@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_nan_and_zero_norm_embeddings_are_refused_without_output(tmp_path, bad):
    q, p, _ = clustered(200, seed=5)
    if bad == "nan":
        p[17, 3] = np.nan
    else:
        p[17] = 0
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    cfg = MineConfig(query_embeddings=str(tmp_path / "q.npy"), positive_embeddings=str(tmp_path / "p.npy"),
                     out=str(tmp_path / "out"), p=2, m=10)
    with pytest.raises(DataError, match="row 17"):
        embed_stage(cfg, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="row 17 contains NaN" if bad == "nan" else "row 17 has zero norm"):
        check_vectors(p, "positives")


def test_bring_your_own_embeddings_without_data(tmp_path):
    q, p, _ = clustered(200, seed=6)
    np.save(tmp_path / "q.npy", q * 3.0)  # not normalised: normalised on import
    np.save(tmp_path / "p.npy", p)
    cfg = MineConfig(query_embeddings=str(tmp_path / "q.npy"), positive_embeddings=str(tmp_path / "p.npy"),
                     out=str(tmp_path / "out"), p=2, m=10)
    folder = embed_stage(cfg, progress=False)
    Q = np.load(folder / "queries.npy")
    assert Q.dtype == np.float16 and np.allclose(np.linalg.norm(Q.astype(np.float32), axis=1), 1, atol=1e-3)
    rank_stage(cfg, progress=False)
    S = np.load(tmp_path / "out" / "rank" / "S.npy")
    assert S.shape == (200, 10) and S.dtype == np.int32
    T = np.load(tmp_path / "out" / "rank" / "top.npy")
    assert T.shape == (200, 2) and T.dtype == np.int32 and not (T == np.arange(200)[:, None]).any()
    record = json.loads((tmp_path / "out" / "rank" / "rank.json").read_text())
    assert record["top"] == {"file": "top.npy", "p": 2, "shape": [200, 2]}
    np.save(tmp_path / "p2.npy", p[:150])
    with pytest.raises(DataError, match="same shape"):
        embed_stage(MineConfig(query_embeddings=str(tmp_path / "q.npy"), positive_embeddings=str(tmp_path / "p2.npy"),
                               out=str(tmp_path / "out2")), progress=False)


def test_small_tasks_error_or_merge():
    from b3stream.mining.rank import SMALL_TASKS, task_groups

    q, p, _ = clustered(208, seed=7)
    t = np.repeat(np.array([0, 1, 2, 3], dtype=np.int32), [100, 95, 8, 5])
    emb = Embeddings(queries=q.astype(np.float16), positives=p.astype(np.float16), tasks=t,
                     task_names=["big", "big2", "tiny", "tinier"], stamp={}, record={}, folder=Path("memory"))
    with pytest.raises(ConfigError, match="task 'tiny' has only 8 examples.*small_tasks: merge"):
        rank(emb, RankParams(p=2, m=8), progress=False)
    S, _, _, info = rank(emb, RankParams(p=2, m=8, small_tasks="merge"), progress=False)
    assert list(info["groups"]) == ["big", "big2", SMALL_TASKS]
    small = t >= 2
    assert np.all(small[S[small]]) and not small[S[~small]].any()
    # the small tasks together (13) are still too small for p+m = 13: the smallest big task joins them
    S, _, _, info = rank(emb, RankParams(p=2, m=11, small_tasks="merge"), progress=False)
    assert list(info["groups"]) == ["big", SMALL_TASKS] and info["groups"][SMALL_TASKS]["n"] == 108
    assert [n for n, _ in task_groups(t, emb.task_names, True, merge_below=11)] == ["big", "big2", SMALL_TASKS]
    with pytest.raises(ConfigError, match="the small tasks together have only 208"):
        rank(emb, RankParams(p=200, m=8, small_tasks="merge"), progress=False)


def test_b3pp_refuses_rank_output_without_top_p_and_run_all_rebuilds_it(tmp_path):
    from b3stream.mining.pipeline import partition_stage, run_all, schedule_stage

    q, p, _ = clustered(200, seed=8)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    cfg = MineConfig(query_embeddings=str(tmp_path / "q.npy"), positive_embeddings=str(tmp_path / "p.npy"),
                     out=str(tmp_path / "out"), p=2, m=10, K=4, batch_size=16, h=1, strategy="b3pp",
                     quality_sample=0)
    embed_stage(cfg, progress=False)
    rank_stage(cfg, progress=False)
    partition_stage(cfg, progress=False)
    schedule_stage(cfg, progress=False)
    rank_json = tmp_path / "out" / "rank" / "rank.json"
    record = json.loads(rank_json.read_text())
    del record["top"]  # as written before T was kept
    rank_json.write_text(json.dumps(record))
    (tmp_path / "out" / "rank" / "top.npy").unlink()
    with pytest.raises(DataError, match="no top-p lists.*re-run `b3stream mine rank`"):
        schedule_stage(cfg, progress=False)
    schedule_stage(replace(cfg, strategy="b3"), progress=False)  # b3 does not need T
    run_all(cfg, progress=False)
    assert (tmp_path / "out" / "rank" / "top.npy").is_file()
    assert json.loads(rank_json.read_text())["top"]["shape"] == [200, 2]

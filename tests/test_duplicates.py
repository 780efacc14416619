"""Same-text positives are never negatives: ranking (S and T), B3++ pools, the InfoNCE logits, and the
content keys the embed stage writes. Also per-task p and m (``task_params``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from b3stream.config import ConfigError, MineConfig
from b3stream.data.dedup import content_key, content_keys
from b3stream.mining.embed import Embeddings
from b3stream.mining.negatives import draw_hard_negatives
from b3stream.mining.rank import RankParams, rank, rank_group
from b3stream.train.loss import InfoNCE

from ._mining_synth import clustered, random_S
from .conftest import write_jsonl


def duplicated(n=300, every=6, seed=3):
    """Clustered pairs where ids 0..every-1, every..2*every-1, ... of the first half share one positive text
    (identical vectors, identical keys), like class labels or boilerplate answers."""
    q, p, _ = clustered(n, seed=seed)
    keys = np.arange(n, dtype=np.int64) * 7919
    for start in range(0, n // 2, every):
        p[start : start + every] = p[start]
        keys[start : start + every] = keys[start]
    return q, p, keys


def same_key_entries(S, keys):
    rows = np.repeat(np.arange(len(S)), S.shape[1])
    cols = S.ravel()
    valid = cols >= 0
    return int((keys[cols[valid]] == keys[rows[valid]]).sum())


def test_rank_drops_every_same_text_positive_from_S_and_T():
    q, p, keys = duplicated()
    S_plain, _, T_plain, _ = rank_group(q, p, RankParams(p=2, m=20, index="flat"))
    # Without keys the duplicates (scored like the own positive) fill T and spill into S: the bug.
    assert same_key_entries(S_plain, keys) > 0
    S, scores, T, info = rank_group(q, p, RankParams(p=2, m=20, index="flat"), keys=keys)
    assert same_key_entries(S, keys) == 0 and same_key_entries(T, keys) == 0
    assert info["duplicate_depth"] == 5  # searched 5 deeper: rows stay full
    assert (S >= 0).all() and (T >= 0).all()
    # Rows without duplicates are unchanged.
    alone = np.arange(150, 300)
    np.testing.assert_array_equal(S[alone], S_plain[alone])


def test_per_task_p_and_m():
    q, p, _ = clustered(600, seed=4)
    t = (np.arange(600) * 7 % 3).astype(np.int32)
    emb = Embeddings(queries=q.astype(np.float16), positives=p.astype(np.float16), tasks=t,
                     task_names=["t0", "t1", "t2"], stamp={}, record={}, folder=Path("memory"))
    S, _, T, info = rank(emb, RankParams(p=2, m=10, index="flat", task_params={"t1": {"p": 5, "m": 12}}),
                         progress=False)
    assert S.shape == (600, 12) and T.shape == (600, 5)
    t1, other = t == 1, t != 1
    assert (T[t1] >= 0).all() and (S[t1] >= 0).all()
    assert (T[other][:, :2] >= 0).all() and (T[other][:, 2:] == -1).all()
    assert (S[other][:, :10] >= 0).all() and (S[other][:, 10:] == -1).all()
    assert info["groups"]["t1"]["p"] == 5 and info["groups"]["t0"]["p"] == 2
    # The same ranks as mining t1 alone with p=5, m=12.
    ids = np.flatnonzero(t1)
    S1, _, _, _ = rank_group(q[ids].astype(np.float16), p[ids].astype(np.float16),
                             RankParams(p=5, m=12, index="flat"))
    np.testing.assert_array_equal(S[ids], ids[S1])
    with pytest.raises(ConfigError, match=r"task_params names task\(s\) \['nope'\]"):
        rank(emb, RankParams(p=2, m=10, task_params={"nope": {"p": 1}}), progress=False)
    with pytest.raises(ConfigError, match="task_params.t1.p must be an integer >= 0"):
        rank(emb, RankParams(p=2, m=10, task_params={"t1": {"p": -1}}), progress=False)
    with pytest.raises(ConfigError, match="task 't1' has only 200 examples"):
        rank(emb, RankParams(p=2, m=10, task_params={"t1": {"m": 200}}), progress=False)


def test_b3pp_never_draws_a_members_same_text_id():
    n = 400
    S = random_S(n, 8, seed=5)
    keys = np.arange(n, dtype=np.int64)
    batch = np.arange(0, 32)
    # Give every member's text to the ids that appear most in the members' rows.
    cand, counts = np.unique(S[batch].ravel(), return_counts=True)
    cand, counts = cand[cand >= 32], counts[cand >= 32]
    popular = cand[np.argsort(-counts)[:40]]
    keys[popular] = keys[batch[np.arange(40) % 32]]
    plain = draw_hard_negatives(batch, S, 3, np.random.default_rng(0))
    assert np.isin(plain, popular).any()  # without keys they are drawn: the bug
    for h in (3, 8):  # 8 * 32 > the S candidates: the uniform fill-up runs too
        negs = draw_hard_negatives(batch, S, h, np.random.default_rng(0), keys=keys)
        drawn = negs[negs >= 0]
        assert not np.isin(drawn, popular).any()
        assert len(np.unique(drawn)) == len(drawn) and not np.isin(drawn, batch).any()
        assert (negs >= 0).all()


def test_infonce_masks_same_text_positives():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(6, 16), dim=-1)
    d = F.normalize(torch.randn(6, 16), dim=-1)
    n = F.normalize(torch.randn(4, 16), dim=-1)
    d[3] = d[1]  # same text under ids 1 and 3
    n[2] = d[1]  # ... and as a hard negative
    d_keys = torch.tensor([10, 11, 12, 11, 14, 15])
    n_keys = torch.tensor([20, 21, 11, 23])
    out = InfoNCE(0.05)(q, d, n, d_keys, n_keys)
    keys = torch.cat([d, n])
    ref = []
    for i in range(6):
        cols = [j for j in range(10) if j == i or torch.cat([d_keys, n_keys])[j] != d_keys[i]]
        logits = q[i] @ keys[cols].T / 0.05
        ref.append(-torch.log_softmax(logits, 0)[cols.index(i)])
    assert out.global_loss == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)
    unmasked = InfoNCE(0.05, mask_duplicates=False)(q, d, n, d_keys, n_keys)
    assert unmasked.global_loss > out.global_loss + 1e-3
    assert InfoNCE(0.05)(q, d, n).global_loss == pytest.approx(unmasked.global_loss)  # no keys: no mask


@pytest.mark.slow
def test_embed_stage_writes_keys_and_rank_excludes_duplicates(tmp_path):
    """Real shards, the bundled MiniLM teacher: an FAQ-like set where many questions share one answer."""
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap
    from b3stream.mining.embed import load_embeddings
    from b3stream.mining.pipeline import embed_stage, load_rank, rank_stage

    answers = ["Restart the service.", "Check the firewall rules.", "Clear the cache and retry."]
    rows = [{"q": f"question {i}: why does component {i % 17} fail on host {i}?",
             "p": answers[i % 3] if i < 60 else f"component {i} logs the error {i * 13} and exits",
             "g": f"g{i}"} for i in range(160)]
    src = write_jsonl(tmp_path / "faq.jsonl", rows)
    data = tmp_path / "data"
    prepare_file(str(src), "jsonl", str(data), FieldMap(query="q", positive="p", group="g"),
                 held_out={"validation": 0.0, "test": 0.0}, progress=False)
    cfg = MineConfig(data=str(data), out=str(tmp_path / "mine"), p=2, m=30, per_task=False)
    embed_stage(cfg, progress=False)
    emb = load_embeddings(tmp_path / "mine")
    from b3stream.data.reader import ShardedDataset

    texts = [rec["p"] if "p" in rec else rec["positive"] for rec in ShardedDataset(data, "train")]
    np.testing.assert_array_equal(emb.keys, content_keys(texts))
    assert len(np.unique(emb.keys)) == 100 + 3
    rank_stage(cfg, progress=False)
    S, _, T, _ = load_rank(cfg)
    assert same_key_entries(np.asarray(S), emb.keys) == 0 and same_key_entries(np.asarray(T), emb.keys) == 0
    assert content_key("a") == content_key("a") != content_key("b")

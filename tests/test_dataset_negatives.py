"""Stored hard negatives (`prepare --negatives-field`) reach the trainer's InfoNCE denominator
(`train negatives=dataset | both`), drawn per epoch, with same-text positives masked."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from b3stream.config import EncoderConfig, LoraConfig
from b3stream.data.manifest import Manifest
from b3stream.data.prepare import prepare_file, summary
from b3stream.data.reader import ShardedDataset
from b3stream.data.sources import FieldMap
from b3stream.schedule import load_schedule
from b3stream.train.collate import TokenizedBatches
from b3stream.train.loss import InfoNCE
from b3stream.train.sampler import ScheduleSampler

from ._train_util import random_schedule, read_trace, run, write_config
from .conftest import toy_rows, write_jsonl

B3 = [sys.executable, "-m", "b3stream"]
H = 2


def stored_count(i: int) -> int:
    """Negatives stored with source row i: 0, 1, 2 or 3 (fewer than, as many as and more than h = 2)."""
    return i % 4


def stored(records, i) -> list[str]:
    return records[int(i)].get("negatives") or []


@pytest.fixture(scope="module")
def negatives_dataset(tmp_path_factory):
    """120 toy pairs; example i stores i % 4 negatives, the first of which (for i % 4 == 3) is its own
    positive's text: a same-text positive that must never count as a negative."""
    root = tmp_path_factory.mktemp("negs")
    rows = toy_rows(120, tasks=1, groups=40)
    for i, r in enumerate(rows):
        r["neg"] = [f"def wrong_{i}_{k}(y):\n    return y - {k}\n" for k in range(stored_count(i))]
        if stored_count(i) == 3:
            r["neg"][0] = r["p"]
    src = write_jsonl(root / "src.jsonl", rows)
    prepare_file(str(src), "jsonl", str(root / "ds"), FieldMap(query="q", positive="p", task="task", group="g",
                                                                negatives="neg"), progress=False)
    return root / "ds"


@pytest.mark.slow
def test_the_manifest_and_the_schedule_say_what_is_stored(negatives_dataset, tmp_path):
    info = Manifest.load(negatives_dataset).split("train").negatives
    counts = [len(r.get("negatives") or []) for r in ShardedDataset(negatives_dataset, "train")]
    assert info == {"examples": sum(c > 0 for c in counts), "min": 0, "max": 3, "total": sum(counts)}
    assert "stored hard negatives" in summary(Manifest.load(negatives_dataset))
    from b3stream.config import MineConfig
    from b3stream.mining.pipeline import run_all

    path = run_all(MineConfig(data=str(negatives_dataset), out=str(tmp_path / "mine"), strategy="random",
                              batch_size=8), progress=False)
    assert load_schedule(path).meta["dataset_negatives"] == info


def test_a_step_carries_up_to_h_stored_negatives_per_member_drawn_per_epoch(negatives_dataset):
    from b3stream.data.dedup import content_keys
    from b3stream.encoder import Encoder
    from b3stream.train.collate import stored_negatives

    records = ShardedDataset(negatives_dataset, "train")
    manifest = records.manifest
    schedule = load_schedule(random_schedule(negatives_dataset, batch_size=16, K=4, h=2))
    encoder = Encoder(EncoderConfig(max_query_length=32, max_positive_length=32,
                                    lora=LoraConfig(enabled=False)), trainable=False)
    data = TokenizedBatches(records, encoder.tokenize, torch.zeros(1, dtype=torch.int64), seed=7)
    step = ScheduleSampler(schedule, len(records), seed=7, negatives="dataset", h_dataset=H).batch_at(0)
    assert step.has_negative_side and step.num_dataset_negatives == H and step.negative_sizes is None
    assert len(step.hard_negative_ids) == 0  # dataset: the schedule's own pool is left out
    batch = data[(0, step)]
    expected = sum(min(H, len(stored(records, i))) for i in step.ids)
    assert batch.features["negative"]["input_ids"].shape[0] == expected == len(batch.keys["negative"]) > 0
    allowed = set(content_keys([manifest.prompted({"positive": t, "task": records[int(i)].get("task")}, "positive")
                                for i in step.ids for t in stored(records, i)]).tolist())
    assert set(batch.keys["negative"].tolist()) <= allowed  # the members' own stored negatives, prompted
    # both: the schedule's pool and the stored negatives together; mined (the default): the pool alone
    both = ScheduleSampler(schedule, len(records), seed=7, negatives="both", h_dataset=H).batch_at(0)
    assert len(both.hard_negative_ids) > 0 and len(data[(0, both)].keys["negative"]) == \
        len(both.hard_negative_ids) + expected
    mined = ScheduleSampler(schedule, len(records), seed=7).batch_at(0)
    assert mined.num_dataset_negatives == 0 and mined.negative_sizes == [len(mined.hard_negative_ids)]
    # a record with three: another draw in another epoch, the same draw again for the same epoch (resume)
    three = [records[i] for i in range(len(records)) if len(stored(records, i)) == 3][:4]
    draws = [stored_negatives(three, H, 7, epoch, manifest) for epoch in range(6)]
    assert all(len(d) == H * len(three) for d in draws)
    assert len({tuple(d) for d in draws}) > 1 and draws[0] == stored_negatives(three, H, 7, 0, manifest)


@pytest.mark.slow
def test_stored_negatives_sit_in_the_denominator_and_a_same_text_positive_is_masked(negatives_dataset):
    """The loss of a batch with its stored negatives equals InfoNCE computed by hand over [in-batch positives |
    stored negatives], where a stored negative with the query's own positive text is left out."""
    from b3stream.encoder import Encoder
    from b3stream.schedule import Schedule

    records = ShardedDataset(negatives_dataset, "train")
    ids = np.array([i for i in range(len(records)) if len(stored(records, i)) == 3][:6])  # each holds its positive
    assert len(ids) == 6 and all(stored(records, i)[0] == records[int(i)]["positive"] for i in ids)
    rest = np.setdiff1d(np.arange(len(records)), ids)
    schedule = Schedule.from_batches([ids, rest], {"strategy": "random",
                                                   "data": Manifest.load(negatives_dataset).stamp("train")})
    encoder = Encoder(EncoderConfig(max_query_length=32, max_positive_length=32,
                                    lora=LoraConfig(enabled=False)), trainable=False)
    sampler = ScheduleSampler(schedule, len(records), seed=0, negatives="dataset", h_dataset=3)
    index = [k for k in range(sampler.steps_per_epoch) if len(sampler.global_batch(k)) == 6][0]
    step = sampler.batch_at(index)
    batch = TokenizedBatches(records, encoder.tokenize, torch.zeros(1, dtype=torch.int64))[(0, step)]
    with torch.no_grad():
        emb = {side: encoder(**f) for side, f in batch.features.items()}
    tau = 0.05
    out = InfoNCE(temperature=tau)(emb["query"], emb["positive"], emb["negative"], batch.keys["positive"],
                                   batch.keys["negative"])
    assert out.num_hard_negatives == 18  # three stored negatives per member, all of them in the pool
    q, d, n = emb["query"], emb["positive"], emb["negative"]
    same = batch.keys["negative"][None, :] == batch.keys["positive"][:, None]  # a stored copy of the positive
    assert all(same[r, 3 * r] for r in range(6))
    logits = torch.cat([q @ d.T, (q @ n.T).masked_fill(same, float("-inf"))], dim=1) / tau
    by_hand = torch.nn.functional.cross_entropy(logits, torch.arange(6))
    assert torch.allclose(out.loss.detach(), by_hand, atol=1e-4)
    unmasked = torch.nn.functional.cross_entropy(torch.cat([q @ d.T, q @ n.T], dim=1) / tau, torch.arange(6))
    assert unmasked - by_hand > 0.1  # without the mask a query's own positive would count against it


@pytest.mark.slow
def test_a_run_trains_with_its_stored_negatives(negatives_dataset, tmp_path):
    """`b3stream train negatives=dataset`: every step's denominator holds up to h_dataset stored negatives of
    each member (the trace records |N|)."""
    sched = random_schedule(negatives_dataset, batch_size=16, K=4, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(negatives_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), max_steps=3, trace_ids=True, negatives="dataset", h_dataset=H,
                       student={"max_query_length": 16, "max_positive_length": 24})
    res = run([*B3, "train", "--config", str(cfg)], threads=2)
    assert res.returncode == 0, res.stderr[-3000:]
    records = ShardedDataset(negatives_dataset, "train")
    for t in read_trace(tmp_path / "run"):
        assert t["negatives"] == sum(min(H, len(stored(records, i))) for i in t["ids"]) > 0
        assert np.isfinite(t["loss"])
    summary_ = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary_["steps"] == 3


@pytest.mark.slow
def test_dataset_negatives_without_stored_ones_are_refused_before_the_model_loads(code_dataset, tmp_path):
    sched = random_schedule(code_dataset, batch_size=8, K=2, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), max_steps=1, negatives="dataset")
    res = run([*B3, "train", "--config", str(cfg)], threads=1)
    assert res.returncode != 0
    assert "stores no hard negatives" in res.stderr and "--negatives-field" in res.stderr
    assert "Loading weights" not in res.stderr

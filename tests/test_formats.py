"""Other projects' training files, prepared as they are (`prepare --format flagembedding | tevatron |
sentence-transformers`): one example per positive with the query's other positives kept as known positives,
passages as title + text, stored negatives from a list or from columns, per-row prompts, source ids. And the
known positives never serve as negatives: not in the neighbour rows, not in B3++ draws, not in the loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from b3stream.cli import main
from b3stream.data import DataError, Manifest, ShardedDataset
from b3stream.data.prepare import prepare_file
from b3stream.data.sources import preset_fields

from ._train_util import read_trace, run, write_config
from .conftest import write_jsonl

B3 = [sys.executable, "-m", "b3stream"]
ALL_TRAIN = {"held_out": {"validation": 0.0, "test": 0.0}}  # every example in `train`, to read them back
PROMPT = "Represent this sentence for searching relevant passages: "
TOPICS = ["pandas", "volcanoes", "tides", "glaciers", "comets", "coral reefs", "deserts", "auroras"]


def records(root: Path) -> list[dict]:
    """Every record of every split of a prepared dataset."""
    return [rec for split in Manifest.load(root).splits for rec in ShardedDataset(root, split)]


# -- FlagEmbedding ------------------------------------------------------------------------------------------


def flagembedding_rows(n: int = 24) -> list[dict]:
    """FlagEmbedding's training format (its README): {"query": str, "pos": List[str], "neg": List[str],
    "pos_scores": List[float], "neg_scores": List[float], "prompt": str, "type": str}; 1 to 3 positives per
    query, a prompt on every other row. Row 5 lists one of its own positives among its negatives."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        pos = [f"Passage {k} about {topic}, number {i}: facts and figures." for k in range(1 + i % 3)]
        neg = [f"An unrelated passage about cooking, number {i}-{k}." for k in range(2)]
        if i == 5:
            neg.append(pos[1])
        row = {"query": f"what do we know about {topic} ({i})?", "pos": pos, "neg": neg,
               "pos_scores": [1.0] * len(pos), "neg_scores": [0.1] * len(neg)}
        if i % 2 == 0:
            row["prompt"] = PROMPT
        row["type"] = "normal"
        rows.append(row)
    return rows


def test_flagembedding_jsonl_prepares_as_it_is(tmp_path):
    rows = flagembedding_rows()
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    m = prepare_file(str(src), "jsonl", str(tmp_path / "ds"), preset_fields("flagembedding"), progress=False,
                     **ALL_TRAIN)
    recs = records(tmp_path / "ds")
    assert m.N == len(recs) == sum(len(r["pos"]) for r in rows)  # one example per positive
    by_query: dict[str, list[dict]] = {}
    for rec in recs:
        by_query.setdefault(rec["query"], []).append(rec)
    for row in rows:
        examples = by_query[row["query"]]
        assert sorted(e["positive"] for e in examples) == sorted(row["pos"])
        for e in examples:
            others = [p for p in row["pos"] if p != e["positive"]]
            assert e.get("known_positives", []) == others
            assert e["negatives"] == [n for n in row["neg"] if n not in others]  # never a known positive
            assert e.get("query_prompt") == row.get("prompt")
            assert len({x["group"] for x in examples}) == 1  # one query, one split
    five = by_query[rows[5]["query"]]
    assert {len(e["negatives"]) for e in five} == {2, 3}  # the listed positive: dropped where it is another's
    # the per-row prompt is the query's instruction; rows without one keep the task's (here none)
    prompted = {m.prompted(rec, "query") for rec in by_query[rows[0]["query"]]}
    assert prompted == {PROMPT + rows[0]["query"]}
    assert m.prompted(by_query[rows[1]["query"]][0], "query") == rows[1]["query"]
    assert m.fields["positive"] == "pos" and m.fields["preset"] == "flagembedding"
    assert m.splits["train"].negatives["total"] == sum(len(r["negatives"]) for r in recs)


def test_a_flag_given_with_a_preset_replaces_its_field(tmp_path, capsys):
    """`--format flagembedding --query-prompt-field instruction`: the preset's other fields stay; the columns a
    preset names may be absent from every row (no `neg`, no `prompt` here), a column named by hand may not."""
    rows = [{"query": f"q {i}", "pos": [f"p {i}"], "instruction": f"Task {i % 2}: "} for i in range(30)]
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["prepare", "jsonl", str(src), "--out", str(tmp_path / "ds"), "--format", "flagembedding",
                 "--query-prompt-field", "instruction", "--test-fraction", "0", "--validation-fraction", "0",
                 "--quiet"]) == 0
    recs = records(tmp_path / "ds")
    assert {r["query_prompt"] for r in recs} == {"Task 0: ", "Task 1: "}
    assert not any("negatives" in r or "known_positives" in r for r in recs)
    assert main(["prepare", "jsonl", str(src), "--out", str(tmp_path / "ds2"), "--format", "flagembedding",
                 "--negatives-field", "hard", "--quiet"]) == 2
    assert "no record has the column 'hard' named for negatives" in capsys.readouterr().err
    assert not (tmp_path / "ds2").exists()


def test_list_positives_are_refused_when_broken(tmp_path):
    fields = preset_fields("flagembedding")
    for bad, message in (([], "is an empty list"), ([""], "holds an empty text"), ([3], "must hold texts"),
                         ("", "is empty")):
        src = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q", "pos": bad}])
        with pytest.raises(DataError, match=message):
            prepare_file(str(src), "jsonl", str(tmp_path / "out"), fields, progress=False)
    assert not (tmp_path / "out").exists()


# -- Tevatron -----------------------------------------------------------------------------------------------


def tevatron_rows(n: int = 20) -> list[dict]:
    """Tevatron's training format: {"query_id": str, "query": str, "positive_passages": [{"docid", "title",
    "text"}], "negative_passages": [{"docid", "title", "text"}]}; some titles empty."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        pos = [{"docid": f"d{i}-{k}", "title": f"{topic.title()} {k}" if k != 1 else "",
                "text": f"What is known about {topic}, part {k} of query {i}."} for k in range(1 + i % 2)]
        neg = [{"docid": f"n{i}-{k}", "title": "Cooking", "text": f"A recipe, number {i}-{k}."} for k in range(3)]
        rows.append({"query_id": str(100 + i), "query": f"tell me about {topic} {i}",
                     "positive_passages": pos, "negative_passages": neg})
    return rows


def test_tevatron_jsonl_prepares_as_it_is(tmp_path):
    rows = tevatron_rows()
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    prepare_file(str(src), "jsonl", str(tmp_path / "ds"), preset_fields("tevatron"), progress=False, **ALL_TRAIN)
    recs = records(tmp_path / "ds")
    assert len(recs) == sum(len(r["positive_passages"]) for r in rows)
    by_docid = {rec["docid"]: rec for rec in recs}
    for row in rows:
        texts = {p["docid"]: (f"{p['title']} {p['text']}" if p["title"] else p["text"])
                 for p in row["positive_passages"]}
        for docid, text in texts.items():
            rec = by_docid[docid]
            assert rec["positive"] == text and rec["query_id"] == row["query_id"]
            assert rec.get("known_positives", []) == [t for d, t in texts.items() if d != docid]
            assert rec["negatives"] == [f"Cooking {p['text']}" for p in row["negative_passages"]]
    assert by_docid["d1-1"]["positive"] == "What is known about volcanoes, part 1 of query 1."  # empty title
    assert by_docid["d1-0"]["positive"] == "Volcanoes 0 What is known about volcanoes, part 0 of query 1."


# -- sentence-transformers ----------------------------------------------------------------------------------


def test_sentence_transformers_triplets_saved_with_datasets(tmp_path):
    """An (anchor, positive, negative) dataset as sentence-transformers trains on it (all-nli's triplet
    subset), written with save_to_disk: one stored negative per example, read from its column."""
    datasets = pytest.importorskip("datasets")
    n = 30
    data = {"anchor": [f"A person is doing thing {i}." for i in range(n)],
            "positive": [f"Someone does thing {i}." for i in range(n)],
            "negative": [f"Nobody does thing {i}." for i in range(n)]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(data)}).save_to_disk(str(tmp_path / "nli"))
    m = prepare_file(str(tmp_path / "nli"), "hf", str(tmp_path / "ds"), preset_fields("sentence-transformers"),
                     progress=False, **ALL_TRAIN)
    recs = sorted(records(tmp_path / "ds"), key=lambda r: r["id"])
    assert [(r["query"], r["positive"], r["negatives"]) for r in recs] == \
        [(a, p, [neg]) for a, p, neg in zip(data["anchor"], data["positive"], data["negative"])]
    assert (m.fields["query"], m.fields["positive"], m.fields["negatives"]) == ("anchor", "positive", "negative")


def test_sentence_transformers_negative_columns_by_position(tmp_path):
    """(query, positive, negative_1..negative_3) as the msmarco hard-negative datasets hold them, in parquet:
    the column names do not matter, their order does (as in sentence-transformers); a missing negative is
    none; a `label` column is refused, and so is a flag-named column that every row lacks."""
    datasets = pytest.importorskip("datasets")
    n = 24
    data = {"query": [f"query {i}" for i in range(n)], "positive": [f"answer {i}" for i in range(n)]}
    for k in (1, 2, 3):
        data[f"negative_{k}"] = [f"wrong answer {i}.{k}" if (i + k) % 5 else None for i in range(n)]
    datasets.Dataset.from_dict(data).to_parquet(str(tmp_path / "msmarco.parquet"))
    assert main(["prepare", "parquet", str(tmp_path / "msmarco.parquet"), "--out", str(tmp_path / "ds"),
                 "--format", "sentence-transformers", "--test-fraction", "0", "--validation-fraction", "0",
                 "--quiet"]) == 0
    recs = sorted(records(tmp_path / "ds"), key=lambda r: r["id"])
    for i, rec in enumerate(recs):
        assert rec["query"] == f"query {i}" and rec["positive"] == f"answer {i}"
        assert rec.get("negatives", []) == [f"wrong answer {i}.{k}" for k in (1, 2, 3) if (i + k) % 5]
    assert Manifest.load(tmp_path / "ds").fields["negatives"] == "negative_1,negative_2,negative_3"
    # the same by hand, without the preset: several negative columns
    assert main(["prepare", "parquet", str(tmp_path / "msmarco.parquet"), "--out", str(tmp_path / "ds2"),
                 "--negatives-field", "negative_1,negative_2,negative_3", "--test-fraction", "0",
                 "--validation-fraction", "0", "--quiet"]) == 0
    assert Manifest.load(tmp_path / "ds2").fingerprint == Manifest.load(tmp_path / "ds").fingerprint
    labelled = datasets.Dataset.from_dict({"sentence1": ["a"] * 4, "sentence2": ["b"] * 4, "label": [1] * 4})
    labelled.save_to_disk(str(tmp_path / "pairs"))
    with pytest.raises(DataError, match="'label' column"):
        prepare_file(str(tmp_path / "pairs"), "hf", str(tmp_path / "x"), preset_fields("sentence-transformers"),
                     progress=False)


def test_a_plain_negatives_column_of_one_text(tmp_path):
    """`--negatives-field negative` on jsonl whose column holds one text (used to be "not a JSON list")."""
    rows = [{"query": f"q {i}", "positive": f"p {i}", "negative": f"n {i}"} for i in range(20)]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    prepare_file(str(src), "jsonl", str(tmp_path / "ds"), preset_fields(None, negatives="negative"),
                 progress=False, **ALL_TRAIN)
    assert sorted(r["negatives"][0] for r in records(tmp_path / "ds")) == sorted(r["negative"] for r in rows)


# -- known positives are never negatives: rank, B3++, the loss ------------------------------------------------


@pytest.fixture(scope="module")
def flag_dataset(tmp_path_factory) -> Path:
    """The FlagEmbedding rows above, prepared with the preset, every example in `train`."""
    root = tmp_path_factory.mktemp("flag")
    src = write_jsonl(root / "train.jsonl", flagembedding_rows(24))
    prepare_file(str(src), "jsonl", str(root / "ds"), preset_fields("flagembedding"), progress=False, **ALL_TRAIN)
    return root / "ds"


def positive_sets(recs: list[dict]) -> list[set[str]]:
    """Per example, the texts that are its positives: its own and its known ones."""
    return [{r["positive"], *r.get("known_positives", [])} for r in recs]


def test_mining_never_ranks_or_draws_a_known_positive(flag_dataset, tmp_path):
    """Embeddings in which every query's nearest positives are its query's other positives (they are): the
    embed stage stores their keys, ranking drops them from S and T like same-text positives, and B3++ never
    draws a member's known positive, also where another member's S row lists it."""
    from b3stream.config import MineConfig
    from b3stream.mining.embed import load_embeddings
    from b3stream.mining.negatives import draw_hard_negatives
    from b3stream.mining.pipeline import embed_stage
    from b3stream.mining.rank import RankParams, rank

    recs = sorted(records(flag_dataset), key=lambda r: r["id"])
    n = len(recs)
    rng = np.random.default_rng(0)
    centers = {q: rng.normal(size=16) for q in {r["query"] for r in recs}}
    queries = np.stack([centers[r["query"]] for r in recs]).astype(np.float32)
    positives = queries + 0.05 * rng.normal(size=queries.shape).astype(np.float32)
    np.save(tmp_path / "q.npy", queries)
    np.save(tmp_path / "p.npy", positives)
    cfg = MineConfig(data=str(flag_dataset), out=str(tmp_path / "mine"), query_embeddings=str(tmp_path / "q.npy"),
                     positive_embeddings=str(tmp_path / "p.npy"))
    emb = load_embeddings(embed_stage(cfg, progress=False))
    assert emb.known is not None and len(emb.known) == n
    assert emb.known.counts().tolist() == [len(r.get("known_positives", [])) for r in recs]
    text = [r["positive"] for r in recs]
    sets = positive_sets(recs)
    siblings = [{j for j in range(n) if j != i and text[j] in sets[i]} for i in range(n)]
    assert sum(map(len, siblings)) > 0
    for p in (0, 2):
        S, _, T, _ = rank(emb, RankParams(p=p, m=6, per_task=True), progress=False)
        for i in range(n):
            assert not siblings[i] & (set(S[i].tolist()) | set(T[i].tolist()))
    emb.known = None  # without them, the siblings are the nearest neighbours
    S, _, T, _ = rank(emb, RankParams(p=0, m=6, per_task=True), progress=False)
    assert all(siblings[i] <= set(S[i].tolist()) for i in range(n))
    # B3++: member 0's row lists member 1's siblings; they are never drawn for the batch
    emb = load_embeddings(tmp_path / "mine")
    one = next(i for i in range(n) if siblings[i])
    other = next(i for i in range(n) if not siblings[i] and i not in siblings[one])
    batch = np.array([other, one])
    S = np.full((n, 8), -1, dtype=np.int32)
    S[other, : len(siblings[one])] = sorted(siblings[one])
    S[other, len(siblings[one]):] = [j for j in range(n) if j not in siblings[one] | {one, other}][: 8 - len(siblings[one])]
    for known, expect_siblings in ((emb.known, False), (None, True)):
        drawn = draw_hard_negatives(batch, S, 3, np.random.default_rng(0), keys=emb.keys, known=known)
        assert bool(siblings[one] & set(drawn.ravel().tolist())) == expect_siblings


def test_the_loss_masks_a_querys_other_positives(flag_dataset):
    """A batch holding every example of two multi-positive queries, with their stored negatives: the loss
    equals InfoNCE by hand where, for each query, every column whose text is one of its positives (its own
    other than the target, its known ones) is masked; without the known keys it would differ."""
    from b3stream.schedule import Schedule
    from b3stream.train.collate import TokenizedBatches, stored_negatives
    from b3stream.train.loss import InfoNCE
    from b3stream.train.sampler import ScheduleSampler

    ds = ShardedDataset(flag_dataset, "train")
    recs = [ds[i] for i in range(len(ds))]
    three = [r["query"] for r in recs if len(r.get("known_positives", [])) == 2][:6:3]  # two 3-positive queries
    ids = np.array([r["id"] for r in recs if r["query"] in three] + [r["id"] for r in recs if "known_positives"
                                                                      not in r][:2])
    rest = np.setdiff1d(np.arange(len(recs)), ids)
    schedule = Schedule.from_batches([ids, rest], {"strategy": "random", "data": ds.manifest.stamp("train")})
    sampler = ScheduleSampler(schedule, len(recs), seed=0, negatives="dataset", h_dataset=3)
    step = sampler.batch_at(next(k for k in range(sampler.steps_per_epoch) if len(sampler.global_batch(k)) == len(ids)))

    def tokenize(texts, side):
        return {"input_ids": torch.ones(len(texts), 2, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 2, dtype=torch.long)}

    batch = TokenizedBatches(ds, tokenize, torch.zeros(1, dtype=torch.int64))[(0, step)]
    members = [recs[int(i)] for i in step.ids]
    assert batch.keys["known"].shape == (len(members), 2)
    negatives = stored_negatives(members, 3, 0, step.epoch, ds.manifest)
    columns = [m["positive"] for m in members] + negatives
    sets = positive_sets(members)
    mask = torch.tensor([[j != i and columns[j] in sets[i] for j in range(len(columns))] for i in range(len(members))])
    assert mask[:, : len(members)].sum() == 2 * 3 * 2  # each of six examples: its query's two other positives
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    centers = {query: torch.randn(8, generator=g) for query in {m["query"] for m in members}}
    q = unit(torch.stack([centers[m["query"]] for m in members]), dim=1)  # a query's positives lie near it
    d = unit(q + 0.2 * torch.randn(q.shape, generator=g), dim=1)
    n = unit(torch.randn(len(negatives), 8, generator=g), dim=1)
    tau = 0.05
    loss = InfoNCE(tau)(q, d, n, batch.keys["positive"], batch.keys["negative"], known_keys=batch.keys["known"])
    by_hand = torch.nn.functional.cross_entropy((q @ torch.cat([d, n]).T / tau).masked_fill(mask, float("-inf")),
                                                torch.arange(len(members)))
    assert torch.allclose(loss.loss.detach(), by_hand, atol=1e-5)
    without = InfoNCE(tau)(q, d, n, batch.keys["positive"], batch.keys["negative"])
    assert without.loss.item() > by_hand.item() + 0.5  # unmasked, the other positives count against it


# -- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_flagembedding_file_trains_with_its_negatives(tmp_path, capsys):
    """`prepare jsonl --format flagembedding` -> `mine --strategy random` (the teacher embeds it and stores
    the known positives' keys) -> `train negatives=dataset`: each step's denominator holds up to h_dataset of
    every member's stored negatives, and the run completes. prepare and mine run in this process (the same
    commands, two interpreter launches fewer); train in its own, as a user runs it."""
    src = write_jsonl(tmp_path / "train.jsonl", flagembedding_rows(24))
    data = tmp_path / "ds"
    assert main(["prepare", "jsonl", str(src), "--out", str(data), "--format", "flagembedding", "--quiet"]) == 0
    assert "stored hard negatives" in capsys.readouterr().out
    assert main(["mine", "--data", str(data), "--out", str(tmp_path / "mine"), "--strategy", "random",
                 "--batch-size", "8", "--quiet"]) == 0
    assert (tmp_path / "mine" / "embeddings" / "known_keys.npy").is_file()
    cfg = write_config(tmp_path / "train.yaml", data=str(data), schedule=str(tmp_path / "mine" / "schedules"),
                       out=str(tmp_path / "run"), max_steps=3, trace_ids=True, negatives="dataset", h_dataset=2,
                       student={"max_query_length": 24, "max_positive_length": 24})
    res = run([*B3, "train", "--config", str(cfg)], threads=2)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = ShardedDataset(data, "train")
    trace = read_trace(tmp_path / "run")
    assert len(trace) == 3
    for t in trace:
        assert t["negatives"] == sum(min(2, len(recs[i].get("negatives", []))) for i in t["ids"]) > 0
        assert np.isfinite(t["loss"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3

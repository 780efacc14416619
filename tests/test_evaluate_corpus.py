"""The harder evaluation: ``--corpus all`` (every split's positives as the corpus) and per-query ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from b3stream.config import ConfigError, TrainConfig, load_config
from b3stream.data.manifest import Manifest
from b3stream.data.reader import ShardedDataset
from b3stream.evaluate import METRICS, RetrievalSet, read_per_query, search



def _positives(data, split: str) -> set[str]:
    manifest = Manifest.load(data)
    return {manifest.prompted(rec, "positive") for rec in ShardedDataset(data, split, manifest=manifest)}


def test_all_corpus_holds_every_split_and_keeps_relevance(code_dataset):
    own = RetrievalSet(code_dataset, "test", corpus="split")
    every = RetrievalSet(code_dataset, "test", corpus="all")
    assert every.queries == own.queries  # same queries, only the corpus grows
    assert set(every.corpus) == _positives(code_dataset, "train") | _positives(code_dataset, "validation") \
        | _positives(code_dataset, "test")
    assert len(every.corpus) > 3 * len(own.corpus)
    assert _positives(code_dataset, "train") <= set(every.corpus)  # train positives are the distractors
    # relevance is by text: each query's relevant documents are the same texts in both corpora
    for q, a, b in zip(own.queries, own.relevant, every.relevant):
        assert {own.corpus[i] for i in a} == {every.corpus[i] for i in b}, q
    # one corpus list for every split, so one embedding of it serves the validation and test sets
    assert RetrievalSet(code_dataset, "validation", corpus="all").corpus == every.corpus


def test_bad_corpus_and_split_are_clear_errors(code_dataset):
    with pytest.raises(ConfigError, match="corpus must be one of split, all"):
        RetrievalSet(code_dataset, "test", corpus="everything")
    with pytest.raises(Exception, match="no split 'dev'"):
        RetrievalSet(code_dataset, "dev", corpus="all")
    with pytest.raises(ConfigError, match="eval_corpus: must be one of split, all"):
        load_config(TrainConfig, overrides=["eval_corpus=train"])
    assert load_config(TrainConfig, overrides=["eval_corpus=all"]).eval_corpus == "all"


def test_search_ranks_agree_with_a_full_sort():
    rng = np.random.default_rng(1)
    corpus = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    order = np.argsort(-(queries @ corpus.T), axis=1)
    # half the queries' positives inside the top 10, half anywhere; one query with three
    relevant = [{int(order[i, rng.integers(0, 12)])} if i % 2 else {int(rng.integers(0, 300))} for i in range(40)]
    relevant[0] |= {int(order[0, 40]), int(order[0, 3])}
    ids, ranks = search(queries, corpus, k=10, relevant=relevant, block=7)  # blocks that do not divide 40
    assert np.array_equal(ids, order[:, :10])
    expected = [1 + min(int(np.flatnonzero(order[i] == d)[0]) for d in rel) for i, rel in enumerate(relevant)]
    assert ranks.tolist() == expected
    assert (ranks > 10).any() and (ranks <= 10).any()  # both branches of the rank are exercised


def test_per_query_file_matches_the_metrics(code_dataset, tmp_path):
    es = RetrievalSet(code_dataset, "test", max_queries=60, corpus="all")
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(len(es.corpus), 8)).astype(np.float32)
    # queries near their positive, with noise so that some land outside the top 10
    queries = np.stack([corpus[min(r)] for r in es.relevant]) + rng.normal(scale=2.0, size=(len(es.queries), 8))
    out = tmp_path / "pq.jsonl"
    metrics = es.score(queries.astype(np.float32), corpus, per_query=out)
    rows = read_per_query(out)
    assert [r["query"] for r in rows] == es.queries
    for name in METRICS:
        assert np.mean([r[name] for r in rows]) == pytest.approx(metrics[name])
    for r in rows:  # a single relevant document: MRR@10 and Recall@1 follow from the rank alone
        assert r["mrr@10"] == pytest.approx(1 / r["rank"] if r["rank"] <= 10 else 0.0)
        assert r["recall@1"] == float(r["rank"] == 1)
    assert 0 < metrics["mrr@10"] < 1 and any(r["rank"] > 10 for r in rows)
    assert metrics["corpus"] == len(es.corpus) and metrics["corpus_mode"] == "all"


@pytest.mark.slow
def test_evaluate_command_all_corpus_per_query(code_dataset, tmp_path, capsys):
    """`b3stream evaluate` zero-shot with the bundled model, through the command's entry in this process (this
    also stands for the former test_evaluate.py::test_evaluate_command_zero_shot; the launched command:
    test_evaluate_beir.py::test_evaluate_command_on_a_beir_folder). Texts cut at 16 tokens: the >1,000
    documents of ``--corpus all`` are the cost."""
    from b3stream.cli import main

    pq, js = tmp_path / "ranks.jsonl", tmp_path / "m.json"
    code = main(["evaluate", "--data", str(code_dataset), "--max-queries", "20", "--max-length", "16",
                 "--corpus", "all", "--per-query", str(pq), "--json", str(js)])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    assert "bundled all-MiniLM-L6-v2" in out.out and "ndcg@10" in out.out and "(20 queries" in out.out
    metrics = json.loads(js.read_text())
    assert metrics["corpus_mode"] == "all" and metrics["corpus"] > 1000 and "corpus: all" in out.out
    rows = read_per_query(pq)
    assert len(rows) == 20
    assert np.mean([r["ndcg@10"] for r in rows]) == pytest.approx(metrics["ndcg@10"])
    # the parser's refusal, in this process (no model is loaded before it)
    with pytest.raises(SystemExit) as bad:
        main(["evaluate", "--data", str(code_dataset), "--corpus", "train"])
    err = capsys.readouterr().err
    assert bad.value.code != 0 and "--corpus" in err and "invalid choice" in err


def test_a_task_is_scored_against_its_own_candidates(toy_dataset):
    """``task``: the queries and the corpus of one task only (a multi-task set scored task by task, as MMEB)."""
    from b3stream.config import ConfigError
    from b3stream.data.manifest import Manifest
    from b3stream.data.reader import ShardedDataset

    manifest = Manifest.load(toy_dataset)
    task = sorted(manifest.tasks)[0]
    every = RetrievalSet(toy_dataset, "test", corpus="all")
    one = RetrievalSet(toy_dataset, "test", corpus="all", task=task)
    records = [r for s in manifest.splits for r in ShardedDataset(toy_dataset, s, manifest=manifest)]
    own_docs = {manifest.prompted(r, "positive") for r in records if r["task"] == task}
    own_queries = {manifest.prompted(r, "query") for r in ShardedDataset(toy_dataset, "test", manifest=manifest)
                   if r["task"] == task}
    assert set(one.corpus) == own_docs and len(one.corpus) < len(every.corpus)
    assert set(one.queries) == own_queries and 0 < len(one.queries) < len(every.queries)
    for q, rel in zip(one.queries, one.relevant):  # relevance points into the task's own corpus
        assert rel and all(one.corpus[d] in own_docs for d in rel)
    with pytest.raises(ConfigError, match="task 'nope' is not in"):
        RetrievalSet(toy_dataset, "test", task="nope")
    # the sets of every task and split built from one read of the shards are the sets streamed one by one
    from b3stream.evaluate import prompted_pairs

    pairs = prompted_pairs(toy_dataset)
    for t in manifest.tasks:
        for split, corpus in (("test", "all"), ("validation", "split")):
            a = RetrievalSet(toy_dataset, split, corpus=corpus, task=t)
            b = RetrievalSet(toy_dataset, split, corpus=corpus, task=t, pairs=pairs)
            assert (a.queries, a.relevant, a.corpus) == (b.queries, b.relevant, b.corpus)

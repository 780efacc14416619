"""Retrieval metrics on hand-made rankings and the evaluation set of a split (`b3stream evaluate` itself:
tests/test_evaluate_corpus.py and tests/test_evaluate_beir.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from b3stream.evaluate import RetrievalSet, retrieval_metrics, search


def test_metrics_single_relevant():
    ranked = np.array([
        [7, 1, 2, 3, 4, 5, 6, 8, 9, 10],   # hit at rank 1
        [1, 2, 7, 3, 4, 5, 6, 8, 9, 10],   # hit at rank 3
        [1, 2, 3, 4, 5, 6, 8, 9, 10, 11],  # miss
    ])
    m = retrieval_metrics(ranked, [{7}, {7}, {7}])
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 3)


def test_metrics_several_relevant_and_short_rankings():
    ranked = np.array([[5, 9, 6, -1, -1, -1, -1, -1, -1, -1]])  # corpus smaller than 10: FAISS pads with -1
    m = retrieval_metrics(ranked, [{5, 6}])
    ideal = 1 + 1 / math.log2(3)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / ideal)
    assert m["recall@1"] == pytest.approx(0.5) and m["recall@10"] == pytest.approx(1.0)
    assert m["mrr@10"] == pytest.approx(1.0)


def test_search_is_exact_inner_product():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    expected = np.argsort(-(queries @ corpus.T), axis=1)[:, :10]
    assert np.array_equal(search(queries, corpus), expected)


def test_retrieval_set_deduplicates_texts(tmp_path):
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap

    from .conftest import write_jsonl

    rows = [{"q": f"query {i % 40}", "p": f"doc {i % 45}", "g": f"g{i}"} for i in range(120)]
    src = write_jsonl(tmp_path / "dup.jsonl", rows)
    prepare_file(str(src), "jsonl", str(tmp_path / "ds"), FieldMap(query="q", positive="p", group="g"),
                 held_out={"test": 0.5}, progress=False)
    es = RetrievalSet(tmp_path / "ds", "test")
    assert len(es.queries) == len(set(es.queries)) and len(es.corpus) == len(set(es.corpus))
    # every relevant document of a query is one of the positives its records named
    assert all(len(r) >= 1 for r in es.relevant)
    assert any(len(r) > 1 for r in es.relevant)  # "query k" pairs with several docs
    sample = RetrievalSet(tmp_path / "ds", "test", max_queries=5)
    assert len(sample.queries) == 5 and sample.corpus == es.corpus
    assert RetrievalSet(tmp_path / "ds", "test", max_queries=5).queries == sample.queries  # seeded

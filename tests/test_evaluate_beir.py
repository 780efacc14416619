"""Evaluation on BEIR-format folders (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv, written here), and the
project's own metrics against pytrec_eval (trec_eval's C code, what BEIR and MTEB report with)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from b3stream.config import ConfigError, TrainConfig, load_config
from b3stream.data.manifest import DataError
from b3stream.evaluate import (DEPTH, METRICS, BeirSet, per_query_metrics, read_per_query, search,
                               trec_eval_metrics)

from ._train_util import run

TOPICS = ["sorting", "parsing", "networking", "files", "dates", "math", "strings", "images", "json", "threads"]


def write_beir(folder, docs_per_topic: int = 6, missing: bool = True):
    """A small BEIR folder: documents about topics (titles on some), one query per topic with graded qrels (2 for
    the topic's first document, 1 for the next two, 0 for one more), a dev split, and a judged document that is
    not in the corpus."""
    (folder / "qrels").mkdir(parents=True)
    corpus, queries, test, dev = [], [], ["query-id\tcorpus-id\tscore"], ["query-id\tcorpus-id\tscore"]
    for t, topic in enumerate(TOPICS):
        for j in range(docs_per_topic):
            doc = {"_id": f"d{t}-{j}", "text": f"how to handle {topic} with python, example {j}"}
            if j % 2 == 0:
                doc["title"] = f"{topic.title()} guide"
            corpus.append(doc)
        queries.append({"_id": f"q{t}", "text": f"help with {topic}"})
        queries.append({"_id": f"x{t}", "text": f"another {topic} question"})
        test += [f"q{t}\td{t}-0\t2", f"q{t}\td{t}-1\t1", f"q{t}\td{t}-2\t1", f"q{t}\td{t}-3\t0"]
        dev.append(f"x{t}\td{t}-4\t1")
    if missing:
        test.append("q0\tgone\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "test.tsv").write_text("\n".join(test) + "\n")
    (folder / "qrels" / "dev.tsv").write_text("\n".join(dev) + "\n")
    return folder


def random_run(seed: int, queries: int = 200, docs: int = 400):
    """Graded qrels (0-3, a query with only 0s, judged documents never ranked) and rankings of depth 100 (some
    shorter, padded with -1) where relevant documents are likelier near the top."""
    rng = np.random.default_rng(seed)
    ranked = np.full((queries, DEPTH), -1, dtype=np.int64)
    relevant = []
    for i in range(queries):
        rel = {int(d): int(rng.integers(0, 4)) for d in rng.choice(docs, rng.integers(1, 12), replace=False)}
        if i % 17 == 0:
            rel = {d: 0 for d in rel}
        if i % 5 == 0:
            rel[-2 - i] = 1  # judged, not in the corpus
        depth = DEPTH if i % 7 else int(rng.integers(3, 40))
        weights = np.ones(docs)
        weights[[d for d in rel if d >= 0]] = 30
        ranked[i, :depth] = rng.choice(docs, depth, replace=False, p=weights / weights.sum())
        relevant.append(rel)
    return ranked, relevant


def test_own_metrics_agree_with_pytrec_eval():
    """nDCG@10 (graded), MRR@10, Recall@1/10/100 and MAP@100 per query, to 1e-6, on 600 random queries; and the
    binary sets of the dataset splits."""
    worst = 0.0
    for seed in range(3):
        ranked, relevant = random_run(seed)
        ours, theirs = per_query_metrics(ranked, relevant), trec_eval_metrics(ranked, relevant)
        for name in METRICS:
            worst = max(worst, float(np.abs(ours[name] - theirs[name]).max()))
        assert all(ours[name].std() > 0 for name in METRICS)  # nothing trivially constant
    binary = [set(r) for r in random_run(9)[1]]
    ours, theirs = per_query_metrics(random_run(9)[0], binary), trec_eval_metrics(random_run(9)[0], binary)
    worst = max([worst] + [float(np.abs(ours[n] - theirs[n]).max()) for n in METRICS])
    print(f"max |own - pytrec_eval| over {len(METRICS)} metrics x 800 queries: {worst:.2e}")
    assert worst < 1e-6


def test_a_beir_folder_is_read_with_graded_relevance(tmp_path):
    folder = write_beir(tmp_path / "beir")
    es = BeirSet(folder, "test", prompts={"query": "query: ", "positive": "passage: "})
    assert len(es.corpus) == 60 and len(es.queries) == 10 and es.missing_documents == 1
    assert es.corpus[0] == "passage: Sorting guide how to handle sorting with python, example 0"
    assert es.corpus[1] == "passage: how to handle sorting with python, example 1"
    assert es.queries[0] == "query: help with sorting" and es.query_ids[0] == "q0"
    assert es.relevant[0] == {0: 2.0, 1: 1.0, 2: 1.0, 3: 0.0, -2: 1.0}
    dev = BeirSet(folder, "dev")
    assert dev.query_ids == [f"x{t}" for t in range(10)] and dev.corpus[0] == es.corpus[0][len("passage: "):]
    sample = BeirSet(folder, "test", max_queries=4, seed=0)
    assert len(sample.queries) == 4 and sample.query_ids == BeirSet(folder, "test", max_queries=4).query_ids


def test_beir_scores_are_pytrec_evals_and_the_per_query_file_pairs(tmp_path):
    """The set's numbers are pytrec_eval's on its ranking; the project's own give the same; the per-query file
    holds ids and ranks and averages to the metrics."""
    es = BeirSet(write_beir(tmp_path / "beir"), "test")
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(len(es.corpus), 16)).astype(np.float32)
    queries = np.stack([corpus[[d for d, g in r.items() if g > 0 and d >= 0]].mean(0) for r in es.relevant])
    queries = (queries + rng.normal(scale=0.8, size=queries.shape)).astype(np.float32)
    metrics = es.score(queries, corpus, per_query=tmp_path / "pq.jsonl")
    ranked = search(queries, corpus, k=DEPTH)
    own = per_query_metrics(ranked, es.relevant)
    for name in METRICS:
        assert metrics[name] == pytest.approx(float(own[name].mean()), abs=1e-6)
    assert 0 < metrics["ndcg@10"] < 1 and metrics["recall@100"] < 1  # the judged document not in the corpus
    assert metrics["corpus_mode"] == "beir" and metrics["corpus"] == 60 and metrics["queries"] == 10
    rows = read_per_query(tmp_path / "pq.jsonl")
    assert [r["id"] for r in rows] == es.query_ids
    for name in METRICS:
        assert np.mean([r[name] for r in rows]) == pytest.approx(metrics[name])
    for r in rows:
        assert r["rank"] >= 1 and (r["mrr@10"] == pytest.approx(1 / r["rank"]) if r["rank"] <= 10 else r["mrr@10"] == 0)


def test_bad_beir_folders_are_named_errors(tmp_path):
    folder = write_beir(tmp_path / "beir")
    with pytest.raises(DataError, match=r"qrels/train.tsv: missing; .* \(its qrels splits: dev, test\)"):
        BeirSet(folder, "train")
    (folder / "qrels" / "bad.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0-0\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected query-id, corpus-id and a numeric score"):
        BeirSet(folder, "bad")
    (folder / "qrels" / "odd.tsv").write_text("q99\td0-0\t1\n")
    with pytest.raises(DataError, match=r"odd.tsv:1: query 'q99' is not in queries.jsonl"):
        BeirSet(folder, "odd")
    with pytest.raises(ConfigError, match="eval_beir: .* is not a BEIR folder with split 'train': no qrels/train.tsv"):
        load_config(TrainConfig, overrides=[f"eval_beir={folder}", "eval_beir_split=train"])
    assert load_config(TrainConfig, overrides=[f"eval_beir={folder}"]).eval_beir == str(folder)
    assert TrainConfig().eval_corpus == "all"  # the whole corpus unless told otherwise


@pytest.mark.slow
def test_evaluate_path_on_a_beir_folder_is_what_beir_computes(tmp_path):
    """End to end with the bundled MiniLM: b3stream's numbers equal pytrec_eval run on sentence-transformers'
    own embeddings and scores, as BEIR's exact search evaluates (top 100 per query)."""
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    from b3stream.encoder import default_model_path
    from b3stream.evaluate import evaluate_path

    folder = write_beir(tmp_path / "beir")
    ours = evaluate_path(None, None, "test", beir=str(folder), progress=False)
    es = BeirSet(folder, "test")
    st = SentenceTransformer(default_model_path(), device="cpu")
    q, d = st.encode_query(es.queries), st.encode_document(es.corpus)
    scores = q @ d.T
    doc_ids = [json.loads(line)["_id"] for line in (folder / "corpus.jsonl").read_text().splitlines()]
    run_ = {qid: {doc_ids[j]: float(scores[i, j]) for j in np.argsort(-scores[i])[:DEPTH]}
            for i, qid in enumerate(es.query_ids)}
    qrels = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, grade = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(grade)
    beir = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}).evaluate(run_)
    top10 = {qid: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for qid, docs in run_.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    expected = {"ndcg@10": "ndcg_cut_10", "recall@1": "recall_1", "recall@10": "recall_10",
                "recall@100": "recall_100", "map@100": "map_cut_100"}
    for name, key in expected.items():
        assert ours[name] == pytest.approx(np.mean([beir[qid][key] for qid in es.query_ids]), abs=1e-6), name
    assert ours["mrr@10"] == pytest.approx(np.mean([mrr[qid]["recip_rank"] for qid in es.query_ids]), abs=1e-6)
    assert ours["ndcg@10"] > 0.3  # the topics are easy: the model finds them


@pytest.mark.slow
def test_evaluate_command_on_a_beir_folder(tmp_path, capsys):
    folder = write_beir(tmp_path / "beir")
    out, pq = tmp_path / "m.json", tmp_path / "pq.jsonl"
    res = run([sys.executable, "-m", "b3stream", "evaluate", "--beir", str(folder), "--json", str(out),
               "--per-query", str(pq)], threads=2, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert "map@100" in res.stdout and "corpus: beir" in res.stdout and metrics["queries"] == 10
    assert len(read_per_query(pq)) == 10
    # the refusals, in this process (each stops before a model loads)
    from b3stream.cli import main

    assert main(["evaluate", "--beir", str(folder), "--split", "train"]) != 0
    assert "qrels/train.tsv: missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as neither:
        main(["evaluate"])
    assert neither.value.code == 2
    assert "one of the arguments --data --beir is required" in capsys.readouterr().err


@pytest.mark.slow
def test_training_evaluates_on_a_beir_folder(code_dataset, tmp_path):
    """`eval_beir`: before and after training, the BEIR folder's metrics (alone without eval_split); the student
    is a sentence-transformers folder with a Dense and E5-style prompts, trained through DeepSpeed, exported
    with its Dense and its prompts."""
    from .test_st_folders import st_folder
    from ._train_util import random_schedule, write_config

    start = st_folder(tmp_path / "start", dense=32, prompts={"query": "query: ", "passage": "passage: "})
    folder = write_beir(tmp_path / "beir")
    sched = random_schedule(code_dataset, batch_size=8, K=2, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), max_steps=2, export=True,
                       student={"model": str(start), "max_query_length": 16, "max_positive_length": 16},
                       eval_beir=str(folder))
    res = run([sys.executable, "-m", "b3stream", "train", "--config", str(cfg)], threads=2, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for name in ("before", "after"):
        assert summary["eval"][name]["corpus_mode"] == "beir" and summary["eval"][name]["queries"] == 10
        assert set(METRICS) <= set(summary["eval"][name])
    assert "before: ndcg@10" in res.stdout and "(10 queries, 60 documents, corpus: beir)" in res.stdout
    export = tmp_path / "run" / "export" / "sentence-transformers"
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((export / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    prompts = json.loads((export / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "query: " and prompts["document"] == "passage: "  # the model's, the data has none

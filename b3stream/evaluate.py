"""Retrieval evaluation on a held-out split: nDCG@10, MRR@10, Recall@1, Recall@10.

The queries are the split's distinct (prompted) queries, optionally a seeded sample of them. The corpus is
either

- ``split`` (the default): every distinct (prompted) positive of the same split, or
- ``all``: every distinct (prompted) positive of *every* split of the dataset. The training positives then
  act as distractors, so a query is scored against tens of thousands of documents instead of a few hundred;
  a corpus as small as one held-out split makes retrieval easy (zero-shot Recall@10 near 0.94 on the
  code-search data) and hides differences between models.

A query's relevant documents are the positives of every record (of the corpus's splits) that shares its
text, usually one, so duplicated texts neither inflate nor deflate a score and a positive is never a
distractor for its own query.

Search is exact: inner products (cosine similarity for the normalised embeddings the encoder produces) as a
torch matmul and top-k over blocks of queries, on the GPU when torch sees one. Relevance is binary:
nDCG@10 = sum over hits of 1/log2(rank+1), divided by the same for an ideal ranking of
min(|relevant|, 10) hits; Recall@k = share of a query's relevant documents in its top k.

Per query (``per_query``), the rank of the best-ranked relevant document and the four metrics are written
one JSON line per query, in query order, so two models scored on the same set can be compared pairwise
(``tools/bench_quality.py`` bootstraps over these lines).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import ConfigError, EncoderConfig, LoraConfig
from .data.manifest import Manifest
from .data.reader import ShardedDataset
from .encoder import Encoder

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")
CORPORA = ("split", "all")  # what a query is searched against (module docstring)


# --------------------------------------------------------------------------------------------------
# Metrics from rankings
# --------------------------------------------------------------------------------------------------


def per_query_metrics(ranked: np.ndarray, relevant: list[set[int]]) -> dict[str, np.ndarray]:
    """``ranked[i]``: document indices for query i, best first (at least 10 columns, -1 = none);
    ``relevant[i]``: the set of relevant document indices. Returns each metric per query (float arrays)."""
    if len(ranked) != len(relevant):
        raise ValueError("one ranking per query")
    discounts = 1.0 / np.log2(np.arange(2, 12))
    out = {name: np.zeros(len(ranked)) for name in METRICS}
    for i, (row, rel) in enumerate(zip(ranked, relevant)):
        hits = np.array([doc in rel for doc in row[:10]], dtype=bool)
        ideal = discounts[: min(len(rel), 10)].sum()
        out["ndcg@10"][i] = float(discounts[: len(hits)][hits].sum() / ideal) if ideal else 0.0
        first = np.flatnonzero(hits)
        out["mrr@10"][i] = 1.0 / (first[0] + 1) if len(first) else 0.0
        out["recall@1"][i] = hits[:1].sum() / len(rel)
        out["recall@10"][i] = hits.sum() / len(rel)
    return out


def retrieval_metrics(ranked: np.ndarray, relevant: list[set[int]]) -> dict[str, float]:
    """The mean over queries of each metric of :func:`per_query_metrics`."""
    if len(ranked) != len(relevant):
        raise ValueError("one ranking per query")
    if len(ranked) == 0:
        return {name: float("nan") for name in METRICS}
    return {k: float(v.mean()) for k, v in per_query_metrics(ranked, relevant).items()}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def search(queries: np.ndarray, corpus: np.ndarray, k: int = 10, relevant: list[set[int]] | None = None,
           block: int = 512) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product; rows padded with -1 when the corpus is smaller than k.

    A torch matmul + top-k over blocks of ``block`` queries (GPU when torch sees one): for a corpus of tens
    of thousands of rows this is exact and faster than a FAISS flat index on CPU, and it never holds more
    than ``block x len(corpus)`` scores. With ``relevant`` it also returns, per query, the rank (1-based) of
    its best relevant document: its position in the top k when there, else one plus the number of documents
    scoring strictly higher (at least k + 1), so the rank always agrees with the top-k metrics."""
    import torch

    dev = _device()
    c = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32)).to(dev)
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    kk = min(k, c.shape[0])
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    ranks = np.zeros(len(queries), dtype=np.int64)
    for lo in range(0, len(queries), block):
        scores = q_all[lo:lo + block].to(dev) @ c.T
        top = scores.topk(kk, dim=1).indices.cpu().numpy() if kk else np.zeros((len(scores), 0), np.int64)
        ids[lo:lo + len(top), :kk] = top
        if relevant is None:
            continue
        for j in range(len(top)):
            rel = relevant[lo + j]
            hit = [pos for pos, doc in enumerate(top[j]) if doc in rel]
            if hit:
                ranks[lo + j] = hit[0] + 1
            else:
                best = scores[j, torch.as_tensor(sorted(rel), device=dev)].max()
                ranks[lo + j] = max(kk + 1, int((scores[j] > best).sum()) + 1)
    return ids if relevant is None else (ids, ranks)


# --------------------------------------------------------------------------------------------------
# The evaluation set of a split
# --------------------------------------------------------------------------------------------------


class RetrievalSet:
    """Distinct prompted queries of one split and the corpus they are searched in, with the relevance
    between them. ``corpus``: ``split`` (that split's positives) or ``all`` (the positives of every split,
    in the manifest's split order, so every split's set shares one corpus list and one embedding of it).
    ``task``: only that task's records, queries and corpus both (a multi-task set scored task by task, as MMEB
    scores each of its datasets against its own candidates)."""

    def __init__(self, data: str | Path, split: str = "test", max_queries: int | None = None, seed: int = 0,
                 corpus: str = "split", task: str | None = None, pairs: list[tuple] | None = None):
        """``pairs``: :func:`prompted_pairs` of ``data`` already read, so that the sets of several tasks or
        splits share one pass over the shards instead of streaming them once each."""
        if corpus not in CORPORA:
            raise ConfigError(f"corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")
        manifest = Manifest.load(data)
        manifest.split(split)  # a DataError naming the splits there are
        if task is not None and task not in manifest.tasks:
            raise ConfigError(f"task {task!r} is not in {data}; its tasks: {', '.join(manifest.tasks) or 'none'}")
        names = manifest.splits if corpus == "all" else [split]
        docs: dict[str, int] = {}
        rel: dict[str, set[int]] = {}  # query text of `split` -> its positives
        others: dict[str, set[int]] = {}  # query text of another split -> its positives
        for name, rec_task, query, doc in pairs if pairs is not None else prompted_pairs(data, names):
            if name not in names or (task is not None and rec_task != task):
                continue
            (rel if name == split else others).setdefault(query, set()).add(docs.setdefault(doc, len(docs)))
        queries = list(rel)
        if max_queries is not None and len(queries) > max_queries:
            keep = np.sort(np.random.default_rng(seed).choice(len(queries), max_queries, replace=False))
            queries = [queries[i] for i in keep]
        self.split = split
        self.task = task
        self.corpus_mode = corpus
        self.queries = queries
        # Another split's record with a held-out query's text answers that query too: its positive is
        # relevant, not a distractor.
        self.relevant = [rel[q] | others.get(q, set()) for q in queries]
        self.corpus = list(docs)

    def score(self, query_emb: np.ndarray, corpus_emb: np.ndarray, per_query: str | Path | None = None) -> dict:
        """Metrics of the embedded queries against the embedded corpus; ``per_query``: also write one
        JSON line per query (query text, rank of its best relevant document, the four metrics)."""
        if len(query_emb) != len(self.queries) or len(corpus_emb) != len(self.corpus):
            raise ValueError(f"{len(query_emb)} query / {len(corpus_emb)} corpus embeddings for "
                             f"{len(self.queries)} queries / {len(self.corpus)} documents")
        ranked, ranks = search(query_emb, corpus_emb, k=10, relevant=self.relevant)
        values = per_query_metrics(ranked, self.relevant)
        out = {k: float(v.mean()) if len(v) else float("nan") for k, v in values.items()}
        out.update(queries=len(self.queries), corpus=len(self.corpus), corpus_mode=self.corpus_mode)
        if per_query is not None:
            write_per_query(per_query, self.queries, ranks, values)
        return out


def prompted_pairs(data: str | Path, splits: list[str] | None = None) -> list[tuple[str, str | None, str, str]]:
    """(split, task, prompted query, prompted positive) of every record of ``splits`` (default: every split, in
    the manifest's order), in id order: what :class:`RetrievalSet` reads. Every rank streams it."""
    manifest = Manifest.load(data)
    return [(name, rec.get("task"), manifest.prompted(rec, "query"), manifest.prompted(rec, "positive"))
            for name in (splits or manifest.splits) for rec in ShardedDataset(data, name, manifest=manifest)]


def write_per_query(path: str | Path, queries: list[str], ranks: np.ndarray, values: dict[str, np.ndarray]) -> None:
    """One JSON line per query, in the set's query order (atomic: a temporary file renamed into place)."""
    from .files import write_atomic

    lines = [json.dumps({"query": q, "rank": int(r), **{k: float(values[k][i]) for k in METRICS}})
             for i, (q, r) in enumerate(zip(queries, ranks))]
    write_atomic(path, "".join(line + "\n" for line in lines).encode())


def read_per_query(path: str | Path) -> list[dict]:
    """The lines :func:`write_per_query` wrote."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def evaluate_encoder(encoder: Encoder, data: str | Path, split: str = "test", max_queries: int | None = None,
                     batch_size: int = 64, progress: bool = False, eval_set: RetrievalSet | None = None,
                     corpus: str = "split", per_query: str | Path | None = None,
                     corpus_emb: np.ndarray | None = None) -> dict:
    """Embed the split's queries and corpus with ``encoder`` and score the retrieval. ``corpus_emb``: the
    corpus already embedded by this encoder (sets of several splits with ``corpus="all"`` share one)."""
    eval_set = eval_set or RetrievalSet(data, split, max_queries, corpus=corpus)
    if corpus_emb is None:
        corpus_emb = encoder.encode(eval_set.corpus, "positive", batch_size=batch_size, progress=progress)
    queries = encoder.encode(eval_set.queries, "query", batch_size=batch_size, progress=progress)
    return eval_set.score(queries, corpus_emb, per_query=per_query)


# --------------------------------------------------------------------------------------------------
# Loading a saved model: a sentence-transformers export, a merged HF folder, or the bundled default
# --------------------------------------------------------------------------------------------------


def encoder_config_for(path: str | None, pooling: str | None = None, max_length: int | None = None) -> EncoderConfig:
    """An EncoderConfig for a saved model; a sentence-transformers folder tells its pooling, normalisation
    and length (:func:`b3stream.encoder.settled`)."""
    from .encoder import resolve_model, sentence_transformers_settings

    cfg = EncoderConfig(model=path, lora=LoraConfig(enabled=False))
    length = sentence_transformers_settings(resolve_model(path)).get("max_seq_length") if path else None
    if length:
        cfg.max_query_length = cfg.max_positive_length = length
    if pooling:
        cfg.pooling = pooling
    if max_length:
        cfg.max_query_length = cfg.max_positive_length = max_length
    return cfg


def evaluate_path(model: str | None, data: str | Path, split: str = "test", max_queries: int | None = None,
                  batch_size: int = 64, pooling: str | None = None, max_length: int | None = None,
                  progress: bool = True, corpus: str = "split", per_query: str | Path | None = None) -> dict:
    """``b3stream evaluate``: load a saved model (None: the bundled MiniLM) and evaluate it. ``model`` may
    also be a training export folder (RUN/export): its sentence-transformers model is used."""
    import torch

    if model and (Path(model) / "sentence-transformers" / "modules.json").is_file():
        model = str(Path(model) / "sentence-transformers")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    eval_set = RetrievalSet(data, split, max_queries, corpus=corpus)  # bad data or split: before the model loads
    encoder = Encoder(encoder_config_for(model, pooling, max_length), trainable=False, dtype=dtype, device=device)
    return evaluate_encoder(encoder, data, split, max_queries, batch_size, progress, eval_set=eval_set,
                            per_query=per_query)


def format_metrics(metrics: dict) -> str:
    parts = [f"{k} {metrics[k]:.4f}" for k in METRICS if k in metrics and not math.isnan(metrics[k])]
    where = f", corpus: {metrics['corpus_mode']}" if "corpus_mode" in metrics else ""
    return " | ".join(parts) + f" ({metrics.get('queries', 0)} queries, {metrics.get('corpus', 0)} documents{where})"

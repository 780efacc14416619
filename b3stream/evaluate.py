"""Retrieval evaluation on a held-out split: nDCG@10, MRR@10, Recall@1, Recall@10.

The corpus is every distinct (prompted) positive of the split and the queries are its distinct (prompted)
queries, optionally a seeded sample of them. A query's relevant documents are the positives of all the
records that share its text (usually one), so duplicated texts neither inflate nor deflate a score.
Search is exact inner product with FAISS (on the GPU when faiss has GPU support and one is present), which
is cosine similarity for the normalised embeddings the encoder produces.

Relevance is binary: nDCG@10 = sum over hits of 1/log2(rank+1), divided by the same for an ideal ranking
of min(|relevant|, 10) hits; Recall@k = share of a query's relevant documents in its top k.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .config import EncoderConfig, LoraConfig
from .data.manifest import Manifest
from .data.reader import ShardedDataset
from .encoder import Encoder

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10")


# --------------------------------------------------------------------------------------------------
# Metrics from rankings
# --------------------------------------------------------------------------------------------------


def retrieval_metrics(ranked: np.ndarray, relevant: list[set[int]]) -> dict[str, float]:
    """``ranked[i]``: document indices for query i, best first (at least 10 columns, -1 = none);
    ``relevant[i]``: the set of relevant document indices. Returns the mean of each metric."""
    if len(ranked) != len(relevant):
        raise ValueError("one ranking per query")
    if len(ranked) == 0:
        return {name: float("nan") for name in METRICS}
    discounts = 1.0 / np.log2(np.arange(2, 12))
    sums = dict.fromkeys(METRICS, 0.0)
    for row, rel in zip(ranked, relevant):
        hits = np.array([doc in rel for doc in row[:10]], dtype=bool)
        ideal = discounts[: min(len(rel), 10)].sum()
        sums["ndcg@10"] += float(discounts[: len(hits)][hits].sum() / ideal) if ideal else 0.0
        first = np.flatnonzero(hits)
        sums["mrr@10"] += 1.0 / (first[0] + 1) if len(first) else 0.0
        sums["recall@1"] += hits[:1].sum() / len(rel)
        sums["recall@10"] += hits.sum() / len(rel)
    return {k: float(v / len(ranked)) for k, v in sums.items()}


def search(queries: np.ndarray, corpus: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k by inner product (FAISS); rows padded with -1 when the corpus is smaller than k."""
    import faiss

    index = faiss.IndexFlatIP(corpus.shape[1])
    try:
        import torch

        if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources"):
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    except ImportError:
        pass
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids


# --------------------------------------------------------------------------------------------------
# The evaluation set of a split
# --------------------------------------------------------------------------------------------------


class RetrievalSet:
    """Distinct prompted queries and positives of one split, with the relevance between them."""

    def __init__(self, data: str | Path, split: str = "test", max_queries: int | None = None, seed: int = 0):
        manifest = Manifest.load(data)
        records = ShardedDataset(data, split, manifest=manifest)
        docs: dict[str, int] = {}
        rel: dict[str, set[int]] = {}
        for rec in records:  # every rank streams the whole split, in id order
            doc, query = manifest.prompted(rec, "positive"), manifest.prompted(rec, "query")
            rel.setdefault(query, set()).add(docs.setdefault(doc, len(docs)))
        queries = list(rel)
        if max_queries is not None and len(queries) > max_queries:
            keep = np.sort(np.random.default_rng(seed).choice(len(queries), max_queries, replace=False))
            queries = [queries[i] for i in keep]
        self.split = split
        self.queries = queries
        self.relevant = [rel[q] for q in queries]
        self.corpus = list(docs)

    def score(self, query_emb: np.ndarray, corpus_emb: np.ndarray) -> dict:
        ranked = search(query_emb, corpus_emb, k=10)
        out = retrieval_metrics(ranked, self.relevant)
        out.update(queries=len(self.queries), corpus=len(self.corpus))
        return out


def evaluate_encoder(encoder: Encoder, data: str | Path, split: str = "test", max_queries: int | None = None,
                     batch_size: int = 64, progress: bool = False, eval_set: RetrievalSet | None = None) -> dict:
    """Embed the split's queries and positives with ``encoder`` and score the retrieval."""
    eval_set = eval_set or RetrievalSet(data, split, max_queries)
    corpus = encoder.encode(eval_set.corpus, "positive", batch_size=batch_size, progress=progress)
    queries = encoder.encode(eval_set.queries, "query", batch_size=batch_size, progress=progress)
    return eval_set.score(queries, corpus)


# --------------------------------------------------------------------------------------------------
# Loading a saved model: a sentence-transformers export, a merged HF folder, or the bundled default
# --------------------------------------------------------------------------------------------------


def encoder_config_for(path: str | None, pooling: str | None = None, max_length: int | None = None) -> EncoderConfig:
    """An EncoderConfig for a saved model; a sentence-transformers folder tells its pooling and length."""
    cfg = EncoderConfig(model=path, lora=LoraConfig(enabled=False))
    folder = Path(path) if path else None
    if folder is not None and (folder / "modules.json").is_file():
        modules = json.loads((folder / "modules.json").read_text())
        for m in modules:
            kind = m.get("type", "")
            if kind.endswith("Pooling"):
                pool = json.loads((folder / m["path"] / "config.json").read_text())
                if pool.get("pooling_mode_cls_token"):
                    cfg.pooling = "cls"
                elif pool.get("pooling_mode_lasttoken"):
                    cfg.pooling = "last"
                else:
                    cfg.pooling = "mean"
        cfg.normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        st = folder / "sentence_bert_config.json"
        if st.is_file():
            length = json.loads(st.read_text()).get("max_seq_length")
            if length:
                cfg.max_query_length = cfg.max_positive_length = int(length)
    if pooling:
        cfg.pooling = pooling
    if max_length:
        cfg.max_query_length = cfg.max_positive_length = max_length
    return cfg


def evaluate_path(model: str | None, data: str | Path, split: str = "test", max_queries: int | None = None,
                  batch_size: int = 64, pooling: str | None = None, max_length: int | None = None,
                  progress: bool = True) -> dict:
    """``b3stream evaluate``: load a saved model (None: the bundled MiniLM) and evaluate it. ``model`` may
    also be a training export folder (RUN/export): its sentence-transformers model is used."""
    import torch

    if model and (Path(model) / "sentence-transformers" / "modules.json").is_file():
        model = str(Path(model) / "sentence-transformers")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    encoder = Encoder(encoder_config_for(model, pooling, max_length), trainable=False, dtype=dtype, device=device)
    return evaluate_encoder(encoder, data, split, max_queries, batch_size, progress)


def format_metrics(metrics: dict) -> str:
    parts = [f"{k} {metrics[k]:.4f}" for k in METRICS if k in metrics and not math.isnan(metrics[k])]
    return " | ".join(parts) + f" ({metrics.get('queries', 0)} queries, {metrics.get('corpus', 0)} documents)"

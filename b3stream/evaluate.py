"""Retrieval evaluation: nDCG@10, MRR@10, Recall@1/@10/@100 and MAP@100, exact search, per-query lines.

Two kinds of evaluation set, scored the same way:

- :class:`RetrievalSet`, a held-out split of a prepared dataset. The queries are the split's distinct (prompted)
  queries, optionally a seeded sample of them. The corpus is either ``all`` (the default): every distinct
  (prompted) positive of *every* split of the dataset, the training positives acting as distractors, or
  ``split``: the split's own positives only. A corpus as small as one held-out split makes retrieval easy
  (zero-shot Recall@10 near 0.94 on the code-search data) and hides differences between models. A query's
  relevant documents are the positives of every record (of the corpus's splits) that shares its text, usually
  one, so duplicated texts neither inflate nor deflate a score and a positive is never a distractor for its own
  query.
- :class:`BeirSet`, a folder in the BEIR format (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``):
  every query of the qrels against the folder's whole corpus, with graded relevance (a document's title and
  text joined by a space, as BEIR's sentence-transformers retriever joins them).

Search is exact: inner products (cosine similarity for the normalised embeddings the encoder produces) as a
torch matmul and top-100 over blocks of queries, on the GPU when torch sees one. The metrics are trec_eval's,
computed by ``pytrec_eval`` (``pytrec-eval-terrier``, the implementation BEIR and MTEB report with) on that
ranking: nDCG@10 with the relevance grade as gain (``ndcg_cut.10``), MRR@10 (``recip_rank`` over the top 10),
Recall@k (``recall.k``: the share of a query's relevant documents in its top k) and MAP@100 (``map_cut.100``).
:func:`per_query_metrics` is the project's own implementation of the same definitions, checked against it in
the tests (to 1e-6) and used where pytrec_eval is not installed.

Per query (``per_query``), the rank of the best-ranked relevant document and the metrics are written one JSON
line per query, in query order, so two models scored on the same set can be compared pairwise
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

METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")
DEPTH = 100  # documents ranked per query: the deepest cut-off of METRICS
CORPORA = ("split", "all")  # what a query of a dataset split is searched against (module docstring)


# --------------------------------------------------------------------------------------------------
# Metrics from rankings
# --------------------------------------------------------------------------------------------------


Relevant = "set[int] | dict[int, float]"  # relevant document indices, or index -> grade (> 0: relevant)


def _grades(rel) -> dict[int, float]:
    """A query's relevance as {document index: grade}: a set means grade 1 for each."""
    return {int(d): float(g) for d, g in rel.items()} if isinstance(rel, dict) else {int(d): 1.0 for d in rel}


def per_query_metrics(ranked: np.ndarray, relevant: list) -> dict[str, np.ndarray]:
    """``ranked[i]``: document indices for query i, best first (-1 = none; the cut-offs of :data:`METRICS` read
    as many columns as there are); ``relevant[i]``: the set of relevant document indices, or a mapping index ->
    grade (graded relevance; a grade <= 0 is not relevant). Returns each metric per query (float arrays), by
    trec_eval's definitions: nDCG@10 with the grade as gain, the ideal ranking over all judged documents;
    Recall@k and MAP@100 over all relevant documents, retrieved or not; 0 for a query with none."""
    if len(ranked) != len(relevant):
        raise ValueError("one ranking per query")
    discounts = 1.0 / np.log2(np.arange(2, 12))
    out = {name: np.zeros(len(ranked)) for name in METRICS}
    for i, (row, rel) in enumerate(zip(ranked, relevant)):
        grades = _grades(rel)
        gains = np.array([grades.get(int(doc), 0.0) if doc >= 0 else 0.0 for doc in row[:DEPTH]])
        hits = gains > 0
        n_rel = int(sum(g > 0 for g in grades.values()))
        ideal = np.sort([g for g in grades.values() if g > 0])[::-1][:10]
        idcg = float((ideal * discounts[: len(ideal)]).sum())
        top = gains[:10]
        out["ndcg@10"][i] = float((top * discounts[: len(top)]).sum() / idcg) if idcg > 0 else 0.0
        first = np.flatnonzero(hits[:10])
        out["mrr@10"][i] = 1.0 / (first[0] + 1) if len(first) else 0.0
        if n_rel:
            for k in (1, 10, 100):
                out[f"recall@{k}"][i] = hits[:k].sum() / n_rel
            positions = np.flatnonzero(hits[:100]) + 1
            out["map@100"][i] = float((np.arange(1, len(positions) + 1) / positions).sum() / n_rel)
    return out


def trec_eval_metrics(ranked: np.ndarray, relevant: list) -> dict[str, np.ndarray]:
    """:func:`per_query_metrics` computed by ``pytrec_eval`` (trec_eval's C code) on the same ranking: each
    document scored by its rank, so trec_eval's sort reproduces the ranking exactly. ImportError without it."""
    import pytrec_eval

    qrels = {str(i): {str(d): int(round(g)) for d, g in _grades(rel).items()} for i, rel in enumerate(relevant)}

    def run(depth: int) -> dict:  # a query with nothing ranked gets one unjudged document, so it is scored (0)
        return {str(i): {str(int(d)): float(depth - r) for r, d in enumerate(row[:depth]) if d >= 0} or {"none": 0.0}
                for i, row in enumerate(ranked)}

    deep = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}).evaluate(run(DEPTH))
    shallow = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run(10))
    names = {"ndcg@10": "ndcg_cut_10", "recall@1": "recall_1", "recall@10": "recall_10", "recall@100": "recall_100",
             "map@100": "map_cut_100"}
    out = {name: np.array([deep[str(i)][key] for i in range(len(ranked))]) for name, key in names.items()}
    out["mrr@10"] = np.array([shallow[str(i)]["recip_rank"] for i in range(len(ranked))])
    return {name: out[name] for name in METRICS}


def query_metrics(ranked: np.ndarray, relevant: list) -> dict[str, np.ndarray]:
    """The metrics the sets report: pytrec_eval's (:func:`trec_eval_metrics`), or the project's own
    (:func:`per_query_metrics`, the same to 1e-6) where pytrec_eval is not installed."""
    if len(ranked) == 0:
        return {name: np.zeros(0) for name in METRICS}
    try:
        return trec_eval_metrics(ranked, relevant)
    except ImportError:
        return per_query_metrics(ranked, relevant)


def retrieval_metrics(ranked: np.ndarray, relevant: list) -> dict[str, float]:
    """The mean over queries of each metric of :func:`per_query_metrics`."""
    if len(ranked) != len(relevant):
        raise ValueError("one ranking per query")
    if len(ranked) == 0:
        return {name: float("nan") for name in METRICS}
    return {k: float(v.mean()) for k, v in per_query_metrics(ranked, relevant).items()}


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def search(queries: np.ndarray, corpus: np.ndarray, k: int = 10, relevant: list | None = None,
           block: int = 512) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product; rows padded with -1 when the corpus is smaller than k.

    A torch matmul + top-k over blocks of ``block`` queries (GPU when torch sees one): for a corpus of tens
    of thousands of rows this is exact and faster than a FAISS flat index on CPU, and it never holds more
    than ``block x len(corpus)`` scores. With ``relevant`` it also returns, per query, the rank (1-based) of
    its best relevant document: its position in the top k when there, else one plus the number of documents
    scoring strictly higher (at least k + 1), so the rank always agrees with the top-k metrics; 0 for a query
    none of whose relevant documents is in the corpus. ``relevant`` as for :func:`per_query_metrics`."""
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
            rel = {d for d, g in _grades(relevant[lo + j]).items() if g > 0 and 0 <= d < c.shape[0]}
            hit = [pos for pos, doc in enumerate(top[j]) if doc in rel]
            if hit:
                ranks[lo + j] = hit[0] + 1
            elif rel:
                best = scores[j, torch.as_tensor(sorted(rel), device=dev)].max()
                ranks[lo + j] = max(kk + 1, int((scores[j] > best).sum()) + 1)
    return ids if relevant is None else (ids, ranks)


# --------------------------------------------------------------------------------------------------
# Evaluation sets: a split of a prepared dataset, a BEIR folder
# --------------------------------------------------------------------------------------------------


class _Scored:
    """What both sets share: ``queries`` and ``corpus`` (prompted texts), ``relevant`` per query, ``label``."""

    queries: list[str]
    corpus: list[str]
    relevant: list
    label: str
    query_ids: list[str] | None = None

    def score(self, query_emb: np.ndarray, corpus_emb: np.ndarray, per_query: str | Path | None = None) -> dict:
        """Metrics of the embedded queries against the embedded corpus; ``per_query``: also write one
        JSON line per query (query text, rank of its best relevant document, the metrics)."""
        if len(query_emb) != len(self.queries) or len(corpus_emb) != len(self.corpus):
            raise ValueError(f"{len(query_emb)} query / {len(corpus_emb)} corpus embeddings for "
                             f"{len(self.queries)} queries / {len(self.corpus)} documents")
        ranked, ranks = search(query_emb, corpus_emb, k=DEPTH, relevant=self.relevant)
        values = query_metrics(ranked, self.relevant)
        out = {k: float(v.mean()) if len(v) else float("nan") for k, v in values.items()}
        out.update(queries=len(self.queries), corpus=len(self.corpus), corpus_mode=self.corpus_mode)
        if per_query is not None:
            write_per_query(per_query, self.queries, ranks, values, ids=self.query_ids)
        return out


def _sample(n: int, max_queries: int | None, seed: int) -> np.ndarray:
    """Indices of a seeded sample of ``max_queries`` of ``n`` queries, in their order (all when fewer)."""
    if max_queries is None or n <= max_queries:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_queries, replace=False))


class RetrievalSet(_Scored):
    """Distinct prompted queries of one split and the corpus they are searched in, with the relevance
    between them. ``corpus``: ``all`` (the positives of every split, in the manifest's split order, so every
    split's set shares one corpus list and one embedding of it) or ``split`` (that split's positives).
    ``task``: only that task's records, queries and corpus both (a multi-task set scored task by task, as MMEB
    scores each of its datasets against its own candidates). ``prompts``: the model's own prompts
    (``b3stream.encoder.model_prompts``), used where the dataset sets none."""

    def __init__(self, data: str | Path, split: str = "test", max_queries: int | None = None, seed: int = 0,
                 corpus: str = "all", task: str | None = None, pairs: list[tuple] | None = None,
                 prompts: dict[str, str] | None = None):
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
        for name, rec_task, query, doc in pairs if pairs is not None else prompted_pairs(data, names, prompts):
            if name not in names or (task is not None and rec_task != task):
                continue
            (rel if name == split else others).setdefault(query, set()).add(docs.setdefault(doc, len(docs)))
        queries = list(rel)
        queries = [queries[i] for i in _sample(len(queries), max_queries, seed)]
        self.split = self.label = split
        self.task = task
        self.corpus_mode = corpus
        self.queries = queries
        # Another split's record with a held-out query's text answers that query too: its positive is
        # relevant, not a distractor.
        self.relevant = [rel[q] | others.get(q, set()) for q in queries]
        self.corpus = list(docs)


def prompted_pairs(data: str | Path, splits: list[str] | None = None,
                   prompts: dict[str, str] | None = None) -> list[tuple[str, str | None, str, str]]:
    """(split, task, prompted query, prompted positive) of every record of ``splits`` (default: every split, in
    the manifest's order), in id order: what :class:`RetrievalSet` reads. Every rank streams it. ``prompts``:
    the model's own, where the dataset sets none (``b3stream.encoder.with_model_prompts``)."""
    from .model_folder import with_model_prompts

    manifest = with_model_prompts(Manifest.load(data), prompts or {})
    return [(name, rec.get("task"), manifest.prompted(rec, "query"), manifest.prompted(rec, "positive"))
            for name in (splits or manifest.splits) for rec in ShardedDataset(data, name, manifest=manifest)]


class BeirSet(_Scored):
    """A retrieval benchmark in the BEIR format: ``corpus.jsonl`` (``_id``, ``title``, ``text``),
    ``queries.jsonl`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``
    after a header line). Every query of the qrels (optionally a seeded sample of ``max_queries``) is searched
    in the whole corpus; its relevant documents are its qrels with a score above 0, graded by the score. A
    document is its title and text joined by a space (BEIR's sentence-transformers retriever). ``prompts``: the
    model's own (``query``, ``positive``), prepended to queries and documents. A malformed file is a
    ``DataError`` naming the file and line."""

    corpus_mode = "beir"

    def __init__(self, folder: str | Path, split: str = "test", max_queries: int | None = None, seed: int = 0,
                 prompts: dict[str, str] | None = None):
        from .data.manifest import DataError

        folder = Path(folder)
        qrels_path = folder / "qrels" / f"{split}.tsv"
        for path in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
            if not path.is_file():
                there = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
                raise DataError(f"{path}: missing; a BEIR folder holds corpus.jsonl, queries.jsonl and "
                                f"qrels/<split>.tsv" + (f" (its qrels splits: {', '.join(there)})" if there else ""))
        prompts = prompts or {}
        doc_ids: dict[str, int] = {}
        corpus: list[str] = []
        for line_no, row in _jsonl(folder / "corpus.jsonl"):
            if row["_id"] in doc_ids:
                raise DataError(f"{folder / 'corpus.jsonl'}:{line_no}: duplicate _id {row['_id']!r}")
            doc_ids[row["_id"]] = len(corpus)
            corpus.append(prompts.get("positive", "") + f"{row.get('title') or ''} {row.get('text') or ''}".strip())
        query_text = {row["_id"]: row.get("text") or "" for _, row in _jsonl(folder / "queries.jsonl")}
        judged: dict[str, dict[int, float]] = {}
        unknown: dict[str, int] = {}  # judged documents missing from the corpus: relevant, never retrieved
        with open(qrels_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                cells = line.rstrip("\n").split("\t")
                if line_no == 1 and cells[:2] == ["query-id", "corpus-id"] or not line.strip():
                    continue
                try:
                    qid, did, grade = cells[0], cells[1], float(cells[2])
                except (IndexError, ValueError):
                    raise DataError(f"{qrels_path}:{line_no}: expected query-id, corpus-id and a numeric score "
                                    f"separated by tabs, got {line.strip()[:80]!r}") from None
                if qid not in query_text:
                    raise DataError(f"{qrels_path}:{line_no}: query {qid!r} is not in queries.jsonl")
                doc = doc_ids[did] if did in doc_ids else unknown.setdefault(did, -2 - len(unknown))
                judged.setdefault(qid, {})[doc] = max(grade, 0.0)
        ids = list(judged)
        ids = [ids[i] for i in _sample(len(ids), max_queries, seed)]
        self.folder, self.split, self.label = folder, split, "beir"
        self.query_ids = ids
        self.queries = [prompts.get("query", "") + query_text[q] for q in ids]
        self.relevant = [judged[q] for q in ids]
        self.corpus = corpus
        self.missing_documents = len(unknown)


def _jsonl(path: Path):
    """(line number, object with a string ``_id``) of each line of ``path``."""
    from .data.manifest import DataError

    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{line_no}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("_id"), (str, int)):
                raise DataError(f"{path}:{line_no}: a record needs an _id")
            row["_id"] = str(row["_id"])
            yield line_no, row


def write_per_query(path: str | Path, queries: list[str], ranks: np.ndarray, values: dict[str, np.ndarray],
                    ids: list[str] | None = None) -> None:
    """One JSON line per query, in the set's query order (atomic: a temporary file renamed into place); ``ids``:
    the queries' own ids (a BEIR set's), written as ``id``."""
    from .files import write_atomic

    lines = [json.dumps({"query": q, **({"id": ids[i]} if ids is not None else {}), "rank": int(r),
                         **{k: float(values[k][i]) for k in METRICS}})
             for i, (q, r) in enumerate(zip(queries, ranks))]
    write_atomic(path, "".join(line + "\n" for line in lines).encode())


def read_per_query(path: str | Path) -> list[dict]:
    """The lines :func:`write_per_query` wrote."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def evaluate_encoder(encoder: Encoder, data: str | Path | None, split: str = "test",
                     max_queries: int | None = None, batch_size: int = 64, progress: bool = False,
                     eval_set: _Scored | None = None, corpus: str = "all", per_query: str | Path | None = None,
                     corpus_emb: np.ndarray | None = None) -> dict:
    """Embed the set's queries and corpus with ``encoder`` and score the retrieval (``eval_set``: a
    :class:`RetrievalSet` or :class:`BeirSet`; default: the split of ``data``, with the encoder's prompts).
    ``corpus_emb``: the corpus already embedded by this encoder (sets of several splits with ``corpus="all"``
    share one)."""
    eval_set = eval_set or RetrievalSet(data, split, max_queries, corpus=corpus, prompts=encoder.prompts)
    if corpus_emb is None:
        corpus_emb = encoder.encode(eval_set.corpus, "positive", batch_size=batch_size, progress=progress)
    queries = encoder.encode(eval_set.queries, "query", batch_size=batch_size, progress=progress)
    return eval_set.score(queries, corpus_emb, per_query=per_query)


# --------------------------------------------------------------------------------------------------
# Loading a saved model: a sentence-transformers export, a merged HF folder, or the bundled default
# --------------------------------------------------------------------------------------------------


def encoder_config_for(path: str | None, pooling: str | None = None, max_length: int | None = None) -> EncoderConfig:
    """An EncoderConfig for a saved model, embedding as sentence-transformers would: a sentence-transformers
    folder tells its pooling, normalisation (:func:`b3stream.encoder.settled`) and lengths, the query and
    document lengths apart where it has them (b3stream's exports do). ``max_length``: both lengths."""
    from .st_folder import read_sentence_transformers_folder, resolve_model

    cfg = EncoderConfig(model=path, lora=LoraConfig(enabled=False))
    st = read_sentence_transformers_folder(resolve_model(path)) if path else None
    if st is not None:
        cfg.max_query_length = st.query_limit or cfg.max_query_length
        cfg.max_positive_length = st.document_limit or cfg.max_positive_length
    if pooling:
        cfg.pooling = pooling
    if max_length:
        cfg.max_query_length = cfg.max_positive_length = max_length
    return cfg


def evaluate_path(model: str | None, data: str | Path | None, split: str = "test", max_queries: int | None = None,
                  batch_size: int = 64, pooling: str | None = None, max_length: int | None = None,
                  progress: bool = True, corpus: str = "all", per_query: str | Path | None = None,
                  beir: str | Path | None = None) -> dict:
    """``b3stream evaluate``: load a saved model (None: the bundled MiniLM) and evaluate it on ``split`` of the
    prepared dataset ``data``, or of the BEIR folder ``beir`` (its ``qrels/<split>.tsv``). ``model`` may also be
    a training export folder (RUN/export): its sentence-transformers model is used. The model's own prompts
    serve where the data has none."""
    import torch

    from .model_folder import model_prompts

    if model and (Path(model) / "sentence-transformers" / "modules.json").is_file():
        model = str(Path(model) / "sentence-transformers")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    cfg = encoder_config_for(model, pooling, max_length)
    prompts = model_prompts(cfg)
    # bad data or split: before the model loads
    eval_set = BeirSet(beir, split, max_queries, prompts=prompts) if beir is not None else \
        RetrievalSet(data, split, max_queries, corpus=corpus, prompts=prompts)
    encoder = Encoder(cfg, trainable=False, dtype=dtype, device=device)
    return evaluate_encoder(encoder, data, split, max_queries, batch_size, progress, eval_set=eval_set,
                            per_query=per_query)


def format_metrics(metrics: dict) -> str:
    parts = [f"{k} {metrics[k]:.4f}" for k in METRICS if k in metrics and not math.isnan(metrics[k])]
    where = f", corpus: {metrics['corpus_mode']}" if "corpus_mode" in metrics else ""
    return " | ".join(parts) + f" ({metrics.get('queries', 0)} queries, {metrics.get('corpus', 0)} documents{where})"

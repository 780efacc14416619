"""Stage 2, rank: FAISS top-(p+m) positives of every query -> S = R[:, p:p+m], T = R[:, :p] (B3 paper, 3.1).

For query ``x_i`` the positives ``y_j`` of the (task's) data are ranked by inner product of the
L2-normalised teacher embeddings (cosine). The query's own positive ``y_i`` is removed; the ``p`` highest
remaining ranks are skipped because they are likely false negatives (paraphrases, duplicates); ranks
``[p, p+m)`` are kept as row ``i`` of ``S`` (int32, N x m, global ids). The skipped ranks ``[0, p)`` are kept
too, as row ``i`` of ``T`` (int32, N x p, global ids): they never enter ``S[i]``, but they can appear in
another member's ``S`` row, and B3++ must not hand them to ``i`` as hard negatives through that row
(:mod:`b3stream.mining.negatives`). ``R`` itself is never built: FAISS returns only the top ``p+m+1`` per
query, queries go through in chunks, so memory is O(N (p+m)).

Index choice (``index``): ``flat`` is exact; ``ivf`` (IVFFlat, ``ivf_nlist`` lists, ``ivf_nprobe`` probes)
and ``hnsw`` (HNSW-flat, ``hnsw_m`` links, ``hnsw_ef_search``) are approximate; ``auto`` takes flat up to
``exact_threshold`` positives per task and IVF above. For an approximate index the recall@(p+m+1) against
exact search is measured on ``recall_sample`` queries and logged and recorded. When FAISS sees a GPU, flat
and IVF indexes are moved onto it (HNSW has no GPU version and stays on the CPU). ``torch`` is exact search
as a chunked torch matmul + top-k (:class:`TorchIndex`, on the GPU when torch sees one): the same results as
``flat`` (scores to float rounding, ids but for the order of equal scores). On a machine where torch sees a
GPU but FAISS has no GPU build (the faiss-cpu wheel), ``auto`` and ``flat`` use it, so mining never ranks on
the CPU beside an idle GPU; an explicit ``ivf`` or ``hnsw`` is kept as asked. ``device`` (MineConfig
``device``, the miner's ``refresh.device``) says where: ``cpu`` keeps every index on the CPU, ``cuda:N`` puts
the torch index and FAISS's GPU index on GPU N (not GPU 0), None is the first GPU when there is one.

Per task (``per_task``, the default) each task is ranked against its own positives only, as the paper mines
each dataset separately; local row numbers are mapped back to global ids. ``p + m`` must be below every
task's size (the own positive is not a candidate), else :class:`ConfigError` names the task; with
``small_tasks: merge`` the tasks too small for that are ranked (and partitioned) together as one group.

Same-text positives (:mod:`b3stream.data.dedup`): every id whose positive text equals the query's own
positive is removed with the own positive, before the top ``p`` are counted: it is the query's correct answer
under another id, never a negative (the paper's "filter out the golden label" for classification). Such ids
score exactly like the own positive, so the search is widened by the largest duplicate count in the group
(capped at ``p + m``; a row with more duplicates than that comes back short and is padded). The same holds
for a query's *known positives* (the other positives of its query, a FlagEmbedding ``pos`` list prepared one
example per positive): every id whose positive has one of those texts is removed too, and the search widened
by as many.

Per-task ``p`` and ``m`` (``task_params: {task: {p: .., m: ..}}``): the paper skips p = 30 ranks for
retrieval and p = 70 for VQA. ``S`` is as wide as the largest ``m`` and ``T`` as the largest ``p``; narrower
tasks are padded with ``-1``. A merged group of small tasks uses the global ``p`` and ``m``.

Refreshed mode (MineConfig ``trained_ids``): at a mid-epoch snapshot the ids already trained in the epoch
are ranked apart from the ids still to come (:func:`split_trained`), so each of those gets its ranks
``[p, p+m)`` among the ids it can still share a batch with.

Margin filter (optional, NV-Retriever's "TopK-PercPos"): a candidate scoring above ``margin`` times the
query's own positive score is dropped as a probable false negative.

Padding policy: a row with fewer than ``m`` candidates (approximate search came back short, or the margin
filter dropped some) keeps its candidates first, in rank order, and is padded on the right with ``-1``
(score 0). A row of ``T`` is padded likewise when the search returned fewer than ``p`` results besides the
own positive (the margin filter never touches ``T``: its ranks are excluded anyway). Every consumer ignores
``-1``.

Output, in ``OUT/rank/``: ``S.npy`` (int32, N x m), ``scores.npy`` (float16, N x m, the teacher's cosine
for each entry of S), ``top.npy`` (int32, N x p; N x 0 when p = 0) and ``rank.json`` (record: parameters,
index per task, recall, padded rows, the shape of T).
"""

from __future__ import annotations

import sys
import time
import warnings
import dataclasses
from dataclasses import dataclass

import numpy as np
from ..progress import progress_bar

from ..config import ConfigError
from ..data.dedup import KnownKeys, max_multiplicity
from .artefacts import log
from .embed import Embeddings, check_vectors

FOLDER = "rank"
RECORD = "rank.json"
INDEXES = ("auto", "flat", "ivf", "hnsw", "torch")


@dataclass
class RankParams:
    """The ranking knobs of MineConfig (p, m and the index choice)."""

    p: int = 30
    m: int = 100
    per_task: bool = True
    index: str = "auto"
    exact_threshold: int = 50_000
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    recall_sample: int = 1000
    margin: float | None = None
    small_tasks: str = "error"
    task_params: dict | None = None  # task -> {"p": .., "m": ..}: per-task overrides of p and m
    seed: int = 0
    query_chunk: int = 4096

    @classmethod
    def from_config(cls, cfg) -> "RankParams":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: getattr(cfg, k) for k in names if hasattr(cfg, k)})

    def check(self) -> None:
        if self.p < 0 or self.m < 1:
            raise ConfigError(f"need p >= 0 and m >= 1, got p={self.p}, m={self.m}")
        if self.index not in INDEXES:
            raise ConfigError(f"index must be one of {INDEXES}, got {self.index!r}")
        if self.margin is not None and not 0 < self.margin <= 1.5:
            raise ConfigError(f"margin must be a fraction of the positive's score (e.g. 0.95), got {self.margin}")
        for task, entry in (self.task_params or {}).items():
            if not isinstance(entry, dict) or not entry or set(entry) - {"p", "m"}:
                raise ConfigError(f"task_params.{task} must map to p and/or m, got {entry!r}")
            for key, value in entry.items():
                low = 0 if key == "p" else 1
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ConfigError(f"task_params.{task}.{key} must be an integer >= {low}, got {value!r}")

    def for_group(self, name: str) -> "RankParams":
        """These parameters with the group's own p and m (``task_params``), if it has any."""
        entry = (self.task_params or {}).get(name)
        if not entry:
            return self
        return dataclasses.replace(self, p=entry.get("p", self.p), m=entry.get("m", self.m))


SMALL_TASKS = "(small tasks)"


def task_groups(tasks: np.ndarray, task_names: list[str], per_task: bool, merge_below: int = 0
                ) -> list[tuple[str, np.ndarray]]:
    """(name, sorted global ids) of each group mined apart: one per task, or everything together.

    ``merge_below`` (``small_tasks: merge``): tasks with fewer examples form one group named
    ``(small tasks)``, placed last; while that group is itself still too small, the smallest remaining
    task joins it (ties: the earlier task), so every group can be ranked.
    """
    if not per_task or len(task_names) <= 1:
        return [("all" if len(task_names) != 1 else task_names[0], np.arange(len(tasks), dtype=np.int64))]
    order = np.argsort(tasks, kind="stable")
    bounds = np.searchsorted(tasks[order], np.arange(len(task_names) + 1))
    groups = [(task_names[t], np.sort(order[bounds[t] : bounds[t + 1]]).astype(np.int64))
              for t in range(len(task_names)) if bounds[t + 1] > bounds[t]]
    small = [g for g in groups if len(g[1]) < merge_below]
    if not small:
        return groups
    rest = sorted((g for g in groups if len(g[1]) >= merge_below), key=lambda g: len(g[1]))
    while sum(len(ids) for _, ids in small) < merge_below and rest:
        small.append(rest.pop(0))
    merged = {name for name, _ in small}
    return [g for g in groups if g[0] not in merged] + \
        [(SMALL_TASKS, np.sort(np.concatenate([ids for _, ids in small])))]


def check_sizes(groups: list[tuple[str, np.ndarray]], prm: RankParams) -> None:
    for name, ids in groups:
        p, m = prm.for_group(name).p, prm.for_group(name).m
        if p + m >= len(ids):
            what = "the small tasks together have" if name == SMALL_TASKS else f"task {name!r} has"
            raise ConfigError(
                f"p + m = {p} + {m} = {p + m} but {what} only {len(ids)} examples; ranking needs "
                f"p + m < n within a task (the query's own positive is not a candidate). Lower p and m, set "
                f"small_tasks: merge to rank tasks that small together, or per_task: false to rank all tasks "
                f"together"
            )


def split_trained(groups: list[tuple[str, np.ndarray]], trained: np.ndarray | None
                  ) -> list[tuple[str, str, np.ndarray]]:
    """``(record name, task name, ids)`` per group mined apart: each group's untrained ids apart from its
    trained ones (``trained``: a boolean mask over all ids, or None: the groups as they are).

    Refreshed mode swaps schedules mid-epoch, and the trainer then skips the ids it has already trained on
    (exactly once per epoch). Both the ranking and the partition keep the untrained ids to themselves:
    ranked among all ids, an untrained query's ranks ``[p, p+m)`` would be spent partly on trained ids the
    graph then drops, leaving a sparse graph and loose communities for the rest of the epoch; partitioned with
    them, a community would reach the trainer as a fragment (with K = |B|, fragments of several communities
    share a batch, i.e. a smaller effective K). The trained ids (skipped anyway) are mined apart likewise."""
    if trained is None:
        return [(name, name, ids) for name, ids in groups]
    out = []
    for name, ids in groups:
        done = trained[ids]
        out += [(label, name, part) for label, part in ((name, ids[~done]), (f"{name} (trained)", ids[done]))
                if len(part)]
    return out


def merge_threshold(small_tasks: str, p: int, m: int) -> int:
    """Task size below which ``small_tasks: merge`` pools a task with the other small ones."""
    if small_tasks not in ("error", "merge"):
        raise ConfigError(f"small_tasks must be 'error' or 'merge', got {small_tasks!r}")
    return p + m + 1 if small_tasks == "merge" else 0


# --------------------------------------------------------------------------------------------------
# FAISS
# --------------------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ConfigError(
            "this index needs FAISS, which is not installed: pip install faiss-cpu (or faiss-gpu on a CUDA "
            "machine), or set index: torch for exact search with torch") from e
    return faiss


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_available() -> bool:
    """FAISS is installed and sees a GPU. Without FAISS on a CUDA machine ``auto``/``flat`` use the torch
    index (exact search on the GPU), so a GPU box needs no FAISS build matching its CUDA."""
    if not faiss_installed():
        return False
    faiss = _faiss()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_index(n: int, prm: RankParams, cuda: bool | None = None, faiss_gpu: bool | None = None,
                 device=None) -> str:
    """The index for ``n`` positives. ``cuda``: torch sees a GPU; ``faiss_gpu``: FAISS does (both detected
    when None). With a GPU that FAISS cannot use, exact torch search on the GPU replaces ``auto`` and ``flat``:
    exact costs O(n) per query, but on the GPU that beats IVF on the CPU, and its recall is 1. ``device``
    ``cpu``: no GPU is used, whatever torch and FAISS see."""
    if on_cpu(device):
        cuda = faiss_gpu = False
    if prm.index in ("auto", "flat"):
        cuda = torch_cuda_available() if cuda is None else cuda
        if cuda and not (gpu_available() if faiss_gpu is None else faiss_gpu):
            return "torch"
    if prm.index != "auto":
        return prm.index
    return "flat" if n <= prm.exact_threshold else "ivf"


def on_cpu(device) -> bool:
    """Whether ``device`` (None, "cpu", "cuda", "cuda:N" or a torch.device) keeps ranking off every GPU."""
    return device is not None and str(device).split(":")[0] == "cpu"


def gpu_number(device) -> int:
    """The GPU that ``device`` names, for FAISS (``index_cpu_to_gpu`` takes a number): N of ``cuda:N``; for
    None or ``cuda``, torch's current GPU (0 unless the process chose another)."""
    import torch

    index = torch.device(device).index if device is not None else None
    if index is not None:
        return int(index)
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


class TorchIndex:
    """Exact inner-product top-k with torch, FAISS's ``search(queries, k) -> (D, I)`` interface.

    ``base`` is copied once to ``device`` (default: the GPU when torch sees one) as float32, unless it would
    take more than ``max_device_bytes`` there; then it stays in (pinned) host memory and goes over block by
    block. Queries run in blocks of ``qblock`` rows against base blocks of ``chunk`` rows, merged top-k by
    top-k, so no (queries x n) matrix is ever built. Scores are float32 inner products, as IndexFlatIP's.
    """

    def __init__(self, base: np.ndarray, device=None, chunk: int = 65536, qblock: int = 4096,
                 max_device_bytes: int | None = None):
        import torch

        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.chunk, self.qblock = chunk, qblock
        self.ntotal, self.d = base.shape
        host = torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))
        if self.device.type == "cuda":
            if max_device_bytes is None:
                free, _ = torch.cuda.mem_get_info(self.device)
                max_device_bytes = int(free * 0.5)
            if host.numel() * 4 <= max_device_bytes:
                self.base, self.resident = host.to(self.device), True
            else:
                self.base, self.resident = host.pin_memory(), False
        else:
            self.base, self.resident = host, True

    def _blocks(self):
        for lo in range(0, self.ntotal, self.chunk):
            block = self.base[lo : lo + self.chunk]
            yield lo, block if self.resident else block.to(self.device, non_blocking=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        D = np.empty((len(q), k), dtype=np.float32)
        I = np.empty((len(q), k), dtype=np.int64)
        with torch.no_grad():
            for a in range(0, len(q), self.qblock):
                block = q[a : a + self.qblock].to(self.device, non_blocking=True)
                d, i = topk_blocks(block, self._blocks(), k)
                D[a : a + len(block)] = d.cpu().numpy()
                I[a : a + len(block)] = i.cpu().numpy()
        return D, I


def topk_blocks(q, blocks, k: int, exclude=None):
    """Exact top-``k`` of ``q @ base.T`` over ``blocks`` of base rows ``(lo, tensor)``, merged block by block:
    (scores, ids), -inf / -1 where the base has fewer than ``k`` rows. ``exclude[r]``: a base row query r
    skips (-1: none)."""
    import torch

    nq = q.shape[0]
    best_d = torch.full((nq, k), -torch.inf, device=q.device)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=q.device)
    for lo, block in blocks:
        hi = lo + block.shape[0]
        sims = q @ block.T
        if exclude is not None:
            inside = torch.nonzero((exclude >= lo) & (exclude < hi)).flatten()
            sims[inside, exclude[inside] - lo] = -torch.inf
        local = sims.topk(min(k, sims.shape[1]), dim=1)  # this block's best, then merge with the best so far
        d = torch.cat([best_d, local.values], dim=1)
        i = torch.cat([best_i, local.indices + lo], dim=1)
        top = d.topk(k, dim=1)
        best_d, best_i = top.values, torch.gather(i, 1, top.indices)
    return best_d, best_i


def build_index(base: np.ndarray, kind: str, prm: RankParams, chunk: int = 65536, k: int | None = None,
                device=None):
    """An inner-product index over ``base`` (float16/32 rows, added chunk by chunk), on ``device`` (None: the
    first GPU when there is one; ``cpu``: the CPU; ``cuda:N``: GPU N, for the torch index and FAISS's GPU index).

    Returns (index, desc, keep): ``keep`` holds objects FAISS does not own (quantizer, GPU resources) and
    must live as long as the index.
    """
    n, d = base.shape
    desc: dict = {"kind": kind}
    keep: list = []
    if kind == "torch":
        index = TorchIndex(base, device=device)
        desc["device"] = "gpu" if index.device.type == "cuda" else "cpu"
        return index, desc, keep
    faiss = _faiss()
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = prm.ivf_nlist or int(min(65536, max(16, 4 * np.sqrt(n))))
        nlist = min(nlist, max(1, n // 39))  # FAISS wants ~39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        # k-means on ~40 points per list with 16 iterations: the lists only route the search, and the
        # recall check below says whether they route it well enough; full-size training costs as much as
        # the search itself on 2 cores.
        index.cp.niter = 16
        rng = np.random.default_rng(prm.seed)
        train_n = min(n, nlist * 40)
        sample = np.sort(rng.choice(n, size=train_n, replace=False))
        index.train(np.ascontiguousarray(base[sample], dtype=np.float32))
        index.nprobe = min(prm.ivf_nprobe, nlist)
        desc.update(nlist=nlist, nprobe=int(index.nprobe))
        keep.append(quantizer)  # FAISS does not own the quantizer: keep it alive with the index
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, prm.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        desc.update(M=prm.hnsw_m, ef_search=prm.hnsw_ef_search)
    else:
        raise ConfigError(f"unknown index {kind!r}; expected one of {INDEXES[1:]}")
    for start in range(0, n, chunk):
        index.add(np.ascontiguousarray(base[start : start + chunk], dtype=np.float32))
    if kind == "hnsw":
        index.hnsw.efSearch = max(prm.hnsw_ef_search, k or prm.p + prm.m + 1)  # HNSW returns at most efSearch
    if kind != "hnsw" and not on_cpu(device) and gpu_available():
        res = faiss.StandardGpuResources()
        keep += [res, index]
        index = faiss.index_cpu_to_gpu(res, gpu_number(device), index)
        desc["device"] = "gpu"
    else:
        desc["device"] = "cpu"
    return index, desc, keep


def search(index, queries: np.ndarray, k: int, chunk: int = 4096, progress: bool = False,
           desc: str = "rank"):
    """Yield ``(start, scores, ids)`` for the top-``k`` of each chunk of query rows (-1 ids where short)."""
    n = len(queries)
    bar = progress_bar(total=n, desc=desc, unit="query", disable=not progress, file=sys.stderr)
    for start in range(0, n, chunk):
        q = np.ascontiguousarray(queries[start : start + chunk], dtype=np.float32)
        D, I = index.search(q, k)
        yield start, D, I
        bar.update(len(q))
    bar.close()


def exact_search(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
                 chunk: int = 32768, qblock: int = 1024, progress: bool = False,
                 desc: str = "exact top-k", device=None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` over ``base``, by blocks of ``base`` (never the full
    matrix). ``exclude[r]``: a base row query r must skip (its own positive), or -1. Returns (scores, ids),
    float32 inner products as numpy arrays.

    Used for recall checks and the quality bound; torch's matmul + topk are several times faster than a
    numpy argpartition here (and than FAISS's flat index on this CPU wheel). ``device``: where the products
    run (None: the CPU); each block of ``base`` goes there in its stored precision and becomes float32
    there (torch's float16 -> float32 cast is about twice as fast as numpy's on the CPU, and a GPU gets
    half the bytes). The values are those of a float32 product either way.
    """
    import torch

    dev = torch.device(device or "cpu")
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    nq = q.shape[0]
    best_d = torch.full((nq, k), -torch.inf, device=dev)
    best_i = torch.full((nq, k), -1, dtype=torch.int64, device=dev)
    ex = None if exclude is None else torch.from_numpy(np.asarray(exclude, dtype=np.int64)).to(dev)
    bar = progress_bar(total=len(base), desc=desc, unit="row", disable=not progress, file=sys.stderr)
    for lo in range(0, len(base), chunk):
        rows = np.asarray(base[lo : lo + chunk])
        if rows.dtype not in (np.float16, np.float32):
            rows = rows.astype(np.float32)
        with warnings.catch_warnings():  # a read-only memmap's rows: never written to, only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            block = torch.from_numpy(np.ascontiguousarray(rows)).to(dev).float()
        for a in range(0, nq, qblock):
            # This block's best merged with the best so far (the carried top-k counts as block "-inf").
            d, i = topk_blocks(q[a : a + qblock], [(lo, block)], k, None if ex is None else ex[a : a + qblock])
            both_d = torch.cat([best_d[a : a + qblock], d], dim=1)
            both_i = torch.cat([best_i[a : a + qblock], i], dim=1)
            top = both_d.topk(k, dim=1)
            best_d[a : a + qblock] = top.values
            best_i[a : a + qblock] = torch.gather(both_i, 1, top.indices)
        bar.update(block.shape[0])
    bar.close()
    return best_d.cpu().numpy(), best_i.cpu().numpy()


# --------------------------------------------------------------------------------------------------
# S from search results
# --------------------------------------------------------------------------------------------------


def _compact(I: np.ndarray, D: np.ndarray, drop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move dropped entries to the end of each row, keeping the rank order of the rest."""
    order = np.argsort(drop, axis=1, kind="stable")
    return (np.take_along_axis(I, order, axis=1), np.take_along_axis(D, order, axis=1),
            np.take_along_axis(drop, order, axis=1))


def select_ranks(I: np.ndarray, D: np.ndarray, own: np.ndarray, p: int, m: int,
                 margin: float | None = None, positive_scores: np.ndarray | None = None,
                 keys: np.ndarray | None = None, known: KnownKeys | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-(p+m+1) search results -> (S, scores, T): S and its scores are ranks [p, p+m), T the skipped
    ranks [0, p); own positive (and, with ``keys``, every same-text positive, and with ``known`` every
    positive with the text of one of the row's known positives) removed first, both -1 padded.

    ``own[r]`` is the index (in the searched base) of row r's own positive; ``keys[j]`` the content key of
    base row j's positive; ``known`` the base rows' known positive keys (row j: base row j).
    """
    drop = (I < 0) | (I == own[:, None])
    if keys is not None:
        candidates = keys[np.maximum(I, 0)]
        drop |= candidates == keys[own][:, None]
        if known is not None:
            drop |= known.contains(own, candidates)
    I, D, drop = _compact(I, D, drop)
    T = np.where(drop[:, :p], -1, I[:, :p])
    if T.shape[1] < p:  # fewer results than p in total
        T = np.pad(T, ((0, 0), (0, p - T.shape[1])), constant_values=-1)
    I, D, drop = I[:, p : p + m], D[:, p : p + m], drop[:, p : p + m]
    if margin is not None:
        drop = drop | (D > margin * positive_scores[:, None])
        I, D, drop = _compact(I, D, drop)
    if I.shape[1] < m:  # fewer results than p+m+1 in total
        pad = m - I.shape[1]
        I = np.pad(I, ((0, 0), (0, pad)), constant_values=-1)
        D = np.pad(D, ((0, 0), (0, pad)))
        drop = np.pad(drop, ((0, 0), (0, pad)), constant_values=True)
    I = np.where(drop, -1, I)
    D = np.where(drop, 0.0, D)
    return I, D, T


def rank_group(queries: np.ndarray, positives: np.ndarray, prm: RankParams, progress: bool = False,
               name: str = "all", keys: np.ndarray | None = None, known: KnownKeys | None = None, device=None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(S, scores, T, info) for one group (ids local to the group: row r is the group's r-th example).
    ``keys``: content keys of the group's positives; same-text positives are dropped like the own one.
    ``known``: the group's rows' known positive keys; positives with those texts are dropped too.
    ``device``: where the index runs (:func:`build_index`).

    Search results are reduced to S and T chunk by chunk, so memory stays at the size of S and T (N x (p+m)).
    """
    n = len(queries)
    kind = choose_index(n, prm, device=device)
    # Duplicates of the own positive (and the known positives) score like it and are dropped: search deeper
    # by as many.
    width = known.width if known is not None and keys is not None else 0
    extra = 0 if keys is None else min(max_multiplicity(keys) * (1 + width) - 1, prm.p + prm.m)
    k = min(prm.p + prm.m + 1 + extra, n)
    t0 = time.perf_counter()
    index, desc, keep = build_index(positives, kind, prm, k=k, device=device)
    desc["duplicate_depth"] = int(extra)
    desc["build_s"] = round(time.perf_counter() - t0, 3)
    t1 = time.perf_counter()
    S = np.empty((n, prm.m), dtype=np.int32)
    scores = np.empty((n, prm.m), dtype=np.float32)
    T = np.empty((n, prm.p), dtype=np.int32)
    label = f"rank {name}" if name != "all" else "rank"
    for start, D, I in search(index, queries, k, prm.query_chunk, progress, desc=label):
        rows = np.arange(start, start + len(I))
        pos_scores = None
        if prm.margin is not None:  # the query's own positive score, for the margin filter
            q = np.asarray(queries[start : start + len(I)], dtype=np.float32)
            pos_scores = (q * np.asarray(positives[start : start + len(I)], dtype=np.float32)).sum(1)
        S[rows], scores[rows], T[rows] = select_ranks(I, D, rows, prm.p, prm.m, prm.margin, pos_scores, keys,
                                                      known)
    desc["search_s"] = round(time.perf_counter() - t1, 3)
    if kind not in ("flat", "torch") and prm.recall_sample > 0:  # torch is exact: recall 1
        rng = np.random.default_rng(prm.seed)
        sample = np.sort(rng.choice(n, size=min(n, prm.recall_sample), replace=False))
        q = np.asarray(queries[sample])
        _, approx = index.search(np.ascontiguousarray(q, dtype=np.float32), k)
        _, exact = exact_search(q, positives, k)
        hits = [len(np.intersect1d(a[a >= 0], b)) for a, b in zip(approx, exact)]
        desc["recall"] = round(float(np.mean(hits)) / k, 4)
        desc["recall_sample"] = int(len(sample))
        log.info("rank %s: %s index recall@%d vs exact = %.3f on %d queries", name, kind, k, desc["recall"],
                 len(sample))
    del index, keep
    desc["padded_rows"] = int((S[:, -1] < 0).sum())
    desc["n"] = n
    return S, scores, T, desc


def rank(emb: Embeddings, prm: RankParams, progress: bool = True, trained: np.ndarray | None = None,
         device=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(S, scores, T, info) for all of ``emb``: S (int32, N x m), its scores (float16) and the skipped top-p
    T (int32, N x p), global ids, -1 padded. ``trained`` (a boolean mask over the ids, refreshed mode's
    mid-epoch snapshots): the untrained ids are ranked among themselves (:func:`split_trained`); a part
    with ``p + m`` or fewer other ids gets short, padded rows rather than an error. ``device``: where the
    indexes run (:func:`build_index`; the miner's device)."""
    prm.check()
    groups = task_groups(emb.tasks, emb.task_names, prm.per_task, merge_threshold(prm.small_tasks, prm.p, prm.m))
    unknown = sorted(set(prm.task_params or {}) - {name for name, _ in groups})
    if unknown:
        raise ConfigError(f"task_params names task(s) {unknown} that are not ranked on their own here; tasks: "
                          f"{[name for name, _ in groups]}")
    check_sizes(groups, prm)
    check_vectors(emb.queries, f"{emb.folder}/queries.npy")
    check_vectors(emb.positives, f"{emb.folder}/positives.npy")
    N = emb.n
    width_m = max(prm.for_group(name).m for name, _ in groups)
    width_p = max(prm.for_group(name).p for name, _ in groups)
    S = np.full((N, width_m), -1, dtype=np.int32)
    scores = np.zeros((N, width_m), dtype=np.float16)
    T = np.full((N, width_p), -1, dtype=np.int32)
    info = {"groups": {}}
    for label, name, ids in split_trained(groups, trained):
        whole = len(ids) == N
        q = emb.queries if whole else emb.queries[ids]
        p = emb.positives if whole else emb.positives[ids]
        gprm = prm.for_group(name)
        s_local, sc, t_local, desc = rank_group(q, p, gprm, progress=progress, name=label,
                                                  keys=None if emb.keys is None else emb.keys[ids],
                                                  known=None if emb.known is None else emb.known.take(ids),
                                                  device=device)
        S[ids, : gprm.m] = np.where(s_local >= 0, ids[np.maximum(s_local, 0)], -1)
        T[ids, : gprm.p] = np.where(t_local >= 0, ids[np.maximum(t_local, 0)], -1)
        scores[ids, : gprm.m] = sc.astype(np.float16)
        desc.update(p=gprm.p, m=gprm.m)
        info["groups"][label] = desc
    info["padded_rows"] = int((S[:, -1] < 0).sum())
    return S, scores, T, info

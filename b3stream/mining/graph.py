"""Stage 3a, graph: the neighbour lists S -> a symmetric sparse graph in CSR form (B3 paper, section 3.1.1).

Row ``i`` of ``S`` lists the examples whose positives rank ``[p, p+m)`` for query ``i``: each is a strong
negative for ``i``. Seen as directed edges ``i -> S[i, c]``, they are made undirected for METIS, which
needs both directions of every edge:

- ``mutual`` (as the paper's code): keep ``{i, j}`` only if ``j`` is in ``S[i]`` *and* ``i`` is in ``S[j]``;
  the two are then strong negatives for each other, which is what a community should be made of;
- ``union``: keep ``{i, j}`` if either direction is present (denser graph, slower METIS).

Optional rank weights: entry ``S[i, c]`` weighs ``m - c`` (rank p weighs m, the last kept rank 1); an
undirected edge weighs the sum over its directions present. Without weights every edge weighs 1.

The CSR has no self loops and no duplicate entries, and ``j`` is in row ``i`` exactly when ``i`` is in row
``j`` (with the same weight). It is built by sorting 64-bit edge codes, never with ``np.isin`` or Python
loops: each directed entry becomes ``((min*n + max) << 1 | direction) << wbits | weight``; one in-place
sort brings the two directions of an edge (and any repeated entry) next to each other. Memory is a few
8-byte words per entry of S, i.e. O(N m), and no N x N structure exists. Codes must fit in 63 bits, which
holds for n up to about 10^8 (10^7 with rank weights).

Without rank weights (the default) a leaner path builds the same graph (:func:`_build_unweighted`):
``min << b | max`` codes (``b`` bits per id), a sentinel for padding instead of a counting pass, mutual
edges read off adjacent codes in one cache-sized scan, and a CSR from one sort of E codes instead of 2E
(a third less CPU time at 1M x 100, a lower peak).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import EDGE_MODES, ConfigError

EDGES = EDGE_MODES  # the modes the config accepts, named on the ground floor


@dataclass
class Graph:
    """An undirected graph in METIS's CSR form: the neighbours of ``v`` are
    ``adjncy[xadj[v]:xadj[v+1]]`` (weights ``eweights[...]`` alike, or None when unweighted)."""

    xadj: np.ndarray  # int64 (n+1,)
    adjncy: np.ndarray  # int32 (2E,) when n < 2^31, else int64
    eweights: np.ndarray | None  # int64 (2E,) or None
    stats: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.xadj) - 1

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.xadj)

    @property
    def num_edges(self) -> int:
        return len(self.adjncy) // 2

    def rows(self) -> np.ndarray:
        """Source node of every CSR entry (allocates 2E int64; meant for tests and small graphs)."""
        return np.repeat(np.arange(self.n, dtype=np.int64), self.degree)


def _check_fits(n: int, bits: int) -> None:
    if n > 1 and (2 * (n - 1).bit_length() + bits) > 62:
        raise ConfigError(f"graph of {n} nodes is too large for 63-bit edge codes with {bits} extra bits; "
                          "partition per task or without rank_weights")


def build_graph(S: np.ndarray, edges: str = "mutual", rank_weights: bool = False,
                chunk_rows: int = 65536) -> Graph:
    """Symmetric CSR graph of the neighbour lists ``S`` (n x m, entries in [0, n) or -1 for padding).

    Args:
        S: row i = the ids ranked [p, p+m) for query i, local to this graph; -1 entries are ignored, and so
            is ``i`` itself if it appears.
        edges: ``mutual`` or ``union`` (module docstring).
        rank_weights: weight entry (i, c) by ``m - c``; undirected edge = sum over present directions.
    """
    if edges not in EDGES:
        raise ConfigError(f"edges must be one of {EDGES}, got {edges!r}")
    if not rank_weights:
        return _build_unweighted(S, edges)
    n, m = S.shape
    wbits = int(m).bit_length() if rank_weights else 0
    _check_fits(n, 1 + wbits)
    n64 = np.int64(n)

    # Pass 1: count the valid directed entries, so the key array is allocated once.
    total = 0
    for lo in range(0, n, chunk_rows):
        block = np.asarray(S[lo : lo + chunk_rows])
        rows = np.arange(lo, lo + len(block))[:, None]
        if block.size and (block.max() >= n or block.min() < -1):
            raise ConfigError(f"S holds ids outside [0, {n}) (besides -1 padding)")
        total += int(((block >= 0) & (block != rows)).sum())

    # Pass 2: encode each directed entry as one int64.
    keys = np.empty(total, dtype=np.int64)
    at = 0
    col_w = (m - np.arange(m, dtype=np.int64))[None, :]
    for lo in range(0, n, chunk_rows):
        block = np.asarray(S[lo : lo + chunk_rows]).astype(np.int64)
        rows = np.arange(lo, lo + len(block), dtype=np.int64)[:, None]
        valid = (block >= 0) & (block != rows)
        a = np.broadcast_to(rows, block.shape)[valid]
        b = block[valid]
        code = (np.minimum(a, b) * n64 + np.maximum(a, b)) << 1 | (a > b)
        if wbits:
            code = code << wbits | np.broadcast_to(col_w, block.shape)[valid]
        keys[at : at + len(code)] = code
        at += len(code)
    keys.sort()

    # Directed identity (edge + direction, weight bits dropped); repeated entries of a row collapse.
    ident = keys >> wbits if wbits else keys
    dup = ident[1:] == ident[:-1]
    if dup.any():
        keep = np.concatenate([[True], ~dup])
        keys, ident = keys[keep], (ident[keep] if wbits else None)
        if not wbits:
            ident = keys
    del dup
    weights = (keys & ((1 << wbits) - 1)) if wbits else None
    del keys  # without weights ``ident`` is the same buffer; either way the name must not keep it alive
    canon = np.right_shift(ident, 1, out=ident)  # undirected code lo*n+hi (in place; direction not needed)

    if edges == "mutual":
        # After de-duplication a code appears at most twice: once per direction; twice means mutual.
        pos = np.flatnonzero(canon[1:] == canon[:-1])
        und = canon[pos]
        und_w = weights[pos] + weights[pos + 1] if wbits else None
    else:
        first = np.concatenate([[True], canon[1:] != canon[:-1]]) if len(canon) else np.zeros(0, bool)
        starts = np.flatnonzero(first)
        und = canon[starts]
        und_w = np.add.reduceat(weights, starts) if (wbits and len(starts)) else (
            np.zeros(0, np.int64) if wbits else None)
        del first, starts
    del canon, ident, weights
    graph = csr_from_edges(und, n, und_w)
    deg = graph.degree
    graph.stats = {"n": n, "directed_entries": total, "edges": int(len(und)), "edges_kind": edges,
                   "rank_weights": bool(rank_weights), "isolated": int((deg == 0).sum()),
                   "mean_degree": round(float(deg.mean()) if n else 0.0, 3)}
    return graph


def thread_budget() -> int:
    """The process's thread budget: torch's thread count where torch is loaded (the refresh miner sets it),
    else the CPUs this process may run on (torch's own default), without importing torch for it."""
    import os
    import sys

    if "torch" in sys.modules:
        return max(1, int(sys.modules["torch"].get_num_threads()))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _spans(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, total)`` cut into at most ``parts`` consecutive spans, boundaries on multiples of ``align``."""
    step = -(-max(total, 1) // max(1, parts))
    step = -(-step // align) * align
    return [(lo, min(total, lo + step)) for lo in range(0, total, step)]


def _in_threads(fn, total: int, align: int = 1) -> list:
    """``[fn(lo, hi) for (lo, hi) in spans of [0, total)]``, the spans run side by side on the process's
    threads (numpy releases the GIL inside its loops; each span writes only its own slices), results in span
    order, so the outcome never depends on the number of threads."""
    spans = _spans(total, min(thread_budget(), 4), align)
    if len(spans) <= 1:
        return [fn(lo, hi) for lo, hi in spans]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(spans)) as pool:
        return [f.result() for f in [pool.submit(fn, lo, hi) for lo, hi in spans]]


def _build_unweighted(S: np.ndarray, edges: str, chunk_rows: int = 4096, chunk: int = 1 << 20) -> Graph:
    """:func:`build_graph` without rank weights, in fewer passes over the ``n m`` entries than the weighted
    path (same graph): each directed entry ``i -> j`` is the code ``((min << b | max) << 1) | (i > j)``
    (``b`` bits per id), every entry of S gets one (padding and self entries a sentinel that sorts last, so
    no counting pass and no compaction), one sort; then an edge is mutual exactly where a code with direction
    0 is followed by the same edge with direction 1 (``next ^ code == 1``; repeated entries of a row sit
    beside them and change nothing), and a union edge is the first code of each run of one edge. The scans
    go in chunks small enough for their temporaries to stay in cache (the work is memory-bound: a plain pass
    over 10^8 int64 costs about 0.15 s here), on the process's threads (:func:`_in_threads`). The CSR comes
    from :func:`_csr_from_pairs`, without sorting 2E codes."""
    n, m = S.shape
    _check_fits(n, 1)
    bits = max(1, (max(n, 2) - 1).bit_length())
    sentinel = np.iinfo(np.int64).max
    keys = np.empty(n * m, dtype=np.int64)
    rows = min(max(1, chunk_rows), max(n, 1))

    def encode(first: int, last: int) -> int:  # rows [first, last) -> their codes in ``keys``; valid count
        mn = np.empty((rows, m), dtype=np.int64)
        tmp = np.empty((rows, m), dtype=np.int64)
        flag = np.empty((rows, m), dtype=bool)
        skip = np.empty((rows, m), dtype=bool)
        valid = 0
        for lo in range(first, last, rows):
            block = np.asarray(S[lo : min(last, lo + rows)])
            k = len(block)
            if block.size and (block.max() >= n or block.min() < -1):
                raise ConfigError(f"S holds ids outside [0, {n}) (besides -1 padding)")
            a = np.arange(lo, lo + k, dtype=np.int64)[:, None]
            code, big, gt, bad = mn[:k], tmp[:k], flag[:k], skip[:k]
            np.minimum(a, block, out=code)
            np.maximum(a, block, out=big)
            np.left_shift(code, bits + 1, out=code)
            np.left_shift(big, 1, out=big)
            code |= big
            np.greater(a, block, out=gt)
            code |= gt
            np.less(block, 0, out=bad)
            bad |= block == a
            code[bad] = sentinel
            keys[lo * m : (lo + k) * m] = code.ravel()
            valid += code.size - int(np.count_nonzero(bad))
        return valid

    total = sum(_in_threads(encode, n, align=rows))
    keys.sort()
    keys = keys[:total]

    def scan(first: int, last: int) -> list[np.ndarray]:  # the undirected codes found in [first, last)
        parts, buf = [], np.empty(chunk, dtype=np.int64)
        for lo in range(first, last, chunk):
            hi = min(last, lo + chunk)
            if edges == "mutual":  # this code has direction 0, the next one is the same edge's direction 1
                nxt = keys[lo + 1 : hi + 1]
                cur = keys[lo : lo + len(nxt)]
                x = np.bitwise_xor(nxt, cur, out=buf[: len(nxt)])
                parts.append(cur[x == 1] >> 1)
            else:  # union: each edge once, at the first of its codes
                cur = np.right_shift(keys[lo:hi], 1, out=buf[: hi - lo])
                first_of = np.empty(len(cur), dtype=bool)
                first_of[0] = lo == 0 or (keys[lo - 1] >> 1) != cur[0]
                np.not_equal(cur[1:], cur[:-1], out=first_of[1:])
                parts.append(cur[first_of])
        return parts

    parts = [p for found in _in_threads(scan, total, align=chunk) for p in found]
    del keys
    und = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    del parts
    n_und = int(len(und))
    graph = _csr_from_pairs(und, n, bits)
    deg = graph.degree
    graph.stats = {"n": n, "directed_entries": total, "edges": n_und, "edges_kind": edges,
                   "rank_weights": False, "isolated": int((deg == 0).sum()),
                   "mean_degree": round(float(deg.mean()) if n else 0.0, 3)}
    return graph


def _csr_from_pairs(codes: np.ndarray, n: int, bits: int, chunk: int = 1 << 20) -> Graph:
    """Undirected edges as sorted unique codes ``lo << bits | hi`` (lo < hi) -> symmetric CSR, rows sorted.

    Row v is its smaller neighbours (the edges whose ``hi`` is v, in ``lo`` order) then its larger ones (the
    edges whose ``lo`` is v, already in ``hi`` order in ``codes``): one sort of E ``hi << bits | lo`` codes
    and two scatters, instead of a sort of 2E codes. ``codes`` is consumed (its buffer is reused). The
    passes run on the process's threads (:func:`_in_threads`; the scatters write disjoint positions)."""
    E = len(codes)
    mask = np.int64((1 << bits) - 1)
    id_dtype = np.int32 if n < 2**31 else np.int64

    def count(first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
        c_lo, c_hi = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for a in range(first, last, chunk):
            part = codes[a : min(last, a + chunk)]
            c_lo += np.bincount(part >> bits, minlength=n)
            c_hi += np.bincount(part & mask, minlength=n)
        return c_lo, c_hi

    counts = _in_threads(count, E, align=chunk)
    cnt_lo = sum((c for c, _ in counts), np.zeros(n, dtype=np.int64))  # larger neighbours of each node
    cnt_hi = sum((c for _, c in counts), np.zeros(n, dtype=np.int64))  # smaller neighbours
    del counts
    xadj = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cnt_lo + cnt_hi, out=xadj[1:])
    adjncy = np.empty(2 * E, dtype=id_dtype)

    def scatter(shift: np.ndarray):  # code e of node v's run -> adjncy[e + shift[v]] (its other end)
        def run(first: int, last: int) -> None:
            at = np.empty(chunk, dtype=np.int64)
            for a in range(first, last, chunk):
                part = codes[a : min(last, a + chunk)]
                k = len(part)
                np.right_shift(part, bits, out=at[:k])
                idx = shift[at[:k]]
                idx += np.arange(a, a + k, dtype=np.int64)
                adjncy[idx] = part & mask
        return run

    # larger neighbours: codes are in (lo, hi) order; the j-th edge of node v's run goes to
    # xadj[v] + (its smaller neighbours) + j, i.e. its index in ``codes`` plus a per-node shift
    _in_threads(scatter(xadj[:-1] + cnt_hi - (np.cumsum(cnt_lo) - cnt_lo)), E, align=chunk)

    def swap(first: int, last: int) -> None:  # lo << bits | hi -> hi << bits | lo, in place
        at = np.empty(chunk, dtype=np.int64)
        for a in range(first, last, chunk):
            part = codes[a : min(last, a + chunk)]
            k = len(part)
            np.right_shift(part, bits, out=at[:k])
            part &= mask
            part <<= bits
            part |= at[:k]

    # smaller neighbours: the same edges in (hi, lo) order, made in place of ``codes``
    _in_threads(swap, E, align=chunk)
    codes.sort()
    _in_threads(scatter(xadj[:-1] - (np.cumsum(cnt_hi) - cnt_hi)), E, align=chunk)
    return Graph(xadj=xadj, adjncy=adjncy, eweights=None)


def csr_from_edges(codes: np.ndarray, n: int, weights: np.ndarray | None = None) -> Graph:
    """Undirected edges given as sorted unique codes ``lo*n + hi`` (lo < hi) -> symmetric CSR."""
    n64 = np.int64(n)
    wb = int(weights.max()).bit_length() if weights is not None and len(weights) else 0
    _check_fits(n, wb)
    lo, hi = np.divmod(codes, n64)
    key = np.empty(2 * len(codes), dtype=np.int64)
    key[: len(codes)] = lo * n64 + hi
    key[len(codes) :] = hi * n64 + lo
    del lo, hi
    if weights is not None:
        key <<= wb
        key[: len(codes)] |= weights
        key[len(codes) :] |= weights
    key.sort()
    eweights = None
    if weights is not None:
        eweights = key & ((1 << wb) - 1)
        key >>= wb
    # Row starts: entries of row v are the codes in [v*n, (v+1)*n).
    xadj = np.searchsorted(key, np.arange(n + 1, dtype=np.int64) * n64).astype(np.int64)
    adjncy = np.remainder(key, n64, out=key)
    if n < 2**31:  # half the memory for the rest of the stage (and for what the partitioner is handed)
        adjncy = adjncy.astype(np.int32)
    del key
    return Graph(xadj=xadj, adjncy=adjncy, eweights=eweights)


class Relabel:
    """Global id -> position in one group, for group after group: the O(N) map is made once and each group
    sets and then clears only its own entries, so G groups cost O(N + sum of their rows), not O(N G)."""

    def __init__(self, n_total: int):
        self.local = np.full(n_total + 1, -1, dtype=np.int32)  # last slot maps the -1 padding to -1

    def rows(self, S: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of ``S`` with entries relabelled to positions in ``ids`` (others -> -1)."""
        n_total = len(self.local) - 1
        if len(ids) == n_total and np.array_equal(ids, np.arange(n_total)):
            return S  # the identity: no relabelled copy (4 bytes per entry of S, 4 GB at 10M x 100)
        self.local[ids] = np.arange(len(ids), dtype=np.int32)
        try:
            rows = np.asarray(S[ids]) if len(ids) != n_total else np.asarray(S)
            return self.local[rows]  # -1 indexes the last slot
        finally:
            self.local[ids] = -1


def subgraph_rows(S: np.ndarray, ids: np.ndarray, n_total: int, relabel: Relabel | None = None) -> np.ndarray:
    """Rows ``ids`` of a global S with entries relabelled to positions in ``ids`` (others -> -1);
    ``relabel``: a map shared by the caller's groups (one is made otherwise)."""
    return (relabel or Relabel(n_total)).rows(S, ids)

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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import ConfigError

EDGES = ("mutual", "union")


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

"""Stage 3b, partition: communities of exactly K examples (B3 paper, section 3.1.1).

A graph partitioner cuts the graph of :mod:`b3stream.mining.graph` into ``ceil(n/K)`` parts while
minimising the edges between parts, i.e. maximising the strong-negative pairs inside each community. Two
partitioners (``MineConfig.partitioner``):

- ``metis`` (pymetis; the paper's choice and the default): single-threaded, balances parts only
  approximately (``ufactor``: up to 3 % over by default) and can return empty parts, so the repair pass
  below makes the sizes exact;
- ``kaminpar`` (KaMinPar, Sanders & Seemaier's shared-memory multilevel partitioner; optional extra
  ``b3stream[kaminpar]``): multi-threaded and given a *maximum weight per block*, ``K`` for every block and
  ``n mod K`` for the last, so the blocks come out exactly K with no repair (on the synthetic graphs of
  ``tools/bench_mining.py`` it also keeps more edges inside communities than METIS + repair). Should a block
  ever miss its bound, the repair pass runs on its labels too and the record says so.

The METIS repair pass:

1. **evict**: a part above its target size gives up the members that lose least by leaving: the
   lowest (edge weight into their own part - edge weight into the best part with room), keeping its core.
   Members whose strongest tie is to a part with room are preferred, so most moves follow an edge;
2. **re-home by strongest edges**: in rounds, every evicted node proposes to the open part (one below
   target) it has the most edge weight to; each part accepts its strongest proposals up to its free room;
   a node placed in one round counts as a member for the next, so chains of neighbours move together.
   An empty part (METIS sometimes leaves one) is seeded with the evicted node of highest degree, and its
   neighbours follow it in the next rounds;
3. **ejection chains**: an evicted node with no edge to a part with room joins its strongest part anyway,
   and step 1 runs again: that part now evicts the member that loses least, preferably one tied to a
   part with room. Repeated up to ``max_hops`` times, this moves nodes along paths of edges from over-full
   to under-full parts (METIS leaves them in different regions of the graph when clusters do not divide
   by K);
4. **fill**: nodes still without an edge to any open part (isolated nodes) fill the remaining room,
   ordered by the part METIS first gave them, so nodes evicted together stay together.

Remainder policy: with ``n = qK + r`` and ``0 < r < K`` there are ``q`` communities of exactly ``K`` and one
*short* community of ``r`` (the METIS part that was smallest gets target ``r``). It is stored last, padded
with ``-1``. The schedule stage places short communities at the very end of the epoch (see
:mod:`b3stream.mining.strategies`), so every other batch is made of whole K-communities.

Output format: ``communities`` int32 ``(n_comm, K)``, global ids, ``-1`` padding only in short
communities; ``community_task`` int32 ``(n_comm,)``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..config import ConfigError
from ..files import tmp_name
from .graph import Graph, thread_budget

PARTITIONERS = ("metis", "kaminpar")
KAMINPAR_FILE = "kaminpar-graph.parhip"  # the graph handed to KaMinPar, under a writer's temporary name


def metis_parts(graph: Graph, nparts: int, seed: int = 0, ufactor: int = 30) -> np.ndarray:
    """METIS k-way labels in ``[0, nparts)`` (int64). Trivial graphs skip METIS.

    ``seed`` != 0 runs METIS on a seeded relabelling of the vertices: pymetis (2025.2) accepts
    ``Options(seed=...)`` but the partition does not change with it, while METIS's coarsening does depend
    on the vertex order. So each schedule seed gets its own communities; seed 0 keeps the natural order.
    The relabelled copy holds one more CSR (about 16 bytes per directed edge) while METIS runs.
    """
    n = graph.n
    if nparts <= 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    if graph.num_edges == 0:  # METIS cannot cut an edgeless graph; any split is as good as another
        return np.arange(n, dtype=np.int64) * nparts // n
    import pymetis

    xadj, adjncy, eweights, order = graph.xadj, graph.adjncy, graph.eweights, None
    if seed:
        order = np.random.default_rng(seed).permutation(n)  # new vertex i is old vertex order[i]
        new_of = np.empty(n, dtype=np.int64)
        new_of[order] = np.arange(n, dtype=np.int64)
        starts, lens = graph.xadj[order], np.diff(graph.xadj)[order]
        xadj = np.concatenate([[0], np.cumsum(lens)]).astype(graph.xadj.dtype)
        # old CSR position of each new entry (as _row_entries, without its per-entry owner array)
        pos = np.arange(xadj[-1], dtype=np.int64) - np.repeat(xadj[:-1] - starts, lens)
        adjncy = new_of[graph.adjncy[pos]]
        eweights = None if graph.eweights is None else graph.eweights[pos]
        del pos, starts, lens
    options = pymetis.Options(seed=int(seed), ufactor=int(ufactor))
    result = pymetis.part_graph(nparts, adjacency=pymetis.CSRAdjacency(xadj, adjncy), eweights=eweights,
                                options=options)
    labels = np.asarray(result.vertex_part, dtype=np.int64)
    if order is None:
        return labels
    out = np.empty(n, dtype=np.int64)
    out[order] = labels
    return out


def block_sizes(n: int, K: int) -> np.ndarray:
    """The exact community sizes of ``n`` nodes: ``ceil(n/K)`` blocks of K, the last one ``n mod K`` if non-zero."""
    sizes = np.full(-(-n // K), K, dtype=np.int64)
    if n % K:
        sizes[-1] = n % K
    return sizes


def check_partitioner(partitioner: str, context: str = "largek") -> None:
    """Refuse an unknown partitioner, and ``kaminpar`` without its bindings or with an unknown preset."""
    if partitioner not in PARTITIONERS:
        raise ConfigError(f"partitioner must be one of {PARTITIONERS}, got {partitioner!r}")
    if partitioner != "kaminpar":
        return
    try:
        import kaminpar
    except ImportError as e:  # an optional extra
        raise ConfigError("partitioner: kaminpar needs the KaMinPar bindings: pip install 'b3stream[kaminpar]' "
                          "(or kaminpar>=3.7), or use partitioner: metis") from e
    if context not in kaminpar.context_names():
        raise ConfigError(f"kaminpar_context {context!r} is not one of KaMinPar's presets: "
                          f"{sorted(kaminpar.context_names())}")


def write_parhip(graph: Graph, path, chunk: int = 1 << 24, order: np.ndarray | None = None) -> None:
    """Write ``graph`` in ParHiP's binary format, which KaMinPar's Python bindings load (they take no arrays).

    Layout: three uint64 (version flags, n, number of directed entries), ``n + 1`` uint64 *byte* offsets of
    each node's neighbour list in the file, the neighbour ids, then the edge weights if any. The version's
    low bits say what is absent or 32 bits wide (1: no edge weights, 2: no node weights, 4: 32-bit edge
    offsets, 8: 32-bit node ids, 16 / 32: 32-bit node / edge weights); node ids are written as int32 when n
    allows, halving the file. Written in chunks: never a second full copy of ``adjncy``.

    ``order``: write the graph relabelled, node ``order[v]`` of ``graph`` becoming node ``v`` of the file
    (each neighbour list in its old order), chunk by chunk of new nodes (about ``chunk`` entries each).
    """
    n, entries = graph.n, len(graph.adjncy)
    small = n < 2**31
    id_dtype, id_bytes = (np.uint32, 4) if small else (np.uint64, 8)
    weighted = graph.eweights is not None
    if weighted and entries and int(graph.eweights.max()) >= 2**31:
        raise ConfigError("edge weights too large for KaMinPar's 32-bit weights")
    version = 2 | 16 | 32 | (8 if small else 0) | (0 if weighted else 1)
    header = 24 + 8 * (n + 1)
    xadj = graph.xadj if order is None else np.concatenate([[0], np.cumsum(graph.degree[order])])
    with open(path, "wb") as f:
        f.write(np.array([version, n, entries], dtype=np.uint64).tobytes())
        for lo in range(0, n + 1, chunk):
            f.write((header + xadj[lo : lo + chunk].astype(np.uint64) * id_bytes).tobytes())
        if order is None:
            for lo in range(0, entries, chunk):
                f.write(graph.adjncy[lo : lo + chunk].astype(id_dtype).tobytes())
            if weighted:
                for lo in range(0, entries, chunk):
                    f.write(graph.eweights[lo : lo + chunk].astype(np.int32).tobytes())
            return
        new_of = np.empty(n, dtype=id_dtype)
        new_of[order] = np.arange(n, dtype=id_dtype)
        weights = []  # the weights come after every id: kept until then (only with rank weights)
        for cols, w in _ordered_map(lambda span: _relabelled_rows(graph, order, new_of, *span),
                                    _row_chunks(xadj, chunk)):
            f.write(cols.astype(id_dtype).tobytes())
            if weighted:
                weights.append(w.astype(np.int32))
        for w in weights:
            f.write(w.tobytes())


def _ordered_map(fn, items: list):
    """``fn`` of each item, yielded in order, computed on the process's threads a few items ahead (numpy
    releases the GIL in its gathers), never more than two items per thread in memory."""
    threads = min(thread_budget(), 4)
    if threads <= 1 or len(items) <= 1:
        yield from (fn(item) for item in items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        ahead: deque = deque()
        for item in items:
            ahead.append(pool.submit(fn, item))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _row_chunks(xadj: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """Consecutive node ranges ``[a, b)`` of about ``chunk`` CSR entries each (at least one node)."""
    n = len(xadj) - 1
    out, a = [], 0
    while a < n:
        b = int(np.searchsorted(xadj, xadj[a] + chunk, side="right")) - 1
        b = min(n, max(b, a + 1))
        out.append((a, b))
        a = b
    return out


def _relabelled_rows(graph: Graph, order: np.ndarray, new_of: np.ndarray, a: int, b: int
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Neighbour lists (new ids; weights alongside, or None) of new nodes ``[a, b)`` of ``graph`` relabelled
    by ``order`` (new node v = old node ``order[v]``; ``new_of`` its inverse), as one array. A row keeps its
    old entry order, so its new ids are not sorted: KaMinPar reads unsorted neighbour lists, plain and
    compressed (tests/test_mining_partition.py checks that it loads exactly this graph), and sorting them
    cost more than a third of the write. The CSR positions of the rows' entries come from a cumulative sum
    of steps (1 inside a row, a jump at a row's start) rather than ``np.repeat``."""
    nodes = np.asarray(order[a:b], dtype=np.int64)
    starts = graph.xadj[nodes]
    lens = graph.xadj[nodes + 1] - starts
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), (None if graph.eweights is None else np.zeros(0, dtype=np.int64))
    rows = np.flatnonzero(lens)  # rows with entries, in order
    at = (np.cumsum(lens) - lens)[rows]  # where each such row starts in the chunk
    step = np.ones(total, dtype=np.int64)
    step[at[0]] = starts[rows[0]]
    step[at[1:]] = starts[rows[1:]] - (starts[rows[:-1]] + lens[rows[:-1]] - 1)
    pos = np.cumsum(step, out=step)  # CSR positions of the entries, row after row
    ids = new_of[graph.adjncy[pos]]
    return ids, (None if graph.eweights is None else graph.eweights[pos])


def locality_order(graph: Graph) -> np.ndarray:
    """A node order in which neighbours sit close together: the reverse Cuthill-McKee order of the graph
    (scipy, O(edges); deterministic for a graph). KaMinPar is handed the graph in this order: its label
    propagation then touches memory that is mostly in cache, which on the synthetic graphs of
    ``tools/bench_mining.py`` (ids in random order, as mined ids are) takes 30-40% off its CPU time at 1M
    nodes with the same cut."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    n = graph.n
    if n < 2 or graph.num_edges == 0:
        return np.arange(n, dtype=np.int64)
    idx = graph.adjncy if graph.adjncy.dtype == np.int32 and len(graph.adjncy) < 2**31 else \
        graph.adjncy.astype(np.int64)
    ptr = graph.xadj.astype(idx.dtype)
    A = csr_matrix((np.ones(len(idx), dtype=np.int8), idx, ptr), shape=(n, n), copy=False)
    A.has_sorted_indices = True
    return np.asarray(reverse_cuthill_mckee(A, symmetric_mode=True), dtype=np.int64)


COMPRESS_ENTRIES = 1 << 28  # KaMinPar holds graphs of at least this many directed entries compressed


def kaminpar_parts(graph: Graph, K: int, seed: int = 0, threads: int | None = None,
                   context: str = "largek", workdir=None) -> np.ndarray:
    """KaMinPar labels in ``[0, ceil(n/K))``: block ``b`` holds at most K nodes, the last at most ``n mod K``
    (when non-zero), so with total capacity n every block is filled exactly (short block last).

    ``seed`` seeds KaMinPar's generator (one thread gives the same labels for the same seed; several threads
    may not, as its parallel label propagation races). ``threads`` None: the process's thread budget
    (:func:`~b3stream.mining.graph.thread_budget`: torch's thread count when torch is loaded, as in the
    refresh miner, which sets it; else the CPUs the process may use). The graph travels through a temporary
    ParHiP file in the existing folder ``workdir`` (default: the system's temporary folder), removed
    afterwards, in :func:`locality_order`.
    """
    return _kaminpar(graph, K, seed, threads, context, workdir)[0]


def _kaminpar(graph: Graph, K: int, seed: int = 0, threads: int | None = None, context: str = "largek",
              workdir=None, timings: dict | None = None) -> tuple[np.ndarray, int | None]:
    """(:func:`kaminpar_parts`'s labels, their edge cut by KaMinPar's own parallel count, or None where that
    count is not :func:`edge_cut`'s: a weighted graph, whose weighted cut KaMinPar gives, or no KaMinPar run).
    ``timings``: filled with the seconds of each step (order, write, load, partition, threads)."""
    import tempfile

    n = graph.n
    nparts = -(-n // K)
    check_partitioner("kaminpar", context)
    if nparts <= 1 or n == 0:
        return np.zeros(n, dtype=np.int64), None
    import kaminpar

    if threads is None:
        threads = thread_budget()
    clock = {} if timings is None else timings
    t = time.perf_counter()
    # a temporary name of this process: a killed run's leftover is swept like any other writer's
    path = tmp_name(Path(workdir or tempfile.gettempdir()) / KAMINPAR_FILE)
    order = locality_order(graph)  # KaMinPar gets the graph with neighbours close together (faster)
    clock["order_s"] = round(time.perf_counter() - t, 3)
    try:
        t = time.perf_counter()
        write_parhip(graph, path, order=order)
        clock["write_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        # a large graph compressed in memory (a third of the plain one at 10M nodes, and no slower), as the
        # TeraPart presets need (they crash on a plain one); a smaller one plain, which loads in a third of the
        # time
        kgraph = kaminpar.load_graph(str(path), kaminpar.GraphFileFormat.PARHIP,
                                     len(graph.adjncy) >= COMPRESS_ENTRIES or context.startswith("terapart"))
        clock["load_s"] = round(time.perf_counter() - t, 3)
    finally:
        path.unlink(missing_ok=True)
    t = time.perf_counter()
    kaminpar.reseed(int(seed))
    solver = kaminpar.KaMinPar(max(1, int(threads)), kaminpar.context_by_name(context))
    relabelled = solver.compute_partition(kgraph, block_sizes(n, K).tolist())
    clock.update(partition_s=round(time.perf_counter() - t, 3), threads=int(threads))
    cut = int(kaminpar.edge_cut(kgraph, relabelled)) if graph.eweights is None else None
    del kgraph, solver
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.asarray(relabelled, dtype=np.int64)  # new node v is node order[v]
    return labels, cut


def _row_entries(graph: Graph, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the CSR entries of ``nodes`` and, for each, the index into ``nodes`` it came from."""
    starts = graph.xadj[nodes]
    lens = graph.xadj[nodes + 1] - starts
    owner = np.repeat(np.arange(len(nodes), dtype=np.int64), lens)
    if len(owner) == 0:
        return owner, owner
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    pos = np.arange(len(owner), dtype=np.int64) - np.repeat(offsets - starts, lens)
    return pos, owner


def _open_strength(graph: Graph, nodes: np.ndarray, parts: np.ndarray, room: np.ndarray, nparts: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index into ``nodes``, part, edge weight) for every node and every part with room it has edges to."""
    pos, owner = _row_entries(graph, nodes)
    nbr_part = parts[graph.adjncy[pos]]
    ok = nbr_part >= 0
    ok[ok] = room[nbr_part[ok]] > 0
    if not ok.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    w = np.ones(int(ok.sum()), dtype=np.int64) if graph.eweights is None else graph.eweights[pos[ok]]
    pair_u, inv = np.unique(owner[ok] * nparts + nbr_part[ok], return_inverse=True)
    strength = np.bincount(inv, weights=w).astype(np.int64)
    node_i, part_i = np.divmod(pair_u, nparts)
    return node_i, part_i, strength


def _node_weight_to_own(graph: Graph, nodes: np.ndarray, parts: np.ndarray) -> np.ndarray:
    """Edge weight from each of ``nodes`` into its own part."""
    pos, owner = _row_entries(graph, nodes)
    same = parts[graph.adjncy[pos]] == parts[nodes][owner]
    w = same.astype(np.int64) if graph.eweights is None else np.where(same, graph.eweights[pos], 0)
    return np.bincount(owner, weights=w, minlength=len(nodes)).astype(np.int64)


def _best_per_node(node_i: np.ndarray, part_i: np.ndarray, strength: np.ndarray) -> np.ndarray:
    """Index of each node's strongest (node, part) pair (ties -> lower part id)."""
    o = np.lexsort((part_i, -strength, node_i))
    first = np.concatenate([[True], node_i[o][1:] != node_i[o][:-1]])
    return o[first]


def _independent_seeds(graph: Graph, pool: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` pool positions to seed empty parts: highest degree first, never two neighbours (two
    neighbours seeded apart would split what should grow together). Loops over at most the pool."""
    deg = graph.degree[pool]
    picked: list[int] = []
    blocked: set[int] = set()
    for i in np.lexsort((pool, -deg)).tolist():
        v = int(pool[i])
        if v in blocked:
            continue
        picked.append(i)
        if len(picked) == k:
            break
        blocked.update(graph.adjncy[graph.xadj[v] : graph.xadj[v + 1]].tolist())
    return np.array(picked, dtype=np.int64)


def repair(graph: Graph, parts: np.ndarray, K: int, max_hops: int = 8, max_rounds: int = 64
           ) -> tuple[np.ndarray, dict]:
    """Make METIS parts exactly K (one short part of n mod K if any). Returns (labels, stats).

    Labels are in ``[0, ceil(n/K))``; the short part, if any, is the last label. Each hop evicts the members of
    over-full parts that lose least by leaving, re-homes the evicted by their strongest edges into parts with
    room, and lets a node with no edge to such a part push into its strongest full part (an ejection chain);
    what is left at the end fills the remaining room in the order it was evicted.
    """
    n = graph.n
    nparts = -(-n // K)
    r = n % K
    parts = np.asarray(parts, dtype=np.int64).copy()
    sizes = np.bincount(parts, minlength=nparts)
    target = np.full(nparts, K, dtype=np.int64)
    if r:
        target[int(np.argmin(sizes))] = r  # the smallest part is cheapest to trim to r
    stats = {"unrepaired_sizes_min": int(sizes.min()), "unrepaired_sizes_max": int(sizes.max()),
             "unrepaired_empty_parts": int((sizes == 0).sum())}
    pool = _Pool()
    evicted = by_edges = seeded = hops = 0
    last_pool = None
    for hops in range(1, max_hops + 1):
        out = _to_evict(graph, parts, target, nparts)
        evicted += len(out)
        pool.add(out, parts[out])
        parts[out] = -1
        room = target - np.bincount(parts[parts >= 0], minlength=nparts)
        moved, new_seeds = _rehome(graph, parts, room, target, pool, nparts, max_rounds)
        by_edges, seeded = by_edges + moved, seeded + new_seeds
        if not len(pool) or hops == max_hops or (last_pool is not None and np.array_equal(np.sort(pool.nodes),
                                                                                          last_pool)):
            break  # done, out of hops, or the chain brought back the same nodes
        last_pool = np.sort(pool.nodes)
        if not _eject(graph, parts, pool, nparts):
            break
    stats.update(evicted=int(evicted), moved_by_edges=int(by_edges), seeded_empty=int(seeded), repair_hops=hops)

    # What is left has no edge to an open part: it fills the remaining room.
    room = target - np.bincount(parts[parts >= 0], minlength=nparts)
    if len(pool):
        slots = np.repeat(np.arange(nparts), np.maximum(room, 0))
        parts[pool.nodes[np.lexsort((pool.nodes, pool.origin))]] = slots
        np.subtract.at(room, slots, 1)
    stats["moved_without_edges"] = len(pool)
    if room.any() or (parts < 0).any():
        raise AssertionError("repair left parts unbalanced")  # a bug, never a data problem

    # The short part (if any) gets the last label so it is stored last.
    if r:
        short = int(np.flatnonzero(target == r)[0])
        relabel = np.arange(nparts)
        relabel[short:] -= 1
        relabel[short] = nparts - 1
        parts = relabel[parts]
    return parts, stats


class _Pool:
    """The nodes :func:`repair` holds outside every part, with the part each was evicted from."""

    def __init__(self):
        self.nodes = np.zeros(0, dtype=np.int64)
        self.origin = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.nodes)

    def add(self, nodes: np.ndarray, origin: np.ndarray) -> None:
        self.nodes = np.concatenate([self.nodes, nodes])
        self.origin = np.concatenate([self.origin, origin])

    def remove(self, positions: np.ndarray) -> None:
        keep = np.ones(len(self.nodes), dtype=bool)
        keep[positions] = False
        self.nodes, self.origin = self.nodes[keep], self.origin[keep]


def _rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Each element's position within its run of equal values in the sorted ``keys``."""
    starts = np.concatenate([[0], np.flatnonzero(keys[1:] != keys[:-1]) + 1])
    return np.arange(len(keys)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(keys)]])))


def _to_evict(graph: Graph, parts: np.ndarray, target: np.ndarray, nparts: int) -> np.ndarray:
    """The members each over-full part gives up: those that lose least by leaving (weak ties home, strong ties
    to a part with room), as many as the part holds over its target."""
    placed = parts >= 0
    sizes = np.bincount(parts[placed], minlength=nparts)
    excess = np.maximum(sizes - target, 0)
    if not excess.any():
        return np.zeros(0, dtype=np.int64)
    cand = np.flatnonzero(placed & (excess[np.maximum(parts, 0)] > 0))
    node_i, _, strength = _open_strength(graph, cand, parts, target - sizes, nparts)
    outer = np.zeros(len(cand), dtype=np.int64)
    np.maximum.at(outer, node_i, strength)
    loss = _node_weight_to_own(graph, cand, parts) - outer
    order = np.lexsort((cand, loss, parts[cand]))  # by part, cheapest to move first, then id
    cp = parts[cand][order]
    return cand[order[_rank_in_runs(cp) < excess[cp]]]


def _rehome(graph: Graph, parts: np.ndarray, room: np.ndarray, target: np.ndarray, pool: _Pool, nparts: int,
            max_rounds: int) -> tuple[int, int]:
    """Place pooled nodes by their strongest edge to a part with room, in rounds (each part accepts its
    strongest proposals up to its room); when no pooled node has such an edge, seed the empty parts.
    Returns (placed by edges, seeded)."""
    by_edges = seeded = 0
    for _ in range(max_rounds):
        if not len(pool):
            break
        node_i, part_i, strength = _open_strength(graph, pool.nodes, parts, room, nparts)
        if len(node_i) == 0:
            empty = np.flatnonzero((room == target) & (room > 0))
            if len(empty) == 0:
                break
            best = _independent_seeds(graph, pool.nodes, min(len(empty), len(pool)))
            k = len(best)
            parts[pool.nodes[best]] = empty[:k]
            room[empty[:k]] -= 1
            seeded += k
            pool.remove(best)
            continue
        best = _best_per_node(node_i, part_i, strength)
        prop_node, prop_part, prop_w = node_i[best], part_i[best], strength[best]
        o2 = np.lexsort((prop_node, -prop_w, prop_part))
        pp = prop_part[o2]
        accept = o2[_rank_in_runs(pp) < room[pp]]
        parts[pool.nodes[prop_node[accept]]] = prop_part[accept]
        np.subtract.at(room, prop_part[accept], 1)
        by_edges += len(accept)
        pool.remove(prop_node[accept])
    return by_edges, seeded


def _eject(graph: Graph, parts: np.ndarray, pool: _Pool, nparts: int) -> bool:
    """Ejection chain: each pooled node with an edge anywhere joins its strongest (full) part; the next eviction
    then pushes out that part's member best tied to a part with room. False when no pooled node has an edge."""
    node_i, part_i, strength = _open_strength(graph, pool.nodes, parts, np.ones(nparts, dtype=np.int64), nparts)
    if len(node_i) == 0:
        return False
    best = _best_per_node(node_i, part_i, strength)
    parts[pool.nodes[node_i[best]]] = part_i[best]
    pool.remove(node_i[best])
    return True


def communities_from_labels(labels: np.ndarray, K: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Labels (exact sizes) -> (n_comm, K) int32 array of ids, members in id order, -1 padded."""
    n = len(labels)
    nparts = -(-n // K)
    order = np.lexsort((np.arange(n), labels))
    members = order if ids is None else np.asarray(ids)[order]
    out = np.full(nparts * K, -1, dtype=np.int64)
    out[:n] = members  # full parts are first and all of size K, the short one last
    return out.reshape(nparts, K).astype(np.int32)


def partition(graph: Graph, K: int, seed: int = 0, ufactor: int = 30, ids: np.ndarray | None = None,
              partitioner: str = "metis", threads: int | None = None, context: str = "largek",
              workdir=None) -> tuple[np.ndarray, dict]:
    """Graph -> communities of exactly K (module docstring). ``ids`` maps graph nodes to global ids;
    ``threads``, ``context`` and ``workdir`` are KaMinPar's (see :func:`kaminpar_parts`)."""
    if K < 1:
        raise ConfigError(f"K must be positive, got {K}")
    check_partitioner(partitioner, context)
    n = graph.n
    nparts = -(-n // K)
    t0 = time.perf_counter()
    kaminpar_cut = None
    if partitioner == "metis":
        labels = metis_parts(graph, nparts, seed=seed, ufactor=ufactor)
    else:
        steps: dict = {}
        labels, kaminpar_cut = _kaminpar(graph, K, seed=seed, threads=threads, context=context, workdir=workdir,
                                         timings=steps)
    t1 = time.perf_counter()
    stats: dict = {"partitioner": partitioner}
    if partitioner == "kaminpar" and steps:
        stats["kaminpar_steps"] = steps  # where partitioner_s went: order, write, load, partition (seconds)
    if n:
        first_cut = edge_cut(graph, labels) if kaminpar_cut is None else kaminpar_cut
        exact = partitioner == "kaminpar" and np.array_equal(np.bincount(labels, minlength=nparts), block_sizes(n, K))
        cut = first_cut
        if not exact:  # METIS always; KaMinPar only if a block missed its bound
            labels, repair_stats = repair(graph, labels, K)
            stats.update(repair_stats)
            cut = edge_cut(graph, labels)
        stats.update(partitioner_edge_cut=first_cut, edge_cut=cut, repaired=not exact,
                     internal_edge_fraction=round(1 - cut / max(1, graph.num_edges), 4))
    stats.update(n=n, communities=nparts, short=int(n % K), partitioner_s=round(t1 - t0, 3),
                 repair_s=round(time.perf_counter() - t1, 3))
    return communities_from_labels(labels, K, ids), stats


def edge_cut(graph: Graph, labels: np.ndarray, chunk: int = 1 << 17) -> int:
    """Number of undirected edges between different parts."""
    cut = 0
    n = graph.n
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        a, b = graph.xadj[lo], graph.xadj[hi]
        src = np.repeat(labels[lo:hi], np.diff(graph.xadj[lo : hi + 1]))
        cut += int((labels[graph.adjncy[a:b]] != src).sum())
    return cut // 2

"""Stage 3b, partition: METIS communities of exactly K examples (B3 paper, section 3.2).

METIS (through pymetis) cuts the graph of :mod:`b3stream.mining.graph` into ``ceil(n/K)`` parts while
minimising the edges between parts, i.e. maximising the strong-negative pairs inside each community. METIS
only balances parts approximately (``ufactor``: up to 3 % over by default) and can return empty parts, so a
repair pass makes the sizes exact:

1. **evict**: a part above its target size gives up the members with the *weakest* ties to it (lowest
   edge weight into their own part), keeping its core;
2. **re-home by strongest edges**: in rounds, every evicted node proposes to the open part (one below
   target) it has the most edge weight to; each part accepts its strongest proposals up to its free room;
   a node placed in one round counts as a member for the next, so chains of neighbours move together;
3. **fill**: nodes with no edge to any open part (isolated nodes, or ties only to full parts) fill the
   remaining room, ordered by the part METIS first gave them, so nodes evicted together stay together.
   Empty parts are filled this way too.

Remainder policy: with ``n = qK + r`` and ``0 < r < K`` there are ``q`` communities of exactly ``K`` and one
*short* community of ``r`` (the METIS part that was smallest gets target ``r``). It is stored last, padded
with ``-1``. The schedule stage places short communities at the very end of the epoch (see
:mod:`b3stream.mining.strategies`), so every other batch is made of whole K-communities.

Output format: ``communities`` int32 ``(n_comm, K)``, global ids, ``-1`` padding only in short
communities; ``community_task`` int32 ``(n_comm,)``.
"""

from __future__ import annotations

import numpy as np

from ..config import ConfigError
from .graph import Graph


def metis_parts(graph: Graph, nparts: int, seed: int = 0, ufactor: int = 30) -> np.ndarray:
    """METIS k-way labels in ``[0, nparts)`` (int64). Trivial graphs skip METIS."""
    n = graph.n
    if nparts <= 1 or n == 0:
        return np.zeros(n, dtype=np.int64)
    if graph.num_edges == 0:  # METIS cannot cut an edgeless graph; any split is as good as another
        return np.arange(n, dtype=np.int64) * nparts // n
    import pymetis

    options = pymetis.Options(seed=int(seed), ufactor=int(ufactor))
    result = pymetis.part_graph(
        nparts, adjacency=pymetis.CSRAdjacency(graph.xadj, graph.adjncy),
        eweights=graph.eweights, options=options,
    )
    return np.asarray(result.vertex_part, dtype=np.int64)


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


def internal_weight(graph: Graph, parts: np.ndarray, chunk: int = 1 << 17) -> np.ndarray:
    """For every node, the edge weight (or count) to nodes of its own part. Chunked over nodes."""
    n = graph.n
    out = np.zeros(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        a, b = graph.xadj[lo], graph.xadj[hi]
        deg = np.diff(graph.xadj[lo : hi + 1])
        src_part = np.repeat(parts[lo:hi], deg)
        same = parts[graph.adjncy[a:b]] == src_part
        w = same.astype(np.int64) if graph.eweights is None else np.where(same, graph.eweights[a:b], 0)
        cs = np.concatenate([[0], np.cumsum(w)])
        out[lo:hi] = cs[graph.xadj[lo + 1 : hi + 1] - a] - cs[graph.xadj[lo:hi] - a]
    return out


def repair(graph: Graph, parts: np.ndarray, K: int, max_rounds: int = 64) -> tuple[np.ndarray, dict]:
    """Make METIS parts exactly K (one short part of n mod K if any). Returns (labels, stats).

    Labels are in ``[0, ceil(n/K))``; the short part, if any, is the last label.
    """
    n = graph.n
    nparts = -(-n // K)
    r = n % K
    parts = np.asarray(parts, dtype=np.int64).copy()
    sizes = np.bincount(parts, minlength=nparts)
    target = np.full(nparts, K, dtype=np.int64)
    if r:
        target[int(np.argmin(sizes))] = r  # the smallest part is cheapest to trim to r
    stats = {"metis_sizes_min": int(sizes.min()), "metis_sizes_max": int(sizes.max()),
             "metis_empty_parts": int((sizes == 0).sum())}

    # 1. evict the weakest-tied members of over-full parts.
    excess = np.maximum(sizes - target, 0)
    moved = np.zeros(0, dtype=np.int64)
    if excess.any():
        inner = internal_weight(graph, parts)
        order = np.lexsort((np.arange(n), inner, parts))  # by part, then weakest first (ties: lower id)
        part_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rank_in_part = np.arange(n) - part_start[parts[order]]
        moved = np.sort(order[rank_in_part < excess[parts[order]]])
    origin = parts[moved].copy()
    parts[moved] = -1
    room = target - np.bincount(parts[parts >= 0], minlength=nparts)
    stats["evicted"] = int(len(moved))

    # 2. re-home by strongest edges, in rounds.
    pool = moved
    rounds = 0
    by_edges = 0
    while len(pool) and rounds < max_rounds:
        rounds += 1
        pos, owner = _row_entries(graph, pool)
        nbr_part = parts[graph.adjncy[pos]]
        ok = nbr_part >= 0
        ok[ok] = room[nbr_part[ok]] > 0
        if not ok.any():
            break
        w = np.ones(int(ok.sum()), dtype=np.int64) if graph.eweights is None else graph.eweights[pos[ok]]
        pair = owner[ok] * nparts + nbr_part[ok]
        pair_u, inv = np.unique(pair, return_inverse=True)
        strength = np.bincount(inv, weights=w).astype(np.int64)
        node_i, part_i = np.divmod(pair_u, nparts)
        # each node's best open part (strongest; ties -> lower part id)
        o = np.lexsort((part_i, -strength, node_i))
        first = np.concatenate([[True], node_i[o][1:] != node_i[o][:-1]])
        best = o[first]
        prop_node, prop_part, prop_w = node_i[best], part_i[best], strength[best]
        # each part accepts its strongest proposals up to its free room
        o2 = np.lexsort((prop_node, -prop_w, prop_part))
        pp = prop_part[o2]
        grp_start = np.concatenate([[0], np.flatnonzero(pp[1:] != pp[:-1]) + 1])
        rank_in = np.arange(len(pp)) - np.repeat(grp_start, np.diff(np.concatenate([grp_start, [len(pp)]])))
        accept = o2[rank_in < room[pp]]
        if len(accept) == 0:
            break
        nodes = pool[prop_node[accept]]
        parts[nodes] = prop_part[accept]
        np.subtract.at(room, prop_part[accept], 1)
        by_edges += len(accept)
        keep = np.ones(len(pool), dtype=bool)
        keep[prop_node[accept]] = False
        origin = origin[keep]
        pool = pool[keep]
    stats["moved_by_edges"] = int(by_edges)
    stats["repair_rounds"] = rounds

    # 3. fill the remaining room with the nodes that have no edge to an open part.
    if len(pool):
        order = np.lexsort((pool, origin))
        slots = np.repeat(np.arange(nparts), np.maximum(room, 0))
        parts[pool[order]] = slots
        np.subtract.at(room, slots, 1)
    stats["moved_without_edges"] = int(len(pool))
    assert not room.any() and (parts >= 0).all(), "repair left parts unbalanced"

    # The short part (if any) gets the last label so it is stored last.
    if r:
        short = int(np.flatnonzero(target == r)[0])
        relabel = np.arange(nparts)
        relabel[short:] -= 1
        relabel[short] = nparts - 1
        parts = relabel[parts]
    return parts, stats


def communities_from_labels(labels: np.ndarray, K: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Labels (exact sizes) -> (n_comm, K) int32 array of ids, members in id order, -1 padded."""
    n = len(labels)
    nparts = -(-n // K)
    order = np.lexsort((np.arange(n), labels))
    members = order if ids is None else np.asarray(ids)[order]
    out = np.full(nparts * K, -1, dtype=np.int64)
    out[:n] = members  # full parts are first and all of size K, the short one last
    return out.reshape(nparts, K).astype(np.int32)


def partition(graph: Graph, K: int, seed: int = 0, ufactor: int = 30,
              ids: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Graph -> communities of exactly K (module docstring). ``ids`` maps graph nodes to global ids."""
    if K < 1:
        raise ConfigError(f"K must be positive, got {K}")
    n = graph.n
    nparts = -(-n // K)
    labels = metis_parts(graph, nparts, seed=seed, ufactor=ufactor)
    if n:
        cut = edge_cut(graph, labels)
    labels, stats = repair(graph, labels, K) if n else (labels, {})
    if n:
        stats.update(metis_edge_cut=cut, edge_cut=edge_cut(graph, labels),
                     internal_edge_fraction=round(1 - edge_cut(graph, labels) / max(1, graph.num_edges), 4))
    stats.update(n=n, communities=nparts, short=int(n % K))
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

"""graph.py: S -> symmetric CSR (mutual / union, rank weights), built by sorting."""

from __future__ import annotations

import numpy as np
import pytest
from ._mining_synth import random_S

from b3stream.config import ConfigError
from b3stream.mining.graph import build_graph, subgraph_rows


def edge_set(g):
    rows = g.rows()
    return set(zip(rows.tolist(), g.adjncy.tolist()))


def check_csr(g):
    rows = g.rows()
    assert g.xadj[0] == 0 and g.xadj[-1] == len(g.adjncy)
    assert np.all(rows != g.adjncy), "self loop"
    pairs = rows * g.n + g.adjncy
    assert len(np.unique(pairs)) == len(pairs), "duplicate entry"
    assert set(pairs.tolist()) == set((g.adjncy * g.n + rows).tolist()), "not symmetric"
    for v in range(g.n):  # rows sorted, as METIS does not need but we promise determinism
        seg = g.adjncy[g.xadj[v] : g.xadj[v + 1]]
        assert np.all(np.diff(seg) > 0)


def brute(S, mode):
    n = len(S)
    directed = {(i, int(j)) for i in range(n) for j in S[i] if j >= 0 and j != i}
    if mode == "mutual":
        und = {(min(a, b), max(a, b)) for a, b in directed if (b, a) in directed}
    else:
        und = {(min(a, b), max(a, b)) for a, b in directed}
    return {(a, b) for a, b in und} | {(b, a) for a, b in und}


@pytest.mark.parametrize("mode", ["mutual", "union"])
def test_matches_brute_force(mode):
    S = random_S(120, 15, seed=1, pad_rows=10)
    g = build_graph(S, edges=mode)
    check_csr(g)
    assert edge_set(g) == brute(S, mode)
    assert g.stats["edges"] == g.num_edges


def test_mutual_vs_union_on_a_small_example():
    # 0->1, 1->0 (mutual); 0->2 only; 3 isolated; self entry and padding ignored; duplicate entry ignored
    S = np.array([[1, 2, 2], [0, 1, -1], [-1, -1, -1], [-1, 3, -1]], dtype=np.int32)
    mutual = build_graph(S, "mutual")
    union = build_graph(S, "union")
    assert edge_set(mutual) == {(0, 1), (1, 0)}
    assert edge_set(union) == {(0, 1), (1, 0), (0, 2), (2, 0)}
    assert mutual.stats["isolated"] == 2 and union.stats["isolated"] == 1
    check_csr(mutual)
    check_csr(union)


def test_duplicates_in_a_row_do_not_fake_a_mutual_edge():
    S = np.array([[1, 1], [-1, -1]], dtype=np.int32)
    assert build_graph(S, "mutual").num_edges == 0
    assert build_graph(S, "union").num_edges == 1


def test_rank_weights_sum_over_directions():
    m = 4
    S = np.array([[1, 2, -1, -1], [3, 0, -1, -1], [-1] * 4, [-1] * 4], dtype=np.int32)
    g = build_graph(S, "union", rank_weights=True)
    w = {(a, b): int(x) for a, b, x in zip(g.rows().tolist(), g.adjncy.tolist(), g.eweights.tolist())}
    # 0->1 at column 0 weighs m, 1->0 at column 1 weighs m-1: the undirected edge weighs both
    assert w[(0, 1)] == w[(1, 0)] == m + (m - 1)
    assert w[(0, 2)] == w[(2, 0)] == m - 1
    assert w[(1, 3)] == m
    mutual = build_graph(S, "mutual", rank_weights=True)
    assert edge_set(mutual) == {(0, 1), (1, 0)} and mutual.eweights.tolist() == [2 * m - 1] * 2


def test_empty_and_bad_input():
    g = build_graph(np.full((5, 3), -1, dtype=np.int32), "mutual")
    assert g.num_edges == 0 and g.xadj.tolist() == [0] * 6
    with pytest.raises(ConfigError, match="outside"):
        build_graph(np.array([[5]], dtype=np.int32))
    with pytest.raises(ConfigError, match="edges"):
        build_graph(np.zeros((2, 1), dtype=np.int32), edges="both")


def test_subgraph_rows_relabels_and_drops_other_ids():
    S = np.array([[2, 3], [0, -1], [0, 1], [1, 2]], dtype=np.int32)
    ids = np.array([0, 2, 3])
    assert subgraph_rows(S, ids, 4).tolist() == [[1, 2], [0, -1], [-1, 1]]


@pytest.mark.parametrize("mode", ["mutual", "union"])
@pytest.mark.parametrize("chunk,threads", [(7, 1), (7, 3), (1 << 24, 2)])
def test_the_unweighted_path_is_the_weighted_graph_without_weights(mode, chunk, threads, monkeypatch):
    """Without rank weights the graph is built by its own, faster path (direction codes, no counting pass,
    a CSR from one E-sized sort): the same xadj and adjncy as the weighted path, whose weights it drops, with
    repeated entries, self entries and padding in S, scans in chunks of any size on any number of threads."""
    from b3stream.mining import graph
    from b3stream.mining.graph import _build_unweighted

    monkeypatch.setattr(graph, "thread_budget", lambda: threads)

    rng = np.random.default_rng(4)
    S = random_S(300, 20, seed=2, pad_rows=40).astype(np.int32)
    S[rng.random(S.shape) < 0.05] = -1
    rows = rng.choice(300, size=30, replace=False)
    S[rows, 3] = S[rows, 4]  # repeated entries
    S[rows[:10], 5] = rows[:10]  # self entries
    S[:150] = np.where(rng.random((150, 20)) < 0.5, S[150:300][:, ::-1], S[:150])  # more mutual pairs
    weighted = build_graph(S, mode, rank_weights=True)
    fast = _build_unweighted(S, mode, chunk_rows=13, chunk=chunk)
    assert fast.eweights is None
    assert np.array_equal(fast.xadj, weighted.xadj) and np.array_equal(fast.adjncy, weighted.adjncy)
    assert fast.adjncy.dtype == np.int32
    assert {k: v for k, v in fast.stats.items() if k != "rank_weights"} == \
        {k: v for k, v in weighted.stats.items() if k != "rank_weights"}
    check_csr(fast)
    assert edge_set(fast) == brute(S, mode)

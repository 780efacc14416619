"""partition.py: METIS + repair to communities of exactly K, remainder policy."""

from __future__ import annotations

import numpy as np
import pytest
from ._mining_synth import clustered, random_S

from b3stream.mining.graph import build_graph, csr_from_edges
from b3stream.mining.partition import communities_from_labels, edge_cut, partition, repair
from b3stream.mining.rank import RankParams, rank_group


def check_communities(comm, n, K):
    assert comm.shape == (-(-n // K), K)
    flat = comm[comm >= 0]
    assert np.array_equal(np.sort(flat), np.arange(n)), "every id exactly once"
    sizes = (comm >= 0).sum(1)
    assert np.all(sizes[:-1] == K)
    assert sizes[-1] == (n % K or K), "the short community (n mod K) is the last one"
    assert np.all(comm[:-1] >= 0)


@pytest.mark.parametrize("n,K", [(640, 32), (1000, 32), (517, 8), (33, 32), (7, 32)])
def test_exactly_K_with_remainder(n, K):
    q, p, _ = clustered(n, clusters=max(2, n // 40), seed=n)
    S, _, _, _ = rank_group(q, p, RankParams(p=2, m=min(20, n - 3), index="flat"))
    comm, stats = partition(build_graph(S, "mutual"), K, seed=0)
    check_communities(comm, n, K)
    assert stats["short"] == n % K


def test_communities_keep_edges_inside():
    q, p, labels = clustered(2000, clusters=25, seed=3)
    S, _, _, _ = rank_group(q, p, RankParams(p=3, m=30, index="flat"))
    g = build_graph(S, "mutual")
    comm, stats = partition(g, 16, seed=0)
    check_communities(comm, 2000, 16)
    # communities follow the clusters: most members share the majority label
    purity = np.mean([np.bincount(labels[c]).max() / len(c) for c in comm])
    assert purity > 0.8
    # and a random split of the same sizes cuts far more edges
    rnd = np.random.default_rng(0).permutation(2000) // 16
    assert stats["edge_cut"] < 0.7 * edge_cut(g, rnd)


def test_repair_handles_empty_parts_isolated_nodes_and_oversized_parts():
    # two triangles plus isolated nodes; METIS labels forced to be badly unbalanced
    edges = np.array([0 * 10 + 1, 0 * 10 + 2, 1 * 10 + 2, 3 * 10 + 4, 3 * 10 + 5, 4 * 10 + 5], dtype=np.int64)
    g = csr_from_edges(edges, 10)
    bad = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0])  # everything in part 0, parts 1 and 2 empty
    labels, stats = repair(g, bad, 4)
    sizes = np.bincount(labels, minlength=3)
    assert sizes.tolist() == [4, 4, 2]
    assert stats["unrepaired_empty_parts"] == 2 and stats["evicted"] >= 6
    comm = communities_from_labels(labels, 4)
    check_communities(comm, 10, 4)
    # the repair moves whole triangles together when it can: no triangle is split three ways
    for tri in ([0, 1, 2], [3, 4, 5]):
        assert len(set(labels[tri].tolist())) <= 2


def test_partition_is_deterministic_and_handles_edgeless_graphs():
    S = random_S(300, 10, seed=2)
    g = build_graph(S, "union")
    a, _ = partition(g, 8, seed=5)
    b, _ = partition(g, 8, seed=5)
    assert np.array_equal(a, b)
    empty = build_graph(np.full((50, 4), -1, dtype=np.int32))
    comm, _ = partition(empty, 8)
    check_communities(comm, 50, 8)


def test_the_seed_changes_the_communities_and_each_seed_is_a_valid_partition():
    q, p, _ = clustered(1200, clusters=30, seed=6)
    S, _, _, _ = rank_group(q, p, RankParams(p=1, m=15, index="flat"))
    g = build_graph(S, "mutual")
    comms = {}
    for seed in (0, 1, 2):
        comm, stats = partition(g, 16, seed=seed)
        check_communities(comm, 1200, 16)
        assert stats["internal_edge_fraction"] > 0.5
        comms[seed] = {tuple(sorted(c)) for c in comm.tolist()}
    # pymetis ignores Options(seed=...); the seeded relabelling must still give other communities
    assert comms[0] != comms[1] and comms[1] != comms[2]
    assert np.array_equal(partition(g, 16, seed=1)[0], partition(g, 16, seed=1)[0])


def test_global_ids_are_mapped_back():
    q, p, _ = clustered(100, seed=4)
    S, _, _, _ = rank_group(q, p, RankParams(p=1, m=10, index="flat"))
    ids = np.arange(100) * 3 + 7
    comm, _ = partition(build_graph(S), 10, ids=ids)
    assert np.array_equal(np.sort(comm.ravel()), ids)


# ---- KaMinPar ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,K", [(640, 32), (1000, 32), (517, 8), (33, 32), (7, 32)])
def test_kaminpar_gives_exactly_K_without_repair(n, K):
    q, p, _ = clustered(n, clusters=max(2, n // 40), seed=n)
    S, _, _, _ = rank_group(q, p, RankParams(p=2, m=min(20, n - 3), index="flat"))
    g = build_graph(S, "mutual")
    comm, stats = partition(g, K, seed=0, partitioner="kaminpar", threads=1)
    check_communities(comm, n, K)
    assert stats["partitioner"] == "kaminpar"
    if n > K:  # a single community needs no partitioner at all
        assert stats["repaired"] is False and "evicted" not in stats
    labels = np.empty(n, np.int64)  # KaMinPar counts the cut itself: the same count as ours
    for c, members in enumerate(comm):
        labels[members[members >= 0]] = c
    assert stats["edge_cut"] == stats["partitioner_edge_cut"] == edge_cut(g, labels)


def test_kaminpar_is_deterministic_for_a_seed_on_one_thread_and_keeps_more_edges_inside_than_metis():
    q, p, labels = clustered(4000, clusters=50, seed=11)
    S, _, _, _ = rank_group(q, p, RankParams(p=3, m=30, index="flat"))
    g = build_graph(S, "mutual")
    a, sa = partition(g, 32, seed=3, partitioner="kaminpar", threads=1)
    b, _ = partition(g, 32, seed=3, partitioner="kaminpar", threads=1)
    c, _ = partition(g, 32, seed=4, partitioner="kaminpar", threads=1)
    assert np.array_equal(a, b)
    assert {tuple(x) for x in a.tolist()} != {tuple(x) for x in c.tolist()}, "the seed reaches KaMinPar"
    _, sm = partition(g, 32, seed=3)  # METIS + repair on the same graph
    assert sa["internal_edge_fraction"] >= sm["internal_edge_fraction"] - 0.01, (sa, sm)
    purity = np.mean([np.bincount(labels[x]).max() / len(x) for x in a])
    assert purity > 0.8


@pytest.mark.parametrize("rank_weights", [False, True])
def test_the_parhip_file_is_the_graph(tmp_path, rank_weights):
    """KaMinPar reads the graph back with the same edges and weights: its own edge cut of a labelling equals
    ours (weighted cut when the graph is weighted)."""
    import kaminpar

    from b3stream.mining.partition import write_parhip

    S = random_S(500, 12, seed=9)
    g = build_graph(S, "union", rank_weights=rank_weights)
    path = tmp_path / "g.parhip"
    write_parhip(g, path, chunk=97)  # small chunks: the chunked writes must line up
    kg = kaminpar.load_graph(str(path), kaminpar.GraphFileFormat.PARHIP)
    assert (kg.n(), kg.m()) == (g.n, len(g.adjncy))
    labels = np.random.default_rng(0).integers(0, 7, size=g.n)
    src = g.rows()
    cross = labels[src] != labels[g.adjncy]
    w = np.ones(len(src), np.int64) if g.eweights is None else g.eweights
    assert kaminpar.edge_cut(kg, labels.tolist()) == int(w[cross].sum()) // 2


def read_parhip(path, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(xadj, adjncy, weights or None) of a ParHiP file with 32-bit ids and weights (write_parhip's)."""
    raw = np.fromfile(path, dtype=np.uint8)
    version, n_file, entries = np.frombuffer(raw[:24].tobytes(), np.uint64).astype(np.int64)
    assert n_file == n
    offsets = np.frombuffer(raw[24 : 24 + 8 * (n + 1)].tobytes(), np.uint64).astype(np.int64)
    body = raw[24 + 8 * (n + 1) :]
    adjncy = np.frombuffer(body[: 4 * entries].tobytes(), np.uint32).astype(np.int64)
    weights = None if version & 1 else np.frombuffer(body[4 * entries :].tobytes(), np.int32).astype(np.int64)
    return (offsets - offsets[0]) // 4, adjncy, weights


@pytest.mark.parametrize("rank_weights", [False, True])
def test_the_relabelled_parhip_file_is_the_graph_in_the_new_order(tmp_path, rank_weights):
    """KaMinPar gets the graph in its locality order (partition.locality_order, reverse Cuthill-McKee): the file
    holds exactly the relabelled graph (each neighbour list in its old order, so not sorted), weights with
    their edges, whatever the chunking; KaMinPar loads it, plain and compressed, as that graph: its edge cut
    of relabelled labels equals ours; the order is a permutation, the same every time."""
    import kaminpar

    from b3stream.mining.partition import locality_order, write_parhip

    S = random_S(500, 12, seed=9)
    g = build_graph(S, "union", rank_weights=rank_weights)
    order = locality_order(g)
    assert np.array_equal(np.sort(order), np.arange(g.n)) and np.array_equal(order, locality_order(g))
    for perm, chunk in ((order, 97), (np.random.default_rng(1).permutation(g.n), 1 << 24)):
        path = tmp_path / "g.parhip"
        write_parhip(g, path, chunk=chunk, order=perm)
        xadj, adjncy, weights = read_parhip(path, g.n)
        new_of = np.empty(g.n, np.int64)
        new_of[perm] = np.arange(g.n)
        rows = np.repeat(np.arange(g.n), np.diff(xadj))
        assert np.array_equal(np.diff(xadj), g.degree[perm])
        code = rows * g.n + adjncy
        want = new_of[g.rows()] * g.n + new_of[g.adjncy]
        got_by, want_by = np.argsort(code), np.argsort(want)
        assert np.array_equal(code[got_by], want[want_by])
        if rank_weights:
            assert np.array_equal(weights[got_by], g.eweights[want_by])
        else:
            assert weights is None
        labels = np.random.default_rng(0).integers(0, 7, size=g.n)
        w = np.ones(len(g.adjncy), np.int64) if g.eweights is None else g.eweights
        for compressed in (False, True):
            kg = kaminpar.load_graph(str(path), kaminpar.GraphFileFormat.PARHIP, compressed)
            assert (kg.n(), kg.m()) == (g.n, len(g.adjncy))
            assert kaminpar.edge_cut(kg, labels[perm].tolist()) == \
                int(w[labels[g.rows()] != labels[g.adjncy]].sum()) // 2


def test_unknown_partitioner_or_preset_is_refused():
    from b3stream.config import ConfigError

    g = build_graph(random_S(100, 5, seed=1))
    with pytest.raises(ConfigError, match="partitioner must be one of"):
        partition(g, 8, partitioner="scotch")
    with pytest.raises(ConfigError, match="not one of KaMinPar's presets"):
        partition(g, 8, partitioner="kaminpar", context="nope")


def test_kaminpar_memory_lean_preset_gives_exactly_K_too():
    """``terapart-largek`` (what 10M examples need in 24 GB) keeps the exact sizes and most edges inside."""
    q, p, _ = clustered(1000, clusters=25, seed=8)
    S, _, _, _ = rank_group(q, p, RankParams(p=2, m=20, index="flat"))
    g = build_graph(S, "mutual")
    comm, stats = partition(g, 32, partitioner="kaminpar", threads=1, context="terapart-largek")
    check_communities(comm, 1000, 32)
    assert stats["repaired"] is False and stats["internal_edge_fraction"] > 0.5

"""rank.py's torch index: exact chunked matmul + top-k, the ranking used on a GPU that FAISS cannot use.

On CPU the same code runs on the CPU, so its results are checked here against FAISS's flat index (the
reference the GPU path must reproduce): ids equal but for the order of equal scores, scores within 1e-5.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from b3stream.config import ConfigError
from b3stream.mining.rank import RankParams, TorchIndex, choose_index, exact_search, rank_group

from ._mining_synth import clustered


def flat_search(q: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    return index.search(np.ascontiguousarray(q, dtype=np.float32), k)


def assert_same_topk(D, I, D_ref, I_ref, tol: float = 1e-5) -> None:
    """Scores equal within ``tol``; ids equal wherever the score is not tied (within ``tol``) with another
    candidate of the row, and every returned id carries its own score."""
    np.testing.assert_allclose(D, D_ref, atol=tol)
    for row in range(len(I)):
        if not np.array_equal(I[row], I_ref[row]):
            # Only ties may reorder: the differing ids must hold (near-)equal scores, and the same set
            # of ids above the k-th score.
            kth = D_ref[row, -1]
            clear = D_ref[row] > kth + tol
            assert set(I[row][D[row] > kth + tol]) == set(I_ref[row][clear]), row
            for j in np.nonzero(I[row] != I_ref[row])[0]:
                assert abs(D[row, j] - D_ref[row, j]) <= tol


@pytest.mark.parametrize("chunk,qblock", [(65536, 4096), (257, 100)])  # one block; many uneven blocks
def test_torch_index_equals_flat_search(chunk, qblock):
    q, p, _ = clustered(2000, d=48, clusters=25, seed=3)
    index = TorchIndex(p, device="cpu", chunk=chunk, qblock=qblock)
    D, I = index.search(q, 40)
    D_ref, I_ref = flat_search(q, p, 40)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (2000, 40)
    assert_same_topk(D, I, D_ref, I_ref)
    # Recomputed in float64, the returned scores are the returned ids' own inner products.
    exact = np.einsum("nd,nkd->nk", q.astype(np.float64), p.astype(np.float64)[I])
    np.testing.assert_allclose(D, exact, atol=1e-5)


def test_torch_index_with_exact_duplicates_differs_only_in_tie_order():
    q, p, _ = clustered(600, d=16, clusters=10, seed=4)
    p = np.concatenate([p, p[:200]])  # 200 positives twice: exact score ties
    D, I = TorchIndex(p, device="cpu", chunk=128, qblock=64).search(q, 25)
    D_ref, I_ref = flat_search(q, p, 25)
    assert_same_topk(D, I, D_ref, I_ref)


def test_torch_index_pads_like_faiss_when_k_exceeds_the_base():
    q, p, _ = clustered(50, d=8, clusters=5, seed=5)
    D, I = TorchIndex(p[:10], device="cpu").search(q, 12)
    assert (I[:, 10:] == -1).all() and np.isneginf(D[:, 10:]).all()
    assert (np.sort(I[:, :10], axis=1) == np.arange(10)).all()


@pytest.mark.parametrize("p_skip,m", [(5, 20), (0, 30)])
def test_rank_group_with_torch_equals_flat(p_skip, m):
    q, p, _ = clustered(1500, d=32, clusters=20, seed=6)
    prm = RankParams(p=p_skip, m=m, index="flat")
    S, scores, T, info = rank_group(q, p, prm)
    S2, scores2, T2, info2 = rank_group(q, p, RankParams(p=p_skip, m=m, index="torch"))
    assert info["kind"] == "flat" and info2["kind"] == "torch" and info2["device"] == "cpu"
    assert "recall" not in info2  # exact: no recall check
    np.testing.assert_allclose(scores2, scores, atol=1e-5)
    differs = S2 != S
    # A differing id is a reordering among equal scores only.
    assert np.all(np.abs(scores2[differs] - scores[differs]) <= 1e-5)
    assert differs.mean() < 0.01
    assert T2.shape == T.shape and (T.size == 0 or np.mean(T2 == T) > 0.99)


def test_exact_search_unchanged_by_the_shared_topk():
    """exact_search (recall checks, quality bound) now runs through the same top-k merge: still equal to
    flat search, with the own positive excluded."""
    q, p, _ = clustered(700, d=24, clusters=12, seed=7)
    own = np.arange(700)
    D, I = exact_search(q, p, 15, exclude=own, chunk=200, qblock=128)
    assert not (I == own[:, None]).any()
    D_ref, I_ref = flat_search(q, p, 16)
    keep = I_ref != own[:, None]
    D_ref = np.stack([d[k][:15] for d, k in zip(D_ref, keep)])
    I_ref = np.stack([i[k][:15] for i, k in zip(I_ref, keep)])
    assert_same_topk(D, I, D_ref, I_ref)


def test_choose_index_takes_torch_on_a_gpu_faiss_cannot_use():
    auto, flat = RankParams(index="auto", exact_threshold=100), RankParams(index="flat")
    # A GPU that FAISS cannot use: exact torch search on it, never the CPU.
    assert choose_index(50, auto, cuda=True, faiss_gpu=False) == "torch"
    assert choose_index(10_000, auto, cuda=True, faiss_gpu=False) == "torch"
    assert choose_index(50, flat, cuda=True, faiss_gpu=False) == "torch"
    # FAISS has the GPU (it moves flat / IVF there), or there is no GPU: unchanged.
    assert choose_index(50, auto, cuda=True, faiss_gpu=True) == "flat"
    assert choose_index(10_000, auto, cuda=True, faiss_gpu=True) == "ivf"
    assert choose_index(50, auto, cuda=False, faiss_gpu=False) == "flat"
    assert choose_index(10_000, auto, cuda=False, faiss_gpu=False) == "ivf"
    # Explicit approximate indexes are kept as asked; torch can be asked for anywhere.
    assert choose_index(50, RankParams(index="hnsw"), cuda=True, faiss_gpu=False) == "hnsw"
    assert choose_index(50, RankParams(index="torch"), cuda=False, faiss_gpu=False) == "torch"
    RankParams(index="torch").check()
    with pytest.raises(ConfigError):
        RankParams(index="cuda").check()


def test_gpu_extra_takes_the_maintained_faiss_gpu_wheels():
    """faiss-gpu 1.15.x (CUDA 12 runtime wheels), not faiss-gpu-cu12 (stopped at 1.14); install.sh puts
    the same package back after removing faiss-cpu."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    extra = [Requirement(r) for r in tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]]
    assert [r.name for r in extra] == ["faiss-gpu"]
    assert "1.15.1" in extra[0].specifier and "1.14.3" not in extra[0].specifier
    script = (root / "tools" / "install.sh").read_text()
    assert "faiss-gpu-cu12" not in script and '--no-deps "faiss-gpu>=1.15"' in script


def test_without_faiss_a_gpu_box_ranks_with_torch_and_a_faiss_index_names_the_missing_package(monkeypatch):
    # A GPU machine without a FAISS build for its CUDA: ``auto`` must still rank (torch on the GPU), and an
    # index that only FAISS provides must say what to install rather than fail with a bare ImportError.
    import sys

    from b3stream.mining.rank import build_index, faiss_installed, gpu_available

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    assert not faiss_installed() and not gpu_available()
    assert choose_index(50, RankParams(), cuda=True) == "torch"
    base = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)  # unit rows: each row's best match is itself
    with pytest.raises(ConfigError, match="faiss-cpu"):
        build_index(base, "flat", RankParams())
    index, desc, _ = build_index(base, "torch", RankParams())
    assert desc["kind"] == "torch" and index.search(base[:3], 2)[1][:, 0].tolist() == [0, 1, 2]

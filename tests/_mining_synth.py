"""Synthetic teacher embeddings for the mining tests: clustered unit vectors with known structure."""

from __future__ import annotations

import numpy as np


def clustered(n: int, d: int = 32, clusters: int = 20, seed: int = 0, spread: float = 0.6,
              pair_noise: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, positives, cluster labels): each query is its cluster centre plus noise, its positive the
    query plus a little more noise; all rows L2-normalised, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, size=n)
    q = centres[labels] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    p = q + pair_noise * rng.standard_normal((n, d)) / np.sqrt(d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    return q.astype(np.float32), p.astype(np.float32), labels


def random_S(n: int, m: int, seed: int = 0, pad_rows: int = 0) -> np.ndarray:
    """Neighbour lists with distinct entries per row, no self entries; the first ``pad_rows`` rows end in
    -1 padding."""
    rng = np.random.default_rng(seed)
    S = np.empty((n, m), dtype=np.int32)
    for i in range(n):
        row = rng.choice(n - 1, size=m, replace=False)
        S[i] = row + (row >= i)
    for i in range(pad_rows):
        S[i, m // 2 :] = -1
    return S

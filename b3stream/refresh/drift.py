"""Drift: whether the schedule in use has gone stale for the student, measured cheaply (``refresh.when:
bound``).

A refresh costs an embedding pass over the whole split. Refreshing every N steps spends it whether or not
the student has moved; instead, at each snapshot the miner can measure how hard the schedule in use still
is for the student and refresh only when that has drifted. The measure is the Theorem-1 bound (B3 paper,
section 3: ``log(N/K * H_i^K / H_{B_i,i}^K)``, lower is harder) on a **probe**: a fixed, seeded set of
``probe_batches`` of the schedule's own batches, whose members form the probe's whole universe (N = the
probe's size; the top-K of the global term is taken over the probe's positives). Embedding the probe costs
``probe_batches * |B|`` pairs instead of the split.

The probe's bound is recorded when the schedule is published, under the embeddings that mined it (the
*reference*), and measured again under each new snapshot; ``drift = now - reference``. When the batches
got easier for the student by at least ``refresh.bound_drift`` nats, the miner refreshes; otherwise it
skips the snapshot. The reference and the probe live in ``RUN/refresh/probe.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import read_json, write_json


@dataclass
class Probe:
    """``probe_batches`` batches of a schedule version (flat ids with offsets) and their reference bound."""

    version: int
    ids: np.ndarray
    offsets: np.ndarray
    reference: float | None = None

    @classmethod
    def of(cls, schedule, batches: int, seed: int = 0) -> "Probe":
        """A seeded sample of the schedule's full batches (all of them when it has fewer)."""
        sizes = np.diff(schedule.offsets)
        full = np.flatnonzero(sizes == sizes.max(initial=0))
        chosen = np.sort(np.random.default_rng(seed).permutation(full)[:batches])
        parts = [schedule.ids[schedule.offsets[b] : schedule.offsets[b + 1]] for b in chosen]
        ids = np.concatenate(parts) if parts else np.empty(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return cls(version=int(schedule.version or 0), ids=ids.astype(np.int64), offsets=offsets)

    def bound(self, queries: np.ndarray, positives: np.ndarray, K: int, temperature: float,
              device=None) -> float:
        """The probe's bound for embeddings of its members (row i: ``ids[i]``), the probe as the universe;
        its products on ``device`` (the miner's; None: the CPU)."""
        from ..mining.quality import batch_quality

        local = np.arange(len(self.ids), dtype=np.int64)
        q = batch_quality(local, self.offsets, np.asarray(queries, np.float32), np.asarray(positives, np.float32),
                          K=min(K, max(1, len(local) - 1)), temperature=temperature, sample=None, device=device)
        return float(q["theorem1_bound"])

    # -- on disk -----------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        write_json(path, {"version": self.version, "ids": self.ids.tolist(), "offsets": self.offsets.tolist(),
                          "reference": self.reference})

    @classmethod
    def load(cls, path: Path, schedule) -> "Probe | None":
        """The probe saved for ``schedule``, or None: none saved, one for another version, or a file that
        does not describe batches of this schedule (corrupt or crafted: the miner then makes a new one)."""
        d = read_json(path)
        if not isinstance(d, dict) or d.get("version") != schedule.version or d.get("reference") is None:
            return None
        try:
            probe = cls(version=int(d["version"]), ids=np.asarray(d["ids"], np.int64),
                        offsets=np.asarray(d["offsets"], np.int64), reference=float(d["reference"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None
        o = probe.offsets
        if probe.ids.ndim != 1 or o.ndim != 1 or len(o) < 2 or o[0] != 0 or o[-1] != len(probe.ids) or \
                (np.diff(o) <= 0).any() or not np.isfinite(probe.reference) or \
                not np.isin(probe.ids, schedule.ids).all():
            return None
        return probe


def embed_probe(encoder, data: str, ids: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Queries and positives of ``ids`` (train split of ``data``) embedded by ``encoder``, with their prompts."""
    from ..data.reader import ShardedDataset

    records = ShardedDataset(data, "train", verify=False)
    recs = [records[int(i)] for i in ids]
    from ..model_folder import with_model_prompts

    manifest = with_model_prompts(records.manifest, getattr(encoder, "prompts", {}))  # the model's where none
    q = encoder.encode([manifest.prompted(r, "query") for r in recs], "query", batch_size=batch_size)
    p = encoder.encode([manifest.prompted(r, "positive") for r in recs], "positive", batch_size=batch_size)
    return q, p

"""Content keys: which examples share the same positive text.

Datasets repeat positives: class labels in classification data (every example of a class has the label as
its positive), boilerplate answers, duplicated documents. Two ids with the same positive text must never be
each other's negatives: the loss would push a query away from its correct answer. The B3 paper's rule for
classification ("filter out the golden label" from the rank list) is this case. Mining (ranking, B3++ pools)
and training (InfoNCE logits) compare these keys instead of ids.

A key is the first 8 bytes of BLAKE2b over the *prompted* positive text (what the encoder actually sees), as
a signed int64; two different texts collide with probability about n^2 / 2^64, negligible for any dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def content_key(text: str) -> int:
    """The int64 key of one text."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def content_keys(texts: Iterable[str]) -> np.ndarray:
    """Keys of ``texts`` as an int64 array."""
    return np.fromiter((content_key(t) for t in texts), dtype=np.int64)


def max_multiplicity(keys: np.ndarray) -> int:
    """How many ids share the most repeated key (1 when every key is unique, 0 for no ids)."""
    if len(keys) == 0:
        return 0
    _, counts = np.unique(keys, return_counts=True)
    return int(counts.max())


# -- known positives ------------------------------------------------------------------------------------
#
# A record may carry ``known_positives``: the other positives of its query (a FlagEmbedding ``pos`` list, a
# Tevatron ``positive_passages`` list, prepared one example per positive). Each is a correct answer for that
# example, so an id whose positive has one of those texts is treated as a same-text positive of it: never in
# its neighbour rows, never drawn as a B3++ negative of a batch holding it, masked from its InfoNCE logits.
# Their keys are content keys of the texts behind the example's task's positive prompt, as the positives'.

_PAIR_MIX = np.uint64(0x9E3779B97F4A7C15)  # an odd 64-bit constant: (row, key) pairs -> one code


def known_keys_of(record: dict, prompted) -> list[int]:
    """Content keys of ``record``'s known positives; ``prompted(record, side)`` is ``Manifest.prompted``."""
    return [content_key(prompted({"positive": text, "task": record.get("task")}, "positive"))
            for text in record.get("known_positives") or ()]


class KnownKeys:
    """Per id, the content keys of its known positives, as a CSR: ``keys[offsets[i]:offsets[i+1]]``."""

    def __init__(self, offsets: np.ndarray, keys: np.ndarray):
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.keys = np.asarray(keys, dtype=np.int64)

    @classmethod
    def from_lists(cls, lists: list[list[int]]) -> "KnownKeys":
        counts = np.fromiter((len(k) for k in lists), dtype=np.int64, count=len(lists))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        keys = np.fromiter((k for ks in lists for k in ks), dtype=np.int64, count=int(offsets[-1]))
        return cls(offsets, keys)

    @classmethod
    def from_rows(cls, n: int, rows: dict[int, list[int]]) -> "KnownKeys":
        """``n`` ids of which only those in ``rows`` have known positives."""
        counts = np.zeros(n, dtype=np.int64)
        for i, ks in rows.items():
            counts[i] = len(ks)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        keys = np.fromiter((k for i in sorted(rows) for k in rows[i]), dtype=np.int64, count=int(offsets[-1]))
        return cls(offsets, keys)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def width(self) -> int:
        """The most known positives any id has (0 for none)."""
        return int(self.counts().max()) if len(self) else 0

    def take(self, ids: np.ndarray) -> "KnownKeys":
        """The rows of ``ids``, in that order (row r of the result is id ``ids[r]``)."""
        ids = np.asarray(ids, dtype=np.int64)
        lo, hi = self.offsets[ids], self.offsets[ids + 1]
        return KnownKeys(np.concatenate([[0], np.cumsum(hi - lo)]), self.of(ids))

    def of(self, ids: np.ndarray) -> np.ndarray:
        """The known keys of all of ``ids``, concatenated."""
        ids = np.asarray(ids, dtype=np.int64)
        lo, hi = self.offsets[ids], self.offsets[ids + 1]
        if not (hi > lo).any():
            return np.empty(0, dtype=np.int64)
        return np.concatenate([self.keys[a:b] for a, b in zip(lo, hi) if b > a])

    def contains(self, rows: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``candidates[r, c]`` (content keys) is a known positive key of row ``rows[r]``, as a bool array
        shaped like ``candidates``. Each (row, key) pair is one 64-bit code (a multiplicative mix), so the
        test is one ``isin``; two pairs colliding (probability about n / 2^64) drops one more neighbour."""
        rows = np.asarray(rows, dtype=np.int64)
        lo, hi = self.offsets[rows], self.offsets[rows + 1]
        counts = hi - lo
        if not counts.any():
            return np.zeros(candidates.shape, dtype=bool)
        local = np.repeat(np.arange(len(rows), dtype=np.uint64), counts)
        known = self.of(rows).view(np.uint64)
        with np.errstate(over="ignore"):
            known_codes = known ^ (local * _PAIR_MIX)
            cand_rows = np.arange(len(rows), dtype=np.uint64)[:, None]
            cand_codes = np.asarray(candidates, dtype=np.int64).view(np.uint64) ^ (cand_rows * _PAIR_MIX)
        return np.isin(cand_codes, known_codes)

    def padded(self, rows: np.ndarray, fill: np.ndarray) -> np.ndarray:
        """``(len(rows), width)`` known keys of ``rows``, each row padded with its ``fill`` key (the example's
        own positive key, so padding masks nothing new)."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.offsets[rows + 1] - self.offsets[rows]
        width = int(counts.max()) if len(rows) else 0
        out = np.repeat(np.asarray(fill, dtype=np.int64)[:, None], max(width, 1), axis=1)
        for r, (a, b) in enumerate(zip(self.offsets[rows], self.offsets[rows + 1])):
            out[r, : b - a] = self.keys[a:b]
        return out

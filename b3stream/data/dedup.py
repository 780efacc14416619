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

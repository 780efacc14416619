"""The shared encoder: bundled MiniLM loads offline and matches sentence-transformers; pooling variants."""

import numpy as np
import torch

from b3stream.config import EncoderConfig
from b3stream.encoder import Encoder, pool


def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = Encoder(EncoderConfig())
    texts = ["Return the sorted list.", "def f(xs):\n    return sorted(xs)", "parse a date string"]
    ours = enc.encode(texts, side="positive", batch_size=2)
    ref = SentenceTransformer(enc.path, device="cpu").encode(texts)
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_pooling_last_token_handles_both_paddings():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]

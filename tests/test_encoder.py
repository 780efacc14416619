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


def test_encode_restores_each_modules_own_mode():
    """``encode`` must not switch on dropout that was off: training would depend on whether an evaluation
    ran before it."""
    from b3stream.config import LoraConfig

    enc = Encoder(EncoderConfig(lora=LoraConfig(r=4, alpha=8)), trainable=True)
    dropouts = [m for m in enc.model.modules() if isinstance(m, torch.nn.Dropout)]
    modes = [m.training for m in enc.model.modules()]
    assert any(m.training for m in dropouts) and not all(m.training for m in dropouts)  # from_pretrained + LoRA
    enc.encode(["a query", "another"], "query")
    assert [m.training for m in enc.model.modules()] == modes
    enc.model.train()
    enc.encode(["a query"], "query")
    assert all(m.training for m in dropouts)

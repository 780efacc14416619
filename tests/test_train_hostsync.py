"""The per-step statistics stay on the device until read (no host sync per step), and read the same."""

from __future__ import annotations

import pytest
import torch

from b3stream.train.loss import InfoNCE


def test_loss_statistics_are_lazy_and_match_their_definition():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1)
    d = torch.nn.functional.normalize(q + 0.3 * torch.randn(12, 16), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    out = InfoNCE(0.05)(q, d, n)
    # Nothing copied to the host yet: the statistics are one detached tensor, the sims are not copies.
    assert isinstance(out.stats, torch.Tensor) and out.stats.shape == (4,) and not out.stats.requires_grad
    assert out._floats is None
    assert out.pos_sims.device == q.device and out.hardest_sims.device == q.device
    # Read once, all four come over together, and they are what they say.
    sims = q @ torch.cat([d, n]).T
    pos = sims.diagonal()[:12]
    masked = sims.clone()
    masked[torch.arange(12), torch.arange(12)] = -torch.inf
    hardest = masked.max(1).values
    ref_loss = torch.nn.functional.cross_entropy(sims / 0.05, torch.arange(12))
    assert out.global_loss == pytest.approx(float(ref_loss), rel=1e-5)
    assert out._floats is not None
    assert out.pos_sim == pytest.approx(float(pos.mean()), abs=1e-6)
    assert out.hardest_neg_sim == pytest.approx(float(hardest.mean()), abs=1e-6)
    assert out.accuracy == pytest.approx(float((pos > hardest).float().mean()))
    torch.testing.assert_close(out.pos_sims, pos)
    torch.testing.assert_close(out.hardest_sims, hardest)

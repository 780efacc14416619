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


def test_monitor_reads_tensors_only_when_a_line_is_due_and_loses_no_step(tmp_path):
    """Tensor values wait in the monitor until a console line is due; then every buffered step reaches
    TensorBoard with its own value, and close() writes the rest."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from b3stream.monitor import Monitor

    mon = Monitor(tmp_path, total_steps=7, log_every=3, progress=False)
    for step in range(1, 6):
        m = {"loss": torch.tensor(float(step)), "grad_norm": torch.tensor(10.0 * step), "lr": 0.1,
             "examples_per_s": None}
        mon.step(step, m)
        # steps 1-2 and 4-5 are buffered as tensors; step 3 flushed 1-3 into numbers
        assert len(mon._pending) == step % 3
        if step == 3:
            assert isinstance(m["loss"], float) and m["loss"] == 3.0
    mon.close()  # steps 4 and 5 were never due: close() writes them
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(s, float(s)) for s in range(1, 6)]
    assert [e.value for e in acc.Scalars("train/grad_norm")] == [10.0 * s for s in range(1, 6)]
    assert "train/examples_per_s" not in acc.Tags()["scalars"]  # None is skipped, not written as 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_host_side_token_extents_trim_like_the_mask(side):
    """GradCache chunks cut their padding from host-side extents exactly where the mask says, for right
    padding (trimmed) and left padding (nothing to trim on the right)."""
    from b3stream.train.loss import _trim, token_extents

    lengths = torch.tensor([3, 7, 2, 5, 1, 4])
    width = 9
    cols = torch.arange(width)
    mask = (cols[None, :] < lengths[:, None]) if side == "right" else (cols[None, :] >= width - lengths[:, None])
    mask = mask.long()
    features = {"input_ids": torch.randint(1, 100, mask.shape) * mask, "attention_mask": mask}
    ext = token_extents(mask)
    assert ext.tolist() == (lengths.tolist() if side == "right" else [width] * 6)
    for rows in (slice(0, 3), slice(3, 6), slice(4, 5)):
        part = {k: v[rows] for k, v in features.items()}
        by_mask, by_host = _trim(part), _trim(part, ext[rows])
        assert by_mask.keys() == by_host.keys()
        for k in by_mask:
            assert torch.equal(by_mask[k], by_host[k])
        expected = int(lengths[rows].max()) if side == "right" else width
        assert by_host["attention_mask"].shape[1] == expected

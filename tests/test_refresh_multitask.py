"""Refreshed mode end to end on multi-task data (issue 32): b3pp over two epochs on four tasks of unequal size,
a snapshot every few steps, each refresh landing at its snapshot's step (``refresh.max_lag_steps: 0``), the
real spawned miner embedding with the student's snapshots. Every train id exactly once per epoch, the
epochs as long as the step budget the run was built for, and every step trained on a refreshed schedule one of
the miner's batches with all the hard negatives drawn for it (the miner batches the ids to come apart from the
trained ones, so after a synchronous swap every batch is one of the miner's).

The run is ``tools/check_refresh_invariants.py``'s (which reports the same figures for larger runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_refreshed_b3pp_on_four_tasks_trains_each_id_once_with_hard_negatives(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import check_refresh_invariants as tool

    args = tool.parser().parse_args(["--out", str(tmp_path), "--sizes", "48", "36", "28", "20", "--every-steps", "4",
                                     "--m", "8", "--h", "1", "--epochs", "2"])
    r = tool.check(tmp_path, "b3pp", args)
    per_epoch = list(r["steps_per_epoch"].values())
    assert r["exactly_once"] == {0: True, 1: True}, r
    assert len(per_epoch) == 2 and per_epoch[0] == per_epoch[1] and r["steps"] == sum(per_epoch), r
    assert r["mid_epoch_swaps"] >= 3 and len(r["versions"]) >= 4, r
    # every step on a refreshed schedule is one of the miner's batches, with every negative drawn for it (a
    # batch of a task this small may have few or none to draw: the share is that of the data, not of a swap)
    assert r["refreshed_steps"] > per_epoch[0] and r["refreshed_whole_with_their_negatives"] == r["refreshed_steps"], r
    assert r["share_with_hard_negatives"] >= 0.8, r

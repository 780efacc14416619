"""`b3stream mine schedule` guards: stale communities, taken versions, negative versions and seeds.

Runs the real stages on synthetic bring-your-own embeddings (no teacher model), so it is quick.
"""

from __future__ import annotations

import numpy as np
import pytest

from b3stream import load_schedule
from b3stream.cli import main
from b3stream.schedule import list_versions, version_path

from ._mining_synth import clustered


@pytest.fixture
def byo(tmp_path):
    """(out folder, flags) for 400 clustered examples brought as .npy embeddings."""
    q, p, _ = clustered(400, d=16, clusters=20, seed=0)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    out = tmp_path / "mine"
    flags = ["--query-embeddings", str(tmp_path / "q.npy"), "--positive-embeddings", str(tmp_path / "p.npy"),
             "--out", str(out), "--p", "2", "--m", "10", "--K", "4", "--batch-size", "16", "--h", "2", "--quiet"]
    return out, flags


def snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


def test_b3_schedule_alone_refuses_communities_of_older_neighbour_lists(byo, capsys):
    out, flags = byo
    assert main(["mine", "--strategy", "b3", *flags]) == 0
    assert main(["mine", "rank", *flags, "--m", "12"]) == 0  # new neighbour lists; the communities are stale
    before = snapshot(out)
    # b3 reads no S itself, so only the partition record's upstream token shows the communities are stale
    assert main(["mine", "schedule", "--strategy", "b3", *flags]) == 2
    err = capsys.readouterr().err
    assert "other neighbour lists than those now in" in err and "b3stream mine partition" in err
    assert snapshot(out) == before  # nothing published
    assert main(["mine", "partition", *flags]) == 0
    assert main(["mine", "schedule", "--strategy", "b3", *flags]) == 0
    assert load_schedule(out / "schedules").meta["m"] == 12


def test_b3_schedule_alone_refuses_communities_whose_neighbour_lists_are_gone(byo, capsys):
    out, flags = byo
    assert main(["mine", "--strategy", "b3", *flags]) == 0
    (out / "rank" / "rank.json").unlink()  # e.g. a rank re-run that failed after dropping its old record
    before = snapshot(out)
    assert main(["mine", "schedule", "--strategy", "b3", *flags]) == 2
    assert "no neighbour lists (rank.json)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_an_explicit_version_that_exists_is_refused_unless_overwrite(byo, capsys):
    out, flags = byo
    assert main(["mine", "--strategy", "random", "--version", "5", *flags]) == 0
    path = version_path(out / "schedules", 5)
    before = snapshot(out)
    assert main(["mine", "schedule", "--strategy", "random", "--version", "5", "--seed", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "--overwrite" in err
    assert snapshot(out) == before  # the schedule and its sidecar are untouched
    assert load_schedule(path).meta["seed"] == 0
    assert main(["mine", "schedule", "--strategy", "random", "--version", "5", "--seed", "1", "--overwrite",
                 *flags]) == 0
    assert load_schedule(path).meta["seed"] == 1
    assert list_versions(out / "schedules") == [5]
    assert main(["mine", "schedule", "--strategy", "random", *flags]) == 0  # no version: the next free one
    assert list_versions(out / "schedules") == [5, 6]


@pytest.mark.parametrize("stage", ["all", "schedule", "partition"])
@pytest.mark.parametrize("flag,value,message", [
    ("--version", "-3", "schedule version must be a non-negative integer, got -3"),
    ("--seed", "-1", "seed must be a non-negative integer, got -1"),
])
def test_negative_version_or_seed_is_an_error_before_any_work(byo, capsys, stage, flag, value, message):
    out, flags = byo
    if stage != "all":
        assert main(["mine", "--strategy", "b3", *flags]) == 0
    before = snapshot(out)
    assert main(["mine", stage, "--strategy", "b3", flag, value, *flags]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before

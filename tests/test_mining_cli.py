"""`b3stream mine` end to end on the toy dataset with the real MiniLM teacher; resume; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from b3stream import load_schedule
from b3stream.cli import main
from b3stream.config import MineConfig
from b3stream.data.manifest import Manifest
from b3stream.mining.quality import batch_quality

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--p", "2", "--m", "10", "--K", "4", "--batch-size", "16", "--h", "2", "--quiet"]


@pytest.fixture(scope="module")
def toy_mined(toy_dataset, tmp_path_factory):
    """All stages on the toy data through the CLI, from the shipped example config with flag overrides."""
    out = tmp_path_factory.mktemp("toy_mine") / "mine"
    cfg = tmp_path_factory.mktemp("cfg") / "mine.yaml"
    data = yaml.safe_load((ROOT / "configs" / "mine_b3.yaml").read_text())
    data.update(data=str(toy_dataset), out=str(out), quality_sample=None, embed_chunk=100)
    cfg.write_text(yaml.safe_dump(data))
    assert main(["mine", "--config", str(cfg), "--strategy", "b3pp", *SMALL]) == 0
    return toy_dataset, out, cfg


def test_mine_all_stages_end_to_end(toy_mined, capsys):
    data, out, _ = toy_mined
    n = Manifest.load(data).stamp("train")["n"]
    sched = load_schedule(out / "schedules", expect=Manifest.load(data).stamp("train"))
    sched.check_epoch(n)
    meta = sched.meta
    assert (meta["strategy"], meta["p"], meta["m"], meta["K"], meta["batch_size"], meta["h"]) == \
        ("b3pp", 2, 10, 4, 16, 2)
    assert meta["source_model"].startswith("all-MiniLM-L6-v2")
    assert sched.negatives.shape == (n, 2)
    # the stored quality is that of this file's batches and negatives on these embeddings (not, say, of the
    # batches before the hard negatives were attached), and it beats random batches of the same size
    queries = np.load(out / "embeddings" / "queries.npy", mmap_mode="r")
    positives = np.load(out / "embeddings" / "positives.npy", mmap_mode="r")
    again = batch_quality(sched.ids, sched.offsets, queries, positives, meta["quality"]["K"],
                          temperature=meta["quality"]["temperature"], negatives=sched.negatives, sample=None)
    for key in ("theorem1_bound", "neg_sim_mean", "neg_sim_hardest_mean"):
        assert meta["quality"][key] == pytest.approx(again[key], rel=1e-4), key
    perm = np.random.default_rng(0).permutation(n)
    rand = batch_quality(perm, np.append(np.arange(0, n, 16), n), queries, positives, meta["quality"]["K"],
                         temperature=meta["quality"]["temperature"], sample=None)
    assert meta["quality"]["theorem1_bound"] < rand["theorem1_bound"] - 1.0, (meta["quality"], rand)
    assert set(meta["timings"]) >= {"embed", "rank", "partition", "schedule", "quality"}
    emb = np.load(out / "embeddings" / "queries.npy", mmap_mode="r")
    assert emb.dtype == np.float16 and emb.shape == (n, 384)
    record = json.loads((out / "embeddings" / "embeddings.json").read_text())
    assert record["stamp"] == Manifest.load(data).stamp("train") and record["complete"]
    assert main(["inspect", str(out / "schedules"), "--embeddings", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Theorem-1 bound" in text and "b3pp" in text


def test_stages_one_by_one_and_byte_identical_reruns(toy_mined):
    data, out, cfg = toy_mined
    for stage in ("rank", "partition"):
        assert main(["mine", stage, "--config", str(cfg), *SMALL]) == 0
    runs = []
    for _ in range(2):  # the rerun replaces version 7, which needs --overwrite
        assert main(["mine", "schedule", "--config", str(cfg), "--strategy", "b3pp", "--version", "7", "--overwrite",
                     *SMALL]) == 0
        runs.append((out / "schedules" / "v000007.b3s").read_bytes())
    assert runs[0] == runs[1]
    assert main(["mine", "schedule", "--config", str(cfg), "--strategy", "b3pp", "--version", "8", "--seed", "1",
                 *SMALL]) == 0
    assert load_schedule(out / "schedules" / "v000008.b3s").ids.tolist() != \
        load_schedule(out / "schedules" / "v000007.b3s").ids.tolist()
    for strategy in ("random", "task", "gcbs", "b3"):
        assert main(["mine", "schedule", "--config", str(cfg), "--strategy", strategy, *SMALL]) == 0
        load_schedule(out / "schedules").check_epoch(load_schedule(out / "schedules").meta["n"])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("flags,message", [
    (["--K", "32", "--batch-size", "16"], "between 1 and the batch size"),
    (["--K", "4", "--batch-size", "18"], "not a multiple of K"),
])
def test_bad_batch_parameters_leave_no_output(toy_mined, capsys, flags, message):
    _, out, cfg = toy_mined
    before = snapshot(out)
    assert main(["mine", "schedule", "--config", str(cfg), "--strategy", "b3", "--p", "2", "--m", "10",
                 *flags, "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert snapshot(out) == before


def test_p_plus_m_too_large_for_a_task(toy_mined, capsys):
    _, out, cfg = toy_mined
    before = snapshot(out)
    assert main(["mine", "rank", "--config", str(cfg), "--p", "60", "--m", "60", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "p + m = 60 + 60 = 120" in err and "task 't0'" in err
    assert snapshot(out) == before


def test_fingerprint_mismatch_is_refused(toy_mined, code_dataset, capsys):
    _, out, cfg = toy_mined
    before = snapshot(out)
    assert main(["mine", "rank", "--config", str(cfg), "--data", str(code_dataset), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "rebuild it for this data" in err and "embeddings" in err
    assert snapshot(out) == before


def test_embed_resumes_after_an_interruption(toy_dataset, toy_mined, tmp_path, monkeypatch, capsys):
    from b3stream.encoder import Encoder
    from b3stream.mining.pipeline import embed_stage

    _, ref_out, _ = toy_mined
    cfg = MineConfig(data=str(toy_dataset), out=str(tmp_path / "mine"), embed_chunk=100)
    real = Encoder.encode
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # third chunk's queries: two chunks are on disk
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Encoder, "encode", flaky)
    with pytest.raises(KeyboardInterrupt):
        embed_stage(cfg, progress=False)
    record = json.loads((tmp_path / "mine" / "embeddings" / "embeddings.json").read_text())
    assert record["rows_done"] == 200 and not record["complete"]
    assert main(["mine", "rank", "--data", str(toy_dataset), "--out", str(tmp_path / "mine"), *SMALL]) == 2
    assert "embeddings are incomplete (200 of" in capsys.readouterr().err
    calls["n"] = 0
    embed_stage(cfg, progress=False)
    assert calls["n"] == 4  # only the two missing chunks (queries + positives each)
    for side in ("queries", "positives"):
        resumed = np.load(tmp_path / "mine" / "embeddings" / f"{side}.npy")
        fresh = np.load(ref_out / "embeddings" / f"{side}.npy")
        np.testing.assert_allclose(resumed.astype(np.float32), fresh.astype(np.float32), atol=2e-3)
    shutil.rmtree(tmp_path / "mine")


def test_small_tasks_merge_end_to_end(toy_mined, tmp_path):
    data, out, cfg = toy_mined
    work = tmp_path / "mine"
    shutil.copytree(out / "embeddings", work / "embeddings")  # reuse the teacher embeddings
    args = ["--config", str(cfg), "--out", str(work), "--p", "100", "--m", "10", "--K", "4", "--batch-size", "16",
            "--quiet"]
    assert main(["mine", "rank", *args]) == 2  # every toy task (106-133 examples) is too small for p+m=110
    assert main(["mine", *args, "--strategy", "b3pp", "--h", "1", "--set", "small_tasks=merge"]) == 0
    record = json.loads((work / "rank" / "rank.json").read_text())
    # t0 (106) is too small for p+m = 110 and alone stays too small, so the next smallest task t1 (120)
    # joins it; t2 (133) is ranked on its own
    assert set(record["info"]["groups"]) == {"(small tasks)", "t2"}
    assert record["info"]["groups"]["(small tasks)"]["n"] == 226
    assert set(np.load(work / "partition" / "community_task.npy").tolist()) == {-1, 2}
    sched = load_schedule(work / "schedules")
    sched.check_epoch(sched.meta["n"])

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
    assert sched.negative_ids.shape == (n, 2)
    # the stored quality is that of this file's batches and negatives on these embeddings (not, say, of the
    # batches before the hard negatives were attached), and it beats random batches of the same size
    queries = np.load(out / "embeddings" / "queries.npy", mmap_mode="r")
    positives = np.load(out / "embeddings" / "positives.npy", mmap_mode="r")
    again = batch_quality(sched.ids, sched.offsets, queries, positives, meta["quality"]["K"],
                          temperature=meta["quality"]["temperature"], negatives=sched.negative_ids, sample=None)
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


# -- pre-flight: every parameter that the config and N can show wrong is refused before the teacher loads --


@pytest.fixture
def teacher_loads(monkeypatch):
    """How many times the teacher model was loaded (the real loader runs; it is only counted)."""
    from b3stream.encoder import Encoder

    real, count = Encoder.__init__, {"n": 0}

    def counted(self, *a, **k):
        count["n"] += 1
        real(self, *a, **k)

    monkeypatch.setattr(Encoder, "__init__", counted)
    return count


# The toy train split: N = 359 in tasks t0 (106), t1 (120), t2 (133).
@pytest.mark.parametrize("flags, message", [
    (["--strategy", "b3", "--K", "5", "--batch-size", "16"], "K=5 does not divide batch_size=16"),
    (["--strategy", "b3pp", "--h", "0"], "h=0: b3pp needs h >= 1"),
    (["--strategy", "b3", "--p", "100", "--m", "10"], "p + m = 100 + 10 = 110 but task 't0' has only 106 examples"),
    (["--strategy", "gcbs", "--p", "300", "--m", "100", "--set", "per_task=false"],
     "p + m = 300 + 100 = 400 but task 'all' has only 359 examples"),
    (["--strategy", "b3", "--K", "512", "--batch-size", "512"], "K=512 is larger than N=359"),
    (["--strategy", "random", "--batch-size", "1024"], "batch_size=1024 is larger than N=359"),
    (["--strategy", "b3", "--set", "task_params={nope: {p: 1}}"], "task_params names task(s) ['nope']"),
    (["--K", "-1"], "K: must be > 0, got -1"),
    (["--p", "-1"], "p: must be >= 0, got -1"),
    (["--h", "-1"], "h: must be >= 0, got -1"),
    (["--batch-size", "0"], "batch_size: must be > 0, got 0"),
    (["--set", "quality_temperature=inf"], "quality_temperature: must be a finite number, got inf"),
])
def test_bad_mining_values_are_refused_before_the_teacher_loads(toy_dataset, tmp_path, capsys, teacher_loads,
                                                                flags, message):
    """Each of these used to be refused only after the embed stage (and for some rank and partition) had run
    and written its outputs, or, for K or |B| above N, accepted as one short batch."""
    out = tmp_path / "mine"
    assert main(["mine", "--data", str(toy_dataset), "--out", str(out), *SMALL, *flags]) == 2
    assert teacher_loads["n"] == 0
    assert not out.exists()  # no embeddings/, nothing at all
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "b3", "--K", "64", "--batch-size", "64"], "K=64 is larger than N=40"),
    (["--strategy", "gcbs", "--p", "30", "--m", "10"], "p + m = 30 + 10 = 40 but task 'default' has only 40"),
    (["--strategy", "random", "--batch-size", "48"], "batch_size=48 is larger than N=40"),
])
def test_own_embeddings_take_n_from_the_array(tmp_path, capsys, flags, message):
    from ._mining_synth import clustered

    q, p, _ = clustered(40, d=16, seed=1)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    out = tmp_path / "mine"
    assert main(["mine", "--query-embeddings", str(tmp_path / "q.npy"), "--positive-embeddings",
                 str(tmp_path / "p.npy"), "--out", str(out), *SMALL, *flags]) == 2
    assert not out.exists()
    assert message in capsys.readouterr().err


def test_preflight_never_refuses_what_the_rank_stage_accepts(tmp_path, capsys):
    """With ``small_tasks: merge`` a tie between two tasks of one size is broken by the tasks' order in the
    split, which the manifest does not hold: the pre-flight must not guess it and refuse a task_params entry
    that the rank stage accepts. Once the embeddings are there the order is known and it refuses as rank does."""
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap

    from .conftest import write_jsonl

    rows = [{"q": f"question {t} {i}", "p": f"answer {t} {i} " + "word " * (i % 7), "task": t, "g": f"{t}{i % 4}"}
            for t, n in (("c", 40), ("b", 40), ("a", 5)) for i in range(n)]  # c first; manifest order a, b, c
    data = tmp_path / "data"
    prepare_file(str(write_jsonl(tmp_path / "rows.jsonl", rows)), "jsonl", str(data),
                 FieldMap(query="q", positive="p", task="task", group="g"),
                 held_out={"validation": 0.0, "test": 0.0}, progress=False)
    assert Manifest.load(data).split("train").tasks == {"a": 5, "b": 40, "c": 40}
    out = tmp_path / "mine"
    # p + m = 30: "a" (5) is too small alone; the first of the tied "c" and "b" in the split's order (c) joins it
    flags = ["--data", str(data), "--out", str(out), "--strategy", "b3", "--p", "20", "--m", "10", "--K", "4",
             "--batch-size", "8", "--set", "small_tasks=merge", "--quiet"]
    assert main(["mine", *flags, "--set", "task_params={b: {m: 5}}"]) == 0
    assert set(json.loads((out / "rank" / "rank.json").read_text())["info"]["groups"]) == {"b", "(small tasks)"}
    before = snapshot(out)
    assert main(["mine", *flags, "--set", "task_params={c: {m: 5}}"]) == 2
    assert "task_params names task(s) ['c']" in capsys.readouterr().err
    assert snapshot(out) == before


def test_kaminpar_partitioner_end_to_end(toy_mined, tmp_path):
    """`--partitioner kaminpar` through the CLI: the record names it, its communities are exactly K (no
    repair), and the schedule stage batches them like METIS's."""
    data, out, cfg = toy_mined
    work = tmp_path / "mine"
    shutil.copytree(out, work, ignore=shutil.ignore_patterns("partition"))  # a first partition: no folder yet
    flags = ["--config", str(cfg), "--out", str(work), *SMALL]
    from b3stream.files import HOST

    leftover = work / f".kaminpar-graph.parhip.tmp-{2**22 + 12345}@{HOST}"  # a killed run's graph file
    leftover.write_bytes(b"partial")
    assert main(["mine", "partition", "--partitioner", "kaminpar", "--set", "partition_threads=1", *flags]) == 0
    record = json.loads((work / "partition" / "partition.json").read_text())
    assert record["params"]["partitioner"] == "kaminpar" and "metis_ufactor" not in record["params"]
    assert all(g["partitioner"] == "kaminpar" and g["repaired"] is False for g in record["groups"].values())
    comm = np.load(work / "partition" / "communities.npy")
    sizes = (comm >= 0).sum(1)
    assert (sizes == 4).sum() >= len(comm) - len(record["groups"])  # at most one short community per group
    assert not list(work.rglob("*.parhip*")), "the temporary graph file is removed"
    assert main(["mine", "schedule", "--strategy", "b3", "--version", "20", *flags]) == 0
    sched = load_schedule(work / "schedules" / "v000020.b3s")
    sched.check_epoch(Manifest.load(data).stamp("train")["n"])
    assert sched.meta["partitioner"] == "kaminpar"  # what refreshed mode's miner re-mines with
    # a METIS partition of the same S is stale for a kaminpar config: the parameters differ
    assert main(["mine", "partition", *flags]) == 0
    assert json.loads((work / "partition" / "partition.json").read_text())["params"]["partitioner"] == "metis"


# -- a misspelt flag is named, not the stage its value lands on (issue 31) -----------------------------------


@pytest.mark.parametrize("argv, unknown, hint", [
    (["mine", "--Kk", "4"], "--Kk", "--K"),  # used to be "argument stage: invalid choice: '4'"
    (["mine", "--K", "4", "--batchsize", "16"], "--batchsize", "--batch-size"),
    (["mine", "rank", "--pp", "3"], "--pp 3", None),  # after the stage: parsed, then left over as before
])
def test_a_misspelt_mine_flag_is_named(capsys, argv, unknown, hint):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: b3stream mine")
    assert "argument stage" not in err
    assert f"error: unrecognized arguments: {unknown}" in err
    assert hint is None or f"did you mean {hint}?" in err


@pytest.mark.parametrize("argv, expected", [
    (["mine"], {"stage": "all"}),
    (["mine", "rank", "--p", "10", "--m", "50"], {"stage": "rank", "p": 10, "m": 50}),
    (["mine", "--K", "4", "schedule", "--batch", "16"], {"stage": "schedule", "K": 4, "batch_size": 16}),
    (["mine", "--seed", "-1", "--set", "per_task=false", "--out=x"], {"seed": -1, "overrides": ["per_task=false"],
                                                                    "out": "x"}),
    (["mine", "embed", "--"], {"stage": "embed"}),
])
def test_valid_mine_invocations_still_parse(argv, expected):
    from b3stream.cli import build_parser, parse_args

    args = parse_args(build_parser(), argv)
    assert {k: getattr(args, k) for k in expected} == expected

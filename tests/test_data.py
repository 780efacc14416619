"""Data layer: shards, manifest, ids, splits, readers and every bad-input case of issue 2."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from b3stream.data import DataError, FieldMap, Manifest, ShardedDataset
from b3stream.data.prepare import load_prompts, prepare_file
from b3stream.data.splits import assign_splits

from .conftest import toy_rows, write_jsonl

FIELDS = FieldMap(query="q", positive="p", task="task", group="g")


def _prepare(tmp_path: Path, rows: list[dict], name: str = "src", **kw) -> Path:
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / f"{name}_ds"
    prepare_file(str(src), "jsonl", str(out), kw.pop("fields", FIELDS), progress=False, **kw)
    return out


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- happy path ------------------------------------------------------------------------------------


def test_manifest_counts_match_shards_and_readers_agree(toy_dataset):
    manifest = Manifest.load(toy_dataset)
    assert manifest.N == 400 == sum(s.n for s in manifest.splits.values())
    assert set(manifest.splits) == {"train", "validation", "test"}
    for split, info in manifest.splits.items():
        ds = ShardedDataset(toy_dataset, split)
        streamed = list(ds)
        assert len(streamed) == info.n == len(ds)
        assert [r["id"] for r in streamed] == list(range(info.n))  # dense ids 0..n-1
        assert all(ds[r["id"]] == r for r in streamed)  # random access == streaming
        ds.verify()


def test_no_group_in_two_splits(toy_dataset):
    groups = {split: set(ShardedDataset(toy_dataset, split).column("group")) for split in ("train", "validation", "test")}
    assert not groups["train"] & groups["test"]
    assert not groups["train"] & groups["validation"]
    assert not groups["validation"] & groups["test"]


def test_same_input_same_ids_and_identical_bytes(tmp_path):
    rows = toy_rows(200)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = _prepare(tmp_path / "a", rows), _prepare(tmp_path / "b", rows)
    files_a = sorted(p.name for p in a.iterdir())
    assert files_a == sorted(p.name for p in b.iterdir())
    for name in files_a:
        if name.endswith(".tar"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma.pop("source") != mb.pop("source")  # only where the source file lay differs
    assert ma == mb
    ids_a = [(r["id"], r["query"]) for r in ShardedDataset(a, "train")]
    ids_b = [(r["id"], r["query"]) for r in ShardedDataset(b, "train")]
    assert ids_a == ids_b


def test_fingerprint_changes_with_content(tmp_path):
    rows = toy_rows(200)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = _prepare(tmp_path / "a", rows)
    rows[0] = {**rows[0], "p": rows[0]["p"] + "# changed\n"}
    b = _prepare(tmp_path / "b", rows)
    assert Manifest.load(a).fingerprint != Manifest.load(b).fingerprint


def test_csv_and_parquet_sources_match_jsonl(tmp_path):
    import pyarrow as pa  # a test extra: `tools/install.sh --test`
    import pyarrow.parquet as pq

    rows = toy_rows(120)
    csv_path = tmp_path / "src.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq_path = tmp_path / "src.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pq_path)
    outs = []
    for path, fmt in ((csv_path, "csv"), (pq_path, "parquet")):
        out = tmp_path / f"{fmt}_ds"
        prepare_file(str(path), fmt, str(out), FIELDS, progress=False)
        outs.append(out)
    (tmp_path / "j").mkdir()
    outs.append(_prepare(tmp_path / "j", rows))
    fps = {Manifest.load(o).splits["train"].fingerprint for o in outs}
    assert len(fps) == 1  # same records, whatever the container


def test_prompts_and_negatives_round_trip(tmp_path):
    rows = [{**r, "negs": [f"wrong answer {i}"]} for i, r in enumerate(toy_rows(60))]
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("t0:\n  query: 'Find code: '\ndefault:\n  positive: 'Code: '\n")
    fields = FieldMap(query="q", positive="p", task="task", group="g", negatives="negs")
    out = _prepare(tmp_path, rows, fields=fields, prompts=load_prompts(str(prompts)))
    m = Manifest.load(out)
    assert m.prompt("t0", "query") == "Find code: "
    assert m.prompt("t1", "query") == ""
    assert m.prompt("t1", "positive") == "Code: "
    rec = ShardedDataset(out, "train")[0]
    assert rec["negatives"] and rec["negatives"][0].startswith("wrong answer")


def test_images_are_stored_in_the_shards(tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"\x89PNG fake image bytes")
    rows = [{**r, "img": "cat.png"} for r in toy_rows(40)]
    fields = FieldMap(query="q", positive="p", task="task", group="g", query_image="img")
    out = _prepare(tmp_path, rows, fields=fields)
    ds = ShardedDataset(out, "train")
    assert ds[0]["query_image"] == img.read_bytes()
    assert next(iter(ds))["query_image"] == img.read_bytes()


# -- splits ---------------------------------------------------------------------------------------


def test_split_caps_each_task_share():
    # One task holds 60% of the rows: a plain hash split would let it dominate the test split.
    groups, tasks = [], []
    for t in range(12):
        size = 6000 if t == 0 else 360
        for i in range(size):
            groups.append(f"t{t}.g{i % (60 if t == 0 else 12)}")
            tasks.append(f"t{t}")
    split = assign_splits(groups, tasks, {"test": 0.05, "validation": 0.05}, max_share=0.2)
    for name in ("test", "validation"):
        counts = Counter(t for t, s in zip(tasks, split) if s == name)
        total = sum(counts.values())
        assert total >= 0.04 * len(tasks)
        assert max(counts.values()) <= 0.2 * total + 1e-9, counts
        assert len(counts) >= 5
    by_group = {}
    for g, s in zip(groups, split):
        assert by_group.setdefault(g, s) == s  # a group never straddles splits


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: rows[5].pop("q"), "has no 'query' field"),
        (lambda rows: rows[7].update(p="   "), r"'positive' \(column 'p'\) is empty"),
        (lambda rows: rows[3].update(q=17), "must be text"),
    ],
)
def test_bad_records_are_named_and_leave_nothing(tmp_path, mutate, message):
    rows = toy_rows(50)
    mutate(rows)
    with pytest.raises(DataError, match=message) as err:
        _prepare(tmp_path, rows)
    assert "src.jsonl:" in str(err.value)  # names the file and line
    assert not (tmp_path / "src_ds").exists()
    assert _leftovers(tmp_path) == []


def test_non_utf8_and_bad_json_lines_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(toy_rows(1)[0]).encode()
    path.write_bytes(good + b"\n" + b'{"q": "caf\xe9 latte", "p": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid UTF-8"):
        prepare_file(str(path), "jsonl", str(tmp_path / "out"), FIELDS, progress=False)
    path.write_bytes(good + b"\n" + b'{"q": "broken"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare_file(str(path), "jsonl", str(tmp_path / "out"), FIELDS, progress=False)
    assert not (tmp_path / "out").exists()


def test_duplicate_source_ids_are_refused(tmp_path):
    rows = [{**r, "rid": f"r{i}"} for i, r in enumerate(toy_rows(30))]
    rows[20]["rid"] = "r4"
    fields = FieldMap(query="q", positive="p", task="task", group="g", id="rid")
    with pytest.raises(DataError, match=r"src.jsonl:21: duplicate id 'r4' \(first seen at .*src.jsonl:5\)"):
        _prepare(tmp_path, rows, fields=fields)


def test_existing_output_needs_overwrite(tmp_path):
    out = _prepare(tmp_path, toy_rows(40))
    with pytest.raises(DataError, match="already exists"):
        _prepare(tmp_path, toy_rows(40))
    assert Manifest.load(out).N == 40


def _copy(ds: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ds, dst)
    return dst


def test_truncated_shard_is_refused(toy_dataset, tmp_path):
    ds = _copy(toy_dataset, tmp_path)
    shard = ds / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"train-000001.tar: shard is 3000 bytes .* truncated"):
        ShardedDataset(ds, "train")


def test_corrupt_shard_is_found_by_verify(toy_dataset, tmp_path):
    ds = _copy(toy_dataset, tmp_path)
    shard = ds / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[530:540] = b"XXXXXXXXXX"  # inside the first member's JSON: same size, broken content
    shard.write_bytes(bytes(data))
    reader = ShardedDataset(ds, "train")  # sizes still agree
    with pytest.raises(DataError, match="train-000002.tar: checksum differs"):
        reader.verify()


def test_duplicate_ids_inside_a_shard_are_found(toy_dataset, tmp_path):
    import webdataset as wds

    from b3stream.data.manifest import sha256_file

    ds = _copy(toy_dataset, tmp_path)
    shard = ds / "train-000000.tar"
    with open(shard, "wb") as f:  # rewrite the shard so that two records claim id 0
        w = wds.TarWriter(f, encoder=False, mtime=0.0)
        for i in range(50):
            w.write({"__key__": f"{i:09d}", "json": json.dumps({"id": 0 if i == 3 else i, "query": "q", "positive": "p",
                                                                  "task": "t0", "group": "g"}).encode()})
        w.close()
    manifest = json.loads((ds / "manifest.json").read_text())
    sh = manifest["splits"]["train"]["shards"][0]
    sh["bytes"], sh["sha256"] = shard.stat().st_size, sha256_file(shard)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="train-000000.tar: duplicate id 0"):
        ShardedDataset(ds, "train").verify()


def test_manifest_disagreeing_with_shards(toy_dataset, tmp_path):
    ds = _copy(toy_dataset, tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["nsamples"] += 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="split 'train' has n=.* but its shards list"):
        Manifest.load(ds)
    manifest["splits"]["train"]["n"] += 1
    manifest["N"] += 1
    (ds / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 50 records but the manifest says 51"):
        ShardedDataset(ds, "train").verify()


def test_stamp_mismatch_is_refused(toy_dataset):
    from b3stream.data import check_stamp

    m = Manifest.load(toy_dataset)
    check_stamp(m.stamp("train"), m.stamp("train"), "x")
    with pytest.raises(DataError, match="built for data .*'test'.* but used with .*'train'"):
        check_stamp(m.stamp("test"), m.stamp("train"), "embeddings q.npy")


def test_unknown_split_is_named(toy_dataset):
    with pytest.raises(DataError, match="has no split 'dev'"):
        ShardedDataset(toy_dataset, "dev")


def test_shard_file_hash_recorded(toy_dataset):
    m = Manifest.load(toy_dataset)
    sh = m.splits["test"].shards[0]
    assert hashlib.sha256((toy_dataset / sh.url).read_bytes()).hexdigest() == sh.sha256

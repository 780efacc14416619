"""Data layer: shards, manifest, ids, splits, readers and every bad-input case of issue 2."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from b3stream.cli import main
from b3stream.data import DataError, FieldMap, Manifest, ShardedDataset
from b3stream.data import reader as reader_module
from b3stream.data.prepare import load_prompts, prepare_file
from b3stream.data.shards import write_dataset
from b3stream.data.splits import assign_splits

from ._train_util import run, write_config
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
    reader = ShardedDataset(ds, "train", verify=False)  # sizes and counts still agree
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


# -- shards that changed after prepare: refused on open, before mining or training reads them -----------


def _alter_a_record(ds: Path, shard_name: str = "train-000002.tar") -> tuple[Path, str]:
    """Change one letter of a query inside a shard: same size, still valid JSON, so only the hash differs."""
    shard = ds / shard_name
    data = bytearray(shard.read_bytes())
    at = data.index(b'"query": "how do I handle') + len(b'"query": "')
    data[at:at + 3] = b"HOW"
    shard.write_bytes(bytes(data))
    return shard, "HOW do I handle"


def test_same_size_edit_inside_a_record_is_refused_on_open(toy_dataset, tmp_path):
    ds = _copy(toy_dataset, tmp_path)
    _, altered = _alter_a_record(ds)
    with pytest.raises(DataError, match=r"train-000002.tar: checksum differs from the manifest"):
        ShardedDataset(ds, "train")
    # Opting out of the hash (huge data) still opens, and the altered record is what is read.
    reader = ShardedDataset(ds, "train", verify=False)
    assert reader[100]["query"].startswith(altered)


def test_shards_are_hashed_once_per_process(toy_dataset, tmp_path, monkeypatch):
    ds = _copy(toy_dataset, tmp_path)
    hashed: list[str] = []
    real = reader_module.sha256_file
    monkeypatch.setattr(reader_module, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    shards = len(Manifest.load(ds).splits["train"].shards)
    ShardedDataset(ds, "train")
    ShardedDataset(ds, "train").verify()  # a second open and a full verify: nothing hashed again
    assert len(hashed) == shards == len(set(hashed))
    _alter_a_record(ds)  # a changed file is hashed again
    with pytest.raises(DataError, match="checksum differs"):
        ShardedDataset(ds, "train")
    assert hashed[shards:] == ["train-000002.tar"]


def test_mine_refuses_an_altered_shard_before_the_teacher_loads(toy_dataset, tmp_path, capsys):
    ds = _copy(toy_dataset, tmp_path)
    _alter_a_record(ds)
    out = tmp_path / "mine"
    assert main(["mine", "embed", "--data", str(ds), "--out", str(out), "--quiet"]) == 2
    assert "train-000002.tar: checksum differs" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_train_refuses_an_altered_shard_before_the_model_loads(toy_dataset, tmp_path):
    ds = _copy(toy_dataset, tmp_path)
    _alter_a_record(ds)
    cfg = write_config(tmp_path / "train.yaml", data=str(ds), schedule=str(tmp_path / "none"),
                       out=str(tmp_path / "run"))
    res = run([sys.executable, "-m", "b3stream", "train", "--config", str(cfg)])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "train-000002.tar: checksum differs" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("delta", [-1, +1])
def test_manifest_counts_are_checked_on_open(toy_dataset, tmp_path, delta):
    # A manifest consistent with itself (N = sum of n = sum of nsamples) but not with the shards: lowered,
    # mining used to fail with an IndexError after embedding; raised, only after embedding every row.
    ds = _copy(toy_dataset, tmp_path)
    manifest = json.loads((ds / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["nsamples"] += delta
    manifest["splits"]["train"]["n"] += delta
    manifest["N"] += delta
    (ds / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):  # the count check does not depend on the hash
        with pytest.raises(DataError, match=f"train-000000.tar: holds 50 records but the manifest says {50 + delta}"):
            ShardedDataset(ds, "train", verify=verify)


# -- where a dataset may be written --------------------------------------------------------------


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_the_folder_holding_the_source(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    src = write_jsonl(folder / "pairs.jsonl", toy_rows(40))
    before = _tree(folder)
    with pytest.raises(DataError, match=r"work: the source file .*pairs.jsonl lies inside it"):
        prepare_file(str(src), "jsonl", str(folder), FIELDS, overwrite=True, progress=False)
    assert _tree(folder) == before
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    src = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(40))
    folder = tmp_path / "results"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "model.bin").write_bytes(b"weights")
    before = _tree(folder)
    with pytest.raises(DataError, match=r"results: not a b3stream dataset \(no manifest.json\)"):
        prepare_file(str(src), "jsonl", str(folder), FIELDS, overwrite=True, progress=False)
    assert _tree(folder) == before
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_dataset_folder_with_other_files(tmp_path):
    out = _prepare(tmp_path, toy_rows(40))
    (out / "notes.txt").write_text("keep me")
    before = _tree(out)
    with pytest.raises(DataError, match=r"src_ds: holds files the dataset did not write \(notes.txt\)"):
        _prepare(tmp_path, toy_rows(60), overwrite=True)
    assert _tree(out) == before


def test_overwrite_replaces_a_dataset(tmp_path):
    out = _prepare(tmp_path, toy_rows(40), samples_per_shard=10)
    _prepare(tmp_path, toy_rows(60), samples_per_shard=100, overwrite=True)
    assert Manifest.load(out).N == 60
    listed = {sh.url for s in Manifest.load(out).splits.values() for sh in s.shards}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}  # no shard of the old one left
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_naming_an_existing_file_is_an_error(tmp_path, overwrite):
    src = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(40))
    target = tmp_path / "dataset"
    target.write_text("not a folder")
    with pytest.raises(DataError, match=r"dataset: exists and is not a folder"):
        prepare_file(str(src), "jsonl", str(target), FIELDS, overwrite=overwrite, progress=False)
    assert target.read_text() == "not a folder"
    assert _leftovers(tmp_path) == []


def test_cli_prepare_overwrite_keeps_the_source(tmp_path, capsys):
    src = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(40))
    assert main(["prepare", "jsonl", str(src), "--out", str(tmp_path), "--overwrite", "--quiet"]) == 2
    assert "the source file" in capsys.readouterr().err
    assert src.is_file() and _leftovers(tmp_path) == []


# -- split options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"held_out": {"validation": 0.05, "test": -0.1}}, r"test fraction is -0.1; .* at least 0 and below 1"),
        ({"held_out": {"validation": float("nan"), "test": 0.05}}, "validation fraction is nan"),
        ({"max_share": -0.2}, r"max_share is -0.2; it must be above 0 and at most 1"),
        ({"max_share": 0.0}, "max_share is 0.0"),
    ],
)
def test_out_of_range_split_options_are_refused(tmp_path, options, message):
    with pytest.raises(DataError, match=message):
        _prepare(tmp_path, toy_rows(100), **options)
    with pytest.raises(DataError, match=message):
        write_dataset(toy_rows(100), tmp_path / "direct", name="x", progress=False, **options)
    assert not (tmp_path / "src_ds").exists() and not (tmp_path / "direct").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("flag, value", [("--test-fraction", "-0.1"), ("--validation-fraction", "-1"),
                                         ("--max-share", "-0.2")])
def test_cli_refuses_negative_fractions(tmp_path, capsys, flag, value):
    src = write_jsonl(tmp_path / "pairs.jsonl", toy_rows(40))
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "jsonl", str(src), "--out", str(tmp_path / "out"), flag, value, "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage: b3stream prepare" in err and f"argument {flag}: {value} is not a" in err
    assert not (tmp_path / "out").exists()


# -- one definition of a valid shard, for every reader (issue 19, item 7) ---------------------------------


def _rename_member(ds: Path, shard_name: str, old: str, new: str) -> Path:
    """Rewrite ``shard_name`` with member ``old`` renamed to ``new`` (content untouched) and record the new
    size and hash in the manifest, so the member name is the only thing wrong with the dataset."""
    import io
    import tarfile

    from b3stream.data.manifest import sha256_file

    shard = ds / shard_name
    buf = io.BytesIO()
    with tarfile.open(shard, "r:") as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name == old:
                member.name = new
            dst.addfile(member, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    manifest = json.loads((ds / "manifest.json").read_text())
    entry = next(sh for sh in manifest["splits"]["train"]["shards"] if sh["url"] == shard_name)
    entry["bytes"], entry["sha256"] = shard.stat().st_size, sha256_file(shard)
    (ds / "manifest.json").write_text(json.dumps(manifest))
    return shard


@pytest.mark.parametrize("name", ["../../escape.json", "sub/000000103.json", "000000103.notes"])
def test_a_member_name_the_writer_never_produces_is_refused_by_every_reader(toy_dataset, tmp_path, capsys, name):
    ds = _copy(toy_dataset, tmp_path / "data")
    _rename_member(ds, "train-000002.tar", "000000103.json", name)
    message = f"train-000002.tar: member '{name}' is not a valid shard member"
    for verify in (True, False):  # the check is on the names, not the hash
        with pytest.raises(DataError, match=message):
            ShardedDataset(ds, "train", verify=verify)
    # `inspect --verify` and `mine embed` (which streams the split through webdataset) now agree.
    assert main(["inspect", str(ds), "--verify"]) == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "mine"
    assert main(["mine", "embed", "--data", str(ds), "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("sample", [
    {"__key__": "../../escape", "json": b'{"id": 3}'},  # how webdataset splits ../../escape.json
    {"__key__": "../../escape", ".json": io.BytesIO(b'{"id": 3}')},  # how wids splits it
    {"__key__": "000000003", "json": b'{"id": 3}', "../x.png": b"img"},
])
def test_decoding_refuses_a_sample_split_from_a_bad_member_name(sample):
    # Remote shards are not scanned on open: the decoding of each sample applies the same definition.
    with pytest.raises(DataError, match=r"remote.tar: member '.*' is not a valid shard member"):
        reader_module.decode_sample(sample, "remote.tar")


def test_a_record_naming_an_image_it_does_not_hold_is_a_data_error():
    sample = {"__key__": "000000003", "json": b'{"id": 3, "query_image": "../../etc/passwd"}'}
    with pytest.raises(DataError, match="names query_image '../../etc/passwd', which is not one of its members"):
        reader_module.decode_sample(sample, "x.tar")


def test_a_key_out_of_order_is_refused_on_open(toy_dataset, tmp_path):
    # Member 103's json moved to key 000000099 (after 102): one sample to a reader that groups runs of a key,
    # and a merge with record 99 to one that groups by key; neither is a shard the writer makes.
    ds = _copy(toy_dataset, tmp_path)
    _rename_member(ds, "train-000001.tar", "000000075.json", "000000060.json")
    with pytest.raises(DataError, match="train-000001.tar: member '000000060.json' comes after records with higher"):
        ShardedDataset(ds, "train")


# -- Hugging Face datasets on disk ---------------------------------------------------------------------


def test_prepare_hf_reads_a_save_to_disk_folder_like_jsonl(tmp_path):
    """`prepare hf`: a Dataset / DatasetDict written by save_to_disk (and one .arrow file of it) gives the
    same records, ids and fingerprint as the same rows given as jsonl; the split is chosen by name."""
    import datasets

    rows = [{**r, "neg": [f"def wrong_{i}():\n    pass\n"] * (i % 3)} for i, r in enumerate(toy_rows(90))]
    fields = FieldMap(query="q", positive="p", task="task", group="g", negatives="neg")
    from_jsonl = Manifest.load(_prepare(tmp_path, rows, fields=fields))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "dev": datasets.Dataset.from_list(rows[:30])}).save_to_disk(str(tmp_path / "dict"))
    arrow = sorted((tmp_path / "one").glob("*.arrow"))[0]
    for src, split, name in ((tmp_path / "one", None, "a"), (tmp_path / "dict", None, "b"), (arrow, None, "c")):
        m = prepare_file(str(src), "hf", str(tmp_path / name), fields, hf_split=split, progress=False)
        assert m.fingerprint == from_jsonl.fingerprint and m.splits["train"].negatives == \
            from_jsonl.splits["train"].negatives
    dev = prepare_file(str(tmp_path / "dict"), "hf", str(tmp_path / "dev"), fields, hf_split="dev", progress=False)
    assert dev.N == 30
    with pytest.raises(DataError, match=r"splits \['dev', 'train'\]; choose one with --hf-split \('test'"):
        prepare_file(str(tmp_path / "dict"), "hf", str(tmp_path / "x"), fields, hf_split="test", progress=False)
    with pytest.raises(DataError, match="has no 'query' field .column 'question'"):
        prepare_file(str(tmp_path / "one"), "hf", str(tmp_path / "y"), FieldMap(query="question", positive="p"),
                     progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a dataset saved with save_to_disk"):
        prepare_file(str(tmp_path / "empty"), "hf", str(tmp_path / "z"), fields, progress=False)
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


@pytest.mark.slow
def test_prepare_hf_command(tmp_path):
    import datasets

    datasets.Dataset.from_list(toy_rows(60)).save_to_disk(str(tmp_path / "hfdata"))
    res = run([sys.executable, "-m", "b3stream", "prepare", "hf", str(tmp_path / "hfdata"), "--out",
               str(tmp_path / "ds"), "--query-field", "q", "--positive-field", "p", "--task-field", "task",
               "--group-field", "g"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert Manifest.load(tmp_path / "ds").N == 60
    res = run([sys.executable, "-m", "b3stream", "prepare", "jsonl", str(tmp_path / "x.jsonl"), "--out",
               str(tmp_path / "ds2"), "--hf-split", "train"])
    assert res.returncode != 0 and "--hf-split is for `prepare hf` only" in res.stderr


# -- a named field that no record has; an empty source (issue 31) --------------------------------------------


def _source(tmp_path: Path, fmt: str, rows: list[dict]) -> Path:
    """``rows`` written as a ``fmt`` source (hf: a save_to_disk folder)."""
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "src.jsonl", rows)
    if fmt == "csv":
        path = tmp_path / "src.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src.parquet")
        return tmp_path / "src.parquet"
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "src"))
    return tmp_path / "src"


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf"])
@pytest.mark.parametrize("field", ["negatives", "query_image", "positive_image", "id", "task", "group"])
def test_a_named_field_that_no_record_has_is_an_error(tmp_path, fmt, field):
    """Naming a column that no record has used to be accepted in silence for negatives and images (a dataset
    without the negatives asked for) and, for ids, refused without saying which columns there are."""
    src = _source(tmp_path, fmt, [{"q": r["q"], "p": r["p"]} for r in toy_rows(20)])
    fields = FieldMap(query="q", positive="p", **{field: "nope"})
    with pytest.raises(DataError, match=r"'nope'.*columns.*\['p', 'q'\]"):
        prepare_file(str(src), fmt, str(tmp_path / "out"), fields, progress=False)
    assert not (tmp_path / "out").exists()


def test_prepare_hf_with_a_negatives_field_no_record_has_fails_and_writes_nothing(tmp_path, capsys):
    src = _source(tmp_path, "hf", toy_rows(30))
    out = tmp_path / "ds"
    assert main(["prepare", "hf", str(src), "--out", str(out), "--query-field", "q", "--positive-field", "p",
                 "--task-field", "task", "--group-field", "g", "--negatives-field", "negs", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no record has the column 'negs' named for negatives" in err
    assert "['g', 'p', 'q', 'task']" in err
    assert not out.exists()


def test_a_field_some_records_have_is_still_allowed(tmp_path):
    (tmp_path / "cat.png").write_bytes(b"\x89PNG fake image bytes")
    rows = toy_rows(40)
    for i, r in enumerate(rows[:10]):
        r.update(negs=[f"wrong {i}"], img="cat.png")
    fields = FieldMap(query="q", positive="p", task="task", group="g", negatives="negs", query_image="img")
    m = Manifest.load(_prepare(tmp_path, rows, fields=fields))
    assert m.N == 40 and sum((s.negatives or {}).get("examples", 0) for s in m.splits.values()) == 10


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "hf", "hf-dict"])
def test_an_empty_source_says_it_has_no_records(tmp_path, fmt):
    """An empty save_to_disk Dataset (or DatasetDict split) used to be "not a dataset saved with save_to_disk
    ... (list index out of range)"."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = datasets.Dataset.from_dict({"q": [], "p": []})
    src = {"jsonl": tmp_path / "e.jsonl", "csv": tmp_path / "e.csv", "parquet": tmp_path / "e.parquet",
           "hf": tmp_path / "e", "hf-dict": tmp_path / "d"}[fmt]
    if fmt == "jsonl":
        src.write_text("\n")
    elif fmt == "csv":
        src.write_text("q,p\n")
    elif fmt == "parquet":
        pq.write_table(pa.table({"q": pa.array([], pa.string()), "p": pa.array([], pa.string())}), src)
    elif fmt == "hf":
        empty.save_to_disk(str(src))
    else:
        datasets.DatasetDict({"train": empty}).save_to_disk(str(src))
    with pytest.raises(DataError, match="no records") as err:
        prepare_file(str(src), fmt[:2] if fmt.startswith("hf") else fmt, str(tmp_path / "out"),
                     FieldMap(query="q", positive="p"), progress=False)
    assert "not a dataset" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_empty_split_does_not_hide_the_others(tmp_path):
    """A DatasetDict with an empty split: the other splits are read (loading the whole dict used to fail)."""
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_rows(40)),
                          "test": datasets.Dataset.from_dict({"q": [], "p": [], "task": [], "g": []})}
                         ).save_to_disk(str(tmp_path / "d"))
    assert prepare_file(str(tmp_path / "d"), "hf", str(tmp_path / "out"), FIELDS, progress=False).N == 40
    with pytest.raises(DataError, match=r"test: the dataset has no records"):
        prepare_file(str(tmp_path / "d"), "hf", str(tmp_path / "out2"), FIELDS, hf_split="test", progress=False)

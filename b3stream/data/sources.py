"""Sources (jsonl / csv / parquet files, Hugging Face ``datasets`` folders) -> validated training records,
through a field mapping.

A record is a plain dict with ``query`` and ``positive`` text, a ``task`` and a ``group`` (the split key),
and optionally ``negatives`` (a list of hard-negative texts), ``source_id`` and image file paths. Any
problem is a :class:`DataError` that names the file and the record (line number for jsonl/csv, row for
parquet and ``datasets``), raised before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .manifest import DataError

FORMATS = ("jsonl", "csv", "parquet", "hf")


@dataclass
class FieldMap:
    """Which source column feeds each record field; ``None`` means "not present"."""

    query: str = "query"
    positive: str = "positive"
    task: str | None = None
    group: str | None = None
    negatives: str | None = None
    id: str | None = None
    query_image: str | None = None
    positive_image: str | None = None


def read_rows(path: str | Path, fmt: str, hf_split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, row)`` for each row of a source, ``where`` naming file and line/row. ``hf_split``: the
    split of a ``datasets`` DatasetDict folder to read (default: ``train``, or its only split)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown source format {fmt!r}; expected one of {FORMATS}")
    if fmt == "hf":
        yield from _hf_rows(path, hf_split)
        return
    if not path.is_file():
        raise DataError(f"{path}: source file does not exist")
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                where = f"{path}:{line_no}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
                yield where, row
    elif fmt == "csv":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line_no = data[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line_no}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield f"{path}:{reader.line_num}", row
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("reading parquet needs pyarrow: pip install 'b3stream[parquet]'") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read parquet ({e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", row


def _hf_rows(path: Path, split: str | None) -> Iterator[tuple[str, dict]]:
    """Rows of a Hugging Face ``datasets`` dataset on local disk: a folder written by ``save_to_disk`` (a
    Dataset, or a DatasetDict of which ``split`` is read) or one ``.arrow`` file of a dataset's cache. Read
    through ``datasets`` itself (memory-mapped Arrow), so nothing is downloaded."""
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the datasets package: pip install 'b3stream[hf]'") \
            from None
    if not path.exists():
        raise DataError(f"{path}: no such dataset folder or .arrow file")
    splits = path / "dataset_dict.json"
    if path.is_dir() and splits.is_file():  # a DatasetDict: only the chosen split is loaded
        try:
            names = sorted(json.loads(splits.read_text())["splits"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not a DatasetDict saved with save_to_disk ({splits.name}: {e})") from None
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in names:
            raise DataError(f"{path}: a DatasetDict with splits {names}; choose one with --hf-split"
                            + (f" ({split!r} is not one of them)" if split else ""))
        path, split = path / chosen, None
    if path.is_dir() and _saved_without_rows(path):
        # save_to_disk writes no Arrow file for 0 rows, and load_from_disk then fails (an IndexError)
        raise DataError(f"{path}: the dataset has no records (saved with 0 rows)")
    try:
        if path.is_file():
            ds = datasets.Dataset.from_file(str(path))
        else:
            ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors, ...
        raise DataError(f"{path}: not a dataset saved with save_to_disk or an Arrow file of one ({e})") from None
    if split is not None:
        raise DataError(f"{path}: a single Dataset has no splits; drop --hf-split {split}")
    if len(ds) == 0:
        raise DataError(f"{path}: the dataset has no records")
    for i, row in enumerate(ds):
        yield f"{path}:row {i}", row


def _saved_without_rows(folder: Path) -> bool:
    """Whether ``folder`` is a Dataset that ``save_to_disk`` wrote with 0 rows: its state lists no data files."""
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _text(row: dict, column: str, where: str, what: str) -> str:
    if column not in row or row[column] is None:
        raise DataError(f"{where}: record has no {what!r} field (column {column!r}); columns: {sorted(row)}")
    value = row[column]
    if not isinstance(value, str):
        raise DataError(f"{where}: {what!r} (column {column!r}) must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {what!r} (column {column!r}) is empty")
    return value


def _image(row: dict, column: str | None, base: Path, where: str) -> str | None:
    if column is None:
        return None
    value = row.get(column)
    if value in (None, ""):
        return None
    path = Path(value)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise DataError(f"{where}: image {value!r} (column {column!r}) does not exist")
    return str(path)


def to_record(row: dict, fields: FieldMap, where: str, base: Path) -> dict:
    """Map and validate one source row."""
    rec: dict = {
        "query": _text(row, fields.query, where, "query"),
        "positive": _text(row, fields.positive, where, "positive"),
    }
    rec["task"] = _text(row, fields.task, where, "task") if fields.task else "default"
    # Without a group column the query text is the group: exact duplicates of a query stay in one split.
    rec["group"] = _text(row, fields.group, where, "group") if fields.group else rec["query"].strip().lower()
    if fields.negatives:
        negs = row.get(fields.negatives)
        if isinstance(negs, str):  # csv: a JSON list in a cell
            try:
                negs = json.loads(negs)
            except json.JSONDecodeError:
                raise DataError(f"{where}: negatives (column {fields.negatives!r}) is not a JSON list") from None
        negs = negs or []
        if not isinstance(negs, list) or not all(isinstance(n, str) and n.strip() for n in negs):
            raise DataError(f"{where}: negatives (column {fields.negatives!r}) must be a list of non-empty texts")
        if negs:
            rec["negatives"] = negs
    if fields.id:
        if row.get(fields.id) in (None, ""):
            raise DataError(f"{where}: record has no id (column {fields.id!r}); columns: {sorted(row)}")
        rec["source_id"] = str(row[fields.id])
    for side in ("query_image", "positive_image"):
        img = _image(row, getattr(fields, side), base, where)
        if img is not None:
            rec[side] = img
    return rec


def read_records(path: str | Path, fmt: str, fields: FieldMap, hf_split: str | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """Validated records of one source, with duplicate source ids refused. An optional column that the field
    map names (negatives, images) may be missing from some records, but not from all: that is a
    :class:`DataError` (a misspelt column), raised after the last record (before a caller that collects them
    writes anything). The required ones (query, positive, and task, group and id when named) are checked on
    each record."""
    base = Path(path).parent
    seen: dict[str, str] = {}
    columns: set[str] = set()
    for where, row in read_rows(path, fmt, hf_split):
        columns.update(row)
        rec = to_record(row, fields, where, base)
        sid = rec.get("source_id")
        if sid is not None:
            if sid in seen:
                raise DataError(f"{where}: duplicate id {sid!r} (first seen at {seen[sid]})")
            seen[sid] = where
        yield where, rec
    if columns:  # no rows at all is the caller's to report
        for what in ("negatives", "query_image", "positive_image"):
            column = getattr(fields, what)
            if column is not None and column not in columns:
                raise DataError(f"{path}: no record has the column {column!r} named for {what}; the records' "
                                f"columns: {sorted(columns)}")

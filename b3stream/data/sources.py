"""Sources (jsonl / csv / parquet files, Hugging Face ``datasets`` folders) -> validated training records,
through a field mapping.

A record is a plain dict with ``query`` and ``positive`` text, a ``task`` and a ``group`` (the split key),
and optionally ``negatives`` (a list of hard-negative texts), ``known_positives`` (the other positives of
its query, never its negatives), ``query_prompt`` (its own query instruction), ``source_id``, ``query_id``,
``docid`` and image file paths. Any problem is a :class:`DataError` that names the file and the record (line
number for jsonl/csv, row for parquet and ``datasets``), raised before anything is written.

Training files of other projects are read as they are, through a preset field map (:data:`PRESETS`,
``prepare --format``): FlagEmbedding's ``{query, pos: [...], neg: [...], prompt}``, Tevatron's ``{query_id,
query, positive_passages: [{docid, title, text}], negative_passages: [...]}`` and sentence-transformers'
``(anchor, positive, negative_1, ...)`` columns, read by position as sentence-transformers reads them.

A row whose positive field holds a list (texts, or passages ``{title, text, docid}``) gives one example per
distinct positive; each keeps the row's other positives as its ``known_positives``, which mining and the
loss treat like same-text positives (never a negative of that example), and which are dropped from its
stored negatives. A passage's text is Tevatron's: ``title + " " + text`` (the text alone without a title).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from .manifest import DataError

FORMATS = ("jsonl", "csv", "parquet", "hf")


@dataclass
class FieldMap:
    """Which source column feeds each record field; ``None`` means "not present".

    ``positive`` may hold a text or a list of texts / passages (one example per positive); ``negatives`` is
    one column holding a list (csv: a JSON list in the cell) or a text, or a list of columns each holding a
    text or a list. ``positional`` (sentence-transformers): the columns no other field names are taken by
    position, the first as ``query`` (unless named), the next as ``positive`` (unless named), the rest as
    ``negatives`` (unless named). ``preset``: the ``--format`` this map came from; the columns a preset
    names may be missing from every row (a FlagEmbedding file without ``prompt``), those named by hand not.
    """

    query: str | None = "query"
    positive: str | None = "positive"
    task: str | None = None
    group: str | None = None
    negatives: str | list[str] | None = None
    id: str | None = None
    query_image: str | None = None
    positive_image: str | None = None
    query_prompt: str | None = None  # a per-record query instruction (FlagEmbedding's ``prompt``)
    query_id: str | None = None  # the source's query id, kept as ``query_id`` (not checked unique)
    positional: bool = False
    preset: str | None = None

    def record(self) -> dict[str, str | None]:
        """What the manifest records of this map (its ``fields``: text values)."""
        out = {}
        for key, value in asdict(self).items():
            if key == "positional":
                continue
            out[key] = ",".join(value) if isinstance(value, list) else value
        return out


# What each project's training files call their fields (``prepare --format NAME``); a field flag given
# alongside a preset replaces the preset's column.
PRESETS: dict[str, dict] = {
    # FlagEmbedding (BGE): {"query": str, "pos": [str], "neg": [str], "pos_scores", "neg_scores", "prompt": str,
    # "type": str}; the scores and the type are not used
    "flagembedding": {"query": "query", "positive": "pos", "negatives": "neg", "query_prompt": "prompt"},
    # Tevatron: {"query_id", "query", "positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}
    "tevatron": {"query": "query", "positive": "positive_passages", "negatives": "negative_passages",
                 "query_id": "query_id"},
    # sentence-transformers: (anchor, positive[, negative | negative_1..negative_n]) by column position
    "sentence-transformers": {"query": None, "positive": None, "negatives": None, "positional": True},
}


def preset_fields(preset: str | None, **given) -> FieldMap:
    """The field map of ``preset`` (None: the plain defaults) with every field in ``given`` that is not None
    replacing the preset's."""
    if preset is not None and preset not in PRESETS:
        raise DataError(f"unknown format {preset!r}; expected one of {sorted(PRESETS)}")
    base = dict(PRESETS[preset]) if preset else {}
    base.update({k: v for k, v in given.items() if v is not None})
    return FieldMap(**base, preset=preset)


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


def _passage(value, where: str, what: str) -> tuple[str, str | None]:
    """(text, docid) of one positive or negative: a non-empty text, or a passage ``{"title", "text",
    "docid"}`` (Tevatron), whose text is ``title + " " + text`` as Tevatron builds it (the text alone when
    the title is missing or empty)."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {what} holds an empty text")
        return value, None
    if isinstance(value, dict):
        text, title = value.get("text"), value.get("title")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: {what} holds a passage without a non-empty 'text' (its keys: {sorted(value)})")
        if title is not None and not isinstance(title, str):
            raise DataError(f"{where}: {what} holds a passage whose 'title' is not text")
        docid = value.get("docid")
        return (f"{title} {text}".strip() if title else text), (None if docid in (None, "") else str(docid))
    raise DataError(f"{where}: {what} must hold texts or passages {{title, text}}, got {type(value).__name__}")


def _positives(row: dict, column: str, where: str) -> list[tuple[str, str | None]]:
    """The row's distinct positives as (text, docid), in source order: one text, one passage, or a list."""
    value = row.get(column)
    if isinstance(value, str) or value is None:
        return [(_text(row, column, where, "positive"), None)]
    what = f"'positive' (column {column!r})"
    if isinstance(value, dict):
        return [_passage(value, where, what)]
    if not isinstance(value, list):
        raise DataError(f"{where}: {what} must be text, a list of texts or a list of passages, got "
                        f"{type(value).__name__}")
    if not value:
        raise DataError(f"{where}: {what} is an empty list")
    out: dict[str, str | None] = {}
    for item in value:
        text, docid = _passage(item, where, what)
        out.setdefault(text, docid)  # a text listed twice is one positive
    return list(out.items())


def _negatives(row: dict, columns: str | list[str] | None, where: str, json_cells: bool) -> list[str]:
    """The row's stored negatives: from one column holding a list of texts / passages or a text (csv: a JSON
    list in the cell, or one text), or from several such columns, in column order; a missing value is none."""
    names = [columns] if isinstance(columns, str) else list(columns or [])
    out = []
    for column in names:
        value = row.get(column)
        what = f"negatives (column {column!r})"
        if isinstance(value, str) and json_cells:  # csv: no lists, no nulls
            if not value.strip():
                continue
            if value.lstrip().startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    raise DataError(f"{where}: {what} is not a JSON list") from None
        if value is None:
            continue
        if not isinstance(value, list):
            value = [value]
        try:
            out += [_passage(v, where, what)[0] for v in value]
        except DataError as e:
            raise DataError(f"{e}; {what} must be a list of non-empty texts (or passages)") from None
    return out


def _optional_text(row: dict, column: str | None, where: str, what: str) -> str | None:
    """An optional per-row text (prompt, query id): None when the column is not named, missing or empty."""
    if column is None or row.get(column) in (None, ""):
        return None
    value = row[column]
    if what == "query_id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: {what!r} (column {column!r}) must be text, got {type(value).__name__}")
    return value if value.strip() else None


def to_records(row: dict, fields: FieldMap, where: str, base: Path, json_cells: bool = False) -> list[dict]:
    """Map and validate one source row: one record per distinct positive (module docstring). ``json_cells``:
    the row is a csv row (a negatives cell may hold a JSON list)."""
    query = _text(row, fields.query, where, "query")
    positives = _positives(row, fields.positive, where)
    common: dict = {"query": query}
    common["task"] = _text(row, fields.task, where, "task") if fields.task else "default"
    # Without a group column the query text is the group: exact duplicates of a query stay in one split (and
    # so do the examples of one row).
    common["group"] = _text(row, fields.group, where, "group") if fields.group else query.strip().lower()
    negatives = _negatives(row, fields.negatives, where, json_cells)
    if fields.id:
        if row.get(fields.id) in (None, ""):
            raise DataError(f"{where}: record has no id (column {fields.id!r}); columns: {sorted(row)}")
        common["source_id"] = str(row[fields.id])
    for key, column in (("query_prompt", fields.query_prompt), ("query_id", fields.query_id)):
        value = _optional_text(row, column, where, key)
        if value is not None:
            common[key] = value
    for side in ("query_image", "positive_image"):
        img = _image(row, getattr(fields, side), base, where)
        if img is not None:
            common[side] = img
    texts = [text for text, _ in positives]
    records = []
    for text, docid in positives:
        rec = {**common, "positive": text}
        known = [t for t in texts if t != text]
        if known:
            rec["known_positives"] = known
        # a stored negative that is another positive of the query is not one; a copy of the example's own
        # positive stays (the loss masks it, as any same-text positive)
        negs = [n for n in negatives if n not in known] if known else negatives
        if negs:
            rec["negatives"] = negs
        if docid is not None:
            rec["docid"] = docid
        records.append(rec)
    return records


def resolve_positional(fields: FieldMap, columns: list[str], where: str) -> FieldMap:
    """A positional map (sentence-transformers) made concrete for a source whose rows have ``columns``, in
    order: the columns no field names are query, positive and negatives, by position (:class:`FieldMap`).
    A ``label`` or ``score`` column is refused: sentence-transformers reads it as a label, not a text."""
    negatives = [fields.negatives] if isinstance(fields.negatives, str) else list(fields.negatives or [])
    named = {fields.query, fields.positive, fields.task, fields.group, fields.id, fields.query_image,
             fields.positive_image, fields.query_prompt, fields.query_id, *negatives} - {None}
    free = [c for c in columns if c not in named]
    labels = [c for c in free if c in ("label", "score")]
    if labels:
        raise DataError(f"{where}: a {labels[0]!r} column: sentence-transformers takes it for the label of a "
                        "pair-classification or score loss, so this is not (anchor, positive[, negatives]) data; "
                        "drop the column, or map the texts with --query-field / --positive-field without --format")
    query = fields.query or (free.pop(0) if free else None)
    positive = fields.positive or (free.pop(0) if free else None)
    if query is None or positive is None:
        raise DataError(f"{where}: sentence-transformers data has at least two text columns (anchor, positive); "
                        f"the columns here: {columns}")
    return replace(fields, query=query, positive=positive,
                   negatives=fields.negatives if fields.negatives is not None else (free or None), positional=False)


def read_records(path: str | Path, fmt: str, fields: FieldMap, hf_split: str | None = None
                 ) -> Iterator[tuple[str, dict]]:
    """Validated records of one source, with duplicate source ids refused (an id names a source row: the
    examples of one row share it). An optional column that the field map names (negatives, images, prompt,
    query id) may be missing from some records, but not from all: that is a :class:`DataError` (a misspelt
    column), raised after the last record (before a caller that collects them writes anything); a column a
    ``--format`` preset names may be missing from all. The required ones (query, positive, and task, group
    and id when named) are checked on each record. A positional map (sentence-transformers) is resolved on the
    first row, and every row must have that row's columns. The generator returns the resolved map."""
    base = Path(path).parent
    seen: dict[str, str] = {}
    columns: set[str] = set()
    resolved, first = None, None
    for where, row in read_rows(path, fmt, hf_split):
        columns.update(row)
        if resolved is None:
            resolved = resolve_positional(fields, list(row), where) if fields.positional else fields
            first = (set(row), where)
        elif fields.positional and set(row) != first[0]:
            raise DataError(f"{where}: columns {sorted(row)} differ from those of the first row "
                            f"({sorted(first[0])}, {first[1]}); sentence-transformers data has the same columns "
                            "in every row")
        records = to_records(row, resolved, where, base, json_cells=fmt == "csv")
        sid = records[0].get("source_id")
        if sid is not None:
            if sid in seen:
                raise DataError(f"{where}: duplicate id {sid!r} (first seen at {seen[sid]})")
            seen[sid] = where
        for rec in records:
            yield where, rec
    if columns:  # no rows at all is the caller's to report
        preset = PRESETS.get(fields.preset or "", {})
        for what in ("negatives", "query_image", "positive_image", "query_prompt", "query_id"):
            named = getattr(resolved, what)
            for column in [named] if isinstance(named, str) else list(named or []):
                if column not in columns and preset.get(what) != column:
                    raise DataError(f"{path}: no record has the column {column!r} named for {what}; the records' "
                                    f"columns: {sorted(columns)}")
    return resolved or fields

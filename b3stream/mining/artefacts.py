"""Stage artefacts on disk: atomic writes and the JSON record that commits a stage's output.

Every mining stage writes its arrays under temporary names, renames them into place, and only then writes
its record (``embeddings.json``, ``rank.json``, ``partition.json``). The record is the commit marker: it
names the data stamp, the parameters the arrays were built with and a fresh ``token``; a downstream stage
copies its upstream's token, so a rebuilt upstream makes everything below it visibly stale. A stage deletes
its old record *before* it starts replacing arrays, so a crash in the middle never leaves a record that
vouches for arrays it did not write.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger("b3stream.mining")


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one (temp file, fsync,
    rename); a failed write leaves no temporary file behind."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON atomically."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def new_token() -> str:
    return uuid.uuid4().hex


@contextmanager
def staged_arrays(folder: Path):
    """Collect arrays to publish together: ``put(name, array)`` writes ``.name.tmp-PID``; on a clean exit
    every file is renamed into place, on an error every temporary file is removed (no partial output)."""
    folder.mkdir(parents=True, exist_ok=True)
    pending: list[tuple[Path, Path]] = []

    def put(name: str, array: np.ndarray) -> Path:
        final = folder / name
        tmp = tmp_name(final)
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        pending.append((tmp, final))
        return final

    try:
        yield put
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, final in pending:
        os.replace(tmp, final)


def same_params(record: dict | None, params: dict) -> bool:
    """Whether a stage record was built with exactly ``params`` (compared through JSON, as stored)."""
    if record is None or not record.get("complete", True):
        return False
    stored = record.get("params")
    return json.loads(json.dumps(stored, sort_keys=True, default=_json_default)) == \
        json.loads(json.dumps(params, sort_keys=True, default=_json_default))

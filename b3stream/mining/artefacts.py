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

from ..files import (json_default, read_json, remove_outputs, sweep_temps, tmp_name, write_atomic,  # noqa: F401
                     write_json)
from ..records import RecordError, StageRecord, parse_record

log = logging.getLogger("b3stream.mining")


def new_token() -> str:
    return uuid.uuid4().hex


@contextmanager
def staged_arrays(folder: Path):
    """Collect arrays to publish together: ``put(name, array)`` writes ``.name.tmp-PID@HOST``; on a clean
    exit every file is renamed into place, on an error every temporary file is removed (no partial output).
    Temporary files of an earlier writer that was killed are swept first."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temps(folder)
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


def read_record(path: str | Path) -> dict | None:
    """A stage's commit record, or None when there is none or it is not one (not JSON, wrong types: a
    damaged or crafted record vouches for nothing, so its stage is rebuilt, and a stage that needs it
    refuses as without one)."""
    raw = read_json(path)
    if raw is None:
        return None
    try:
        parse_record(raw, StageRecord, path)
    except RecordError as e:
        log.warning("%s; ignored", e)
        return None
    return raw


def same_params(record: dict | None, params: dict) -> bool:
    """Whether a stage record was built with exactly ``params`` (compared through JSON, as stored)."""
    if record is None or not record.get("complete", True):
        return False
    stored = record.get("params")
    return json.loads(json.dumps(stored, sort_keys=True, default=json_default)) == \
        json.loads(json.dumps(params, sort_keys=True, default=json_default))

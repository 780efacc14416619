"""Atomic file writes shared by every stage and by both sides of the trainer/miner boundary.

A reader sees the old file or the whole new one, never a half-written one: data goes to a temporary name in
the same folder, is flushed to disk, then renamed into place (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


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


def json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as JSON atomically."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n").encode())


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None

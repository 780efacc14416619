"""Atomic file writes shared by every stage and by both sides of the trainer/miner boundary.

A reader sees the old file or the whole new one, never a half-written one: data goes to a temporary name in
the same folder, is flushed to disk, then renamed into place (``os.replace`` is atomic on POSIX).

Every temporary name says who writes it: ``.NAME.tmp-PID@HOST`` (``.NAME.tmp-PID-TOKEN@HOST`` where one
process writes several at once). A writer killed with SIGKILL cannot remove its temporary file, so the next
writer of the same folder does (:func:`sweep_temps`): one whose process no longer runs on this host, or,
for another host sharing the folder (a miner on another node), one untouched for a day. A live writer's
file is never removed, and nothing that is not named like this is touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np

HOST = socket.gethostname().replace("/", "_").replace("@", "_")
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d{1,19})(?:-[0-9a-f]+)?@(?P<host>[^@/]+)$")
FOREIGN_TMP_AGE = 24 * 3600.0  # seconds after which another host's temporary file counts as abandoned


def tmp_name(path: Path, token: str | None = None) -> Path:
    """The temporary name under which this process writes ``path`` (``token``: one of several at once)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{'-' + token if token else ''}@{HOST}")


PID_MAX = 2**22  # Linux's largest pid_max: a number above it (or below 1) names no process


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a process of another user counts as running). A number
    that no process can have (read from a crafted file or temporary name) is no running process: ``kill``
    would overflow on it, and 0 or a negative number would signal a whole process group."""
    if pid == os.getpid():
        return True
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid <= PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(folder: str | Path, names=None) -> list[Path]:
    """Temporary files and folders in ``folder`` left by writers that are gone (see the module doc);
    ``names``: only those that stand for one of these final names."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _TMP.match(path.name)
        if m is None or (names is not None and m["name"] not in names):
            continue
        try:
            if writer_gone(m["host"], int(m["pid"]), path.lstat().st_mtime):
                found.append(path)
        except FileNotFoundError:
            continue
    return sorted(found)


def writer_gone(host: str, pid: int, last_seen: float) -> bool:
    """Whether the process ``pid`` on ``host`` no longer writes: on this host, it does not run; on another
    (a miner on another node sharing the folder), nothing of it changed for :data:`FOREIGN_TMP_AGE`."""
    if host == HOST:
        return not pid_alive(pid)
    return time.time() - last_seen > FOREIGN_TMP_AGE


def sweep_temps(folder: str | Path, names=None) -> list[Path]:
    """Remove what :func:`stale_temps` finds; returns the paths removed."""
    removed = []
    for path in stale_temps(folder, names):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def remove_outputs(folder: str | Path, names) -> None:
    """Delete the files ``names`` in ``folder`` (a stage's own outputs), and nothing else there."""
    for name in names:
        (Path(folder) / name).unlink(missing_ok=True)


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
    """The JSON object in ``path``; None when the file is missing, unreadable, not UTF-8, not JSON or not an
    object (a list, a string). Files read back from a folder are a stranger's data: this never raises on
    their content, and what the object holds is checked by its caller (:mod:`b3stream.records`)."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digit limit
        return None
    return data if isinstance(data, dict) else None

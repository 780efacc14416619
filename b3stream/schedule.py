"""The schedule file: the only thing the miner hands the trainer.

A schedule is one epoch of global batches of example ids, optionally with B3++ hard negatives, plus
metadata (strategy, p, m, K, |B|, h, seed, data fingerprint, source model and step, batch quality).

File layout (``vNNNNNN.b3s``, little-endian)::

    b"B3SCHED1\\n" | uint64 header length | header JSON | raw arrays

The header lists each array's dtype, shape and byte offset, the metadata, and a SHA-256 over the metadata
and the array bytes. Files are written under a temporary name and linked into place under a version number
no other file has (:func:`publish_schedule`), so a reader never sees a half-written schedule and concurrent
publishers never share a version; a file whose checksum fails is rejected and :func:`latest_schedule` falls
back to the newest good version. The content is a pure function of the inputs and the seed (byte-identical
reruns); wall-clock timings, which are not, go to a ``.json`` sidecar that :func:`load_schedule` merges into
``meta["timings"]``.

Batches are stored flat (``ids``) with ``offsets`` (batch b is ``ids[offsets[b]:offsets[b+1]]``), laid out
community by community, so a batch of |B| ids from a K-community strategy is |B|/K consecutive runs of K.
``hard_negatives`` (if any) is aligned with ``ids``: row i holds the h negatives drawn for ``ids[i]``.
"""

from __future__ import annotations

import hashlib
import json
import re
import os
import secrets
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .files import write_json

MAGIC = b"B3SCHED1\n"
SUFFIX = ".b3s"
_VERSION_RE = re.compile(r"^v(\d{6})\.b3s$")


class ScheduleError(ValueError):
    """A schedule file is corrupt, of another format, or does not fit the data it is used with."""


class VersionExistsError(ScheduleError):
    """An explicit schedule version is already taken and overwriting was not asked for."""


class Ragged(Sequence):
    """A read-only sequence of int arrays stored flat with offsets (no per-batch Python objects)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        if b < 0:
            b += len(self)
        if not 0 <= b < len(self):
            raise IndexError(b)
        return self.flat[self.offsets[b] : self.offsets[b + 1]]


@dataclass
class Schedule:
    """One epoch of global batches. ``batches[b]`` is an int array of ids; ``hard_negatives[b]`` (B3++)
    is an int array of shape (len(batches[b]), h)."""

    ids: np.ndarray
    offsets: np.ndarray
    meta: dict = field(default_factory=dict)
    negatives: np.ndarray | None = None  # (len(ids), h), aligned with ids
    path: Path | None = None

    def __post_init__(self):
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if self.negatives is not None:
            self.negatives = np.ascontiguousarray(self.negatives, dtype=np.int64)
            if self.negatives.ndim != 2 or len(self.negatives) != len(self.ids):
                raise ScheduleError("hard negatives must be a (len(ids), h) array")
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids) or \
                np.any(np.diff(self.offsets) <= 0):
            raise ScheduleError("batch offsets must start at 0, rise strictly and end at len(ids)")

    @classmethod
    def from_batches(cls, batches: list[np.ndarray], meta: dict | None = None,
                     negatives: list[np.ndarray] | None = None) -> "Schedule":
        sizes = [len(b) for b in batches]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = np.concatenate(batches).astype(np.int64) if batches else np.empty(0, np.int64)
        negs = np.concatenate(negatives).astype(np.int64) if negatives is not None else None
        return cls(ids=ids, offsets=offsets, meta=dict(meta or {}), negatives=negs)

    @property
    def batches(self) -> Ragged:
        return Ragged(self.ids, self.offsets)

    @property
    def hard_negatives(self) -> Ragged | None:
        return None if self.negatives is None else Ragged(self.negatives, self.offsets)

    @property
    def version(self) -> int | None:
        return self.meta.get("version")

    def check_epoch(self, n: int) -> None:
        """Every id in 0..n-1 appears exactly once (the exactly-once-per-epoch contract)."""
        if len(self.ids) != n or np.any(np.bincount(self.ids, minlength=n) != 1):
            counts = np.bincount(self.ids, minlength=n)
            raise ScheduleError(
                f"schedule does not hold each of {n} ids exactly once: {int((counts == 0).sum())} missing, "
                f"{int((counts > 1).sum())} repeated"
            )

    # -- serialisation ------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"ids": self.ids, "offsets": self.offsets}
        if self.negatives is not None:
            arrays["hard_negatives"] = self.negatives
        # Sorted by name: the header's JSON lists them sorted, and the checksum follows that order.
        return {k: np.ascontiguousarray(arrays[k].astype("<i8")) for k in sorted(arrays)}

    def to_bytes(self) -> bytes:
        arrays = self._arrays()
        meta = {k: v for k, v in self.meta.items() if k != "timings"}
        meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(meta_json.encode())
        table, offset = {}, 0
        for name, arr in arrays.items():
            table[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset,
                           "nbytes": arr.nbytes}
            offset += arr.nbytes
            digest.update(arr.tobytes())
        header = json.dumps({"meta": meta, "arrays": table, "sha256": digest.hexdigest()},
                            sort_keys=True, separators=(",", ":")).encode()
        return MAGIC + struct.pack("<Q", len(header)) + header + b"".join(a.tobytes() for a in arrays.values())


def _parse(data: bytes, where: str) -> Schedule:
    if not data.startswith(MAGIC):
        raise ScheduleError(f"{where}: not a b3stream schedule (bad magic)")
    try:
        (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        header = json.loads(data[start : start + hlen])
        body = memoryview(data)[start + hlen :]
        meta = header["meta"]
        digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
        arrays = {}
        for name, spec in header["arrays"].items():
            raw = body[spec["offset"] : spec["offset"] + spec["nbytes"]]
            if len(raw) != spec["nbytes"]:
                raise ScheduleError(f"{where}: truncated (array {name!r})")
            digest.update(raw)
            arrays[name] = np.frombuffer(raw, dtype=np.dtype(spec["dtype"])).reshape(spec["shape"])
    except (struct.error, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ScheduleError):
            raise
        raise ScheduleError(f"{where}: corrupt header ({e})") from None
    if digest.hexdigest() != header["sha256"]:
        raise ScheduleError(f"{where}: checksum mismatch; the file is corrupt")
    return Schedule(ids=arrays["ids"], offsets=arrays["offsets"], meta=meta,
                    negatives=arrays.get("hard_negatives"))


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def load_schedule(path: str | Path, expect: dict | None = None) -> Schedule:
    """Read and verify a schedule file (or the newest good one in a folder).

    Args:
        path: a ``.b3s`` file, or a folder of versioned schedules.
        expect: a data stamp (``Manifest.stamp(split)``); a schedule built for other data is refused.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_schedule(path)
        if found is None:
            raise ScheduleError(f"{path}: holds no valid schedule")
        path = found
    if not path.is_file():
        raise ScheduleError(f"{path}: schedule file does not exist")
    sched = _parse(path.read_bytes(), str(path))
    sched.path = path
    side = sidecar(path)
    if side.is_file():
        try:
            sched.meta["timings"] = json.loads(side.read_text()).get("timings", {})
        except json.JSONDecodeError:
            pass  # the sidecar is informational; the schedule itself was verified
    if expect is not None:
        from .data.manifest import DataError, check_stamp

        try:
            check_stamp(sched.meta.get("data"), expect, f"schedule {path}")
        except DataError as e:
            raise ScheduleError(str(e)) from None
    return sched


def version_path(folder: str | Path, version: int) -> Path:
    return Path(folder) / f"v{version:06d}{SUFFIX}"


def list_versions(folder: str | Path) -> list[int]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_RE.match(p.name)))


def newest_schedule(folder: str | Path, expect: dict | None = None, above: int | None = None,
                    below: int | None = None, skip=(), on_reject=None) -> Schedule | None:
    """The newest schedule in ``folder`` that loads (checksum, and the data stamp ``expect`` when given),
    with a version in (``above``, ``below``) and not in ``skip``; None if there is none. ``on_reject(version,
    error)`` hears of every newer file that did not load."""
    for version in reversed(list_versions(folder)):
        if above is not None and version <= above:
            break
        if (below is not None and version >= below) or version in skip:
            continue
        try:
            return load_schedule(version_path(folder, version), expect=expect)
        except (ScheduleError, OSError) as e:
            if on_reject is not None:
                on_reject(version, e)
    return None


def latest_schedule(folder: str | Path) -> Path | None:
    """The newest schedule in ``folder`` that verifies; corrupt newer ones are skipped with a warning."""
    def warn(version, error):
        warnings.warn(f"skipping schedule {version_path(folder, version)}: {error}", stacklevel=3)

    found = newest_schedule(folder, on_reject=warn)
    return found.path if found is not None else None


def _claim(folder: Path, version: int, data: bytes, overwrite: bool) -> Path | None:
    """Put ``data`` at ``folder/vNNNNNN.b3s``: the complete bytes go to a unique temporary file first, then
    ``os.link`` gives them the final name, which fails if the name exists (atomic on POSIX, NFS included),
    so two publishers can never both get the same version and a reader never sees a half-written file.
    Returns None when the name is taken (and ``overwrite`` is off); the temporary file is always removed."""
    path = version_path(folder, version)
    # A name of our own (not mkstemp, whose 0600 mode the final file would keep: readers may be other users)
    tmp = folder / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            # The old timings describe the old file: drop them before the new file takes the name, so a
            # reader sees the new schedule with no timings for a moment rather than with wrong ones.
            sidecar(path).unlink(missing_ok=True)
            os.replace(tmp, path)
            return path
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
        return path
    finally:
        tmp.unlink(missing_ok=True)


def _remove_orphan_sidecars(folder: Path) -> None:
    """Delete ``vN.json`` files whose ``vN.b3s`` does not exist. A sidecar is written only after its
    schedule is in place (and removed before an overwrite), so one without a schedule is left over from a
    crash or from an older writer that wrote the sidecar first and then failed; it would otherwise lend its
    stale timings to whichever schedule takes that version next."""
    for side in folder.glob("v??????.json"):
        if _VERSION_RE.match(side.with_suffix(SUFFIX).name) and not side.with_suffix(SUFFIX).exists():
            side.unlink(missing_ok=True)


def publish_schedule(schedule: Schedule, folder: str | Path, version: int | None = None,
                     overwrite: bool = False) -> Path:
    """Write ``schedule`` as the next free version (or as ``version``) in ``folder``, atomically.

    The next free version is claimed with an exclusive create (:func:`_claim`): when several publishers
    (``b3stream mine`` runs, the background miner) pick the same number, one gets it and the others retry
    with the next, so every schedule gets its own version and none is lost. An explicit ``version`` that
    exists is refused (:class:`VersionExistsError`) unless ``overwrite``: a checkpoint taken on that version
    could no longer resume on it. The ``.json`` sidecar (timings, readable metadata) is written after the
    schedule is in place, so a failed or refused publish leaves nothing behind; a reader may see a new
    schedule without its timings for a moment (they are informational).
    """
    if version is not None and (isinstance(version, bool) or not isinstance(version, (int, np.integer))
                                or version < 0):
        raise ScheduleError(f"schedule version must be a non-negative integer, got {version!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_orphan_sidecars(folder)
    explicit = version is not None
    if not explicit:
        versions = list_versions(folder)
        version = versions[-1] + 1 if versions else 0
    while True:
        schedule.meta["version"] = int(version)  # part of the checksummed content: bytes per attempt
        path = _claim(folder, int(version), schedule.to_bytes(), overwrite and explicit)
        if path is not None:
            break
        if explicit:
            raise VersionExistsError(f"{version_path(folder, version)} already exists; a run trained on it "
                                     "could no longer resume on it. Pick another version, leave the version "
                                     "out (next free one), or overwrite it explicitly (b3stream mine "
                                     "--overwrite)")
        versions = list_versions(folder)
        version = max(int(version) + 1, versions[-1] + 1 if versions else 0)
    write_json(sidecar(path), {"meta": {k: v for k, v in schedule.meta.items() if k != "timings"},
                               "timings": schedule.meta.get("timings", {})})
    schedule.path = path
    return path

"""The schedule file: the only thing the miner hands the trainer.

A schedule is one epoch of global batches of example ids, optionally with B3++ hard negatives, plus
metadata (strategy, p, m, K, |B|, h, seed, data fingerprint, source model and step, batch quality).

File layout (``vNNNNNN.b3s``, little-endian)::

    b"B3SCHED1\\n" | uint64 header length | header JSON | raw arrays

The header lists each array's dtype, shape and byte offset, the metadata, and a SHA-256 over the metadata
and the array bytes. A reader checks the header against this layout before it reads any array (bounded
length and nesting, known arrays of int64 with consistent shapes and byte ranges, usable metadata types)
and the ids against the data stamp's ``n``: whatever the bytes, a bad file is a :class:`ScheduleError`
naming it, never another exception. Files are written under a temporary name and linked into place under a
version number no other file has (:func:`publish_schedule`), so a reader never sees a half-written schedule and concurrent
publishers never share a version; a file whose checksum fails is rejected and :func:`latest_schedule` falls
back to the newest good version. The content is a pure function of the inputs and the seed (byte-identical
reruns); wall-clock timings, which are not, go to a ``.json`` sidecar that :func:`load_schedule` merges into
``meta["timings"]``.

Batches are stored flat (``ids``) with ``offsets`` (batch b is ``ids[offsets[b]:offsets[b+1]]``), laid out
community by community, so a batch of |B| ids from a K-community strategy is |B|/K consecutive runs of K.
``hard_negatives`` (if any) is aligned with ``ids``: row i holds the h negatives drawn for ``ids[i]``.
``batch_task`` (if any) holds each batch's task index (into ``meta["tasks"]``; -1: a leftover batch of several
tasks), written when the strategy kept tasks apart: a trainer that re-cuts batches after a swap keeps to one
task per batch.
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

from .files import sweep_temps, tmp_name, write_json

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
    batch_task: np.ndarray | None = None  # (num batches,) task index of each batch; None: tasks not kept apart

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
        if self.batch_task is not None:
            self.batch_task = np.ascontiguousarray(self.batch_task, dtype=np.int64)
            if self.batch_task.shape != (len(self.offsets) - 1,) or (self.batch_task < -1).any():
                raise ScheduleError("batch_task must hold one task index (-1: several tasks) per batch")

    @classmethod
    def from_batches(cls, batches: list[np.ndarray], meta: dict | None = None,
                     negatives: list[np.ndarray] | None = None, batch_task=None) -> "Schedule":
        sizes = [len(b) for b in batches]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = np.concatenate(batches).astype(np.int64) if batches else np.empty(0, np.int64)
        negs = np.concatenate(negatives).astype(np.int64) if negatives is not None else None
        return cls(ids=ids, offsets=offsets, meta=dict(meta or {}), negatives=negs, batch_task=batch_task)

    @property
    def batches(self) -> Ragged:
        return Ragged(self.ids, self.offsets)

    @property
    def hard_negatives(self) -> Ragged | None:
        return None if self.negatives is None else Ragged(self.negatives, self.offsets)

    @property
    def version(self) -> int | None:
        return self.meta.get("version")

    @property
    def batch_size(self) -> int:
        """|B| as the miner recorded it (else the largest batch)."""
        size = self.meta.get("batch_size")
        return int(size) if size else int(np.diff(self.offsets).max())

    def check_trainable(self, n: int, world: int) -> None:
        """Refuse, before training, a schedule that cannot be trained on ``world`` ranks: not each of ``n`` ids
        exactly once, or a |B| that does not divide over the ranks."""
        self.check_epoch(n)
        if self.batch_size % world:
            raise ScheduleError(f"schedule {self.path or ''} has |B|={self.batch_size}, which does not divide over "
                                f"{world} ranks; mine it with a batch size that is a multiple of {world}")
        if n < world:
            raise ScheduleError(f"{n} examples cannot feed {world} ranks")

    def check_epoch(self, n: int) -> None:
        """Every id in 0..n-1 appears exactly once (the exactly-once-per-epoch contract). Ids outside that
        range are reported as such first: counting them would fail (negative) or miscount (too large)."""
        where = f"{self.path}: " if self.path is not None else ""
        outside = (self.ids < 0) | (self.ids >= n)
        if outside.any():
            raise ScheduleError(f"{where}schedule holds {int(outside.sum())} ids outside 0..{n - 1} "
                                f"(e.g. {int(self.ids[outside][0])}); it was not built for {n} examples")
        counts = np.bincount(self.ids, minlength=n)
        missing, repeated = int((counts == 0).sum()), int((counts > 1).sum())
        if missing or repeated:
            raise ScheduleError(f"{where}schedule does not hold each of {n} ids exactly once: {missing} missing, "
                                f"{repeated} repeated")

    # -- serialisation ------------------------------------------------------------------------------
    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {"ids": self.ids, "offsets": self.offsets}
        if self.negatives is not None:
            arrays["hard_negatives"] = self.negatives
        if self.batch_task is not None:
            arrays["batch_task"] = self.batch_task
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


# -- reading: the header is checked against the format before any array is touched ------------------------

_MAX_HEADER = 64 << 20  # bytes; a real header (metadata + three array specs) is a few KiB
_MAX_DEPTH = 32  # nesting of the header JSON; the writer's deepest is about 4
_DTYPE = "<i8"  # what :meth:`Schedule._arrays` writes, whatever the machine
_ARRAY_RANK = {"batch_task": 1, "hard_negatives": 2, "ids": 1, "offsets": 1}  # ids and offsets are required
# Metadata the loader and trainer compute with: each is absent, null, or an int of at least this value.
_META_INTS = {"version": 0, "batch_size": 1, "K": 1, "h": 0, "p": 0, "m": 0, "n": 0, "num_batches": 0,
              "seed": None, "source_step": None}
_META_DICTS = ("data", "quality", "quality_previous")


def _is_int(value, minimum=None) -> bool:
    """An int (not a bool, which JSON would give as true/false) no smaller than ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _depth_ok(value, limit: int) -> bool:
    """Whether ``value`` nests lists/dicts at most ``limit`` deep; iterative, so a crafted header cannot
    exhaust the stack here either."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _read_header(data: bytes, where: str) -> tuple[dict, memoryview]:
    """The header JSON and the body after it. Bounded: a header length beyond the file or the cap, and
    nesting beyond what Python's parser survives (it raises RecursionError), are a corrupt file."""
    if not data.startswith(MAGIC):
        raise ScheduleError(f"{where}: not a b3stream schedule (bad magic)")
    start = len(MAGIC) + 8
    if len(data) < start:
        raise ScheduleError(f"{where}: truncated (no header length)")
    (hlen,) = struct.unpack_from("<Q", data, len(MAGIC))
    if hlen > len(data) - start:
        raise ScheduleError(f"{where}: truncated (header of {hlen} bytes, {len(data) - start} left in the file)")
    if hlen > _MAX_HEADER:
        raise ScheduleError(f"{where}: corrupt header (length {hlen} bytes, above the {_MAX_HEADER} cap)")
    try:
        header = json.loads(data[start : start + hlen])
    except RecursionError:
        raise ScheduleError(f"{where}: corrupt header (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ScheduleError(f"{where}: corrupt header ({e})") from None
    if not _depth_ok(header, _MAX_DEPTH):
        raise ScheduleError(f"{where}: corrupt header (JSON nested deeper than {_MAX_DEPTH} levels)")
    return header, memoryview(data)[start + hlen :]


def _check_header(header, body_size: int, where: str) -> None:
    """Refuse a header that is not what :meth:`Schedule.to_bytes` writes: its keys and their types, the
    array table (known names, int64 little-endian, shapes of the right rank, byte ranges that match the
    shapes and lie back to back in name order, filling the body exactly), the metadata fields the trainer
    computes with, and the checksum's form."""
    def bad(problem: str) -> ScheduleError:
        return ScheduleError(f"{where}: corrupt header ({problem})")

    if not isinstance(header, dict) or set(header) != {"arrays", "meta", "sha256"}:
        raise bad("expected an object with exactly the keys arrays, meta, sha256")
    if not isinstance(header["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", header["sha256"]):
        raise bad("sha256 is not 64 hex digits")
    _check_meta(header["meta"], bad)
    arrays = header["arrays"]
    if not isinstance(arrays, dict) or not {"ids", "offsets"} <= set(arrays) <= set(_ARRAY_RANK):
        raise bad(f"arrays must name ids, offsets and optionally hard_negatives and batch_task, got {_shown(arrays)}")
    offset = 0
    for name in sorted(arrays):
        _check_array(name, arrays[name], offset, bad)
        offset += arrays[name]["nbytes"]
    if offset > body_size:
        raise ScheduleError(f"{where}: truncated (the arrays need {offset} bytes, {body_size} present)")
    if offset < body_size:
        raise bad(f"the arrays take {offset} bytes but {body_size} follow the header")


def _check_array(name: str, spec, offset: int, bad) -> None:
    """One entry of the array table: dtype, shape of the right rank, and a byte range where the writer
    puts it (``offset``: right after the previous array)."""
    if not isinstance(spec, dict) or set(spec) != {"dtype", "nbytes", "offset", "shape"}:
        raise bad(f"array {name!r}: expected dtype, shape, offset, nbytes, got {_shown(spec)}")
    if spec["dtype"] != _DTYPE:
        raise bad(f"array {name!r}: dtype {_shown(spec['dtype'])}, expected {_DTYPE!r}")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) != _ARRAY_RANK[name] or not all(_is_int(d, 0) for d in shape):
        raise bad(f"array {name!r}: shape {_shown(shape)} is not {_ARRAY_RANK[name]} non-negative integers")
    if not _is_int(spec["offset"]) or spec["offset"] != offset:
        raise bad(f"array {name!r}: at byte {_shown(spec['offset'])} of the body, expected {offset}")
    size = int(np.prod(shape, dtype=object)) * np.dtype(_DTYPE).itemsize
    if not _is_int(spec["nbytes"]) or spec["nbytes"] != size:
        raise bad(f"array {name!r}: nbytes {_shown(spec['nbytes'])} does not match shape {shape} ({size})")


def _check_meta(meta, bad) -> None:
    """The metadata is an object, and the fields code computes with have usable types."""
    if not isinstance(meta, dict):
        raise bad(f"meta must be an object, got {_shown(meta)}")
    for key, minimum in _META_INTS.items():
        if meta.get(key) is not None and not _is_int(meta[key], minimum):
            need = "an integer" if minimum is None else f"an integer >= {minimum}"
            raise bad(f"meta {key!r} is {_shown(meta[key])}, expected {need}")
    for key in _META_DICTS:
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise bad(f"meta {key!r} is {_shown(meta[key])}, expected an object")
    n = (meta.get("data") or {}).get("n")
    if n is not None and not _is_int(n, 0):
        raise bad(f"meta data 'n' is {_shown(n)}, expected a non-negative integer")
    for key in ("strategy", "source_model"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(f"meta {key!r} is {_shown(meta[key])}, expected text")


def _shown(value, limit: int = 60) -> str:
    """``repr`` cut short: a crafted header may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_ids(arrays: dict[str, np.ndarray], n: int | None, where: str) -> None:
    """Every id names an example: in 0..n-1 with n from the data stamp (when the schedule has one), never
    negative; hard negatives may also be -1, the mark of a slot the miner could not fill."""
    for name, low in (("ids", 0), ("hard_negatives", -1)):
        arr = arrays.get(name)
        if arr is None or not arr.size:
            continue
        outside = (arr < low) | (arr >= n) if n is not None else arr < low
        if outside.any():
            span = f"{low}..{n - 1}" if n is not None else f"{low} or above"
            raise ScheduleError(f"{where}: {int(outside.sum())} {name.replace('_', ' ')} outside {span} "
                                f"(e.g. {int(arr[outside].flat[0])})")


def _parse(data: bytes, where: str) -> Schedule:
    """Bytes -> Schedule. Every way a file can be wrong (foreign, truncated, crafted, corrupt) is a
    :class:`ScheduleError` naming ``where``; nothing else escapes, whatever the bytes."""
    header, body = _read_header(data, where)
    _check_header(header, len(body), where)
    meta = header["meta"]
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    arrays = {}
    for name in sorted(header["arrays"]):
        spec = header["arrays"][name]
        raw = body[spec["offset"] : spec["offset"] + spec["nbytes"]]
        digest.update(raw)
        arrays[name] = np.frombuffer(raw, dtype=np.dtype(_DTYPE)).reshape(spec["shape"])
    if digest.hexdigest() != header["sha256"]:
        raise ScheduleError(f"{where}: checksum mismatch; the file is corrupt")
    _check_ids(arrays, (meta.get("data") or {}).get("n"), where)
    try:
        return Schedule(ids=arrays["ids"], offsets=arrays["offsets"], meta=meta,
                        negatives=arrays.get("hard_negatives"), batch_task=arrays.get("batch_task"))
    except ScheduleError as e:
        raise ScheduleError(f"{where}: {e}") from None


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _sidecar_timings(side: Path) -> dict:
    """The timings of a ``.json`` sidecar, or {} if it is unreadable or malformed: the sidecar is
    informational and unchecked, so nothing in it may stop a verified schedule from loading."""
    try:
        timings = json.loads(side.read_text()).get("timings", {})
    except (OSError, ValueError, RecursionError, AttributeError):
        return {}
    return timings if isinstance(timings, dict) and _depth_ok(timings, _MAX_DEPTH) else {}


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
        sched.meta["timings"] = _sidecar_timings(side)
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
                    below: int | None = None, skip=(), on_reject=None, check=None) -> Schedule | None:
    """The newest schedule in ``folder`` that loads (checksum, and the data stamp ``expect`` when given),
    with a version in (``above``, ``below``) and not in ``skip``; None if there is none. ``check(schedule)``,
    if given, may refuse a schedule that loads by raising. ``on_reject(version, error)`` hears of every newer
    file that did not load or was refused.

    A file that fails for any reason is passed over, not raised: a schedule folder is written by other
    processes (and people) while readers poll it, so one bad file must never stop the reader; only
    KeyboardInterrupt and SystemExit get through."""
    for version in reversed(list_versions(folder)):
        if above is not None and version <= above:
            break
        if (below is not None and version >= below) or version in skip:
            continue
        try:
            schedule = load_schedule(version_path(folder, version), expect=expect)
            if check is not None:
                check(schedule)
            return schedule
        except Exception as e:  # noqa: BLE001 (see the docstring)
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
    tmp = tmp_name(path, token=secrets.token_hex(4))
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
    sweep_temps(folder)  # a publisher killed mid-write left its temporary file
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

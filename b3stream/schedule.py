"""The schedule file: the only thing the miner hands the trainer.

A schedule is one epoch of global batches of example ids, optionally with B3++ hard negatives, plus
metadata (strategy, p, m, K, |B|, h, seed, data fingerprint, source model and step, batch quality).

A schedule file (``vNNNNNN.b3s``) is a safetensors file: its tensors are the int64 arrays below, and its
string metadata map holds one entry, ``"b3stream"``, a JSON object ``{"meta": ..., "sha256": ...}``: the
metadata and a SHA-256 over the metadata and the array bytes. safetensors parses and checks the container
(header length, JSON, dtypes, shapes against byte ranges, ranges inside the file and neither overlapping nor
leaving gaps); what is ours is checked here: the array names and ranks, the metadata's schema, the checksum,
and the ids against the data stamp's ``n``. Whatever the bytes, a bad file is a :class:`ScheduleError` naming
it, never another exception; a file of the old ``B3SCHED1`` container is refused with a request to re-mine it.
Files are written under a temporary name and linked into place under a version number no other file has
(:func:`publish_schedule`), so a reader never sees a half-written schedule and concurrent publishers never
share a version; a file whose checksum fails is rejected and :func:`latest_schedule_path` falls back to the
newest good version. The content is a pure function of the inputs and the seed (byte-identical reruns:
safetensors writes the tensors sorted by name, and the metadata map has a single key, whose order cannot
vary); wall-clock timings, which are not, go to a ``.json`` sidecar that :func:`load_schedule` merges into
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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field
from safetensors import safe_open
from safetensors.numpy import save

from .files import sweep_temps, tmp_name, write_json
from .records import Count, Record, RecordError, parse_record

OLD_MAGIC = b"B3SCHED1"  # the container schedules had before they were safetensors files
META_KEY = "b3stream"  # the one entry of the safetensors metadata map
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
    negative_ids: np.ndarray | None = None  # (len(ids), h), aligned with ids
    path: Path | None = None
    batch_task: np.ndarray | None = None  # (num batches,) task index of each batch; None: tasks not kept apart

    def __post_init__(self):
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int64)
        self.offsets = np.ascontiguousarray(self.offsets, dtype=np.int64)
        if self.negative_ids is not None:
            self.negative_ids = np.ascontiguousarray(self.negative_ids, dtype=np.int64)
            if self.negative_ids.ndim != 2 or len(self.negative_ids) != len(self.ids):
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
                     negative_ids: list[np.ndarray] | None = None, batch_task=None) -> "Schedule":
        sizes = [len(b) for b in batches]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = np.concatenate(batches).astype(np.int64) if batches else np.empty(0, np.int64)
        negs = np.concatenate(negative_ids).astype(np.int64) if negative_ids is not None else None
        return cls(ids=ids, offsets=offsets, meta=dict(meta or {}), negative_ids=negs, batch_task=batch_task)

    @property
    def batches(self) -> Ragged:
        return Ragged(self.ids, self.offsets)

    @property
    def hard_negatives(self) -> Ragged | None:
        return None if self.negative_ids is None else Ragged(self.negative_ids, self.offsets)

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
        if self.negative_ids is not None:
            arrays["hard_negatives"] = self.negative_ids
        if self.batch_task is not None:
            arrays["batch_task"] = self.batch_task
        # Sorted by name, the order safetensors lays them out in and the checksum follows; no copy when they
        # are int64 already (they are, see __post_init__).
        return {k: np.ascontiguousarray(arrays[k], dtype="<i8") for k in sorted(arrays)}

    def to_bytes(self) -> bytes:
        arrays = self._arrays()
        meta = {k: v for k, v in self.meta.items() if k != "timings"}
        entry = {"meta": meta, "sha256": _checksum(_canonical(meta), arrays)}
        return save(arrays, metadata={META_KEY: _canonical(entry)})


# -- reading: safetensors checks the container, we check what is ours before any array is read -----------

_MAX_DEPTH = 32  # nesting of the metadata JSON; the writer's deepest is about 4
_ARRAY_RANK = {"batch_task": 1, "hard_negatives": 2, "ids": 1, "offsets": 1}  # ids and offsets are required
_REMINE = "b3stream mine schedule --config CONFIG"  # the stage that writes schedules; the others are reused


class _Stamp(Record):
    n: Count | None = None


class ScheduleMeta(Record):
    """The metadata fields the loader and trainer compute with: each absent, null, or of this type and range
    (strict: ``"7"`` is no version, ``true`` no K). Other fields are the miner's notes and pass unchecked."""

    version: Count | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    K: Annotated[int, Field(ge=1)] | None = None
    h: Count | None = None
    p: Count | None = None
    m: Count | None = None
    n: Count | None = None
    num_batches: Count | None = None
    seed: int | None = None
    source_step: int | None = None
    data: _Stamp | None = None
    quality: dict | None = None
    quality_previous: dict | None = None
    strategy: str | None = None
    source_model: str | None = None


def _canonical(value) -> str:
    """The one JSON text of ``value`` (sorted keys, no spaces): what is stored and what is checksummed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _checksum(meta_json: str, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the metadata's canonical JSON and the arrays' little-endian bytes, in name order."""
    digest = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        digest.update(np.ascontiguousarray(arrays[name], dtype="<i8"))  # a view, not a copy, on x86 and ARM
    return digest.hexdigest()


def _depth_ok(value, limit: int) -> bool:
    """Whether ``value`` nests lists/dicts at most ``limit`` deep; iterative, so a crafted file cannot
    exhaust the stack here either."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _shown(value, limit: int = 60) -> str:
    """``repr`` cut short: a crafted file may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stored_entry(stored: dict | None, where: str) -> tuple[dict, str]:
    """The metadata and the checksum of the ``"b3stream"`` entry, checked: an object of exactly those two
    keys, bounded nesting, a checksum of 64 hex digits and metadata that fits :class:`ScheduleMeta`."""
    text = (stored or {}).get(META_KEY)
    if text is None:
        raise ScheduleError(f"{where}: a safetensors file without the {META_KEY!r} metadata; not a b3stream "
                            "schedule")
    try:
        entry = json.loads(text)
    except RecursionError:
        raise ScheduleError(f"{where}: corrupt metadata (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError
        raise ScheduleError(f"{where}: corrupt metadata ({e})") from None
    if not _depth_ok(entry, _MAX_DEPTH):
        raise ScheduleError(f"{where}: corrupt metadata (JSON nested deeper than {_MAX_DEPTH} levels)")
    if not isinstance(entry, dict) or set(entry) != {"meta", "sha256"}:
        raise ScheduleError(f"{where}: corrupt metadata (expected an object with exactly the keys meta, sha256, "
                            f"got {_shown(entry)})")
    if not isinstance(entry["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise ScheduleError(f"{where}: corrupt metadata (sha256 is not 64 hex digits)")
    try:
        parse_record(entry["meta"], ScheduleMeta, where)
    except RecordError as e:
        raise ScheduleError(str(e)) from None
    return entry["meta"], entry["sha256"]


def _layout(f, where: str) -> list[tuple[str, list[int]]]:
    """Each array's name and shape in the order of the file, checked for name, dtype and rank (safetensors
    has checked the rest: shapes that match the byte ranges, ranges back to back from the start of the data
    to the end of the file, no overlap, no gap)."""
    names = set(f.keys())
    if not {"ids", "offsets"} <= names <= set(_ARRAY_RANK):
        raise ScheduleError(f"{where}: arrays must be ids, offsets and optionally hard_negatives and batch_task, "
                            f"got {_shown(sorted(names))}")
    layout = []
    for name in f.offset_keys():
        spec = f.get_slice(name)
        if spec.get_dtype() != "I64":
            raise ScheduleError(f"{where}: array {name!r} is {_shown(spec.get_dtype())}, expected I64 (int64)")
        if len(spec.get_shape()) != _ARRAY_RANK[name]:
            raise ScheduleError(f"{where}: array {name!r} has shape {_shown(spec.get_shape())}, expected "
                                f"{_ARRAY_RANK[name]} dimension(s)")
        layout.append((name, spec.get_shape()))
    return layout


def _read_arrays(file, start: int, layout, where: str) -> dict[str, np.ndarray]:
    """The arrays of ``layout``: the data from byte ``start`` to the end, read at once into one buffer that the
    arrays view (read-only), one copy of the data in memory. Measured against the alternatives (10M ids):
    safetensors' mmap loader keeps the file's pages beside the copies (twice the peak memory), its pread
    loader was slower (0.13 s against 0.09 s for 76 MB), and arrays allocated one by one were slow by turns
    (numpy madvises large arrays for huge pages, and a kernel with THP defrag=madvise compacts memory then)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for _, shape in layout]
    file.seek(start)
    data = file.read(8 * sum(sizes))  # with a size: read() alone would join what is buffered to the rest, a copy
    if len(data) != 8 * sum(sizes) or file.read(1):
        raise ScheduleError(f"{where}: changed while it was read (not the {8 * sum(sizes)} bytes of arrays "
                            "its header says)")
    arrays, offset = {}, 0
    for (name, shape), size in zip(layout, sizes):
        arrays[name] = np.frombuffer(data, dtype="<i8", count=size, offset=offset).reshape(shape)
        offset += 8 * size
    return arrays


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


def _read(path: Path, where: str) -> Schedule:
    """A schedule file -> Schedule. Every way a file can be wrong (old format, foreign, truncated, crafted,
    corrupt) is a :class:`ScheduleError` naming ``where``; nothing else escapes, whatever the bytes.

    safetensors parses and checks the header (it reads no array here); the arrays are then read from our own
    handle on the file, which must be the file safetensors opened: a publisher's ``overwrite`` may put another
    file under the name meanwhile."""
    try:
        with open(path, "rb") as file:
            head = file.read(8)  # safetensors' header length, or the start of the old container's magic
            if head == OLD_MAGIC:
                raise ScheduleError(f"{where}: a schedule of the old format (B3SCHED1), which this b3stream no "
                                    f"longer reads; re-mine it: {_REMINE}")
            with safe_open(path, framework="numpy", backend="pread") as f:
                meta, sha256 = _stored_entry(f.metadata(), where)
                layout = _layout(f, where)
            if not os.path.samestat(os.fstat(file.fileno()), os.stat(path)):
                raise ScheduleError(f"{where}: replaced while it was read")
            arrays = _read_arrays(file, 8 + int.from_bytes(head, "little"), layout, where)
    except (ScheduleError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 (safetensors' SafetensorError, an OSError, whatever a crafted file finds)
        raise ScheduleError(f"{where}: not a readable safetensors file ({str(e)[:200]})") from None
    if _checksum(_canonical(meta), arrays) != sha256:
        raise ScheduleError(f"{where}: checksum mismatch; the file is corrupt")
    _check_ids(arrays, (meta.get("data") or {}).get("n"), where)
    try:
        return Schedule(ids=arrays["ids"], offsets=arrays["offsets"], meta=meta,
                        negative_ids=arrays.get("hard_negatives"), batch_task=arrays.get("batch_task"))
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
        found = latest_schedule_path(path)
        if found is None:
            raise ScheduleError(f"{path}: holds no valid schedule")
        path = found
    if not path.is_file():
        raise ScheduleError(f"{path}: schedule file does not exist")
    sched = _read(path, str(path))
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


def load_newest_schedule(folder: str | Path, expect: dict | None = None, above: int | None = None,
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


def latest_schedule_path(folder: str | Path) -> Path | None:
    """The newest schedule in ``folder`` that verifies; corrupt newer ones are skipped with a warning."""
    def warn(version, error):
        warnings.warn(f"skipping schedule {version_path(folder, version)}: {error}", stacklevel=3)

    found = load_newest_schedule(folder, on_reject=warn)
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

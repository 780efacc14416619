"""Typed readers for the files b3stream reads back from the folders it writes.

A run folder or a mining folder outlives the process that wrote it: it is copied, shared, edited by hand,
and may come from a stranger. So every JSON file read back from one is *data*: parsed by pydantic against
the schema of what b3stream writes there, and either a value or a :class:`RecordError` that names the file
and what is wrong. Non-UTF-8 bytes, a list where an object belongs, a string where a number belongs, an
integer beyond any pid or step, NaN and infinities, negative durations: all are errors here, never a
traceback further down. The caller decides what an error means: a file a command was pointed at is refused;
a file that is polled while training runs (the miner's status, its lease) is ignored, and training goes on.

Nothing read here can choose code: no record holds a class name, a module or ``trust_remote_code``
(see :mod:`b3stream.refresh.miner` for the encoder settings of snapshots).

    marker = read_record(run / ".b3stream-run.json", RunMarker)   # None when missing
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .files import PID_MAX

R = TypeVar("R", bound="Record")

MAX_RECORD_BYTES = 64 << 20  # a record b3stream writes is a few KB (a probe's ids: a few hundred KB)

Pid = Annotated[int, Field(ge=1, le=PID_MAX)]
Count = Annotated[int, Field(ge=0, le=2**62)]  # steps, epochs, versions, sizes: non-negative, int64-safe
Seconds = Annotated[float, Field(ge=0)]  # a wall-clock time or a duration
Name = Annotated[str, Field(min_length=1, max_length=255)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class RecordError(ValueError):
    """A file read back from a folder is not what b3stream writes there; the message names the file."""


class Record(BaseModel):
    """Strict by default: a number is a number (``"5"`` is no int, ``true`` no step), no NaN or infinity.
    Unknown keys are ignored unless a schema forbids them (a newer b3stream may add some)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, frozen=True, extra="ignore")


def parse_record(data: bytes | str | dict, schema: type[R], where: str | Path) -> R:
    """``data`` (a file's bytes, or an object already parsed) as ``schema``; :class:`RecordError` naming
    ``where`` when it is not."""
    try:
        if isinstance(data, (bytes, str)):
            return schema.model_validate_json(data, strict=True)
        return schema.model_validate(data, strict=True)
    except ValidationError as e:
        first = e.errors(include_url=False, include_context=False)[0]
        loc = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise RecordError(f"{where}: not a {schema.__name__} record b3stream writes ({loc}: {first['msg']}; "
                          f"{e.error_count()} problem(s))") from None
    except (ValueError, RecursionError) as e:  # pydantic-core's own limits (depth, sizes)
        raise RecordError(f"{where}: not a {schema.__name__} record b3stream writes ({e})") from None


def read_record(path: str | Path, schema: type[R]) -> R | None:
    """The record in ``path`` as ``schema``; None when there is no such file, :class:`RecordError` when the
    file is there but unreadable or not such a record."""
    path = Path(path)
    try:
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{path}: {path.stat().st_size} bytes, more than any record b3stream writes")
        data = path.read_bytes()
    except OSError as e:
        raise RecordError(f"{path}: unreadable ({e.strerror or e})") from None
    return parse_record(data, schema, path)


def read_record_or_none(path: str | Path, schema: type[R]) -> R | None:
    """For files polled while work goes on (a status, a lease): the record, or None when it is missing
    or not valid (a crafted or half-understood file is as good as none, and never stops the caller)."""
    try:
        return read_record(path, schema)
    except RecordError:
        return None


# -- the records -----------------------------------------------------------------------------------


class RunMarker(Record):
    """``RUN/.b3stream-run.json``: the folder is a b3stream training run's (:mod:`b3stream.train.run_folder`)."""

    model_config = ConfigDict(extra="forbid")
    format: Literal[1]
    run_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    created: Seconds
    pid: Pid
    host: Name


class LegacyRunMarker(Record):
    """The marker of runs made before :class:`RunMarker` had a format and a run id (resumed, then upgraded)."""

    model_config = ConfigDict(extra="forbid")
    created: Seconds
    pid: Pid


class Lease(Record):
    """``RUN/refresh/lease.json``: the snapshot a miner is reading (:func:`b3stream.refresh.snapshot.pin_snapshot`)."""

    step: Count
    pid: Pid
    host: Name
    time: Seconds


class ProbeDecision(Record):
    """One ``refresh.when: bound`` decision of the miner: whether it re-mines the snapshot of a step."""

    snapshot_step: Count
    refresh: bool


class MinerStatus(Record):
    """``RUN/refresh/status.json``: where the miner is. The trainer reads back its ``state`` (to share the
    cores) and its ``probes`` (not to wait for a snapshot the miner decided not to re-mine)."""

    state: Annotated[str, Field(max_length=64)] = "waiting"
    probes: list[ProbeDecision] = []


class DataStamp(Record):
    """What an artefact records about the data it was built from (``Manifest.stamp``)."""

    dataset: str | None = None
    split: Name | None = None  # None: embeddings brought without a prepared dataset
    n: Count
    fingerprint: Annotated[str, Field(max_length=128)] | None = None


class SnapshotMeta(Record):
    """``RUN/snapshots/step-NNNNNNN/snapshot.json`` (:mod:`b3stream.refresh.snapshot`). ``encoder`` is checked
    against the run's own student before anything of the snapshot loads."""

    step: Count
    epoch: Count = 0
    kind: Literal["lora", "full"]
    data: DataStamp
    created: Seconds | None = None
    encoder: dict[str, Any]
    weights_sha256: Hex64


class SidecarMeta(Record):
    """The part of a schedule's ``vNNNNNN.json`` sidecar the miner reads back (the snapshot it answered)."""

    source_step: Count | None = None


class Sidecar(Record):
    meta: SidecarMeta = SidecarMeta()


class TopLists(Record):
    p: Count


class StageRecord(Record):
    """A mining stage's commit record (``embeddings.json``, ``rank.json``, ``partition.json``;
    :mod:`b3stream.mining.artefacts`): the fields other stages and the trainer read back, typed."""

    stamp: DataStamp | None = None
    params: dict[str, Any] = {}
    token: Annotated[str, Field(max_length=64)] | None = None
    complete: bool = True
    n: Count | None = None
    dim: Count | None = None
    rows_done: Count | None = None
    seconds: Seconds | None = None
    task_names: list[str] | None = None
    kept: dict[str, Any] | None = None
    teacher: dict[str, Any] | None = None
    source_model: str | None = None
    source_step: Count | None = None
    trained_ids: str | None = None
    top: TopLists | None = None

"""The run folder ``RUN`` (the trainer's ``out``) is the trainer's own: it never deletes what it did not write.

A run marks the folder as its own with ``RUN/.b3stream-run.json`` before writing anything else there. When a
run starts, the folder is one of:

- new or empty: the run starts in it;
- an earlier b3stream run with a checkpoint, and ``resume: true``: the run continues it, deleting nothing;
- anything else that holds files: refused, unless ``overwrite: true``. Then the earlier run's own outputs
  (checkpoints, TensorBoard events, traces, summary, schedule versions, snapshots: by name, see
  :data:`EARLIER_RUN`) are removed so that they cannot pass for the new run's, and every other file stays.
  A folder that is no b3stream run (a mining folder, a folder of notes) is used with ``overwrite`` only if
  it holds none of the names the run writes (``config.yaml``, ``summary.json``, traces, the marker) and none
  of the sub-folders the run writes into and prunes already holds files: the run cannot tell its own from a
  stranger's there.

The marker is a record (:class:`b3stream.records.RunMarker`: a format, a run id, when and by which process),
not any JSON: ``[]`` or a hand-made file is no marker, and a folder holding one is no run.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import time
import uuid
from pathlib import Path

from ..config import ConfigError
from ..files import HOST, sweep_temps, write_json
from ..records import LegacyRunMarker, RecordError, RunMarker, read_record

MARKER = ".b3stream-run.json"
# Sub-folders a run writes into and prunes (old checkpoints, schedule versions, snapshots, refresh state).
OWN_FOLDERS = ("checkpoints", "tb", "export", "schedules", "snapshots", "refresh")
# What an earlier run left that would pass for the new run's: (folder, file-name patterns) removed by
# ``overwrite``. Checkpoint tags sort by step, so an old step-500 tag would outlive the new run's step-10
# when checkpoints are pruned; old schedule versions and snapshots would look newer than the new run's
# first; traces are appended to; TensorBoard would draw both runs as one.
EARLIER_RUN = (
    (".", ("summary.json", "trace.jsonl", "trace.rank*.jsonl")),
    ("checkpoints", ("latest", "step*", "zero_to_fp32.py")),
    ("tb", ("events.out.tfevents.*",)),
    ("schedules", ("v[0-9][0-9][0-9][0-9][0-9][0-9].b3s", "v[0-9][0-9][0-9][0-9][0-9][0-9].json")),
    ("snapshots", ("step-[0-9]*",)),
    ("refresh", ("status.json", "finished")),
)


# Names a run writes at the top of its folder: a folder that is no run and holds one of them is refused even
# with overwrite (it would replace config.yaml and summary.json, and delete traces, of somebody else's).
RUN_FILES = (MARKER, "config.yaml", "summary.json", "trace.jsonl", "trace.rank*.jsonl")


def marker(run: Path) -> RunMarker | LegacyRunMarker | None:
    """The folder's run marker, or None: none there, or a file that is no marker b3stream writes."""
    for schema in (RunMarker, LegacyRunMarker):
        try:
            return read_record(run / MARKER, schema)
        except RecordError:
            continue
    return None


def has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints" / "latest").is_file()


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def plan(run: Path, resume: bool, overwrite: bool, schedule: Path | None = None) -> str:
    """How a run may start in ``run``: ``"new"``, ``"resume"`` or ``"replace"``; ConfigError when it may not.
    Reads only: every rank calls it, so that all refuse together. ``schedule``: the schedule file given
    (``overwrite`` must not remove the schedule it is about to train on)."""
    if run.exists() and not run.is_dir():
        raise ConfigError(f"out={run} exists and is not a folder")
    ours = marker(run) is not None
    if resume and ours and has_checkpoint(run):
        return "resume"
    present = _entries(run)
    if not present:
        return "new"
    if not overwrite:
        what = "an earlier b3stream run" if ours else "files no b3stream run wrote"
        hint = "; resume=true continues it from its checkpoint" if ours and has_checkpoint(run) and not resume else ""
        raise ConfigError(f"out={run} holds {what} ({_shown(present)}){hint}. Give a new out, or overwrite=true "
                          "to start afresh there (an earlier run's checkpoints, schedules, snapshots and logs are "
                          "removed; files it did not write are kept)")
    if not ours:
        taken = [name for name in present if any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES)]
        if taken:
            raise ConfigError(f"out={run} is not a b3stream run folder (no valid {MARKER}), and it holds "
                              f"{_shown(taken)}, names the run writes: overwrite=true would replace or delete "
                              "them. Give a new out, or move them")
        busy = [name for name in OWN_FOLDERS if _entries(run / name)]
        if busy:
            raise ConfigError(f"out={run} is not a b3stream run folder, and its {', '.join(busy)} hold files: the "
                              "run writes and prunes there and cannot tell its files from others'. Give a new out")
    if schedule is not None:
        for name in ("schedules", "snapshots"):
            folder = (run / name).resolve()
            if folder in schedule.resolve().parents:
                raise ConfigError(f"schedule {schedule} lies in {run / name}, which overwrite=true empties of an "
                                  "earlier run's versions; give the schedule from the mining folder, or resume")
    return "replace"


def claim(run: Path, how: str) -> None:
    """Main rank, after every rank agreed on ``how`` (:func:`plan`): remove an earlier run's outputs when
    replacing, sweep temporary files of killed writers, and mark the folder as a run's."""
    run.mkdir(parents=True, exist_ok=True)
    if how == "replace":
        for sub, patterns in EARLIER_RUN:
            folder = run / sub
            for pattern in patterns:
                for path in folder.glob(pattern) if folder.is_dir() else ():
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink(missing_ok=True)
    sweep_temps(run)
    if how != "resume" or not isinstance(marker(run), RunMarker):  # a run of an older b3stream: upgraded
        write_json(run / MARKER, {"format": 1, "run_id": uuid.uuid4().hex, "created": time.time(),
                                  "pid": os.getpid(), "host": HOST})

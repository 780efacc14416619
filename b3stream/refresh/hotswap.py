"""Hot swap: the trainer's watch over a schedule folder, at step boundaries. It never waits for a miner,
except where refreshed mode bounds the staleness (``refresh.max_lag_steps``, :func:`wait_for_refresh`).

Rank 0 looks for a version strictly newer than the one training runs on (a corrupt, half-written or foreign
newer file is skipped, once, with a message; an older file is never taken, even when every newer one is
bad), broadcasts its answer, every rank loads that version, and only when all of them could, all swap at the
same step. The sampler then re-batches the ids not yet consumed this epoch along the new communities
(:meth:`b3stream.train.sampler.ScheduleSampler.swap`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.manifest import Manifest
from ..schedule import Schedule, ScheduleError, load_schedule, newest_schedule, version_path
from ..dist import DistInfo


class NotYet(ScheduleError):
    """A version that may be taken later, not now (see :attr:`ScheduleWatcher.accept`)."""


TRIES = 3  # reads of a version that failed on some rank before it is given up on (a transient fault retries)


class ScheduleWatcher:
    """Finds newer schedule versions in ``folder`` for the train split of ``manifest``.

    ``accept(schedule)``, when set, may refuse a version that loads: raising :class:`ScheduleError` rejects
    it for good, :class:`NotYet` passes it over this time only (the trainer defers a schedule mined from a
    snapshot of a later step than it has reached, as after a resume).
    """

    def __init__(self, folder: str | Path, manifest: Manifest, dist: DistInfo, say=print):
        """Collective when the default process group is NCCL: every rank must construct its watcher at the
        same point (the trainer does, right before the loop), since that is where the CPU group the
        watcher agrees on is made (:meth:`agree`)."""
        self.folder, self.manifest, self.dist, self.say = Path(folder), manifest, dist, say
        self.rejected: set[int] = set()
        self.failures: dict[int, int] = {}  # failed reads per version (an OSError, or on another rank)
        self.accept = None
        self.group = _cpu_group(dist)
        self.stop = 0  # the stop signal the ranks agreed on in a check or a wait (0: none; see check)

    def _reject(self, version: int, error: Exception) -> None:
        if isinstance(error, NotYet):
            return
        if isinstance(error, OSError) and not self._failed(version):
            self.say(f"schedule v{version} not read ({error}); will try again")
            return
        self.rejected.add(version)  # never read again; training goes on on what it has
        self.say(f"schedule v{version} not used: {error}")

    def _failed(self, version: int) -> bool:
        """Count a failed read of ``version``; True once it has failed :data:`TRIES` times."""
        self.failures[version] = self.failures.get(version, 0) + 1
        return self.failures[version] >= TRIES

    def agree(self, value: int | list[int], op) -> int | list[int]:
        """``value`` as rank 0 has it (op broadcast), the minimum over ranks (op min) or, of a list of
        integers, the elementwise maximum over ranks (op max).

        Runs at every watched step, so it stays off the GPU: a CPU tensor on the watcher's gloo group when
        the default group is NCCL (an NCCL collective plus ``.item()`` would make the host wait for every
        kernel queued so far, each step), on the default group when that is gloo already."""
        if self.dist.world_size == 1:
            return value
        import torch.distributed as tdist

        t = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.long)
        if op == "broadcast":
            tdist.broadcast(t, src=0, group=self.group)
        else:
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX if op == "max" else tdist.ReduceOp.MIN, group=self.group)
        return [int(v) for v in t.tolist()] if isinstance(value, list) else int(t.item())

    def _usable(self, schedule: Schedule) -> None:
        """Refuse (raise) a newer schedule that loads but could not be swapped in: a file whose name and
        content disagree on its version (rank 0 would announce one version and the others load another
        file), or one the sampler would refuse at the swap (not each id once, |B| not divisible by the
        world size), which would otherwise stop the trainer mid-run."""
        if schedule.version is None or schedule.path != version_path(self.folder, schedule.version):
            raise ScheduleError(f"{schedule.path}: holds version {schedule.version!r}, not the one its name says")
        schedule.check_trainable(self.manifest.split("train").n, self.dist.world_size)
        if self.accept is not None:
            self.accept(schedule)

    def _newest(self, current: int, stamp: dict) -> Schedule | None:
        """Rank 0's pick: the newest usable version above ``current`` (bad ones rejected on the way), or
        None, also when the folder itself cannot be listed just now (removed, unmounted): the other ranks
        are waiting for this answer, so nothing may raise here."""
        try:
            return newest_schedule(self.folder, expect=stamp, above=current, skip=self.rejected,
                                   on_reject=self._reject, check=self._usable)
        except Exception as e:  # noqa: BLE001 (see the docstring)
            self.say(f"schedule folder {self.folder} not read: {e}")
            return None

    def _load(self, version: int, stamp: dict) -> Schedule | None:
        """``version`` as rank 0 announced it, on another rank; None (with a message) if it fails here for
        any reason: removed or altered between rank 0's look and ours, or unreadable to this process."""
        try:
            schedule = load_schedule(version_path(self.folder, version), expect=stamp)
            self._usable(schedule)
            return schedule
        except Exception as e:  # noqa: BLE001 (a file must never stop training; see check)
            self.say(f"schedule v{version} not used on rank {self.dist.rank}: {e}")
            return None

    def check(self, current: int | None, stop: int = 0) -> Schedule | None:
        """A newer schedule every rank has loaded, or None. Collective: call on every rank at the same step.

        A newer version that fails to load or to check, for whatever reason, is skipped (once, with a
        message) and training goes on: it must never raise out of here. Rank 0 decides which version to
        try; a version any rank could not load is skipped on all of them.

        ``stop``: this rank's stop flag (the signal it caught, 0 for none), combined with the other ranks' in
        the same collective that shares rank 0's answer; when any rank has one, :attr:`stop` is set on every
        rank and nothing is swapped (the trainer stops after this step)."""
        current = -1 if current is None else int(current)
        stamp = self.manifest.stamp("train")
        schedule = self._newest(current, stamp) if self.dist.is_main else None
        # one all-reduce (max): rank 0's answer (the others give -1, below any answer) and the ranks' stop flags
        newest, stop = self.agree([schedule.version if schedule is not None else -1, int(stop)], "max")
        self.stop = max(self.stop, stop)
        if newest <= current or self.stop:
            return None
        if not self.dist.is_main:  # rank 0 has it loaded already
            schedule = self._load(newest, stamp)
        if self.agree(int(schedule is not None), "min") == 0:
            # Some rank could not read it (a file system hiccup, a file replaced between the reads): try
            # again at the next check, and give up on it only after TRIES failures. Every rank counts alike.
            if self._failed(newest):
                self.rejected.add(newest)
                self.say(f"schedule v{newest} not used: a rank could not load it {TRIES} times")
            return None
        return schedule


def _cpu_group(dist: DistInfo):
    """The process group the watcher agrees on: None (the default group) on one rank or when the default
    group is gloo; else a gloo group over all ranks, made here. ``new_group`` is collective, hence its
    place in the constructor, which every rank runs at the same point. It keeps the default group's
    timeout: a rank may wait in a poll while rank 0 writes a snapshot."""
    if dist.world_size == 1 or dist.backend != "nccl":
        return None
    import torch.distributed as tdist

    return tdist.new_group(backend="gloo", timeout=_default_timeout(dist))


def _default_timeout(dist: DistInfo):
    """The default group's collective timeout (``DEEPSPEED_TIMEOUT`` and the like set it), or None (torch's
    default) where this torch does not tell."""
    import torch.distributed as tdist

    try:
        return tdist.distributed_c10d._get_default_group()._get_backend(dist.device).options._timeout
    except Exception:  # noqa: BLE001 (private API: absent or renamed in another torch)
        return None


def source_step(schedule: Schedule | None) -> int:
    """The step of the snapshot a refreshed schedule answers (mined from that student, or with the teacher
    under ``refresh.model: teacher``); -1 for a schedule mined before training."""
    source = schedule.meta.get("source_step") if schedule is not None else None
    return -1 if source is None else int(source)


def refresh_due(snapshots: list[int], step: int, max_lag: int | None) -> int | None:
    """The newest snapshot step s with s + ``max_lag`` <= ``step``: a schedule mined from it (or a later
    snapshot) must be in use by now. None when nothing is due or staleness is unbounded."""
    if max_lag is None:
        return None
    due = [s for s in snapshots if s + max_lag <= step]
    return max(due) if due else None


def wait_for_refresh(watcher: ScheduleWatcher, version: int | None, found: Schedule | None, need: int,
                     poll_seconds: float, timeout: float, miner=None, say=print,
                     stop=None, skipped=None) -> tuple[Schedule | None, float]:
    """Block until the schedule folder holds a version mined from the snapshot of step ``need`` or later.

    Every rank calls this at the same step and polls in lockstep (each poll is the watcher's collective
    check; the decision to stop waiting is rank 0's, broadcast). ``found``: a newer version already seen
    this step. Returns the newest version found (None: none newer than ``version``) and the seconds waited;
    gives up, saying so, after ``timeout`` seconds or when the spawned ``miner`` has given up restarting.
    ``stop``: a callable giving this rank's stop flag (a signal caught, 0 for none); when any rank has one,
    the wait ends at once, with ``watcher.stop`` set on every rank. ``skipped(step)``: on rank 0, whether the
    miner decided not to re-mine that snapshot (``refresh.when: bound`` saw no drift); then no schedule is
    coming for it, and the wait ends.
    """
    t0 = time.monotonic()
    say(f"waiting for the schedule mined from the snapshot of step {need} (refresh.max_lag_steps)")
    while source_step(found) < need:
        late = time.monotonic() - t0 > timeout
        not_coming = bool(watcher.dist.is_main and skipped is not None and skipped(need))
        give_up = int(watcher.dist.is_main and (late or not_coming or bool(miner is not None and miner.gave_up)))
        # rank 0's decision (the others give 0) and every rank's stop flag, in one all-reduce (max)
        give_up, stopped = watcher.agree([give_up, int(stop()) if stop is not None else 0], "max")
        watcher.stop = max(watcher.stop, stopped)
        if watcher.stop:
            break
        if give_up:
            why = ("the miner found no drift and keeps the schedule in use" if not_coming else
                   "refresh.wait_timeout" if late else "the miner gave up")
            say(f"stopped waiting for the snapshot of step {need} after {time.monotonic() - t0:.0f} s ({why}); "
                "training goes on")
            break
        time.sleep(poll_seconds)
        if miner is not None:
            miner.check()  # restarts a miner that died while we wait
        newer = watcher.check(found.version if found is not None else version)
        if newer is not None:
            found = newer
    return found, time.monotonic() - t0

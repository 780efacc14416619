"""Hot swap: the trainer's watch over a schedule folder, at step boundaries. It never waits for a miner,
except where refreshed mode bounds the staleness (``refresh.max_lag_steps``, :func:`wait_for_refresh`).

Rank 0 looks for a version strictly newer than the one training runs on (a corrupt, half-written or foreign
newer file is skipped, once, with a message; an older file is never taken, even when every newer one is
bad) and announces it; every rank loads that version, and only when all of them have, all swap at the same
step. The sampler then re-batches the ids not yet consumed this epoch along the new communities
(:meth:`b3stream.train.sampler.ScheduleSampler.swap`).

Off the step loop: the folder listing, the parse and the SHA-256 of a new version (and its checks) run on a
background thread of each rank (:class:`_Loader`); at a step boundary the loop only asks whether its loader
is ready, in one all-reduce of four integers (rank 0's announcement, the ranks' readiness, a failed read,
the stop flags). A version is announced at one check and swapped at a later one, once every rank reports
it loaded.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..data.manifest import Manifest
from ..schedule import Schedule, ScheduleError, list_versions, load_schedule, version_path
from ..dist import DistInfo


class NotYet(ScheduleError):
    """A version that may be taken later, not now (see :attr:`ScheduleWatcher.accept`)."""


TRIES = 3  # reads of a version that failed on some rank before it is given up on (a transient fault retries)


class ScheduleWatcher:
    """Finds newer schedule versions in ``folder`` for the train split of ``manifest``.

    ``accept(schedule)``, when set, may refuse a version that loads: raising :class:`ScheduleError` rejects
    it for good, :class:`NotYet` passes it over this time only (the trainer defers a schedule mined from a
    snapshot of a later step than it has reached, as after a resume). Rank 0's loader asks it when it picks a
    version, and every rank asks it again at the swap (its answer depends on the trainer's step and epoch).

    ``background``: the loading runs on a thread of its own (the trainer's case), started at the first
    :meth:`check`; False runs the same work inline at the start of each check (tests of the decisions).
    """

    def __init__(self, folder: str | Path, manifest: Manifest, dist: DistInfo, say=print, background: bool = True):
        """Collective when the default process group is NCCL: every rank must construct its watcher at the
        same point (the trainer does, right before the loop), since that is where the CPU group the
        watcher agrees on is made (:meth:`agree`)."""
        self.folder, self.manifest, self.dist, self.say = Path(folder), manifest, dist, say
        self.stamp = manifest.stamp("train")
        self.rejected: set[int] = set()
        self.failures: dict[int, int] = {}  # failed reads per version (an OSError, or on another rank)
        self.accept = None
        self.group = _cpu_group(dist)
        self.stop = 0  # the stop signal the ranks agreed on in a check or a wait (0: none; see check)
        self.current = -1  # the version training runs on, as of the last check (the loader looks above it)
        self.target = -1  # the version rank 0 announced at the last check; every rank loads it
        self.loader = _Loader(self, background)

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

    def _verified(self, schedule: Schedule) -> None:
        """Refuse (raise) a newer schedule that loads but could not be swapped in whatever the trainer's
        position: a file whose name and content disagree on its version (rank 0 would announce one version
        and the others load another file), or one the sampler would refuse at the swap (not each id once,
        |B| not divisible by the world size), which would otherwise stop the trainer mid-run."""
        if schedule.version is None or schedule.path != version_path(self.folder, schedule.version):
            raise ScheduleError(f"{schedule.path}: holds version {schedule.version!r}, not the one its name says")
        schedule.check_trainable(self.manifest.split("train").n, self.dist.world_size)

    def _usable(self, schedule: Schedule) -> None:
        """:meth:`_verified`, then :attr:`accept` (the trainer's position)."""
        self._verified(schedule)
        if self.accept is not None:
            self.accept(schedule)

    def check(self, current: int | None, stop: int = 0) -> Schedule | None:
        """A newer schedule every rank has loaded, or None. Collective: call on every rank at the same step.

        Asks the loaders where they are (one all-reduce of four integers on several ranks, none on one) and
        swaps only a version rank 0 announced at an earlier check and every rank has loaded since (on one
        rank: as soon as the loader has it). The listing, the parse and the checksum ran on the loaders'
        threads. A newer version that fails to load or to check, for whatever reason, is skipped (once, with
        a message) and training goes on: it must never raise out of here. A version some rank could not load
        is tried again, and given up on all of them after :data:`TRIES` failures.

        ``stop``: this rank's stop flag (the signal it caught, 0 for none), combined with the other ranks' in
        the same collective; when any rank has one, :attr:`stop` is set on every rank and nothing is swapped
        (the trainer stops after this step)."""
        current = -1 if current is None else int(current)
        self.current = current
        loader = self.loader
        loader.poke()  # a listing / a load on the loader's thread (inline without one)
        pick = loader.pick if self.dist.is_main else None
        announce = pick.version if pick is not None and pick.version > current and \
            pick.version not in self.rejected else -1
        if self.dist.world_size == 1:
            self.target = announce  # nothing to tell another rank: ready as soon as loaded
        # what this rank reports ready is what it swaps to: held here, whatever its loader does meanwhile
        held = loader.loaded.get(self.target) if self.target > current else None
        ready = self.target if held is not None else -1
        failed = loader.failed if loader.failed >= 0 and loader.failed == self.target else -1
        # one all-reduce (max): rank 0's announcement (the others give -1), the lowest readiness (as -ready),
        # a failed read of the target, and the ranks' stop flags
        announced, low, failed, stop = self.agree([announce, -ready, failed, int(stop)], "max")
        self.stop = max(self.stop, stop)
        target, self.target = self.target, announced
        if self.stop:
            return None
        if failed >= 0 and failed == target:
            # Some rank could not read it (a file system hiccup, a file replaced between the reads): every rank
            # counts alike, that rank reads it again, and all give up on it after TRIES failures.
            if self._failed(failed):
                self.rejected.add(failed)
                self.target = -1
                self.say(f"schedule v{failed} not used: a rank could not load it {TRIES} times")
            loader.retry(failed)
            return None
        if announced != target:  # a new announcement: the other ranks' loaders load it now
            loader.poke()
            return None
        if announced <= current or -low != announced:
            return None
        schedule = held
        try:
            if self.accept is not None:  # at the swap, on every rank alike: the trainer's position now
                self.accept(schedule)
        except NotYet:
            return None
        except Exception as e:  # noqa: BLE001 (a schedule must never stop training)
            self.rejected.add(announced)
            self.target = -1
            self.say(f"schedule v{announced} not used: {e}")
            return None
        loader.forget(announced)
        return schedule

    def settle(self, timeout: float = 60.0) -> bool:
        """Wait until the loader has looked at the folder (rank 0) or loaded the announced version (the
        others) as they are now; False if it has not within ``timeout`` seconds. For tests and tools: the
        trainer never waits for its loader."""
        return self.loader.settle(timeout)

    def close(self) -> None:
        """Stop the loader's thread (it is a daemon thread, so a process may also just exit)."""
        self.loader.close()


class _Loader:
    """A rank's loading of schedule versions, off the step loop: rank 0 lists the folder and loads and
    verifies the newest usable version above the current one (its :attr:`pick`); another rank loads the
    version rank 0 announced (the watcher's ``target``). Verified schedules wait in :attr:`loaded` until
    swapped in; :attr:`failed` is a version this rank could not load, reported at the next check.

    The work runs when poked (each check pokes it, so a listing follows every watched step, coalesced:
    one in flight at most), on a daemon thread started at the first poke, or inline where ``background`` is
    False. It never raises: a schedule folder is written by other processes while it is read."""

    def __init__(self, watcher: ScheduleWatcher, background: bool):
        self.w, self.background = watcher, background
        self.pick: Schedule | None = None
        self.loaded: dict[int, Schedule] = {}
        self.failed = -1
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()  # loaded: added and pruned on the loader's thread, pruned on the loop's
        self.cond = threading.Condition()
        self.asked = self.done = 0
        self.closed = False
        self.thread_name = "b3stream-schedule-loader"

    def poke(self) -> None:
        if not self.background:
            self._work()
            return
        with self.cond:
            if self.thread is None and not self.closed:
                self.thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
                self.thread.start()
            self.asked += 1
            self.cond.notify_all()

    def settle(self, timeout: float) -> bool:
        if not self.background:
            self._work()
            return True
        self.poke()
        with self.cond:
            wanted = self.asked
            return self.cond.wait_for(lambda: self.done >= wanted or self.closed, timeout)

    def retry(self, version: int) -> None:
        """Read ``version`` again (a rank failed to; not given up yet)."""
        if self.failed == version:
            self.failed = -1
        self.poke()

    def forget(self, version: int) -> None:
        """``version`` was swapped in: drop it and everything older."""
        self._prune(version)
        if self.pick is not None and self.pick.version <= version:
            self.pick = None

    def _prune(self, version: int) -> None:
        with self.lock:
            for v in [v for v in self.loaded if v <= version]:
                del self.loaded[v]

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.asked > self.done or self.closed)
                if self.closed:
                    return
                asked = self.asked
            self._work()
            with self.cond:
                self.done = asked
                self.cond.notify_all()

    def _work(self) -> None:
        try:
            self._find() if self.w.dist.is_main else self._fetch()
        except Exception as e:  # noqa: BLE001 (the folder is written while it is read: never stop the trainer)
            self.w.say(f"schedule folder {self.w.folder} not read: {e}")

    def _load(self, version: int) -> Schedule:
        schedule = self.loaded.get(version)
        if schedule is None:
            schedule = load_schedule(version_path(self.w.folder, version), expect=self.w.stamp)
            self.w._verified(schedule)
            with self.lock:
                self.loaded[version] = schedule
        return schedule

    def _find(self) -> None:
        """Rank 0's pick: the newest usable version above the current one (bad ones rejected on the way,
        each once), or None; also None when the folder cannot be listed just now (removed, unmounted)."""
        w, current = self.w, self.w.current
        pick = None
        for version in reversed(list_versions(w.folder)):
            if version <= current:
                break
            if version in w.rejected:
                continue
            try:
                schedule = self._load(version)
                if w.accept is not None:
                    w.accept(schedule)
                pick = schedule
                break
            except Exception as e:  # noqa: BLE001 (see the class docstring)
                if not isinstance(e, NotYet):
                    with self.lock:
                        self.loaded.pop(version, None)
                w._reject(version, e)
        self.pick = pick
        self._prune(current)

    def _fetch(self) -> None:
        """Another rank: load the version rank 0 announced, once (again after a failure reported)."""
        w, version = self.w, self.w.target
        if version < 0 or version <= w.current or version in self.loaded or self.failed == version:
            return
        try:
            self._load(version)
        except Exception as e:  # noqa: BLE001 (a file must never stop training; see ScheduleWatcher.check)
            self.failed = version
            w.say(f"schedule v{version} not used on rank {w.dist.rank}: {e}")


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

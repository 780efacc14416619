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
from .distributed import DistInfo


class ScheduleWatcher:
    """Finds newer schedule versions in ``folder`` for the train split of ``manifest``."""

    def __init__(self, folder: str | Path, manifest: Manifest, dist: DistInfo, say=print):
        self.folder, self.manifest, self.dist, self.say = Path(folder), manifest, dist, say
        self.rejected: set[int] = set()

    def _reject(self, version: int, error: Exception) -> None:
        self.rejected.add(version)  # never read again; training goes on on what it has
        self.say(f"schedule v{version} not used: {error}")

    def agree(self, value: int, op) -> int:
        """``value`` as rank 0 has it (op broadcast) or the minimum over ranks (op min)."""
        if self.dist.world_size == 1:
            return value
        import torch.distributed as tdist

        dev = self.dist.device if self.dist.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([value], dtype=torch.long, device=dev)
        if op == "broadcast":
            tdist.broadcast(t, src=0)
        else:
            tdist.all_reduce(t, op=tdist.ReduceOp.MIN)
        return int(t.item())

    def check(self, current: int | None) -> Schedule | None:
        """A newer schedule every rank has loaded, or None. Collective: call on every rank at the same step."""
        current = -1 if current is None else int(current)
        stamp = self.manifest.stamp("train")
        schedule = newest_schedule(self.folder, expect=stamp, above=current, skip=self.rejected,
                                   on_reject=self._reject) if self.dist.is_main else None
        newest = self.agree(schedule.version if schedule is not None else -1, "broadcast")
        if newest <= current:
            return None
        ok = 1
        if not self.dist.is_main:  # rank 0 has it loaded already
            try:
                schedule = load_schedule(version_path(self.folder, newest), expect=stamp)
            except (ScheduleError, OSError):  # removed or altered between rank 0's look and ours
                schedule, ok = None, 0
        if self.agree(ok, "min") == 0:
            self.rejected.add(newest)
            return None
        return schedule


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
                     poll_seconds: float, timeout: float, miner=None, say=print) -> tuple[Schedule | None, float]:
    """Block until the schedule folder holds a version mined from the snapshot of step ``need`` or later.

    Every rank calls this at the same step and polls in lockstep (each poll is the watcher's collective
    check; the decision to stop waiting is rank 0's, broadcast). ``found``: a newer version already seen
    this step. Returns the newest version found (None: none newer than ``version``) and the seconds waited;
    gives up, saying so, after ``timeout`` seconds or when the spawned ``miner`` has given up restarting.
    """
    t0 = time.monotonic()
    say(f"waiting for the schedule mined from the snapshot of step {need} (refresh.max_lag_steps)")
    while source_step(found) < need:
        late = time.monotonic() - t0 > timeout
        stop = watcher.agree(int(late or bool(miner is not None and miner.gave_up)), "broadcast")
        if stop:
            say(f"stopped waiting for the snapshot of step {need} after {time.monotonic() - t0:.0f} s ("
                + ("refresh.wait_timeout" if late else "the miner gave up") + "); training goes on")
            break
        time.sleep(poll_seconds)
        if miner is not None:
            miner.check()  # restarts a miner that died while we wait
        newer = watcher.check(found.version if found is not None else version)
        if newer is not None:
            found = newer
    return found, time.monotonic() - t0

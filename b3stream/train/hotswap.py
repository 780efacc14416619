"""Hot swap: the trainer's watch over a schedule folder, at step boundaries, never waiting for a miner.

Rank 0 looks for a version strictly newer than the one training runs on (a corrupt, half-written or foreign
newer file is skipped, once, with a message; an older file is never taken, even when every newer one is
bad), broadcasts its answer, every rank loads that version, and only when all of them could, all swap at the
same step. The sampler then re-batches the ids not yet consumed this epoch along the new communities
(:meth:`b3stream.train.sampler.ScheduleSampler.swap`).
"""

from __future__ import annotations

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

    def _agree(self, value: int, op) -> int:
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
        newest = self._agree(schedule.version if schedule is not None else -1, "broadcast")
        if newest <= current:
            return None
        ok = 1
        if not self.dist.is_main:  # rank 0 has it loaded already
            try:
                schedule = load_schedule(version_path(self.folder, newest), expect=stamp)
            except (ScheduleError, OSError):  # removed or altered between rank 0's look and ours
                schedule, ok = None, 0
        if self._agree(ok, "min") == 0:
            self.rejected.add(newest)
            return None
        return schedule

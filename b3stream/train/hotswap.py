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
from ..schedule import Schedule, ScheduleError, list_versions, load_schedule, version_path
from .distributed import DistInfo


class ScheduleWatcher:
    """Finds newer schedule versions in ``folder`` for the train split of ``manifest``."""

    def __init__(self, folder: str | Path, manifest: Manifest, dist: DistInfo, say=print):
        self.folder, self.manifest, self.dist, self.say = Path(folder), manifest, dist, say
        self.rejected: set[int] = set()

    def _newest_good(self, current: int) -> int:
        """Rank 0: the newest loadable version above ``current`` (-1: none)."""
        for version in reversed(list_versions(self.folder)):
            if version <= current:
                break
            if version in self.rejected:
                continue
            try:
                load_schedule(version_path(self.folder, version), expect=self.manifest.stamp("train"))
                return version
            except (ScheduleError, OSError) as e:  # never read again; training goes on on what it has
                self.rejected.add(version)
                self.say(f"schedule v{version} not used: {e}")
        return -1

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
        newest = self._newest_good(current) if self.dist.is_main else -1
        newest = self._agree(newest, "broadcast")
        if newest <= current:
            return None
        try:
            schedule = load_schedule(version_path(self.folder, newest), expect=self.manifest.stamp("train"))
            ok = 1
        except (ScheduleError, OSError):  # removed or altered between rank 0's look and ours
            schedule, ok = None, 0
        if self._agree(ok, "min") == 0:
            self.rejected.add(newest)
            return None
        return schedule

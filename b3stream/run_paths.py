"""The run folder's paths that a refreshed-mode trainer and its miner both use.

They meet only through files under the run folder ``RUN`` (student snapshots one way, schedule versions the
other, the miner's settings and status beside them), so both sides name those files here, on the ground
floor: the trainer (:mod:`b3stream.train`, :mod:`b3stream.refresh.trainer`) and the miner
(:mod:`b3stream.refresh.miner`) import this module, and it imports nothing of b3stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SNAPSHOTS = "snapshots"


@dataclass(frozen=True)
class RunPaths:
    """The files through which a refreshed-mode trainer and its miner meet, under the run folder ``RUN``:
    snapshots one way, schedules the other, and the miner's settings and status."""

    run: Path

    @property
    def snapshots(self) -> Path:
        return self.run / SNAPSHOTS

    @property
    def schedules(self) -> Path:  # every schedule version of the run: the initial one and the refreshed ones
        return self.run / "schedules"

    @property
    def refresh(self) -> Path:
        return self.run / "refresh"

    @property
    def mine_config(self) -> Path:  # the miner's MineConfig (YAML)
        return self.refresh / "mine.yaml"

    @property
    def refresh_config(self) -> Path:  # the RefreshConfig (JSON)
        return self.refresh / "refresh.json"

    @property
    def status(self) -> Path:  # where the miner is (JSON)
        return self.refresh / "status.json"

    @property
    def finished(self) -> Path:  # written by the trainer at its end: miners exit
        return self.refresh / "finished"

    @property
    def log(self) -> Path:  # a spawned miner's stdout and stderr
        return self.refresh / "miner.log"

    @property
    def lease(self) -> Path:  # the snapshot a miner is mining from: never pruned while the miner lives
        return self.refresh / "lease.json"

    @property
    def run_config(self) -> Path:  # the trainer's settled TrainConfig: the student snapshots must match
        return self.run / "config.yaml"

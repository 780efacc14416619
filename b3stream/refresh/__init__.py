"""Refreshed mode: the schedule re-mined during training from student snapshots, and hot-swapped in.

Two sides that meet only through files in the run folder (snapshots one way, :mod:`b3stream.snapshot`;
schedule versions the other, :mod:`b3stream.schedule`); neither imports the other's module:

- ``miner.py``: the background miner (``b3stream refresh``): waits for a snapshot, re-runs the mining stages
  (:mod:`b3stream.mining`) on it, publishes the next schedule version;
- ``drift.py``: ``refresh.when: bound``, the miner's check whether the schedule in use has gone stale;
- ``trainer.py``: the trainer's side: the run folder the miner reads, snapshots at step ends, the spawned
  miner, and :class:`~b3stream.refresh.trainer.StepEnd`, the loop's one call between steps;
- ``hotswap.py``: the trainer's watch over the schedule folder and the swap at a step boundary on every rank.

Dependencies go one way: this package uses the ground floor (config, files, schedule, snapshot, dist) and, on
the miner's side, :mod:`b3stream.mining`; the training recipe (:mod:`b3stream.train`) uses ``trainer.py`` and
``hotswap.py``. Nothing here imports :mod:`b3stream.train`, and nothing is imported eagerly.
"""

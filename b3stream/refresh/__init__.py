"""Refreshed mode: the schedule re-mined during training from student snapshots, and hot-swapped in.

Two sides that meet only through files in the run folder (:class:`b3stream.run_paths.RunPaths`: snapshots
one way, :mod:`~b3stream.refresh.snapshot`; schedule versions the other, :mod:`b3stream.schedule`); neither
imports the other's module:

- ``miner.py``: the background miner (``b3stream refresh``): waits for a snapshot, re-runs the mining stages
  (:mod:`b3stream.mining`) on it, publishes the next schedule version;
- ``drift.py``: ``refresh.when: bound``, the miner's check whether the schedule in use has gone stale;
- ``snapshot.py``: student snapshots: the trainer's capture and background write, the listing, the miner's
  pin, the digest check and the loading into the run's student (both sides use it; ground floor only);
- ``trainer.py``: the trainer's side: the run folder the miner reads, snapshots at step ends, the spawned
  miner, and :class:`~b3stream.refresh.trainer.BetweenSteps`, the loop's one call between steps;
- ``hotswap.py``: the trainer's watch over the schedule folder, agreed on by every rank;
- ``swap.py``: the swap itself: which versions a running epoch may continue on, and the re-cut of the ids
  to come into the epoch's steps left (the sampler's plans are made with it).

Dependencies go one way: this package uses the ground floor (config, files, run_paths, schedule, dist) and,
on the miner's side, :mod:`b3stream.mining`, which never imports it (the miner hands the embed stage the
snapshot it reads, :func:`~b3stream.refresh.miner.snapshot_model`); the training recipe (:mod:`b3stream.train`)
uses ``trainer.py``, ``hotswap.py`` and ``swap.py``. Nothing here imports :mod:`b3stream.train`, and nothing
is imported eagerly.
"""

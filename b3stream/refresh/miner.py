"""Refreshed mode's background miner: student snapshots in, schedule versions out.

    b3stream refresh --run RUN            # beside a running `b3stream train ... mode=refreshed refresh.spawn=false`
    torchrun --nproc_per_node 4 -m b3stream refresh RUN   # the embedding split over 4 processes / GPUs
    python -m b3stream refresh --run RUN  # what the trainer starts itself with refresh.spawn: true

The miner waits for a new student snapshot in ``RUN/snapshots/`` (:mod:`b3stream.snapshot`), embeds the train
split with it (``model: student``) or with the fixed teacher (``model: teacher``), then runs rank -> partition
-> schedule with the same stage code and strategy as static mining (:func:`b3stream.mining.pipeline.run_all`),
and publishes the next schedule version into ``RUN/schedules/``, where the trainer picks it up at a step
boundary. It never blocks the trainer: they meet only through files, each written under a temporary name and
renamed into place.

Everything the miner needs is in the run folder, written by the trainer when it starts:

    RUN/refresh/mine.yaml     the MineConfig: the running schedule's strategy and parameters + refresh.mine
    RUN/refresh/refresh.json  the RefreshConfig (model, device, threads, niceness, poll interval)
    RUN/refresh/mine/         the stage outputs (embeddings/, rank/, partition/), reused between refreshes
    RUN/refresh/status.json   where the miner is: state (waiting, embed, rank, partition, schedule), snapshot
    RUN/refresh/miner.lock    held (flock) by the one miner serving the run: a second miner is refused, so two
                              never read each other's half-written stage files in RUN/refresh/mine/
    RUN/refresh/finished      written by the trainer at its end: a standalone miner exits when it appears

A snapshot whose weights do not match the digest it was written with, or that does not load, is refused
(logged in the status as ``rejected``) and the miner waits for the next one.

The ids the trainer has already trained on in the snapshot's epoch (``trained.npy`` in the snapshot) are
ranked and partitioned apart from the rest (MineConfig ``trained_ids``): after the swap the trainer skips
them, so the rest of the epoch is made of whole communities mined from full neighbour lists of the ids still
to come, instead of fragments of communities or a graph thinned by edges to ids already trained.

Each refresh uses seed ``seed + snapshot step``, so even a teacher refresh (same embeddings) draws new
communities and a new batch order. With ``strategy: gcbs`` and a snapshot every epoch this is GCBS as its paper
describes it (re-embedded with the current model each epoch), except that training does not stop for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

from ..config import EncoderConfig, MineConfig, RefreshConfig, default_miner_threads, from_dict, load_config
from ..files import read_json, write_json
from ..snapshot import RunPaths, Snapshot, latest_snapshot

STOP = -1  # announced to the other processes under a launcher: no more snapshots
PROBE_HISTORY = 500  # refresh.when: bound decisions kept in the status file


class MinerBusy(RuntimeError):
    """Another miner serves the run already."""


def hold_lock(path: Path) -> int:
    """Take the exclusive lock ``path`` for the life of this process (the kernel drops it when the process
    dies, SIGKILL included); returns its file descriptor. :class:`MinerBusy` names the holder if taken."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MinerBusy(f"another miner (pid {holder}) serves {path.parent.parent} already; two miners of one run "
                        "would read each other's partial files. Stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


class Miner:
    """One run's miner. ``model``, ``device``, ``threads``, ``nice``, ``poll`` default to RUN's refresh.json."""

    def __init__(self, run: str | Path, model: str | None = None, device: str | None = None,
                 poll: float | None = None, parent_pid: int | None = None, progress: bool = False):
        self.run = Path(run)
        self.paths = RunPaths(self.run)
        if not self.paths.mine_config.is_file():
            raise FileNotFoundError(f"{self.paths.mine_config}: no miner configuration; is {run} the folder of a "
                                    "run started with mode=refreshed?")
        settings = from_dict(RefreshConfig, read_json(self.paths.refresh_config) or {},
                             where=str(self.paths.refresh_config))
        self.settings = settings
        self.model = model or settings.model
        if self.model not in ("student", "teacher"):
            raise ValueError(f"model must be student or teacher, got {self.model!r}")
        self.device = device or settings.device
        self.poll = poll if poll is not None else settings.poll_seconds
        self.parent_pid = parent_pid
        self.progress = progress
        self.status: dict = {"pid": os.getpid(), "state": "starting", "refreshes": 0}

    # -- status and stop conditions ---------------------------------------------------------------
    def _report(self, **fields) -> None:
        self.status.update(fields, updated=time.time())
        write_json(self.paths.status, self.status)

    def should_stop(self) -> bool:
        """The run finished, or the trainer that spawned us is gone (a crash must not orphan a miner)."""
        if self.paths.finished.exists():
            return True
        if self.parent_pid is not None:
            try:
                os.kill(self.parent_pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return False

    def _stage(self, name: str) -> None:
        if self.should_stop():
            raise SystemExit(0)  # between stages: stage outputs are complete or absent, never partial
        self._report(state=name)

    # -- one refresh ------------------------------------------------------------------------------
    def config_for(self, snapshot: Snapshot) -> MineConfig:
        cfg = load_config(MineConfig, self.paths.mine_config)
        return dataclasses.replace(
            cfg, out=str(self.paths.refresh / "mine"), schedule_dir=str(self.paths.schedules), version=None,
            seed=cfg.seed + snapshot.step, device=self.device, source_step=snapshot.step,
            source_epoch=int(snapshot.meta.get("epoch", 0)),
            teacher_snapshot=str(snapshot.path) if self.model == "student" else None,
            trained_ids=str(snapshot.trained_ids) if snapshot.trained_ids else None)

    def refresh(self, snapshot: Snapshot) -> Path | None:
        """Mine from ``snapshot`` and publish the next schedule version; returns its path. With ``refresh.when:
        bound``, only when the schedule in use has drifted (:mod:`b3stream.refresh.drift`); None when it has not."""
        from ..dist import broadcast_int
        from ..mining.pipeline import run_all
        from ..snapshot import pin_snapshot

        # Pinned before anything of it is read: the trainer prunes old snapshots, and this refresh may
        # outlast several of its snapshot intervals (a GPU trainer, a large split).
        pin_snapshot(self.run, snapshot.step)
        try:
            if not (snapshot.path / "snapshot.json").is_file():  # pruned just before the pin
                raise FileNotFoundError(snapshot.path)
            if self.settings.when == "bound" and not self._drifted(snapshot):
                return None
            broadcast_int(snapshot.step)  # under a launcher: the other processes embed their share of it
            t0 = time.perf_counter()
            self._report(state="embed", snapshot_step=snapshot.step)
            cfg = self.config_for(snapshot)
            path = run_all(cfg, progress=self.progress, on_stage=self._stage)
        finally:
            pin_snapshot(self.run, None)
        if self.settings.when == "bound":
            self._reference_from_refresh(path, cfg, snapshot)
        self._report(state="waiting", last_published=str(path), last_snapshot_step=snapshot.step,
                     refreshes=self.status["refreshes"] + 1, last_seconds=round(time.perf_counter() - t0, 3))
        return path

    # -- refresh.when: bound ----------------------------------------------------------------------
    @property
    def probe_path(self) -> Path:
        return self.paths.refresh / "probe.json"

    def _drifted(self, snapshot: Snapshot) -> bool:
        """Embed the probe of the schedule in use with ``snapshot``; True when its bound rose by at least
        ``refresh.bound_drift`` over the reference (:mod:`b3stream.refresh.drift`). Reported in the status."""
        from .drift import Probe, embed_probe
        from ..schedule import newest_schedule
        from ..snapshot import load_snapshot_encoder, verify_snapshot

        current = newest_schedule(self.paths.schedules)
        if current is None:
            return True
        mine = load_config(MineConfig, self.paths.mine_config)
        K, tau = int(current.meta.get("K") or mine.K), mine.quality_temperature
        self._report(state="probe", snapshot_step=snapshot.step)
        probe = Probe.load(self.probe_path, current)
        if probe is None:  # no reference yet: the model that mined the schedule in use, where it is known
            probe = Probe.of(current, self.settings.probe_batches, seed=mine.seed)
            teacher = current.meta.get("teacher") if current.meta.get("source_step") is None else None
            if teacher is not None:
                from ..encoder import Encoder

                encoder = Encoder(from_dict(EncoderConfig, teacher, where="schedule teacher"), trainable=False)
                probe.reference = probe.bound(*embed_probe(encoder, mine.data, probe.ids), K, tau)
                probe.save(self.probe_path)
        verify_snapshot(snapshot)
        encoder = load_snapshot_encoder(snapshot)
        now = probe.bound(*embed_probe(encoder, mine.data, probe.ids, mine.embed_batch_size), K, tau)
        if probe.reference is None:  # nothing known of the schedule's own model: this snapshot is the reference
            probe.reference = now
            probe.save(self.probe_path)
        drift = now - probe.reference
        due = drift >= self.settings.bound_drift
        decision = {"snapshot_step": snapshot.step, "version": probe.version, "bound": round(now, 5),
                    "reference": round(probe.reference, 5), "drift": round(drift, 5), "refresh": due}
        # the last decisions stay in the status (bounded: one per snapshot over a long run), for the record
        history = (self.status.get("probes") or [])[-(PROBE_HISTORY - 1):] + [decision]
        self.status["skipped"] = self.status.get("skipped", 0) + (not due)
        self._report(probe=decision, probes=history)
        print(f"b3stream refresh: snapshot step {snapshot.step}: probe bound {now:.4f} vs {probe.reference:.4f} when "
              f"v{probe.version} was mined (drift {drift:+.4f}, threshold {self.settings.bound_drift:g}): "
              + ("refreshing" if due else "skipped"), flush=True)
        return due

    def _reference_from_refresh(self, path: Path, cfg: MineConfig, snapshot: Snapshot) -> None:
        """The new schedule's probe and its reference bound under the snapshot that mined it: read from the
        miner's stage folder when every row there is the snapshot's; embedded anew when the rows of ids
        already trained were kept from an earlier model (a mid-epoch refresh), since the probe's batches
        include theirs."""
        from .drift import Probe, embed_probe
        from ..mining.embed import load_embeddings
        from ..schedule import load_schedule
        from ..snapshot import load_snapshot_encoder

        schedule = load_schedule(path)
        emb = load_embeddings(Path(cfg.out) / "embeddings")
        probe = Probe.of(schedule, self.settings.probe_batches, seed=cfg.seed)
        K = int(schedule.meta.get("K") or cfg.K)
        if emb.record.get("kept"):
            vectors = embed_probe(load_snapshot_encoder(snapshot), cfg.data, probe.ids, cfg.embed_batch_size)
        else:
            vectors = emb.queries[probe.ids], emb.positives[probe.ids]
        probe.reference = probe.bound(*vectors, K, cfg.quality_temperature)
        probe.save(self.probe_path)

    def _published_steps(self) -> set[int]:
        """Snapshot steps already mined into a published schedule (a restarted miner does not redo them)."""
        from ..schedule import list_versions, sidecar, version_path

        steps = set()
        for v in list_versions(self.paths.schedules):
            meta = (read_json(sidecar(version_path(self.paths.schedules, v))) or {}).get("meta", {})
            if meta.get("source_step") is not None:
                steps.add(int(meta["source_step"]))
        return steps

    def serve(self, once: bool = False) -> int:
        """Refresh on every new snapshot until the run finishes (or after one refresh with ``once``)."""
        from ..dist import broadcast_int, world
        from ..files import sweep_temps

        try:
            lock = hold_lock(self.paths.refresh / "miner.lock")
        except MinerBusy:
            if world()[1] > 1:
                broadcast_int(STOP)  # the other processes under a launcher leave too
            raise
        try:
            sweep_temps(self.paths.refresh)  # a miner killed while it wrote its status
            done = self._published_steps()
            last = max(done) if done else -1
            self._report(state="waiting")
            return self._serve(last, once)
        finally:
            self._report(state="stopped")
            os.close(lock)  # releases the lock
            if world()[1] > 1:
                broadcast_int(STOP)

    def follow(self) -> int:
        """A process other than rank 0 under a launcher: embed a share of each snapshot rank 0 announces."""
        from ..dist import broadcast_int
        from ..mining.pipeline import embed_stage
        from ..snapshot import SnapshotError, read_snapshot

        while (step := broadcast_int(STOP)) != STOP:
            try:
                snapshot = read_snapshot(self.paths.snapshots / f"step-{step:07d}")
                embed_stage(self.config_for(snapshot), progress=False)
            except (SnapshotError, FileNotFoundError):
                pass  # rank 0 refuses the same snapshot and says so
        return 0

    def _serve(self, last: int, once: bool) -> int:
        while not self.should_stop():
            snapshot = latest_snapshot(self.run)
            if snapshot is not None and snapshot.step > last:
                from ..snapshot import SnapshotError

                try:
                    self.refresh(snapshot)
                except FileNotFoundError as e:  # the trainer pruned the snapshot while we read it: next one
                    print(f"b3stream refresh: snapshot step {snapshot.step} vanished ({e}); waiting for the next",
                          file=sys.stderr, flush=True)
                except SnapshotError as e:
                    print(f"b3stream refresh: snapshot step {snapshot.step} refused: {e}; waiting for the next",
                          file=sys.stderr, flush=True)
                    self._report(state="waiting", rejected={"step": snapshot.step, "reason": str(e)})
                last = snapshot.step
                if once:
                    return 0
                continue
            time.sleep(self.poll)
        return 0


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser(
        "refresh", help="the background miner of refreshed mode (re-mines from student snapshots)",
        description="Watch RUN/snapshots for new student snapshots; re-embed, rank, partition and publish the next "
                    "schedule version into RUN/schedules for the running trainer. Settings come from "
                    "RUN/refresh/ (written by the trainer); flags override them.")
    p.add_argument("run_folder", nargs="?", metavar="RUN", help="the training run folder (the trainer's `out`)")
    p.add_argument("--run", default=None, help="the same, as an option (not under torchrun: it takes --run as "
                                               "its own --run-path)")
    p.add_argument("--model", choices=["student", "teacher"], default=None, help="embed with (default: refresh.model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: refresh.device, else a GPU if any)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: refresh.threads, else half)")
    p.add_argument("--nice", type=int, default=None, help="niceness increment (default: refresh.nice)")
    p.add_argument("--poll", type=float, default=None, help="seconds between looks for a new snapshot")
    p.add_argument("--once", action="store_true", help="one refresh from the newest snapshot, then exit")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_refresh)


def run_refresh(args) -> int:
    import logging

    from ..config import ConfigError

    if bool(args.run) == bool(args.run_folder):
        raise ConfigError("give the run folder once: `b3stream refresh RUN` or `b3stream refresh --run RUN`")
    args.run = args.run or args.run_folder
    settings = read_json(RunPaths(Path(args.run)).refresh_config) or {}
    threads = args.threads or settings.get("threads") or default_miner_threads()
    nice = args.nice if args.nice is not None else settings.get("nice", 10)
    if nice:
        os.nice(nice)
    import torch

    torch.set_num_threads(threads)
    logger = logging.getLogger("b3stream.mining")
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[miner] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    from ..dist import init_from_launcher, leave

    try:
        miner = Miner(args.run, model=args.model, device=args.device, poll=args.poll, parent_pid=args.parent_pid,
                      progress=not args.quiet)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    rank, size = init_from_launcher()  # torchrun --nproc_per_node N: each refresh's embedding split N ways
    if rank != 0:
        try:
            return miner.follow()
        finally:
            leave()
    # The trainer stops a spawned miner with SIGTERM: leave through SystemExit so the status says so.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"b3stream refresh: watching {miner.run / 'snapshots'} (model {miner.model}, {threads} thread(s), "
          f"device {miner.device or 'auto'}, pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        return miner.serve(once=args.once)
    except MinerBusy as e:
        raise ConfigError(str(e)) from None
    finally:
        leave()

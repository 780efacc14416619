"""Refreshed mode's background miner: student snapshots in, schedule versions out.

    b3stream refresh --run RUN            # beside a running `b3stream train ... mode=refreshed refresh.spawn=false`
    torchrun --nproc_per_node 4 -m b3stream refresh RUN   # the embedding split over 4 processes / GPUs
    python -m b3stream refresh --run RUN  # what the trainer starts itself with refresh.spawn: true

The miner waits for a new student snapshot in ``RUN/snapshots/`` (:mod:`b3stream.refresh.snapshot`), embeds the train
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

The run folder is data, never orders to run code: every file above is validated before use (a bad
``refresh.json`` or ``mine.yaml`` is a ConfigError naming it), a snapshot's weights are loaded into the run's
own student (``RUN/config.yaml``) only when its record agrees with it, a schedule's recorded teacher is used
only when it is the one ``mine.yaml`` names, and ``trust_remote_code`` comes from this command alone
(``--trust-remote-code``, which the trainer passes only when its own config sets it): a value of it in any
file of the run folder is ignored.

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

from ..config import (ConfigError, EncoderConfig, MineConfig, RefreshConfig, TrainConfig, default_miner_threads,
                      from_dict, load_config, validate)
from ..files import read_json, write_json
from ..records import RecordError, Sidecar, read_record
from ..run_paths import RunPaths
from .snapshot import Snapshot, latest_snapshot

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


def read_settings(paths: RunPaths) -> RefreshConfig:
    """``RUN/refresh/refresh.json`` as a validated RefreshConfig (defaults when there is none); a file that
    is not one (not JSON, a list, a string for a number, a negative interval, a niceness below 0) is a
    :class:`ConfigError` naming it."""
    path = paths.refresh_config
    raw = read_json(path)
    if raw is None and path.exists():
        raise ConfigError(f"{path}: not a JSON object of refresh settings")
    try:
        return validate(from_dict(RefreshConfig, raw or {}, where=str(path)))
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None


def run_student(paths: RunPaths, trust_remote_code: bool) -> EncoderConfig:
    """The run's own student (``RUN/config.yaml``, written by the trainer), the one every snapshot must have
    been written by, with ``trust_remote_code`` as this command says (never as the file says)."""
    if not paths.run_config.is_file():
        raise ConfigError(f"{paths.run_config}: missing; the miner loads snapshots into the run's own student, "
                          "and reads it there")
    student = load_config(TrainConfig, paths.run_config).student
    return dataclasses.replace(student, trust_remote_code=trust_remote_code)


def same_encoder(a: EncoderConfig, b: EncoderConfig) -> bool:
    """Whether two encoder settings describe one model (pooling and normalisation as settled from the model
    folder), ``trust_remote_code`` aside."""
    from ..encoder import resolve_model, settled

    a, b = (dataclasses.replace(settled(x), model=resolve_model(x.model), trust_remote_code=False) for x in (a, b))
    return a == b


def snapshot_model(cfg: MineConfig):
    """The student snapshot ``cfg.student_snapshot`` names, as the embed stage embeds with it
    (:class:`b3stream.mining.embed.SnapshotModel`; None without one): read, and its record checked against
    the student ``cfg.teacher`` (the run's own, :func:`b3stream.refresh.snapshot.snapshot_encoder`); its
    weight files are re-hashed each time the stage runs and loaded into that student. The stage is handed it
    because mining never imports refreshed mode. :class:`SnapshotError` for a snapshot that is not one."""
    if not cfg.student_snapshot:
        return None
    from ..mining.embed import SnapshotModel
    from .snapshot import load_snapshot_encoder, read_snapshot, snapshot_encoder, verify_snapshot

    snap = read_snapshot(cfg.student_snapshot)
    return SnapshotModel(
        path=cfg.student_snapshot, step=snap.step,
        params={"source": "snapshot", "snapshot_weights": snap.weights_sha256, "kind": snap.meta["kind"]},
        verify=lambda: verify_snapshot(snap), encoder=lambda: snapshot_encoder(snap, cfg.teacher),
        load=lambda device, dtype: load_snapshot_encoder(snap, cfg.teacher, device=device, dtype=dtype))


class Miner:
    """One run's miner. ``model``, ``device``, ``threads``, ``nice``, ``poll`` default to RUN's refresh.json.
    ``trust_remote_code``: the models may run their folders' own code (this command's decision alone)."""

    def __init__(self, run: str | Path, model: str | None = None, device: str | None = None,
                 poll: float | None = None, parent_pid: int | None = None, progress: bool = False,
                 trust_remote_code: bool = False):
        self.run = Path(run)
        self.paths = RunPaths(self.run)
        if not self.paths.mine_config.is_file():
            raise FileNotFoundError(f"{self.paths.mine_config}: no miner configuration; is {run} the folder of a "
                                    "run started with mode=refreshed?")
        self.trust_remote_code = trust_remote_code
        settings = read_settings(self.paths)
        self.settings = settings
        self.mine_config()  # a mine.yaml that is not a MineConfig stops the miner here, before any model loads
        self._student: EncoderConfig | None = None
        if (model or settings.model) == "student" or settings.when == "bound":
            self._student = run_student(self.paths, trust_remote_code)  # and so does a config.yaml
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

    # -- what the run folder says, validated ------------------------------------------------------
    def mine_config(self) -> MineConfig:
        """``RUN/refresh/mine.yaml``, its teacher's ``trust_remote_code`` as this command says."""
        cfg = load_config(MineConfig, self.paths.mine_config)
        return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher,
                                                                    trust_remote_code=self.trust_remote_code))

    @property
    def student(self) -> EncoderConfig:
        if self._student is None:
            self._student = run_student(self.paths, self.trust_remote_code)
        return self._student

    # -- one refresh ------------------------------------------------------------------------------
    def config_for(self, snapshot: Snapshot) -> MineConfig:
        cfg = self.mine_config()
        return dataclasses.replace(
            cfg, teacher=self.student if self.model == "student" else cfg.teacher,
            out=str(self.paths.refresh / "mine"), schedule_dir=str(self.paths.schedules), version=None,
            seed=cfg.seed + snapshot.step, device=self.device, source_step=snapshot.step,
            source_epoch=int(snapshot.meta.get("epoch", 0)),
            student_snapshot=str(snapshot.path) if self.model == "student" else None,
            trained_ids=str(snapshot.trained_ids) if snapshot.trained_ids else None)

    def refresh(self, snapshot: Snapshot) -> Path | None:
        """Mine from ``snapshot`` and publish the next schedule version; returns its path. With ``refresh.when:
        bound``, only when the schedule in use has drifted (:mod:`b3stream.refresh.drift`); None when it has not."""
        from ..dist import broadcast_int
        from ..mining.pipeline import run_all
        from .snapshot import pin_snapshot

        # Pinned before anything of it is read, and until its last read (the new schedule's probe reference):
        # the trainer prunes old snapshots, and this refresh may outlast several of its snapshot intervals.
        if not pin_snapshot(self.run, snapshot.step):  # pruned just before the pin
            raise FileNotFoundError(snapshot.path)
        try:
            if self.settings.when == "bound" and not self._drifted(snapshot):
                return None
            broadcast_int(snapshot.step)  # under a launcher: the other processes embed their share of it
            t0 = time.perf_counter()
            self._report(state="embed", snapshot_step=snapshot.step)
            cfg = self.config_for(snapshot)
            path = run_all(cfg, progress=self.progress, on_stage=self._stage, student=snapshot_model(cfg))
            if self.settings.when == "bound":
                self._reference_from_refresh(path, cfg, snapshot)
        finally:
            pin_snapshot(self.run, None)
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
        from ..mining.embed import placement
        from ..schedule import load_newest_schedule
        from .snapshot import load_snapshot_encoder, verify_snapshot

        device, dtype = placement(self.device)
        current = load_newest_schedule(self.paths.schedules)
        if current is None:
            return True
        mine = self.mine_config()
        K, tau = int(current.meta.get("K") or mine.K), mine.quality_temperature
        self._report(state="probe", snapshot_step=snapshot.step)
        probe = Probe.load(self.probe_path, current)
        if probe is None:  # no reference yet: the model that mined the schedule in use, where it is known
            probe = Probe.of(current, self.settings.probe_batches, seed=mine.seed)
            teacher = current.meta.get("teacher") if current.meta.get("source_step") is None else None
            if teacher is not None and self._is_mine_teacher(teacher, mine):
                from ..encoder import Encoder

                # as configured, not as the schedule says; where and in the precision the miner embeds
                encoder = Encoder(mine.teacher, trainable=False, device=device, dtype=dtype)
                probe.reference = probe.bound(*embed_probe(encoder, mine.data, probe.ids), K, tau, device=device)
                probe.save(self.probe_path)
        verify_snapshot(snapshot)
        encoder = load_snapshot_encoder(snapshot, self.student, device=device, dtype=dtype)
        now = probe.bound(*embed_probe(encoder, mine.data, probe.ids, mine.embed_batch_size), K, tau, device=device)
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

    @staticmethod
    def _is_mine_teacher(recorded, mine: MineConfig) -> bool:
        """Whether a schedule's recorded teacher is the teacher ``mine.yaml`` configures (only then is it
        loaded, as configured): a schedule's metadata never names a model to load."""
        try:
            return same_encoder(from_dict(EncoderConfig, recorded, where="schedule teacher"), mine.teacher)
        except ConfigError:
            return False

    def _reference_from_refresh(self, path: Path, cfg: MineConfig, snapshot: Snapshot) -> None:
        """The new schedule's probe and its reference bound under the snapshot that mined it: read from the
        miner's stage folder when every row there is the snapshot's; embedded anew when the rows of ids
        already trained were kept from an earlier model (a mid-epoch refresh), since the probe's batches
        include theirs."""
        from .drift import Probe, embed_probe
        from ..mining.embed import load_embeddings, placement
        from ..schedule import load_schedule
        from .snapshot import load_snapshot_encoder

        schedule = load_schedule(path)
        emb = load_embeddings(Path(cfg.out) / "embeddings")
        probe = Probe.of(schedule, self.settings.probe_batches, seed=cfg.seed)
        K = int(schedule.meta.get("K") or cfg.K)
        device, dtype = placement(self.device)
        if emb.record.get("kept"):
            vectors = embed_probe(load_snapshot_encoder(snapshot, self.student, device=device, dtype=dtype),
                                  cfg.data, probe.ids, cfg.embed_batch_size)
        else:
            vectors = emb.queries[probe.ids], emb.positives[probe.ids]
        probe.reference = probe.bound(*vectors, K, cfg.quality_temperature, device=device)
        probe.save(self.probe_path)

    def _published_steps(self) -> set[int]:
        """Snapshot steps already mined into a published schedule (a restarted miner does not redo them)."""
        from ..schedule import list_versions, sidecar, version_path

        steps = set()
        for v in list_versions(self.paths.schedules):
            try:
                side = read_record(sidecar(version_path(self.paths.schedules, v)), Sidecar)
            except RecordError:
                continue  # a sidecar is informational: a damaged one only means that snapshot may be redone
            if side is not None and side.meta.source_step is not None:
                steps.add(side.meta.source_step)
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
        from .snapshot import SnapshotError, read_snapshot

        while (step := broadcast_int(STOP)) != STOP:
            try:
                cfg = self.config_for(read_snapshot(self.paths.snapshots / f"step-{step:07d}"))
                embed_stage(cfg, progress=False, student=snapshot_model(cfg))
            except (SnapshotError, FileNotFoundError):
                pass  # rank 0 refuses the same snapshot and says so
        return 0

    def _serve(self, last: int, once: bool) -> int:
        while not self.should_stop():
            snapshot = latest_snapshot(self.run)
            if snapshot is not None and snapshot.step > last:
                from .snapshot import SnapshotError

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
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the student and teacher model folders run their own modelling code (never taken "
                        "from a file of the run folder; the trainer passes it when its own config sets it)")
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_refresh)


def run_refresh(args) -> int:
    import logging

    from ..config import ConfigError

    if bool(args.run) == bool(args.run_folder):
        raise ConfigError("give the run folder once: `b3stream refresh RUN` or `b3stream refresh --run RUN`")
    args.run = args.run or args.run_folder
    settings = read_settings(RunPaths(Path(args.run)))  # refused here, before any model loads
    threads = args.threads or settings.threads or default_miner_threads()
    nice = args.nice if args.nice is not None else settings.nice
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
                      progress=not args.quiet, trust_remote_code=args.trust_remote_code)
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

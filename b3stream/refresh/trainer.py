"""The trainer's side of refreshed mode: the run folder the miner reads, student snapshots, the spawned miner.

The trainer never imports the miner: it writes what the miner needs into the run folder
(:class:`b3stream.run_paths.RunPaths`) and starts it as a command (``python -m b3stream refresh``). The miner
publishes schedule versions into ``RUN/schedules``, which the loop watches (:mod:`b3stream.refresh.hotswap`).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import (ConfigError, MineConfig, TrainConfig, apply_overrides, default_miner_threads, dump_config,
                      from_dict)
from ..data.manifest import Manifest
from ..files import write_atomic, write_json
from ..schedule import Schedule, ScheduleError, sidecar, version_path
from ..run_paths import RunPaths
from ..dist import DistInfo, all_max, local_world_size
from .snapshot import capture_weights, snapshot_parameters, write_snapshot
from .hotswap import NotYet, ScheduleWatcher, _cpu_group, refresh_due, source_step, wait_for_refresh
from .swap import check_swap, swap

# Schedule metadata that is also a MineConfig field: the miner mines as the running schedule was mined.
_FROM_META = ("strategy", "seed", "per_task", "mix_tasks", "p", "m", "K", "h", "edges", "rank_weights",
              "partitioner", "margin", "task_params")


def miner_config(cfg: TrainConfig, schedule: Schedule, world_size: int = 1) -> MineConfig:
    """The MineConfig the miner uses: the running schedule's strategy and parameters and the teacher that
    mined it (what ``refresh.model: teacher`` embeds with), then ``refresh.mine`` overrides. Refused here,
    before training starts, when it could only publish schedules the trainer cannot use: no recorded teacher
    for ``model: teacher``, or a |B| that does not divide over the ``world_size`` ranks."""
    meta = schedule.meta
    student = cfg.student
    values = {key: meta[key] for key in _FROM_META if meta.get(key) is not None}
    teacher = meta.get("teacher")
    if isinstance(teacher, dict):  # metadata never turns on remote code; refresh.mine.teacher.* may
        teacher = {**teacher, "trust_remote_code": False}
    if teacher is None:
        named = any(key == "teacher" or key.startswith("teacher.") for key in cfg.refresh.mine)
        if cfg.refresh.model == "teacher" and not named:
            raise ConfigError(f"refresh.model: teacher re-mines with the teacher that mined the starting schedule, "
                              f"but {schedule.path} does not record one (mined from your own embeddings?); name it "
                              "with refresh.mine={teacher: {model: FOLDER, pooling: ...}}")
        # model: student embeds with the snapshots; the field must still hold a valid encoder
        teacher = dataclasses.asdict(dataclasses.replace(student, lora=dataclasses.replace(student.lora,
                                                                                           enabled=False)))
    values.update(
        data=cfg.data, split="train", verify_data=cfg.verify_data, batch_size=schedule.batch_size,
        # Tasks too small to rank alone are pooled rather than stopping the miner mid-run.
        small_tasks="merge", teacher=teacher,
    )
    mine = from_dict(MineConfig, values, where="refresh (from the schedule's metadata)")
    if cfg.refresh.mine:
        mine = apply_overrides(mine, {f"{k}": v for k, v in cfg.refresh.mine.items()})
    if mine.batch_size != schedule.batch_size:
        raise ConfigError(f"refresh.mine.batch_size={mine.batch_size}: the run trains |B|={schedule.batch_size} (its "
                          "step budget, learning-rate schedule and DeepSpeed batch size are built for it), and the "
                          "trainer refuses schedules of another |B|; leave refresh.mine.batch_size out")
    if mine.batch_size % world_size:
        raise ConfigError(f"the miner would publish schedules of |B|={mine.batch_size}, which does not divide over "
                          f"{world_size} ranks; set refresh.mine.batch_size to a multiple of {world_size}")
    return mine


def prepare_run(cfg: TrainConfig, schedule: Schedule, mine: MineConfig, paths: RunPaths) -> None:
    """Main rank, before training, after the run folder was claimed (:mod:`b3stream.train.run_folder`: a new
    or replaced run finds no earlier versions or snapshots there, a resumed one keeps its own): the run's
    schedule folder holds the starting schedule, and the miner's settings are written."""
    paths.schedules.mkdir(parents=True, exist_ok=True)
    paths.refresh.mkdir(parents=True, exist_ok=True)
    if schedule.path is not None and schedule.path.parent.resolve() != paths.schedules.resolve():
        target = version_path(paths.schedules, schedule.version or 0)
        if not target.exists():
            if sidecar(schedule.path).is_file():
                write_atomic(sidecar(target), sidecar(schedule.path).read_bytes())
            write_atomic(target, schedule.path.read_bytes())
    dump_config(mine, paths.mine_config)
    write_json(paths.refresh_config, dataclasses.asdict(cfg.refresh))
    paths.finished.unlink(missing_ok=True)


def snapshot_due(cfg: TrainConfig, step: int, epoch_ended: bool, epoch: int) -> bool:
    r = cfg.refresh
    return bool((r.every_steps and step % r.every_steps == 0)
                or (r.every_epochs and epoch_ended and epoch % r.every_epochs == 0))


def snapshot(encoder, cfg: TrainConfig, manifest: Manifest, paths: RunPaths, step: int, epoch: int,
             stage: int, dist: DistInfo, trained=None, writer: "SnapshotWriter | None" = None) -> None:
    """Every rank calls this at the same step. Rank 0 copies the weights the snapshot saves to host memory
    (:func:`b3stream.refresh.snapshot.capture_weights`; under ZeRO-3 they are gathered first, every rank taking
    part: only the adapter's for a LoRA / DoRA student, every weight for a full fine-tune), then ``writer``
    writes, hashes and prunes on its thread while training goes on (None: here, before returning). No rank
    waits for the write. ``trained``: the ids trained this epoch."""
    model = encoder.model
    gathered = nullcontext()
    if stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(snapshot_parameters(model), modifier_rank=None)
    with gathered:
        weights = capture_weights(model) if dist.is_main else None
    if not dist.is_main:
        return
    trained = None if trained is None else np.array(trained, dtype=np.int64, copy=True)
    stamp = manifest.stamp("train")

    def write() -> None:
        write_snapshot(paths.run, step, weights, encoder.cfg, stamp, epoch=epoch, keep=cfg.refresh.keep,
                       trained=trained)

    if writer is None:
        write()
    else:
        writer.submit(step, write)


class SnapshotWriter:
    """Rank 0's background writer of snapshots: one write at a time, on a thread of its own, so a snapshot
    step costs the copy of the weights to host memory and no file work. The next snapshot waits for the
    last one's write; an error in a write is raised at the next snapshot or at :meth:`wait` (the end of
    training, a checkpoint), as a synchronous write's would have been, a few steps later."""

    def __init__(self):
        self.thread: threading.Thread | None = None
        self.step: int | None = None
        self.error: BaseException | None = None

    def submit(self, step: int, write) -> None:
        """Run ``write()`` on the writer's thread, once the previous write has finished (its error raised)."""
        self.wait()
        self.step = step
        self.thread = threading.Thread(target=self._run, args=(write,), name=f"b3stream-snapshot-{step}",
                                       daemon=True)
        self.thread.start()

    def _run(self, write) -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 (raised on the loop's thread by wait)
            self.error = e

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> None:
        """Until the last write has finished; raises its error, if it had one."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"the student snapshot of step {self.step} could not be written: "
                               f"{type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class MinerPlacement:
    """Where a spawned miner runs (:func:`miner_placement`): the ``--device`` it is given, the
    ``CUDA_VISIBLE_DEVICES`` of its process, and which of the trainer's GPUs that is."""

    device: str  # the child's --device: "cpu", or "cuda" (the one GPU its CUDA_VISIBLE_DEVICES shows it)
    visible: str  # the child's CUDA_VISIBLE_DEVICES ("": it sees no GPU at all)
    gpu: int | None  # the miner's GPU as the trainer numbers them (cuda:gpu); None: the CPU
    shared: bool  # that GPU also trains (a local rank's): refresh.device asked for it
    why: str  # one line for the log

    def describe(self) -> str:
        if self.gpu is None:
            return f"on the CPU ({self.why})"
        return f"on GPU {self.gpu} (CUDA_VISIBLE_DEVICES={self.visible}; {self.why})"


def miner_placement(device: str | None, gpus: int, local_ranks: int, visible: str | None = None) -> MinerPlacement:
    """Where the spawned miner runs, as a pure function of ``refresh.device``, the ``gpus`` the trainer's
    processes see, the ``local_ranks`` training on this host (local rank r on ``cuda:r``,
    :func:`b3stream.dist.init_distributed`) and the trainer's own ``CUDA_VISIBLE_DEVICES`` (``visible``: the
    names the child's must use). The child sees only its GPU, so everything it runs on a GPU (the embedding,
    FAISS or the torch index, the probe, the bound) lands there:

    - ``null`` (auto): a GPU of its own, the last visible GPU no local rank trains on, when there is one; else
      the CPU (a miner beside a rank on its GPU makes that rank every rank's straggler);
    - ``cuda``: a GPU of its own when there is one, else it shares the last GPU (the one GPU of a single-GPU
      box): sharing is asked for;
    - ``cuda:N``: GPU N of the trainer's, shared or not; ``cpu``: the CPU, every GPU hidden from it.

    :class:`ConfigError` for a GPU that is not there."""
    names = [v.strip() for v in visible.split(",")] if visible and visible.strip() else []
    names += [str(i) for i in range(len(names), gpus)]
    used = set(range(min(local_ranks, gpus)))
    spare = [g for g in range(gpus) if g not in used]

    def on(gpu: int, why: str) -> MinerPlacement:
        shared = gpu in used
        return MinerPlacement("cuda", names[gpu], gpu, shared, why + ("; shared with local rank "
                                                                     f"{gpu}" if shared else ""))

    if device == "cpu":
        return MinerPlacement("cpu", "", None, False, "refresh.device: cpu")
    if device is not None and device != "cuda":
        try:
            gpu = int(device.split(":", 1)[1])
        except (IndexError, ValueError):
            raise ConfigError(f"refresh.device: {device!r} is not cpu, cuda or cuda:<index>") from None
        if not 0 <= gpu < gpus:
            raise ConfigError(f"refresh.device: {device}, but the trainer sees {gpus} GPU(s)"
                              + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""))
        return on(gpu, f"refresh.device: {device}")
    if gpus == 0:
        if device == "cuda":
            raise ConfigError("refresh.device: cuda, but torch sees no GPU here; use cpu or leave it null")
        return MinerPlacement("cpu", "", None, False, "no GPU")
    if spare:
        return on(spare[-1], f"its own: {local_ranks} local rank(s) train on GPU(s) 0-{len(used) - 1} of {gpus}"
                  if used else "its own")
    if device == "cuda":
        return on(gpus - 1, "refresh.device: cuda")
    return MinerPlacement("cpu", "", None, False, f"every one of the {gpus} GPU(s) trains; refresh.device: cuda "
                                                  f"would share GPU {gpus - 1}")


def place_miner(device: str | None) -> MinerPlacement:
    """:func:`miner_placement` for this process: the GPUs torch sees, the launcher's local world size and
    this process's ``CUDA_VISIBLE_DEVICES``."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return miner_placement(device, gpus, local_world_size(), os.environ.get("CUDA_VISIBLE_DEVICES"))


class MinerProcess:
    """A spawned ``python -m b3stream refresh`` child of the main rank, restarted with backoff when it dies.

    :meth:`check` is non-blocking and is called at step boundaries; the child also exits by itself when the
    trainer is gone (it watches its parent's pid) or the run has finished. Restarts are counted over the last
    ``refresh.restart_window`` seconds: a long run outlives a miner that crashes now and then, and gives up
    only on one that keeps crashing.
    """

    def __init__(self, paths: RunPaths, cfg: TrainConfig, say=print, clock=time.monotonic,
                 trust_remote_code: bool = False, placement: MinerPlacement | None = None):
        self.paths, self.cfg, self.say, self.clock = paths, cfg.refresh, say, clock
        self.trust_remote_code = trust_remote_code  # from the trainer's own config, never from the run folder
        self.placement = placement if placement is not None else place_miner(cfg.refresh.device)
        self.proc: subprocess.Popen | None = None
        self.restarts = 0  # over the whole run (reported in the summary)
        self.recent: list[float] = []  # when the restarts within the window happened
        self.restart_at: float | None = None
        self.gave_up = False

    def command(self) -> list[str]:
        return [sys.executable, "-m", "b3stream", "refresh", "--run", str(self.paths.run), "--quiet",
                "--threads", str(self.cfg.threads or default_miner_threads()), "--parent-pid", str(os.getpid()),
                "--device", self.placement.device] \
            + (["--trust-remote-code"] if self.trust_remote_code else [])

    def environment(self, base: dict | None = None) -> dict:
        """The child's environment: ``base`` (this process's) with its threads, its GPU (``CUDA_VISIBLE_DEVICES``
        from :attr:`placement`: one GPU, or none) and no launcher variables (it is no member of the training
        process group)."""
        env = dict(os.environ if base is None else base)
        threads = self.cfg.threads or default_miner_threads()
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   CUDA_VISIBLE_DEVICES=self.placement.visible)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE"):
            env.pop(key, None)
        return env

    def start(self) -> None:
        log = open(self.paths.log, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.restart_at = None

    def check(self) -> None:
        """Restart a miner that died, after 2, 4, 8 ... (at most 60) seconds; never blocks."""
        if self.proc is None or self.gave_up:
            return
        code = self.proc.poll()
        if code is None:
            return
        now = self.clock()
        if self.restart_at is None:
            self.recent = [t for t in self.recent if now - t < self.cfg.restart_window]
            if len(self.recent) >= self.cfg.max_restarts:
                self.gave_up = True
                self.say(f"miner exited with code {code}, its {len(self.recent) + 1}th exit within "
                         f"{self.cfg.restart_window:.0f} s; not restarting it (training goes on with schedule "
                         f"versions published so far; see {self.paths.log})")
                return
            delay = min(60.0, 2.0 ** (len(self.recent) + 1))
            self.say(f"miner exited with code {code}; restarting it in {delay:.0f} s (see {self.paths.log})")
            self.restart_at = now + delay
        elif now >= self.restart_at:
            self.restarts += 1
            self.recent.append(now)
            self.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Mark the run finished and end the miner (SIGTERM, then SIGKILL)."""
        self.paths.finished.touch()
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass



class ThreadShare:
    """A spawned miner on the trainer's own CPU cores: while it works, the trainer's threads step aside.

    PyTorch's CPU kernels run OpenMP regions that wait for every thread at their end; with the trainer's
    threads and a busy miner's together above the cores, a region waits for a thread the scheduler has
    parked, and the trainer's steps were measured ten times slower (0.9 s to 9-10 s per step on 2 cores,
    docs/quality.md round 8) for as long as the miner embedded. So while the miner's status says it works
    (probe, embed, rank, partition, schedule) each rank on this host uses ``(cores - miner threads) /
    ranks`` threads, and all of its own again when the miner waits for the next snapshot."""

    IDLE = ("waiting", "stopped")

    def __init__(self, status: Path, full: int, shared: int):
        self.status, self.full, self.shared = status, full, shared

    @classmethod
    def for_run(cls, cfg: TrainConfig, dist: DistInfo, paths: RunPaths) -> "ThreadShare | None":
        """None unless a spawned miner runs on the CPU of a trainer that runs on the CPU, and would crowd it."""
        device = cfg.refresh.device or ("cuda" if dist.device.type == "cuda" else "cpu")
        if cfg.mode != "refreshed" or not cfg.refresh.spawn or dist.device.type != "cpu" or device != "cpu":
            return None
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        ranks = local_world_size()
        full = torch.get_num_threads()
        shared = max(1, min(full, (cores - (cfg.refresh.threads or default_miner_threads())) // ranks))
        return cls(paths.status, full, shared) if shared < full else None

    def update(self) -> int:
        """Set this rank's threads from the miner's state; returns the number in use."""
        import torch

        from ..records import MinerStatus, read_record_or_none

        status = read_record_or_none(self.status, MinerStatus)  # a crafted status is as good as none
        state = status.state if status is not None else "waiting"
        want = self.full if state in self.IDLE else self.shared
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)
        return want


@contextmanager
def miner_process(cfg: TrainConfig, paths: RunPaths, dist: DistInfo, monitor, trust_remote_code: bool = False,
                  placement: MinerPlacement | None = None):
    """While the block runs: in refreshed mode with ``refresh.spawn``, a miner child of the main rank (yielded;
    None otherwise). However the block ends, the run is marked finished and the miner stopped.
    ``trust_remote_code``: the miner's models may run their own code (the trainer's config says so);
    ``placement``: where it runs (None: :func:`place_miner` decides now)."""
    refreshed = cfg.mode == "refreshed"
    miner = MinerProcess(paths, cfg, say=monitor.write, trust_remote_code=trust_remote_code, placement=placement) \
        if refreshed and cfg.refresh.spawn and dist.is_main else None
    if miner is not None:
        miner.start()
        monitor.write(f"refreshed mode: miner started (pid {miner.proc.pid}, log {paths.log}) "
                      f"{miner.placement.describe()}; a snapshot every "
                      f"{cfg.refresh.every_steps or '-'} steps / {cfg.refresh.every_epochs or '-'} epochs")
    elif refreshed and dist.is_main:
        monitor.write(f"refreshed mode: start the miner with `b3stream refresh --run {paths.run}`")
    try:
        yield miner
    finally:
        if miner is not None:
            miner.stop()
        elif refreshed and dist.is_main:
            paths.finished.touch()


# -- between two training steps ---------------------------------------------------------------------


class BetweenSteps:
    """The work between two training steps besides training, behind one call, so the loop reads the same in
    every mode: refreshed mode's snapshot when one is due, a look at the spawned miner, and every
    ``watch_every`` steps a look for a newer schedule version (waiting for it where ``refresh.max_lag_steps``
    says), ending in a hot swap (:func:`b3stream.refresh.swap.swap`). Static mode without a watched folder
    does nothing here but agree on stopping.

    What of it runs on the loop's thread: at a snapshot step the copy of the snapshot's weights to host
    memory (and under ZeRO-3 their gather); the file writes and the SHA-256 run on rank 0's
    :class:`SnapshotWriter` thread. At a watched step one all-reduce of four integers asking whether every
    rank's schedule loader is ready (:meth:`ScheduleWatcher.check`); the folder listing, the parse and the
    checksum of a new version run on the loaders' threads. :meth:`flush` waits for the snapshot writer (before
    a checkpoint and at the end), :meth:`close` stops the loader.

    Stopping (SIGINT / SIGTERM, :mod:`b3stream.train.interrupt`): after every step the ranks combine their
    stop flags, in the watcher's collective on a step it checks, else in one all-reduce of their own (none on
    one process); :attr:`stopping` is then the signal every rank stops at, 0 while none was caught.

    Built from what it uses of the trainer: ``cfg`` (its ``mode`` and ``refresh.*``), the live ``sampler``
    (its epoch, the ids consumed, the swap), ``dist``, ``monitor`` (``write`` and ``scalars``), the train
    split's ``manifest`` (the snapshots' data stamp and the versions' check), the run folder's ``paths``,
    the student ``encoder`` and ZeRO ``stage`` (what a snapshot saves), the training ``step`` it starts at,
    the schedule folder to watch and how often (``watch_folder``, ``watch_every``; None: none) and whether
    the run ``resumed``. ``miner``: the spawned miner, set once it runs; ``signals``: the loop's
    :class:`~b3stream.train.interrupt.StopSignals`, set while it runs."""

    def __init__(self, cfg: TrainConfig, sampler, dist: DistInfo, monitor, manifest: Manifest, paths: RunPaths,
                 encoder, stage: int, step: int = 0, watch_folder: Path | None = None,
                 watch_every: int | None = None, resumed: bool = False):
        self.cfg, self.sampler, self.dist, self.monitor = cfg, sampler, dist, monitor
        self.manifest, self.paths, self.encoder, self.stage = manifest, paths, encoder, stage
        self.step, self.watch_every = step, watch_every  # step: the last step trained (the watcher's accept)
        self.refreshed = cfg.mode == "refreshed"
        self.miner, self.waited = None, 0.0
        self.signals, self.stopping = None, 0
        self.watcher = ScheduleWatcher(watch_folder, manifest, dist, say=monitor.write) \
            if watch_folder and watch_every else None
        # the stop flags' group: the watcher's (gloo), else one made here (collective: every rank builds its
        # BetweenSteps at the same point) when the default group is NCCL; None on one process or a gloo group
        self.group = self.watcher.group if self.watcher is not None else _cpu_group(dist)
        if self.watcher is not None:
            # the swap's refusals too (another |B|, an older version): skipped with a message, not raised mid-run
            self.watcher.accept = lambda schedule: (fits_now(schedule, self.step, sampler.epoch),
                                                    check_swap(sampler, schedule))
        # (step, epoch, mined apart) of the snapshots whose schedules max_lag_steps may wait for; a resumed run
        # takes its own from before the resume
        self.snapshots = own_snapshots(paths, step) if self.refreshed and resumed else []
        self.share = ThreadShare.for_run(cfg, dist, paths)  # a CPU miner beside a CPU trainer
        self.writer = SnapshotWriter() if self.refreshed and dist.is_main else None
        if self.share is not None:
            monitor.write(f"refreshed mode: the trainer uses {self.share.shared} thread(s) per rank while the "
                          f"miner works, {self.share.full} while it waits")

    def after_step(self, step: int, epoch_ended: bool) -> bool:
        """Run after step ``step``; True when the sampler swapped to a new schedule version (the loader's
        pass must end: it follows the old plan)."""
        cfg, sampler = self.cfg, self.sampler
        self.step = step
        if self.share is not None:
            self.share.update()
        if self.refreshed and snapshot_due(cfg, step, epoch_ended, sampler.epoch):
            trained = sampler.consumed()
            snapshot(self.encoder, cfg, self.manifest, self.paths, step, sampler.epoch, self.stage, self.dist,
                     trained=trained, writer=self.writer)
            self.snapshots.append((step, sampler.epoch, len(trained) > 0))
        if self.miner is not None:
            self.miner.check()
        if self.watcher is None or step % self.watch_every:
            self.agree_stop()
            return False
        new = self.watcher.check(sampler.version, stop=self.caught())  # agrees on stopping too
        # a snapshot mined apart in an earlier epoch answers nothing now (fits_now refuses it)
        due = [s for s, epoch, apart in self.snapshots if epoch == sampler.epoch or not apart]
        need = refresh_due(due, step, cfg.refresh.max_lag_steps)  # snapshots: refreshed only
        if need is not None and not self.watcher.stop and source_step(new or sampler.schedule) < need:
            new, waited = wait_for_refresh(self.watcher, sampler.version, new, need, cfg.refresh.poll_seconds,
                                           cfg.refresh.wait_timeout, miner=self.miner, say=self.monitor.write,
                                           stop=self.caught, skipped=lambda s: miner_skipped(self.paths, s))
            self.waited += waited
            self.monitor.scalars(step, {"wait_seconds": waited}, group="refresh")
            self.snapshots = [x for x in self.snapshots if x[0] > need]  # a wait that gave up is not repeated
        self.stopping = self.watcher.stop
        if new is None or self.stopping:  # no swap on the way out: the resumed run finds the version
            return False
        report_swap(self.monitor, step, sampler.schedule, new, len(sampler.history) + 1)
        swap(sampler, new, step=step)
        return True

    def flush(self) -> None:
        """Wait for the snapshot being written (rank 0), raising its error: a checkpoint then never names a
        step whose snapshot is not on disk, and the end of training surfaces a failed write."""
        if self.writer is not None:
            self.writer.wait()

    def close(self) -> None:
        """The end of the loop: the last snapshot written (its error raised), the schedule loader stopped."""
        if self.watcher is not None:
            self.watcher.close()
        self.flush()

    def caught(self) -> int:
        """The signal this rank caught (0: none)."""
        return self.signals.signum if self.signals is not None else 0

    def agree_stop(self) -> int:
        """Combine the ranks' stop flags (one all-reduce on several ranks, nothing on one; collective) unless
        they have agreed to stop already; returns :attr:`stopping`."""
        if not self.stopping:
            self.stopping = all_max([self.caught()], self.group)[0]
        return self.stopping


def miner_skipped(paths: RunPaths, step: int) -> bool:
    """Whether the miner decided not to re-mine the snapshot of ``step`` (``refresh.when: bound``: the bound
    of the schedule in use had not drifted), by its status; a status that is not one says nothing."""
    from ..records import MinerStatus, read_record_or_none

    status = read_record_or_none(paths.status, MinerStatus)
    return status is not None and any(p.snapshot_step == step and not p.refresh for p in status.probes)


def fits_now(schedule, step: int, epoch: int) -> None:
    """Refuse a newer schedule that does not fit the trainer's position (the watcher's ``accept``): one
    mined from a snapshot of a later step waits for that step (a resumed run re-reaching it: taking it
    early would train on batches no uninterrupted run could have had), and one whose ids were mined apart
    for the rest of another epoch is not used in this one (its communities were cut for that remainder)."""
    meta = schedule.meta
    if source_step(schedule) > step:
        raise NotYet(f"mined from the snapshot of step {source_step(schedule)}, a step not reached yet")
    if meta.get("trained_apart") and meta.get("source_epoch") not in (None, epoch):
        raise ScheduleError(f"mined for the rest of epoch {meta['source_epoch']} ({meta['trained_apart']} ids "
                            f"trained by then were mined apart), while training is in epoch {epoch}")


def own_snapshots(paths: RunPaths, step: int) -> list[tuple[int, int, bool]]:
    """(step, epoch, mined apart) of the run's snapshots up to ``step``: a resumed run's max_lag_steps
    bound counts the snapshots written before the resume too."""
    from .snapshot import list_snapshots

    return [(s.step, int(s.meta.get("epoch", 0)), s.trained_ids is not None)
            for s in list_snapshots(paths.run) if s.step <= step]


def staleness(schedule, step: int) -> int | None:
    """Steps between the snapshot a schedule answers and now (None: mined before training)."""
    source = source_step(schedule)
    return None if source < 0 else step - source


def report_swap(monitor, step: int, old, new, count: int) -> None:
    """Console line + TensorBoard ``refresh/*`` scalars for a swap: the new version, how stale it is, the
    miner's time per stage, and the Theorem-1 bound and in-batch similarity of the upcoming batches under the
    snapshot student's embeddings, for the new schedule and for the one it replaces."""
    meta = new.meta
    q, q_old = meta.get("quality") or {}, meta.get("quality_previous") or {}
    timings = {k: v for k, v in (meta.get("timings") or {}).items() if isinstance(v, (int, float))}
    stale = staleness(new, step)
    values = {"schedule_version": new.version, "swaps": count, "staleness_steps": stale,
              "bound_new": q.get("theorem1_bound"), "neg_sim_new": q.get("neg_sim_mean"),
              "hardest_neg_sim_new": q.get("neg_sim_hardest_mean"),
              **{f"miner_seconds_{k}": v for k, v in timings.items()}}
    if q_old.get("version") == old.version:
        values.update(bound_replaced=q_old.get("theorem1_bound"), neg_sim_replaced=q_old.get("neg_sim_mean"),
                      hardest_neg_sim_replaced=q_old.get("neg_sim_hardest_mean"))
    monitor.scalars(step, values, group="refresh")
    line = (f"swapped to schedule v{new.version} ({meta.get('strategy', '?')}) at step {step}"
            + (f", mined for the snapshot of step {meta['source_step']} ({stale} steps ago) with "
               f"{meta.get('source_model') or '?'}" if stale is not None else "")
            + ("; miner " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()) if timings else ""))
    if q:
        line += f"; upcoming batches: bound {q['theorem1_bound']:.3f}, neg sim {q['neg_sim_mean']:.3f}"
        if "bound_replaced" in values:
            line += (f" (v{old.version} under the same embeddings: bound {values['bound_replaced']:.3f}, "
                     f"neg sim {values['neg_sim_replaced']:.3f})")
    monitor.write(line)

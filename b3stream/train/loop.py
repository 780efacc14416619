"""The training recipe: config -> data and schedule -> student -> DeepSpeed engine -> loop -> checkpoints
-> evaluation -> export. Read :class:`Recipe` top to bottom (its setup steps, then :meth:`Recipe.train`);
the helpers below it are the details.

Each step trains on one global batch of the schedule (B3: |B|/K communities of K mined neighbours):

1. every rank reads its slice of the batch by id (DataLoader workers, ``collate.py``),
2. embeds queries, positives and its share of the B3++ hard negatives in ONE engine forward
   (in GradCache chunks when ``grad_cache_chunk`` is set),
3. gathers all ranks' embeddings and computes InfoNCE with temperature tau over the global batch,
4. ONE ``engine.backward`` and ``engine.step`` (ZeRO reduces, clips, updates, steps the lr schedule).

Launch: ``b3stream train --config X.yaml`` (one process), ``torchrun --nproc_per_node N -m b3stream.train
--config X.yaml`` or ``deepspeed --module b3stream.train --config X.yaml --deepspeed ds_configs/zero2.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, dump_config, validate
from ..data.manifest import DataError, Manifest
from ..data.reader import ShardedDataset
from ..encoder import Encoder, model_prompts, with_model_prompts
from ..evaluate import BeirSet, RetrievalSet
from ..files import write_atomic
from ..schedule import load_schedule, version_path
from ..dist import DistInfo, barrier, init_distributed, split_bounds
from ..refresh.trainer import BetweenSteps, miner_config, miner_process, place_miner, prepare_run, staleness
from ..run_paths import RunPaths
from .collate import loader_workers, plan_loader
from . import run_folder
from .ds_config import build_ds_config, lr_schedule, resolve_ds_path, resolve_precision, start_lr_schedule, zero_stage
from .export import export_all, master_weights
from .interrupt import Interrupted, StopSignals, signal_name
from .loss import BatchEmbedder, InfoNCE, all_gather_rows, bound_cpu_heap, gather_sizes
from .monitor import Monitor
from .sampler import ScheduleSampler


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run the recipe; returns the run summary (also written to ``RUN/summary.json``). ``progress``: the
    live step bar on a terminal."""
    return Recipe(cfg, progress).train()


class Recipe:
    """The training recipe: set up in dependency order (data and schedule, the run folder, the student,
    the DeepSpeed engine, a resume), then :meth:`train` runs the loop, one :meth:`train_step` per global
    batch, with the work between steps (snapshots, schedule versions, swaps) behind :class:`BetweenSteps`.

    Features, and the keys that control them:

    - InfoNCE over the global batch with temperature tau (``temperature``), also positive -> query
      (``symmetric``); same-text positives are never negatives (``mask_duplicate_positives``).
    - Extra negatives in every denominator: the schedule's B3++ / random_hn ones and / or the examples'
      stored ones (``negatives``, ``h_dataset``).
    - LoRA / DoRA or full fine-tuning, pooling, lengths, a saved adapter to continue (``student.*``); a
      sentence-transformers folder's own modules, lengths and prompts (``b3stream.model_folder``).
    - DeepSpeed ZeRO 0-3 from a JSON (``deepspeed``), precision (``precision``: bf16 on a GPU, fp32 on CPU),
      GradCache chunks (``grad_cache_chunk``), one fused forward for all sides (``fuse_sides``), gradient
      clipping (``grad_clip``), warmup then decay (``lr``, ``warmup_ratio``, ``weight_decay``).
    - Epochs or a step budget (``epochs``, ``max_steps``); every id once per epoch; checkpoints with the
      sampler's position (``save_every``, ``keep_checkpoints``), resumed exactly (``resume``); a run
      folder that is never another run's (``overwrite``).
    - Evaluation before, during and after on a held-out split and / or a BEIR folder (``eval_split``,
      ``eval_corpus``, ``eval_beir``, ``eval_beir_split``, ``eval_every``, ``eval_max_queries``); TensorBoard and
      the console line (``log_every``); ``trace_ids``.
    - Hot swaps to newer schedule versions (``watch_schedule_every``) and refreshed mode with a background
      miner (``mode: refreshed``, ``refresh.*``).
    - Export of the adapter, the merged model and a sentence-transformers folder (``export``).

    Limits: no gradient accumulation (|B| is one step's global batch); text only (image fields are stored by
    ``prepare`` but not embedded); a bf16 run's snapshots (refreshed mode) are its bf16 weights (the export
    takes the fp32 master copy).
    """

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        validate(cfg)  # a config built in code gets the checks load_config makes
        self.cfg, self.progress = cfg, progress
        self.dist = init_distributed()
        self.run = Path(cfg.out)
        self.setup_data()
        self.setup_run_folder()
        self.setup_student()
        self.setup_engine()
        self.setup_resume()

    # -- 1. Data and schedule. Everything wrong with the inputs fails here, before the model loads. ------
    def setup_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        # the student's own prompts (a sentence-transformers folder's) where the dataset sets none
        self.prompts = model_prompts(cfg.student)
        self.manifest = with_model_prompts(Manifest.load(cfg.data), self.prompts)
        self.records = ShardedDataset(cfg.data, "train", manifest=self.manifest, verify=cfg.verify_data)
        schedule = load_schedule(cfg.schedule, expect=self.manifest.stamp("train"))
        check_dataset_negatives(cfg, self.manifest)
        self.sampler = ScheduleSampler(schedule, len(self.records), dist.rank, dist.world_size, seed=cfg.seed,
                                       negatives=cfg.negatives, h_dataset=cfg.h_dataset)
        self.batch_size = schedule.batch_size  # |B|
        # every epoch has the first plan's number of steps, swaps or not (ScheduleSampler.epoch_steps)
        self.total_steps = cfg.max_steps if cfg.max_steps else cfg.epochs * self.sampler.epoch_steps
        self.precision = resolve_precision(cfg.precision, dist.device)
        self.ds_config = build_ds_config(cfg, resolve_ds_path(cfg.deepspeed), dist.world_size, self.batch_size,
                                         self.total_steps, self.precision, dist.device.type)
        self.eval_set = _eval_set(cfg, self.manifest, self.prompts)
        self.beir_set = BeirSet(cfg.eval_beir, cfg.eval_beir_split, cfg.eval_max_queries, seed=0,
                                prompts=self.prompts) if cfg.eval_beir else None
        self.evaluates = self.eval_set is not None or self.beir_set is not None

    # -- 2. The run folder: new, resumed, or replaced with overwrite; never another's files lost. -------
    def setup_run_folder(self) -> None:
        cfg, schedule = self.cfg, self.sampler.schedule
        # Refreshed mode: the miner publishes into RUN/schedules (which starts with the given schedule); static
        # mode may watch the given folder for versions published by hand (watch_schedule_every).
        self.refreshed = cfg.mode == "refreshed"
        self.paths = RunPaths(self.run)
        self.watch_folder = self.paths.schedules if self.refreshed else (
            Path(cfg.schedule) if Path(cfg.schedule).is_dir() else None)
        self.watch_every = cfg.watch_schedule_every or (1 if self.refreshed else None)
        # refresh.mine (and the teacher, |B| over the ranks) checked before any output
        mine_cfg = miner_config(cfg, schedule, self.dist.world_size) if self.refreshed else None
        # the spawned miner may run model code only when this command's own config lets a model do so
        self.miner_trust = bool(cfg.student.trust_remote_code or (mine_cfg and mine_cfg.teacher.trust_remote_code))
        # where a spawned miner runs: a GPU no local rank trains on, else the CPU (refresh.device; refused here
        # when it names a GPU that is not there)
        self.miner_place = place_miner(cfg.refresh.device) if self.refreshed and cfg.refresh.spawn else None
        # Every rank decides (so all refuse together) before the main rank changes anything.
        self.start = run_folder.plan(self.run, cfg.resume, cfg.overwrite, schedule.path)
        barrier()
        if self.dist.is_main:
            run_folder.claim(self.run, self.start)
            dump_config(cfg, self.run / "config.yaml")
            if self.refreshed:
                prepare_run(cfg, schedule, mine_cfg, self.paths)

    # -- 3. Student: HF encoder + pooling (+ LoRA), wrapped so one forward embeds every side. -----------
    def setup_student(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every rank
        self.stage = zero_stage(self.ds_config)
        # Under ZeRO-3 the backbone is built inside deepspeed.zero.Init, so each rank holds its partition of the
        # weights from the start (a 7B student in fp32 is 28 GB on every rank otherwise, before ZeRO shards it).
        if self.stage == 3 and self.dist.device.type == "cpu":
            # ZeRO-3 gathers and frees every layer's weights each forward and backward; glibc's heap keeps the freed
            # blocks and fragments unless its mmap threshold stays at its initial 128 KiB (measured, LoRA on a
            # 189M-parameter Llama, 2 ranks: peak RSS per rank 3.3 GB -> 2.0 GB, and 1.6 GB with zero3.json's
            # 1e7 live parameters; tools/bench_rank_memory.py)
            bound_cpu_heap(128 << 10)
        with _partitioned_loading(self.ds_config, self.stage == 3):
            # DeepSpeed casts for bf16/fp16; a bf16 run reads the weights straight into bf16 (half the memory)
            self.encoder = Encoder(cfg.student, trainable=True, dtype=_load_dtype(self.precision, self.stage))
        self.loaded_bytes = _local_bytes(self.encoder)  # what this rank holds of the student right after loading
        self.peak_rss = {"loaded": _peak_rss_gb()}
        # auto: on CUDA, in the steps whose sides have about one width (loss.fusing_pays); never on a CPU
        fuse = ("auto" if self.dist.device.type == "cuda" else False) if cfg.fuse_sides == "auto" else cfg.fuse_sides
        self.model = BatchEmbedder(self.encoder, chunk=cfg.grad_cache_chunk, fuse_sides=fuse,
                                   pad_id=self.encoder.tokenizer.pad_token_id or 0)
        self.loss_fn = InfoNCE(temperature=cfg.temperature, symmetric=cfg.symmetric,
                               mask_duplicates=cfg.mask_duplicate_positives)

    # -- 4. DeepSpeed engine: ZeRO stage and optimizer (AdamW) from the JSON, warmup/decay lr_schedule. --
    def setup_engine(self) -> None:
        import deepspeed

        from .checkpoints import weights_only_engine

        _quiet_known_noise()
        ds_log = logging.getLogger("DeepSpeed")
        level = ds_log.level
        ds_log.setLevel(logging.ERROR)  # initialize() warns about reading the lr before the first step
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, model_parameters=[p for p in self.model.parameters() if p.requires_grad],
            config=self.ds_config, lr_scheduler=lr_schedule(self.ds_config, self.cfg, self.total_steps))
        ds_log.setLevel(max(level, logging.WARNING))
        self.peak_rss["engine"] = _peak_rss_gb()
        weights_only_engine(self.engine)  # resume unpickles no code (a checkpoint folder need not be trusted)

    # -- 5. Resume: model, optimizer, lr schedule and sampler position from RUN/checkpoints. ------------
    def setup_resume(self) -> None:
        cfg = self.cfg
        self.step = 0
        if self.start == "resume":
            self.step, self.sampler = _restore(self.engine, self.sampler, cfg, self.manifest, self.run / "checkpoints",
                                               self.dist, self.watch_folder)
        start_lr_schedule(self.engine.lr_scheduler)  # the next update's rate, also after a resume
        self.monitor = Monitor(self.run, self.total_steps, start_step=self.step, log_every=cfg.log_every,
                               enabled=self.dist.is_main, progress=self.progress)
        self.monitor.write(_banner(cfg, self.dist, self.sampler, self.batch_size, self.total_steps, self.stage,
                                   self.precision, self.step))
        self.between_steps = BetweenSteps(
            cfg, self.sampler, self.dist, self.monitor, self.manifest, self.paths, self.encoder, self.stage,
            step=self.step, watch_folder=self.watch_folder, watch_every=self.watch_every,
            resumed=self.start == "resume")

    # -- 6. The loop. -------------------------------------------------------------------------------------
    def train(self) -> dict:
        cfg = self.cfg
        # A spawned miner (refreshed mode) runs while the block runs and is stopped however it ends.
        with miner_process(cfg, self.paths, self.dist, self.monitor, self.miner_trust, self.miner_place) as miner:
            self.between_steps.miner = miner
            evals = {}
            if self.evaluates and self.step == 0:  # zero-shot
                evals["before"] = self.evaluate()
            # from_pretrained leaves the backbone in eval mode while new LoRA modules start in train mode: set
            # train mode explicitly, so every dropout is on in every run (with or without evaluations, resumed).
            self.engine.module.train()
            self.clock = Throughput(every_step_exact=self.dist.device.type != "cuda")
            self.workers = loader_workers(cfg.num_workers)  # null: from the cores per local rank
            loader = plan_loader(self.records, self.sampler, self.encoder.tokenize, self.workers)  # lives on
            # While the loop runs, SIGINT / SIGTERM only set a flag; the ranks agree after a step to stop there.
            with StopSignals() as self.between_steps.signals:
                while self.step < self.total_steps and not self.between_steps.stopping:
                    self.clock.ready()
                    for batch in loader:  # the rest of the sampler's current plan; the next pass, the next plan's
                        self.train_step(batch)
                        if self.evaluates and cfg.eval_every and self.step % cfg.eval_every == 0 \
                                and self.step < self.total_steps:
                            evals[f"step{self.step}"] = self.evaluate()
                        if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                            self.save()
                        if self.step >= self.total_steps:
                            break
                        ended = self.sampler.epoch > batch.rank_batch.epoch
                        if self.between_steps.after_step(self.step, epoch_ended=ended):
                            break  # swapped: this pass of the loader follows the old plan; the next, the new one
                        if self.between_steps.stopping:
                            break  # a signal: checkpoint and stop
                        self.clock.ready()
                self.between_steps.agree_stop()  # a signal during the last step stops the run there too
            loader.close()
            self.between_steps.close()  # the last snapshot written (a failed write raised here), the loader stopped
            summary = self.finish(evals, miner, stopped=self.between_steps.stopping)
        if summary["stopped"]:  # the miner is stopped (above); every rank raises, the commands exit 128 + signal
            raise Interrupted(self.between_steps.stopping, self.step, self.checkpoint_path(), cfg.resume, summary)
        return summary

    def train_step(self, batch) -> None:
        """One global batch: embed every side in one engine forward, InfoNCE over the gathered batch, one
        backward and one optimizer step; then the sampler advances and the monitor records the step."""
        cfg, dist, sampler, clock = self.cfg, self.dist, self.sampler, self.clock
        if (batch.rank_batch.epoch, batch.rank_batch.index) != (sampler.epoch, sampler.position):
            raise RuntimeError("data loader and sampler disagree on the step; this is a bug")
        # On CUDA the host runs ahead of the GPU; only steps that log wait for it (``_sync``), and their
        # examples/s covers every step since the last such wait. On CPU every step's clock is exact.
        exact = clock.every_step_exact or self.monitor.due(self.step + 1)
        t_fetched = time.perf_counter()
        t_start = _sync(dist) if exact else t_fetched  # the split excludes earlier steps' GPU work
        torch.manual_seed(_step_seed(cfg.seed, self.step, dist.rank))  # dropout replayable on resume
        # Pinned by the loader on CUDA, so the copy does not wait for the previous step's kernels.
        features = {side: {k: v.to(dist.device, non_blocking=True) for k, v in f.items()}
                    for side, f in batch.features.items()}
        keys = {side: v.to(dist.device, non_blocking=True) for side, v in batch.keys.items()}
        emb = self.engine(features, batch.extents)
        out = self.loss_fn(emb["query"], emb["positive"], emb.get("negative"), keys["positive"], keys.get("negative"),
                           sizes=batch.rank_batch.sizes,
                           # from the plan, no collective (dataset negatives: gathered, see RankBatch)
                           negative_sizes=batch.rank_batch.negative_sizes, known_keys=keys.get("known"))
        self.engine.backward(out.loss)
        t_backward = _sync(dist) if exact else None
        grad_norm = _grad_norm(self.engine) if self.stage == 0 and self.precision == "fp32" else None
        lr = self.engine.get_lr()[0]  # the rate this update uses
        self.engine.step()
        t_end = _sync(dist) if exact else time.perf_counter()
        if cfg.trace_ids:
            _trace(self.run, self.step + 1, batch.rank_batch, sampler.global_batch(sampler.position), out, dist)
        sampler.advance()
        self.step += 1
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        rate = clock.add(out.batch_size, t_end, exact)
        self.monitor.step(self.step, {
            **out.device_stats(), "lr": lr, "grad_norm": grad_norm,  # tensors: read when it logs
            "examples_per_s": rate, "time_data": t_fetched - clock.t_ready if exact else None,
            "time_fwd_bwd": t_backward - t_start if exact else None,
            "time_optimizer": t_end - t_backward if exact else None, "hard_negatives": out.num_hard_negatives,
            "epoch": batch.rank_batch.epoch, "schedule_version": batch.rank_batch.version,
            "staleness": staleness(sampler.schedule, self.step),
            "strategy": sampler.schedule.meta.get("strategy", "?"),
        }, histograms={"pos_sim": out.pos_sims, "hardest_neg_sim": out.hardest_sims})

    def evaluate(self) -> dict:
        """The metrics of ``eval_split``, with those of ``eval_beir`` under ``beir`` (or alone)."""
        args = (self.cfg, self.dist, self.stage, self.monitor, self.step)
        out = _evaluate(self.encoder, self.eval_set, *args) if self.eval_set is not None else None
        if self.beir_set is not None:
            beir = _evaluate(self.encoder, self.beir_set, *args)
            out = beir if out is None else {**out, "beir": beir}
        return out

    def save(self) -> None:
        self.between_steps.flush()  # a checkpoint never names a step whose snapshot is still being written
        _save(self.engine, self.sampler, self.step, self.cfg, self.run / "checkpoints", self.dist)
        self.saved_at = self.step

    def checkpoint_path(self) -> Path:
        return self.run / "checkpoints" / f"step{self.step:08d}"

    # -- 7. Final checkpoint, evaluation, export. ---------------------------------------------------------
    def finish(self, evals: dict, miner, stopped: int = 0) -> dict:
        """The final checkpoint, evaluation, export and ``RUN/summary.json``. ``stopped``: the signal that
        stopped training early; then only the checkpoint is written (no evaluation or export of an unfinished
        run) and the summary says ``completed: false``."""
        cfg, dist, sampler = self.cfg, self.dist, self.sampler
        self.peak_rss["trained"] = _peak_rss_gb()
        if not (stopped and getattr(self, "saved_at", None) == self.step):  # saved at this step already
            self.save()
        if self.evaluates and not stopped:
            evals["after"] = self.evaluate()
        exported = _export(self.engine, self.encoder, cfg, self.manifest, self.run / "export", dist, self.stage,
                           self.precision) if cfg.export and not stopped else {}
        summary = {
            "completed": not stopped,
            "stopped": {"signal": signal_name(stopped), "step": self.step,
                        "checkpoint": str(self.checkpoint_path())} if stopped else None,
            "steps": self.step, "epoch": sampler.epoch, "batch_size": self.batch_size, "world_size": dist.world_size,
            "zero_stage": self.stage, "precision": self.precision, "schedule_version": sampler.version,
            "strategy": sampler.schedule.meta.get("strategy"),
            "examples_per_s": float(np.median(self.clock.rates)) if self.clock.rates else None,
            "steps_per_s": 1.0 / float(np.median(self.clock.step_times)) if self.clock.step_times else None,
            "ranks_in_sync": _ranks_in_sync(self.engine, dist, self.stage), "eval": evals, "export": exported,
            "mode": cfg.mode, "swaps": sampler.history, "num_workers": getattr(self, "workers", None),
            "refresh_wait_seconds": self.between_steps.waited if self.refreshed else None,
            "miner_restarts": miner.restarts if miner is not None else None,
            # per rank: the student's bytes right after loading (a share under ZeRO-3), the process's peak RSS
            # once the student had loaded, once the engine stood, and at the end
            "memory": _per_rank({"student_bytes_at_load": self.loaded_bytes, "peak_rss_gb": _peak_rss_gb(),
                                 **{f"peak_rss_gb_{k}": v for k, v in self.peak_rss.items()}}, dist),
        }
        if dist.is_main:
            write_atomic(self.run / "summary.json", json.dumps(summary, indent=2, default=str).encode())
        self.monitor.close()
        barrier()
        return summary


class Throughput:
    """examples/s and seconds per step over windows that end at a step whose clock is exact: every step on
    CPU; on CUDA the steps that log, where the host waited for the GPU (a window covers the steps since)."""

    def __init__(self, every_step_exact: bool):
        self.every_step_exact = every_step_exact
        self.rates: list[float] = []
        self.step_times: list[float] = []
        self.examples, self.seconds, self.steps = 0, 0.0, 0
        self.t_ready = time.perf_counter()

    def ready(self) -> None:
        """The loop is ready for the next batch: the data wait starts here."""
        self.t_ready = time.perf_counter()

    def add(self, examples: int, t_end: float, exact: bool) -> float | None:
        """Count a step that ended at ``t_end``; the window's examples/s when ``exact`` closes it."""
        self.examples += examples
        self.seconds += t_end - self.t_ready
        self.steps += 1
        if not exact:
            return None
        rate = self.examples / self.seconds
        self.rates.append(rate)
        self.step_times.append(self.seconds / self.steps)
        self.examples, self.seconds, self.steps = 0, 0.0, 0
        return rate


# ======================================================================================================
# The details
# ======================================================================================================


def _banner(cfg, dist: DistInfo, sampler, batch_size, total_steps, stage, precision, step) -> str:
    meta = sampler.schedule.meta
    whole = "whole communities per rank" if sampler.whole_communities else "communities may span ranks"
    return (f"b3stream train: {dist.world_size} rank(s) on {dist.device.type} ({dist.backend}), ZeRO-{stage}, "
            f"{precision}; schedule v{sampler.version} {meta.get('strategy', '?')} |B|={batch_size} "
            f"K={meta.get('K', '-')} h={meta.get('h', '-')} ({whole}); tau={cfg.temperature}; "
            f"{sampler.epoch_steps} steps/epoch, {total_steps} steps"
            + (f", resuming at step {step}" if step else "")
            + (f"; GradCache chunk {cfg.grad_cache_chunk}" if cfg.grad_cache_chunk else ""))


def _quiet_known_noise() -> None:
    """Deprecation notices raised inside DeepSpeed / transformers on every step, not actionable here."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """A per-(step, rank) seed: dropout masks do not depend on what ran before, so resume replays them."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _sync(dist: DistInfo) -> float:
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    return time.perf_counter()


def _grad_norm(engine) -> torch.Tensor | float:
    """Pre-clipping gradient norm for ZeRO-0 fp32, where DeepSpeed does not record one. A device tensor
    (one fused norm over all gradients, no host wait); the monitor reads it when it logs."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else 0.0


def _eval_set(cfg: TrainConfig, manifest: Manifest, prompts: dict[str, str]) -> RetrievalSet | None:
    if not cfg.eval_split:
        return None
    if cfg.eval_split not in manifest.splits:
        raise ConfigError(f"eval_split {cfg.eval_split!r} is not in {cfg.data} (splits: {sorted(manifest.splits)}); "
                          "set eval_split: null to train without evaluation")
    # Seed 0, not cfg.seed: runs with different seeds (and `b3stream evaluate`) score the same queries.
    return RetrievalSet(cfg.data, cfg.eval_split, cfg.eval_max_queries, seed=0, corpus=cfg.eval_corpus,
                        prompts=prompts)


def _encode_shared(encoder: Encoder, texts: list[str], side: str, cfg: TrainConfig, dist: DistInfo,
                   stage: int) -> np.ndarray:
    """Every rank embeds a share of ``texts``; all ranks get all embeddings. Under ZeRO-3 every rank must
    run the same forwards (they gather parameters), so there each embeds everything."""
    if dist.world_size == 1 or stage == 3:
        return encoder.encode(texts, side, batch_size=cfg.eval_batch_size)
    lo, hi = split_bounds(len(texts), dist.world_size, dist.rank)
    mine = torch.from_numpy(encoder.encode(texts[lo:hi], side, batch_size=cfg.eval_batch_size)).to(dist.device)
    if mine.ndim != 2 or mine.shape[1] != encoder.dim:
        mine = mine.reshape(-1, encoder.dim)
    parts = all_gather_rows(mine, gather_sizes(mine.shape[0], dist.device))
    return torch.cat(parts).cpu().numpy()


def _evaluate(encoder, eval_set, cfg, dist, stage, monitor, step) -> dict:
    corpus = _encode_shared(encoder, eval_set.corpus, "positive", cfg, dist, stage)
    queries = _encode_shared(encoder, eval_set.queries, "query", cfg, dist, stage)
    metrics = eval_set.score(queries, corpus)
    monitor.eval(step, metrics, eval_set.label)
    return metrics


def _trace(run: Path, step: int, s, global_ids: np.ndarray, out, dist: DistInfo) -> None:
    """One line per step: the global batch, its schedule version, the loss and the number of extra negatives
    |N| in the denominator (rank 0: trace.jsonl, rank r: trace.rank<r>.jsonl, so a test can check that every
    rank trained the same batches)."""
    name = "trace.jsonl" if dist.is_main else f"trace.rank{dist.rank}.jsonl"
    with open(run / name, "a") as f:
        f.write(json.dumps({"step": step, "epoch": s.epoch, "index": s.index, "version": s.version,
                            "loss": out.global_loss, "negatives": out.num_hard_negatives,
                            "ids": [int(i) for i in global_ids]}) + "\n")


@contextmanager
def _partitioned_loading(ds_config: dict, enabled: bool):
    """Within the block, ``from_pretrained`` builds the model under ``deepspeed.zero.Init`` and loads each rank's
    partition (transformers' DeepSpeed integration, switched on while its ``HfDeepSpeedConfig`` lives). Switched
    off afterwards: a model loaded later (the export's merge, a teacher) is a whole one on one rank."""
    if not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)  # held here: transformers keeps only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def _load_dtype(precision: str, stage: int) -> torch.dtype:
    """The dtype the student's weights are read in: bf16 for a bf16 run (half the host memory of fp32, and
    nothing lost: DeepSpeed casts the module to bf16 before its optimizer makes the fp32 master copy), except
    under ZeRO-3, where zero.Init gives each partition the run's dtype itself. fp32 otherwise (DeepSpeed casts
    an fp16 run's module)."""
    return torch.bfloat16 if precision == "bf16" and stage != 3 else torch.float32


def _local_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameter storage this process holds: of a ZeRO-3 partitioned parameter, its partition."""
    total = 0
    for p in module.parameters():
        held = p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p
        total += held.numel() * held.element_size()
    return int(total)


def _peak_rss_gb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # kB on Linux


def _per_rank(values: dict, dist: DistInfo) -> dict:
    """``{key: [rank 0's value, rank 1's, ...]}`` on every rank."""
    if dist.world_size == 1:
        return {k: [v] for k, v in values.items()}
    import torch.distributed as tdist

    every = [None] * dist.world_size
    tdist.all_gather_object(every, values)
    return {k: [v[k] for v in every] for k in values}


def _ranks_in_sync(engine, dist: DistInfo, stage: int) -> bool | None:
    """True when every rank holds bit-identical trainable weights (data parallelism's invariant; a
    mismatch means a lost gradient reduction). None under ZeRO-3, where no rank holds them all."""
    if stage == 3:
        return None
    import hashlib

    import torch.distributed as tdist

    digest = hashlib.sha256()
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    if dist.world_size == 1:
        return True
    digests = [None] * dist.world_size
    tdist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


# -- checkpoints -----------------------------------------------------------------------------------------


def _save(engine, sampler: ScheduleSampler, step: int, cfg: TrainConfig, folder: Path, dist: DistInfo) -> None:
    """A DeepSpeed checkpoint (trainable weights, optimizer, lr schedule) + the sampler's position."""
    from .checkpoints import portable

    tag = f"step{step:08d}"
    lora = cfg.student.lora.enabled
    engine.save_checkpoint(str(folder), tag=tag, exclude_frozen_parameters=lora,
                           client_state={"step": step, "sampler": portable(sampler.state_dict())})
    barrier()
    if dist.is_main and cfg.keep_checkpoints > 0:
        tags = sorted(p for p in folder.glob("step*") if p.is_dir())
        for old in tags[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _restore(engine, sampler: ScheduleSampler, cfg: TrainConfig, manifest: Manifest, folder: Path,
             dist: DistInfo, schedules: Path | None) -> tuple[int, ScheduleSampler]:
    if not (folder / "latest").is_file():
        return 0, sampler
    path, client = engine.load_checkpoint(str(folder), load_module_strict=not cfg.student.lora.enabled)
    if path is None or not client:
        raise DataError(f"{folder}: could not load the latest checkpoint")
    state = client["sampler"]
    if state["version"] != sampler.version and schedules is not None:
        # Continue on the exact schedule version the run was using, if it is still there.
        saved = version_path(schedules, state["version"])
        if saved.is_file():
            schedule = load_schedule(saved, expect=manifest.stamp("train"))
            sampler = ScheduleSampler(schedule, sampler.n, dist.rank, dist.world_size, seed=cfg.seed,
                                      negatives=cfg.negatives, h_dataset=cfg.h_dataset,
                                      epoch_steps=sampler.epoch_steps)  # the run's, which its budget assumes
    sampler.load_state_dict(state)
    return int(client["step"]), sampler


def check_dataset_negatives(cfg: TrainConfig, manifest: Manifest) -> None:
    """``negatives: dataset | both`` needs stored negatives in the train split: refused before the model
    loads when there are none (the dataset was prepared without ``--negatives-field``)."""
    if cfg.negatives == "mined":
        return
    stored = manifest.split("train").negatives
    if not stored:
        raise ConfigError(f"negatives={cfg.negatives}: the train split of {cfg.data} stores no hard negatives; "
                          "prepare it with --negatives-field FIELD (e.g. neg) or train with negatives=mined")


# -- export ------------------------------------------------------------------------------------------------


def _export(engine, encoder: Encoder, cfg: TrainConfig, manifest: Manifest, out: Path, dist: DistInfo,
            stage: int, precision: str) -> dict:
    prompts = {"query": manifest.prompt(None, "query"), "document": manifest.prompt(None, "positive")}
    for task in manifest.tasks:
        prompts[f"{task}-query"] = manifest.prompt(task, "query")
        prompts[f"{task}-document"] = manifest.prompt(task, "positive")
    paths = {}
    import deepspeed

    # ZeRO-3: parameters are partitioned; gather them on every rank, rank 0 writes
    gathered = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None) \
        if stage == 3 else nullcontext()
    with gathered, (master_weights(engine) if precision != "fp32" else nullcontext(0)) as masters:
        # fp32 master weights where DeepSpeed keeps them; else the weights as trained
        dtype = torch.float32 if masters else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision,
                                                                                                    torch.float32)
        if dist.is_main:
            paths = export_all(encoder, out, prompts, dtype)
    barrier()
    if dist.is_main:
        print(f"exported to {out}: {', '.join(sorted(paths))}" + (f" (fp32 master weights of a {precision} run)"
                                                                  if masters else ""), flush=True)
    return paths

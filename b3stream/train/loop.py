"""The training recipe: config -> data and schedule -> student -> DeepSpeed engine -> loop -> checkpoints
-> evaluation -> export. Read :func:`train` top to bottom; the helpers below it are the details.

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
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, TrainConfig, dump_config, validate
from ..data.manifest import DataError, Manifest
from ..data.reader import ShardedDataset
from ..encoder import Encoder
from ..evaluate import RetrievalSet
from ..files import write_atomic
from ..schedule import ScheduleError, load_schedule, version_path
from ..snapshot import RunPaths
from ..monitor import Monitor
from .collate import step_loader
from . import run_folder
from .distributed import DistInfo, barrier, init_distributed
from .ds_config import build_ds_config, resolve_ds_path, resolve_precision, start_lr_schedule, zero_stage
from .export import export_all
from .hotswap import NotYet, ScheduleWatcher, refresh_due, source_step, wait_for_refresh
from .loss import BatchEmbedder, InfoNCE, all_gather_rows, gather_sizes
from .refreshing import miner_config, miner_process, prepare_run, snapshot, snapshot_due
from .sampler import ScheduleSampler, schedule_batch_size, split_bounds


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run the recipe; returns the run summary (also written to ``RUN/summary.json``). ``progress``: the
    live step bar on a terminal."""
    validate(cfg)  # a config built in code gets the checks load_config makes
    dist = init_distributed()
    run = Path(cfg.out)

    # -- 1. Data and schedule. Everything wrong with the inputs fails here, before the model loads. ----
    manifest = Manifest.load(cfg.data)
    records = ShardedDataset(cfg.data, "train", manifest=manifest, verify=cfg.verify_data)
    schedule = load_schedule(cfg.schedule, expect=manifest.stamp("train"))
    check_dataset_negatives(cfg, manifest)
    sampler = ScheduleSampler(schedule, len(records), dist.rank, dist.world_size, seed=cfg.seed,
                              negatives=cfg.negatives, h_dataset=cfg.h_dataset)
    batch_size = schedule_batch_size(schedule)  # |B|
    total_steps = cfg.max_steps if cfg.max_steps else cfg.epochs * sampler.steps_per_epoch
    precision = resolve_precision(cfg.precision, dist.device)
    ds_config = build_ds_config(cfg, resolve_ds_path(cfg.deepspeed), dist.world_size, batch_size, total_steps,
                                precision, dist.device.type)
    eval_set = _eval_set(cfg, manifest)
    # Refreshed mode: the miner publishes into RUN/schedules (which starts with the given schedule); static
    # mode may watch the given folder for versions published by hand (watch_schedule_every).
    refreshed = cfg.mode == "refreshed"
    paths = RunPaths(run)
    watch_folder = paths.schedules if refreshed else (Path(cfg.schedule) if Path(cfg.schedule).is_dir() else None)
    watch_every = cfg.watch_schedule_every or (1 if refreshed else None)
    # refresh.mine (and the teacher, |B| over the ranks) checked before any output
    mine_cfg = miner_config(cfg, schedule, dist.world_size) if refreshed else None
    # The run folder: new, resumed, or replaced with overwrite; never another's files lost. Every rank
    # decides (so all refuse together) before the main rank changes anything.
    start = run_folder.plan(run, cfg.resume, cfg.overwrite, schedule.path)
    barrier()
    if dist.is_main:
        run_folder.claim(run, start)
        dump_config(cfg, run / "config.yaml")
        if refreshed:
            prepare_run(cfg, schedule, mine_cfg, paths)

    # -- 2. Student: HF encoder + pooling (+ LoRA), wrapped so one forward embeds every side. ----------
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every rank
    encoder = Encoder(cfg.student, trainable=True, dtype=torch.float32)  # DeepSpeed casts for bf16/fp16
    fuse = dist.device.type == "cuda" if cfg.fuse_sides == "auto" else cfg.fuse_sides
    model = BatchEmbedder(encoder, chunk=cfg.grad_cache_chunk, fuse_sides=fuse,
                          pad_id=encoder.tokenizer.pad_token_id or 0)
    loss_fn = InfoNCE(temperature=cfg.temperature, symmetric=cfg.symmetric,
                      mask_duplicates=cfg.mask_duplicate_positives)

    # -- 3. DeepSpeed engine: ZeRO stage, optimizer (AdamW) and warmup/decay schedule from the JSON. ---
    import deepspeed

    _quiet_known_noise()
    ds_log = logging.getLogger("DeepSpeed")
    level = ds_log.level
    ds_log.setLevel(logging.ERROR)  # initialize() warns about reading the lr before the first step
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config)
    ds_log.setLevel(max(level, logging.WARNING))
    stage = zero_stage(ds_config)
    from .checkpoints import weights_only_engine

    weights_only_engine(engine)  # resume unpickles no code (a checkpoint folder need not be trusted)

    # -- 4. Resume: model, optimizer, lr schedule and sampler position from RUN/checkpoints. ----------
    step = 0
    if start == "resume":
        step, sampler = _restore(engine, sampler, cfg, manifest, run / "checkpoints", dist, watch_folder)
    start_lr_schedule(engine.lr_scheduler)  # else the first two updates get warmup_min_lr (0)
    monitor = Monitor(run, total_steps, start_step=step, log_every=cfg.log_every, enabled=dist.is_main,
                      progress=progress)
    monitor.write(_banner(cfg, dist, sampler, batch_size, total_steps, stage, precision, step))
    watcher = ScheduleWatcher(watch_folder, manifest, dist, say=monitor.write) if watch_folder and watch_every \
        else None
    if watcher is not None:
        watcher.accept = lambda schedule: _fits_now(schedule, step, sampler.epoch)
    # (step, epoch, mined apart) of the snapshots whose schedules max_lag_steps may wait for; a resumed run
    # takes its own from before the resume. Seconds waited for them.
    snapshots = _own_snapshots(paths, step) if refreshed and start == "resume" else []
    refresh_wait = 0.0
    # A spawned miner (refreshed mode) runs while the block runs and is stopped however it ends.
    with miner_process(cfg, paths, dist, monitor) as miner:
        # -- 5. Zero-shot / resumed-model evaluation. --------------------------------------------------
        evals = {}
        if eval_set is not None and step == 0:
            evals["before"] = _evaluate(encoder, eval_set, cfg, dist, stage, monitor, step)

        # -- 6. The loop. -------------------------------------------------------------------------------
        # from_pretrained leaves the backbone in eval mode while new LoRA modules start in train mode: set
        # train mode explicitly, so every dropout is on in every run (with or without evaluations, resumed).
        engine.module.train()
        tokenize = encoder.tokenize
        # On CUDA the host runs ahead of the GPU; only steps that log wait for it (``_sync``), and their
        # examples/s covers every step since the last such wait. On CPU every step's clock is exact.
        every_step_exact = dist.device.type != "cuda"
        throughput, step_times = [], []
        window_examples, window_seconds, window_steps = 0, 0.0, 0
        loader = step_loader(records, sampler, tokenize, cfg.num_workers)  # workers live across swaps, epochs
        while step < total_steps:
            t_ready = time.perf_counter()
            for batch in loader:  # the rest of the sampler's current plan; the next pass, the next plan's
                if (batch.step.epoch, batch.step.index) != (sampler.epoch, sampler.position):
                    raise RuntimeError("data loader and sampler disagree on the step; this is a bug")
                exact = every_step_exact or monitor.due(step + 1)
                t_fetched = time.perf_counter()
                t_start = _sync(dist) if exact else t_fetched  # the split excludes earlier steps' GPU work
                torch.manual_seed(_step_seed(cfg.seed, step, dist.rank))  # dropout replayable on resume
                # Pinned by the loader on CUDA, so the copy does not wait for the previous step's kernels.
                features = {side: {k: v.to(dist.device, non_blocking=True) for k, v in f.items()}
                            for side, f in batch.features.items()}
                keys = {side: v.to(dist.device, non_blocking=True) for side, v in batch.keys.items()}
                emb = engine(features, batch.extents)
                out = loss_fn(emb["query"], emb["positive"], emb.get("negative"), keys["positive"],
                              keys.get("negative"), sizes=batch.step.sizes,
                              # from the plan, no collective (dataset negatives: gathered, see Step)
                              negative_sizes=batch.step.negative_sizes)
                engine.backward(out.loss)
                t_backward = _sync(dist) if exact else None
                grad_norm = _grad_norm(engine) if stage == 0 and precision == "fp32" else None
                lr = engine.get_lr()[0]  # the rate this update uses
                engine.step()
                t_end = _sync(dist) if exact else time.perf_counter()
                if cfg.trace_ids:
                    _trace(run, step + 1, batch.step, sampler.global_batch(sampler.position), out, dist)
                sampler.advance()
                step += 1

                if grad_norm is None:
                    grad_norm = engine.get_global_grad_norm()
                window_examples += out.batch_size
                window_seconds += t_end - t_ready
                window_steps += 1
                rate = None
                if exact:
                    rate = window_examples / window_seconds
                    throughput.append(rate)
                    step_times.append(window_seconds / window_steps)
                    window_examples, window_seconds, window_steps = 0, 0.0, 0
                monitor.step(step, {
                    **out.device_stats(), "lr": lr, "grad_norm": grad_norm,  # tensors: read when it logs
                    "examples_per_s": rate, "time_data": t_fetched - t_ready if exact else None,
                    "time_fwd_bwd": t_backward - t_start if exact else None,
                    "time_optimizer": t_end - t_backward if exact else None, "hard_negatives": out.negatives,
                    "epoch": batch.step.epoch, "schedule_version": batch.step.version,
                    "staleness": _staleness(sampler.schedule, step),
                    "strategy": sampler.schedule.meta.get("strategy", "?"),
                }, histograms={"pos_sim": out.pos_sims, "hardest_neg_sim": out.hardest_sims})
                if eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    evals[f"step{step}"] = _evaluate(encoder, eval_set, cfg, dist, stage, monitor, step)
                if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
                    _save(engine, sampler, step, cfg, run / "checkpoints", dist)
                if step >= total_steps:
                    break
                if refreshed and snapshot_due(cfg, step, sampler.epoch > batch.step.epoch, sampler.epoch):
                    trained = sampler.consumed()
                    snapshot(engine, encoder, cfg, manifest, paths, step, sampler.epoch, stage, dist, trained=trained)
                    snapshots.append((step, sampler.epoch, len(trained) > 0))
                if miner is not None:
                    miner.check()
                if watcher is not None and step % watch_every == 0:
                    new = watcher.check(sampler.version)
                    # a snapshot mined apart in an earlier epoch answers nothing now (_fits_now refuses it)
                    due = [s for s, epoch, apart in snapshots if epoch == sampler.epoch or not apart]
                    need = refresh_due(due, step, cfg.refresh.max_lag_steps)  # snapshots: refreshed only
                    if need is not None and source_step(new or sampler.schedule) < need:
                        new, waited = wait_for_refresh(watcher, sampler.version, new, need, cfg.refresh.poll_seconds,
                                                       cfg.refresh.wait_timeout, miner=miner, say=monitor.write)
                        refresh_wait += waited
                        monitor.scalars(step, {"wait_seconds": waited}, group="refresh")
                        snapshots = [x for x in snapshots if x[0] > need]  # a wait that gave up is not repeated
                    if new is not None:
                        _report_swap(monitor, step, sampler.schedule, new, len(sampler.history) + 1)
                        sampler.swap(new, step=step)
                        break  # this pass of the loader follows the old plan; the next, the new one
                t_ready = time.perf_counter()
        loader.close()

        # -- 7. Final checkpoint, evaluation, export. ---------------------------------------------------
        _save(engine, sampler, step, cfg, run / "checkpoints", dist)
        if eval_set is not None:
            evals["after"] = _evaluate(encoder, eval_set, cfg, dist, stage, monitor, step)
        exported = _export(engine, encoder, cfg, manifest, run / "export", dist, stage, precision) if cfg.export else {}
        summary = {
            "steps": step, "epoch": sampler.epoch, "batch_size": batch_size, "world_size": dist.world_size,
            "zero_stage": stage, "precision": precision, "schedule_version": sampler.version,
            "strategy": sampler.schedule.meta.get("strategy"),
            "examples_per_s": float(np.median(throughput)) if throughput else None,
            "steps_per_s": 1.0 / float(np.median(step_times)) if step_times else None,
            "ranks_in_sync": _ranks_in_sync(engine, dist, stage), "eval": evals, "export": exported,
            "mode": cfg.mode, "swaps": sampler.history, "refresh_wait_seconds": refresh_wait if refreshed else None,
            "miner_restarts": miner.restarts if miner is not None else None,
        }
        if dist.is_main:
            write_atomic(run / "summary.json", json.dumps(summary, indent=2, default=str).encode())
        monitor.close()
        barrier()
        return summary


# ======================================================================================================
# The details
# ======================================================================================================


def _banner(cfg, dist: DistInfo, sampler, batch_size, total_steps, stage, precision, step) -> str:
    meta = sampler.schedule.meta
    whole = "whole communities per rank" if sampler.whole_communities else "communities may span ranks"
    return (f"b3stream train: {dist.world_size} rank(s) on {dist.device.type} ({dist.backend}), ZeRO-{stage}, "
            f"{precision}; schedule v{sampler.version} {meta.get('strategy', '?')} |B|={batch_size} "
            f"K={meta.get('K', '-')} h={meta.get('h', '-')} ({whole}); tau={cfg.temperature}; "
            f"{sampler.steps_per_epoch} steps/epoch, {total_steps} steps"
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


def _eval_set(cfg: TrainConfig, manifest: Manifest) -> RetrievalSet | None:
    if not cfg.eval_split:
        return None
    if cfg.eval_split not in manifest.splits:
        raise ConfigError(f"eval_split {cfg.eval_split!r} is not in {cfg.data} (splits: {sorted(manifest.splits)}); "
                          "set eval_split: null to train without evaluation")
    # Seed 0, not cfg.seed: runs with different seeds (and `b3stream evaluate`) score the same queries.
    return RetrievalSet(cfg.data, cfg.eval_split, cfg.eval_max_queries, seed=0, corpus=cfg.eval_corpus)


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
    monitor.eval(step, metrics, eval_set.split)
    return metrics


def _trace(run: Path, step: int, s, global_ids: np.ndarray, out, dist: DistInfo) -> None:
    """One line per step: the global batch, its schedule version, the loss and the number of extra negatives
    |N| in the denominator (rank 0: trace.jsonl, rank r: trace.rank<r>.jsonl, so a test can check that every
    rank trained the same batches)."""
    name = "trace.jsonl" if dist.is_main else f"trace.rank{dist.rank}.jsonl"
    with open(run / name, "a") as f:
        f.write(json.dumps({"step": step, "epoch": s.epoch, "index": s.index, "version": s.version,
                            "loss": out.global_loss, "negatives": out.negatives,
                            "ids": [int(i) for i in global_ids]}) + "\n")


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
                                      negatives=cfg.negatives, h_dataset=cfg.h_dataset)
    sampler.load_state_dict(state)
    return int(client["step"]), sampler


def _fits_now(schedule, step: int, epoch: int) -> None:
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


def _own_snapshots(paths: RunPaths, step: int) -> list[tuple[int, int, bool]]:
    """(step, epoch, mined apart) of the run's snapshots up to ``step``: a resumed run's max_lag_steps
    bound counts the snapshots written before the resume too."""
    from ..snapshot import list_snapshots

    return [(s.step, int(s.meta.get("epoch", 0)), s.trained_ids is not None)
            for s in list_snapshots(paths.run) if s.step <= step]


def check_dataset_negatives(cfg: TrainConfig, manifest: Manifest) -> None:
    """``negatives: dataset | both`` needs stored negatives in the train split: refused before the model
    loads when there are none (the dataset was prepared without ``--negatives-field``)."""
    if cfg.negatives == "mined":
        return
    stored = manifest.split("train").negatives
    if not stored:
        raise ConfigError(f"negatives={cfg.negatives}: the train split of {cfg.data} stores no hard negatives; "
                          "prepare it with --negatives-field FIELD (e.g. neg) or train with negatives=mined")


def _staleness(schedule, step: int) -> int | None:
    """Steps between the snapshot a schedule answers and now (None: mined before training)."""
    source = source_step(schedule)
    return None if source < 0 else step - source


def _report_swap(monitor: Monitor, step: int, old, new, count: int) -> None:
    """Console line + TensorBoard ``refresh/*`` scalars for a swap: the new version, how stale it is, the
    miner's time per stage, and the Theorem-1 bound and in-batch similarity of the upcoming batches under the
    snapshot student's embeddings, for the new schedule and for the one it replaces."""
    meta = new.meta
    q, q_old = meta.get("quality") or {}, meta.get("quality_previous") or {}
    timings = {k: v for k, v in (meta.get("timings") or {}).items() if isinstance(v, (int, float))}
    stale = _staleness(new, step)
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


# -- export ------------------------------------------------------------------------------------------------


def _export(engine, encoder: Encoder, cfg: TrainConfig, manifest: Manifest, out: Path, dist: DistInfo,
            stage: int, precision: str) -> dict:
    prompts = {"query": manifest.prompt(None, "query"), "document": manifest.prompt(None, "positive")}
    for task in manifest.tasks:
        prompts[f"{task}-query"] = manifest.prompt(task, "query")
        prompts[f"{task}-document"] = manifest.prompt(task, "positive")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    paths = {}
    if stage == 3:  # parameters are partitioned: gather them on every rank, rank 0 writes
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if dist.is_main:
                paths = export_all(encoder, out, prompts, dtype)
    elif dist.is_main:
        paths = export_all(encoder, out, prompts, dtype)
    barrier()
    if dist.is_main:
        print(f"exported to {out}: {', '.join(sorted(paths))}", flush=True)
    return paths

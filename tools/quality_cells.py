"""One cell of tools/bench_quality.py's grid (an arm at one |B| and seed): mine its schedule (the teacher
pass shared and timed), train it with `b3stream train` (one epoch or a step budget, no in-run evaluation),
evaluate it by exact search over every split's positives with per-query ranks; the compute-matched random
cell and the validation-only tuning that run cells."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
from quality_arms import REFRESHED_ARMS, SPLITS, STRATEGY_OF, Recipe, base_arm, variant
from quality_data import _cli

from b3stream.evaluate import METRICS, RetrievalSet


def mine(args, data: Path, work: Path, recipe: Recipe, arm: str, batch: int, seed: int) -> tuple[Path, dict]:
    """The schedule for one cell (cached) and its timings. The mining folder is per (teacher, p, m, K), and
    its embeddings are copied from the teacher's first folder, so the teacher runs once per dataset (once
    more for the unprompted texts of b3-noinstr)."""
    from b3stream.config import MineConfig, apply_overrides
    from b3stream.mining.pipeline import run_all
    from b3stream.schedule import load_schedule

    strategy, extra = STRATEGY_OF[base_arm(arm)], variant(recipe, arm)
    teacher = ("minilm" if recipe.teacher is None else Path(recipe.teacher).name) + \
        ("-noinstr" if extra == "-noinstr" else "")
    sched_dir = work / "schedules" / f"{strategy}-B{batch}-s{seed}-{recipe.key(strategy)}{extra}"
    path = sched_dir / "v000000.b3s"
    if path.is_file():
        return path, load_schedule(path).meta
    base = work / "mine" / teacher / "embed-only"
    folder = work / "mine" / teacher / (f"p{recipe.p}-m{recipe.m}-K{recipe.K}{recipe.graph}{recipe.scope}"
                                        + (extra if extra != "-noinstr" else ""))
    if (base / "embeddings" / "embeddings.json").is_file() and not (folder / "embeddings").is_dir():
        shutil.copytree(base / "embeddings", folder / "embeddings")
    # random and task batches need only the embeddings (for their batch-quality figures)
    cfg = MineConfig(data=str(data), out=str(base if strategy in ("random", "task") else folder),
                     task_params=recipe.task_params if base_arm(arm) == "b3-taskp" else None)
    cfg = apply_overrides(cfg, {
        "teacher.max_query_length": recipe.query_length, "teacher.max_positive_length": recipe.positive_length,
        "teacher.model": recipe.teacher, "p": recipe.p, "m": recipe.m, "K": min(recipe.K, batch),
        "batch_size": batch, "h": recipe.h, "seed": seed, "strategy": strategy, "small_tasks": "merge",
        "per_task": recipe.per_task, "edges": recipe.edges, "rank_weights": recipe.rank_weights,
        "partitioner": recipe.partitioner, "quality_temperature": recipe.temperature, "schedule_dir": str(sched_dir), "version": 0,
        "device": args.device, "quality_sample": 1024})
    run_all(cfg, progress=False)
    if not (base / "embeddings" / "embeddings.json").is_file():
        shutil.copytree(Path(cfg.out) / "embeddings", base / "embeddings", dirs_exist_ok=True)
    return path, load_schedule(path).meta


def batch_stats(work: Path, schedule: Path) -> dict:
    """How hard the schedule's in-batch negatives are under the bundled MiniLM teacher's embeddings (the same
    yardstick for every arm): mean negative similarity, and the share of negatives the teacher scores above
    the query's own positive - hard negatives, or false negatives (another function that answers the
    docstring as well), which InfoNCE then pushes away from the query. A member whose positive has the
    query's positive text (a label shared by a class, a duplicate) is no negative, as in the loss
    (``mask_duplicate_positives``); ``same_text_share`` is the share of in-batch pairs masked so. Per task
    (``per_task``, by the query's task) where the data has several."""
    from b3stream.schedule import load_schedule

    emb = work / "mine" / "minilm" / "embed-only" / "embeddings"
    if not (emb / "queries.npy").is_file():
        return {}
    q = np.load(emb / "queries.npy").astype(np.float32)
    pos = np.load(emb / "positives.npy").astype(np.float32)
    keys = np.load(emb / "positive_keys.npy") if (emb / "positive_keys.npy").is_file() else np.arange(len(q))
    tasks = np.load(emb / "tasks.npy") if (emb / "tasks.npy").is_file() else np.zeros(len(q), np.int64)
    names = json.loads((emb / "embeddings.json").read_text()).get("task_names") or ["all"]
    s = load_schedule(schedule)
    members, sims, above, same = [], [], [], []
    for b in range(len(s.offsets) - 1):
        ids = np.asarray(s.ids[s.offsets[b]:s.offsets[b + 1]])
        if len(ids) < 2:
            continue
        scores = q[ids] @ pos[ids].T
        own = np.diag(scores).copy()
        alike = keys[ids][:, None] == keys[ids][None, :]
        others = len(ids) - 1
        same.append((alike.sum(axis=1) - 1) / others)
        scores[alike] = np.nan  # the own positive and every same-text one
        count = (~alike).sum(axis=1)
        with np.errstate(invalid="ignore"):  # a member with no negative left: 0 / 0, NaN, skipped in the means
            sims.append(np.nansum(scores, axis=1) / count)
            above.append((scores > own[:, None]).sum(axis=1) / count)
        members.append(ids)
    members, sims, above, same = (np.concatenate(x) for x in (members, sims, above, same))

    def stats(rows: np.ndarray) -> dict:
        return {"neg_sim_mean": float(np.nanmean(sims[rows])), "neg_above_positive_share":
                float(np.nanmean(above[rows])), "same_text_share": float(np.mean(same[rows]))}

    out = stats(np.ones(len(members), bool))
    if len(names) > 1:
        out["per_task"] = {name: stats(tasks[members] == t) for t, name in enumerate(names)
                           if (tasks[members] == t).any()}
    return out


def encoded_per_epoch(schedule: Path) -> dict:
    """The texts one epoch of ``schedule`` makes the student embed, as the trainer builds its steps: every
    query and positive once, and per step the union of its members' hard negatives not already in the step
    (B3++, random_hn). The compute of the arms differs by these counts (queries are the shorter texts)."""
    from b3stream.schedule import load_schedule

    s = load_schedule(schedule)
    negatives = 0
    if s.negative_ids is not None:
        for b in range(len(s.offsets) - 1):
            ids = np.asarray(s.ids[s.offsets[b]:s.offsets[b + 1]])
            pool = np.unique(np.asarray(s.negative_ids[s.offsets[b]:s.offsets[b + 1]]).ravel())
            negatives += int(np.setdiff1d(pool[pool >= 0], ids).size)
    steps = len(s.offsets) - 1
    return {"queries": len(s.ids), "positives": len(s.ids), "negatives": negatives,
            "documents_per_step": (len(s.ids) + negatives) / steps, "steps": steps}


def teacher_seconds(work: Path, recipe: Recipe) -> float | None:
    """Wall time of the teacher pass over the training split, as its stage record measured it."""
    teacher = "minilm" if recipe.teacher is None else Path(recipe.teacher).name
    rec = work / "mine" / teacher / "embed-only" / "embeddings" / "embeddings.json"
    if not rec.is_file():
        return None
    d = json.loads(rec.read_text())
    return d.get("seconds") or (d.get("timings") or {}).get("total")


def train(args, data: Path, schedule: Path, run: Path, recipe: Recipe, seed: int, arm: str,
          max_steps: int | None = None) -> dict:
    """Train one cell (cached by its summary.json); returns the run summary plus its wall time."""
    done = run / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(run, ignore_errors=True)  # a half-finished run restarts cleanly
    run.mkdir(parents=True)
    overrides = [
        f"data={data}", f"schedule={schedule}", f"out={run}", f"seed={seed}", f"lr={recipe.lr}",
        f"temperature={recipe.temperature}", f"symmetric={str(recipe.symmetric).lower()}",
        f"student.max_query_length={recipe.query_length}",
        f"student.max_positive_length={recipe.positive_length}", f"student.lora.enabled={str(recipe.lora).lower()}",
        f"student.lora.r={recipe.lora_r}", f"student.lora.alpha={2 * recipe.lora_r}", "eval_split=null",
        f"epochs={recipe.epochs}", "num_workers=0", "log_every=20", "save_every=null", "keep_checkpoints=1",
        "resume=false", "verify_data=false", "deepspeed=zero0",
        "overwrite=true",  # the cell's folder already holds this bench's config and log
    ]
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    if arm in REFRESHED_ARMS:
        overrides += ["mode=refreshed", "refresh.keep=1", f"refresh.device={args.device}", "refresh.poll_seconds=0.5",
                      f"refresh.threads={max(1, args.threads // 2)}", "refresh.mine={quality_sample: 512}"]
    if arm in ("b3-refreshed", "b3-bound"):
        overrides.append(f"refresh.every_steps={recipe.refresh_every}")
        if arm == "b3-bound":
            overrides += ["refresh.when=bound", f"refresh.bound_drift={recipe.bound_drift}"]
        if recipe.refresh_lag is not None:
            overrides.append(f"refresh.max_lag_steps={recipe.refresh_lag}")
    if arm in ("random-redrawn", "task-redrawn"):  # new batches (seed + step) for every epoch, before it starts
        overrides += ["refresh.every_epochs=1", "refresh.model=teacher", "refresh.max_lag_steps=0"]
    if arm == "b3-epoch":  # re-mined from the student at every epoch start, before the epoch's first step
        overrides += ["refresh.every_epochs=1", "refresh.model=student", "refresh.max_lag_steps=0"]
    config = run / "bench-train.yaml"
    config.write_text("")  # every value comes from the overrides; the file documents nothing else
    seconds = _cli(args, "train", "--config", str(config), "--quiet", *overrides, log=run / "train.log")
    summary = json.loads((run / "summary.json").read_text())
    out = {"summary": summary, "train_seconds": seconds, "overrides": overrides,
           "refreshes": _refreshes(run) if arm in REFRESHED_ARMS else None,
           "probes": _probes(run) if arm == "b3-bound" else None}
    done.write_text(json.dumps(out, indent=2, default=str))
    return out


def _refreshes(run: Path) -> list[dict]:
    """Each schedule the background miner published in this run: version, source step, its mining time."""
    out = []
    for side in sorted((run / "schedules").glob("v*.json")):
        meta = json.loads(side.read_text())
        m = meta.get("meta", meta)
        out.append({"version": side.stem, "source_step": m.get("source_step"),
                    "timings": meta.get("timings") or m.get("timings"), "embed_kept": m.get("embed_kept"),
                    "theorem1_bound": (m.get("quality") or {}).get("theorem1_bound"),
                    "quality": m.get("quality"), "quality_previous": m.get("quality_previous")})
    return out


def _probes(run: Path) -> list[dict] | None:
    """refresh.when: bound - the miner's decision at every snapshot it probed (from its status file)."""
    status = run / "refresh" / "status.json"
    return json.loads(status.read_text()).get("probes") if status.is_file() else None


def per_query_file(folder: Path, split: str, task: str | None = None) -> Path:
    return folder / (f"{split}.jsonl" if task is None else f"{split}.{task}.jsonl")


def evaluate(args, data: Path, model: str | None, folder: Path, recipe: Recipe) -> dict:
    """Validation and test metrics of ``model`` (an export folder; None: the zero-shot MiniLM) with
    ``--corpus all``; the corpus is embedded once and shared by both splits. On the mixture each task's
    queries are searched among that task's documents only (as MMEB scores each dataset against its own
    candidates), and a split's metrics are the mean over tasks (MMEB's average), with ``per_task`` beside."""
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    import torch

    from b3stream.evaluate import encoder_config_for, evaluate_encoder
    from b3stream.encoder import Encoder

    torch.set_num_threads(args.threads)
    folder.mkdir(parents=True, exist_ok=True)
    if model and (Path(model) / "sentence-transformers" / "modules.json").is_file():
        model = str(Path(model) / "sentence-transformers")
    cfg = encoder_config_for(model)
    cfg.max_query_length, cfg.max_positive_length = recipe.query_length, recipe.positive_length
    encoder = Encoder(cfg, trainable=False, device=args.device if args.device == "cpu" else "cuda")
    from b3stream.data.manifest import Manifest
    from b3stream.evaluate import prompted_pairs

    tasks = Manifest.load(data).tasks if args.dataset == "mixture" else [None]
    t0 = time.perf_counter()
    pairs = prompted_pairs(data, prompts=encoder.prompts)  # one pass over the shards for every task and split
    out = {s: {"per_task": {}} for s in SPLITS}
    for task in tasks:
        sets = {s: RetrievalSet(data, s, corpus="all", task=task, pairs=pairs) for s in SPLITS}
        corpus = encoder.encode(sets["test"].corpus, "positive", batch_size=128)
        for s, es in sets.items():
            if not es.queries:  # a task the group split left without queries here
                continue
            out[s]["per_task"][task] = evaluate_encoder(encoder, data, s, eval_set=es, corpus_emb=corpus,
                                                        per_query=per_query_file(folder, s, task), batch_size=128)
    for s in SPLITS:
        per_task = out[s].pop("per_task")
        if tasks == [None]:
            out[s] = per_task[None]
        else:
            out[s] = {m: float(np.mean([v[m] for v in per_task.values()])) for m in METRICS}
            out[s].update(per_task=per_task, queries=sum(v["queries"] for v in per_task.values()),
                          corpus=sum(v["corpus"] for v in per_task.values()))
    out["eval_seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(out, indent=2))
    return out


def is_cached(args, work: Path, recipe: Recipe, arm: str, batch: int, seed: int) -> bool:
    if "@" in arm:
        recipe = dataclasses.replace(recipe, teacher=args.teachers[arm.partition("@")[2]])
    return (work / "eval" / f"{base_arm(arm)}-B{batch}-s{seed}-{recipe.key(arm)}" / "metrics.json").is_file()


def run_cell(args, data, work, recipe, arm, batch, seed, extra_steps: int | None = None) -> dict:
    strategy = STRATEGY_OF[base_arm(arm)]
    if "@" in arm:
        recipe = dataclasses.replace(recipe, teacher=args.teachers[arm.partition("@")[2]])
    if base_arm(arm) == "b3-noinstr":
        data = args.data_noinstr
    t0 = time.perf_counter()
    schedule, meta = mine(args, data, work, recipe, arm, batch, seed)
    mine_seconds = time.perf_counter() - t0
    name = f"{base_arm(arm)}-B{batch}-s{seed}-{recipe.key(arm)}"
    run = work / "runs" / name
    steps = None
    if extra_steps is not None:
        steps = int(meta["num_batches"]) + extra_steps
    trained = train(args, data, schedule, run, recipe, seed, base_arm(arm), max_steps=steps)
    metrics = evaluate(args, data, str(run / "export"), work / "eval" / name, recipe)
    print(f"  {arm:15s} |B|={batch:3d} seed {seed}: val nDCG@10 {metrics['validation']['ndcg@10']:.4f}  "
          f"test nDCG@10 {metrics['test']['ndcg@10']:.4f}  ({trained['train_seconds']:.0f} s train)", flush=True)
    return {"arm": arm, "strategy": strategy, "batch_size": batch, "seed": seed, "recipe": dataclasses.asdict(recipe),
            "schedule": str(schedule), "schedule_meta": meta, "mine_seconds_this_cell": mine_seconds,
            "train": trained, "metrics": metrics, "eval_dir": str(work / "eval" / name), "max_steps": steps,
            "batch_stats": batch_stats(work, schedule), "encoded": encoded_per_epoch(schedule)}


def compute_matched(args, data, work, recipe: Recipe, cells: dict, batch: int, seed: int) -> dict:
    """Random batches given the teacher pass's cost as extra steps: the teacher's measured wall time over
    the training split, times the steps per second random training measured here (same machine, same
    load). The FLOP estimate is recorded beside it: the teacher embeds N queries and N positives (2N
    forwards), a step runs forward + backward (about 3 forwards) over |B| queries and |B| positives, so the
    pass is worth about N / (3 |B|) steps for a teacher the size of the student."""
    rnd = next(c for c in cells[("random", batch)] if c["seed"] == seed)
    secs = teacher_seconds(work, recipe)
    per_s = rnd["train"]["summary"].get("steps_per_s")
    n = int(rnd["schedule_meta"]["n"])
    extra = max(1, round(secs * per_s)) if secs and per_s else max(1, round(n / (3 * batch)))
    cell = run_cell(args, data, work, recipe, "random+compute", batch, seed, extra_steps=extra)
    cell.update(extra_steps=extra, teacher_seconds=secs, flop_estimate_steps=n / (3 * batch))
    return cell


def tune(args, data, work, recipe: Recipe) -> tuple[Recipe, list[dict]]:
    """Coordinate search on validation nDCG@10 at |B| = 32 (or the first batch size), seed 0: lr and
    temperature on random batches (so the baseline gets the same care), then p, m, K, h on b3 / b3pp."""
    sizes = sorted({b for _, batches, _ in args.blocks for b in batches})
    batch = 32 if 32 in sizes else sizes[0]
    grid = [("random", "lr", [1e-4, 2e-4, 5e-4]), ("random", "temperature", [0.02, 0.05, 0.1]),
            ("b3", "p", [0, 3, 10]), ("b3", "m", [10, 30, 60]), ("b3", "K", [4, 8, 16]), ("b3pp", "h", [1, 2, 4])]
    trials = []
    for arm, knob, values in grid:
        scores = {}
        for v in values:
            r = dataclasses.replace(recipe, **{knob: v})
            if knob == "K" and v > batch:
                continue
            cell = run_cell(args, data, work, r, arm, batch, 0)
            scores[v] = cell["metrics"]["validation"]["ndcg@10"]
            trials.append({"arm": arm, "knob": knob, "value": v, "recipe": dataclasses.asdict(r),
                           "validation_ndcg@10": scores[v]})
        best = max(scores, key=scores.get)
        print(f"tune {knob}: {scores} -> {best}", flush=True)
        recipe = dataclasses.replace(recipe, **{knob: best})
    return recipe, trials

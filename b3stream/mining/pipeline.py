"""The mining pipeline: one function per stage, each reading and writing files under ``cfg.out``.

    OUT/embeddings/  queries.npy positives.npy tasks.npy embeddings.json      (embed)
    OUT/rank/        S.npy scores.npy top.npy rank.json                       (rank)
    OUT/partition/   communities.npy community_task.npy partition.json        (partition)
    OUT/schedules/   v000000.b3s (+ .json sidecar with timings)              (schedule)

:func:`run_all` runs what the strategy needs (random/task: embed for quality; gcbs: + rank; b3: + partition;
b3pp: + rank and partition) and skips a stage whose record says it was built from the same inputs and
parameters; each stage function run on its own always rebuilds. Every record carries the data stamp; when
``cfg.data`` is given, artefacts stamped for other data are refused (:class:`DataError`). All checks of
parameters and inputs run before a stage writes anything, and a stage deletes its old record before it
replaces its arrays, so a failed stage leaves no output that looks valid.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from ..progress import progress_bar

from ..config import ConfigError, MineConfig
from ..data.manifest import DataError, Manifest, check_stamp, sha256_file
from .artefacts import log, new_token, read_record, same_params, staged_arrays, sweep_temps, write_json
from .embed import (FOLDER as EMBED_FOLDER, Embeddings, SnapshotModel, embed, embed_params, expected_stamp,
                    load_embeddings, load_trained_ids)
from .rank import (FOLDER as RANK_FOLDER, RECORD as RANK_RECORD, RankParams, check_sizes, merge_threshold,
                   rank, split_trained, task_groups)
from ..schedule import Schedule, publish_schedule, version_path
from .strategies import BatchInputs, BatchParams, get_strategy, make_batches

PARTITION_FOLDER, PARTITION_RECORD = "partition", "partition.json"
TOP_FILE = "top.npy"  # T: the top-p ranks each query skipped (see rank.py), next to S.npy
SCHEDULE_FOLDER = "schedules"
STAGES = ("embed", "rank", "partition", "schedule")
NEEDS = {"random": (), "task": (), "gcbs": ("rank",), "b3": ("rank", "partition"),
         "b3pp": ("rank", "partition"), "random_hn": ("rank",), "task_hn": ("rank",)}


def out_dir(cfg: MineConfig, folder: str) -> Path:
    return Path(cfg.out) / folder


def _check(record_stamp: dict | None, expect: dict | None, what: str) -> None:
    if expect is not None:
        check_stamp(record_stamp, expect, what)


def _embeddings(cfg: MineConfig) -> Embeddings:
    return load_embeddings(out_dir(cfg, EMBED_FOLDER), expect=expected_stamp(cfg))


# --------------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------------


def embed_stage(cfg: MineConfig, progress: bool = True, student: SnapshotModel | None = None) -> Path:
    """Stage 1 (:mod:`b3stream.mining.embed`): resumable; skips work already done for the same inputs.
    ``student``: the snapshot ``cfg.student_snapshot`` names, as refreshed mode's miner read it."""
    t0 = time.perf_counter()
    folder = embed(cfg, progress=progress, student=student)
    record = read_record(folder / "embeddings.json")
    from ..dist import world

    if record is not None and "seconds" not in record and world()[0] == 0:
        record["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(folder / "embeddings.json", record)
    return folder


def rank_params(cfg: MineConfig, emb_record: dict) -> dict:
    prm = asdict(RankParams.from_config(cfg))
    prm.pop("query_chunk")
    return {**prm, "upstream": emb_record.get("token"),
            **({"trained_ids": sha256_file(cfg.trained_ids)[:16]} if cfg.trained_ids else {})}


def rank_stage(cfg: MineConfig, progress: bool = True) -> Path:
    """Stage 2 (:mod:`b3stream.mining.rank`): embeddings -> S, scores, T (the skipped top-p)."""
    t0 = time.perf_counter()
    emb = _embeddings(cfg)
    prm = RankParams.from_config(cfg)
    folder = out_dir(cfg, RANK_FOLDER)
    trained = load_trained_ids(cfg.trained_ids, emb.n)
    # validates before writing; on the miner's device (refresh.device / --device), GPU N for cuda:N
    S, scores, T, info = rank(emb, prm, progress=progress, trained=trained, device=cfg.device)
    (folder / RANK_RECORD).unlink(missing_ok=True)
    with staged_arrays(folder) as put:
        put("S.npy", S.astype(np.int32))
        put("scores.npy", scores.astype(np.float16))
        put(TOP_FILE, T.astype(np.int32))
    write_json(folder / RANK_RECORD, {
        "stamp": emb.stamp, "params": rank_params(cfg, emb.record), "n": emb.n, "m": int(S.shape[1]),
        "info": info, "top": {"file": TOP_FILE, "p": int(T.shape[1]), "shape": list(T.shape)},
        "token": new_token(), "seconds": round(time.perf_counter() - t0, 3),
        "source_model": emb.record.get("source_model"),
    })
    log.info("rank: S %s written to %s (%d padded rows)", S.shape, folder, info["padded_rows"])
    return folder


def load_rank(cfg: MineConfig, expect: dict | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """(S, scores, T, record) of the rank stage, memory-mapped. ``T`` (the skipped top-p) is None for rank
    output written before T was kept; the strategies that need it (b3pp) refuse that output."""
    folder = out_dir(cfg, RANK_FOLDER)
    record = read_record(folder / RANK_RECORD)
    if record is None:
        raise DataError(f"{folder}: no neighbour lists ({RANK_RECORD}); run `b3stream mine rank` first")
    _check(record.get("stamp"), expect, f"neighbour lists {folder}")
    S = np.load(folder / "S.npy", mmap_mode="r")
    scores = np.load(folder / "scores.npy", mmap_mode="r")
    if S.shape[0] != record["n"] or scores.shape != S.shape:
        raise DataError(f"{folder}: S {S.shape} / scores {scores.shape} disagree with the record (n={record['n']})")
    T = None
    if record.get("top") is not None:
        T = np.load(folder / TOP_FILE, mmap_mode="r")
        if list(T.shape) != [record["n"], record["top"]["p"]]:
            raise DataError(f"{folder}: top-p lists {T.shape} disagree with the record (n={record['n']}, "
                            f"p={record['top']['p']})")
    return S, scores, T, record


def _tasks(cfg: MineConfig, n: int | None = None) -> tuple[np.ndarray, list[str], dict | None]:
    """Task index per id: from the embeddings when present, else from the dataset, else one task."""
    folder = out_dir(cfg, EMBED_FOLDER)
    if (folder / "embeddings.json").is_file():
        emb = _embeddings(cfg)
        return np.asarray(emb.tasks), emb.task_names, emb.stamp
    if cfg.data is not None:
        from ..data.reader import ShardedDataset

        ds = ShardedDataset(cfg.data, cfg.split, verify=cfg.verify_data)
        names = [t or "default" for t in ds.column("task")]
        task_names = list(dict.fromkeys(names))
        lookup = {t: i for i, t in enumerate(task_names)}
        return np.array([lookup[t] for t in names], dtype=np.int32), task_names, ds.stamp
    if n is not None:
        return np.zeros(n, dtype=np.int32), ["default"], None
    raise ConfigError("no embeddings and no --data: nothing says which ids exist; run the embed stage first")


def partition_params(cfg: MineConfig, rank_record: dict) -> dict:
    return {"K": cfg.K, "edges": cfg.edges, "rank_weights": cfg.rank_weights, "seed": cfg.seed,
            "partitioner": cfg.partitioner,
            **({"metis_ufactor": cfg.metis_ufactor} if cfg.partitioner == "metis" else
               {"kaminpar_context": cfg.kaminpar_context}),
            "per_task": cfg.per_task, "upstream": rank_record.get("token"),
            **({"trained_ids": sha256_file(cfg.trained_ids)[:16]} if cfg.trained_ids else {})}


def partition_stage(cfg: MineConfig, progress: bool = True) -> Path:
    """Stage 3 (:mod:`b3stream.mining.graph` + :mod:`b3stream.mining.partition`): S -> communities."""
    from .graph import EDGES
    from .partition import KAMINPAR_FILE, check_partitioner

    t0 = time.perf_counter()
    if cfg.K < 1:
        raise ConfigError(f"K must be positive, got {cfg.K}")
    check_partitioner(cfg.partitioner, cfg.kaminpar_context)
    sweep_temps(cfg.out, names=[KAMINPAR_FILE])  # a graph file a killed partition left behind
    if cfg.edges not in EDGES:
        raise ConfigError(f"edges must be one of {EDGES}, got {cfg.edges!r}")
    expect = expected_stamp(cfg)
    S, _, _, rank_record = load_rank(cfg, expect)
    N = len(S)
    tasks, task_names, _ = _tasks(cfg, N)
    rp = rank_record.get("params", {})
    merge_below = merge_threshold(rp.get("small_tasks", "error"), rp.get("p", cfg.p), rp.get("m", cfg.m))
    folder = out_dir(cfg, PARTITION_FOLDER)
    communities, community_task, info = cut_communities(S, tasks, task_names, cfg, merge_below,
                                                        load_trained_ids(cfg.trained_ids, N), progress)
    (folder / PARTITION_RECORD).unlink(missing_ok=True)
    with staged_arrays(folder) as put:
        put("communities.npy", communities)
        put("community_task.npy", community_task)
    write_json(folder / PARTITION_RECORD, {
        "stamp": rank_record["stamp"], "params": partition_params(cfg, rank_record), "n": N,
        "communities": int(len(communities)), "groups": info, "token": new_token(),
        "seconds": round(time.perf_counter() - t0, 3),
    })
    return folder


def cut_communities(S: np.ndarray, tasks: np.ndarray, task_names: list[str], cfg: MineConfig, merge_below: int = 0,
                    trained: np.ndarray | None = None, progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(communities, community_task, info per group): the partition stage's work on arrays. Each group mined
    apart (a task, the merged small tasks, everything) and, with ``trained`` (a mask of the ids trained this
    epoch), its trained and untrained ids apart, is cut into communities of ``cfg.K``."""
    from .graph import Relabel, build_graph, subgraph_rows
    from .partition import partition

    N = len(S)
    groups = split_trained(task_groups(tasks, task_names, cfg.per_task, merge_below), trained)
    all_comm, all_task, info = [], [], {}
    relabel = Relabel(N)
    for label, name, ids in progress_bar(groups, desc="partition", unit="task",
                                         disable=not progress or len(groups) < 2, file=sys.stderr):
        t1 = time.perf_counter()
        local = subgraph_rows(S, ids, N, relabel)
        graph = build_graph(local, edges=cfg.edges, rank_weights=cfg.rank_weights)
        del local
        t_graph = time.perf_counter() - t1
        comm, stats = partition(graph, cfg.K, seed=cfg.seed, ufactor=cfg.metis_ufactor, ids=ids,
                                partitioner=cfg.partitioner, threads=cfg.partition_threads,
                                context=cfg.kaminpar_context, workdir=cfg.out)
        stats.update(graph.stats, graph_s=round(t_graph, 3))
        del graph
        info[label] = stats
        all_comm.append(comm)
        # communities of merged small tasks (or of everything) are batched as one group: task index -1
        all_task.append(np.full(len(comm), task_names.index(name) if name in task_names else -1, dtype=np.int32))
        log.info("partition %s: %d nodes, %d edges (%s), %d communities of K=%d, %.0f%% of edges inside, "
                 "%d repair moves (%s)", label, stats["n"], stats["edges"], cfg.edges, stats["communities"],
                 cfg.K, 100 * stats.get("internal_edge_fraction", 0), stats.get("evicted", 0), cfg.partitioner)
    communities = np.concatenate(all_comm) if all_comm else np.zeros((0, cfg.K), np.int32)
    community_task = np.concatenate(all_task) if all_task else np.zeros(0, np.int32)
    return communities, community_task, info


def load_partition(cfg: MineConfig, expect: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    folder = out_dir(cfg, PARTITION_FOLDER)
    record = read_record(folder / PARTITION_RECORD)
    if record is None:
        raise DataError(f"{folder}: no communities ({PARTITION_RECORD}); run `b3stream mine partition` first")
    _check(record.get("stamp"), expect, f"communities {folder}")
    return np.load(folder / "communities.npy"), np.load(folder / "community_task.npy"), record


def check_seed_and_version(cfg: MineConfig, stage: str = "schedule") -> None:
    """Refuse, before any work, a negative seed or version and an explicit version that exists already
    (unless ``cfg.overwrite``): numpy and METIS reject or reinterpret negative seeds deep inside a stage, a
    negative version has no file name, and replacing a version under a run that trained on it would keep
    that run from resuming on the schedule it used."""
    if cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed}")
    if cfg.version is not None and cfg.version < 0:
        raise ConfigError(f"schedule version must be a non-negative integer, got {cfg.version}")
    if stage in ("schedule", "all") and cfg.version is not None and not cfg.overwrite:
        # the folder the schedule stage publishes into (a refresh run may point it elsewhere)
        folder = Path(cfg.schedule_dir) if getattr(cfg, "schedule_dir", None) else out_dir(cfg, SCHEDULE_FOLDER)
        path = version_path(folder, cfg.version)
        if path.exists():
            raise ConfigError(f"schedule version {cfg.version} exists already ({path}); a run trained on it could "
                              "no longer resume on it. Leave --version out (next free version), pick another "
                              "one, or pass --overwrite to replace it")


def schedule_stage(cfg: MineConfig, progress: bool = True) -> Path:
    """Stage 4 (:mod:`b3stream.mining.strategies`): artefacts -> a published, versioned schedule."""
    t0 = time.perf_counter()
    check_seed_and_version(cfg)
    strategy = get_strategy(cfg.strategy)
    prm = BatchParams.from_config(cfg)
    strategy.check_params(prm)
    S, scores, top, communities, community_task, records = _mined_inputs(cfg, strategy)
    n_hint = len(S) if S is not None else (records["partition"]["n"] if "partition" in records else None)
    tasks, task_names, stamp = _tasks(cfg, n_hint)
    emb = _embeddings(cfg) if (out_dir(cfg, EMBED_FOLDER) / "embeddings.json").is_file() else None
    for what, rec in records.items():
        if stamp is not None and rec.get("stamp") != stamp:
            raise DataError(f"the {what} stage's output was built for other data than the embeddings; re-run it")
    stamp = stamp or next((r["stamp"] for r in records.values()), None)
    n = len(tasks)
    trained = load_trained_ids(cfg.trained_ids, n)  # a refresh: the ids the trainer has trained this epoch
    inputs = BatchInputs(n=n, tasks=tasks, task_names=task_names, S=S, scores=scores, top=top,
                         communities=communities, community_task=community_task,
                         keys=emb.keys if emb is not None else None,
                         known=emb.known if emb is not None else None, trained=trained)
    batches, negatives, extra, batch_task = plan_batches(cfg, inputs, prm)
    # p, m, margin, edges describe the artefacts the batches came from, which may predate this config.
    rank_rec = records.get("rank") or read_record(out_dir(cfg, RANK_FOLDER) / RANK_RECORD) or {}
    meta = _schedule_meta(cfg, strategy, rank_rec, records.get("partition", {}).get("params", {}), emb,
                          trained, has_negatives=negatives is not None)
    meta.update(data=stamp, n=n, num_batches=len(batches), tasks=task_names, **extra)
    schedule = Schedule.from_batches(batches, meta, negatives, batch_task=batch_task)
    schedule.check_epoch(n)
    t_sched = time.perf_counter() - t0
    timings = {name: rec.get("seconds") for name, rec in records.items()}
    if rank_rec and "rank" not in timings:  # b3 reads only the communities, but its cost includes ranking
        timings["rank"] = rank_rec.get("seconds")
    publish_to = Path(cfg.schedule_dir) if cfg.schedule_dir else out_dir(cfg, SCHEDULE_FOLDER)
    if emb is not None:
        timings["embed"] = emb.record.get("seconds")
    timings["schedule"] = round(t_sched, 3)
    if emb is not None and cfg.quality_sample != 0:
        t1 = time.perf_counter()
        _score_schedule(cfg, schedule, emb, trained, _previous_schedule(publish_to, stamp, below=cfg.version),
                        progress)
        timings["quality"] = round(time.perf_counter() - t1, 3)
    schedule.meta["timings"] = timings
    path = publish_schedule(schedule, publish_to, cfg.version, overwrite=cfg.overwrite)
    q = schedule.meta.get("quality")
    log.info("schedule: %s, %d batches (%s)%s", path, len(batches), cfg.strategy,
             f"; Theorem-1 bound {q['theorem1_bound']:.3f}, in-batch negative similarity mean "
             f"{q['neg_sim_mean']:.3f}, hardest {q['neg_sim_hardest_mean']:.3f}" if q else "")
    return path


def plan_batches(cfg: MineConfig, inputs: BatchInputs, prm: BatchParams | None = None
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None, dict, np.ndarray | None]:
    """(batches, hard negatives or None, strategy metadata, each batch's task or None): the schedule stage's
    batching of ``inputs`` (with ``inputs.trained``, the ids to come apart from the trained ones)."""
    batches, negatives, extra = make_batches(cfg.strategy, inputs, prm or BatchParams.from_config(cfg))
    batch_task = _batch_tasks(batches, inputs.tasks) if _tasks_apart(cfg, inputs.task_names) else None
    return batches, negatives, extra, batch_task


def _mined_inputs(cfg: MineConfig, strategy) -> tuple:
    """(S, scores, top, communities, community_task, records): the mining artefacts ``strategy`` reads, each
    checked against the data stamp and, for communities, against the neighbour lists they were cut from."""
    expect = expected_stamp(cfg)
    S = scores = top = communities = community_task = None
    records: dict[str, dict] = {}
    if {"S", "scores", "top"} & set(strategy.needs):
        S, scores, top, records["rank"] = load_rank(cfg, expect)
        if "top" in strategy.needs and top is None:
            raise DataError(f"{out_dir(cfg, RANK_FOLDER)}: the neighbour lists have no top-p lists ({TOP_FILE}), "
                            f"which {cfg.strategy} needs to keep each member's likely false negatives out of the "
                            "batch's hard negatives; re-run `b3stream mine rank`")
    if "communities" in strategy.needs:
        communities, community_task, records["partition"] = load_partition(cfg, expect)
        # The communities must come from the neighbour lists now in OUT/rank, also for b3, which reads no S
        # itself: after a rank re-run (other p, m, data or teacher) the old communities would be batched under
        # the new lists' p and m (the metadata reads them from the rank record).
        current = records.get("rank") or read_record(out_dir(cfg, RANK_FOLDER) / RANK_RECORD)
        if current is None:
            raise DataError(f"{out_dir(cfg, RANK_FOLDER)}: no neighbour lists ({RANK_RECORD}), so nothing shows "
                            f"that the communities in {out_dir(cfg, PARTITION_FOLDER)} are current; re-run "
                            "`b3stream mine rank` and `b3stream mine partition`")
        if records["partition"]["params"].get("upstream") != current.get("token"):
            raise ConfigError(f"the communities in {out_dir(cfg, PARTITION_FOLDER)} were built from other neighbour "
                              f"lists than those now in {out_dir(cfg, RANK_FOLDER)} (the rank stage ran again "
                              "since); re-run `b3stream mine partition`")
        if records["partition"]["params"].get("K") != cfg.K:
            raise ConfigError(f"the communities have K={records['partition']['params'].get('K')} but K={cfg.K} "
                              "was asked for; re-run the partition stage with this K")
    return S, scores, top, communities, community_task, records


def _schedule_meta(cfg: MineConfig, strategy, rp: dict, pp: dict, emb, trained: np.ndarray | None,
                   has_negatives: bool) -> dict:
    """The schedule's metadata from the config and the records of the artefacts it was built from (``rp``
    the rank record, ``pp`` the partition stage's parameters); p, m, K, edges only where the strategy read them."""
    uses_s, uses_k = bool(set(strategy.needs) & {"S", "communities"}), strategy.uses_communities
    params = rp.get("params", {})
    return {
        "strategy": cfg.strategy, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "p": params.get("p") if uses_s else None, "m": params.get("m") if uses_s else None,
        "K": cfg.K if uses_k else None,
        "h": cfg.h if has_negatives else None, "per_task": cfg.per_task, "mix_tasks": cfg.mix_tasks,
        "edges": pp.get("edges") if uses_k else None, "rank_weights": pp.get("rank_weights") if uses_k else None,
        "partitioner": pp.get("partitioner") if uses_k else None,
        "source_model": emb.record.get("source_model") if emb is not None else None,
        "teacher": emb.record.get("teacher") if emb is not None else None,
        "source_step": cfg.source_step if cfg.source_step is not None else
        (emb.record.get("source_step") if emb is not None else None),
        "margin": params.get("margin") if uses_s else None,
        "task_params": params.get("task_params") if uses_s else None,
        # the examples' stored negatives, which the trainer adds with `negatives: dataset | both`
        "dataset_negatives": Manifest.load(cfg.data).split(cfg.split).negatives if cfg.data else None,
        # A refresh: the snapshot's epoch, and how many of its ids were mined apart as already trained then
        # (such a schedule's communities fit that epoch's remainder only; the trainer refuses it in another).
        **({"source_epoch": cfg.source_epoch,
            "trained_apart": int(trained.sum()) if trained is not None else 0,
            # rows of trained ids the embed stage kept from an earlier model instead of embedding (embed.py)
            "embed_kept": (emb.record.get("kept") or {}).get("rows", 0) if emb is not None else 0}
           if cfg.source_epoch is not None else {}),
    }


def _score_schedule(cfg: MineConfig, schedule: Schedule, emb, trained: np.ndarray | None,
                    previous: Schedule | None, progress: bool) -> None:
    """Theorem-1 bound and in-batch negative similarities of ``schedule`` (meta ``quality``) and of the schedule
    it will replace, scored under the same (newer) embeddings (``quality_previous``): whether a refresh actually
    makes the upcoming batches harder for the model the embeddings came from."""
    from .quality import batch_quality, query_sample

    # A refresh scores the batches still to come: the ids the trainer has not trained this epoch (it
    # skips the others after the swap), as they will be batched in each schedule; they are the bound's whole
    # data (its queries, global top-K and floor log(N/K); the trained ids' rows may be stale), which the
    # record's scope and N say.
    to_come = None if trained is None else ~trained
    # One global top-K pass for the sampled queries, shared by both schedules scored below: exact for every
    # query, else the two-phase estimate (quality.py), whose candidates include the rank stage's neighbour
    # lists when they were built from these embeddings; on the miner's device.
    scored = query_sample(emb.queries, emb.positives, K=cfg.K, sample=cfg.quality_sample, seed=0,
                          progress=progress, universe=None if to_come is None else np.flatnonzero(to_come),
                          neighbours=_quality_neighbours(cfg, emb), device=_quality_device(cfg))

    def score(s: Schedule) -> dict:
        ids, offsets, negatives = _upcoming(s, to_come)
        return {**batch_quality(ids, offsets, emb.queries, emb.positives, K=cfg.K,
                                temperature=cfg.quality_temperature, negatives=negatives,
                                sample=cfg.quality_sample, seed=0, scored=scored, only=to_come),
                "scope": "all ids" if to_come is None else "ids to come"}

    schedule.meta["quality"] = score(schedule)
    if previous is not None:
        schedule.meta["quality_previous"] = {**score(previous), "version": previous.version}


def _quality_neighbours(cfg: MineConfig, emb) -> tuple[np.ndarray, np.ndarray] | None:
    """(T, S) of the rank stage, memory-mapped, when they were ranked from these very embeddings (their
    record's upstream token is the embeddings'): each sampled query's top p + m positives, candidates for its
    global top-K in the bound's estimate. None otherwise (no rank stage run, or one of other embeddings)."""
    record = read_record(out_dir(cfg, RANK_FOLDER) / RANK_RECORD)
    if not record or record.get("top") is None or emb.record.get("token") is None or \
            (record.get("params") or {}).get("upstream") != emb.record.get("token"):
        return None
    try:
        S, _, T, _ = load_rank(cfg, emb.stamp)
    except (DataError, OSError, ValueError):
        return None
    return (T, S) if T is not None and len(S) == emb.n else None


def _quality_device(cfg: MineConfig) -> str:
    """The miner's device for the bound's products: ``cfg.device``, else the first GPU torch sees, else the
    CPU (as the embed stage places the teacher)."""
    import torch

    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _upcoming(schedule: Schedule, to_come: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids, offsets, negatives) of ``schedule``'s batches restricted to the ids in the mask ``to_come``
    (emptied batches dropped); the whole schedule when it is None."""
    if to_come is None:
        return schedule.ids, schedule.offsets, schedule.negative_ids
    keep = to_come[schedule.ids]
    sizes = np.add.reduceat(keep.astype(np.int64), schedule.offsets[:-1]) if len(keep) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes[sizes > 0])]).astype(np.int64)
    negatives = None if schedule.negative_ids is None else schedule.negative_ids[keep]
    return schedule.ids[keep], offsets, negatives


def _tasks_apart(cfg: MineConfig, task_names: list[str]) -> bool:
    """Whether the batches keep to one task each (bar the leftover ones), so the schedule records them."""
    return cfg.per_task and not cfg.mix_tasks and len(task_names) > 1


def _batch_tasks(batches: list[np.ndarray], tasks: np.ndarray) -> np.ndarray:
    """Each batch's task index, -1 for a batch of several tasks (the leftovers of small tasks)."""
    out = np.empty(len(batches), dtype=np.int64)
    for b, ids in enumerate(batches):
        t = tasks[ids]
        out[b] = t[0] if len(t) and (t == t[0]).all() else -1
    return out


def _previous_schedule(folder: Path, stamp: dict | None, below: int | None = None) -> Schedule | None:
    """The newest good schedule in ``folder`` for the same data (below version ``below`` when given: an
    explicit version compares with what precedes it, so reruns stay byte-identical), if any."""
    from ..schedule import load_newest_schedule

    return load_newest_schedule(folder, expect=stamp, below=below)


# --------------------------------------------------------------------------------------------------
# pre-flight: what the config and the data's size can tell before any stage runs
# --------------------------------------------------------------------------------------------------


def preflight(cfg: MineConfig, stage: str = "all") -> None:
    """Refuse, before the teacher loads and before any stage writes, every parameter that the config and
    the size of the data (N and the tasks, from the manifest, the own embeddings' shape or the embeddings
    already in OUT) show to be wrong for the stages ``stage`` runs: K not dividing |B|, b3pp without hard
    negatives, p + m not below a task's size, task_params naming no ranked task, K or |B| above N. Each stage
    checks these again itself; here they cost a manifest read instead of a teacher pass that then fails."""
    runs = _stages_to_run(cfg, stage)
    if "schedule" in runs:
        get_strategy(cfg.strategy).check_params(BatchParams.from_config(cfg))
    if "partition" in runs:
        from .partition import check_partitioner

        check_partitioner(cfg.partitioner, cfg.kaminpar_context)
    if not runs & {"rank", "partition", "schedule"}:
        return
    space = _id_space(cfg)
    if space is None:  # nothing cheap tells N: the stages check it when they read their inputs
        return
    tasks, task_names, order_known, where = space
    N = len(tasks)
    if "rank" in runs:
        _check_rank_groups(cfg, tasks, task_names, order_known)
    if "partition" in runs and cfg.K > N:
        raise ConfigError(f"K={cfg.K} is larger than N={N}, the examples of {where}: the partition would be a "
                          "single short community; lower K")
    if "schedule" in runs and cfg.batch_size > N:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than N={N}, the examples of {where}: an "
                          "epoch would be a single batch smaller than |B|; lower batch_size")


def _stages_to_run(cfg: MineConfig, stage: str) -> set[str]:
    """The stages ``run_stage(stage)`` may run: one, or for ``all`` those the strategy needs (an up-to-date
    one is skipped, but it passed these checks when it was built with the same parameters)."""
    if stage != "all":
        return {stage}
    return {"embed", *NEEDS.get(cfg.strategy, ()), "schedule"}


def _id_space(cfg: MineConfig) -> tuple[np.ndarray, list[str], bool, str] | None:
    """``(task index per id, task names, order_known, what they come from)`` as the rank stage will see
    them, read without embedding anything, or None when nothing cheap tells. With ``cfg.data`` the split's
    manifest entry gives N and the task sizes; the tasks' order (the rank stage's: first appearance in the
    split) is known only from embeddings of the same data already in OUT, else ``order_known`` is False.
    Own embeddings without data: one task, N rows from the array's header. Else the embeddings in OUT."""
    embedded = _embedded_tasks(cfg)
    if cfg.data is not None:
        manifest = Manifest.load(cfg.data)
        info, stamp = manifest.split(cfg.split), manifest.stamp(cfg.split)
        where = f"split {cfg.split!r} of {cfg.data}"
        if embedded is not None and embedded[2] == stamp:
            return embedded[0], embedded[1], True, where
        counts: dict[str, int] = {}
        for name, count in info.tasks.items():  # the embed stage names a task-less record "default"
            counts[name or "default"] = counts.get(name or "default", 0) + int(count)
        if sum(counts.values()) != info.n:  # a manifest that does not add up: leave it to the stages
            return None
        names = list(counts)
        return np.repeat(np.arange(len(names), dtype=np.int32), list(counts.values())), names, False, where
    if cfg.query_embeddings:
        try:
            rows = np.load(cfg.query_embeddings, mmap_mode="r", allow_pickle=False).shape[0]
        except (OSError, ValueError, IndexError):  # missing or not an array: the embed stage says so
            return None
        return np.zeros(rows, dtype=np.int32), ["default"], True, f"{cfg.query_embeddings}"
    if embedded is not None:
        return embedded[0], embedded[1], True, f"the embeddings in {out_dir(cfg, EMBED_FOLDER)}"
    return None


def _embedded_tasks(cfg: MineConfig) -> tuple[np.ndarray, list[str], dict | None] | None:
    """(tasks, task names, stamp) of complete embeddings already in OUT, or None."""
    folder = out_dir(cfg, EMBED_FOLDER)
    record = read_record(folder / "embeddings.json")
    if not record or not record.get("complete") or not (folder / "tasks.npy").is_file():
        return None
    tasks = np.load(folder / "tasks.npy")
    if len(tasks) != record.get("n") or "task_names" not in record:
        return None
    return tasks, list(record["task_names"]), record.get("stamp")


def _check_rank_groups(cfg: MineConfig, tasks: np.ndarray, task_names: list[str], order_known: bool) -> None:
    """The rank stage's own rules (:func:`b3stream.mining.rank.rank`), on the groups it will rank: every
    task_params entry names a group, and p + m is below every group's size. The groups depend on the
    tasks' order only when ``small_tasks: merge`` breaks a tie between tasks of one size; then, with per-task
    p and m and an unknown order, the names cannot be told here and the rank stage checks them itself."""
    prm = RankParams.from_config(cfg)
    prm.check()
    below = merge_threshold(prm.small_tasks, prm.p, prm.m)
    groups = task_groups(tasks, task_names, prm.per_task, below)
    if not order_known and prm.task_params:
        flipped = (len(task_names) - 1 - tasks).astype(np.int32)
        if sorted(n for n, _ in task_groups(flipped, task_names[::-1], prm.per_task, below)) != \
                sorted(n for n, _ in groups):
            return
    unknown = sorted(set(prm.task_params or {}) - {name for name, _ in groups})
    if unknown:
        raise ConfigError(f"task_params names task(s) {unknown} that are not ranked on their own here; tasks: "
                          f"{[name for name, _ in groups]}")
    check_sizes(groups, prm)


# --------------------------------------------------------------------------------------------------
# all stages
# --------------------------------------------------------------------------------------------------


def _up_to_date(record_path: Path, params: dict, expect: dict | None) -> bool:
    record = read_record(record_path)
    if not same_params(record, params):
        return False
    return expect is None or record.get("stamp", {}).get("fingerprint") == expect.get("fingerprint")


def run_all(cfg: MineConfig, progress: bool = True, on_stage=None, student: SnapshotModel | None = None) -> Path:
    """Every stage the strategy needs, skipping up-to-date ones; returns the schedule path. ``on_stage(name)``
    is called before each stage (the background miner reports where it is); ``student``: the embed stage's
    student snapshot (:class:`b3stream.mining.embed.SnapshotModel`, refreshed mode)."""
    on_stage = on_stage or (lambda name: None)
    get_strategy(cfg.strategy)  # unknown strategy: fail before any work
    check_seed_and_version(cfg, "all")
    preflight(cfg, "all")
    expect = expected_stamp(cfg)
    needs = NEEDS[cfg.strategy]
    if cfg.data is not None or cfg.query_embeddings or cfg.positive_embeddings:
        on_stage("embed")
        embed_stage(cfg, progress, student)
    elif not (out_dir(cfg, EMBED_FOLDER) / "embeddings.json").is_file():
        raise ConfigError("give --data (a prepared dataset) or --query-embeddings/--positive-embeddings")
    if "rank" in needs:
        emb_record = read_record(out_dir(cfg, EMBED_FOLDER) / "embeddings.json") or {}
        rank_record = read_record(out_dir(cfg, RANK_FOLDER) / RANK_RECORD) or {}
        # output from before T (top.npy) was kept is stale: b3pp needs T
        if _up_to_date(out_dir(cfg, RANK_FOLDER) / RANK_RECORD, rank_params(cfg, emb_record), expect) and \
                rank_record.get("top") is not None:
            log.info("rank: up to date")
        else:
            on_stage("rank")
            rank_stage(cfg, progress)
    if "partition" in needs:
        rank_record = read_record(out_dir(cfg, RANK_FOLDER) / RANK_RECORD) or {}
        if _up_to_date(out_dir(cfg, PARTITION_FOLDER) / PARTITION_RECORD, partition_params(cfg, rank_record), expect):
            log.info("partition: up to date")
        else:
            on_stage("partition")
            partition_stage(cfg, progress)
    on_stage("schedule")
    return schedule_stage(cfg, progress)


STAGE_FUNCTIONS = {"embed": embed_stage, "rank": rank_stage, "partition": partition_stage,
                   "schedule": schedule_stage, "all": run_all}


def run_stage(stage: str, cfg: MineConfig, progress: bool = True) -> Path:
    if stage not in STAGE_FUNCTIONS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_FUNCTIONS)}")
    check_seed_and_version(cfg, stage)
    if stage != "all":  # run_all makes its own
        preflight(cfg, stage)
    return STAGE_FUNCTIONS[stage](cfg, progress)


__all__ = ["embed_stage", "rank_stage", "partition_stage", "schedule_stage", "run_all", "run_stage",
           "load_rank", "load_partition", "embed_params", "preflight"]

"""``b3stream mine`` and ``b3stream inspect SCHEDULE``.

    b3stream mine --config configs/mine_b3.yaml              # every stage the strategy needs
    b3stream mine rank --config X.yaml --p 10 --m 50          # one stage (embed | rank | partition | schedule)
    b3stream mine --data data/code --out runs/mine --strategy b3pp --K 8 --batch-size 64 --h 3
    b3stream mine --query-embeddings Q.npy --positive-embeddings P.npy --out runs/byo   # own embeddings

Flags override the YAML (``--strategy --p --m --K --batch-size --h --seed --out`` and a few more); any
other MineConfig field can be set with ``--set key=value`` (e.g. ``--set teacher.pooling=cls``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .pipeline import STAGES

_FLAGS = {  # flag -> MineConfig key
    "data": "data", "split": "split", "out": "out", "strategy": "strategy", "p": "p", "m": "m", "K": "K",
    "batch_size": "batch_size", "h": "h", "seed": "seed", "query_embeddings": "query_embeddings",
    "positive_embeddings": "positive_embeddings", "index": "index", "edges": "edges", "version": "version",
    "overwrite": "overwrite", "partitioner": "partitioner",
}


def register(sub) -> None:
    p = sub.add_parser(
        "mine", help="mine a batch schedule (B3, B3++, GCBS, random, task)",
        description="Run the mining stages (embed -> rank -> partition -> schedule) from a YAML config, all of "
                    "them or one. Each stage reads and writes files under --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("stage", nargs="?", default="all", choices=[*STAGES, "all"],
                   help="one stage, or all (default) of those the strategy needs")
    p.add_argument("--config", default=None, help="YAML with MineConfig fields (configs/mine_b3.yaml)")
    p.add_argument("--data", default=None, help="prepared dataset folder")
    p.add_argument("--split", default=None)
    p.add_argument("--out", default=None, help="mining folder (stages write under it)")
    p.add_argument("--strategy", default=None,
                   choices=["random", "random_hn", "task", "task_hn", "gcbs", "b3", "b3pp"])
    p.add_argument("--p", type=int, default=None, help="ranks skipped as likely false negatives")
    p.add_argument("--m", type=int, default=None, help="ranks kept after the skip (S = R[:, p:p+m])")
    p.add_argument("--K", type=int, default=None, help="community size")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size |B| (a multiple of K)")
    p.add_argument("--h", type=int, default=None, help="B3++ hard negatives per example")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--query-embeddings", default=None, help="your own query embeddings (N x d .npy)")
    p.add_argument("--positive-embeddings", default=None, help="your own positive embeddings (N x d .npy)")
    p.add_argument("--index", default=None, choices=["auto", "flat", "ivf", "hnsw", "torch"],
                   help="auto: exact up to exact_threshold, IVF above; torch: exact matmul + top-k (GPU if any)")
    p.add_argument("--edges", default=None, choices=["mutual", "union"])
    p.add_argument("--partitioner", default=None, choices=["metis", "kaminpar"],
                   help="metis (the paper's, default) or kaminpar (multi-threaded, exactly K; b3stream[kaminpar])")
    p.add_argument("--version", type=int, default=None, help="schedule version to write (default: next)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="let --version replace an existing schedule (a run trained on it can then no longer "
                        "resume on it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other MineConfig field, e.g. --set per_task=false (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.set_defaults(func=run_mine)


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("b3stream.mining")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "_b3_mine", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._b3_mine = True
        logger.addHandler(handler)
        logger.propagate = False


def config_from_args(args):
    from ..config import MineConfig, load_config

    overrides = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag, None) is not None}
    for item in args.overrides:
        if "=" not in item:
            from ..config import ConfigError

            raise ConfigError(f"--set {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    return load_config(MineConfig, args.config, overrides or None)


def run_mine(args) -> int:
    from ..config import ConfigError
    from .pipeline import run_stage

    _setup_logging(args.quiet)
    cfg = config_from_args(args)
    if args.quiet:
        from ..encoder import quiet_model_loading

        quiet_model_loading()
    from ..dist import init_from_launcher, leave

    rank, size = init_from_launcher()  # torchrun --nproc_per_node N: the embedding is split N ways
    try:
        if size > 1 and args.stage not in ("embed", "all"):
            raise ConfigError(f"only the embed stage runs on several processes; run `b3stream mine {args.stage}` "
                              "without a launcher")
        if rank != 0:  # the other processes embed their share; rank 0 runs the stages
            from .pipeline import embed_stage, preflight

            preflight(cfg, args.stage)  # what rank 0 refuses (in run_stage), every process refuses
            embed_stage(cfg, progress=False)
            return 0
        out = run_stage(args.stage, cfg, progress=not args.quiet)
    finally:
        leave()
    print(out)
    if args.stage in ("schedule", "all") and not args.quiet:
        from ..schedule import load_schedule

        print_quality(load_schedule(out).meta.get("quality"))
    return 0


def print_quality(q: dict | None) -> None:
    if not q:
        print("  batch quality: not computed (no embeddings)")
        return
    ci = q.get("theorem1_bound_ci95")
    estimate = (f", an estimate: 95% interval {ci[0]:.4f} to {ci[1]:.4f}"
                if isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci) else "")
    print(f"  Theorem-1 bound (K={q['K']}, tau={q['temperature']}): {q['theorem1_bound']:.4f} "
          f"(floor log(N/K) = {q['theorem1_floor']:.4f}; {q['queries']} queries{estimate})")
    print(f"  in-batch negative similarity: mean {q['neg_sim_mean']:.4f}, hardest per query "
          f"{q['neg_sim_hardest_mean']:.4f}, max {q['neg_sim_max']:.4f}"
          + (" (with B3++ hard negatives)" if q.get("with_hard_negatives") else ""))


_QUALITY_NUMBERS = ("K", "temperature", "theorem1_bound", "theorem1_floor", "queries", "neg_sim_mean",
                    "neg_sim_hardest_mean", "neg_sim_max")


def _print_recorded_quality(q) -> None:
    """:func:`print_quality` of the quality a schedule file records, which is checksummed but was made
    elsewhere: a record missing a number (or holding text) is said to be unreadable rather than a
    traceback, and one without a bound (no batch held a negative) says so."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if q and q.get("theorem1_bound") is None and number(q.get("queries")):
        print("  batch quality: not defined (no batch holds a negative)")
    elif q and not all(number(q.get(k)) for k in _QUALITY_NUMBERS):
        print("  batch quality: recorded, but not in a form this version reads")
    else:
        print_quality(q)


def inspect_schedule(path, embeddings=None) -> int:
    """Print a schedule's metadata, batch sizes and quality; with ``embeddings`` (a mining folder or its
    ``embeddings/``), recompute the batch quality for them (all queries up to 4096)."""
    import numpy as np

    from ..schedule import load_schedule

    sched = load_schedule(path)
    meta = sched.meta
    sizes = np.diff(sched.offsets)
    print(f"{sched.path}: schedule v{meta.get('version')} ({meta.get('strategy')})")
    data = meta.get("data") or {}
    print(f"  data: {data.get('dataset')}/{data.get('split')} n={data.get('n')} "
          f"fingerprint {str(data.get('fingerprint'))[:12]}; source model {meta.get('source_model')}")
    params = ", ".join(f"{k}={meta.get(k)}" for k in ("p", "m", "K", "batch_size", "h", "seed", "per_task",
                                                       "mix_tasks", "edges") if meta.get(k) is not None)
    print(f"  params: {params}")
    if len(sizes):
        print(f"  {len(sizes)} batches, {len(sched.ids)} ids; batch sizes min {sizes.min()} max {sizes.max()}; "
              f"full batches {int((sizes == meta.get('batch_size')).sum())}")
    else:
        print("  0 batches, 0 ids")
    if sched.negative_ids is not None:
        print(f"  hard negatives: {sched.negative_ids.shape[1]} per example")
    timings = meta.get("timings") or {}
    if timings:
        print("  timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items() if v is not None))
    _print_recorded_quality(meta.get("quality"))
    if embeddings is not None:
        from .embed import load_embeddings
        from .quality import schedule_quality

        emb = load_embeddings(Path(embeddings), expect=meta.get("data"))
        q = schedule_quality(sched, emb.queries, emb.positives, K=meta.get("K") or 32, sample=4096)
        print(f"recomputed with {emb.folder}:")
        print_quality(q)
    return 0

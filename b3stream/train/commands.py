"""``b3stream train`` (one process, no launcher) and ``b3stream evaluate``."""

from __future__ import annotations

import json
import sys

from ..st_folder import POOLINGS


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a student on a batch schedule (one process; use torchrun/deepspeed for more)",
        description="Train with DeepSpeed in this process (rank 0 of 1). For several processes launch "
                    "`torchrun --nproc_per_node N -m b3stream.train --config X.yaml` or "
                    "`deepspeed --module b3stream.train --config X.yaml`.",
    )
    p.add_argument("--config", required=True, help="training YAML (TrainConfig)")
    p.add_argument("--deepspeed", default=None, help="ZeRO JSON path or name in ds_configs/ (zero0..zero3)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (model loading, steps); the periodic step lines stay")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. max_steps=20")
    p.set_defaults(func=_run_train)

    e = sub.add_parser("evaluate", help="retrieval metrics of a model on a held-out split or a BEIR folder",
                       description="nDCG@10, MRR@10, Recall@1/@10/@100 and MAP@100 (exact search; trec_eval's "
                                   "definitions, computed by pytrec_eval) of MODEL on the queries of a prepared "
                                   "dataset's split against the positives of every split (--corpus all, the "
                                   "default) or of the split alone (--corpus split), or on a BEIR-format folder "
                                   "(--beir DIR: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv; the whole corpus, "
                                   "graded relevance). MODEL: a sentence-transformers export, a merged HF folder, "
                                   "or omitted for the bundled all-MiniLM-L6-v2 (the zero-shot baseline); its own "
                                   "prompts and lengths are used as sentence-transformers uses them.")
    e.add_argument("--model", default=None,
                   help="model folder: RUN/export, its sentence-transformers/ or merged/ (default: bundled MiniLM)")
    where = e.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", default=None, help="prepared dataset folder")
    where.add_argument("--beir", default=None, metavar="DIR",
                       help="a BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv)")
    e.add_argument("--split", default="test", help="the dataset's split, or the BEIR folder's qrels file (test)")
    e.add_argument("--max-queries", type=int, default=None, help="a seeded sample of this many queries")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--pooling", default=None, choices=list(POOLINGS),
                   help="override pooling (read from a sentence-transformers folder otherwise)")
    e.add_argument("--max-length", type=int, default=None,
                   help="token limit for queries and documents (default: the model folder's own)")
    e.add_argument("--corpus", default="all", choices=["all", "split"],
                   help="--data: search the positives of every split, the training positives acting as "
                        "distractors (all, the default), or the split's own positives only (split: a small, "
                        "easy corpus)")
    e.add_argument("--per-query", default=None, metavar="FILE",
                   help="write one JSON line per query (its text, the rank of its first relevant document, its "
                        "metrics) to compare two models pairwise (tools/bench_quality.py's paired bootstrap)")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=_run_evaluate)


def _run_train(args) -> int:
    from ..config import TrainConfig, load_config

    overrides = list(args.overrides) + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
    cfg = load_config(TrainConfig, args.config, overrides)  # config errors before anything starts
    from ..dist import shutdown, single_process_env  # these import torch and DeepSpeed: after the check
    from .interrupt import Interrupted
    from .loop import train

    if args.quiet:
        from ..encoder import quiet_model_loading

        quiet_model_loading()
    single_process_env()
    try:
        summary = train(cfg, progress=not args.quiet)
    except Interrupted as e:  # SIGINT / SIGTERM: a checkpoint was written; one line, 130 / 143, no traceback
        print(f"b3stream train: {e}", file=sys.stderr, flush=True)
        return e.code
    finally:
        shutdown()
    print(f"trained {summary['steps']} steps, {summary['examples_per_s'] or 0:.1f} examples/s; run in {cfg.out}")
    for name, metrics in summary["eval"].items():
        from ..evaluate import format_metrics

        print(f"  {name}: {format_metrics(metrics)}")
        if "beir" in metrics:
            print(f"  {name} (beir): {format_metrics(metrics['beir'])}")
    return 0


def _run_evaluate(args) -> int:
    from ..evaluate import evaluate_path, format_metrics

    metrics = evaluate_path(args.model, args.data, args.split, args.max_queries, args.batch_size, args.pooling,
                            args.max_length, corpus=args.corpus, per_query=args.per_query, beir=args.beir)
    print(f"{args.model or 'bundled all-MiniLM-L6-v2'} on {args.beir or args.data}/{args.split}: "
          f"{format_metrics(metrics)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0

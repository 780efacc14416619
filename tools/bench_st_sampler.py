"""B3 batches inside sentence-transformers' trainer against its own NO_DUPLICATES batches (issue 34).

Round 8's code-search recipe (docs/quality.md) run in ``SentenceTransformerTrainer`` itself: a seeded sample of
the code-search pairs prepared and split by package as tools/bench_quality.py prepares it (``--pairs``,
``--held-out`` per held-out split), all-MiniLM-L6-v2 fully fine-tuned with ``MultipleNegativesRankingLoss``
(scale 20 = tau 0.05), lr 5e-5, 10% warmup then linear decay, 16 query / 32 document tokens (the Transformer's
``query_length`` / ``document_length`` through the trainer's ``router_mapping``), |B| = 32, K = 32, p = 3, m = 30.
Arms (one seed each; ``ARM:EPOCHS`` cells):

- ``nodup``: ``BatchSamplers.NO_DUPLICATES``, sentence-transformers' recommended batches for in-batch negatives;
- ``b3``: :class:`B3BatchSampler` on a schedule mined once from the starting model (static mode);
- ``b3-remine``: ``b3`` plus :class:`B3RemineCallback` (``every=1``): re-mined from the model being trained at the
  start of every epoch after the first (refreshed mode at epoch boundaries);
- ``zero-shot``: the starting model, untrained (``zero-shot:0``).

Every held-out validation and test query is searched exactly against the positives of every split (``--corpus
all``) and scored by b3stream's evaluation (nDCG@10 and the rest, per query); differences between arms get a
paired bootstrap interval over queries (tools/bench_quality.py's). Each cell trains and evaluates in its own
process (``--jobs`` at once, ``--threads`` torch threads each) and is cached under ``--work``.

    python tools/bench_st_sampler.py --work WORK                      # round 8's 27,000 pairs
    python tools/bench_st_sampler.py --work WORK --pairs 4000         # a smaller version
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

ARMS = ("zero-shot", "nodup", "b3", "b3-remine")
DEFAULT_CELLS = "zero-shot:0,nodup:1,b3:1,nodup:2,b3:2,b3-remine:2"
DEFAULT_COMPARE = "b3:1-nodup:1,b3:2-nodup:2,b3-remine:2-nodup:2,b3-remine:2-b3:2"
SPLITS = ("test", "validation")


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-st-sampler"), help="cache folder (resumable)")
    ap.add_argument("--pairs", type=int, default=27000, help="code-search pairs sampled (round 8: 27,000)")
    ap.add_argument("--pairs-file", default=None, help="a jsonl of pairs instead of scanning the packages")
    ap.add_argument("--held-out", type=float, default=0.1, help="share of pairs in each of validation, test")
    ap.add_argument("--cells", default=DEFAULT_CELLS, help="ARM:EPOCHS,... (arms: %s)" % ", ".join(ARMS))
    ap.add_argument("--compare", default=DEFAULT_COMPARE, help="CELL-CELL,... paired differences to report")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--p", type=int, default=3)
    ap.add_argument("--m", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--scale", type=float, default=20.0, help="MNRL scale = 1 / tau")
    ap.add_argument("--warmup", type=float, default=0.1, help="warmup share of the steps")
    ap.add_argument("--query-length", type=int, default=16)
    ap.add_argument("--positive-length", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per cell process")
    ap.add_argument("--jobs", type=int, default=1, help="cells trained at once")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--json", default=None, help="results JSON (default: WORK/results.json)")
    ap.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)  # internal: one cell, in its own process
    return ap.parse_args(argv)


def cell_name(cell: str, seed: int) -> str:
    arm, epochs = cell.split(":")
    return f"{arm}-e{epochs}-s{seed}"


# --------------------------------------------------------------------------------------------------
# data, model, schedule
# --------------------------------------------------------------------------------------------------


def prepared(args, work: Path) -> Path:
    """The prepared dataset (tools/bench_quality.py's sample and group split)."""
    import bench_quality

    ns = argparse.Namespace(pairs=args.pairs, pairs_file=args.pairs_file, held_out=args.held_out,
                            threads=args.threads, device="cpu")
    work.mkdir(parents=True, exist_ok=True)
    return bench_quality.dataset(ns, work)


def train_dataset(data: Path):
    """The train split as sentence-transformers' (anchor, positive) Dataset, row i = id i."""
    from datasets import Dataset

    from b3stream.data.reader import ShardedDataset

    records = list(ShardedDataset(data, "train", verify=False))
    assert [r["id"] for r in records] == list(range(len(records)))
    return Dataset.from_dict({"anchor": [r["query"] for r in records], "positive": [r["positive"] for r in records]})


def student(args):
    from sentence_transformers import SentenceTransformer

    from b3stream.encoder import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu")
    model[0].query_length, model[0].document_length = args.query_length, args.positive_length
    return model


def miner(args, ds, folder: Path):
    from b3stream.integrations.sentence_transformers import B3Miner

    return B3Miner(ds, folder, batch_size=args.batch_size, K=args.K, p=args.p, m=args.m, seed=args.seed,
                   query_task="query", positive_task="document", encode_batch_size=128,
                   mine={"per_task": False, "quality_sample": 1024})  # packages mined together (round 3)


def initial_schedule(args, work: Path, ds) -> Path:
    """The static schedule, mined once from the starting model (cached)."""
    from b3stream.schedule import latest_schedule_path

    folder = work / "mine"
    found = latest_schedule_path(folder / "schedules") if (folder / "schedules").is_dir() else None
    if found is not None:
        return found
    t0 = time.perf_counter()
    path = miner(args, ds, folder).mine(student(args))
    (folder / "teacher.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "schedule": str(path)}))
    return path


# --------------------------------------------------------------------------------------------------
# one cell: train (sentence-transformers' trainer) and evaluate
# --------------------------------------------------------------------------------------------------


def evaluate(model, data: Path, folder: Path) -> dict:
    """Validation and test metrics with every split's positives as the corpus; per-query files in ``folder``."""
    from b3stream.evaluate import RetrievalSet, prompted_pairs

    t0 = time.perf_counter()
    pairs = prompted_pairs(data)
    sets = {s: RetrievalSet(data, s, corpus="all", pairs=pairs) for s in SPLITS}
    corpus = model.encode(sets["test"].corpus, task="document", batch_size=128, normalize_embeddings=True)
    out = {}
    for s, es in sets.items():
        queries = model.encode(es.queries, task="query", batch_size=128, normalize_embeddings=True)
        out[s] = es.score(queries, corpus, per_query=folder / f"{s}.jsonl")
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def run_cell(args, cell: str) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    folder = work / "cells" / cell_name(cell, args.seed)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    arm, epochs = cell.split(":")
    epochs = int(epochs)
    data = prepared(args, work)
    ds = train_dataset(data)
    model = student(args)
    load = [os.getloadavg()[0]]
    result: dict = {"cell": cell, "arm": arm, "epochs": epochs, "seed": args.seed, "n_train": len(ds),
                    "threads": args.threads}
    if arm != "zero-shot":
        result.update(train(args, work, folder, arm, epochs, ds, model))
    load.append(os.getloadavg()[0])
    result["metrics"] = evaluate(model, data, folder)
    result["load_1min"] = load
    done.write_text(json.dumps(result, indent=2, default=str))
    return result


def train(args, work: Path, folder: Path, arm: str, epochs: int, ds, model) -> dict:
    import shutil

    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from b3stream.integrations.sentence_transformers import B3BatchSampler, B3RemineCallback
    from b3stream.schedule import load_schedule

    callbacks, remine = [], None
    if arm == "nodup":
        sampler = BatchSamplers.NO_DUPLICATES
    elif arm in ("b3", "b3-remine"):
        initial = initial_schedule(args, work, ds)
        if arm == "b3":
            sampler = B3BatchSampler.using(initial)
        else:  # its own folder, starting from the static schedule; the re-mined versions are published there
            own = folder / "mine"
            shutil.rmtree(own, ignore_errors=True)
            shutil.copytree(work / "mine", own)
            remine = miner(args, ds, own)
            callbacks.append(B3RemineCallback(remine, every=1))
            sampler = B3BatchSampler.using(remine)
    else:
        raise SystemExit(f"unknown arm {arm!r}; expected one of {ARMS}")
    steps = epochs * math.ceil(len(ds) / args.batch_size)
    targs = SentenceTransformerTrainingArguments(
        str(folder / "run"), num_train_epochs=epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, warmup_steps=int(args.warmup * steps), lr_scheduler_type="linear",
        batch_sampler=sampler, router_mapping={"anchor": "query", "positive": "document"}, seed=args.seed,
        save_strategy="no", report_to="none", use_cpu=True, logging_steps=50, disable_tqdm=True,
        dataloader_drop_last=False)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds, callbacks=callbacks,
                                         loss=MultipleNegativesRankingLoss(model, scale=args.scale))
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    shutil.rmtree(folder / "run", ignore_errors=True)
    result = {"train_seconds": seconds, "steps": out.global_step, "train_loss": out.training_loss,
              "log": [e for e in trainer.state.log_history if "loss" in e]}
    if arm != "nodup":
        first = load_schedule(initial)
        result["schedule"] = {"path": str(first.path), "quality": first.meta.get("quality"),
                              "timings": first.meta.get("timings")}
    if remine is not None:
        result["remines"] = callbacks[0].history
        result["remine_quality"] = [load_schedule(h["schedule"]).meta.get("quality") for h in callbacks[0].history]
        result["remine_timings"] = remine.history
        # the re-mines' seconds are part of the training time above (the trainer waits for them)
    return result


# --------------------------------------------------------------------------------------------------
# statistics and the report
# --------------------------------------------------------------------------------------------------


def per_query(work: Path, cell: str, seed: int, split: str, metric: str = "ndcg@10") -> tuple[list[str], np.ndarray]:
    from b3stream.evaluate import read_per_query

    rows = read_per_query(work / "cells" / cell_name(cell, seed) / f"{split}.jsonl")
    return [r["query"] for r in rows], np.array([r[metric] for r in rows])


def report(args, results: dict[str, dict]) -> dict:
    import bench_quality

    work = Path(args.work)
    table = []
    print(f"\n{'cell':<14} {'train rows':>10} {'steps':>6} {'test nDCG@10':>13} {'val nDCG@10':>12} "
          f"{'train s':>8} {'load':>10}")
    for cell, r in results.items():
        m = r["metrics"]
        row = {"cell": cell, "steps": r.get("steps", 0), "train_seconds": r.get("train_seconds"),
               **{f"{s}_ndcg@10": 100 * m[s]["ndcg@10"] for s in SPLITS}, "load_1min": r.get("load_1min"),
               "remines": r.get("remines")}
        table.append(row)
        load = "/".join(f"{x:.1f}" for x in r.get("load_1min", []))
        print(f"{cell:<14} {r['n_train']:>10} {row['steps']:>6} {row['test_ndcg@10']:>13.2f} "
              f"{row['validation_ndcg@10']:>12.2f} {row['train_seconds'] or 0:>8.0f} {load:>10}")
    comparisons = []
    for pair in [c for c in args.compare.split(",") if c]:
        a, b = pair.split("-", 1) if pair.count("-") == 1 else _split_pair(pair)
        if a not in results or b not in results:
            continue
        row = {"a": a, "b": b}
        for s in SPLITS:
            qa, va = per_query(work, a, args.seed, s)
            qb, vb = per_query(work, b, args.seed, s)
            assert qa == qb, "per-query files disagree on the queries"
            centre, lo, hi = bench_quality.paired_bootstrap(100 * va, 100 * vb, args.bootstrap)
            row[s] = {"difference": centre, "ci95": [lo, hi], "queries": len(va)}
        comparisons.append(row)
        print(f"{a} - {b}: test {row['test']['difference']:+.2f} [{row['test']['ci95'][0]:+.2f}, "
              f"{row['test']['ci95'][1]:+.2f}], validation {row['validation']['difference']:+.2f} "
              f"[{row['validation']['ci95'][0]:+.2f}, {row['validation']['ci95'][1]:+.2f}] "
              f"({row['test']['queries']} / {row['validation']['queries']} queries, paired bootstrap over queries)")
    from b3stream.schedule import load_schedule

    for cell, r in results.items():
        for h in r.get("remines") or []:
            meta = load_schedule(h["schedule"]).meta
            now, before = (meta.get(k) or {} for k in ("quality", "quality_previous"))
            print(f"{cell}: epoch {h['epoch']} re-mined at step {h['step']} in {h['seconds']:.0f} s; Theorem-1 "
                  f"bound under the model then: new schedule {now.get('theorem1_bound')}, the schedule it "
                  f"replaced {before.get('theorem1_bound')} (lower: harder)")
            h["theorem1_bound"], h["theorem1_bound_replaced"] = now.get("theorem1_bound"), before.get("theorem1_bound")
        if r.get("schedule"):
            q = r["schedule"].get("quality") or {}
            print(f"{cell}: static schedule's Theorem-1 bound {q.get('theorem1_bound')}")
    return {"table": table, "comparisons": comparisons}


def _split_pair(pair: str) -> tuple[str, str]:
    """``b3-remine:2-b3:2`` -> (``b3-remine:2``, ``b3:2``): split at the dash after an ``:EPOCHS``."""
    colon = pair.index(":")
    dash = pair.index("-", colon)
    return pair[:dash], pair[dash + 1:]


def main(argv=None) -> int:
    args = _parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run_cell:
        run_cell(args, args.run_cell)
        return 0
    work = Path(args.work)
    cells = [c for c in args.cells.split(",") if c]
    for c in cells:
        if c.split(":")[0] not in ARMS:
            raise SystemExit(f"unknown arm in {c!r}; expected one of {ARMS}")
    t0 = time.perf_counter()
    data = prepared(args, work)
    import torch

    torch.set_num_threads(args.threads)
    if any(c.split(":")[0] in ("b3", "b3-remine") for c in cells):
        initial_schedule(args, work, train_dataset(data))
    print(f"data {data}, static schedule ready in {time.perf_counter() - t0:.0f} s", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    todo = [c for c in cells if not (work / "cells" / cell_name(c, args.seed) / "result.json").is_file()]
    running: list[tuple[str, subprocess.Popen, float]] = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    while todo or running:
        while todo and len(running) < args.jobs:
            cell = todo.pop(0)
            log = work / "cells" / f"{cell_name(cell, args.seed)}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.Popen([sys.executable, __file__, *base, "--run-cell", cell], env=env, cwd=REPO,
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT)
            running.append((cell, proc, time.perf_counter()))
            print(f"started {cell} (log {log})", flush=True)
        time.sleep(5)
        for item in list(running):
            cell, proc, started = item
            if proc.poll() is not None:
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"{cell}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
                if proc.returncode != 0:
                    raise SystemExit(f"cell {cell} failed; see {work / 'cells' / (cell_name(cell, args.seed) + '.log')}")
    results = {c: json.loads((work / "cells" / cell_name(c, args.seed) / "result.json").read_text()) for c in cells}
    out = report(args, results)
    out.update(args=vars(args), cells=results, wall_seconds=time.perf_counter() - t0)
    path = Path(args.json) if args.json else work / "results.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

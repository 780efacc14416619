"""Refreshed mode's promises on a real CPU run (issue 32): every train id exactly once per epoch, and hard
negatives on the steps trained on refreshed schedules.

    python tools/check_refresh_invariants.py [--out DIR] [--strategies b3pp random_hn task_hn]

It builds prepared multi-task data (docstring -> code pairs of the Python standard library, cut into tasks of
unequal size, ``--sizes``, all of them train pairs), mines a starting schedule per strategy with the bundled MiniLM teacher, trains each in refreshed
mode (the bundled MiniLM student with LoRA, a spawned miner embedding with its snapshots,
``refresh.max_lag_steps: 0`` so each refresh lands at its snapshot's step, ``trace_ids: true``) and reads
``trace.jsonl``: per epoch, whether the steps trained each train id exactly once; the steps per epoch
against the budget the run was built for; and the share of the steps trained on refreshed versions (any
version after the starting one) whose batches carried hard negatives. Prints one line per strategy and
writes ``DIR/report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT = {"max_query_length": 32, "max_positive_length": 48, "lora": {"r": 4, "alpha": 8}}


def build_data(out: Path, sizes: list[int], seed: int = 0) -> Path:
    """``out/data``: prepared pairs, all in the train split, in ``len(sizes)`` tasks of these sizes."""
    from b3stream.data.codesearch import iter_codesearch_pairs
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap

    data = out / "data"
    if (data / "manifest.json").is_file():
        return data
    out.mkdir(parents=True, exist_ok=True)
    pairs = list(iter_codesearch_pairs(packages=["stdlib"], max_pairs=sum(sizes), progress=False))
    if len(pairs) < sum(sizes):
        raise SystemExit(f"only {len(pairs)} code-search pairs found, {sum(sizes)} asked for")
    rows, start = [], 0
    for t, size in enumerate(sizes):  # consecutive pairs: each task a few modules of its own
        rows += [{"query": p["query"], "positive": p["positive"], "task": f"task{t}", "group": p["group"]}
                 for p in pairs[start : start + size]]
        start += size
    src = out / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_file(str(src), "jsonl", str(data), FieldMap(query="query", positive="positive", task="task",
                                                          group="group"), samples_per_shard=200, progress=False,
                 held_out={})  # every pair a train pair: the run checks training, nothing is evaluated
    return data


def mine_start(data: Path, out: Path, strategy: str, args) -> Path:
    """The starting schedule, mined with the bundled MiniLM teacher."""
    from b3stream.config import EncoderConfig, LoraConfig, MineConfig
    from b3stream.mining.pipeline import run_all

    teacher = EncoderConfig(max_query_length=32, max_positive_length=48, lora=LoraConfig(enabled=False))
    return run_all(MineConfig(data=str(data), out=str(out), teacher=teacher, strategy=strategy, p=args.p, m=args.m,
                              K=args.K, h=args.h, batch_size=args.batch_size, small_tasks="merge"), progress=False)


def train(data: Path, schedule: Path, run: Path, args) -> subprocess.CompletedProcess:
    import yaml

    cfg = {"data": str(data), "schedule": str(schedule), "out": str(run), "student": STUDENT, "lr": 2e-4,
           "log_every": 1, "num_workers": 0, "eval_split": None, "export": False, "trace_ids": True,
           "seed": args.seed, "epochs": args.epochs, "mode": "refreshed", "overwrite": True, "resume": False,
           "refresh": {"every_steps": args.every_steps, "max_lag_steps": 0, "poll_seconds": 0.3, "keep": 100,
                       "nice": 0, "threads": args.miner_threads}}
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # each run is a one-process group of its own, on a port it picks itself
    return subprocess.run([sys.executable, "-m", "b3stream", "train", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=args.timeout)


def mined_batches(run: Path) -> dict[tuple[int, frozenset], int]:
    """(version, batch) -> the number of hard negatives the miner drew for it (distinct, outside the batch):
    what a step that trains that batch whole should carry."""
    import numpy as np

    from b3stream.schedule import list_versions, load_schedule, version_path

    out = {}
    for v in list_versions(run / "schedules"):
        s = load_schedule(version_path(run / "schedules", v))
        for b, ids in enumerate(s.batches):
            pool = np.unique(s.hard_negatives[b]) if s.negative_ids is not None else np.empty(0, np.int64)
            out[(v, frozenset(ids.tolist()))] = int(((pool >= 0) & ~np.isin(pool, ids)).sum())
    return out


def figures(run: Path, n: int) -> dict:
    """What ``run``'s trace and summary say about the promises."""
    trace = [json.loads(line) for line in (run / "trace.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    epochs = sorted({t["epoch"] for t in trace})
    once, steps = {}, {}
    for e in epochs:
        ids = [i for t in trace if t["epoch"] == e for i in t["ids"]]
        once[e] = sorted(ids) == list(range(n))
        steps[e] = sum(t["epoch"] == e for t in trace)
    start = trace[0]["version"]
    refreshed = [t for t in trace if t["version"] != start]
    with_negatives = sum(t["negatives"] > 0 for t in refreshed)
    mined = mined_batches(run)
    drawn = [mined.get((t["version"], frozenset(t["ids"]))) for t in refreshed]  # None: not one of the miner's
    return {"n": n, "steps": len(trace), "steps_per_epoch": steps, "exactly_once": once,
            "swaps": len(summary["swaps"]), "mid_epoch_swaps": sum(s["position"] > 0 for s in summary["swaps"]),
            "versions": sorted({t["version"] for t in trace}),
            "refreshed_steps": len(refreshed), "refreshed_with_hard_negatives": with_negatives,
            "share_with_hard_negatives": with_negatives / len(refreshed) if refreshed else None,
            # steps that trained one of their version's batches whole, with every negative drawn for it
            "refreshed_whole_with_their_negatives": sum(d is not None and d == t["negatives"]
                                                        for d, t in zip(drawn, refreshed)),
            "all_steps_with_hard_negatives": sum(t["negatives"] > 0 for t in trace)}


def check(out: Path, strategy: str, args, data: Path | None = None) -> dict:
    """Mine, train and read one strategy's run (the slow end-to-end test calls this too)."""
    from b3stream.data.manifest import Manifest

    data = data or build_data(out, args.sizes, args.seed)
    t0 = time.perf_counter()
    schedule = mine_start(data, out / f"mine-{strategy}", strategy, args)
    res = train(data, schedule, out / f"run-{strategy}", args)
    if res.returncode != 0:
        raise RuntimeError(f"{strategy}: training failed:\n{res.stderr[-4000:]}")
    n = Manifest.load(data).split("train").n
    return {"strategy": strategy, **figures(out / f"run-{strategy}", n), "seconds": round(time.perf_counter() - t0, 1)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/check-refresh"))
    ap.add_argument("--strategies", nargs="+", default=["b3pp", "random_hn", "task_hn"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[180, 150, 120, 90],
                    help="train pairs per task (four or more tasks of unequal size)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--p", type=int, default=2)
    ap.add_argument("--m", type=int, default=10)
    ap.add_argument("--h", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--every-steps", type=int, default=9, help="refresh.every_steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="the trainer's torch threads")
    ap.add_argument("--miner-threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per training run")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_data(args.out, args.sizes, args.seed)
    from b3stream.data.manifest import Manifest

    tasks = Manifest.load(data).split("train").tasks
    print(f"data: {data} (train tasks: {dict(tasks)})", flush=True)
    report, ok = [], True
    for strategy in args.strategies:
        r = check(args.out, strategy, args, data)
        report.append(r)
        once = all(r["exactly_once"].values())
        share = r["share_with_hard_negatives"]
        ok &= once and share is not None and share >= 0.8
        print(f"{strategy:10s} every train id exactly once per epoch: {once} "
              f"({', '.join(f'epoch {e}: {v}' for e, v in r['exactly_once'].items())}); steps per epoch "
              f"{list(r['steps_per_epoch'].values())}; {r['swaps']} swaps ({r['mid_epoch_swaps']} mid-epoch); "
              f"steps on refreshed versions with hard negatives: {r['refreshed_with_hard_negatives']} of "
              f"{r['refreshed_steps']} ({100 * share:.0f}%), the miner's batches whole with all their negatives: "
              f"{r['refreshed_whole_with_their_negatives']}; {r['seconds']:.0f} s" if share is not None else
              f"{strategy}: no step on a refreshed version", flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

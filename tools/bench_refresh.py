"""Refreshed mode against static mode on the same data, schedule and student: what refreshing costs the
trainer, what one refresh costs the miner, and whether it makes the upcoming batches harder.

    python tools/bench_refresh.py                      # ~2,000 code-search pairs, |B| = 32, K = 8, 1 epoch
    python tools/bench_refresh.py --pairs 6000 --every 25 --epochs 2 --out runs/bench-refresh
    python tools/bench_refresh.py --miner-device cuda --max-lag 0   # one GPU: the miner shares it, swaps land

Prints (and writes OUT/bench_refresh.json):
- trainer examples/s (median over steps) in static mode and in refreshed mode with the miner spawned beside it
  (on a CPU box they share the cores: the difference is the miner's share, not overhead of the swap itself);
- per refresh: the snapshot step, the step it was swapped in at (staleness), the miner's seconds per stage;
- per refresh: the Theorem-1 bound and mean in-batch negative similarity of the new schedule and of the one
  it replaced, both under the embeddings of the student snapshot (lower bound / higher similarity = harder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-refresh")
    ap.add_argument("--pairs", type=int, default=2000, help="code-search pairs to prepare")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--p", type=int, default=3)
    ap.add_argument("--m", type=int, default=50)
    ap.add_argument("--every", type=int, default=15, help="refresh.every_steps")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-steps", type=int, default=None, help="stop both runs after this many steps")
    ap.add_argument("--max-length", type=int, default=64, help="token limit for queries and positives")
    ap.add_argument("--miner-device", default=None,
                    help="refresh.device (default null: a GPU of its own if there is a spare one, else the CPU; "
                         "cuda: shares the trainer's GPU when there is only one)")
    ap.add_argument("--max-lag", type=int, default=None, help="refresh.max_lag_steps (0: every refresh lands at "
                                                                "its snapshot's step)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--packages", default=None, help="code-search packages to prepare from (default: the standard "
                                                      "library and every installed package; e.g. stdlib)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from b3stream.config import EncoderConfig, LoraConfig, MineConfig, RefreshConfig, TrainConfig, dump_config
    from b3stream.data.manifest import Manifest
    from b3stream.data.prepare import prepare_codesearch
    from b3stream.mining.pipeline import run_all
    from b3stream.schedule import list_versions, load_schedule, version_path

    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        prepare_codesearch(str(data), packages=args.packages.split(",") if args.packages else None,
                           max_pairs=args.pairs, progress=False)
    n = Manifest.load(data).split("train").n
    enc = dict(max_query_length=args.max_length, max_positive_length=args.max_length)
    schedule = run_all(MineConfig(data=str(data), out=str(out / "mine"), strategy="b3", p=args.p, m=args.m, K=args.K,
                                  batch_size=args.batch_size, per_task=False, seed=0,
                                  teacher=EncoderConfig(**enc, lora=LoraConfig(enabled=False))), progress=False)
    # From the stage records, so a rerun that reuses the mined stages still reports their cost.
    teacher_pass = sum(v for v in load_schedule(schedule).meta["timings"].values() if isinstance(v, (int, float)))

    runs = {}
    for mode in ("static", "refreshed"):
        # One process per run (as a user launches it): DeepSpeed keeps process-group state between runs.
        run_dir = out / f"train-{mode}"
        cfg = TrainConfig(data=str(data), schedule=str(schedule), out=str(run_dir),
                          student=EncoderConfig(**enc), epochs=args.epochs, max_steps=args.max_steps,
                          eval_split=None, export=False,
                          resume=False, overwrite=True, log_every=10, num_workers=None, save_every=None, mode=mode,
                          refresh=RefreshConfig(every_steps=args.every, poll_seconds=1.0, device=args.miner_device,
                                                max_lag_steps=args.max_lag))
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "bench.yaml")
        t0 = time.perf_counter()
        # its console lines also go to RUN/train.log (where it started the miner, the swaps)
        with open(run_dir / "train.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "b3stream", "train", "--config", str(run_dir / "bench.yaml"),
                                     "--quiet"], stderr=subprocess.PIPE, text=True)
            for line in proc.stderr:
                sys.stderr.write(line)
                log.write(line)
            if proc.wait():
                raise subprocess.CalledProcessError(proc.returncode, proc.args)
        summary = json.loads((run_dir / "summary.json").read_text())
        runs[mode] = {"examples_per_s": summary["examples_per_s"], "steps": summary["steps"],
                      "wall_s": round(time.perf_counter() - t0, 1), "swaps": summary["swaps"],
                      "refresh_wait_seconds": summary.get("refresh_wait_seconds"),
                      "num_workers": summary.get("num_workers")}

    refreshes = []
    folder = out / "train-refreshed" / "schedules"
    swapped_at = {s["to"]: s["step"] for s in runs["refreshed"]["swaps"]}
    for v in list_versions(folder)[1:]:
        meta = load_schedule(version_path(folder, v)).meta
        q, prev = meta.get("quality") or {}, meta.get("quality_previous") or {}
        refreshes.append({
            "version": v, "snapshot_step": meta.get("source_step"), "swapped_at_step": swapped_at.get(v),
            "seconds": {k: meta["timings"].get(k) for k in ("embed", "rank", "partition", "schedule", "quality")},
            "bound_new": q.get("theorem1_bound"), "bound_replaced": prev.get("theorem1_bound"),
            "neg_sim_new": q.get("neg_sim_mean"), "neg_sim_replaced": prev.get("neg_sim_mean"),
            "replaced_version": prev.get("version"),
        })
    result = {"machine": f"{os.cpu_count()} cores", "n_train": n, "batch_size": args.batch_size, "K": args.K,
              "teacher_pass_s": round(teacher_pass, 1), "miner_device": args.miner_device, "max_lag": args.max_lag,
              "miner": _miner_line(out / "train-refreshed"), "runs": runs, "refreshes": refreshes}
    (out / "bench_refresh.json").write_text(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))

    print(f"\n{n} training pairs, |B|={args.batch_size}, K={args.K}, {args.epochs} epoch(s), {os.cpu_count()} cores; "
          f"static mining (teacher pass + rank + partition + schedule) {teacher_pass:.0f} s")
    for mode, r in runs.items():
        print(f"  {mode:<9} {r['examples_per_s']:.1f} examples/s (median step), {r['steps']} steps in "
              f"{r['wall_s']} s, {len(r['swaps'])} swaps")
    print("  refresh  snapshot  swapped  embed  rank  partition  schedule | bound new (replaced)  neg sim new (replaced)")
    for r in refreshes:
        s = r["seconds"]
        fmt = lambda x, f=".1f": "-" if x is None else format(x, f)  # noqa: E731
        print(f"  v{r['version']:<7} {fmt(r['snapshot_step'], 'd'):>8} {fmt(r['swapped_at_step'], 'd'):>8} "
              f"{fmt(s['embed']):>6} {fmt(s['rank']):>5} {fmt(s['partition']):>10} {fmt(s['schedule']):>9} | "
              f"{fmt(r['bound_new'], '.3f')} ({fmt(r['bound_replaced'], '.3f')})   "
              f"{fmt(r['neg_sim_new'], '.4f')} ({fmt(r['neg_sim_replaced'], '.4f')})")
    return 0


def _miner_line(run: Path) -> str | None:
    """The trainer's line saying where it started the miner (its device), from the run's log."""
    path = run / "train.log"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return next((line.strip() for line in lines if "miner started" in line), None)


if __name__ == "__main__":
    sys.exit(main())

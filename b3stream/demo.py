"""`b3stream demo`: the whole pipeline on the bundled model and real code-search pairs, sized for a CPU.

1. prepare  - docstring -> code pairs from the installed Python packages, split by package;
2. mine     - the bundled all-MiniLM-L6-v2 as teacher; a random and a B3 schedule side by side, with the
              batch-quality numbers of each (Theorem 1 bound, in-batch negative similarity);
3. train    - a LoRA student on the B3 schedule through a real DeepSpeed engine (ZeRO-0, one process);
              with ``--refresh`` in refreshed mode: a background miner re-mines the schedule from snapshots
              of the student every quarter of the run and the trainer hot-swaps to each new version;
4. evaluate - held-out nDCG@10 / MRR@10 / Recall before and after.

Each stage's output stays under ``--out`` and is reused when it is already there, so a second run skips
to what changed. The same steps by hand are in the README.
"""

from __future__ import annotations

import time
from pathlib import Path

from .config import EncoderConfig, LoraConfig, MineConfig, RefreshConfig, TrainConfig


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def run_demo(args) -> int:
    from .data.manifest import Manifest
    from .data.prepare import prepare_codesearch, summary
    from .mining.commands import print_quality
    from .mining.pipeline import run_all
    from .schedule import load_schedule

    out = Path(args.out)
    data = out / "data"
    t0 = time.perf_counter()

    _say(f"1/4 prepare: up to {args.max_pairs} docstring -> code pairs from the installed packages")
    if (data / "manifest.json").is_file():
        manifest = Manifest.load(data)
        print(f"reusing {data}")
    else:
        manifest = prepare_codesearch(str(data), max_pairs=args.max_pairs)
    print(summary(manifest))

    _say(f"2/4 mine: MiniLM teacher, |B|={args.batch_size}, K={args.K}, p={args.p}, m={args.m}")
    teacher = EncoderConfig(max_query_length=64, max_positive_length=128, lora=LoraConfig(enabled=False))
    schedules = {}
    for strategy in ("random", "b3"):
        cfg = MineConfig(data=str(data), out=str(out / "mine"), teacher=teacher, strategy=strategy,
                         p=args.p, m=args.m, K=args.K, batch_size=args.batch_size, h=0, per_task=False,
                         seed=0, version=0 if strategy == "random" else 1)
        schedules[strategy] = run_all(cfg)
    for strategy, path in schedules.items():
        print(f"{strategy:>7}: {path}")
        print_quality(load_schedule(path).meta.get("quality"))

    refresh_every = max(5, args.steps // 4)
    # Bounded staleness: the schedule mined from the snapshot of step s is in use by step s + lag (the trainer
    # waits for the miner there if it must). Unbounded, a CPU trainer can finish before any refresh lands.
    lag = max(2, refresh_every // 3)
    _say(f"3/4 train: LoRA student on the b3 schedule for {args.steps} steps (DeepSpeed ZeRO-0)"
         + (f", refreshed mode: a student snapshot every {refresh_every} steps re-mined by a background miner, "
            f"each new schedule in use at most {lag} steps after its snapshot" if args.refresh else ""))
    from .dist import shutdown, single_process_env
    from .train.loop import train

    tcfg = TrainConfig(
        data=str(data), schedule=str(schedules["b3"]), out=str(out / "train"),
        student=EncoderConfig(max_query_length=64, max_positive_length=128), max_steps=args.steps,
        lr=args.lr, log_every=5, eval_every=None, eval_max_queries=args.eval_queries, save_every=None,
        # the demo reports the test split against every split's documents (nothing here is tuned on it)
        eval_split="test", eval_corpus="all",
        resume=False, overwrite=True, deepspeed="zero0",  # a second demo trains afresh over the first
        mode="refreshed" if args.refresh else "static",
        refresh=RefreshConfig(every_steps=refresh_every, poll_seconds=1.0, max_lag_steps=lag),
    )
    from .train.interrupt import Interrupted

    single_process_env()
    try:
        result = train(tcfg)
    except Interrupted as e:  # Ctrl-C: the step finished and a checkpoint was written; no traceback
        print(f"b3stream demo: training {e}", flush=True)
        return e.code
    finally:
        shutdown()

    _say("4/4 evaluate: the held-out test split (queries never seen in training, split by package), scored "
         "against the documents of every split")
    from .evaluate import format_metrics

    for name in ("before", "after"):
        if name in result["eval"]:
            print(f"{name:>7}: {format_metrics(result['eval'][name])}")
    if args.refresh:
        print(f"\nrefreshed mode: {len(result['swaps'])} hot swap(s)")
        for swap in result["swaps"]:
            print("  " + _swap_line(swap, out / "train" / "schedules"))
    print(f"\ntrained {result['steps']} steps at {result['examples_per_s'] or 0:.1f} examples/s; "
          f"demo took {time.perf_counter() - t0:.0f} s")
    print(f"TensorBoard: tensorboard --logdir {out / 'train' / 'tb'}")
    print(f"model: {out / 'train' / 'export'}  (b3stream evaluate --model {out / 'train' / 'export'} ...)")
    return 0


def _swap_line(swap: dict, folder: Path) -> str:
    """One hot swap: versions, step, and the Theorem-1 bound of the batches still to come under the
    snapshot's embeddings, for the new schedule and for the one it replaced (lower: harder batches)."""
    from .schedule import ScheduleError, load_schedule, version_path

    line = f"v{swap['from']} -> v{swap['to']} at step {swap['step']}"
    try:
        meta = load_schedule(version_path(folder, swap["to"])).meta
    except (ScheduleError, OSError):
        return line
    q, old = meta.get("quality") or {}, meta.get("quality_previous") or {}
    if meta.get("source_step") is not None:
        line += f" (mined from the snapshot of step {meta['source_step']})"
    if "theorem1_bound" in q:
        line += f": bound {q['theorem1_bound']:.3f}"
        if old.get("version") == swap["from"] and "theorem1_bound" in old:
            line += f" vs {old['theorem1_bound']:.3f} for v{swap['from']} on the same embeddings"
    return line

"""Run tools/bench_quality.py's cells side by side on one big machine, then report them together.

On a GPU box one cell of the quality benchmark (MiniLM, a few hundred steps) leaves the GPU nearly idle and
spends most of its time starting processes, so cells run in parallel: one ``bench_quality.py`` process per
(|B|, seed) of each block, each in its own copy of a shared template folder. The template holds what every
cell shares and what should be measured alone: the prepared data, the zero-shot evaluation and the teacher
pass (its wall time feeds the ``random+compute`` arm). At the end the finished cells are merged into one
folder and ``bench_quality.py --report-only`` writes the JSON, the table and the plot from them; cells still
running at ``--deadline`` are stopped and left out (the report says how many seeds each row has).

    python tools/bench_quality_parallel.py --work /tmp/bq --out results --device cuda --deadline 420 \\
        --block 6000=random,b3,b3pp,task,gcbs,random+compute:16,32,64:0,1,2 \\
        --block 27000=random,b3,b3pp:32:0,1,2 \\
        --pairs-file 6000=pairs-6000.jsonl --pairs-file 27000=pairs-27000.jsonl \\
        -- --full-finetune --lr 5e-5 --query-length 32 --positive-length 128 --K 32

Arguments after ``--`` go to every ``bench_quality.py`` call (the recipe). Cell order inside a process follows
the block's arm order, so list the arms that matter most first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import bench_quality as bq  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="folder for the template, the workers and the merged cells")
    ap.add_argument("--out", required=True, help="folder for the JSON, plot and logs of each dataset")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    ap.add_argument("--deadline", type=float, default=None, help="seconds after which running workers stop")
    ap.add_argument("--block", action="append", required=True, metavar="PAIRS=ARMS:BATCHES:SEEDS",
                    help="cells of one dataset size; every (|B|, seed) becomes a worker (repeatable)")
    ap.add_argument("--pairs-file", action="append", default=[], metavar="PAIRS=PATH",
                    help="bench_quality.py --pairs-file for that dataset size")
    ap.add_argument("recipe", nargs=argparse.REMAINDER, help="-- then bench_quality.py recipe flags")
    args = ap.parse_args(argv)
    args.recipe = [a for a in args.recipe if a != "--"]
    args.files = dict(item.split("=", 1) for item in args.pairs_file)
    args.blocks = []
    for item in args.block:
        pairs, _, grid = item.partition("=")
        arms, batches, seeds = grid.split(":")
        args.blocks.append((int(pairs), arms, [int(b) for b in batches.split(",")], [int(s) for s in seeds.split(",")]))
    return args


def common(args, pairs: int, work: Path) -> list[str]:
    out = ["--work", str(work), "--device", args.device, "--threads", str(args.threads), "--pairs", str(pairs),
           *args.recipe]
    if str(pairs) in args.files:
        out += ["--pairs-file", str(Path(args.files[str(pairs)]).resolve())]
    return out


def template(args, pairs: int, folder: Path) -> None:
    """Data, zero-shot evaluation and the teacher pass, once per dataset (the teacher alone on the machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    targs = bq._parse_args(common(args, pairs, folder) + ["--grid", "random:32:0"])
    recipe = bq._recipe(targs)
    data = bq.dataset(targs, folder)
    bq.evaluate(targs, data, None, folder / "eval" / f"zero-shot-L{recipe.query_length}x{recipe.positive_length}",
                recipe)
    bq.mine(targs, data, folder, recipe, "random", 32, 0)  # the teacher pass, timed by its stage record


def merge(workers: list[Path], into: Path) -> None:
    """Finished cells of every worker into ``into`` (a copy of the template): evaluations, schedules and the
    runs' records (not their checkpoints or exports); a cell two workers both ran keeps the first copy."""
    for w in workers:
        for sub in ("eval", "schedules"):
            for cell in sorted((w / sub).glob("*")) if (w / sub).is_dir() else []:
                if not (into / sub / cell.name).exists():
                    shutil.copytree(cell, into / sub / cell.name)
        for run in sorted((w / "runs").glob("*")) if (w / "runs").is_dir() else []:
            if (run / "bench.json").is_file() and not (into / "runs" / run.name).exists():
                (into / "runs" / run.name).mkdir(parents=True)
                for name in ("bench.json", "summary.json", "train.log"):
                    if (run / name).is_file():
                        shutil.copy2(run / name, into / "runs" / run.name / name)


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for pairs in sorted({b[0] for b in args.blocks}):
        tpl = work / f"template-{pairs}"
        template(args, pairs, tpl)
        print(f"[{time.perf_counter() - t0:5.0f} s] template for {pairs} pairs ready", flush=True)
    for pairs, arms, batches, seeds in args.blocks:
        for batch in batches:
            for seed in seeds:
                w = work / f"w-{pairs}-B{batch}-s{seed}-{len(procs)}"
                if not w.exists():
                    shutil.copytree(work / f"template-{pairs}", w)
                log = open(out / f"worker-{w.name}.log", "w")
                cmd = [sys.executable, str(TOOLS / "bench_quality.py"), *common(args, pairs, w),
                       "--grid", f"{arms}:{batch}:{seed}", "--bootstrap", "10"]
                procs.append((pairs, w, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                         start_new_session=True)))
    print(f"[{time.perf_counter() - t0:5.0f} s] {len(procs)} workers started", flush=True)
    while any(p.poll() is None for _, _, p in procs):
        if args.deadline is not None and time.perf_counter() - t0 > args.deadline:
            for _, w, p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGTERM)
                    print(f"deadline: stopped {w.name}", flush=True)
            for _, _, p in procs:
                p.wait()
            break
        time.sleep(2)
    print(f"[{time.perf_counter() - t0:5.0f} s] workers done: "
          + ", ".join(f"{w.name}={p.returncode}" for _, w, p in procs), flush=True)
    for pairs in sorted({b[0] for b in args.blocks}):
        merged = work / f"merged-{pairs}"
        if not merged.exists():
            shutil.copytree(work / f"template-{pairs}", merged)
        merge([w for n, w, _ in procs if n == pairs], merged)
        grids = [f"{arms}:{','.join(map(str, batches))}:{','.join(map(str, seeds))}"
                 for n, arms, batches, seeds in args.blocks if n == pairs]
        cmd = [sys.executable, str(TOOLS / "bench_quality.py"), *common(args, pairs, merged), "--report-only",
               "--json", str(out / f"quality-{pairs}.json"), "--plot", str(out / f"quality-{pairs}.png")]
        for g in grids:
            cmd += ["--grid", g]
        subprocess.run(cmd, check=False)
    print(f"[{time.perf_counter() - t0:5.0f} s] done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

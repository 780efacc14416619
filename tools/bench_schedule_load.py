"""Load time and peak memory of a 10M-id schedule file: the old ``B3SCHED1`` container against the safetensors one
(issue 36 item 3).

Builds one seeded schedule of ``--n`` ids in batches of ``--batch-size`` (communities of ``--K``, a data stamp,
a batch-quality block in the metadata), with and without B3++ hard negatives (h = 1), publishes it with the
old writer (``b3stream/schedule.py`` as of ``--old-rev``, imported from ``git show`` as a module of its own) and
with the current one, and loads each file ``--repeats`` times, every load in a fresh interpreter: wall time of
``load_schedule`` alone (and its CPU time, which other processes on a busy machine disturb less), and peak
resident memory (``VmHWM``, which starts afresh at exec) before and after.
The loads go round robin over the four files, so that load from other processes falls on both formats alike.

    python tools/bench_schedule_load.py                 # 10M ids, |B| = 1024, h = 0 and 1, 3 loads each
    python tools/bench_schedule_load.py --n 1000000     # a quicker look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The last commit whose schedule.py wrote the B3SCHED1 container (the parent of the switch to safetensors).
OLD_REV = "8689dfd"

# One load, in a fresh interpreter: imports first (their memory is the baseline), then the timed load.
_LOADER = r"""
import importlib.util, json, sys, time
sys.path.insert(0, {repo!r})
import numpy, b3stream.files, b3stream.records, safetensors
def hwm_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
module_file, path = sys.argv[1], sys.argv[2]
if module_file == "-":
    import b3stream.schedule as schedule
else:
    spec = importlib.util.spec_from_file_location("b3stream._schedule_old", module_file)
    schedule = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schedule)
before = hwm_kb()
start, cpu = time.perf_counter(), time.process_time()
s = schedule.load_schedule(path)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
assert len(s.ids) == s.meta["data"]["n"]
print(json.dumps({{"wall_s": wall, "cpu_s": cpu, "hwm_before_mb": before / 1024, "hwm_mb": hwm_kb() / 1024}}))
"""


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000, help="ids in the schedule")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="loads per file, each in a fresh process")
    ap.add_argument("--old-rev", default=OLD_REV, help="a commit whose b3stream/schedule.py writes B3SCHED1")
    ap.add_argument("--work", default=None, help="folder for the files (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args(argv)


def old_module(rev: str, folder: Path):
    """``b3stream/schedule.py`` at ``rev`` as the module ``b3stream._schedule_old`` (its relative imports resolve
    against today's package, whose ground floor it needs) and the file it was loaded from."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:b3stream/schedule.py"], check=True,
                            capture_output=True, text=True).stdout
    if "B3SCHED1" not in source:
        raise SystemExit(f"b3stream/schedule.py at {rev} does not write the old container; pass --old-rev")
    path = folder / "schedule_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("b3stream._schedule_old", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module, path


def build(schedule_cls, n: int, size: int, K: int, h: int):
    """A seeded schedule of ``n`` ids, as a miner would write it (only the arrays' sizes matter here)."""
    rng = np.random.default_rng(0)
    ids = rng.permutation(n).astype(np.int64)
    offsets = np.append(np.arange(0, n, size, dtype=np.int64), n)
    negatives = rng.integers(0, n, size=(n, h), dtype=np.int64) if h else None
    meta = {"strategy": "b3pp" if h else "b3", "K": K, "batch_size": size, "h": h, "p": 10, "m": 100, "seed": 0,
            "num_batches": len(offsets) - 1, "source_model": "bench", "source_step": None,
            "data": {"dataset": "bench", "split": "train", "n": n, "fingerprint": "ab" * 32},
            "quality": {"theorem1_bound": 1.25, "theorem1_bound_ci95": [1.2, 1.3], "in_batch_sim": 0.31}}
    return schedule_cls(ids=ids, offsets=offsets, meta=meta, negative_ids=negatives)


def load_once(module_file: str, path: Path) -> dict:
    code = _LOADER.format(repo=str(REPO))
    out = subprocess.run([sys.executable, "-c", code, module_file, str(path)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = _args(argv)
    from b3stream import schedule as new

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-schedule-"))
    work.mkdir(parents=True, exist_ok=True)
    old, old_file = old_module(args.old_rev, work)
    rows = []
    try:
        files = {}  # (format, h) -> (module file for the loader, schedule file)
        for h in (0, 1):
            for name, module, module_file in (("B3SCHED1", old, str(old_file)), ("safetensors", new, "-")):
                path = module.publish_schedule(build(module.Schedule, args.n, args.batch_size, args.K, h),
                                               work / f"{name}-h{h}", version=0)
                files[name, h] = (module_file, path)
        # Round robin, so that the load from other processes falls on both formats alike.
        runs = {key: [] for key in files}
        for _ in range(args.repeats):
            for key, (module_file, path) in files.items():
                runs[key].append(load_once(module_file, path))
        for (name, h), (_, path) in files.items():
            done = runs[name, h]
            row = {"format": name, "h": h, "n": args.n, "file_mb": path.stat().st_size / 2**20,
                   "wall_s": statistics.median(r["wall_s"] for r in done),
                   "wall_s_min": min(r["wall_s"] for r in done),
                   "wall_s_all": [round(r["wall_s"], 3) for r in done],
                   "cpu_s": statistics.median(r["cpu_s"] for r in done),
                   "hwm_before_mb": statistics.median(r["hwm_before_mb"] for r in done),
                   "hwm_mb": statistics.median(r["hwm_mb"] for r in done)}
            rows.append(row)
            print(f"{name:12s} h={h}  file {row['file_mb']:6.1f} MB  load {row['wall_s']:.3f} s median, "
                  f"{row['wall_s_min']:.3f} min, CPU {row['cpu_s']:.3f} s median  peak RSS {row['hwm_mb']:.0f} MB "
                  f"(after imports {row['hwm_before_mb']:.0f} MB)  runs {row['wall_s_all']}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How hard were the batches a run actually trained on, step by step? A diagnostic for refreshed mode.

A schedule's metadata says how hard *its* batches are; a refreshed run trains on a mix of schedules, each
from the swap step on, and only on the ids not yet seen in that epoch. This script replays the run's sampler
(same seed, the swaps recorded in ``RUN/summary.json``, the schedule versions in ``RUN/schedules/``) and
scores every global batch it trained on with one set of embeddings (``--embeddings``: a mining folder's
``embeddings/`` with ``queries.npy`` and ``positives.npy``, e.g. the teacher's, or the last snapshot's under
``RUN/refresh/mine/embeddings``), so static and refreshed runs are compared on the same yardstick:

- mean in-batch negative similarity (cosine of a query with the other members' positives), and
- the share of in-batch negatives that score above the query's own positive (hard or false negatives).

Figures are averaged over segments of steps (``--segments 0,45,90,131``; default: thirds of the run).
Single-process runs (world size 1), as tools/bench_quality.py trains them.

    python tools/batch_hardness.py RUN [RUN ...] --embeddings WORK/mine/minilm/embed-only/embeddings
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from b3stream.refresh.swap import swap  # noqa: E402
from b3stream.schedule import load_schedule, version_path  # noqa: E402
from b3stream.train.sampler import ScheduleSampler  # noqa: E402


def trained_batches(run: Path) -> list[np.ndarray]:
    """The global batches of ``run`` in training order, replayed through its swaps."""
    import yaml

    summary = json.loads((run / "summary.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if summary.get("world_size", 1) != 1:
        raise SystemExit(f"{run}: trained on {summary['world_size']} ranks; the replay covers one")
    folder = run / "schedules"
    first = load_schedule(version_path(folder, 0) if (folder / "v000000.b3s").is_file() else cfg["schedule"])
    sampler = ScheduleSampler(first, len(first.ids), seed=int(cfg.get("seed", 0)))
    swaps = {int(s["step"]): int(s["to"]) for s in summary.get("swaps", [])}
    out = []
    for step in range(int(summary["steps"])):
        if step in swaps:
            swap(sampler, load_schedule(version_path(folder, swaps[step])), step=step)
        out.append(np.asarray(sampler.global_batch(sampler.position)))
        sampler.advance()
    return out


def hardness(batch: np.ndarray, q: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    s = q[batch] @ p[batch].T
    own = np.diag(s).copy()
    np.fill_diagonal(s, np.nan)
    return float(np.nanmean(s)), float(np.nanmean(s > own[:, None]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--embeddings", type=Path, required=True, help="folder with queries.npy and positives.npy")
    ap.add_argument("--segments", default=None, help="step boundaries, e.g. 0,45,90,131 (default: thirds)")
    args = ap.parse_args(argv)
    record = args.embeddings / "embeddings.json"
    if record.is_file() and json.loads(record.read_text()).get("complete") is False:
        raise SystemExit(f"{args.embeddings}: the embed stage did not finish there (a miner stopped mid-pass); "
                         "its arrays are partly empty")
    q = np.load(args.embeddings / "queries.npy").astype(np.float32)
    p = np.load(args.embeddings / "positives.npy").astype(np.float32)
    for run in args.runs:
        batches = trained_batches(run)
        if max(int(b.max()) for b in batches) >= len(q):
            raise SystemExit(f"{run}: ids beyond the {len(q)} embeddings in {args.embeddings} (other data?)")
        stats = np.array([hardness(b, q, p) for b in batches if len(b) > 1])
        n = len(stats)
        edges = [int(x) for x in args.segments.split(",")] if args.segments else [0, n // 3, 2 * n // 3, n]
        cells = [f"steps {lo}-{hi}: {stats[lo:hi, 0].mean():.3f} / {100 * stats[lo:hi, 1].mean():.1f}%"
                 for lo, hi in zip(edges, edges[1:]) if hi > lo]
        print(f"{run.name}: " + " | ".join(cells), flush=True)
    print("(mean in-batch negative similarity / share of negatives above the positive)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

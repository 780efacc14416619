"""Benchmark the data layer: random access by id (wids) and streaming (webdataset).

    python tools/bench_data.py                  # builds the code-search dataset in a temp folder first
    python tools/bench_data.py --data DIR       # an existing prepared dataset

Prints the mean / median / p99 microseconds per record for --n random ids (target: mean < 200 us),
and the streaming rate in records/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="prepared dataset folder (default: build code-search pairs)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=10_000, help="random ids to read")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from b3stream.data import ShardedDataset
    from b3stream.data.prepare import prepare_codesearch, summary

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory()
        args.data = os.path.join(tmp.name, "codesearch")
        t = time.perf_counter()
        manifest = prepare_codesearch(args.data, progress=True)
        print(f"prepare codesearch: {time.perf_counter() - t:.1f} s")
        print(summary(manifest))

    ds = ShardedDataset(args.data, args.split)
    t = time.perf_counter()
    n_stream = sum(1 for _ in ds)
    stream_s = time.perf_counter() - t
    print(f"streaming: {n_stream} records in {stream_s:.2f} s = {n_stream / stream_s:,.0f} records/s")

    ids = np.random.default_rng(args.seed).integers(0, len(ds), size=args.n)
    ds[0]  # open the shards once; the first touch is not what a training step pays
    times = np.empty(args.n)
    for i, idx in enumerate(ids):
        t = time.perf_counter()
        ds[int(idx)]
        times[i] = time.perf_counter() - t
    us = times * 1e6
    print(f"random access: {args.n} ids over {len(ds)} records in {len(ds.info.shards)} shards: "
          f"mean {us.mean():.1f} us, median {np.median(us):.1f} us, p99 {np.percentile(us, 99):.1f} us "
          f"({'OK' if us.mean() < 200 else 'ABOVE'} the 200 us target)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

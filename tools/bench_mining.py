#!/usr/bin/env python
"""Benchmark the mining stages on synthetic clustered embeddings: time and peak RSS per stage.

    python tools/bench_mining.py --n 100000              # embed(import) + rank + partition + schedule
    python tools/bench_mining.py --n 1000000 --no-rank   # partition + schedule from a generated S
    python tools/bench_mining.py --n 100000 --edges mutual,union --workdir /tmp/b3bench
    python tools/bench_mining.py --n 100000 --no-rank --partitioner metis,kaminpar --json F.json

Every stage runs in its own subprocess, which reports its wall time, its CPU time (user + system, all
threads: on a shared machine the wall time grows with the other jobs, the CPU time much less), the 1-minute
load average when it started and ended, and its own peak resident set size
(``VmHWM``, ``ru_maxrss`` off Linux; both count the touched pages of memory-mapped inputs too), so one
stage's memory never hides another's. Paper settings by default: d=384, p=30, m=100, K=32, |B|=1024, h=5.
The schedule stage's Theorem-1 bound is the two-phase estimate of ``b3stream/mining/quality.py`` (the
record's ``theorem1_bound_ci95``) for ``--quality-sample`` queries.

Synthetic data (:func:`generate_data`): unit vectors with a two-level cluster structure, like topics and subtopics
of a text corpus. ``n / 2000`` super-clusters with random unit centres ``g``; each holds 10 clusters whose
centres are ``normalise(g + 0.8 z)``; a query is ``normalise(c + 1.0 z)`` for its cluster's centre ``c``
and its positive ``normalise(x + 0.6 z)`` (``z`` Gaussian with unit expected norm). Cosines then look
like those of a sentence encoder: about 0.86 to the own positive, 0.5 within a cluster, 0.3 within a
super-cluster, 0 across. Cluster sizes are binomial (about 200), ids are in random order.

S for large n without ranking (``--no-rank``): exact search over all N would take over an hour at 1M on 2
cores, so S is computed *exactly within each super-cluster*: every query's positives are ranked against the
positives of its own super-cluster (about 2000), the own positive removed, ranks [p, p+m) kept. Since
super-clusters are nearly orthogonal, these are (almost) the true global ranks [p, p+m): the graph has the
degree, mutual-edge fraction and community structure a real FAISS ranking gives on this data (compare
``--n 100000`` with and without ``--no-rank``), at about a minute of generation for 1M.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUPER = 2000  # points per super-cluster
SUB = 10  # clusters per super-cluster


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _noise(rng, shape, scale):
    return (scale / np.sqrt(shape[-1])) * rng.standard_normal(shape, dtype=np.float32)


def generate_data(work: Path, n: int, d: int, p: int, m: int, seed: int, block_S: bool,
                  chunk: int = 50_000, raw: bool = False) -> dict:
    """Write the synthetic embeddings (and S). ``raw``: also write float32 Q/P files for the import path."""
    from b3stream.config import MineConfig
    from b3stream.mining.artefacts import new_token, write_json
    from b3stream.mining.pipeline import rank_params

    rng = np.random.default_rng(seed)
    n_super = max(1, -(-n // SUPER))
    supers = _unit(rng.standard_normal((n_super, d), dtype=np.float32))
    centres = _unit(np.repeat(supers, SUB, axis=0) + _noise(rng, (n_super * SUB, d), 0.8))
    cluster = rng.integers(0, n_super * SUB, size=n)
    emb_dir = work / "embeddings"
    emb_dir.mkdir(parents=True, exist_ok=True)
    Q = np.lib.format.open_memmap(emb_dir / "queries.npy", mode="w+", dtype=np.float16, shape=(n, d))
    P = np.lib.format.open_memmap(emb_dir / "positives.npy", mode="w+", dtype=np.float16, shape=(n, d))
    for lo in range(0, n, chunk):
        c = cluster[lo : lo + chunk]
        x = _unit(centres[c] + _noise(rng, (len(c), d), 1.0))
        y = _unit(x + _noise(rng, (len(c), d), 0.6))
        Q[lo : lo + len(c)] = x.astype(np.float16)
        P[lo : lo + len(c)] = y.astype(np.float16)
    Q.flush()
    P.flush()
    stamp = {"dataset": "synthetic", "split": None, "n": n, "fingerprint": f"synthetic-{n}-{d}-{seed}"}
    np.save(emb_dir / "tasks.npy", np.zeros(n, dtype=np.int32))
    np.save(emb_dir / "positive_keys.npy", np.arange(n, dtype=np.int64))  # every positive text distinct
    record = {"stamp": stamp, "params": {"source": "synthetic", "seed": seed}, "n": n, "dim": d, "rows_done": n,
              "complete": True, "task_names": ["default"], "token": new_token(), "source_model": "synthetic"}
    if raw:
        np.save(work / "q.npy", np.asarray(Q, dtype=np.float32))
        np.save(work / "p.npy", np.asarray(P, dtype=np.float32))
    else:
        write_json(emb_dir / "embeddings.json", record)
    info = {"super_clusters": n_super, "clusters": n_super * SUB}
    if block_S:
        t0 = time.perf_counter()
        S = np.full((n, m), -1, dtype=np.int32)
        scores = np.zeros((n, m), dtype=np.float16)
        T = np.full((n, p), -1, dtype=np.int32)  # the skipped top-p: B3++ excludes them
        sup = cluster // SUB
        order = np.argsort(sup, kind="stable")
        bounds = np.searchsorted(sup[order], np.arange(n_super + 1))
        for s in range(n_super):
            ids = np.sort(order[bounds[s] : bounds[s + 1]])
            if len(ids) <= p + m:
                raise SystemExit(f"super-cluster {s} has only {len(ids)} points; use a larger --n")
            sims = np.asarray(Q[ids], dtype=np.float32) @ np.asarray(P[ids], dtype=np.float32).T
            np.fill_diagonal(sims, -np.inf)  # the own positive is not a candidate
            top = np.argpartition(-sims, p + m - 1, axis=1)[:, : p + m]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1), 1)
            S[ids] = ids[top[:, p:]]
            T[ids] = ids[top[:, :p]]
            scores[ids] = np.take_along_axis(sims, top[:, p:], 1).astype(np.float16)
        rank_dir = work / "rank"
        rank_dir.mkdir(exist_ok=True)
        np.save(rank_dir / "S.npy", S)
        np.save(rank_dir / "scores.npy", scores)
        np.save(rank_dir / "top.npy", T)
        cfg = MineConfig(out=str(work), p=p, m=m)
        write_json(rank_dir / "rank.json", {
            "stamp": stamp, "params": rank_params(cfg, record), "n": n, "m": m, "token": new_token(),
            "top": {"file": "top.npy", "p": p, "shape": [n, p]},
            "info": {"generator": "exact within super-clusters"}, "seconds": round(time.perf_counter() - t0, 3)})
        info["S_seconds"] = round(time.perf_counter() - t0, 1)
    return info


# --------------------------------------------------------------------------------------------------
# stages (run in a child process)
# --------------------------------------------------------------------------------------------------


def run_stage(args) -> None:
    import logging

    from b3stream.config import MineConfig
    from b3stream.mining import pipeline

    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every missing SIMD variant
    work = Path(args.workdir)
    cfg = MineConfig(out=str(work), p=args.p, m=args.m, K=args.K, batch_size=args.batch_size, h=args.h,
                     edges=args.edges_one, strategy=args.strategy, quality_sample=args.quality_sample,
                     version=args.version, partitioner=args.partitioner_one, partition_threads=args.threads,
                     kaminpar_context=args.kaminpar_context)
    if args.stage == "embed":
        cfg.query_embeddings, cfg.positive_embeddings = str(work / "q.npy"), str(work / "p.npy")
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), _cpu_seconds()
    pipeline.run_stage(args.stage, cfg, progress=False)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    extra = {}
    if args.stage == "schedule":
        from b3stream.schedule import load_schedule

        meta = load_schedule(work / "schedules").meta
        extra = {"quality_s": meta["timings"].get("quality"), "quality": meta.get("quality")}
    if args.stage == "rank":
        extra = {"rank": json.loads((work / "rank" / "rank.json").read_text())["info"]}
    if args.stage == "partition":
        g = json.loads((work / "partition" / "partition.json").read_text())["groups"]
        sizes = (np.load(work / "partition" / "communities.npy") >= 0).sum(1)
        extra = {"partition": {**next(iter(g.values())), "sizes": {
            "min": int(sizes.min()), "max": int(sizes.max()), "exactly_K": int((sizes == args.K).sum()),
            "communities": int(len(sizes))}}}
    peak = _peak_rss_gb()
    print(json.dumps({"stage": args.stage, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                      "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)], "peak_rss_gb": round(peak, 3),
                      **extra}))


def _peak_rss_gb() -> float:
    """This process's peak resident set size: ``VmHWM`` (Linux), which starts afresh at exec, unlike
    ``ru_maxrss``, which a child inherits from the parent's size when it was forked (after generating 10M
    examples the parent's 21.8 GB showed as every stage's peak); ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (KaMinPar's and torch's included)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(args, stage: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", "--stage", stage, "--workdir", str(args.workdir),
           "--n", str(args.n), "--p", str(args.p), "--m", str(args.m), "--K", str(args.K),
           "--batch-size", str(args.batch_size), "--h", str(args.h),
           "--quality-sample", str(args.quality_sample)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--kaminpar-context", args.kaminpar_context]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if args.wait_load is not None:  # a shared machine: wait (a while) for the other jobs to calm down
        deadline = time.monotonic() + args.wait_max
        while os.getloadavg()[0] > args.wait_load and time.monotonic() < deadline:
            time.sleep(5)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed ({proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--p", type=int, default=30)
    ap.add_argument("--m", type=int, default=100)
    ap.add_argument("--K", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--h", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edges", default="mutual,union", help="comma-separated: mutual, union")
    ap.add_argument("--partitioner", default="metis", help="comma-separated: metis, kaminpar (each on the same S)")
    ap.add_argument("--threads", type=int, default=None, help="KaMinPar's threads (default: all cores)")
    ap.add_argument("--kaminpar-context", default="largek", help="KaMinPar preset (terapart-largek: less memory)")
    ap.add_argument("--json", default=None, help="write every stage's figures to this JSON file")
    ap.add_argument("--no-rank", action="store_true", help="generate S (exact within super-clusters) instead")
    ap.add_argument("--quality-sample", type=int, default=1024, help="queries scored for the Theorem-1 bound")
    ap.add_argument("--workdir", default=None, help="default: /tmp/b3bench-N")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--reuse-data", action="store_true",
                    help="use the data a kept (or failed) run left in --workdir instead of generating it again")
    ap.add_argument("--no-baseline", action="store_true", help="skip the random schedule (quality reference)")
    ap.add_argument("--no-b3pp", action="store_true", help="skip the B3++ schedule")
    ap.add_argument("--wait-load", type=float, default=None,
                    help="before each stage, wait until the 1-minute load average is at most this (shared machines)")
    ap.add_argument("--wait-max", type=float, default=900, help="... but at most this many seconds per stage")
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--edges-one", default="mutual", help=argparse.SUPPRESS)
    ap.add_argument("--partitioner-one", default="metis", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="b3", help=argparse.SUPPRESS)
    ap.add_argument("--version", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.workdir = Path(args.workdir or f"/tmp/b3bench-{args.n}")
    if args.child:
        run_stage(args)
        return

    import shutil

    reuse = args.reuse_data and (args.workdir / "embeddings" / "embeddings.json").is_file() and (
        args.no_rank == (args.workdir / "rank" / "rank.json").is_file())
    if args.workdir.exists() and not reuse:
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"# b3stream mining benchmark: n={args.n:,} d={args.d} p={args.p} m={args.m} K={args.K} "
          f"|B|={args.batch_size} h={args.h}; {os.cpu_count()} CPUs; workdir {args.workdir}", flush=True)
    t0 = time.perf_counter()
    if reuse:
        info = {"reused": str(args.workdir)}
        for stage in ("partition", "schedules"):
            shutil.rmtree(args.workdir / stage, ignore_errors=True)
    else:
        info = generate_data(args.workdir, args.n, args.d, args.p, args.m, args.seed, block_S=args.no_rank,
                             raw=not args.no_rank)
    print(f"# generated data in {time.perf_counter() - t0:.1f} s: {info}", flush=True)
    rows = []

    def report(name: str, res: dict) -> None:
        rows.append((name, res))
        extra = ""
        if "partition" in res:
            pt = res["partition"]
            sizes = pt.get("sizes", {})
            extra = (f"edges {pt['edges']:,}, graph {pt['graph_s']} s, {pt['partitioner']} {pt['partitioner_s']} s, "
                     f"repair {pt['repair_s']} s, inside {pt['internal_edge_fraction']:.1%}, "
                     f"community sizes {sizes.get('min')}-{sizes.get('max')}")
            steps = pt.get("kaminpar_steps")
            if steps:
                extra += (f" (KaMinPar: order {steps['order_s']} s, write {steps['write_s']} s, load "
                          f"{steps['load_s']} s, partition {steps['partition_s']} s on {steps['threads']} threads)")
            if pt.get("repaired"):
                extra += (f" (before repair {pt['unrepaired_sizes_min']}-{pt['unrepaired_sizes_max']}, "
                          f"{pt['unrepaired_empty_parts']} empty; moved {pt['evicted']:,}, "
                          f"{pt['moved_without_edges']:,} without an edge)")
        if "rank" in res:
            g = next(iter(res["rank"]["groups"].values()))
            extra = f"{g['kind']} {g.get('nlist', '')}/{g.get('nprobe', '')}, recall {g.get('recall', 'exact')}, " \
                    f"build {g['build_s']} s, search {g['search_s']} s"
        if res.get("quality"):
            q = res["quality"]
            ci = q.get("theorem1_bound_ci95")
            extra = (f"quality {res['quality_s']} s of it: bound {q['theorem1_bound']:.3f}"
                     f"{f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else ''} (floor "
                     f"{q['theorem1_floor']:.3f}), neg sim mean {q['neg_sim_mean']:.3f} hardest "
                     f"{q['neg_sim_hardest_mean']:.3f}")
        print(f"{name:<28} {res['seconds']:>8.1f} s {res.get('cpu_s', float('nan')):>7.1f} s "
              f"{res['peak_rss_gb']:>6.2f} GB  {res.get('load_avg', ['?', '?'])[0]:>5}   {extra}", flush=True)

    print(f"{'stage':<28} {'time':>10} {'CPU':>9} {'peak RSS':>9} {'load':>5}")
    if not args.no_rank:
        report("embed (import)", child(args, "embed"))
        report("rank", child(args, "rank"))
    version = 0
    totals = {}
    partitioners = [p for p in args.partitioner.split(",") if p]
    for edges in [e for e in args.edges.split(",") if e]:
        for part_name in partitioners:
            tag = f"{edges}, {part_name}" if len(partitioners) > 1 else edges
            part = child(args, "partition", edges_one=edges, partitioner_one=part_name)
            report(f"partition ({tag})", part)
            sched = child(args, "schedule", edges_one=edges, partitioner_one=part_name, strategy="b3",
                          version=version)
            report(f"schedule b3 ({tag})", sched)
            version += 1
            totals[tag] = (part["seconds"] + sched["seconds"], max(part["peak_rss_gb"], sched["peak_rss_gb"]),
                           part.get("cpu_s", 0) + sched.get("cpu_s", 0))
            if edges == "mutual" and part_name == partitioners[0] and not args.no_b3pp:
                report(f"schedule b3pp ({tag})", child(args, "schedule", edges_one=edges, partitioner_one=part_name,
                                                       strategy="b3pp", version=version))
                version += 1
    if not args.no_baseline:  # the same quality numbers for random batches, for scale
        report("schedule random", child(args, "schedule", strategy="random", version=version))
    for tag, (secs, peak, cpu) in totals.items():
        print(f"# partition + schedule b3 ({tag}): {secs:.1f} s ({cpu:.1f} CPU-s), peak {peak:.2f} GB")
    if not args.no_rank:
        front = sum(r["seconds"] for name, r in rows if name in ("embed (import)", "rank"))
        first = next(iter(totals), None)
        if first is not None:
            print(f"# everything (import + rank + partition + schedule, {first}): {front + totals[first][0]:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": {"cpus": os.cpu_count()}, "generated": info,
            "params": {k: getattr(args, k) for k in ("n", "d", "p", "m", "K", "batch_size", "h", "seed", "edges",
                                                      "partitioner", "threads", "kaminpar_context", "no_rank")},
            "stages": [{"name": name, **res} for name, res in rows],
            "totals": {tag: {"seconds": round(secs, 2), "cpu_s": round(cpu, 2), "peak_rss_gb": peak}
                       for tag, (secs, peak, cpu) in totals.items()},
        }, indent=1))
        print(f"# wrote {args.json}")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()

"""tools/bench_quality.py's statistics: mean and spread over seeds, and bootstrap 95% intervals over queries
(scipy's ``stats.bootstrap``): stratified by task, paired for a difference of two arms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from quality_arms import SPLITS, arm_order
from quality_cells import per_query_file
from scipy import stats

from b3stream.evaluate import read_per_query


def _paired(a: list[str], b: list[str]) -> bool:
    """Two files list the same queries: the same texts, or the same texts with and without one instruction
    prompt (a prefix of every query of the task; b3-noinstr is scored on the unprompted texts)."""
    if len(a) != len(b):
        return False
    long, short = (a, b) if sum(map(len, a)) >= sum(map(len, b)) else (b, a)
    prefixes = {x[: len(x) - len(y)] if x.endswith(y) else None for x, y in zip(long, short)}
    return len(prefixes) <= 1 and None not in prefixes


def per_query_matrix(folders: list[Path], split: str, metric: str, task: str | None = None) -> np.ndarray:
    """(seeds, queries) of one metric; every file must list the same queries in the same order."""
    rows = [read_per_query(per_query_file(f, split, task)) for f in folders]
    queries = [r["query"] for r in rows[0]]
    for other in rows[1:]:
        if not _paired([r["query"] for r in other], queries):
            raise RuntimeError("per-query files disagree on the queries; they cannot be paired")
    return np.array([[r[metric] for r in rs] for rs in rows])


def strata(runs: list[dict], split: str, metric: str, task: str | None = None) -> list[np.ndarray]:
    """Per-query values averaged over ``runs``' seeds: one array per task of the split (one array for a
    single-task dataset, or when ``task`` picks one), the strata of :func:`stratified_bootstrap`."""
    per_task = runs[0]["metrics"][split].get("per_task")
    tasks = [task] if task is not None or per_task is None else sorted(per_task)
    return [per_query_matrix([Path(r["eval_dir"]) for r in runs], split, metric, t).mean(axis=0) for t in tasks]


def stratified_bootstrap(values: list[np.ndarray], reps: int, seed: int = 0) -> tuple[float, float, float]:
    """The mean over strata (tasks) of each stratum's mean, and its 95% percentile interval, resampling the
    queries of each stratum with replacement (Koehn 2004, "Statistical significance tests for machine
    translation evaluation"). Paired when the values are per-query differences of two systems (both scored on
    the same resampled queries). Tasks are fixed, not resampled: the average is over these tasks, as MMEB's is
    over its datasets. One stratum: the plain bootstrap over queries.

    scipy's bootstrap resamples each of several samples independently, which is the stratified bootstrap. The
    interval is its percentile one, not BCa: BCa's acceleration is a jackknife over every query of every
    stratum (one statistic per query left out, on 10^4-query splits), and it is undefined (NaN, with a warning)
    when the resampled means do not vary, as for two arms with equal per-query values; the percentile interval
    is also what the published figures (docs/quality.md) were computed with."""
    centre = float(np.mean([v.mean() for v in values]))
    # a stratum whose queries all have one value (or that has one query) adds the same mean to every
    # resample; scipy wants samples that can vary, so those strata enter the statistic as a constant
    varying = tuple(v for v in values if len(v) > 1 and np.ptp(v) > 0)
    if not varying:
        return centre, centre, centre
    fixed = sum(float(v.mean()) for v in values if not (len(v) > 1 and np.ptp(v) > 0))

    def mean_of_means(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return (fixed + sum(s.mean(axis=axis) for s in samples)) / len(values)

    ci = stats.bootstrap(varying, mean_of_means, n_resamples=reps, confidence_level=0.95, method="percentile",
                         vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return centre, float(ci.low), float(ci.high)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over queries and its 95% percentile interval (a, b: per-query values of two systems,
    resampled together: scipy's ``paired=True``)."""
    centre = float(np.mean(a) - np.mean(b))
    if np.ptp(a - b) == 0:  # the same difference on every query: no interval to draw
        return centre, centre, centre
    ci = stats.bootstrap((a, b), _difference_of_means, paired=True, n_resamples=reps, confidence_level=0.95,
                         method="percentile", vectorized=True, rng=np.random.default_rng(seed)).confidence_interval
    return centre, float(ci.low), float(ci.high)


def _difference_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def bootstrap_mean(a: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of the mean of ``a`` over queries."""
    return stratified_bootstrap([a], reps, seed)[1:]


def summarise(cells: dict, args) -> list[dict]:
    """One row per (arm, |B|, split, metric): mean over seeds, seed spread, and vs the baseline arm the paired
    difference with its bootstrap interval (per-query values averaged over seeds first). On the mixture the
    metric is the mean over tasks, and each task has its own nDCG@10 rows (``task``)."""
    rows = []
    for (arm, batch), runs in sorted(cells.items(), key=lambda kv: (kv[0][1], arm_order(kv[0][0]))):
        base = cells.get((args.baseline, batch))
        for split in SPLITS:
            tasks = [None] + sorted(runs[0]["metrics"][split].get("per_task") or [])
            for metric in ("ndcg@10", "mrr@10", "recall@1"):
                for task in tasks if metric == "ndcg@10" else [None]:
                    per_seed = [(r["metrics"][split] if task is None else r["metrics"][split]["per_task"][task])
                                [metric] for r in runs]
                    spread = float(np.std(per_seed, ddof=1)) if len(runs) > 1 else 0.0
                    row = {"arm": arm, "batch_size": batch, "split": split, "metric": metric, "task": task,
                           "seeds": len(runs), "mean": float(np.mean(per_seed)), "std": spread, "per_seed": per_seed,
                           "ci": list(stratified_bootstrap(strata(runs, split, metric, task), args.bootstrap)[1:]),
                           "documents_per_step": float(np.mean([r["encoded"]["documents_per_step"] for r in runs
                                                                if r.get("encoded")] or [np.nan])),
                           "train_seconds": float(np.mean([r["train"]["train_seconds"] for r in runs
                                                           if "train" in r] or [np.nan]))}
                    if base and arm != args.baseline:
                        diff = paired_difference(runs, base, split, metric, args.bootstrap, task)
                        if diff is not None:
                            row["vs_baseline"] = diff
                    rows.append(row)
    return rows


def paired_difference(runs_a: list[dict], runs_b: list[dict], split: str, metric: str, reps: int,
                      task: str | None = None) -> dict | None:
    """A - B over queries (over tasks' queries, then averaged over tasks) with its paired bootstrap interval,
    both sides on the seeds both have (each query's metric averaged over those seeds); None when they share no
    seed."""
    seeds = sorted({r["seed"] for r in runs_a} & {r["seed"] for r in runs_b})
    if not seeds:
        return None
    a, b = (strata([r for r in runs if r["seed"] in seeds], split, metric, task) for runs in (runs_a, runs_b))
    d, lo, hi = stratified_bootstrap([x - y for x, y in zip(a, b)], reps)
    return {"diff": d, "ci": [lo, hi], "seeds": seeds}


def compare(cells: dict, args) -> list[dict]:
    """``--compare A:B``: A - B on nDCG@10 per split, paired over queries on the seeds both arms have."""
    out = []
    for spec in args.compare:
        a, _, b = spec.partition(":")
        for batch in sorted({k[1] for k in cells}):
            diffs = {split: paired_difference(cells.get((a, batch), []), cells.get((b, batch), []), split,
                                              "ndcg@10", args.bootstrap) for split in SPLITS}
            if diffs["test"] is None:
                continue
            row = {"a": a, "b": b, "batch_size": batch, "seeds": diffs["test"]["seeds"],
                   **{split: {"diff": d["diff"], "ci": d["ci"]} for split, d in diffs.items()}}
            out.append(row)
            print(f"{a} - {b} |B|={batch} seeds {row['seeds']}: test nDCG@10 {100 * row['test']['diff']:+.2f} "
                  f"[{100 * row['test']['ci'][0]:+.2f}, {100 * row['test']['ci'][1]:+.2f}], validation "
                  f"{100 * row['validation']['diff']:+.2f} [{100 * row['validation']['ci'][0]:+.2f}, "
                  f"{100 * row['validation']['ci'][1]:+.2f}]", flush=True)
    return out

"""tools/bench_quality.py's report: the plot, the markdown tables and what the refreshed arms' miners did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from quality_arms import arm_order


def plot(rows: list[dict], path: Path, title: str, baseline: str = "random") -> None:
    """Left: test nDCG@10 against |B| per arm, bands = bootstrap 95% interval of the mean over queries.
    Right: the same minus the baseline, bands = the paired bootstrap interval (the comparison that matters: the
    queries' own spread cancels). An arm run at one |B| only is a point with an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    arms = sorted({r["arm"] for r in rows}, key=arm_order)
    sizes = sorted({r["batch_size"] for r in rows})
    for i, arm in enumerate(arms):
        mine = sorted((r for r in rows if r["arm"] == arm and r["split"] == "test" and r["metric"] == "ndcg@10"
                       and r.get("task") is None),
                      key=lambda r: r["batch_size"])
        if not mine:
            continue
        x = np.array([r["batch_size"] for r in mine], dtype=float) * (1 + 0.012 * (i - len(arms) / 2))  # no overlap
        for ax, y, lo, hi in (
                (axes[0], [r["mean"] for r in mine], [r["ci"][0] for r in mine], [r["ci"][1] for r in mine]),
                (axes[1], *([r["vs_baseline"]["diff"] if "vs_baseline" in r else 0.0 for r in mine],
                            [r["vs_baseline"]["ci"][0] if "vs_baseline" in r else 0.0 for r in mine],
                            [r["vs_baseline"]["ci"][1] if "vs_baseline" in r else 0.0 for r in mine]))):
            y, lo, hi = 100 * np.array(y), 100 * np.array(lo), 100 * np.array(hi)
            if len(x) > 1:
                line, = ax.plot(x, y, marker="o", label=arm)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12 if ax is axes[0] else 0.2)
            else:
                ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", capsize=3, label=arm, linestyle="none")
    axes[1].axhline(0, color="black", linewidth=0.8)
    for ax, label in ((axes[0], "test nDCG@10 (corpus: every split)"), (axes[1], f"test nDCG@10 minus {baseline} (points)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size |B|")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("mean over seeds, band: bootstrap 95% over queries", fontsize=9)
    axes[1].set_title("paired difference, band: paired bootstrap 95% over queries", fontsize=9)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def refresh_summary(cell: dict) -> dict | None:
    """What the background miner did in one refreshed cell: versions published and swapped to, the staleness
    at each swap (steps between the snapshot and the swap), the miner's median seconds per stage, and how
    often a refresh made the upcoming batches harder for the snapshot's student (a lower Theorem-1 bound than
    the schedule it replaced, scored on the same embeddings and ids); for b3-bound, the probe decisions."""
    train = cell.get("train") or {}
    versions = train.get("refreshes")
    if versions is None:
        return None
    source = {int(v["version"].lstrip("v")): v.get("source_step") for v in versions}
    swaps = (train.get("summary") or {}).get("swaps") or []
    stale = [s["step"] - source[s["to"]] for s in swaps if source.get(s["to"]) is not None]
    mined = [v for v in versions if v.get("source_step") is not None]
    stages = sorted({k for v in mined for k in (v.get("timings") or {})})
    seconds = {k: float(np.median([v["timings"][k] for v in mined if isinstance((v.get("timings") or {}).get(k),
                                                                                   (int, float))]))
               for k in stages if any(isinstance((v.get("timings") or {}).get(k), (int, float)) for v in mined)}
    harder = [v["quality"]["theorem1_bound"] < v["quality_previous"]["theorem1_bound"]
              for v in mined if (v.get("quality") or {}).get("theorem1_bound") is not None
              and (v.get("quality_previous") or {}).get("theorem1_bound") is not None]
    out = {"published": len(mined), "swaps": len(swaps), "staleness": stale,
           "staleness_mean": float(np.mean(stale)) if stale else None, "miner_seconds": seconds,
           "harder": int(sum(harder)), "scored": len(harder)}
    probes = train.get("probes")
    if probes is not None:
        out.update(probes=len(probes), probe_refreshes=sum(bool(p.get("refresh")) for p in probes),
                   drifts=[p.get("drift") for p in probes])
    return out


def refresh_table(runs: list[dict]) -> str:
    """One line per refreshed cell: refreshes, swaps, staleness, miner time per stage, harder upcoming batches."""
    out = ["| arm | seed | snapshots probed / refreshed | published | swaps | staleness at swap (mean; each) | "
           "miner s per refresh (median, by stage) | upcoming batches harder |", "|---|---|---|---|---|---|---|---|"]
    for cell in runs:
        r = refresh_summary(cell)
        if r is None:
            continue
        probed = f"{r['probes']} / {r['probe_refreshes']}" if "probes" in r else "-"
        stale = (f"{r['staleness_mean']:.0f}; {', '.join(map(str, r['staleness']))}"
                 if r["staleness_mean"] is not None else "-")
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["miner_seconds"].items())
        out.append(f"| {cell['arm']} | {cell['seed']} | {probed} | {r['published']} | {r['swaps']} | {stale} | "
                   f"{stages} | {r['harder']} of {r['scored']} |")
    return "\n".join(out)


def markdown_table(rows: list[dict], zero: dict, baseline: str = "random") -> str:
    """nDCG@10 / MRR@10 / Recall@1 on test (mean ± seed std) and nDCG@10 vs the baseline with its interval
    (on the mixture: means over tasks)."""
    out = ["| arm | \\|B\\| | seeds | test nDCG@10 (± seed sd) | test MRR@10 | test R@1 | "
           f"Δ nDCG@10 vs {baseline} [paired 95% CI] | val nDCG@10 | Δ val | documents embedded per step | train s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    z = zero["test"]
    out.append(f"| zero-shot | - | - | {100 * z['ndcg@10']:.2f} | {100 * z['mrr@10']:.2f} | {100 * z['recall@1']:.2f} | "
               f"| {100 * zero['validation']['ndcg@10']:.2f} | | | |")
    index = {(r["arm"], r["batch_size"], r["split"], r["metric"]): r for r in rows if r.get("task") is None}
    for (arm, batch, split, metric), r in index.items():
        if split != "test" or metric != "ndcg@10":
            continue
        mrr, r1 = index[(arm, batch, "test", "mrr@10")], index[(arm, batch, "test", "recall@1")]
        val = index[(arm, batch, "validation", "ndcg@10")]
        delta, val_delta = _delta(r), _delta(val)
        sd = f" ± {100 * r['std']:.2f}" if r["seeds"] > 1 else ""
        out.append(f"| {arm} | {batch} | {r['seeds']} | {100 * r['mean']:.2f}{sd} | {100 * mrr['mean']:.2f} | "
                   f"{100 * r1['mean']:.2f} | {delta} | {100 * val['mean']:.2f} | {val_delta} | {r['documents_per_step']:.1f} | "
                   f"{r['train_seconds']:.0f} |")
    return "\n".join(out)


def _delta(row: dict) -> str:
    vs = row.get("vs_baseline")
    return f"{100 * vs['diff']:+.2f} [{100 * vs['ci'][0]:+.2f}, {100 * vs['ci'][1]:+.2f}]" if vs else ""


def task_table(rows: list[dict], split: str = "test") -> str:
    """The mixture per task: each arm's nDCG@10 on ``split`` (mean over seeds) and its difference to the
    baseline, starred where the paired 95% interval excludes zero; one column per task."""
    mine = [r for r in rows if r["split"] == split and r["metric"] == "ndcg@10" and r.get("task") is not None]
    tasks = sorted({r["task"] for r in mine})
    if not tasks:
        return ""
    out = [f"| arm ({split} nDCG@10, Δ vs baseline) | \\|B\\| | " + " | ".join(tasks) + " |",
           "|---|---|" + "---|" * len(tasks)]
    for arm, batch in dict.fromkeys((r["arm"], r["batch_size"]) for r in mine):
        cells = []
        for task in tasks:
            r = next((x for x in mine if (x["arm"], x["batch_size"], x["task"]) == (arm, batch, task)), None)
            vs = (r or {}).get("vs_baseline")
            star = "*" if vs and (vs["ci"][0] > 0 or vs["ci"][1] < 0) else ""
            cells.append("" if r is None else f"{100 * r['mean']:.1f}" + (f" ({100 * vs['diff']:+.1f}{star})" if vs
                                                                          else ""))
        out.append(f"| {arm} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(out)

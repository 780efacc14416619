"""Quality benchmark of batch strategies: does B3 batch mining beat random batches on held-out retrieval?

B3 ("Breaking the Batch Barrier of Contrastive Learning via Smart Batch Mining", 2025) reports, in its
Fig. 2, large gains over random batches at small batch sizes. This script measures the same question on
the code-search pairs with the project's own pipeline, so every number comes from the code users run:

    prepare (jsonl of a seeded sample of code-search pairs) -> mine one schedule per strategy, |B| and seed
    -> `b3stream train` (one process, one epoch) -> exact retrieval of the held-out validation and test
    queries against the positives of every split (`--corpus all`), with per-query ranks.

Arms: the strategies ``random``, ``random_hn`` (random batches with h hard negatives per example from S, the B3
paper's Table 2 baseline), ``task``, ``gcbs``, ``b3``, ``b3pp`` and ``b3-refreshed`` (b3 with
``mode: refreshed``: a background miner re-mines from student snapshots while training runs), and two cost
baselines: ``random`` itself (same steps) and ``random+compute`` (random given the teacher pass's measured
time as extra steps). A schedule is one epoch of batches, and a static run repeats its batches (in a new
order) every epoch; for recipes of several epochs ``random-redrawn`` draws new random batches at every
epoch start (refreshed mode's miner with the random strategy and a new seed; the trainer waits for it).
Each cell is trained with several seeds (the schedule seed and the training seed both); for every strategy
minus random the script reports the mean, the spread over seeds and a paired bootstrap
95% interval over queries (each query's metric averaged over seeds, queries resampled).

Hyper-parameters (lr, temperature, p, m, K, h) are chosen with ``--tune`` on the validation split only, one
knob at a time around a starting point; the grid and the choice are written to the JSON. Test metrics are
never used for a choice.

Outputs: ``--json`` (every run: config, schedule meta, metrics, timings; the tuning grid; the summary
table) and ``--plot`` (nDCG@10 against |B|, one line per arm, bootstrap bands). Every cell is cached
under ``--work`` (schedule, run folder, metrics), so an interrupted run resumes where it stopped.

    python tools/bench_quality.py --quick                     # a few minutes: CI-sized check of the machinery
    python tools/bench_quality.py                             # the full grid (hours on 2 CPU cores; see docs)
    python tools/bench_quality.py --device cuda               # the same on a GPU machine
    python tools/bench_quality.py --batch-sizes 32 --arms random,b3,b3pp --seeds 0,1,2   # a reduced grid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(TOOLS))  # the sibling modules, also when this file is loaded by path (the tests)

from b3stream.mining.graph import EDGES  # noqa: E402
from quality_arms import (  # noqa: E402, F401 - re-exported: tools and tests use them from here
    ARMS, DATASETS, DEFAULT_ARMS, EPOCH_ARMS, MINED, REFRESHED_ARMS, SPLITS, STRATEGY_OF, Recipe, arm_order, base_arm,
    variant)
from quality_cells import (  # noqa: E402, F401
    batch_stats, compute_matched, encoded_per_epoch, evaluate, is_cached, mine, per_query_file, run_cell,
    teacher_seconds, train, tune)
from quality_data import dataset, mixture_dataset  # noqa: E402
from quality_report import markdown_table, plot, refresh_summary, refresh_table, task_table  # noqa: E402
from quality_stats import (  # noqa: E402, F401
    _paired, bootstrap_mean, compare, paired_bootstrap, paired_difference, per_query_matrix, strata,
    stratified_bootstrap, summarise)


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(REPO / "runs" / "bench-quality"), help="cache folder (resumable)")
    ap.add_argument("--json", default=None, help="results JSON (default: WORK/quality.json)")
    ap.add_argument("--plot", default=None, help="PNG plot (default: WORK/quality.png)")
    ap.add_argument("--quick", action="store_true", help="tiny data, |B| 16, 2 seeds, random and b3: a machinery check")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--dataset", default="code", choices=DATASETS,
                    help="code: docstring -> code pairs of the installed packages; mixture: the multi-task text "
                         "mixture of tools/mixture.py (retrieval, definitions, label classification), each task "
                         "with its instruction prompts, mined per task, scored per task and averaged over tasks")
    ap.add_argument("--mixture-root", default=None,
                    help="mixture: the unpacked Debian packages (python tools/mixture.py fetch ROOT); default "
                         "WORK/debian, fetched there when missing")
    ap.add_argument("--per-task", type=int, default=500, help="mixture: pairs sampled per task")
    ap.add_argument("--baseline", default=None,
                    help="the arm every other is compared with (default: random for code, task for the mixture, "
                         "whose training batches are one task at a time as MMEB's are)")
    ap.add_argument("--task-p", default=None, metavar="TASK=P,...",
                    help="arm b3-taskp: per-task p (MineConfig task_params), e.g. wordnet-category=20,fortunes=20")
    ap.add_argument("--pairs", type=int, default=3000, help="code-search pairs sampled for the dataset")
    ap.add_argument("--pairs-file", default=None,
                    help="JSONL of pairs (query, positive, task, group) to sample from instead of scanning the "
                         "installed packages: another machine's packages give other pairs, so a GPU box gets "
                         "this machine's sample (a file of exactly --pairs rows is used whole, in order)")
    ap.add_argument("--held-out", type=float, default=0.15, help="share of pairs in each of validation, test")
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    ap.add_argument("--grid", action="append", default=None, metavar="ARMS:BATCHES:SEEDS",
                    help="a block of cells, e.g. random,b3,b3pp:32:0,1,2 (repeatable; replaces --arms, "
                         "--batch-sizes and --seeds)")
    ap.add_argument("--teacher", action="append", default=[], metavar="NAME=PATH",
                    help="another teacher (a sentence-transformers / HF folder) for arms written ARM@NAME")
    ap.add_argument("--tune", action="store_true", help="tune lr, temperature, p, m, K, h on validation first")
    ap.add_argument("--full-finetune", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the cells of the grid already in --work, skip the others")
    for name, tp in (("lr", float), ("temperature", float), ("p", int), ("m", int), ("K", int), ("h", int),
                     ("query-length", int), ("positive-length", int), ("refresh-every", int), ("refresh-lag", int),
                     ("bound-drift", float), ("epochs", int)):
        ap.add_argument(f"--{name}", type=tp, default=None, help="recipe override")
    ap.add_argument("--conditions", default=None,
                    help="the machine the cells were trained on, for the JSON (default: this machine); for a "
                         "--report-only of cells trained elsewhere")
    ap.add_argument("--compare", action="append", default=[], metavar="ARM_A:ARM_B",
                    help="also report ARM_A - ARM_B (paired over queries, on the seeds both have) at every |B| "
                         "where both ran, e.g. b3-refreshed:b3 or b3:random-redrawn (repeatable)")
    ap.add_argument("--mine-per-task", action="store_true",
                    help="rank and batch each task (here: package) apart, MineConfig per_task: true, as rounds 1 "
                         "and 2 did; the default mines all packages together")
    ap.add_argument("--symmetric", action="store_true",
                    help="train with the symmetric InfoNCE (also positive -> query, in-batch queries as negatives)")
    ap.add_argument("--edges", default="mutual", choices=EDGES,
                    help="the B3 graph's edges (MineConfig edges): mutual ranks only, or either direction")
    ap.add_argument("--rank-weights", action="store_true", help="weight the B3 graph's edges by rank for METIS")
    ap.add_argument("--partitioner", default="metis", choices=("metis", "kaminpar"),
                    help="the B3 graph's partitioner (MineConfig partitioner)")
    args = ap.parse_args(argv)
    args.baseline = args.baseline or ("task" if args.dataset == "mixture" else "random")
    if args.baseline not in ARMS:
        ap.error(f"--baseline {args.baseline!r}: not an arm ({', '.join(ARMS)})")
    if args.task_p:
        try:
            Recipe(task_p=args.task_p).task_params
        except ValueError:
            ap.error(f"--task-p {args.task_p!r}: expected TASK=P,... with integer p")
    if args.quick:
        args.pairs, args.batch_sizes, args.seeds = min(args.pairs, 500), "16", "0,1"
        if args.arms == ",".join(DEFAULT_ARMS):
            args.arms = "random,b3"
    args.teachers = {}
    for item in args.teacher:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_dir():
            ap.error(f"--teacher {item!r}: expected NAME=PATH to a model folder")
        args.teachers[name] = path
    blocks = args.grid or [f"{args.arms}:{args.batch_sizes}:{args.seeds}"]
    args.blocks = []
    for block in blocks:
        try:
            arms, batches, seeds = block.split(":")
            block_ = ([a for a in arms.split(",") if a], [int(b) for b in batches.split(",")],
                      [int(x) for x in seeds.split(",")])
        except ValueError:
            ap.error(f"--grid {block!r}: expected ARMS:BATCHES:SEEDS, e.g. random,b3:32:0,1,2")
        for arm in block_[0]:
            base, _, teacher = arm.partition("@")
            if base not in ARMS or (teacher and teacher not in args.teachers):
                ap.error(f"unknown arm {arm!r}; known: {', '.join(ARMS)}, optionally @NAME of a --teacher")
            if teacher and STRATEGY_OF[base] not in MINED:
                ap.error(f"arm {arm!r}: only mined strategies ({', '.join(MINED)}) use a teacher")
        for arm in [a for a in block_[0] if a in EPOCH_ARMS]:
            if (args.epochs or 1) < 2:
                ap.error(f"arm {arm} re-mines at every epoch start: it needs --epochs 2 or more")
        if "b3-taskp" in block_[0] and not args.task_p:
            ap.error("arm b3-taskp needs --task-p TASK=P,... (the per-task p it mines with)")
        if args.baseline not in block_[0]:  # (--compare may name others besides)
            ap.error(f"--grid {block!r}: every block must include {args.baseline} (the baseline the other arms are "
                     "compared with)")
        args.blocks.append(block_)
    listed = {arm for arms, _, _ in args.blocks for arm in arms}
    for spec in args.compare:
        a, _, b = spec.partition(":")
        if not a or not b or a not in listed or b not in listed:
            ap.error(f"--compare {spec!r}: expected ARM_A:ARM_B, two arms of the grid ({', '.join(sorted(listed))})")
    work = Path(args.work)
    args.json = Path(args.json or work / "quality.json")
    args.plot = Path(args.plot or work / "quality.png")
    return args


def _recipe(args) -> Recipe:
    r = Recipe(lora=not args.full_finetune)
    if args.quick:
        r.query_length, r.positive_length = 16, 32
    for name in ("lr", "temperature", "p", "m", "K", "h", "query_length", "positive_length", "refresh_every",
                 "refresh_lag", "bound_drift", "epochs"):
        if getattr(args, name) is not None:
            setattr(r, name, getattr(args, name))
    r.symmetric, r.edges, r.rank_weights = args.symmetric, args.edges, args.rank_weights
    r.partitioner, r.task_p = args.partitioner, args.task_p
    # the mixture's tasks are tasks: mined apart (the paper mines each dataset apart); the code-search "tasks"
    # are packages of one task, mined together unless asked
    r.per_task = args.mine_per_task or args.dataset == "mixture"
    return r


def check_optional_imports() -> None:
    """Import now what only the end of the run needs: the plot's matplotlib (the ``bench`` extra). A missing
    extra otherwise surfaced as a ModuleNotFoundError after every cell had trained (19 minutes in, once)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"tools/bench_quality.py: the plot needs matplotlib, which cannot be imported ({e}); "
                         "install the bench extra: pip install -e '.[bench]' (or bash tools/install.sh --bench)"
                         ) from None


def main(argv=None) -> int:
    args = _parse_args(argv)
    check_optional_imports()  # before any cell runs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if args.dataset == "mixture":
        data, args.data_noinstr = mixture_dataset(args, work)
    else:
        data = args.data_noinstr = dataset(args, work)
    recipe = _recipe(args)
    manifest = json.loads((data / "manifest.json").read_text())
    print(f"data {data}: " + ", ".join(f"{k} {v['n']}" for k, v in manifest["splits"].items()), flush=True)

    zero = evaluate(args, data, None, work / "eval" / f"zero-shot-L{recipe.query_length}x{recipe.positive_length}",
                    recipe)
    print(f"zero-shot: val nDCG@10 {zero['validation']['ndcg@10']:.4f} test {zero['test']['ndcg@10']:.4f} "
          f"({zero['test']['corpus']} documents)", flush=True)
    if args.data_noinstr != data and any(base_arm(a) == "b3-noinstr" for arms, _, _ in args.blocks for a in arms):
        zero_noinstr = evaluate(args, args.data_noinstr, None, work / "eval" / f"zero-shot-noinstr-L"
                                f"{recipe.query_length}x{recipe.positive_length}", recipe)
        print(f"zero-shot without instructions: val nDCG@10 {zero_noinstr['validation']['ndcg@10']:.4f} test "
              f"{zero_noinstr['test']['ndcg@10']:.4f}", flush=True)
    # How good is each teacher on this data (the same exact search, zero-shot)?
    teacher_zero = {name: evaluate(args, data, path, work / "eval" / f"teacher-{name}-L{recipe.query_length}x"
                                   f"{recipe.positive_length}", recipe) for name, path in args.teachers.items()}
    for name, m in teacher_zero.items():
        print(f"teacher {name} zero-shot: val nDCG@10 {m['validation']['ndcg@10']:.4f} test {m['test']['ndcg@10']:.4f}",
              flush=True)

    trials = []
    if args.tune:
        recipe, trials = tune(args, data, work, recipe)
    print(f"recipe: {recipe.key()}", flush=True)

    runs, cells = [], {}
    for arms, batches, seeds in args.blocks:
        for batch in batches:
            for seed in seeds:
                for arm in [a for a in arms if a != "random+compute"]:
                    if any(c["seed"] == seed for c in cells.get((arm, batch), [])):
                        continue  # listed by an earlier block
                    if args.report_only and not is_cached(args, work, recipe, arm, batch, seed):
                        continue
                    cell = run_cell(args, data, work, recipe, arm, batch, seed)
                    runs.append(cell)
                    cells.setdefault((arm, batch), []).append(cell)
                if "random+compute" in arms and not any(c["seed"] == seed
                                                        for c in cells.get(("random+compute", batch), [])) \
                        and not (args.report_only and not is_cached(args, work, recipe, "random+compute", batch, seed)):
                    cell = compute_matched(args, data, work, recipe, cells, batch, seed)
                    runs.append(cell)
                    cells.setdefault(("random+compute", batch), []).append(cell)

    rows = summarise(cells, args)
    comparisons = compare(cells, args)
    conditions = args.conditions or (f"{platform.node()}: {os.cpu_count()} CPUs, device {args.device}, threads "
                                     f"{args.threads}; CPU timings are upper bounds when other jobs share the cores")
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "conditions": conditions, "dataset": {k: v["n"] for k, v in manifest["splits"].items()},
              "baseline": args.baseline, "tasks": manifest.get("tasks"),
              "recipe": dataclasses.asdict(recipe), "tuning": trials, "zero_shot": zero,
              "teacher_zero_shot": teacher_zero, "teacher_seconds": teacher_seconds(work, recipe),
              "runs": runs, "table": rows, "comparisons": comparisons, "seconds": time.perf_counter() - t_start,
              "refreshes": {f"{c['arm']}-B{c['batch_size']}-s{c['seed']}": refresh_summary(c) for c in runs
                            if refresh_summary(c) is not None}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str))
    what = ("code-search" if args.dataset == "code" else
            f"mixture of {len(manifest['tasks'])} tasks (mean over tasks, each against its own documents)")
    title = (f"{what}, {manifest['splits']['test']['n']} test queries vs {zero['test']['corpus']} documents, "
             f"seeds {sorted({c['seed'] for c in runs})} (fewer where the table says so)\n{recipe.key()}")
    plot(rows, args.plot, title, args.baseline)
    print(markdown_table(rows, zero, args.baseline), flush=True)
    for split in SPLITS if args.dataset == "mixture" else ():
        print(task_table(rows, split), flush=True)
    if any(refresh_summary(c) for c in runs):
        print(refresh_table(runs), flush=True)
    print(f"wrote {args.json} and {args.plot} in {result['seconds'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

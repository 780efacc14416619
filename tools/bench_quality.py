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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from b3stream.evaluate import METRICS, RetrievalSet, read_per_query  # noqa: E402
from b3stream.mining.graph import EDGES  # noqa: E402

STRATEGY_OF = {"random": "random", "random_hn": "random_hn", "task": "task", "task_hn": "task_hn", "gcbs": "gcbs",
               "b3": "b3", "b3pp": "b3pp", "b3-refreshed": "b3", "b3-bound": "b3", "b3-epoch": "b3",
               "b3-noinstr": "b3", "b3-taskp": "b3", "random+compute": "random", "random-redrawn": "random",
               "task-redrawn": "task"}
ARMS = tuple(STRATEGY_OF)  # an arm may name another teacher: "b3@mpnet" (--teacher mpnet=PATH)
# trained in refreshed mode, with a miner beside them; b3-bound: a snapshot every refresh_every steps, re-mined
# only when the schedule in use has drifted (refresh.when: bound); b3-epoch: re-mined from the student at every
# epoch start; random-redrawn / task-redrawn: new batches of their strategy at every epoch start
REFRESHED_ARMS = ("b3-refreshed", "b3-bound", "b3-epoch", "random-redrawn", "task-redrawn")
EPOCH_ARMS = ("b3-epoch", "random-redrawn", "task-redrawn")  # they differ from their static arm only over epochs
# b3-noinstr: b3 trained (and scored) without the instruction prompts (the B3 paper's Table 2 ablation);
# b3-taskp: b3 with per-task p (--task-p, MineConfig task_params; the paper skips 30 ranks for retrieval, 70 for
# VQA)
DEFAULT_ARMS = ("random", "random_hn", "task", "gcbs", "b3", "b3pp", "b3-refreshed", "random+compute")
MINED = ("random_hn", "task_hn", "gcbs", "b3", "b3pp")  # strategies that read the teacher's ranking
SPLITS = ("validation", "test")
DATASETS = ("code", "mixture")  # code-search pairs; the multi-task mixture of tools/mixture.py


def base_arm(arm: str) -> str:
    return arm.split("@")[0]


def arm_order(arm: str) -> tuple:
    return ARMS.index(base_arm(arm)), arm


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Recipe:
    """What every arm shares (student, lengths, optimisation) and the mining knobs b3 / b3pp / gcbs use."""

    lr: float = 2e-4
    temperature: float = 0.05
    lora: bool = True  # False: full fine-tuning
    lora_r: int = 8
    query_length: int = 24
    positive_length: int = 48
    p: int = 3
    m: int = 30
    K: int = 8
    h: int = 2
    teacher: str | None = None  # None: the bundled MiniLM (the student's own starting point)
    refresh_every: int = 20  # b3-refreshed: snapshot the student every N steps
    # b3-refreshed: refresh.max_lag_steps (None: asynchronous; 0: the trainer waits for each snapshot's schedule,
    # needed where training outruns the miner, e.g. a GPU, on which an epoch can end before any refresh lands)
    refresh_lag: int | None = None
    bound_drift: float = 0.1  # b3-bound: refresh.bound_drift, the drift of the probe's bound that triggers a refresh
    epochs: int = 1
    # also the positive -> query InfoNCE term (TrainConfig symmetric): in a community batch the in-batch queries
    # are as mutually related as the positives, so that direction has hard negatives too
    symmetric: bool = False
    # the B3 graph (MineConfig edges, rank_weights): "mutual" keeps {i, j} only when each is in the other's ranks
    # [p, p+m); "union" when either is
    edges: str = "mutual"
    rank_weights: bool = False
    partitioner: str = "metis"  # MineConfig partitioner: metis (the paper's) | kaminpar
    # rank and partition all tasks together (MineConfig per_task: false): the code-search "tasks" are packages
    # of one docstring -> code task; mined apart, a package's ids could only be each other's negatives
    # (docs/quality.md, round 3: b3 +2.2 nDCG@10 over random mined together, +1.3 mined per package)
    per_task: bool = False
    # b3-taskp: per-task p as "task=p,task=p" (MineConfig task_params), e.g. the label tasks' p above the rest
    task_p: str | None = None

    @property
    def task_params(self) -> dict | None:
        if not self.task_p:
            return None
        return {task: {"p": int(p)} for task, _, p in (item.partition("=") for item in self.task_p.split(","))}

    @property
    def graph(self) -> str:
        """Name suffix of a non-default B3 graph (cache cells of b3 / b3pp and their mining folders)."""
        return (("" if self.edges == "mutual" else f"-{self.edges}") + ("-rw" if self.rank_weights else "")
                + ("" if self.partitioner == "metis" else f"-{self.partitioner}"))

    @property
    def scope(self) -> str:
        """Name suffix of what packages-together mining produces (cache cells and mining folders)."""
        return "" if self.per_task else "-global"

    def key(self, arm: str | None = None) -> str:
        """Cache key of a cell: the training knobs, plus the mining knobs only for the arms that use them
        (so random batches are trained once, whatever p, m, K, h or teacher the mined arms try)."""
        out = (f"lr{self.lr:g}-t{self.temperature:g}-{'lora' if self.lora else 'full'}{self.lora_r}-"
               f"L{self.query_length}x{self.positive_length}" + (f"-ep{self.epochs}" if self.epochs != 1 else "") +
               ("-sym" if self.symmetric else ""))
        strategy = STRATEGY_OF[base_arm(arm)] if arm else "b3pp"
        if strategy in MINED:
            t = "minilm" if self.teacher is None else Path(self.teacher).name
            out += f"-p{self.p}-m{self.m}" + (f"-K{self.K}{self.graph}" if strategy in ("b3", "b3pp") else "") + \
                (f"-h{self.h}" if strategy in ("b3pp", "random_hn") else "") + f"-{t}{self.scope}"
        out += variant(self, arm)
        if arm and base_arm(arm) in ("b3-refreshed", "b3-bound"):
            # "-apart": the miner ranks and partitions the ids trained before a snapshot apart (whole communities
            # from full neighbour lists after a swap); the cells of rounds 3-5, mined before that, keep their old
            # keys ("-whole": partitioned apart only; no suffix: neither)
            out += f"-every{self.refresh_every}-apart" + (f"-bound{self.bound_drift:g}" if base_arm(arm) == "b3-bound"
                                                          else "")
            if self.refresh_lag is not None:
                out += f"-lag{self.refresh_lag}"
        return out


def variant(recipe: Recipe, arm: str | None) -> str:
    """Name suffix of an arm whose mining inputs differ from its strategy's: per-task p, or no prompts."""
    arm = base_arm(arm or "")
    if arm == "b3-taskp":
        return "-tp" + (recipe.task_p or "").replace("=", "").replace(",", "-")
    return "-noinstr" if arm == "b3-noinstr" else ""


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


def _env(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _cli(args, *argv: str, log: Path) -> float:
    """Run `b3stream ARGV` (the real command) with the benchmark's environment; returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "b3stream", *argv], cwd=REPO, env=_env(args), stdout=f,
                             stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"b3stream {' '.join(argv[:3])} ... failed ({res.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# 1. Data: a seeded sample of the code-search pairs, prepared through `b3stream prepare jsonl`
# --------------------------------------------------------------------------------------------------


def mixture_dataset(args, work: Path) -> tuple[Path, Path]:
    """The multi-task mixture (tools/mixture.py, --per-task pairs of each task) prepared twice: with each task's
    instruction prompts, and without any (for b3-noinstr). Split by group, so held-out queries share no word,
    headword, page or package with training."""
    sys.path.insert(0, str(REPO / "tools"))
    import mixture

    root = Path(args.mixture_root or work / "debian")
    if not mixture.package_versions(root):
        print(f"mixture: unpacking the Debian packages into {root}", flush=True)
        mixture.fetch(root)
    pairs = work / f"mixture-{args.per_task}"
    if not (pairs / "sources.json").is_file():
        mixture.build(root, pairs, per_task=args.per_task)
    out = {}
    for name, prompts in (("", ["--prompts", str(pairs / "prompts.yaml")]), ("-noinstr", [])):
        folder = work / f"data-mixture-{args.per_task}-{args.held_out:g}{name}"
        if not (folder / "manifest.json").is_file():
            _cli(args, "prepare", "jsonl", str(pairs / "pairs.jsonl"), "--out", str(folder), "--query-field",
                 "query", "--positive-field", "positive", "--task-field", "task", "--group-field", "group",
                 "--test-fraction", str(args.held_out), "--validation-fraction", str(args.held_out), "--quiet",
                 *prompts, log=work / f"prepare{name}.log")
        out[name] = folder
    return out[""], out["-noinstr"]


def dataset(args, work: Path) -> Path:
    """A random sample (not the first N, which would be a handful of packages) of the installed packages'
    docstring -> code pairs, split by package so held-out queries come from unseen packages."""
    out = work / f"data-{args.pairs}-{args.held_out:g}"
    if (out / "manifest.json").is_file():
        return out
    if args.pairs_file:
        with open(args.pairs_file, encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f if line.strip()]
    else:
        from b3stream.data.codesearch import iter_codesearch_pairs

        pairs = list(iter_codesearch_pairs(progress=False))
    keep = np.sort(np.random.default_rng(0).choice(len(pairs), min(args.pairs, len(pairs)), replace=False))
    src = work / f"pairs-{args.pairs}.jsonl"
    src.write_text("".join(json.dumps({k: pairs[i][k] for k in ("query", "positive", "task", "group")}) + "\n"
                           for i in keep))
    _cli(args, "prepare", "jsonl", str(src), "--out", str(out), "--query-field", "query", "--positive-field",
         "positive", "--task-field", "task", "--group-field", "group", "--test-fraction", str(args.held_out),
         "--validation-fraction", str(args.held_out), "--quiet", log=work / "prepare.log")
    return out


# --------------------------------------------------------------------------------------------------
# 2. Mining: one schedule per (strategy, |B|, seed, recipe); the teacher pass is shared and timed
# --------------------------------------------------------------------------------------------------


def mine(args, data: Path, work: Path, recipe: Recipe, arm: str, batch: int, seed: int) -> tuple[Path, dict]:
    """The schedule for one cell (cached) and its timings. The mining folder is per (teacher, p, m, K), and
    its embeddings are copied from the teacher's first folder, so the teacher runs once per dataset (once
    more for the unprompted texts of b3-noinstr)."""
    from b3stream.config import MineConfig, apply_overrides
    from b3stream.mining.pipeline import run_all
    from b3stream.schedule import load_schedule

    strategy, extra = STRATEGY_OF[base_arm(arm)], variant(recipe, arm)
    teacher = ("minilm" if recipe.teacher is None else Path(recipe.teacher).name) + \
        ("-noinstr" if extra == "-noinstr" else "")
    sched_dir = work / "schedules" / f"{strategy}-B{batch}-s{seed}-{recipe.key(strategy)}{extra}"
    path = sched_dir / "v000000.b3s"
    if path.is_file():
        return path, load_schedule(path).meta
    base = work / "mine" / teacher / "embed-only"
    folder = work / "mine" / teacher / (f"p{recipe.p}-m{recipe.m}-K{recipe.K}{recipe.graph}{recipe.scope}"
                                        + (extra if extra != "-noinstr" else ""))
    if (base / "embeddings" / "embeddings.json").is_file() and not (folder / "embeddings").is_dir():
        shutil.copytree(base / "embeddings", folder / "embeddings")
    # random and task batches need only the embeddings (for their batch-quality figures)
    cfg = MineConfig(data=str(data), out=str(base if strategy in ("random", "task") else folder),
                     task_params=recipe.task_params if base_arm(arm) == "b3-taskp" else None)
    cfg = apply_overrides(cfg, {
        "teacher.max_query_length": recipe.query_length, "teacher.max_positive_length": recipe.positive_length,
        "teacher.model": recipe.teacher, "p": recipe.p, "m": recipe.m, "K": min(recipe.K, batch),
        "batch_size": batch, "h": recipe.h, "seed": seed, "strategy": strategy, "small_tasks": "merge",
        "per_task": recipe.per_task, "edges": recipe.edges, "rank_weights": recipe.rank_weights,
        "partitioner": recipe.partitioner, "quality_temperature": recipe.temperature, "schedule_dir": str(sched_dir), "version": 0,
        "device": args.device, "quality_sample": 1024})
    run_all(cfg, progress=False)
    if not (base / "embeddings" / "embeddings.json").is_file():
        shutil.copytree(Path(cfg.out) / "embeddings", base / "embeddings", dirs_exist_ok=True)
    return path, load_schedule(path).meta


def batch_stats(work: Path, schedule: Path) -> dict:
    """How hard the schedule's in-batch negatives are under the bundled MiniLM teacher's embeddings (the same
    yardstick for every arm): mean negative similarity, and the share of negatives the teacher scores above
    the query's own positive - hard negatives, or false negatives (another function that answers the
    docstring as well), which InfoNCE then pushes away from the query. A member whose positive has the
    query's positive text (a label shared by a class, a duplicate) is no negative, as in the loss
    (``mask_duplicate_positives``); ``same_text_share`` is the share of in-batch pairs masked so. Per task
    (``per_task``, by the query's task) where the data has several."""
    from b3stream.schedule import load_schedule

    emb = work / "mine" / "minilm" / "embed-only" / "embeddings"
    if not (emb / "queries.npy").is_file():
        return {}
    q = np.load(emb / "queries.npy").astype(np.float32)
    pos = np.load(emb / "positives.npy").astype(np.float32)
    keys = np.load(emb / "positive_keys.npy") if (emb / "positive_keys.npy").is_file() else np.arange(len(q))
    tasks = np.load(emb / "tasks.npy") if (emb / "tasks.npy").is_file() else np.zeros(len(q), np.int64)
    names = json.loads((emb / "embeddings.json").read_text()).get("task_names") or ["all"]
    s = load_schedule(schedule)
    members, sims, above, same = [], [], [], []
    for b in range(len(s.offsets) - 1):
        ids = np.asarray(s.ids[s.offsets[b]:s.offsets[b + 1]])
        if len(ids) < 2:
            continue
        scores = q[ids] @ pos[ids].T
        own = np.diag(scores).copy()
        alike = keys[ids][:, None] == keys[ids][None, :]
        others = len(ids) - 1
        same.append((alike.sum(axis=1) - 1) / others)
        scores[alike] = np.nan  # the own positive and every same-text one
        count = (~alike).sum(axis=1)
        with np.errstate(invalid="ignore"):  # a member with no negative left: 0 / 0, NaN, skipped in the means
            sims.append(np.nansum(scores, axis=1) / count)
            above.append((scores > own[:, None]).sum(axis=1) / count)
        members.append(ids)
    members, sims, above, same = (np.concatenate(x) for x in (members, sims, above, same))

    def stats(rows: np.ndarray) -> dict:
        return {"neg_sim_mean": float(np.nanmean(sims[rows])), "neg_above_positive_share":
                float(np.nanmean(above[rows])), "same_text_share": float(np.mean(same[rows]))}

    out = stats(np.ones(len(members), bool))
    if len(names) > 1:
        out["per_task"] = {name: stats(tasks[members] == t) for t, name in enumerate(names)
                           if (tasks[members] == t).any()}
    return out


def encoded_per_epoch(schedule: Path) -> dict:
    """The texts one epoch of ``schedule`` makes the student embed, as the trainer builds its steps: every
    query and positive once, and per step the union of its members' hard negatives not already in the step
    (B3++, random_hn). The compute of the arms differs by these counts (queries are the shorter texts)."""
    from b3stream.schedule import load_schedule

    s = load_schedule(schedule)
    negatives = 0
    if s.negatives is not None:
        for b in range(len(s.offsets) - 1):
            ids = np.asarray(s.ids[s.offsets[b]:s.offsets[b + 1]])
            pool = np.unique(np.asarray(s.negatives[s.offsets[b]:s.offsets[b + 1]]).ravel())
            negatives += int(np.setdiff1d(pool[pool >= 0], ids).size)
    steps = len(s.offsets) - 1
    return {"queries": len(s.ids), "positives": len(s.ids), "negatives": negatives,
            "documents_per_step": (len(s.ids) + negatives) / steps, "steps": steps}


def teacher_seconds(work: Path, recipe: Recipe) -> float | None:
    """Wall time of the teacher pass over the training split, as its stage record measured it."""
    teacher = "minilm" if recipe.teacher is None else Path(recipe.teacher).name
    rec = work / "mine" / teacher / "embed-only" / "embeddings" / "embeddings.json"
    if not rec.is_file():
        return None
    d = json.loads(rec.read_text())
    return d.get("seconds") or (d.get("timings") or {}).get("total")


# --------------------------------------------------------------------------------------------------
# 3. Training: `b3stream train` on the schedule, one epoch (or a step budget), no in-run evaluation
# --------------------------------------------------------------------------------------------------


def train(args, data: Path, schedule: Path, run: Path, recipe: Recipe, seed: int, arm: str,
          max_steps: int | None = None) -> dict:
    """Train one cell (cached by its summary.json); returns the run summary plus its wall time."""
    done = run / "bench.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(run, ignore_errors=True)  # a half-finished run restarts cleanly
    run.mkdir(parents=True)
    overrides = [
        f"data={data}", f"schedule={schedule}", f"out={run}", f"seed={seed}", f"lr={recipe.lr}",
        f"temperature={recipe.temperature}", f"symmetric={str(recipe.symmetric).lower()}",
        f"student.max_query_length={recipe.query_length}",
        f"student.max_positive_length={recipe.positive_length}", f"student.lora.enabled={str(recipe.lora).lower()}",
        f"student.lora.r={recipe.lora_r}", f"student.lora.alpha={2 * recipe.lora_r}", "eval_split=null",
        f"epochs={recipe.epochs}", "num_workers=0", "log_every=20", "save_every=null", "keep_checkpoints=1",
        "resume=false", "verify_data=false", "deepspeed=zero0",
        "overwrite=true",  # the cell's folder already holds this bench's config and log
    ]
    if max_steps is not None:
        overrides.append(f"max_steps={max_steps}")
    if arm in REFRESHED_ARMS:
        overrides += ["mode=refreshed", "refresh.keep=1", f"refresh.device={args.device}", "refresh.poll_seconds=0.5",
                      f"refresh.threads={max(1, args.threads // 2)}", "refresh.mine={quality_sample: 512}"]
    if arm in ("b3-refreshed", "b3-bound"):
        overrides.append(f"refresh.every_steps={recipe.refresh_every}")
        if arm == "b3-bound":
            overrides += ["refresh.when=bound", f"refresh.bound_drift={recipe.bound_drift}"]
        if recipe.refresh_lag is not None:
            overrides.append(f"refresh.max_lag_steps={recipe.refresh_lag}")
    if arm in ("random-redrawn", "task-redrawn"):  # new batches (seed + step) for every epoch, before it starts
        overrides += ["refresh.every_epochs=1", "refresh.model=teacher", "refresh.max_lag_steps=0"]
    if arm == "b3-epoch":  # re-mined from the student at every epoch start, before the epoch's first step
        overrides += ["refresh.every_epochs=1", "refresh.model=student", "refresh.max_lag_steps=0"]
    config = run / "bench-train.yaml"
    config.write_text("")  # every value comes from the overrides; the file documents nothing else
    seconds = _cli(args, "train", "--config", str(config), "--quiet", *overrides, log=run / "train.log")
    summary = json.loads((run / "summary.json").read_text())
    out = {"summary": summary, "train_seconds": seconds, "overrides": overrides,
           "refreshes": _refreshes(run) if arm in REFRESHED_ARMS else None,
           "probes": _probes(run) if arm == "b3-bound" else None}
    done.write_text(json.dumps(out, indent=2, default=str))
    return out


def _refreshes(run: Path) -> list[dict]:
    """Each schedule the background miner published in this run: version, source step, its mining time."""
    out = []
    for side in sorted((run / "schedules").glob("v*.json")):
        meta = json.loads(side.read_text())
        m = meta.get("meta", meta)
        out.append({"version": side.stem, "source_step": m.get("source_step"),
                    "timings": meta.get("timings") or m.get("timings"), "embed_kept": m.get("embed_kept"),
                    "theorem1_bound": (m.get("quality") or {}).get("theorem1_bound"),
                    "quality": m.get("quality"), "quality_previous": m.get("quality_previous")})
    return out


def _probes(run: Path) -> list[dict] | None:
    """refresh.when: bound - the miner's decision at every snapshot it probed (from its status file)."""
    status = run / "refresh" / "status.json"
    return json.loads(status.read_text()).get("probes") if status.is_file() else None


# --------------------------------------------------------------------------------------------------
# 4. Evaluation: exact search over every split's positives, per-query ranks for the paired statistics
# --------------------------------------------------------------------------------------------------


def per_query_file(folder: Path, split: str, task: str | None = None) -> Path:
    return folder / (f"{split}.jsonl" if task is None else f"{split}.{task}.jsonl")


def evaluate(args, data: Path, model: str | None, folder: Path, recipe: Recipe) -> dict:
    """Validation and test metrics of ``model`` (an export folder; None: the zero-shot MiniLM) with
    ``--corpus all``; the corpus is embedded once and shared by both splits. On the mixture each task's
    queries are searched among that task's documents only (as MMEB scores each dataset against its own
    candidates), and a split's metrics are the mean over tasks (MMEB's average), with ``per_task`` beside."""
    done = folder / "metrics.json"
    if done.is_file():
        return json.loads(done.read_text())
    import torch

    from b3stream.evaluate import encoder_config_for, evaluate_encoder
    from b3stream.encoder import Encoder

    torch.set_num_threads(args.threads)
    folder.mkdir(parents=True, exist_ok=True)
    if model and (Path(model) / "sentence-transformers" / "modules.json").is_file():
        model = str(Path(model) / "sentence-transformers")
    cfg = encoder_config_for(model)
    cfg.max_query_length, cfg.max_positive_length = recipe.query_length, recipe.positive_length
    encoder = Encoder(cfg, trainable=False, device=args.device if args.device == "cpu" else "cuda")
    from b3stream.data.manifest import Manifest
    from b3stream.evaluate import prompted_pairs

    tasks = Manifest.load(data).tasks if args.dataset == "mixture" else [None]
    t0 = time.perf_counter()
    pairs = prompted_pairs(data, prompts=encoder.prompts)  # one pass over the shards for every task and split
    out = {s: {"per_task": {}} for s in SPLITS}
    for task in tasks:
        sets = {s: RetrievalSet(data, s, corpus="all", task=task, pairs=pairs) for s in SPLITS}
        corpus = encoder.encode(sets["test"].corpus, "positive", batch_size=128)
        for s, es in sets.items():
            if not es.queries:  # a task the group split left without queries here
                continue
            out[s]["per_task"][task] = evaluate_encoder(encoder, data, s, eval_set=es, corpus_emb=corpus,
                                                        per_query=per_query_file(folder, s, task), batch_size=128)
    for s in SPLITS:
        per_task = out[s].pop("per_task")
        if tasks == [None]:
            out[s] = per_task[None]
        else:
            out[s] = {m: float(np.mean([v[m] for v in per_task.values()])) for m in METRICS}
            out[s].update(per_task=per_task, queries=sum(v["queries"] for v in per_task.values()),
                          corpus=sum(v["corpus"] for v in per_task.values()))
    out["eval_seconds"] = time.perf_counter() - t0
    done.write_text(json.dumps(out, indent=2))
    return out


# --------------------------------------------------------------------------------------------------
# 5. Statistics: mean and spread over seeds, paired bootstrap over queries
# --------------------------------------------------------------------------------------------------


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
    over its datasets. One stratum: the plain bootstrap over queries."""
    rng = np.random.default_rng(seed)
    means = np.zeros(reps)
    for v in values:
        means += v[rng.integers(0, len(v), size=(reps, len(v)))].mean(axis=1)
    means /= len(values)
    centre = float(np.mean([v.mean() for v in values]))
    return centre, float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over queries and its 95% interval (a, b: per-query values of two systems)."""
    return stratified_bootstrap([a - b], reps, seed)


def bootstrap_mean(a: np.ndarray, reps: int, seed: int = 0) -> tuple[float, float]:
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


# --------------------------------------------------------------------------------------------------
# 6. The grid
# --------------------------------------------------------------------------------------------------


def is_cached(args, work: Path, recipe: Recipe, arm: str, batch: int, seed: int) -> bool:
    if "@" in arm:
        recipe = dataclasses.replace(recipe, teacher=args.teachers[arm.partition("@")[2]])
    return (work / "eval" / f"{base_arm(arm)}-B{batch}-s{seed}-{recipe.key(arm)}" / "metrics.json").is_file()


def run_cell(args, data, work, recipe, arm, batch, seed, extra_steps: int | None = None) -> dict:
    strategy = STRATEGY_OF[base_arm(arm)]
    if "@" in arm:
        recipe = dataclasses.replace(recipe, teacher=args.teachers[arm.partition("@")[2]])
    if base_arm(arm) == "b3-noinstr":
        data = args.data_noinstr
    t0 = time.perf_counter()
    schedule, meta = mine(args, data, work, recipe, arm, batch, seed)
    mine_seconds = time.perf_counter() - t0
    name = f"{base_arm(arm)}-B{batch}-s{seed}-{recipe.key(arm)}"
    run = work / "runs" / name
    steps = None
    if extra_steps is not None:
        steps = int(meta["num_batches"]) + extra_steps
    trained = train(args, data, schedule, run, recipe, seed, base_arm(arm), max_steps=steps)
    metrics = evaluate(args, data, str(run / "export"), work / "eval" / name, recipe)
    print(f"  {arm:15s} |B|={batch:3d} seed {seed}: val nDCG@10 {metrics['validation']['ndcg@10']:.4f}  "
          f"test nDCG@10 {metrics['test']['ndcg@10']:.4f}  ({trained['train_seconds']:.0f} s train)", flush=True)
    return {"arm": arm, "strategy": strategy, "batch_size": batch, "seed": seed, "recipe": dataclasses.asdict(recipe),
            "schedule": str(schedule), "schedule_meta": meta, "mine_seconds_this_cell": mine_seconds,
            "train": trained, "metrics": metrics, "eval_dir": str(work / "eval" / name), "max_steps": steps,
            "batch_stats": batch_stats(work, schedule), "encoded": encoded_per_epoch(schedule)}


def compute_matched(args, data, work, recipe: Recipe, cells: dict, batch: int, seed: int) -> dict:
    """Random batches given the teacher pass's cost as extra steps: the teacher's measured wall time over
    the training split, times the steps per second random training measured here (same machine, same
    load). The FLOP estimate is recorded beside it: the teacher embeds N queries and N positives (2N
    forwards), a step runs forward + backward (about 3 forwards) over |B| queries and |B| positives, so the
    pass is worth about N / (3 |B|) steps for a teacher the size of the student."""
    rnd = next(c for c in cells[("random", batch)] if c["seed"] == seed)
    secs = teacher_seconds(work, recipe)
    per_s = rnd["train"]["summary"].get("steps_per_s")
    n = int(rnd["schedule_meta"]["n"])
    extra = max(1, round(secs * per_s)) if secs and per_s else max(1, round(n / (3 * batch)))
    cell = run_cell(args, data, work, recipe, "random+compute", batch, seed, extra_steps=extra)
    cell.update(extra_steps=extra, teacher_seconds=secs, flop_estimate_steps=n / (3 * batch))
    return cell


def tune(args, data, work, recipe: Recipe) -> tuple[Recipe, list[dict]]:
    """Coordinate search on validation nDCG@10 at |B| = 32 (or the first batch size), seed 0: lr and
    temperature on random batches (so the baseline gets the same care), then p, m, K, h on b3 / b3pp."""
    sizes = sorted({b for _, batches, _ in args.blocks for b in batches})
    batch = 32 if 32 in sizes else sizes[0]
    grid = [("random", "lr", [1e-4, 2e-4, 5e-4]), ("random", "temperature", [0.02, 0.05, 0.1]),
            ("b3", "p", [0, 3, 10]), ("b3", "m", [10, 30, 60]), ("b3", "K", [4, 8, 16]), ("b3pp", "h", [1, 2, 4])]
    trials = []
    for arm, knob, values in grid:
        scores = {}
        for v in values:
            r = dataclasses.replace(recipe, **{knob: v})
            if knob == "K" and v > batch:
                continue
            cell = run_cell(args, data, work, r, arm, batch, 0)
            scores[v] = cell["metrics"]["validation"]["ndcg@10"]
            trials.append({"arm": arm, "knob": knob, "value": v, "recipe": dataclasses.asdict(r),
                           "validation_ndcg@10": scores[v]})
        best = max(scores, key=scores.get)
        print(f"tune {knob}: {scores} -> {best}", flush=True)
        recipe = dataclasses.replace(recipe, **{knob: best})
    return recipe, trials


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


if __name__ == "__main__":
    raise SystemExit(main())

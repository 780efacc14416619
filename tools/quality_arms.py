"""tools/bench_quality.py's arms (what each trains: a strategy, refreshed or not, another teacher) and its
recipe (the hyper-parameters and the cache key of a cell)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


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

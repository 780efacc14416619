"""Batch strategies behind one interface: ``random``, ``random_hn``, ``task``, ``task_hn``, ``gcbs``, ``b3``,
``b3pp``.

Each strategy turns the mined artefacts into one epoch of global batches of ``|B|`` ids, every id exactly
once. They differ only in *which* ids share a batch:

- ``random``: a seeded permutation of all ids, cut every |B| (tasks mixed).
- ``random_hn``: ``random`` plus h hard negatives per example drawn from S as ``b3pp`` draws them: the
  baseline of the B3 paper's Table 2 (random batches with mined hard negatives), which B3 is reported to
  beat at half the compute. With the same seed its batches equal ``random``'s.
- ``task``: task-homogeneous random batches (as GritLM trains): each task's ids permuted and cut every |B|.
- ``task_hn``: ``task`` plus h hard negatives per example from S, as ``random_hn`` adds them to ``random``: the
  Table 2 baseline where batches are one task (dataset) at a time, as MMEB's training batches are.
- ``gcbs``: Global Contrastive Batch Sampling (Sachidananda, Yang and Zhu, ICML 2023), in our reading: keep
  the similarity-graph edges whose teacher score reaches a threshold, order the examples by the Reverse
  Cuthill-McKee permutation of that graph (which keeps linked examples close, i.e. a small bandwidth), and
  take consecutive slices of |B| as batches. Our graph is the sparse S (with its scores), not a dense
  similarity matrix; the threshold defaults to the median score in S.
- ``b3``: the paper's batches: |B|/K METIS communities of K drawn at random (one task at a time unless
  ``mix_tasks``), so each batch is made of groups of mutually strong negatives.
- ``b3pp``: ``b3`` plus h hard negatives per example from the batch's pooled S rows, never a member nor any
  member's top-p (T) (:mod:`b3stream.mining.negatives`). With the same seed its batches equal ``b3``'s.

Common policy for batches that cannot be full: each group (task) contributes its full batches; what is left
of each group (fewer than |B| ids, whole communities for b3) is pooled at the end of the epoch, whole units
first and short communities (n mod K, see :mod:`b3stream.mining.partition`) last, and cut every |B|. So an
epoch has at most a few task-mixed tail batches, only the very last batch can be shorter than |B|, and only
tail batches can split a short community. Full batches are shuffled (seeded) so tasks interleave.
Batches are laid out unit by unit, so a b3 batch is |B|/K consecutive runs of K ids (the schedule format).

A refresh in the middle of an epoch (``BatchInputs.trained``, refreshed mode): the ids still to come and the
ids the trainer has trained this epoch are batched apart, each as a whole epoch under this policy (so the
ids to come have one short batch at most, and none of their batches holds an id the trainer skips; a hard
negative may be any id). See :func:`make_batches`.

Everything is a pure function of the inputs and ``seed`` (numpy PCG64): reruns are byte-identical.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..config import ConfigError
from ..data.dedup import KnownKeys
from .graph import Relabel, subgraph_rows
from .negatives import KeyIndex, draw_hard_negatives
from .rank import task_groups


@dataclass
class BatchInputs:
    """What strategies may read. ``S``/``scores``/``top``/``communities`` are None when not mined."""

    n: int
    tasks: np.ndarray  # (n,) int32 task index per id
    task_names: list[str]
    S: np.ndarray | None = None  # (n, m) int32, -1 padded
    scores: np.ndarray | None = None  # (n, m) float16
    top: np.ndarray | None = None  # (n, p) int32, -1 padded: T, the top-p ranks skipped from S
    communities: np.ndarray | None = None  # (n_comm, K) int32, -1 padded
    community_task: np.ndarray | None = None  # (n_comm,) int32
    keys: np.ndarray | None = None  # (n,) int64 content key of each positive (b3stream.data.dedup)
    known: KnownKeys | None = None  # each id's known positives' keys (b3stream.data.dedup); None: none
    # (n,) bool, a refresh: the ids the trainer has trained this epoch, batched apart from the ids to come
    trained: np.ndarray | None = None
    subset: np.ndarray | None = None  # (n,) bool: batch only these ids (set by make_batches; None: all)

    def only(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` restricted to :attr:`subset`."""
        return ids if self.subset is None else ids[self.subset[ids]]


@dataclass
class BatchParams:
    batch_size: int = 1024
    K: int = 32
    h: int = 5
    seed: int = 0
    per_task: bool = True
    mix_tasks: bool = False
    gcbs_threshold: float | None = None

    @classmethod
    def from_config(cls, cfg) -> "BatchParams":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for batching and for B3++ draws (so b3 and b3pp share batches)."""
    a, b = np.random.SeedSequence(seed).spawn(2)
    return np.random.Generator(np.random.PCG64(a)), np.random.Generator(np.random.PCG64(b))


def pack(groups: list[tuple[np.ndarray, list[np.ndarray]]], batch_size: int,
         rng: np.random.Generator) -> list[np.ndarray]:
    """Per group ``(full_units (U, u), short_units)`` in batch order -> the epoch's batches (module doc)."""
    full_batches, tail_full, tail_short = [], [], []
    for units, short in groups:
        if len(units):
            per_batch = batch_size // units.shape[1]
            nb = len(units) // per_batch
            full_batches += list(units[: nb * per_batch].reshape(nb, batch_size))
            tail_full.append(units[nb * per_batch :].ravel())
        tail_short += [s[s >= 0] for s in short]
    order = rng.permutation(len(full_batches))
    batches = [full_batches[i] for i in order]
    tail = np.concatenate(tail_full + tail_short) if (tail_full or tail_short) else np.empty(0, np.int64)
    batches += [tail[i : i + batch_size] for i in range(0, len(tail), batch_size)]
    return [np.asarray(b, dtype=np.int64) for b in batches if len(b)]


class Strategy(ABC):
    """Interface: ``needs`` names the artefacts used; :meth:`batches` returns (batches, negatives|None)."""

    name = ""
    needs: tuple[str, ...] = ()
    uses_communities = False

    def check_params(self, prm: BatchParams) -> None:
        """|B|, K and h on their own: checked before any artefact is read, and by the pipeline's pre-flight
        before the teacher loads (:func:`b3stream.mining.pipeline.preflight`)."""
        if prm.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {prm.batch_size}")
        if self.uses_communities:
            if prm.K < 1 or prm.K > prm.batch_size:
                raise ConfigError(f"K={prm.K} must be between 1 and the batch size |B| (batch_size={prm.batch_size}): "
                                  f"a {self.name} batch is |B|/K whole communities")
            if prm.batch_size % prm.K:
                raise ConfigError(f"K={prm.K} does not divide batch_size={prm.batch_size}: the batch size |B| is not "
                                  f"a multiple of K, and a {self.name} batch is |B|/K whole communities")

    def check(self, inp: BatchInputs, prm: BatchParams) -> None:
        self.check_params(prm)
        for need in self.needs:
            if getattr(inp, need) is None:
                raise ConfigError(f"strategy {self.name!r} needs {need}; run the earlier mining stages first")

    @abstractmethod
    def batches(self, inp: BatchInputs, prm: BatchParams) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """One epoch of batches (and B3++ negatives aligned with them, or None)."""


class RandomBatches(Strategy):
    name = "random"

    def batches(self, inp, prm):
        rng, _ = rngs(prm.seed)
        ids = inp.only(np.arange(inp.n))
        perm = ids[rng.permutation(len(ids))]
        return [perm[i : i + prm.batch_size] for i in range(0, len(perm), prm.batch_size)], None


class TaskBatches(Strategy):
    name = "task"

    def batches(self, inp, prm):
        rng, _ = rngs(prm.seed)
        groups = [inp.only(ids) for _, ids in task_groups(inp.tasks, inp.task_names, per_task=True)]
        units = [(rng.permutation(ids).reshape(-1, 1), []) for ids in groups if len(ids)]
        return pack(units, prm.batch_size, rng), None


class GcbsBatches(Strategy):
    name = "gcbs"
    needs = ("S", "scores")

    def threshold(self, inp: BatchInputs, prm: BatchParams) -> float:
        if prm.gcbs_threshold is not None:
            return float(prm.gcbs_threshold)
        valid = np.asarray(inp.S) >= 0
        return float(np.median(np.asarray(inp.scores, dtype=np.float32)[valid])) if valid.any() else 0.0

    def batches(self, inp, prm):
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        rng, _ = rngs(prm.seed)
        tau = self.threshold(inp, prm)
        self.used_threshold = tau
        out = []
        relabel = Relabel(inp.n)
        for _, ids in task_groups(inp.tasks, inp.task_names, prm.per_task and not prm.mix_tasks):
            ids = inp.only(ids)
            if not len(ids):
                continue
            local = subgraph_rows(inp.S, ids, inp.n, relabel)
            sc = np.asarray(inp.scores[ids] if len(ids) != inp.n else inp.scores, dtype=np.float32)
            keep = (local >= 0) & (sc >= tau)
            rows = np.nonzero(keep)[0]
            cols = local[keep]
            n = len(ids)
            A = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
            A = (A + A.T).tocsr()  # RCM wants a symmetric structure
            order = reverse_cuthill_mckee(A, symmetric_mode=True)
            out.append((ids[order].reshape(-1, 1), []))
        return pack(out, prm.batch_size, rng), None


class B3Batches(Strategy):
    name = "b3"
    needs = ("communities",)
    uses_communities = True

    def check(self, inp, prm):
        super().check(inp, prm)
        if inp.communities.shape[1] != prm.K:
            raise ConfigError(f"the communities have K = {inp.communities.shape[1]} but K = {prm.K} was asked; "
                              "re-run the partition stage")

    def batches(self, inp, prm):
        rng, _ = rngs(prm.seed)
        comm, ctask = inp.communities, inp.community_task
        if prm.mix_tasks or ctask is None:
            ctask = np.zeros(len(comm), dtype=np.int32)
        if inp.subset is not None:  # the communities of the subset (the partition cut it apart already)
            inside = (comm >= 0) & inp.subset[np.maximum(comm, 0)]
            comm = np.where(inside, comm, -1)  # a community across the subset's edge: its part, as a short one
            ctask = ctask[inside.any(axis=1)]
            comm = comm[inside.any(axis=1)]
            full = (comm >= 0).all(axis=1)  # full ones first, as the partition stores them
            comm = np.concatenate([comm[full], np.sort(comm[~full], axis=1)[:, ::-1]])
            ctask = np.concatenate([ctask[full], ctask[~full]])
        groups = []
        for t in np.unique(ctask):
            mine = np.flatnonzero(ctask == t)
            short = (comm[mine] < 0).any(axis=1)
            full = comm[mine[~short]]
            groups.append((full[rng.permutation(len(full))].astype(np.int64),
                           [comm[i].astype(np.int64) for i in mine[short]]))
        return pack(groups, prm.batch_size, rng), None


class WithHardNegatives(Strategy):
    """Mixin: h >= 1 hard negatives per example from the batch's pooled S rows, never a member, a member's
    top-p (T) or a same-text positive (:mod:`b3stream.mining.negatives`), added to the batches of the
    strategy it is mixed into."""

    def check_params(self, prm):
        """Also h: without hard negatives the strategy is its base, so h < 1 is refused before the teacher
        runs."""
        super().check_params(prm)
        if prm.h < 1:
            raise ConfigError(f"h={prm.h}: {self.name} needs h >= 1 hard negatives per example (h=0 is its base "
                              "strategy)")

    def check(self, inp, prm):
        super().check(inp, prm)
        if len(inp.top) != len(inp.S):
            raise ConfigError(f"the top-p lists T ({len(inp.top)} rows) and S ({len(inp.S)} rows) disagree; "
                              "re-run the rank stage")

    def batches(self, inp, prm):
        batches, _ = super().batches(inp, prm)
        return batches, hard_negatives_for(batches, inp, prm)


class B3ppBatches(WithHardNegatives, B3Batches):
    """B3++: b3's batches plus h hard negatives per example."""

    name = "b3pp"
    needs = ("communities", "S", "top")


class RandomHnBatches(WithHardNegatives, RandomBatches):
    """Random batches plus h hard negatives per example from S (the B3 paper's Table 2 baseline)."""

    name = "random_hn"
    needs = ("S", "top")


class TaskHnBatches(WithHardNegatives, TaskBatches):
    """Task-homogeneous random batches plus h hard negatives per example from S."""

    name = "task_hn"
    needs = ("S", "top")


def hard_negatives_for(batches: list[np.ndarray], inp: BatchInputs, prm: BatchParams) -> list[np.ndarray]:
    """h hard negatives per example of every batch, from the batch's pooled S rows (:mod:`negatives`), with
    the seed's own generator (so the batches are the same with and without them)."""
    _, neg_rng = rngs(prm.seed)
    # the uniform fill-up stays inside the batch's tasks when tasks are mined apart (their S rows do too)
    by_task = {inp.task_names.index(name): ids
               for name, ids in task_groups(inp.tasks, inp.task_names, True)} \
        if len(inp.task_names) > 1 and prm.per_task and not prm.mix_tasks else None
    key_index = KeyIndex(inp.keys) if inp.keys is not None else None
    pools: dict[tuple, np.ndarray] = {}  # the union of several tasks' ids, once per set of tasks (tail batches)
    negatives = []
    for b in batches:
        pool = None
        if by_task is not None:
            present = tuple(int(t) for t in np.unique(inp.tasks[b]))
            if len(present) == 1:
                pool = by_task[present[0]]
            else:
                if present not in pools:
                    pools[present] = np.sort(np.concatenate([by_task[t] for t in present]))
                pool = pools[present]
        negatives.append(draw_hard_negatives(b, inp.S, prm.h, neg_rng, pool=pool, top=inp.top, keys=inp.keys,
                                             key_index=key_index, known=inp.known))
    return negatives


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (RandomBatches, RandomHnBatches, TaskBatches, TaskHnBatches, GcbsBatches, B3Batches,
                           B3ppBatches)
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]()


def make_batches(name: str, inp: BatchInputs, prm: BatchParams
                 ) -> tuple[list[np.ndarray], list[np.ndarray] | None, dict]:
    """Run strategy ``name``: (batches, B3++ negatives or None, strategy-specific metadata).

    With ``inp.trained`` (a refresh in the middle of an epoch) the ids still to come and the trained ones are
    batched apart, each as the strategy batches a whole epoch, the ids to come first: so the rest of the
    epoch is made of whole batches of the miner's (with their hard negatives), none of them holding an id
    the trainer skips. The trained ids' batches matter only if the schedule is still in use when the next
    epoch starts."""
    strategy = get_strategy(name)
    strategy.check(inp, prm)
    trained = inp.trained
    if trained is None or not trained.any() or trained.all():
        batches, negatives = strategy.batches(dataclasses.replace(inp, subset=None), prm)
    else:
        batches, negatives = [], []
        for part in (~trained, trained):
            b, negs = strategy.batches(dataclasses.replace(inp, subset=part), prm)
            batches += b
            negatives = None if negs is None else negatives + negs
    extra = {}
    if hasattr(strategy, "used_threshold"):
        extra["gcbs_threshold"] = round(float(strategy.used_threshold), 6)
    return batches, negatives, extra

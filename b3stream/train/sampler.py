"""The schedule consumer: which ids each rank trains on at each step.

A schedule (``b3stream.schedule``) is one epoch of global batches, each |B| ids laid out community by
community (|B|/K runs of K). The sampler turns it into an *epoch plan* and hands every rank its slice of
each global batch:

- **Whole communities per rank**: a batch is cut into ``world`` contiguous slices, so when |B|/K divides by
  the world size every rank embeds whole communities. (The loss gathers all embeddings, so the split never
  changes the loss value; it keeps each rank's work local to a community.)
- **Same number of steps on every rank**: every rank derives the same plan from the same schedule, seed
  and state, and every global batch has at least ``world`` ids (a smaller tail is merged into a
  neighbouring batch), so each rank has a non-empty slice at every step.
- **Exactly once per epoch**: an epoch plan is a permutation of the schedule's batches (seeded by
  ``(seed, epoch)``); the batches themselves are the miner's.
- **Hot swap** (:meth:`ScheduleSampler.swap`): a new schedule version (same |B|, never an older version)
  re-batches only the ids not yet consumed in this epoch, along the NEW schedule's batches and communities,
  taken in a seeded order (tasks interleave as in an epoch plan). A batch none of whose members was consumed
  stays the miner's batch where it is, with its hard negatives; refreshed mode's miner batches the ids to
  come apart from those trained at its snapshot, so after a swap these are all of them but those that ids
  trained between the snapshot and the swap broke. The survivors of broken batches are re-cut within each
  task (the schedule's ``batch_task``, when it kept tasks apart): whole K-communities first, then fragments,
  every |B| (a multiple of K, so whole communities stay in one batch), each piece where its first batch
  was; what is left of each task is pooled at the end of the plan and cut every |B|, as the miner pools its
  tails. B3++ hard negatives are kept only by the miner's own batches: they were drawn for exactly those
  members, while a re-cut batch's pooled rows could hold a new member's top-p neighbour or same-text
  positive, so re-cut batches train on in-batch negatives alone. The swaps are recorded in
  :attr:`ScheduleSampler.history`.
- **A fixed number of steps per epoch** (:attr:`ScheduleSampler.epoch_steps`): the run's first plan fixes
  it, and every later plan (a swap's, a new epoch's, on any schedule of the same |B|) has exactly the steps
  the epoch has left, so a step budget of ``epochs * epoch_steps`` (the trainer's, and its learning-rate
  schedule's) ends each epoch when every id has been trained. An epoch's ids are |B| a step but one step,
  and a swap keeps them so (one short step, not one per task), so the pieces above fill the steps left as
  they are; only a schedule batched otherwise than that (several short batches) makes whole batches give up
  their negatives to be re-cut into the steps left.
- **Resumable**: :meth:`state_dict` holds the schedule version, epoch, position, swap count, the steps and
  ids consumed this epoch, the steps per epoch and the seed; loading it rebuilds the identical plan (or, if
  that version is gone, swaps to the given schedule) so a resumed run trains the same remaining ids.

B3++ hard negatives: the union of the hard-negative ids of a global batch's members (without ids already in
the batch, whose embeddings are there as positives) is one pool ``N`` shared by every query; each rank
embeds a contiguous share of it. A pool smaller than the world size is dropped for that step, so every
rank embeds either nothing or at least one negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dist import split_bounds
from ..schedule import Schedule, ScheduleError


@dataclass
class Step:
    """One rank's share of one global batch.

    It carries everything a DataLoader worker needs to build the batch (the ids, whether the plan has a
    hard-negative side) and everything the loss needs to know about the other ranks (their row counts), so
    neither a worker's copy of the sampler nor a collective is asked: workers outlive plans, and every rank
    derives every rank's counts from the same plan on the host."""

    epoch: int
    index: int  # position in the epoch plan
    ids: np.ndarray  # this rank's slice of the global batch
    negative_ids: np.ndarray  # this rank's share of the batch's hard-negative pool (may be empty)
    global_size: int  # |B| of this step
    version: int | None  # schedule version the batch came from
    sizes: list[int]  # every rank's number of queries (= positives) this step, in rank order
    # every rank's share of the hard-negative pool, in rank order; None when a rank's count is known only
    # after its worker read its records (dataset negatives: examples store different numbers of them)
    negative_sizes: list[int] | None
    with_negatives: bool  # the step has a hard-negative side: every rank embeds a (maybe empty) one
    dataset_negatives: int = 0  # up to this many of each member's stored negatives join the pool (h_dataset)


def rank_sizes(n: int, world: int) -> list[int]:
    """Every rank's row count when ``n`` rows are cut by :func:`split_bounds`: a pure function of the plan,
    so each host knows all of them without a collective (and without a GPU sync to read one)."""
    return [hi - lo for lo, hi in (split_bounds(n, world, rank) for rank in range(world))]


def _merge_small(offsets: np.ndarray, world: int) -> np.ndarray:
    """Merge every batch smaller than ``world`` (a tail) into the batch after it (the last one into the
    batch before it): a batch with fewer ids than ranks would leave a rank without data."""
    if not (np.diff(offsets) < world).any():
        return offsets
    keep = [int(offsets[0])]
    for end in offsets[1:-1]:
        if end - keep[-1] >= world:
            keep.append(int(end))
    keep.append(int(offsets[-1]))
    if len(keep) > 2 and keep[-1] - keep[-2] < world:
        del keep[-2]
    return np.asarray(keep, np.int64)


@dataclass
class _Piece:
    """One step of a plan in the making: rows of ``schedule.ids``, whether they are one of the miner's batches
    untouched (and keep its hard negatives), and where in the plan it goes."""

    rows: np.ndarray
    whole: bool
    key: float


def _cut_sizes(total: int, k: int, size: int, world: int) -> list[int]:
    """Sizes of ``k`` consecutive pieces of ``total`` ids (``total >= k * world``): as many of |B| = ``size``
    first as leave the others at least ``size // 2`` (or ``world``) ids, the others balanced; all balanced
    when there is more than ``k * size``."""
    if k == 0:
        return []
    if total >= k * size:
        full = 0
    else:
        low = max(world, size // 2) if total >= k * max(world, size // 2) else world
        full = k - 1 if size == low else min(k - 1, (total - k * low) // (size - low))
    rest, parts = total - full * size, k - full
    return [size] * full + [rest // parts + (1 if i < rest % parts else 0) for i in range(parts)]


class ScheduleSampler:
    """Per-rank view of a schedule's epoch plan (see the module docstring).

    Args:
        schedule: a loaded schedule covering ids ``0..n-1`` exactly once.
        n: number of examples in the training split.
        rank, world_size: this process and the number of processes.
        seed: seeds the batch order of every epoch (and of the plans made at swaps).
        epoch_steps: the run's steps per epoch when known (a resumed run's, from its starting schedule);
            None: the steps of this schedule's first plan.
    """

    def __init__(self, schedule: Schedule, n: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 negatives: str = "mined", h_dataset: int = 0, epoch_steps: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        if negatives not in ("mined", "dataset", "both"):
            raise ValueError(f"negatives={negatives!r}: expected mined, dataset or both")
        schedule.check_trainable(n, world_size)
        self.schedule, self.n, self.rank, self.world, self.seed = schedule, n, rank, world_size, seed
        # which extra negatives a step carries (TrainConfig negatives / h_dataset)
        self.mined = negatives != "dataset"
        self.h_dataset = h_dataset if negatives != "mined" else 0
        self.epoch, self.position, self.swaps = 0, 0, 0
        self._before = np.empty(0, np.int64)  # ids consumed this epoch before the current plan
        self._done = 0  # steps trained this epoch before the current plan
        self._epoch_steps: int | None = epoch_steps  # else set by the first plan
        self.history: list[dict] = []  # every swap: {"epoch", "position", "step", "from", "to"}
        self._make_plan()

    # -- the plan ----------------------------------------------------------------------------------
    def _make_plan(self) -> None:
        """The plan for the rest of the epoch from ``schedule``, excluding ``_before``: flat ids, offsets and
        aligned negative rows. It has exactly :attr:`epoch_steps` minus the steps trained before it (the first
        plan of a run fixes that number)."""
        sched = self.schedule
        rng = np.random.default_rng([self.seed, self.epoch, self.swaps])
        order = rng.permutation(len(sched.offsets) - 1)
        pieces = self._pieces(order, sched.offsets[order], np.diff(sched.offsets)[order])
        target = None if self._epoch_steps is None else self._epoch_steps - self._done
        rows, offsets, keep = self._fit(pieces, target)
        if target is not None and len(offsets) - 1 != target:  # the invariant the step budget rests on
            raise RuntimeError(f"the plan has {len(offsets) - 1} steps where the epoch has {target} left; "
                               "this is a bug")
        self._ids = sched.ids[rows]
        self._negs = None if sched.negatives is None else sched.negatives[rows]  # a copy (fancy indexing)
        if self._negs is not None:
            self._negs[~keep] = -1
        self._offsets = offsets
        if self._epoch_steps is None:
            self._epoch_steps = len(offsets) - 1

    def _pieces(self, order: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> list[_Piece]:
        """The schedule's batches in plan order as pieces of the plan (rows of ``schedule.ids``), without the
        ids consumed this epoch: a batch none of whose members was consumed stays whole (the miner's batch,
        with its hard negatives); the survivors of the others are re-cut within each task of ``batch_task``
        (whole K-communities first, then fragments, cut every |B|, each piece placed where its first batch
        was), and what is left of each task is pooled at the end and cut every |B|, as the miner pools its
        tails."""
        sched = self.schedule
        if not len(self._before):
            return [_Piece(np.arange(a, a + n), True, float(i)) for i, (a, n) in enumerate(zip(starts, sizes))]
        size, K = sched.batch_size, int(sched.meta.get("K") or 1)
        consumed = np.zeros(self.n, bool)
        consumed[self._before] = True
        task_of = sched.batch_task[order] if sched.batch_task is not None else np.zeros(len(order), np.int64)
        pieces: list[_Piece] = []
        survivors: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # task -> [(units, fragments)], plan order
        position = np.full(len(sched.ids), np.inf)  # a surviving row's batch's place in the plan
        for pos, (a, n) in enumerate(zip(starts, sizes)):
            rows = np.arange(a, a + n)
            alive = ~consumed[sched.ids[rows]]
            if alive.all():
                if n:
                    pieces.append(_Piece(rows, True, float(pos)))
                continue
            if not alive.any():
                continue
            unit = np.arange(n) // K  # a batch is laid out community by community
            whole_unit = (np.bincount(unit, weights=alive) == K)[unit]
            survivors.setdefault(int(task_of[pos]), []).append((rows[alive & whole_unit], rows[alive & ~whole_unit]))
            position[rows[alive]] = pos
        tails = []
        for task, parts in survivors.items():  # tasks in plan order of their first broken batch
            material = np.concatenate([u for u, _ in parts] + [f for _, f in parts])
            full = len(material) // size * size
            for lo in range(0, full, size):
                piece = material[lo : lo + size]
                pieces.append(_Piece(piece, False, float(position[piece].min())))
            tails.append(material[full:])
        pool = np.concatenate(tails) if tails else np.empty(0, np.int64)
        if len(pool) % size:  # one short step in the epoch, not two: a short batch of the miner's joins the pool
            short = [p for p in pieces if p.whole and len(p.rows) < size]
            pieces = [p for p in pieces if not (p.whole and len(p.rows) < size)]
            pool = np.concatenate([pool, *[p.rows for p in short]])
        pieces += [_Piece(pool[lo : lo + size], False, np.inf) for lo in range(0, len(pool), size)]
        pieces.sort(key=lambda p: p.key)  # stable: whole batches before re-cut pieces of the same place
        return pieces

    def _fit(self, pieces: list[_Piece], target: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows, offsets and which rows keep their hard negatives, in exactly ``target`` steps (None: as many
        as the pieces make, the first plan of a run) of at least ``world`` ids each.

        The pieces as they are, a piece smaller than the world size merged into a neighbour, when that
        gives ``target`` steps: always so for the schedule stage's schedules (one short batch, of the ids to
        come after a refresh), since an epoch's steps are then |B| ids but one and :meth:`_pieces` keeps them
        so. Else (a schedule batched otherwise: several short batches, here or in the plans before), as few
        whole batches as needed (the short ones, then the last) give up their hard negatives and join the
        re-cut material at the end of the plan, which is cut into the steps left, every |B| where it can."""
        world, size = self.world, self.schedule.batch_size
        lengths = np.array([len(p.rows) for p in pieces], np.int64)
        rows = np.concatenate([p.rows for p in pieces]) if pieces else np.empty(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        merged = _merge_small(offsets, world)
        if target is None or len(merged) - 1 == target:
            keep = np.repeat(np.array([p.whole for p in pieces], bool), lengths)
            for cut in np.setdiff1d(offsets, merged):  # a tail merged into a neighbour: no miner's batch now
                b = np.searchsorted(merged, cut) - 1
                keep[merged[b] : merged[b + 1]] = False
            return rows, merged, keep
        total = int(lengths.sum())
        kept = np.array([p.whole and n >= world for p, n in zip(pieces, lengths)], bool)

        def feasible() -> bool:
            k, flex = target - int(kept.sum()), total - int(lengths[kept].sum())
            return (k == 0 and flex == 0) or (k >= 1 and flex >= k * world)

        # whole batches that give up their negatives first: short ones, then full ones, the last first
        candidates = sorted(np.flatnonzero(kept), key=lambda i: (lengths[i] >= size, -i))
        while not feasible():
            if not candidates:
                raise ScheduleError(f"{total} ids left cannot fill the {target} steps left of the epoch on "
                                    f"{world} ranks (at least {world} ids a step)")
            kept[candidates.pop(0)] = False
        flex_order = [i for i in range(len(pieces)) if not kept[i] and not pieces[i].whole] + \
                     [i for i in range(len(pieces)) if not kept[i] and pieces[i].whole]
        flex = np.concatenate([pieces[i].rows for i in flex_order]) if flex_order else np.empty(0, np.int64)
        # a demoted batch joins the pooled tails at the end of the plan
        source = np.repeat(np.array([np.inf if pieces[i].whole else pieces[i].key for i in flex_order]),
                           lengths[flex_order])
        out = [(pieces[i].key, 0, i, pieces[i].rows, True) for i in np.flatnonzero(kept)]
        k, lo = target - int(kept.sum()), 0
        for j, n in enumerate(_cut_sizes(len(flex), k, size, world)):
            out.append((float(source[lo]), 1, j, flex[lo : lo + n], False))
            lo += n
        out.sort(key=lambda x: x[:3])
        lengths = np.array([len(x[3]) for x in out], np.int64)
        rows = np.concatenate([x[3] for x in out]) if out else np.empty(0, np.int64)
        keep = np.repeat(np.array([x[4] for x in out], bool), lengths)
        return rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), keep

    @property
    def steps_per_epoch(self) -> int:
        """Steps in the current plan (the rest of the epoch after a mid-epoch swap; see :attr:`epoch_steps`)."""
        return len(self._offsets) - 1

    @property
    def epoch_steps(self) -> int:
        """Steps of every epoch: fixed by the run's first plan and kept by every swap and every new epoch,
        so a step budget of ``epochs * epoch_steps`` trains each id exactly once per epoch."""
        return self._epoch_steps

    @property
    def steps_left(self) -> int:
        return self.steps_per_epoch - self.position

    @property
    def version(self) -> int | None:
        return self.schedule.version

    @property
    def whole_communities(self) -> bool:
        """True when every rank's slice is made of whole K-communities (|B|/K divisible by the world)."""
        k = self.schedule.meta.get("K")
        size = self.schedule.batch_size
        return bool(k) and size % k == 0 and (size // k) % self.world == 0

    def global_batch(self, index: int) -> np.ndarray:
        return self._ids[self._offsets[index] : self._offsets[index + 1]]

    def negative_pool(self, index: int) -> np.ndarray:
        """The global batch's shared hard negatives: unique ids, none of them in the batch."""
        if self._negs is None:
            return np.empty(0, np.int64)
        batch = self.global_batch(index)
        pool = np.unique(self._negs[self._offsets[index] : self._offsets[index + 1]])
        pool = pool[(pool >= 0) & ~np.isin(pool, batch)]
        return pool if len(pool) >= self.world else np.empty(0, np.int64)

    def step(self, index: int | None = None) -> Step:
        """This rank's share of step ``index`` of the current plan (default: the next one)."""
        index = self.position if index is None else index
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"step {index} outside the epoch plan of {self.steps_per_epoch} steps")
        batch = self.global_batch(index)
        lo, hi = split_bounds(len(batch), self.world, self.rank)
        mined = self.mined and self.schedule.negatives is not None
        pool = self.negative_pool(index) if mined else np.empty(0, np.int64)
        nlo, nhi = split_bounds(len(pool), self.world, self.rank)
        return Step(epoch=self.epoch, index=index, ids=batch[lo:hi], negative_ids=pool[nlo:nhi],
                    global_size=len(batch), version=self.version, sizes=rank_sizes(len(batch), self.world),
                    # each rank adds its own members' stored negatives, a count its worker learns
                    negative_sizes=None if self.h_dataset else rank_sizes(len(pool), self.world),
                    with_negatives=mined or self.h_dataset > 0, dataset_negatives=self.h_dataset)

    def __iter__(self):
        """The remaining steps of this epoch's plan, without consuming them (see :meth:`advance`)."""
        for index in range(self.position, self.steps_per_epoch):
            yield self.step(index)

    # -- progress ----------------------------------------------------------------------------------
    def consumed(self) -> np.ndarray:
        """Ids trained on so far this epoch, in order."""
        return np.concatenate([self._before, self._ids[: self._offsets[self.position]]])

    def advance(self) -> None:
        """Mark the current step as trained; the last step of a plan starts the next epoch."""
        self.position += 1
        if self.position >= self.steps_per_epoch:
            self._next_epoch()

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position, self.swaps, self._done = 0, 0, 0
        self._before = np.empty(0, np.int64)
        self._make_plan()

    def _continue_on(self, schedule: Schedule, consumed: np.ndarray, swaps: int, done: int) -> None:
        """Plan the rest of the epoch on ``schedule``: every id not in ``consumed`` (trained in the epoch's
        first ``done`` steps), re-batched into the epoch's steps left."""
        self.schedule, self._before, self.swaps, self._done, self.position = schedule, consumed, swaps, done, 0
        self._make_plan()
        if self.steps_per_epoch == 0:  # nothing left: the swap came exactly at the end of an epoch
            self._next_epoch()

    def check_swap(self, schedule: Schedule) -> None:
        """Refuse (:class:`ScheduleError`) a schedule this run cannot swap to: one not trainable here, one
        of another |B| (the run's step budget, learning-rate schedule and DeepSpeed batch size are built
        for its |B|), or an older version than the one in use."""
        schedule.check_trainable(self.n, self.world)
        if schedule.batch_size != self.schedule.batch_size:
            raise ScheduleError(f"schedule v{schedule.version} has |B|={schedule.batch_size}, this run trains "
                                f"|B|={self.schedule.batch_size}")
        if schedule.version is not None and self.version is not None and schedule.version < self.version:
            raise ScheduleError(f"schedule v{schedule.version} is older than v{self.version}, which is in use")

    def swap(self, schedule: Schedule, step: int | None = None) -> None:
        """Continue the epoch on ``schedule`` (a newer version for the same data and |B|): only the ids not
        yet consumed this epoch are re-batched, with the new schedule's batches, into the same number of
        steps as the epoch had left. ``step``: the global training step, for the history."""
        self.check_swap(schedule)
        self.history.append({"epoch": self.epoch, "position": self.position, "step": step,
                             "from": self.version, "to": schedule.version})
        self._continue_on(schedule, self.consumed(), self.swaps + 1, self._done + self.position)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": self.version, "epoch": self.epoch, "position": self.position, "swaps": self.swaps,
                "seed": self.seed, "n": self.n, "world": self.world, "before": self._before.copy(),
                "consumed": self.consumed(), "history": list(self.history), "done": self._done,
                "epoch_steps": self._epoch_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved position. If the saved schedule version is the one this sampler holds, the plan
        is rebuilt exactly; otherwise the remaining ids are re-batched with this schedule (a swap)."""
        if state["n"] != self.n:
            raise ScheduleError(f"sampler state is for {state['n']} examples, this data has {self.n}")
        if state["seed"] != self.seed:
            raise ScheduleError(f"sampler state was made with seed {state['seed']}, this run uses {self.seed}")
        # The world size may differ: the plan depends on schedule, seed and position (and on the world only
        # through the merge of a tail batch smaller than it); the slicing by rank is redone.
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        consumed = np.asarray(state["consumed"], np.int64)
        legacy = state.get("epoch_steps") is None  # saved before epochs had a fixed number of steps
        if not legacy:
            self._epoch_steps = int(state["epoch_steps"])
        # steps trained this epoch before the saved plan (older states: from the swaps' positions)
        done = int(state["done"]) if "done" in state else \
            sum(int(h["position"]) for h in self.history if h.get("epoch") == self.epoch)
        if state["version"] == self.version and not (legacy and int(state["swaps"])):
            self.swaps = int(state["swaps"])
            self._before = np.asarray(state["before"], np.int64)
            self._done = done
            self._make_plan()
            self.position = int(state["position"])
            if self.position > self.steps_per_epoch or not np.array_equal(self.consumed(), consumed):
                raise ScheduleError(
                    f"schedule version {self.version} does not reproduce the saved sampler position; "
                    "was the schedule file replaced?"
                )
        else:  # the saved version is gone or superseded (or its plan came from an older sampler): re-batch
            self.history.append({"epoch": self.epoch, "position": int(state["position"]), "step": None,
                                 "from": state["version"], "to": self.version})
            self._continue_on(self.schedule, consumed, int(state["swaps"]) + 1, done + int(state["position"]))

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
- **Hot swap** (:meth:`ScheduleSampler.swap`): a new schedule version re-batches only the ids not yet
  consumed in this epoch, along the NEW schedule's batches and communities: its batches are taken in a
  seeded order; within each task (the schedule's ``batch_task``, when it kept tasks apart) a batch none of
  whose members was consumed stays the miner's batch, then come the communities none of whose members was
  consumed (a batch is laid out community by community, runs of K), then the survivors of broken
  communities, cut every |B| (a multiple of K, so whole communities stay in one batch). One task per batch
  survives the swap. B3++ hard negatives are kept only by the miner's own batches: they were drawn for
  exactly those members, while a re-cut batch's pooled rows could hold a new member's top-p neighbour or
  same-text positive, so re-cut batches train on in-batch negatives alone. The epoch ends when every id has
  been seen once, across any number of swaps; the swaps are recorded in :attr:`ScheduleSampler.history`.
- **Resumable**: :meth:`state_dict` holds the schedule version, epoch, position, swap count, the ids consumed
  this epoch and the seed; loading it rebuilds the identical plan (or, if that version is gone, swaps to the
  given schedule) so a resumed run trains the same remaining ids.

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


class ScheduleSampler:
    """Per-rank view of a schedule's epoch plan (see the module docstring).

    Args:
        schedule: a loaded schedule covering ids ``0..n-1`` exactly once.
        n: number of examples in the training split.
        rank, world_size: this process and the number of processes.
        seed: seeds the batch order of every epoch (and of the plans made at swaps).
    """

    def __init__(self, schedule: Schedule, n: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 negatives: str = "mined", h_dataset: int = 0):
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
        self.history: list[dict] = []  # every swap: {"epoch", "position", "step", "from", "to"}
        self._make_plan()

    # -- the plan ----------------------------------------------------------------------------------
    def _make_plan(self) -> None:
        """Epoch plan from ``schedule``, excluding ``_before``: flat ids, offsets, aligned negative rows."""
        sched = self.schedule
        rng = np.random.default_rng([self.seed, self.epoch, self.swaps])
        order = rng.permutation(len(sched.offsets) - 1)
        starts, stops = sched.offsets[order], sched.offsets[order + 1]
        rows = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(order) else \
            np.empty(0, np.int64)
        keep_negatives = None
        if len(self._before):
            rows, offsets, keep_negatives = self._recut(rows, order, stops - starts)
        else:
            offsets = np.concatenate([[0], np.cumsum(stops - starts)])
        self._ids = sched.ids[rows]
        self._negs = None if sched.negatives is None else sched.negatives[rows]  # a copy (fancy indexing)
        merged = _merge_small(offsets.astype(np.int64), self.world)
        if self._negs is not None:
            if keep_negatives is not None:
                self._negs[~keep_negatives] = -1
            for cut in np.setdiff1d(offsets, merged):  # a tail merged into a neighbour: no miner's batch now
                b = np.searchsorted(merged, cut) - 1
                self._negs[merged[b] : merged[b + 1]] = -1
        self._offsets = merged

    def _recut(self, rows: np.ndarray, order: np.ndarray, sizes: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """After a swap: the rows (in plan order) of the ids not consumed yet, cut into batches of |B| within
        each task of the schedule's ``batch_task``; returns the rows in their new order, the batch offsets
        and which rows keep their B3++ negatives.

        Within a task the material goes in this order: the miner's batches none of whose members was
        consumed (each stays one batch, exactly as mined, so its hard negatives are still the ones drawn
        for it: never a member, a member's top-p or a same-text positive), then whole communities, then
        the survivors of broken ones. Batches of whole miner batches come first, re-cut ones after. A re-cut
        batch has no hard negatives: the pool drawn for another set of members may hold a new member's
        likely false negative, and the trainer holds no top-p lists to filter it.
        """
        sched, size = self.schedule, self.schedule.batch_size
        K = int(sched.meta.get("K") or 1)
        consumed = np.zeros(self.n, bool)
        consumed[self._before] = True
        alive = ~consumed[sched.ids[rows]]
        batch_of = np.repeat(np.arange(len(sizes)), sizes)  # plan-order batch of each row
        position = np.arange(len(rows)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        unit = batch_of * (int(sizes.max(initial=1)) // K + 1) + position // K  # its community
        _, inverse, unit_size = np.unique(unit, return_inverse=True, return_counts=True)
        whole_unit = np.bincount(inverse, weights=alive, minlength=len(unit_size)) == unit_size
        whole_unit &= unit_size == K
        whole_batch = (np.bincount(batch_of, weights=alive, minlength=len(sizes)) == sizes) & (sizes == size)
        kind = np.where(whole_batch[batch_of], 0, np.where(whole_unit[inverse], 1, 2))
        task = sched.batch_task[order][batch_of] if sched.batch_task is not None else np.zeros(len(rows), np.int64)
        _, first_seen = np.unique(task, return_index=True)
        group = np.argsort(np.argsort(first_seen))[np.unique(task, return_inverse=True)[1]]  # tasks by first row
        sel = np.flatnonzero(alive)
        sel = sel[np.lexsort((sel, kind[sel], group[sel]))]
        # Cut every |B| within each task: a batch's number = its task's first batch + position // |B|.
        g = group[sel]
        start = np.searchsorted(g, g, side="left")
        chunk = np.cumsum(np.concatenate([[0], np.diff(g) != 0]))  # task ordinal
        chunk = chunk * (len(sel) + 1) + (np.arange(len(sel)) - start) // size
        bounds = np.flatnonzero(np.concatenate([[True], chunk[1:] != chunk[:-1], [True]]))
        pieces = [sel[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        clean = [bool((kind[p] == 0).all()) for p in pieces]  # one whole miner batch
        ranked = sorted(range(len(pieces)), key=lambda i: (not clean[i], i))  # miner's batches first
        pieces, clean = [pieces[i] for i in ranked], [clean[i] for i in ranked]
        new_rows = np.concatenate(pieces) if pieces else np.empty(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
        keep = np.repeat(np.asarray(clean, bool), [len(p) for p in pieces])
        return rows[new_rows], offsets, keep

    @property
    def steps_per_epoch(self) -> int:
        """Steps in the current plan (the full epoch unless a swap happened mid-epoch)."""
        return len(self._offsets) - 1

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
        self.position, self.swaps = 0, 0
        self._before = np.empty(0, np.int64)
        self._make_plan()

    def _continue_on(self, schedule: Schedule, consumed: np.ndarray, swaps: int) -> None:
        """Plan the rest of the epoch on ``schedule``: every id not in ``consumed``, re-batched."""
        self.schedule, self._before, self.swaps, self.position = schedule, consumed, swaps, 0
        self._make_plan()
        if self.steps_per_epoch == 0:  # nothing left: the swap came exactly at the end of an epoch
            self._next_epoch()

    def swap(self, schedule: Schedule, step: int | None = None) -> None:
        """Continue the epoch on ``schedule`` (a newer version for the same data): only the ids not yet
        consumed this epoch are re-batched, with the new schedule's communities. ``step``: the global
        training step, for the history."""
        schedule.check_trainable(self.n, self.world)
        self.history.append({"epoch": self.epoch, "position": self.position, "step": step,
                             "from": self.version, "to": schedule.version})
        self._continue_on(schedule, self.consumed(), self.swaps + 1)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": self.version, "epoch": self.epoch, "position": self.position, "swaps": self.swaps,
                "seed": self.seed, "n": self.n, "world": self.world, "before": self._before.copy(),
                "consumed": self.consumed(), "history": list(self.history)}

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
        if state["version"] == self.version:
            self.swaps = int(state["swaps"])
            self._before = np.asarray(state["before"], np.int64)
            self._make_plan()
            self.position = int(state["position"])
            if self.position > self.steps_per_epoch or not np.array_equal(self.consumed(), consumed):
                raise ScheduleError(
                    f"schedule version {self.version} does not reproduce the saved sampler position; "
                    "was the schedule file replaced?"
                )
        else:  # the saved version is gone or superseded: continue the epoch on this one
            self.history.append({"epoch": self.epoch, "position": int(state["position"]), "step": None,
                                 "from": state["version"], "to": self.version})
            self._continue_on(self.schedule, consumed, int(state["swaps"]) + 1)

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
- **Hot swap** (:meth:`ScheduleSampler.continue_on`, called by :func:`b3stream.refresh.swap.swap`): a new
  schedule version (same |B|, never an older version) re-batches only the ids not yet consumed in this epoch,
  along the NEW schedule's batches and communities, taken in a seeded order (tasks interleave as in an epoch
  plan); which schedules a run may swap to, and how the ids to come are re-cut, is
  :mod:`b3stream.refresh.swap`'s. The swaps are recorded in :attr:`ScheduleSampler.history`.
- **A fixed number of steps per epoch** (:attr:`ScheduleSampler.epoch_steps`): the run's first plan fixes
  it, and every later plan (a swap's, a new epoch's, on any schedule of the same |B|) has exactly the steps
  the epoch has left, so a step budget of ``epochs * epoch_steps`` (the trainer's, and its learning-rate
  schedule's) ends each epoch when every id has been trained.
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
from ..refresh.swap import fit, recut, whole_batches
from ..schedule import Schedule, ScheduleError


@dataclass
class RankBatch:
    """One rank's share of one global batch (of one optimizer step).

    It carries everything a DataLoader worker needs to build the batch (the ids, whether the plan has a
    hard-negative side) and everything the loss needs to know about the other ranks (their row counts), so
    neither a worker's copy of the sampler nor a collective is asked: workers outlive plans, and every rank
    derives every rank's counts from the same plan on the host."""

    epoch: int
    index: int  # position in the epoch plan
    ids: np.ndarray  # this rank's slice of the global batch
    hard_negative_ids: np.ndarray  # this rank's share of the batch's hard-negative pool (may be empty)
    global_size: int  # |B| of this step
    version: int | None  # schedule version the batch came from
    sizes: list[int]  # every rank's number of queries (= positives) this step, in rank order
    # every rank's share of the hard-negative pool, in rank order; None when a rank's count is known only
    # after its worker read its records (dataset negatives: examples store different numbers of them)
    negative_sizes: list[int] | None
    has_negative_side: bool  # the step has a hard-negative side: every rank embeds a (maybe empty) one
    num_dataset_negatives: int = 0  # up to this many of each member's stored negatives join the pool (h_dataset)


def rank_sizes(n: int, world: int) -> list[int]:
    """Every rank's row count when ``n`` rows are cut by :func:`split_bounds`: a pure function of the plan,
    so each host knows all of them without a collective (and without a GPU sync to read one)."""
    return [hi - lo for lo, hi in (split_bounds(n, world, rank) for rank in range(world))]


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
        # which extra negatives a step carries (the TrainConfig choice ``negatives`` and its count h_dataset)
        self.takes_mined = negatives != "dataset"
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
        aligned hard-negative rows. It has exactly :attr:`epoch_steps` minus the steps trained before it (the
        first plan of a run fixes that number); after a swap the ids to come are re-cut
        (:func:`b3stream.refresh.swap.recut`)."""
        sched = self.schedule
        rng = np.random.default_rng([self.seed, self.epoch, self.swaps])
        order = rng.permutation(len(sched.offsets) - 1)
        if len(self._before):
            pieces = recut(sched, order, self._before, self.n)
        else:
            pieces = whole_batches(sched.offsets[order], np.diff(sched.offsets)[order])
        target = None if self._epoch_steps is None else self._epoch_steps - self._done
        rows, offsets, keep = fit(pieces, target, self.world, sched.batch_size)
        if target is not None and len(offsets) - 1 != target:  # the invariant the step budget rests on
            raise RuntimeError(f"the plan has {len(offsets) - 1} steps where the epoch has {target} left; "
                               "this is a bug")
        self._ids = sched.ids[rows]
        # each row's hard negatives (a copy: fancy indexing); a re-cut batch's are dropped (-1)
        self._hard_negatives = None if sched.negative_ids is None else sched.negative_ids[rows]
        if self._hard_negatives is not None:
            self._hard_negatives[~keep] = -1
        self._offsets = offsets
        if self._epoch_steps is None:
            self._epoch_steps = len(offsets) - 1

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
        if self._hard_negatives is None:
            return np.empty(0, np.int64)
        batch = self.global_batch(index)
        pool = np.unique(self._hard_negatives[self._offsets[index] : self._offsets[index + 1]])
        pool = pool[(pool >= 0) & ~np.isin(pool, batch)]
        return pool if len(pool) >= self.world else np.empty(0, np.int64)

    def batch_at(self, index: int | None = None) -> RankBatch:
        """This rank's share of the batch of step ``index`` of the current plan (default: the next one)."""
        index = self.position if index is None else index
        if not 0 <= index < self.steps_per_epoch:
            raise IndexError(f"step {index} outside the epoch plan of {self.steps_per_epoch} steps")
        batch = self.global_batch(index)
        lo, hi = split_bounds(len(batch), self.world, self.rank)
        mined = self.takes_mined and self.schedule.negative_ids is not None
        pool = self.negative_pool(index) if mined else np.empty(0, np.int64)
        nlo, nhi = split_bounds(len(pool), self.world, self.rank)
        return RankBatch(epoch=self.epoch, index=index, ids=batch[lo:hi], hard_negative_ids=pool[nlo:nhi],
                    global_size=len(batch), version=self.version, sizes=rank_sizes(len(batch), self.world),
                    # each rank adds its own members' stored negatives, a count its worker learns
                    negative_sizes=None if self.h_dataset else rank_sizes(len(pool), self.world),
                    has_negative_side=mined or self.h_dataset > 0, num_dataset_negatives=self.h_dataset)

    def __iter__(self):
        """This rank's batches of the remaining steps of this epoch's plan, without consuming them (see
        :meth:`advance`)."""
        for index in range(self.position, self.steps_per_epoch):
            yield self.batch_at(index)

    # -- progress ----------------------------------------------------------------------------------
    def consumed(self) -> np.ndarray:
        """Ids trained on so far this epoch, in order."""
        return np.concatenate([self._before, self._ids[: self._offsets[self.position]]])

    @property
    def steps_done(self) -> int:
        """Steps trained so far this epoch, across its plans."""
        return self._done + self.position

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

    def continue_on(self, schedule: Schedule, consumed: np.ndarray, done: int, swaps: int) -> None:
        """Plan the rest of the epoch on ``schedule``: every id not in ``consumed`` (trained in the epoch's
        first ``done`` steps), re-batched into the epoch's steps left; ``swaps``: the plans of this epoch so
        far (it seeds the new plan's order). A hot swap (:func:`b3stream.refresh.swap.swap`, which checks the
        schedule and records the swap first) and a resume on another version call it."""
        self.schedule, self._before, self.swaps, self._done, self.position = schedule, consumed, swaps, done, 0
        self._make_plan()
        if self.steps_per_epoch == 0:  # nothing left: the swap came exactly at the end of an epoch
            self._next_epoch()

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
            self.continue_on(self.schedule, consumed, done + int(state["position"]), int(state["swaps"]) + 1)

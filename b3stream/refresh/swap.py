"""The swap itself: a running epoch continued on a newer schedule version, each id still once per epoch.

The sampler (:class:`b3stream.train.sampler.ScheduleSampler`) plans an epoch from one schedule and offers one
call to continue it on another (``continue_on``: the ids consumed so far, the steps they took). What a swap
is allowed to be, and how the ids to come are cut into the steps left, is here:

- :func:`check_swap`: the schedules a running epoch may continue on (trainable here, the same |B|, never an
  older version); :func:`swap` checks, records the swap in the sampler's history and continues the epoch.
- :func:`recut`: the new schedule's batches without the ids consumed this epoch. A batch none of whose
  members was consumed stays as mined, where it is, with its hard negatives; refreshed mode's miner batches
  the ids to come apart from those trained at its snapshot, so after a swap these are all of them but those
  that ids trained between the snapshot and the swap broke. The survivors of broken batches are re-cut
  within each task (the schedule's ``batch_task``, when it kept tasks apart): whole K-communities first, then
  fragments, every |B| (a multiple of K, so whole communities stay in one batch), each piece where its first
  batch was; what is left of each task is pooled at the end of the plan and cut every |B|, as the miner
  pools its tails. B3++ hard negatives are kept only by the miner's own batches: they were drawn for exactly
  those members, while a re-cut batch's pooled rows could hold a new member's top-p neighbour or same-text
  positive, so re-cut batches train on in-batch negatives alone.
- :func:`fit`: the pieces in exactly the steps the epoch has left. An epoch's ids are |B| a step but one step,
  and a swap keeps them so (one short step, not one per task), so the pieces fit as they are; only a
  schedule batched otherwise than that (several short batches) makes whole batches give up their hard
  negatives to be re-cut into the steps left. Every plan goes through it, the first of a run too (a tail
  smaller than the world size merges into a neighbour).

Pure functions of the schedule and the ids (no torch, no process group), so every rank makes the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..schedule import Schedule, ScheduleError


def check_swap(sampler, schedule: Schedule) -> None:
    """Refuse (:class:`ScheduleError`) a schedule ``sampler``'s run cannot continue on: one not trainable
    here, one of another |B| (the run's step budget, learning-rate schedule and DeepSpeed batch size are
    built for its |B|), or an older version than the one in use."""
    schedule.check_trainable(sampler.n, sampler.world)
    current = sampler.schedule
    if schedule.batch_size != current.batch_size:
        raise ScheduleError(f"schedule v{schedule.version} has |B|={schedule.batch_size}, this run trains "
                            f"|B|={current.batch_size}")
    if schedule.version is not None and current.version is not None and schedule.version < current.version:
        raise ScheduleError(f"schedule v{schedule.version} is older than v{current.version}, which is in use")


def swap(sampler, schedule: Schedule, step: int | None = None) -> None:
    """Continue ``sampler``'s epoch on ``schedule`` (a newer version for the same data and |B|): only the ids
    not yet consumed this epoch are re-batched, with the new schedule's batches, into the same number of
    steps as the epoch had left. ``step``: the global training step, for the history."""
    check_swap(sampler, schedule)
    sampler.history.append({"epoch": sampler.epoch, "position": sampler.position, "step": step,
                            "from": sampler.version, "to": schedule.version})
    sampler.continue_on(schedule, sampler.consumed(), sampler.steps_done, sampler.swaps + 1)


@dataclass
class Piece:
    """One step of a plan in the making: rows of ``schedule.ids``, whether they are one of the miner's batches
    untouched (and keep its hard negatives), and where in the plan it goes."""

    rows: np.ndarray
    whole: bool
    key: float


def whole_batches(starts: np.ndarray, sizes: np.ndarray) -> list[Piece]:
    """The schedule's batches as they are, in the given order: the plan of an epoch nothing was consumed of."""
    return [Piece(np.arange(a, a + n), True, float(i)) for i, (a, n) in enumerate(zip(starts, sizes))]


def recut(schedule: Schedule, order: np.ndarray, consumed: np.ndarray, n: int) -> list[Piece]:
    """``schedule``'s batches in plan ``order`` as pieces of the plan (rows of ``schedule.ids``), without the
    ``consumed`` ids (of ``0..n-1``; see the module docstring)."""
    starts, sizes = schedule.offsets[order], np.diff(schedule.offsets)[order]
    size, K = schedule.batch_size, int(schedule.meta.get("K") or 1)
    gone = np.zeros(n, bool)
    gone[consumed] = True
    task_of = schedule.batch_task[order] if schedule.batch_task is not None else np.zeros(len(order), np.int64)
    pieces: list[Piece] = []
    survivors: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # task -> [(units, fragments)], plan order
    position = np.full(len(schedule.ids), np.inf)  # a surviving row's batch's place in the plan
    for pos, (a, m) in enumerate(zip(starts, sizes)):
        rows = np.arange(a, a + m)
        alive = ~gone[schedule.ids[rows]]
        if alive.all():
            if m:
                pieces.append(Piece(rows, True, float(pos)))
            continue
        if not alive.any():
            continue
        unit = np.arange(m) // K  # a batch is laid out community by community
        whole_unit = (np.bincount(unit, weights=alive) == K)[unit]
        survivors.setdefault(int(task_of[pos]), []).append((rows[alive & whole_unit], rows[alive & ~whole_unit]))
        position[rows[alive]] = pos
    tails = []
    for task, parts in survivors.items():  # tasks in plan order of their first broken batch
        material = np.concatenate([u for u, _ in parts] + [f for _, f in parts])
        full = len(material) // size * size
        for lo in range(0, full, size):
            piece = material[lo : lo + size]
            pieces.append(Piece(piece, False, float(position[piece].min())))
        tails.append(material[full:])
    pool = np.concatenate(tails) if tails else np.empty(0, np.int64)
    if len(pool) % size:  # one short step in the epoch, not two: a short batch of the miner's joins the pool
        short = [p for p in pieces if p.whole and len(p.rows) < size]
        pieces = [p for p in pieces if not (p.whole and len(p.rows) < size)]
        pool = np.concatenate([pool, *[p.rows for p in short]])
    pieces += [Piece(pool[lo : lo + size], False, np.inf) for lo in range(0, len(pool), size)]
    pieces.sort(key=lambda p: p.key)  # stable: whole batches before re-cut pieces of the same place
    return pieces


def merge_small(offsets: np.ndarray, world: int) -> np.ndarray:
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


def cut_sizes(total: int, k: int, size: int, world: int) -> list[int]:
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


def fit(pieces: list[Piece], target: int | None, world: int, size: int
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, offsets and which rows keep their hard negatives, in exactly ``target`` steps (None: as many
    as the pieces make, the first plan of a run) of at least ``world`` ids each; ``size``: |B|.

    The pieces as they are, a piece smaller than the world size merged into a neighbour, when that gives
    ``target`` steps: always so for the schedule stage's schedules (one short batch, of the ids to come after
    a refresh), since an epoch's steps are then |B| ids but one and :func:`recut` keeps them so. Else (a
    schedule batched otherwise: several short batches, here or in the plans before), as few whole batches as
    needed (the short ones, then the last) give up their hard negatives and join the re-cut material at the
    end of the plan, which is cut into the steps left, every |B| where it can."""
    lengths = np.array([len(p.rows) for p in pieces], np.int64)
    rows = np.concatenate([p.rows for p in pieces]) if pieces else np.empty(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    merged = merge_small(offsets, world)
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
    for j, n in enumerate(cut_sizes(len(flex), k, size, world)):
        out.append((float(source[lo]), 1, j, flex[lo : lo + n], False))
        lo += n
    out.sort(key=lambda x: x[:3])
    lengths = np.array([len(x[3]) for x in out], np.int64)
    rows = np.concatenate([x[3] for x in out]) if out else np.empty(0, np.int64)
    keep = np.repeat(np.array([x[4] for x in out], bool), lengths)
    return rows, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), keep

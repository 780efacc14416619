"""Held-out splits by group, never by row, with no task dominating a split.

Splitting rows at random lets near-duplicates (two functions of one package, two paraphrases of one
question) sit on both sides, which inflates every held-out score. So whole groups go to a split. A plain
hash of the group is not enough either: one large package can then fill most of the test split and every
score measures that one package. Groups are therefore visited in a seeded hash order and taken only while
neither the group nor its task would exceed ``max_share`` of the split's target size.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

from .manifest import DataError


def _order_key(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}\x00{group}".encode()).hexdigest()


def assign_splits(
    groups: list[str],
    tasks: list[str],
    held_out: dict[str, float],
    seed: int = 0,
    max_share: float = 0.2,
) -> list[str]:
    """Return a split name per row: ``"train"`` or one of ``held_out`` (name -> fraction of all rows).

    The share cap applies to tasks when there are at least ``1/max_share`` of them, and to groups when
    at least that many groups are small enough (otherwise it cannot hold). A split may end a little above its target (whole groups), or
    below it when the groups run out; it is an error only if a requested split ends up empty.
    """
    n = len(groups)
    if n != len(tasks):
        raise ValueError("groups and tasks must have the same length")
    check_split_options(held_out, max_share)
    size: Counter = Counter(groups)
    group_tasks: dict[str, Counter] = defaultdict(Counter)
    for g, t in zip(groups, tasks):
        group_tasks[g][t] += 1
    cap_tasks = len(set(tasks)) * max_share >= 1.0

    where: dict[str, str] = {}
    order = sorted(size, key=lambda g: _order_key(seed, g))
    for split, frac in held_out.items():
        if frac <= 0:
            continue
        target = max(1, round(frac * n))
        cap = max_share * target
        # Capping groups only makes sense if enough groups are small enough to fill the split.
        cap_groups = sum(1 for c in size.values() if c <= cap) * max_share >= 1.0
        taken, per_task = 0, Counter()
        for g in order:
            if taken >= target:
                break
            if g in where:
                continue
            if cap_groups and size[g] > cap:
                continue
            if cap_tasks and any(per_task[t] + c > cap for t, c in group_tasks[g].items()):
                continue
            where[g] = split
            taken += size[g]
            per_task.update(group_tasks[g])
        if taken == 0:
            raise DataError(
                f"split {split!r}: no group fits (target {target} rows, at most {cap:.0f} per group/task); "
                "give more groups or a larger fraction"
            )
    return [where.get(g, "train") for g in groups]


def check_split_options(held_out: dict[str, float], max_share: float) -> None:
    """Held-out fractions in [0, 1) leaving rows to train on; ``max_share`` in (0, 1]."""
    for split, frac in held_out.items():
        if not 0.0 <= frac < 1.0:  # also refuses NaN
            raise DataError(f"{split} fraction is {frac}; a held-out fraction must be at least 0 and below 1")
    if sum(held_out.values()) >= 1.0:
        raise DataError(f"held-out fractions {held_out} leave nothing to train on")
    if not 0.0 < max_share <= 1.0:
        raise DataError(f"max_share is {max_share}; it must be above 0 and at most 1")

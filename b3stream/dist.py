"""Process-group helpers shared by the trainer and the miner (ground floor: no DeepSpeed here).

The miner's embed stage scales out under a launcher (``torchrun --nproc_per_node N -m b3stream mine embed``):
each process embeds a contiguous share of the rows, rank 0 does everything else. Training has its own setup
(``b3stream.train.distributed``, through DeepSpeed).
"""

from __future__ import annotations

import datetime
import os


def split_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Contiguous share of ``n`` rows for ``rank``; shares differ by at most one row."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_launcher() -> tuple[int, int]:
    """Join the process group a launcher (torchrun, deepspeed) describes in the environment, if any.

    gloo, so it works on CPU and GPU machines alike: the miner only exchanges barriers and a few integers
    (the embeddings meet in the shared memory-mapped files). A long timeout: a miner rank may wait a long
    time for the next snapshot.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world()
    dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return world()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    import torch
    import torch.distributed as dist

    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.broadcast(t, src=0)
    return int(t.item())


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Process groups, one module for the trainer and the miner.

- The miner's embed stage scales out under a launcher (``torchrun --nproc_per_node N -m b3stream mine embed``,
  and the refresh miner alike): :func:`init_from_launcher` joins a gloo group, each process embeds a
  contiguous share of the rows (:func:`split_bounds`), rank 0 does everything else; the processes exchange
  only barriers and a few integers (:func:`broadcast_int`).
- Training goes through DeepSpeed (:func:`init_distributed`), the same under ``deepspeed``, ``torchrun`` and no
  launcher. Without a launcher (``b3stream train``) the rendezvous variables are set here (rank 0 of 1, a
  free port); otherwise DeepSpeed would go looking for MPI. On CPU, DeepSpeed JIT-compiles a shared-memory
  all-reduce op at every ``init_distributed`` (40-90 s on a fresh machine); it is skipped: gloo does the
  collectives, and a step's all-reduces are tiny. gloo on CPU, NCCL on GPUs.
- At the end of a launched run, :func:`finish` destroys the process group and leaves with ``os._exit``:
  gloo processes otherwise abort now and then at interpreter exit (docs/architecture.md, "Stack notes").

torch and DeepSpeed are imported inside the functions that need them: the data and mining layers import this
module without them.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


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


def local_world_size() -> int:
    """The training processes on this host: ``LOCAL_WORLD_SIZE`` (torchrun) or ``LOCAL_SIZE`` (the
    deepspeed launcher); 1 without a launcher."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


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


def all_max(values: list[int], group=None) -> list[int]:
    """The elementwise maximum of a few integers over the ranks of ``group`` (the default group if None), as
    one all-reduce of a CPU tensor: give it a gloo group. ``values`` as they are on one process (no
    collective). The trainer combines the ranks' stop flags with it (:mod:`b3stream.train.interrupt`)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- training (DeepSpeed) ----------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: "torch.device"
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Rendezvous variables for one process without a launcher (kept if a launcher already set them)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _skip_shm_op() -> None:
    # `deepspeed.comm.torch` as an attribute resolves to the torch package, hence sys.modules.
    import deepspeed.comm.torch  # noqa: F401

    module = sys.modules["deepspeed.comm.torch"]
    module.build_shm_op = lambda *args, **kwargs: None


def init_distributed() -> DistInfo:
    """Start (or join) the process group DeepSpeed will use; returns this process's place in it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        single_process_env()
    import deepspeed
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        _skip_shm_op()
    backend = "nccl" if cuda else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                    local_rank=local_rank, device=device, backend=backend)


def shutdown() -> None:
    """Destroy the process group if one is up (safe to call twice)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def finish(code: int = 0) -> None:
    """End a launched process cleanly: flush, destroy the process group, ``os._exit``."""
    try:
        shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

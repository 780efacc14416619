"""Process-group setup and teardown that work the same under ``deepspeed``, ``torchrun`` and no launcher.

- Without a launcher (``b3stream train``) the rendezvous variables are set here (rank 0 of 1, a free port);
  otherwise DeepSpeed would go looking for MPI.
- On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce op at every ``init_distributed`` (40-90 s on a
  fresh machine). We skip it: gloo does the collectives, and a step's all-reduces are tiny.
- gloo on CPU, NCCL on GPUs.
- At the end of a launched run, :func:`finish` destroys the process group and leaves with ``os._exit``:
  gloo processes otherwise abort now and then at interpreter exit (docs/architecture.md, "Stack notes").
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


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

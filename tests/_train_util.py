"""Helpers shared by the training tests: random schedules, configs, subprocess launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from b3stream.data.manifest import Manifest
from b3stream.schedule import Schedule, publish_schedule

REPO = Path(__file__).resolve().parents[1]


def random_schedule(data: Path, batch_size: int, K: int = 4, h: int = 0, seed: int = 0,
                    folder: Path | None = None, version: int | None = None, split: str = "train") -> Path:
    """A schedule of random communities of K (no mining code involved), published into ``folder``."""
    manifest = Manifest.load(data)
    n = manifest.split(split).n
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n)
    batches = [ids[i:i + batch_size] for i in range(0, n, batch_size)]
    negatives = None
    if h:
        negatives = [rng.integers(0, n, size=(len(b), h)) for b in batches]
    meta = {"strategy": "random", "K": K, "batch_size": batch_size, "h": h, "seed": seed,
            "data": manifest.stamp(split)}
    folder = folder or (Path(data).parent / f"sched_{batch_size}_{h}_{seed}")
    return publish_schedule(Schedule.from_batches(batches, meta, negatives), folder, version)


def write_config(path: Path, **values) -> Path:
    base = {
        "student": {"max_query_length": 32, "max_positive_length": 48, "lora": {"r": 4, "alpha": 8}},
        "lr": 2e-4, "log_every": 1, "num_workers": 0, "eval_split": None, "export": False,
    }
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path.write_text(yaml.safe_dump(base))
    return path


# The temporary directory of every process a test launches, removed when this worker exits: what a launched
# process leaves there is gone with it (torch's elastic agent makes a torchelastic_* folder on every launch
# and never removes it).
_LAUNCH_TMP = tempfile.TemporaryDirectory(prefix="launched-")


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
             TMPDIR=_LAUNCH_TMP.name,
             PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run(args: list[str], timeout: int = 300, threads: int = 1, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env(threads), capture_output=True, text=True, timeout=timeout)


def run_side_by_side(*commands: list[str], timeout: int = 300, threads: int | tuple[int, ...] = 1
                     ) -> list[subprocess.CompletedProcess]:
    """Independent commands at once (a test that waits on single-threaded ones one by one leaves a core idle);
    ``threads``: one count for all, or one per command."""
    from concurrent.futures import ThreadPoolExecutor

    counts = threads if isinstance(threads, tuple) else (threads,) * len(commands)
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda job: run(job[0], timeout=timeout, threads=job[1]), zip(commands, counts)))


def torchrun(nproc: int, module_args: list[str], port: int, timeout: int = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={port}", *module_args], timeout=timeout)


def read_trace(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "trace.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# -- a 2-process gloo group for loss tests (torch.multiprocessing.spawn needs a module-level target) ------


def gather_worker(rank: int, world: int, port: int, tensors: dict, sizes: list[int], neg_sizes: list[int],
                  tau: float, symmetric: bool, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from b3stream.train.loss import InfoNCE

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    nlo, nhi = sum(neg_sizes[:rank]), sum(neg_sizes[: rank + 1])
    q = tensors["q"][lo:hi].clone().requires_grad_()
    d = tensors["d"][lo:hi].clone().requires_grad_()
    n = tensors["n"][nlo:nhi].clone().requires_grad_() if tensors.get("n") is not None else None
    out = InfoNCE(tau, symmetric)(q, d, n)
    out.loss.backward()
    torch.save({"loss": out.global_loss, "accuracy": out.accuracy, "q": q.grad, "d": d.grad,
                "n": None if n is None else n.grad}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def moved_student(cfg, seed: int = 0):
    """A trainable Encoder of ``cfg`` whose trainable weights (a LoRA adapter, or all of them) moved off their
    initialisation, so its embeddings differ from the base model's."""
    import torch

    from b3stream.encoder import Encoder

    torch.manual_seed(seed)
    student = Encoder(cfg, trainable=True)
    with torch.no_grad():
        for p in student.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return student


def write_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (hidden 32) and a word-level tokenizer whose EOS the tokenizer never adds, in ``folder``."""
    sys.path.insert(0, str(REPO / "tools"))
    from bench_rank_memory import write_llama

    return write_llama(folder, hidden=32, layers=2)


REFRESH_STUDENT = {"max_query_length": 32, "max_positive_length": 48, "lora": {"r": 4, "alpha": 8}}


def perturbed_student(lora: bool, seed: int):
    """(config, Encoder) of a refreshed-mode test student whose trainable weights moved off the bundled model's."""
    from b3stream.config import EncoderConfig, LoraConfig

    cfg = EncoderConfig(**{**REFRESH_STUDENT, "lora": LoraConfig(enabled=lora, r=4, alpha=8)})
    return cfg, moved_student(cfg, seed)


def refused_in_process(argv: list[str], capfd) -> tuple[int, str]:
    """(exit code, stderr) of ``b3stream ARGV`` run through the CLI's entry in this process: a refusal that
    needs no launch (the launched command's exit code 2: test_validation.py::test_train_command_exits_2_on_a_
    bad_value). It returns or exits (argparse). ``b3stream train`` sets the rendezvous variables of its
    one-process group (RANK, MASTER_PORT, ...) for itself: they are taken out again, so that nothing later in
    this worker inherits them. ``capfd``: what is written to the file descriptor counts too (a progress bar)."""
    from b3stream.cli import main

    saved = dict(os.environ)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, capfd.readouterr().err

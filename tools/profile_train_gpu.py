"""Where a trainer step's time goes: torch.profiler around a few steps of the real trainer.

    python tools/profile_train_gpu.py --batch-size 32 --out /tmp/prof                 # LoRA r=8, as issue 10
    python tools/profile_train_gpu.py --batch-size 32 --full --out /tmp/prof-full
    python tools/profile_train_gpu.py --batch-size 1024 --grad-cache 64 --out /tmp/prof-gc

It runs ``b3stream.train.loop.train`` unchanged (same data and random schedule as tools/bench_train.py) for
``wait + warmup + active`` steps under ``torch.profiler.profile`` with a step schedule; the profiler steps
at the end of each training step (the trainer's monitor call). Written to ``--out``:

- ``ops_device.txt``: top ops by self device (CUDA) time; ``ops_cpu.txt``: top ops by self CPU time;
- ``trace.json``: the Chrome / Perfetto trace of the active steps (open in https://ui.perfetto.dev);
- ``summary.json`` and the console: wall time per active step, summed GPU kernel time per step, the GPU
  busy share (kernel time / wall time), and per step the host-side waits that stall the CPU: calls of
  ``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize`` and ``cudaMemcpy*``
  (``.item()``, ``.tolist()``, ``.cpu()``, pageable copies), with the ops that issued them.

On a CPU-only machine it runs too (CPU activities only), which checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cudaMemcpyDtoH", "cudaMemcpyHtoD")


def _device_time(evt) -> float:
    """Self device time in us (the attribute was renamed from cuda to device in torch 2.x)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(evt, name, None)
        if value is not None:
            return float(value)
    return 0.0


def main(argv: list[str] | None = None) -> dict:
    import bench_train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--schedule")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--grad-cache", type=int, default=None)
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--max-positive-length", type=int, default=128)
    ap.add_argument("--deepspeed", default="zero0")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--log-every", type=int, default=10, help="the trainer's log_every (its console line)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait", type=int, default=2, help="steps before the profiler starts (default 2)")
    ap.add_argument("--warmup", type=int, default=2, help="profiler warm-up steps, not recorded (default 2)")
    ap.add_argument("--active", type=int, default=5, help="recorded steps (default 5)")
    ap.add_argument("--top", type=int, default=40, help="rows of the op tables")
    ap.add_argument("--out", default="prof", help="output folder (the data is cached there too)")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    import b3stream.train.loop as loop
    from b3stream.config import TrainConfig, load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = args.wait + args.warmup + args.active
    data = bench_train.ensure_data(args, args.batch_size * (total + 1))
    sched = bench_train.ensure_schedule(args, data, args.batch_size)
    spec = bench_train.trainer_config(args, data, sched, out / f"run-{time.time_ns()}", total)
    spec["trace_ids"] = False
    import yaml

    (out / "train.yaml").write_text(yaml.safe_dump(spec))
    cfg = load_config(TrainConfig, out / "train.yaml")

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities, schedule=schedule(wait=args.wait, warmup=args.warmup, active=args.active, repeat=1),
                   record_shapes=True, with_stack=False)
    step_ends: list[float] = []

    class ProfiledMonitor(loop.Monitor):
        """The trainer's monitor, stepping the profiler at the end of every training step."""

        def step(self, step, m, histograms=None):
            super().step(step, m, histograms)
            step_ends.append(time.perf_counter())
            prof.step()

    loop.Monitor = ProfiledMonitor
    with prof:
        loop.train(cfg, progress=False)

    events = prof.key_averages()
    by_device = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                             row_limit=args.top)
    by_cpu = events.table(sort_by="self_cpu_time_total", row_limit=args.top)
    (out / "ops_device.txt").write_text(by_device)
    (out / "ops_cpu.txt").write_text(by_cpu)
    prof.export_chrome_trace(str(out / "trace.json"))

    first = args.wait + args.warmup  # step_ends[i] is the end of step i + 1
    active_wall = step_ends[first + args.active - 1] - step_ends[first - 1] if first >= 1 else None
    kernel_us = sum(_device_time(e) for e in events if getattr(e, "device_type", None) is not None
                    and str(e.device_type).endswith("CUDA"))
    syncs = Counter()
    for e in events:
        if any(e.key.startswith(name) for name in SYNC_CALLS):
            syncs[e.key] += e.count
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch_size": args.batch_size, "lora": not args.full, "grad_cache": args.grad_cache,
        "active_steps": args.active,
        "wall_s_per_step": active_wall / args.active if active_wall else None,
        "gpu_kernel_s_per_step": kernel_us / 1e6 / args.active if cuda else None,
        "gpu_busy_share": (kernel_us / 1e6) / active_wall if cuda and active_wall else None,
        "host_waits_per_step": {k: v / args.active for k, v in syncs.most_common()},
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(by_device)
    print(json.dumps(summary, indent=2))
    os._exit(0)  # gloo / NCCL group up: leave without the exit-time abort (docs/architecture.md)


if __name__ == "__main__":
    main()

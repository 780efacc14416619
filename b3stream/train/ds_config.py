"""DeepSpeed JSON + our TrainConfig -> the dict handed to ``deepspeed.initialize``.

The JSON files in ``ds_configs/`` say *how* to shard (ZeRO stage, buckets, offload); batch size, learning
rate, schedule length, clipping and precision come from the training config only. They appear in the JSON
as ``"auto"`` and are filled in here; a concrete value that disagrees with the training config is an
error rather than a silent second source of truth.

|B| is the global batch: DeepSpeed's ``train_batch_size`` = |B|, one micro-batch of |B| / world per rank
and no gradient accumulation (accumulating would shrink the in-batch negatives; GradCache is how a large
|B| fits in memory instead).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from ..config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def resolve_ds_path(name: str | None) -> Path:
    """A path, or a bare name looked up in ``ds_configs/`` ("zero2" -> ds_configs/zero2.json)."""
    name = name or "zero0"
    path = Path(name)
    if path.is_file():
        return path
    for folder in (DS_CONFIG_DIR, Path.cwd() / "ds_configs"):
        for candidate in (folder / name, folder / f"{name}.json"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"deepspeed config {name!r} not found (give a JSON path or one of "
                      f"{sorted(p.stem for p in DS_CONFIG_DIR.glob('*.json'))})")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on a GPU that supports it, fp32 on CPU (the paper trains in bf16)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if device.type != "cuda" and precision != "fp32":
        raise ConfigError(f"precision {precision} needs a GPU; on CPU train in fp32")
    return precision


def _fill(node: dict, key: str, value, where: str) -> None:
    """Set ``node[key]`` where it is "auto" or absent; refuse a different concrete value."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                   and math.isclose(current, value)):
        raise ConfigError(f"deepspeed config sets {where}.{key} = {current!r} but the training config gives "
                          f"{value!r}; state it only in the training config (use \"auto\" in the JSON)")


def build_ds_config(cfg: TrainConfig, path: Path, world_size: int, batch_size: int, total_steps: int,
                    precision: str) -> dict:
    """The DeepSpeed config for this run (see the module docstring)."""
    try:
        raw = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    ds = copy.deepcopy(raw)
    if batch_size % world_size:
        raise ConfigError(f"|B|={batch_size} does not divide over {world_size} ranks")
    _fill(ds, "train_batch_size", batch_size, "")
    _fill(ds, "train_micro_batch_size_per_gpu", batch_size // world_size, "")
    _fill(ds, "gradient_accumulation_steps", 1, "")
    if ds["gradient_accumulation_steps"] != 1:
        raise ConfigError(f"{path}: gradient_accumulation_steps must be 1 (accumulation shrinks the in-batch "
                          "negatives); use grad_cache_chunk for large batches")
    _fill(ds, "gradient_clipping", float(cfg.grad_clip), "")
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        _fill(section, "enabled", precision == name, name)
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(cfg.lr), "optimizer.params")
        _fill(params, "weight_decay", float(cfg.weight_decay), "optimizer.params")
    sched = ds.get("scheduler")
    if sched is not None:
        params = sched.setdefault("params", {})
        # DeepSpeed's WarmupLR needs >= 1 warmup step (it uses at least 2); without warmup we start the
        # ramp at the full rate, so it is flat, and the linear decay follows.
        warmup = max(1, math.ceil(cfg.warmup_ratio * total_steps))
        _fill(params, "warmup_min_lr", 0.0 if cfg.warmup_ratio > 0 else float(cfg.lr), "scheduler.params")
        _fill(params, "warmup_max_lr", float(cfg.lr), "scheduler.params")
        _fill(params, "warmup_num_steps", warmup, "scheduler.params")
        _fill(params, "total_num_steps", max(total_steps, warmup + 1), "scheduler.params")
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if cfg.grad_cache_chunk is not None and stage > 2:
        raise ConfigError("grad_cache_chunk works with ZeRO stages 0-2 (stage 3 re-gathers parameters per "
                          "recomputed chunk); use zero2 or drop grad_cache_chunk")
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no value to fill for \"auto\" at {', '.join(leftover)}")
    return ds


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))

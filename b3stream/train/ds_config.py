"""DeepSpeed JSON + our TrainConfig -> the dict handed to ``deepspeed.initialize``.

The JSON files in ``ds_configs/`` say *how* to shard (ZeRO stage, buckets, offload); batch size, learning
rate, schedule length, clipping and precision come from the training config only. They appear in the JSON
as ``"auto"`` and are filled in here; a concrete value that disagrees with the training config is an
error rather than a silent second source of truth.

|B| is the global batch: DeepSpeed's ``train_batch_size`` = |B|, one micro-batch of |B| / world per rank
and no gradient accumulation (accumulating would shrink the in-batch negatives; GradCache is how a large
|B| fits in memory instead).

The learning-rate schedule is b3stream's (:func:`lr_schedule`: transformers' linear warmup and decay over the
run's steps, handed to ``deepspeed.initialize`` as a client scheduler, whose state DeepSpeed keeps in its
checkpoints). A JSON that names a ``scheduler`` of its own keeps it: DeepSpeed builds that one, with the
``"auto"`` values of its WarmupLR / WarmupDecayLR filled in here as for every other section.

The finished dict is checked by DeepSpeed's own config parser (:func:`check_with_deepspeed`) before the model
loads, so a misspelled key fails in a second with its name instead of as a traceback after loading.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import math
import warnings
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
                    precision: str, device_type: str = "cpu") -> dict:
    """The DeepSpeed config for this run (see the module docstring). ``device_type``: where the optimizer
    runs ("cuda" turns on torch's fused AdamW unless the JSON says otherwise)."""
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
        # torch's AdamW (torch_adam) updates every tensor in one fused kernel on CUDA instead of a few
        # kernels per tensor; DeepSpeed passes the flag through. An explicit "fused" in the JSON wins.
        if device_type == "cuda" and params.get("torch_adam") and "fused" not in params:
            params["fused"] = True
    _fill_own_scheduler(ds, path, cfg, total_steps)
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no value to fill for \"auto\" at {', '.join(leftover)}")
    check_with_deepspeed(ds, path)
    return ds


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """W, the updates the rate rises over (``warmup_ratio`` of the run's, rounded up)."""
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_schedule(ds: dict, cfg: TrainConfig, total_steps: int):
    """The client scheduler for ``deepspeed.initialize(lr_scheduler=...)``: a callable DeepSpeed gives its
    optimizer; None when the JSON names its own ``scheduler`` (DeepSpeed would drop that one for ours).

    Update k (from 1) uses ``lr * k / W`` while k < W, the peak ``lr`` at update W, then ``lr * (n - k) /
    (n - W)`` with n one past the run's last update, so the last update keeps a rate above 0. A warmup of
    0 or 1 update is none, and the rate is then ``lr`` throughout, without decay. These are, to the bit, the
    rates a JSON's own WarmupDecayLR with ``"auto"`` values gives (:func:`_fill_own_scheduler`; the files in
    ``ds_configs/`` named one until b3stream built its own): tests/test_validation.py checks both against the
    formula.
    """
    if "scheduler" in ds:
        return None
    warmup = warmup_steps(cfg, total_steps)

    def build(optimizer):
        from transformers import get_constant_schedule, get_linear_schedule_with_warmup

        if warmup < 2:
            return get_constant_schedule(optimizer)
        schedule = get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, warmup) + 1)
        # transformers gives update k the factor of step k - 1, 0 for the first update: one step puts it
        # at update 1's (a resume then loads the checkpoint's position over it). Stepping before the
        # optimizer is that skip, which torch warns of.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            schedule.step()
        return schedule

    return build


def _fill_own_scheduler(ds: dict, path: Path, cfg: TrainConfig, total_steps: int) -> None:
    """A JSON's own DeepSpeed WarmupLR / WarmupDecayLR: its ``"auto"`` values from the training config, for
    the rates of :func:`lr_schedule` (:func:`start_lr_schedule` moves it to iteration 1); another scheduler
    is DeepSpeed's or torch's as the JSON gives it."""
    sched = ds.get("scheduler")
    _scheduler_class(sched, path)
    if sched is None or sched.get("type") not in ("WarmupLR", "WarmupDecayLR"):
        return
    params = sched.setdefault("params", {})
    # DeepSpeed warms up over at least 2 iterations; a warmup of 0 or 1 update is none: the ramp then
    # starts at the full rate, so it is flat
    warmup = warmup_steps(cfg, total_steps)
    ramp = warmup >= 2
    _fill(params, "warmup_min_lr", 0.0 if ramp else float(cfg.lr), "scheduler.params")
    _fill(params, "warmup_max_lr", float(cfg.lr), "scheduler.params")
    _fill(params, "warmup_num_steps", warmup if ramp else 2, "scheduler.params")
    if sched["type"] == "WarmupDecayLR":
        _fill(params, "total_num_steps", max(total_steps, params["warmup_num_steps"]) + 1, "scheduler.params")


def start_lr_schedule(scheduler) -> None:
    """Give the optimizer the rate of the next update; call after any resume.

    A JSON's own WarmupLR / WarmupDecayLR gives the first update the rate of iteration -1 (``warmup_min_lr``)
    and the second the rate of iteration 0 (``warmup_min_lr`` again: the ramp is ``iteration / warmup``), so
    with a ramp from 0 the first two updates did nothing: starting at iteration 1 makes update k use iteration
    k. On resume a checkpoint holds the iteration (the position of :func:`lr_schedule`'s) of the next update;
    its rate is applied again rather than trusted to the optimizer state.
    """
    from deepspeed.runtime.lr_schedules import WarmupLR

    if isinstance(scheduler, WarmupLR):
        scheduler.step(max(1, scheduler.last_batch_iteration))
    elif isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr


class _ReadKeys(dict):
    """A dict that records which keys were looked up: the top-level keys DeepSpeed's parser reads."""

    read: set

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_with_deepspeed(ds: dict, path: Path) -> None:
    """Parse ``ds`` with DeepSpeed's ``DeepSpeedConfig``, as ``deepspeed.initialize`` will, and turn what it
    rejects into a :class:`ConfigError` naming the key.

    DeepSpeed's sections (``zero_optimization``, ``bf16``, ...) are pydantic models that forbid unknown keys,
    so DeepSpeed's own field lists decide. DeepSpeed ignores an unknown top-level key, so a misspelled
    section name (``zero_optimisation``) would silently train without it: a top-level key that its parser
    never reads is an error here. The scheduler's parameters are checked against the scheduler class.
    """
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    probe = _ReadKeys(copy.deepcopy(ds))
    probe.read = set()
    # DeepSpeed checks train_batch_size against the world size of its own process group, which may not
    # exist yet; without it, it derives the global batch from the micro batch (build_ds_config checked it).
    probe.pop("train_batch_size", None)
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e, ds)}") from None
    except Exception as e:  # noqa: BLE001 - DeepSpeedConfigError, its assertions on batch sizes, ...
        raise ConfigError(f"{path}: DeepSpeed rejects this config: {e}") from None
    # The recorder only works if DeepSpeed read through it; it certainly reads the micro batch size.
    if "train_micro_batch_size_per_gpu" in probe.read:
        known = probe.read | {"train_batch_size"}
        unknown = sorted(set(ds) - known)
        if unknown:
            hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
            raise ConfigError(f"{path}: unknown DeepSpeed key(s) "
                              + ", ".join(f"{k!r}" + (f" (did you mean {hints[k][0]!r}?)" if hints[k] else "")
                                          for k in unknown))
    if "optimizer" not in ds:
        raise ConfigError(f"{path}: no \"optimizer\" section; training needs one (the files in ds_configs/ "
                          "use {\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\", ...}})")
    _check_scheduler(ds.get("scheduler"), path)


def _check_scheduler(sched: dict | None, path: Path) -> None:
    """The scheduler class DeepSpeed will build, and the parameters it takes (a misspelling is a TypeError
    inside ``deepspeed.initialize`` otherwise)."""
    if sched is None:
        return
    cls = _scheduler_class(sched, path)
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    allowed = sorted(set(parameters) - {"self", "optimizer"})
    unknown = sorted(set(sched.get("params", {})) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(f'scheduler.params.{k}' for k in unknown)} for "
                          f"{sched.get('type')}; it takes {', '.join(allowed)}")


def _scheduler_class(sched: dict | None, path: Path):
    """The class DeepSpeed builds for the "scheduler" section: its own, else one of torch's."""
    if sched is None:
        return None
    from deepspeed.runtime import lr_schedules

    name = sched.get("type")
    cls = getattr(lr_schedules, str(name), None) or getattr(torch.optim.lr_scheduler, str(name), None)
    if not inspect.isclass(cls):
        raise ConfigError(f"{path}: scheduler.type {name!r} is neither a DeepSpeed nor a torch lr scheduler "
                          "(ds_configs/ use \"WarmupDecayLR\")")
    return cls


def _describe(error, ds: dict) -> str:
    """A pydantic error of a DeepSpeed section, with the dotted key it is about."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    models, todo = {}, [DeepSpeedConfigModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            models.setdefault(sub.__name__, sub)
            todo.append(sub)
    lines = []
    for err in error.errors():
        loc = [str(part) for part in err["loc"]]
        # The section is the top-level key whose mapping holds this location.
        sections = [k for k, v in ds.items() if isinstance(v, dict) and _holds(v, err["loc"])]
        key = ".".join(sections[:1] + loc) if sections else f"{error.title}: {'.'.join(loc)}"
        if err["type"] == "extra_forbidden":
            model = models.get(error.title)
            names = sorted(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(loc[-1], names, n=1)
            lines.append(f"unknown DeepSpeed key {key}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def _holds(node, loc) -> bool:
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _walk(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), node


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))

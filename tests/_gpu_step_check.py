"""Whole training steps under CUDA's sync debug mode, for tests/test_gpu.py (a CUDA machine):

    python -m tests._gpu_step_check ARGS.json

``ARGS.json``: ``{"out": FILE, "variants": {name: {config path, ...}}, "warmup": N, "steps": M}``. For each
variant, the real trainer (:class:`b3stream.train.loop.Recipe`, one process) is built from its config and
trains ``warmup`` steps, then ``steps`` more with ``torch.cuda.set_sync_debug_mode("warn")``: the step from
the loader's batch to ``engine.step()`` (the copy of the pinned batch, the forward - plain, GradCache or
fused sides -, InfoNCE, ``engine.backward``, ``engine.step()``), the monitor's record of the step (not a
logging step) and the work between steps (``BetweenSteps.after_step``). Every host wait is recorded with the
Python stack that made it and attributed to the innermost package outside torch (b3stream, deepspeed,
transformers, ...). Writes ``{variant: {"syncs": {owner: count}, "where": {owner: [frames]}, "steps": ...}}``.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
import warnings
from collections import Counter
from pathlib import Path

OWNERS = ("b3stream", "deepspeed", "transformers", "peft", "sentence_transformers", "accelerate")


def owner_of(stack: list[traceback.FrameSummary]) -> tuple[str, str]:
    """(package, "file:line function") of the innermost frame outside torch and the warnings machinery."""
    for frame in reversed(stack):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or path.endswith("warnings.py") or path.endswith("_gpu_step_check.py"):
            continue
        for name in OWNERS:
            if f"/{name}/" in path:
                return name, f"{path.split(f'/{name}/')[-1]}:{frame.lineno} {frame.name}"
        return "other", f"{path}:{frame.lineno} {frame.name}"
    return "torch", "?"


def run_variant(config: str, warmup: int, steps: int) -> dict:
    import torch

    from b3stream.config import TrainConfig, load_config
    from b3stream.train.collate import loader_workers, plan_loader
    from b3stream.train.loop import Recipe, Throughput

    cfg = load_config(TrainConfig, config, [])
    recipe = Recipe(cfg, progress=False)
    recipe.engine.module.train()
    recipe.clock = Throughput(every_step_exact=False)
    loader = plan_loader(recipe.records, recipe.sampler, recipe.encoder.tokenize, loader_workers(cfg.num_workers))
    batches = iter(loader)
    syncs, where = Counter(), {}

    def hook(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message).lower() or threading.current_thread() is not threading.main_thread():
            return  # the loop's thread only (the DataLoader's pin-memory thread is not the step)
        owner, frame = owner_of(traceback.extract_stack()[:-1])
        syncs[owner] += 1
        where.setdefault(owner, [])
        if frame not in where[owner]:
            where[owner].append(frame)

    cuda = torch.cuda.is_available()  # without one (a CPU check of this script) nothing is watched
    for k in range(warmup + steps):
        batch = next(batches)
        watched = cuda and k >= warmup
        if watched:
            torch.cuda.synchronize()
        with warnings.catch_warnings():
            if watched:
                warnings.simplefilter("always")
                warnings.showwarning = hook
                torch.cuda.set_sync_debug_mode("warn")
            try:
                recipe.clock.ready()
                recipe.train_step(batch)
                recipe.between_steps.after_step(recipe.step, epoch_ended=False)
            finally:
                if watched:
                    torch.cuda.set_sync_debug_mode("default")
    loader.close()
    recipe.between_steps.close()
    return {"syncs": dict(syncs), "where": where, "steps": recipe.step, "fuse": recipe.model.fuse_sides,
            "chunk": recipe.cfg.grad_cache_chunk, "stage": recipe.stage, "precision": recipe.precision}


def main(args_path: str) -> None:
    args = json.loads(Path(args_path).read_text())
    results = {}
    for name, config in args["variants"].items():
        try:
            results[name] = run_variant(config, args["warmup"], args["steps"])
        except Exception as e:  # noqa: BLE001 (reported per variant; the test fails on it)
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        Path(args["out"]).write_text(json.dumps(results, indent=2))
    from b3stream.dist import finish

    finish(0)


if __name__ == "__main__":
    main(sys.argv[1])

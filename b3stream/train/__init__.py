"""Training: InfoNCE over the gathered global batch, the schedule-driven sampler, the DeepSpeed recipe.

- ``loss.py``: :class:`InfoNCE` (tau, B3++ hard negatives, symmetric term), :func:`gather` (cross-rank, keeps
  the local slice's gradient), :class:`BatchEmbedder` (one forward per step; GradCache chunks).
- ``sampler.py``: :class:`ScheduleSampler` (per-rank slices, exactly once per epoch, resume, hot swap).
- ``collate.py``: records by id -> prompted, tokenised batches in DataLoader workers.
- ``loop.py``: :class:`Recipe` (setup steps, the loop, one step) behind :func:`train`; ``refreshing.py``: the
  trainer's side of refreshed mode (snapshots, the spawned miner, :class:`StepEnd` between steps);
  ``ds_config.py`` fills ``ds_configs/*.json``; ``export.py``;
  ``distributed.py`` (process group up and down on CPU/gloo and GPU/NCCL).

Entry points: ``b3stream train`` (one process) and ``python -m b3stream.train`` (under torchrun/deepspeed).
Heavy imports (DeepSpeed, transformers) happen inside the modules that need them.
"""

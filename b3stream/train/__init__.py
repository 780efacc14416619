"""Training: InfoNCE over the gathered global batch, the schedule-driven sampler, the DeepSpeed recipe.

- ``loss.py``: :class:`InfoNCE` (tau, B3++ hard negatives, symmetric term), :func:`gather` (cross-rank, keeps
  the local slice's gradient), :class:`BatchEmbedder` (one forward per step; GradCache chunks).
- ``sampler.py``: :class:`ScheduleSampler` (per-rank slices, exactly once per epoch, resume, hot swap).
- ``collate.py``: records by id -> prompted, tokenised batches in DataLoader workers.
- ``loop.py``: :class:`Recipe` (setup steps, the loop, one step) behind :func:`train`; refreshed mode's work
  between steps comes from :mod:`b3stream.refresh.trainer` (``BetweenSteps``); ``monitor.py``: TensorBoard and the
  console line; ``ds_config.py`` fills ``ds_configs/*.json``; ``export.py``; ``checkpoints.py``.
  Process groups: :mod:`b3stream.dist`.

Entry points: ``b3stream train`` (one process) and ``python -m b3stream.train`` (under torchrun/deepspeed).
Heavy imports (DeepSpeed, transformers) happen inside the modules that need them.
"""

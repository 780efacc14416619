"""Training telemetry: TensorBoard under ``RUN/tb`` and a short console line with a progress bar.

Only the main rank writes. Every step goes to TensorBoard; the console gets one line every ``log_every``
steps, e.g.::

    step 40/300 ep 0 | loss 1.234 acc .81 | lr 9.6e-05 gn 0.81 | 61 ex/s (data .01 fb .48 opt .02 s) |
    pos .71 hneg .64 | sched v0 b3

``pos`` is the mean cosine of each query with its positive, ``hneg`` the mean of each query's most similar
negative; a B3 batch should show a high ``hneg`` (that is what mining buys), a random batch a low one.

A step's values may be device tensors (the loss statistics, the gradient norm). Reading one would make the
host wait for the GPU on every step, so the monitor keeps the steps since the last console line and reads
all their tensors in one copy when the next line is due (``log_every``), then writes every buffered step to
TensorBoard: nothing is lost, it only reaches TensorBoard up to ``log_every`` steps late.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class Monitor:
    """TensorBoard writer + progress bar + periodic console line (no-ops when ``enabled`` is False)."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, log_every: int = 10,
                 enabled: bool = True, progress: bool = True):
        self.enabled, self.log_every, self.total = enabled, max(1, log_every), total_steps
        self.writer = None
        self.bar = None
        self._pending: list[tuple[int, dict, float]] = []  # steps not yet written: (step, values, wall time)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
        # A live bar only on a terminal; in log files the periodic lines say the same without the noise.
        if progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc="train")

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def due(self, step: int) -> bool:
        """Whether step ``step`` gets a console line (and so a host read of the buffered values)."""
        return step % self.log_every == 0 or step == self.total

    def step(self, step: int, m: dict, histograms: dict | None = None) -> None:
        """Record step ``step`` (1-based count of optimizer steps done). ``m`` holds the scalars: numbers, or
        0-d tensors read only when the step's line is due (module docstring)."""
        if not self.enabled:
            return
        self._pending.append((step, m, time.time()))  # TensorBoard gets the step's own wall time
        if self.bar is not None:
            self.bar.update(1)
        if self.due(step):
            self.flush()
            if histograms:
                for key, values in histograms.items():
                    self.writer.add_histogram(f"train/{key}", values, step)
            self.write(self.line(step, m))
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {_fmt(m.get('loss'), '.3f')} "
                                         f"{_fmt(m.get('examples_per_s'), '.0f')} ex/s", refresh=False)

    def flush(self) -> None:
        """Read every buffered tensor in one device-to-host copy and write the buffered steps' scalars."""
        if not self._pending:
            return
        slots = [(m, k) for _, m, _ in self._pending for k, v in m.items() if isinstance(v, torch.Tensor)]
        if slots:
            first, key = slots[0]
            device = first[key].device  # a value on another device (a CPU grad norm) joins it: no wait
            values = torch.stack([m[k].detach().float().reshape(()).to(device) for m, k in slots]).tolist()
            for (m, k), value in zip(slots, values):
                m[k] = value
        for step, m, wall in self._pending:
            self.scalars(step, m, group="train", walltime=wall)
        self._pending.clear()

    def line(self, step: int, m: dict) -> str:
        return (
            f"step {step}/{self.total} ep {m.get('epoch', 0)} | loss {_fmt(m.get('loss'), '.3f')} "
            f"acc {_fmt(m.get('accuracy'), '.2f')} | lr {_fmt(m.get('lr'), '.1e')} "
            f"gn {_fmt(m.get('grad_norm'), '.2f')} | {_fmt(m.get('examples_per_s'), '.0f')} ex/s "
            f"(data {_fmt(m.get('time_data'), '.2f')} fb {_fmt(m.get('time_fwd_bwd'), '.2f')} "
            f"opt {_fmt(m.get('time_optimizer'), '.2f')} s) | pos {_fmt(m.get('pos_sim'), '.2f')} "
            f"hneg {_fmt(m.get('hardest_neg_sim'), '.2f')} | sched v{m.get('schedule_version', '?')} "
            f"{m.get('strategy', '?')}"
        )

    def scalars(self, step: int, values: dict, group: str, walltime: float | None = None) -> None:
        """Numbers of ``values`` under ``group/`` in TensorBoard (None values skipped)."""
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, step, walltime=walltime)

    def eval(self, step: int, metrics: dict, split: str) -> None:
        if not self.enabled:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval_{split}/{key}", value, step)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        self.write(f"eval {split} @ step {step}: {shown}")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

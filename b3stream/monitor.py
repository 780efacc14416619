"""Training telemetry: TensorBoard under ``RUN/tb`` and a short console line with a progress bar.

Only the main rank writes. Every step goes to TensorBoard (scalars are cheap); the console gets one line
every ``log_every`` steps, e.g.::

    step 40/300 ep 0 | loss 1.234 acc .81 | lr 9.6e-05 gn 0.81 | 61 ex/s (data .01 fb .48 opt .02 s) |
    pos .71 hneg .64 | sched v0 b3

``pos`` is the mean cosine of each query with its positive, ``hneg`` the mean of each query's most similar
negative; a B3 batch should show a high ``hneg`` (that is what mining buys), a random batch a low one.
"""

from __future__ import annotations

import sys
from pathlib import Path

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

    def step(self, step: int, m: dict, histograms: dict | None = None) -> None:
        """Record step ``step`` (1-based count of optimizer steps done). ``m`` holds the scalars."""
        if not self.enabled:
            return
        self.scalars(step, m, group="train")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {m.get('loss', 0):.3f} {m.get('examples_per_s', 0):.0f} ex/s",
                                     refresh=False)
        if step % self.log_every == 0 or step == self.total:
            if histograms:
                for key, values in histograms.items():
                    self.writer.add_histogram(f"train/{key}", values, step)
            self.write(self.line(step, m))

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

    def scalars(self, step: int, values: dict, group: str) -> None:
        """Numbers of ``values`` under ``group/`` in TensorBoard (None values skipped)."""
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{key}", value, step)

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
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

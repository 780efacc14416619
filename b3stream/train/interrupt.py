"""Ctrl-C (SIGINT) and SIGTERM (how clusters stop and preempt jobs) during training: finish the step, write a
checkpoint, stop.

While the training loop runs, :class:`StopSignals` turns the first of these signals into a flag and nothing
else. At the end of each step the ranks combine their flags in one tiny collective (folded into the schedule
watcher's check where it runs that step, :class:`b3stream.refresh.trainer.BetweenSteps`; none at all on one
process), so every rank stops after the same step, however the signal reached them. The trainer then writes a
checkpoint there and a summary saying it stopped (no final evaluation or export), the refreshed-mode miner is
stopped, and :func:`b3stream.train.loop.train` raises :class:`Interrupted`; the commands print its one line
and exit with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). Running the same command resumes
from that checkpoint.

A second signal before the loop has ended kills the process at once (the signal's default action), and once
the loop has ended the previous handlers are back (the checkpoint is written under them): a second Ctrl-C or
SIGTERM while the checkpoint is written aborts hard, as without this module, and the run resumes from the
checkpoint before (``latest`` is written last).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Within the block, SIGINT and SIGTERM set :attr:`signum` (the first one caught) instead of stopping the
    process; a second one takes the signal's default action at once. The previous handlers are restored on
    leaving the block. Outside the main thread (where Python cannot set handlers) it does nothing."""

    def __init__(self):
        self.signum = 0  # the first signal caught; 0: none
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            return
        signal.signal(signum, signal.SIG_DFL)  # a second signal: stop now, as if none were handled
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(BaseException):
    """Training stopped at a signal after writing a checkpoint (raised by :func:`b3stream.train.loop.train`
    on every rank). A BaseException, like KeyboardInterrupt: a stop asked for is no error. ``code``: the exit
    status a command should end with (128 + the signal's number); ``summary``: what ``RUN/summary.json`` says
    (``completed: false``, ``stopped``)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, resume: bool, summary: dict):
        self.signum, self.step, self.checkpoint, self.resume, self.summary = signum, step, checkpoint, resume, summary
        super().__init__(str(self))

    @property
    def code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        how = "run the same command to resume" if self.resume else "run it again with resume=true to continue"
        return (f"stopped by {signal_name(self.signum)} at step {self.step}; checkpoint written to "
                f"{self.checkpoint}; {how}")

"""Progress reporting for long loops that reads well both on a terminal and in a log file.

On a terminal (or in a notebook) :func:`progress_bar` is a live ``tqdm`` bar. Anywhere else (CI, ``nohup``,
``2> run.log``) a live bar is harmful: it redraws itself with a carriage return several times a second,
and a log file keeps every one of those redraws. There the same call gives a :class:`LogProgress`, which
writes one plain line every ``interval`` seconds and one final line when the loop ends.

Only the part of the ``tqdm`` interface that b3stream uses is provided: iteration, ``update``,
``set_postfix``, ``set_postfix_str``, ``set_description``, ``close`` and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator

from tqdm import tqdm

DEFAULT_INTERVAL = 15.0  # seconds between two status lines in a log


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, file: IO[str] | None = None,
                 interval: float = DEFAULT_INTERVAL, **tqdm_kwargs):
    """A live bar on a terminal, plain status lines every ``interval`` seconds elsewhere.

    Takes the ``tqdm`` arguments b3stream uses; ``tqdm_kwargs`` (e.g. ``leave``) only reach a live bar.
    """
    file = sys.stderr if file is None else file
    if disable:
        return tqdm(iterable, total=total, disable=True)
    if _is_live(file):
        from tqdm.auto import tqdm as auto_tqdm  # a widget in a notebook, a text bar on a terminal

        return auto_tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file, **tqdm_kwargs)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file,
                       interval=interval)


def _is_live(file: IO[str]) -> bool:
    """Whether ``file`` shows a redrawn bar as one line: a terminal, or a Jupyter output stream."""
    if type(file).__module__.startswith("ipykernel"):
        return True
    try:
        return file.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LogProgress:
    """Counts like a ``tqdm`` bar but writes a whole line at most every ``interval`` seconds, and at the end.

    A line reads ``embed: 2048/10000 pair (20%), 0:41 elapsed, 49.9 pair/s, about 2:39 left``; the final one
    ``embed: 10000/10000 pair done in 3:20 (50.0 pair/s)``. Nothing is written for a loop that never ends
    (an exception leaves the bar unclosed), so a failure is followed by its error rather than a "done".
    """

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, file: IO[str] | None = None,
                 interval: float = DEFAULT_INTERVAL):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.file = sys.stderr if file is None else file
        self.interval = interval
        self.postfix = ""
        self._initial = initial  # the rate counts only the work done in this run (a resume starts higher)
        self._start = self._last = time.monotonic()
        self._closed = False

    # -- the tqdm interface -----------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        for item in self.iterable:  # type: ignore[union-attr]
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(self.status(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._write(self.final())

    # -- the lines --------------------------------------------------------------------------------
    def status(self, now: float | None = None) -> str:
        """The periodic line: count, share, elapsed time, rate and (with a total) the time left."""
        elapsed = (time.monotonic() if now is None else now) - self._start
        rate = self._rate(elapsed)
        parts = [f"{self._count()}{self._percent()}", f"{tqdm.format_interval(elapsed)} elapsed"]
        if rate:
            parts.append(f"{self._fmt_rate(rate)} {self.unit}/s")
            if self.total is not None and self.total > self.n:
                parts.append(f"about {tqdm.format_interval((self.total - self.n) / rate)} left")
        return self._line(", ".join(parts))

    def final(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = self._rate(elapsed)
        speed = f" ({self._fmt_rate(rate)} {self.unit}/s)" if rate else ""
        return self._line(f"{self._count()} done in {tqdm.format_interval(elapsed)}{speed}")

    def _count(self) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        return f"{self.n}{of} {self.unit}"

    def _percent(self) -> str:
        return f" ({100 * self.n / self.total:.0f}%)" if self.total else ""

    def _rate(self, elapsed: float) -> float:
        return (self.n - self._initial) / elapsed if elapsed > 0 else 0.0

    @staticmethod
    def _fmt_rate(rate: float) -> str:
        return f"{rate:.1f}" if rate < 1000 else tqdm.format_sizeof(rate)

    def _line(self, body: str) -> str:
        head = f"{self.desc}: " if self.desc else ""
        tail = f" [{self.postfix}]" if self.postfix else ""
        return f"{head}{body}{tail}"

    def _write(self, line: str) -> None:
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except ValueError:  # the stream was closed under us (interpreter exit): progress is not worth a crash
            pass

"""Progress output: a live bar on a terminal, plain lines in a log; argparse errors name the subcommand."""

from __future__ import annotations

import io
import os
import time

import pytest
from tqdm import tqdm

from b3stream.cli import main
from b3stream.data.shards import write_dataset
from b3stream.progress import LogProgress, progress_bar


def test_a_log_gets_a_few_plain_lines_not_bar_redraws():
    log = io.StringIO()  # not a terminal, like a CI log or `2> run.log`
    bar = progress_bar(total=1000, desc="embed", unit="pair", file=log, interval=0.05)
    assert isinstance(bar, LogProgress)
    start = time.monotonic()
    for _ in range(100):
        bar.update(10)
        time.sleep(0.003)
    elapsed = time.monotonic() - start
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 2 <= len(lines) <= elapsed / 0.05 + 2  # a line per interval and the final one, not one per update
    assert all(line.startswith("embed: ") for line in lines)
    assert "/1000 pair (" in lines[0] and "pair/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("embed: 1000/1000 pair done in ")


def test_iterating_and_postfix_in_a_log():
    log = io.StringIO()
    seen = list(progress_bar(range(5), desc="partition", unit="task", file=log))
    assert seen == list(range(5))
    assert log.getvalue() == log.getvalue().splitlines()[0] + "\n"  # short loop: just the final line
    assert log.getvalue().startswith("partition: 5/5 task done in ")
    log = io.StringIO()
    with progress_bar(total=3, desc="codesearch", unit="file", file=log) as bar:
        bar.update(3)
        bar.set_postfix(pairs=17, refresh=False)
    assert log.getvalue().rstrip("\n").endswith("[pairs=17]")


def test_disabled_bar_writes_nothing():
    log = io.StringIO()
    bar = progress_bar(total=10, desc="x", file=log, disable=True)
    bar.update(10)
    bar.close()
    assert log.getvalue() == ""


def test_a_terminal_gets_a_live_bar():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        bar = progress_bar(total=10, desc="embed", file=tty)
        assert isinstance(bar, tqdm) and not bar.disable
        bar.close()
    os.close(master)


def test_writing_shards_logs_plain_lines(tmp_path, capsys):
    rows = [{"query": f"q{i}", "positive": f"p{i}", "task": "t", "group": f"g{i % 20}"} for i in range(100)]
    write_dataset(rows, tmp_path / "ds", name="toy", progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    assert "\r" not in err
    assert err.startswith("writing shards of toy: 100/100 rec done in ")


# -- a wrong flag after a subcommand: that subcommand's usage ---------------------------------------------


@pytest.mark.parametrize("argv, usage, unknown", [
    (["mine", "embed", "--max-positive-length", "128"], "usage: b3stream mine", "--max-positive-length 128"),
    (["prepare", "jsonl", "x.jsonl", "--out", "y", "--bogus"], "usage: b3stream prepare", "--bogus"),
    (["--bogus", "inspect", "x"], "usage: b3stream [-h]", "--bogus"),  # before the command: the top's
])
def test_unknown_flag_shows_the_usage_of_its_command(capsys, argv, usage, unknown):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage)
    assert err.rstrip().endswith(f"error: unrecognized arguments: {unknown}")

"""Shared fixtures: small real datasets written through the real data layer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # `pytest -n 2` (the README's command): each worker gets a core, not both (two workers of two torch
    # threads each on two cores spin against each other). Subprocesses the tests start choose their own.
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Fixtures that train, mine or embed with the real model: a test using one is slow whatever it does itself (the
# others carry @pytest.mark.slow where they train, launch processes or embed a dataset).
SLOW_FIXTURES = {"mined", "refreshed_run", "resumed_run", "code_mined", "toy_mined", "lora_encoder"}


@pytest.fixture(autouse=True)
def _environment_put_back():
    """A command run in the test process (``cli.main(["train", ...])``) sets variables for itself: its
    one-process group's rendezvous (RANK, MASTER_PORT, ...), ``--quiet``'s HF_HUB_DISABLE_PROGRESS_BARS. Left in
    the worker, every later run launched with its environment would inherit them (two on one MASTER_PORT:
    EADDRINUSE). The environment is put back as it was after each test."""
    before = dict(os.environ)
    yield
    if os.environ != before:
        os.environ.clear()
        os.environ.update(before)


def pytest_collection_modifyitems(items):
    cuda = None
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu"):
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_rows(n: int = 400, tasks: int = 3, groups: int = 60) -> list[dict]:
    """Readable synthetic pairs with tasks and groups (for data-layer mechanics, not for quality)."""
    topics = ["sorting", "parsing", "networking", "files", "dates", "math", "strings", "images"]
    return [
        {
            "q": f"how do I handle {topics[i % len(topics)]} case {i}",
            "p": f"def handle_{topics[i % len(topics)]}_{i}(x):\n    return x + {i}\n",
            "task": f"t{i % tasks}",
            "g": f"g{i % groups}",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory) -> Path:
    """A prepared dataset of 400 toy pairs in 3 tasks (fields q/p/task/g), 50 records per shard."""
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import FieldMap

    root = tmp_path_factory.mktemp("toy")
    src = write_jsonl(root / "toy.jsonl", toy_rows())
    out = root / "ds"
    prepare_file(str(src), "jsonl", str(out), FieldMap(query="q", positive="p", task="task", group="g"),
                 samples_per_shard=50, progress=False)
    return out


@pytest.fixture(scope="session")
def code_dataset(tmp_path_factory) -> Path:
    """Real docstring -> code pairs from a few standard-library packages (about 1,200 pairs)."""
    from b3stream.data.prepare import prepare_codesearch

    out = tmp_path_factory.mktemp("code") / "ds"
    prepare_codesearch(str(out), packages=["stdlib"], max_pairs=1200, samples_per_shard=500, progress=False)
    return out

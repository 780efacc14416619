"""tools/bench_quality.py's data: a seeded sample of the code-search pairs (or the multi-task mixture of
tools/mixture.py), prepared through `b3stream prepare jsonl`, and the benchmark's way of running a b3stream
command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _env(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _cli(args, *argv: str, log: Path) -> float:
    """Run `b3stream ARGV` (the real command) with the benchmark's environment; returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-m", "b3stream", *argv], cwd=REPO, env=_env(args), stdout=f,
                             stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise RuntimeError(f"b3stream {' '.join(argv[:3])} ... failed ({res.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    return time.perf_counter() - t0


def mixture_dataset(args, work: Path) -> tuple[Path, Path]:
    """The multi-task mixture (tools/mixture.py, --per-task pairs of each task) prepared twice: with each task's
    instruction prompts, and without any (for b3-noinstr). Split by group, so held-out queries share no word,
    headword, page or package with training."""
    sys.path.insert(0, str(REPO / "tools"))
    import mixture

    root = Path(args.mixture_root or work / "debian")
    if not mixture.package_versions(root):
        print(f"mixture: unpacking the Debian packages into {root}", flush=True)
        mixture.fetch(root)
    pairs = work / f"mixture-{args.per_task}"
    if not (pairs / "sources.json").is_file():
        mixture.build(root, pairs, per_task=args.per_task)
    out = {}
    for name, prompts in (("", ["--prompts", str(pairs / "prompts.yaml")]), ("-noinstr", [])):
        folder = work / f"data-mixture-{args.per_task}-{args.held_out:g}{name}"
        if not (folder / "manifest.json").is_file():
            _cli(args, "prepare", "jsonl", str(pairs / "pairs.jsonl"), "--out", str(folder), "--query-field",
                 "query", "--positive-field", "positive", "--task-field", "task", "--group-field", "group",
                 "--test-fraction", str(args.held_out), "--validation-fraction", str(args.held_out), "--quiet",
                 *prompts, log=work / f"prepare{name}.log")
        out[name] = folder
    return out[""], out["-noinstr"]


def dataset(args, work: Path) -> Path:
    """A random sample (not the first N, which would be a handful of packages) of the installed packages'
    docstring -> code pairs, split by package so held-out queries come from unseen packages."""
    out = work / f"data-{args.pairs}-{args.held_out:g}"
    if (out / "manifest.json").is_file():
        return out
    if args.pairs_file:
        with open(args.pairs_file, encoding="utf-8") as f:
            pairs = [json.loads(line) for line in f if line.strip()]
    else:
        from b3stream.data.codesearch import iter_codesearch_pairs

        pairs = list(iter_codesearch_pairs(progress=False))
    keep = np.sort(np.random.default_rng(0).choice(len(pairs), min(args.pairs, len(pairs)), replace=False))
    src = work / f"pairs-{args.pairs}.jsonl"
    src.write_text("".join(json.dumps({k: pairs[i][k] for k in ("query", "positive", "task", "group")}) + "\n"
                           for i in keep))
    _cli(args, "prepare", "jsonl", str(src), "--out", str(out), "--query-field", "query", "--positive-field",
         "positive", "--task-field", "task", "--group-field", "group", "--test-fraction", str(args.held_out),
         "--validation-fraction", str(args.held_out), "--quiet", log=work / "prepare.log")
    return out

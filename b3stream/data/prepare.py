"""`b3stream prepare`: a source (jsonl / csv / parquet, a Hugging Face dataset folder, or the built-in
code-search corpus) -> shards."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import yaml

from .manifest import DataError, Manifest
from .shards import DEFAULT_HELD_OUT, check_destination, write_dataset
from .sources import FieldMap, read_records
from .splits import check_split_options


def load_prompts(path: str | None, query_prompt: str = "", positive_prompt: str = "") -> dict:
    """Instruction prompts per task (paper section 3.3): ``{task: {"query": ..., "positive": ...}}``.

    A YAML file maps task names (or ``default``) to ``query``/``positive`` prompts; the two strings
    given directly become the ``default`` entry.
    """
    prompts: dict[str, dict[str, str]] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{p}: prompts file does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise DataError(f"{p}: expected a mapping task -> {{query: ..., positive: ...}}")
        for task, entry in loaded.items():
            if not isinstance(entry, dict) or set(entry) - {"query", "positive"}:
                raise DataError(f"{p}: task {task!r} must map to 'query' and/or 'positive' prompts")
            prompts[str(task)] = {k: str(v) for k, v in entry.items()}
    if query_prompt or positive_prompt:
        prompts.setdefault("default", {})
        if query_prompt:
            prompts["default"]["query"] = query_prompt
        if positive_prompt:
            prompts["default"]["positive"] = positive_prompt
    return prompts


def prepare_file(src: str, fmt: str, out: str, fields: FieldMap, hf_split: str | None = None, **kwargs) -> Manifest:
    """Read ``src`` (a ``fmt`` file, or for ``hf`` a ``save_to_disk`` folder / ``.arrow`` file, of which
    ``hf_split`` is read) and write it as a dataset under ``out`` (see :func:`write_dataset`)."""
    _check_options(out, kwargs, source=src)  # before reading a possibly large source
    records, reader = [], read_records(src, fmt, fields, hf_split)
    while True:
        try:
            records.append(next(reader)[1])
        except StopIteration as done:
            fields = done.value  # a positional map (sentence-transformers) resolved to the source's columns
            break
    if not records:
        raise DataError(f"{src}: no records")
    return write_dataset(records, out, name=Path(src).stem, fields=fields.record(), source=str(src), **kwargs)


def prepare_codesearch(out: str, packages: list[str] | None = None, max_pairs: int | None = None,
                       progress: bool = True, **kwargs) -> Manifest:
    from .codesearch import iter_codesearch_pairs

    _check_options(out, kwargs)  # before scanning every installed package
    records = []
    for pair in iter_codesearch_pairs(packages=packages, max_pairs=max_pairs, progress=progress):
        records.append({k: pair[k] for k in ("query", "positive", "task", "group")})
    if not records:
        raise DataError(f"no code-search pairs found for packages {packages}")
    return write_dataset(records, out, name="codesearch", source="python stdlib + site-packages",
                         fields={"query": "docstring summary", "positive": "function code",
                                 "task": "top-level package", "group": "package"},
                         progress=progress, **kwargs)


def _check_options(out: str, kwargs: dict, source: str | None = None) -> None:
    """The checks :func:`write_dataset` makes on its destination and split options, made up front."""
    check_destination(Path(out), kwargs.get("overwrite", False), source=source)
    held_out = kwargs.get("held_out")
    check_split_options(DEFAULT_HELD_OUT if held_out is None else held_out, kwargs.get("max_share", 0.2))


def summary(manifest: Manifest, top: int = 8) -> str:
    """Counts per split and task, for the console."""
    lines = [f"{manifest.name}: N={manifest.N} in {len(manifest.tasks)} task(s), fingerprint "
             f"{manifest.fingerprint[:12]}"]
    for name, s in manifest.splits.items():
        tasks = Counter(s.tasks).most_common(top)
        shown = ", ".join(f"{t} {c} ({c / s.n:.0%})" for t, c in tasks)
        more = f", +{len(s.tasks) - top} more" if len(s.tasks) > top else ""
        lines.append(f"  {name:<10} n={s.n:<7} shards={len(s.shards):<3} groups={s.groups:<5} tasks: {shown}{more}")
        if s.negatives:
            g = s.negatives
            lines.append(f"  {'':<10} stored hard negatives: {g['total']} on {g['examples']} of {s.n} examples "
                         f"({g['min']}-{g['max']} per example; used with `train negatives=dataset|both`)")
    return "\n".join(lines)


def print_summary(manifest: Manifest) -> None:
    print(summary(manifest), file=sys.stdout)

"""Records -> WebDataset tar shards + manifest, with stable dense ids.

Ids are assigned per split in source order after the group split, so the same input gives the same ids and
byte-identical shards (tar members carry mtime 0 and fixed owners). Everything is written under a temporary
folder that is renamed into place only when complete: a failed run leaves no partial dataset behind.
``overwrite`` replaces only an earlier dataset (a folder holding a manifest and its shards, nothing else),
and only once the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

import webdataset as wds

from ..files import sweep_temps, tmp_name
from ..progress import progress_bar
from .manifest import MANIFEST_NAME, DataError, Manifest, ShardInfo, SplitInfo, sha256_file
from .splits import assign_splits, check_split_options

SPLIT_ORDER = ("train", "validation", "test")
DEFAULT_HELD_OUT = {"validation": 0.05, "test": 0.05}


def encode_sample(rec: dict, idx: int) -> tuple[dict, bytes]:
    """The tar members of one record, and the bytes its fingerprint covers."""
    body = {"id": idx, **{k: v for k, v in rec.items() if not k.endswith("_image")}}
    sample = {"__key__": f"{idx:09d}"}
    digest_parts = []
    for side in ("query_image", "positive_image"):
        if side in rec:
            ext = Path(rec[side]).suffix.lstrip(".").lower() or "bin"
            data = Path(rec[side]).read_bytes()
            sample[f"{side}.{ext}"] = data
            body[side] = f"{side}.{ext}"
            digest_parts.append(hashlib.sha256(data).digest())
    payload = json.dumps(body, ensure_ascii=False, sort_keys=True).encode("utf-8")
    sample["json"] = payload
    return sample, payload + b"".join(digest_parts)


def write_dataset(
    records: Iterable[dict],
    out: str | Path,
    name: str,
    held_out: dict[str, float] | None = None,
    samples_per_shard: int = 10_000,
    seed: int = 0,
    max_share: float = 0.2,
    prompts: dict[str, dict[str, str]] | None = None,
    fields: dict | None = None,
    source: str = "",
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Split ``records`` by group, assign ids, write shards and ``manifest.json`` under ``out``.

    ``out`` must not exist, or (with ``overwrite``) be a dataset this function wrote: see
    :func:`check_destination`.
    """
    out = Path(out)
    check_destination(out, overwrite)
    if samples_per_shard < 1:
        raise DataError("samples_per_shard must be at least 1")
    held_out = dict(DEFAULT_HELD_OUT) if held_out is None else held_out
    check_split_options(held_out, max_share)
    records = list(records)
    if not records:
        raise DataError(f"no records to write for {name!r}")
    split_of = assign_splits(
        [r["group"] for r in records], [r["task"] for r in records], held_out, seed=seed, max_share=max_share
    )

    sweep_temps(out.parent, names={out.name})  # an earlier `prepare` of this folder that was killed
    tmp = tmp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    new_parents = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    tmp.mkdir(parents=True)
    try:
        splits = {}
        bar = progress_bar(total=len(records), desc=f"writing shards of {name}", unit="rec",
                           disable=not progress, file=sys.stderr)
        for split in SPLIT_ORDER:
            members = [r for r, s in zip(records, split_of) if s == split]
            if members:
                splits[split] = _write_split(members, tmp, split, samples_per_shard, bar)
        bar.close()
        tasks = Counter(r["task"] for r in records)
        fingerprint = hashlib.sha256(
            "".join(f"{k}:{splits[k].fingerprint};" for k in splits).encode()
        ).hexdigest()
        manifest = Manifest(
            name=name, N=len(records), fingerprint=fingerprint, splits=splits,
            tasks=dict(sorted(tasks.items())), prompts=prompts or {}, fields=fields or {}, source=source,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in new_parents:  # deepest first: folders made for this run go too
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return manifest


def check_destination(out: Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Refuse an ``out`` that writing a dataset would clobber.

    ``--overwrite`` replaces only a folder that holds a b3stream manifest and the shards it lists, nothing
    else: never a folder of other files, nor one holding ``source`` (the file being prepared).
    """
    out = Path(out)
    present = out.exists() or out.is_symlink()
    if present and (out.is_symlink() or not out.is_dir()):
        raise DataError(f"{out}: exists and is not a folder; give --out a new folder or an earlier dataset folder")
    if source is not None and _inside(Path(source), out):
        raise DataError(f"{out}: the source file {source} lies inside it; write the dataset to another folder")
    if not present:
        return
    if not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    manifest = out / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{out}: not a b3stream dataset (no {MANIFEST_NAME}); --overwrite replaces only a "
                        "folder written by `b3stream prepare`; give a new folder or remove this one yourself")
    ours = _listed_files(manifest) | {MANIFEST_NAME}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours or not p.is_file() or p.is_symlink())
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise DataError(f"{out}: holds files the dataset did not write ({shown}); --overwrite replaces only a "
                        "folder that holds nothing but a dataset; move them or give another folder")


def _listed_files(manifest: Path) -> set[str]:
    """Names of the shard files a manifest lists in its own folder (read loosely: any schema version)."""
    try:
        d = json.loads(manifest.read_text())
        urls = [sh["url"] for split in d["splits"].values() for sh in split["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise DataError(f"{manifest}: unreadable manifest ({e!r}); not replacing its folder") from None
    return {u for u in urls if isinstance(u, str) and "/" not in u and "://" not in u}


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is set aside first and removed only after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # put the previous dataset back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_split(members: list[dict], folder: Path, split: str, per_shard: int, bar) -> SplitInfo:
    digest = hashlib.sha256()
    shards: list[ShardInfo] = []
    for start in range(0, len(members), per_shard):
        chunk = members[start : start + per_shard]
        fname = f"{split}-{len(shards):06d}.tar"
        with open(folder / fname, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="b3stream", group="b3stream")
            for offset, rec in enumerate(chunk):
                sample, covered = encode_sample(rec, start + offset)
                writer.write(sample)
                digest.update(covered)
                bar.update(1)
            writer.close()
        shards.append(ShardInfo(url=fname, nsamples=len(chunk), first_id=start,
                                bytes=(folder / fname).stat().st_size, sha256=sha256_file(folder / fname)))
    return SplitInfo(
        n=len(members), fingerprint=digest.hexdigest(), shards=shards,
        tasks=dict(sorted(Counter(r["task"] for r in members).items())),
        groups=len({r["group"] for r in members}),
        negatives=negatives_summary(members),
    )


def negatives_summary(members: list[dict]) -> dict | None:
    """How many stored hard negatives the records carry (None: no record has any)."""
    counts = [len(r.get("negatives") or ()) for r in members]
    if not any(counts):
        return None
    return {"examples": sum(c > 0 for c in counts), "min": min(counts), "max": max(counts), "total": sum(counts)}

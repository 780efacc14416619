"""Records -> WebDataset tar shards + manifest, with stable dense ids.

Ids are assigned per split in source order after the group split, so the same input gives the same ids and
byte-identical shards (tar members carry mtime 0 and fixed owners). Everything is written under a temporary
folder that is renamed into place only when complete: a failed run leaves no partial dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

import webdataset as wds
from tqdm.auto import tqdm

from .manifest import MANIFEST_NAME, DataError, Manifest, ShardInfo, SplitInfo, sha256_file
from .splits import assign_splits

SPLIT_ORDER = ("train", "validation", "test")


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
    """Split ``records`` by group, assign ids, write shards and ``manifest.json`` under ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    if samples_per_shard < 1:
        raise DataError("samples_per_shard must be at least 1")
    records = list(records)
    if not records:
        raise DataError(f"no records to write for {name!r}")
    held_out = {"validation": 0.05, "test": 0.05} if held_out is None else held_out
    split_of = assign_splits(
        [r["group"] for r in records], [r["task"] for r in records], held_out, seed=seed, max_share=max_share
    )

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        splits = {}
        bar = tqdm(total=len(records), desc=f"writing shards of {name}", unit="rec", disable=not progress,
                   file=sys.stderr)
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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
    )

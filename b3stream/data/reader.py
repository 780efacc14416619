"""Reading a prepared split: random access by id (``wids``) and streaming (``webdataset``).

Both paths decode the same tar members into the same record dicts, so the trainer (random access by the
ids a schedule names) and the miner (one streaming pass) see identical data.
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator

from .manifest import DataError, Manifest, sha256_file


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def decode_sample(sample: dict, where: str) -> dict:
    """Tar members of one sample -> the record dict (images as bytes)."""
    # wids hands members over as file-like objects, webdataset as bytes.
    members = {k.lstrip("."): (v.getvalue() if hasattr(v, "getvalue") else v)
               for k, v in sample.items() if not k.startswith("__")}
    if "json" not in members:
        raise DataError(f"{where}: sample {sample.get('__key__')!r} has no json member")
    raw = members["json"]
    try:
        rec = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: sample {sample.get('__key__')!r} has a corrupt json member ({e})") from None
    for side in ("query_image", "positive_image"):
        if side in rec:
            rec[side] = members[rec[side]]
    return rec


class ShardedDataset:
    """One split of a prepared dataset. ``ds[i]`` is the record with id ``i``; ``iter(ds)`` streams all.

    Opening checks that every local shard exists and has the size the manifest recorded (cheap, catches
    truncated copies); :meth:`verify` re-hashes and re-reads everything.
    """

    def __init__(self, root: str | Path, split: str = "train", manifest: Manifest | None = None):
        self.root = Path(root)
        self.manifest = manifest or Manifest.load(self.root)
        self.split = split
        self.info = self.manifest.split(split)
        self.urls = [self._resolve(sh.url) for sh in self.info.shards]
        for sh, url in zip(self.info.shards, self.urls):
            if not _is_url(url):
                p = Path(url)
                if not p.is_file():
                    raise DataError(f"{p}: shard listed in the manifest is missing")
                if p.stat().st_size != sh.bytes:
                    raise DataError(
                        f"{p}: shard is {p.stat().st_size} bytes but the manifest recorded {sh.bytes}; "
                        "it is truncated or was replaced"
                    )
        self._random = None

    def _resolve(self, url: str) -> str:
        if _is_url(url) or Path(url).is_absolute():
            return url
        return str(self.root / url)

    def __len__(self) -> int:
        return self.info.n

    @property
    def stamp(self) -> dict:
        return self.manifest.stamp(self.split)

    # -- random access -----------------------------------------------------------------------------
    def _open_random(self):
        import wids

        shards = [{"url": u, "nsamples": sh.nsamples} for u, sh in zip(self.urls, self.info.shards)]
        local = all(not _is_url(u) for u in self.urls)
        # wids announces every dataset it opens on stderr; that is noise in a training log.
        with contextlib.redirect_stderr(io.StringIO()):
            return wids.ShardListDataset(
                shards, transformations=[], localname=(lambda u: u) if local else None, lru_size=16
            )

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not 0 <= idx < self.info.n:
            raise IndexError(f"id {idx} out of range for split {self.split!r} with {self.info.n} records")
        if self._random is None:
            self._random = self._open_random()
        try:
            sample = self._random[idx]
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DataError(f"split {self.split!r}: cannot read id {idx} ({e})") from None
        rec = decode_sample(sample, sample.get("__shard__", self.split))
        if rec.get("id") != idx:
            raise DataError(f"{sample.get('__shard__')}: position {idx} holds id {rec.get('id')}; shard is corrupt")
        return rec

    def __getstate__(self):  # DataLoader workers open their own handles
        state = dict(self.__dict__)
        state["_random"] = None
        return state

    # -- streaming ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        def raise_named(exn):
            raise DataError(f"split {self.split!r}: cannot stream shards ({exn})") from exn

        # The whole split, in id order, in every process: sharding across ranks or DataLoader workers is
        # the caller's business (schedules hand out ids), so webdataset's node/worker splitting is off.
        stream = wds.WebDataset(self.urls, shardshuffle=False, handler=raise_named, empty_check=False,
                                nodesplitter=None, workersplitter=None)
        for sample in stream:
            yield decode_sample(sample, sample.get("__url__", self.split))

    def column(self, field: str) -> list:
        """One field of every record in id order (one streaming pass)."""
        return [rec[field] for rec in self]

    # -- validation --------------------------------------------------------------------------------
    def verify(self) -> None:
        """Re-hash every shard and check every record: ids dense and in order, counts as the manifest."""
        expected = 0
        for sh, url in zip(self.info.shards, self.urls):
            if not _is_url(url) and sha256_file(url) != sh.sha256:
                raise DataError(f"{url}: checksum differs from the manifest; the shard is corrupt or replaced")
            count = 0
            try:
                with tarfile.open(url, "r") as tar:
                    samples: dict[str, dict] = {}
                    for member in tar:
                        key, _, suffix = member.name.partition(".")
                        data = tar.extractfile(member).read()
                        samples.setdefault(key, {"__key__": key})[suffix] = data
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{url}: corrupt or truncated tar ({e})") from None
            seen = set()
            for key, sample in samples.items():
                rec = decode_sample(sample, url)
                if rec["id"] in seen:
                    raise DataError(f"{url}: duplicate id {rec['id']}")
                seen.add(rec["id"])
                if rec["id"] != expected:
                    raise DataError(f"{url}: record {key!r} has id {rec['id']}, expected {expected}")
                expected += 1
                count += 1
            if count != sh.nsamples:
                raise DataError(f"{url}: holds {count} records but the manifest says {sh.nsamples}")
        if expected != self.info.n:
            raise DataError(f"split {self.split!r}: shards hold {expected} records, manifest says {self.info.n}")

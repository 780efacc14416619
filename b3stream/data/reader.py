"""Reading a prepared split: random access by id (``wids``) and streaming (``webdataset``).

Both paths decode the same tar members into the same record dicts, so the trainer (random access by the
ids a schedule names) and the miner (one streaming pass) see identical data.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from .manifest import DataError, Manifest, ShardInfo, sha256_file


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


# -- what a shard holds: the one definition every reader applies -----------------------------------------
#
# ``encode_sample`` (shards.py) writes each record as members named ``<key>.<suffix>``: the key is the id,
# zero-padded to 9 digits (more for ids of 10^9 and up), and the suffix is ``json`` or ``query_image.<ext>``
# / ``positive_image.<ext>`` with a lower-case extension. Nothing else is a valid member: in particular no
# path separator and no ``..``, which the tar readers would otherwise split into an odd key and a suffix
# and hand on as a record. Every reader path checks names against this (the header scan every open does,
# :meth:`ShardedDataset.verify`, and the decoding of every streamed or random-access sample), so they all
# agree on what a valid shard is.

_KEY_RE = re.compile(r"[0-9]{9,}")
_SUFFIX_RE = re.compile(r"json|(?:query|positive)_image\.[^./\\\x00-\x1f\x7f]+")
IMAGE_SIDES = ("query_image", "positive_image")


def member_name_problem(name: str) -> str | None:
    """Why ``name`` is not a member name the shard writer produces; None when it is one."""
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if ".." in name:
        return "it holds '..'"
    key, _, suffix = name.partition(".")
    if not _KEY_RE.fullmatch(key):
        return "its key is not a zero-padded record id"
    if not _SUFFIX_RE.fullmatch(suffix) or suffix != suffix.lower():
        return "its suffix is not json, query_image.<ext> or positive_image.<ext>"
    return None


def split_member(name: str, where: str) -> tuple[str, str]:
    """``(key, suffix)`` of a valid member name; a DataError naming the shard and the member otherwise."""
    problem = member_name_problem(name)
    if problem is not None:
        raise DataError(f"{where}: member {name!r} is not a valid shard member ({problem}); this shard was not "
                        "written by `b3stream prepare` or was altered since (re-run prepare)")
    key, _, suffix = name.partition(".")
    return key, suffix


def shard_samples(tar: tarfile.TarFile, where: str) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """The samples of an open shard as ``(key, members)``, from the headers alone; refuses what the writer
    never produces: a member that is not a regular file or has an invalid name, a suffix twice in one
    sample, and keys out of order (a key that comes back later would be one sample to one reader and two to
    another)."""
    key, members, last = None, [], -1
    for member in tar:
        if not member.isfile():
            raise DataError(f"{where}: member {member.name!r} is not a regular file; a shard holds only files")
        k, suffix = split_member(member.name, where)
        if k != key:
            if int(k) <= last:
                raise DataError(f"{where}: member {member.name!r} comes after records with higher ids; "
                                "a shard stores its records in id order")
            if members:
                yield key, members
            key, members, last = k, [], int(k)
        if any(m.name.partition(".")[2] == suffix for m in members):
            raise DataError(f"{where}: member {member.name!r} appears twice")
        members.append(member)
    if members:
        yield key, members


def decode_sample(sample: dict, where: str) -> dict:
    """Tar members of one sample -> the record dict (images as bytes).

    ``sample`` is a sample as a tar reader split it (``__key__`` plus one entry per suffix); its key and
    suffixes must make valid member names (:func:`member_name_problem`), whichever reader split them."""
    # wids hands members over as file-like objects (suffixes with their dot), webdataset as bytes.
    members = {k.lstrip("."): (v.getvalue() if hasattr(v, "getvalue") else v)
               for k, v in sample.items() if not k.startswith("__")}
    key = sample.get("__key__")
    for suffix in members:
        split_member(f"{key}.{suffix}", where)
    if "json" not in members:
        raise DataError(f"{where}: sample {key!r} has no json member")
    raw = members["json"]
    try:
        rec = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise DataError(f"{where}: sample {key!r} has a corrupt json member ({e})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: sample {key!r}: its json member is not an object")
    for side in IMAGE_SIDES:
        if side in rec:
            if not isinstance(rec[side], str) or rec[side] not in members or not rec[side].startswith(side):
                raise DataError(f"{where}: sample {key!r} names {side} {rec[side]!r}, which is not one of its members")
            rec[side] = members[rec[side]]
    return rec


# What is known about each local shard file, by path and stat identity: its sample count and, once hashed,
# its sha256. Repeated opens of a split (every mining stage, evaluation) and DataLoader workers forked after the
# first open then cost a stat per shard instead of another read of the whole split.
_FACTS: dict[tuple[str, int, int, int, int], dict] = {}


def shard_facts(path: Path, with_hash: bool) -> dict:
    """``{"samples": n}`` for the tar at ``path``, plus ``"sha256"`` if ``with_hash``; cached per process."""
    st = path.stat()
    # ctime and inode too: a copy that preserves mtime (cp -p, rsync -t) still changes one of them.
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    facts = _FACTS.setdefault(key, {})
    try:
        if "samples" not in facts:
            facts["samples"] = count_samples(path)
        if with_hash and "sha256" not in facts:
            facts["sha256"] = sha256_file(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the shard ({e})") from None
    return facts


def count_samples(path: Path) -> int:
    """Samples in a WebDataset tar, read from the headers alone (:func:`shard_samples`, which also refuses
    a member name the writer does not produce: every open of a split runs this, so no reader gets past it)."""
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed, seekable: member data is skipped, not read
            return sum(1 for _ in shard_samples(tar, str(path)))
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated tar ({e})") from None


def check_shard(path: Path, info: ShardInfo, verify: bool) -> None:
    """Refuse a local shard that is missing or differs from its manifest entry (size, count, hash)."""
    if not path.is_file():
        raise DataError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != info.bytes:
        raise DataError(
            f"{path}: shard is {size} bytes but the manifest recorded {info.bytes}; it is truncated or was replaced"
        )
    facts = shard_facts(path, with_hash=verify)
    if verify and facts["sha256"] != info.sha256:
        raise DataError(
            f"{path}: checksum differs from the manifest; the shard is corrupt or was replaced "
            "(re-run `b3stream prepare`, or copy the shard again)"
        )
    if facts["samples"] != info.nsamples:
        raise DataError(
            f"{path}: holds {facts['samples']} records but the manifest says {info.nsamples}; "
            "the manifest does not belong to these shards"
        )


class ShardedDataset:
    """One split of a prepared dataset. ``ds[i]`` is the record with id ``i``; ``iter(ds)`` streams all.

    Opening checks every local shard against the manifest: it exists, has the recorded size and holds the
    recorded number of samples (a header scan), and, with ``verify`` (the default), its sha256 is the
    recorded one, so a same-size edit inside a record is refused before mining or training reads it. Each
    shard is hashed once per process (:func:`shard_facts`); ``verify=False`` skips the hash for data too
    large to read twice. Remote shards (URLs) are checked as they are read. :meth:`verify` goes further:
    it re-reads every record and checks the ids.
    """

    def __init__(self, root: str | Path, split: str = "train", manifest: Manifest | None = None,
                 verify: bool = True):
        self.root = Path(root)
        self.manifest = manifest or Manifest.load(self.root)
        self.split = split
        self.info = self.manifest.split(split)
        self.urls = [self._resolve(sh.url) for sh in self.info.shards]
        for sh, url in zip(self.info.shards, self.urls):
            if not _is_url(url):
                check_shard(Path(url), sh, verify)
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
        """Hash every shard and check every record: ids dense and in order, counts as the manifest."""
        expected = 0
        for sh, url in zip(self.info.shards, self.urls):
            if not _is_url(url) and shard_facts(Path(url), with_hash=True)["sha256"] != sh.sha256:
                raise DataError(f"{url}: checksum differs from the manifest; the shard is corrupt or replaced")
            count = 0
            try:
                with tarfile.open(url, "r:") as tar:
                    samples = {key: {"__key__": key, **{m.name.partition(".")[2]: tar.extractfile(m).read()
                                                        for m in members}}
                               for key, members in shard_samples(tar, url)}
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{url}: corrupt or truncated tar ({e})") from None
            seen = set()
            for key, sample in samples.items():
                rec_id = decode_sample(sample, url).get("id")
                if not isinstance(rec_id, int) or isinstance(rec_id, bool):
                    raise DataError(f"{url}: record {key!r} has id {rec_id!r}, not an integer")
                if rec_id in seen:
                    raise DataError(f"{url}: duplicate id {rec_id}")
                seen.add(rec_id)
                if rec_id != expected:
                    raise DataError(f"{url}: record {key!r} has id {rec_id!r}, expected {expected}")
                expected += 1
                count += 1
            if count != sh.nsamples:
                raise DataError(f"{url}: holds {count} records but the manifest says {sh.nsamples}")
        if expected != self.info.n:
            raise DataError(f"split {self.split!r}: shards hold {expected} records, manifest says {self.info.n}")

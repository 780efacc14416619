"""The manifest: what a prepared dataset holds, and the fingerprint every later artefact is stamped with.

A prepared dataset is a folder of WebDataset tar shards plus ``manifest.json``. Each split has its own
dense id space ``0..n-1`` (ids are assigned when the shards are written and never change), its own shard
list and its own content fingerprint. Mining artefacts (embeddings, neighbour lists, schedules) are built for
one split and carry ``{"fingerprint", "split", "n"}``; :func:`check_stamp` refuses one built for other data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
    """Bad input data, a corrupt shard or a mismatched artefact; the message names the file and record."""


@dataclass
class ShardInfo:
    url: str  # relative to the dataset folder, or an absolute path / URL
    nsamples: int
    first_id: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    n: int
    fingerprint: str
    shards: list[ShardInfo]
    tasks: dict[str, int]
    groups: int
    # stored hard negatives (``prepare --negatives-field``): {"examples": with at least one, "min", "max",
    # "total"} over the split's records; None when the dataset has none
    negatives: dict | None = None


@dataclass
class Manifest:
    name: str
    N: int
    fingerprint: str
    splits: dict[str, SplitInfo]
    tasks: dict[str, int]
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    fields: dict[str, str | None] = field(default_factory=dict)
    source: str = ""
    schema_version: int = SCHEMA_VERSION

    # -- persistence -----------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        return cls.from_json(json.dumps(d), where)

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "manifest") -> "Manifest":
        """The manifest in ``data`` (JSON), typed field by field (pydantic, strict: a count is an integer,
        a fingerprint a string); :class:`DataError` naming ``where`` for anything else."""
        from pydantic import TypeAdapter, ValidationError

        try:
            d = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, digit limits
            raise DataError(f"{where}: not valid JSON ({e})") from None
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version != SCHEMA_VERSION:
            raise DataError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}; re-run `b3stream prepare`")
        try:
            m = TypeAdapter(cls).validate_json(data, strict=True)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            raise DataError(f"{where}: malformed manifest ({'.'.join(map(str, first['loc']))}: {first['msg']})") \
                from None
        counts = [m.N] + [v for s in m.splits.values() for v in (s.n, s.groups, *s.tasks.values())] + \
            [v for s in m.splits.values() for sh in s.shards for v in (sh.nsamples, sh.first_id, sh.bytes)]
        if not all(0 <= c <= 2**62 for c in counts):
            raise DataError(f"{where}: malformed manifest (a count outside 0..2^62)")
        return m

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            raise DataError(f"{path}: no manifest; is {root} a folder made by `b3stream prepare`?")
        m = cls.from_json(path.read_bytes(), where=str(path))
        total = sum(s.n for s in m.splits.values())
        if total != m.N:
            raise DataError(f"{path}: N={m.N} but the splits hold {total} records")
        for name, s in m.splits.items():
            counted = sum(sh.nsamples for sh in s.shards)
            if counted != s.n:
                raise DataError(f"{path}: split {name!r} has n={s.n} but its shards list {counted} samples")
        return m

    # -- helpers ---------------------------------------------------------------------------------
    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"dataset {self.name!r} has no split {name!r}; it has {sorted(self.splits)}")
        return self.splits[name]

    def stamp(self, split: str) -> dict:
        """What an artefact built from ``split`` records about its input."""
        s = self.split(split)
        return {"dataset": self.name, "split": split, "n": s.n, "fingerprint": s.fingerprint}

    def prompt(self, task: str | None, side: str) -> str:
        """The instruction prompt for ``side`` ("query" or "positive") of ``task`` (paper section 3.3)."""
        for key in (task, "default"):
            if key is not None and key in self.prompts and side in self.prompts[key]:
                return self.prompts[key][side]
        return ""

    def prompted(self, record: dict, side: str) -> str:
        """``record[side]`` behind its task's instruction prompt for that side; a record's own
        ``query_prompt`` (``prepare --query-prompt-field``, FlagEmbedding's ``prompt``) replaces its task's
        query prompt."""
        if side == "query" and record.get("query_prompt"):
            return record["query_prompt"] + record[side]
        return self.prompt(record.get("task"), side) + record[side]


def check_stamp(stamp: dict | None, expected: dict, what: str) -> None:
    """Refuse an artefact whose stamp does not match the data it is used with."""
    if stamp is None:
        raise DataError(f"{what}: carries no data fingerprint; rebuild it with this version of b3stream")
    if stamp.get("fingerprint") != expected.get("fingerprint") or stamp.get("n") != expected.get("n"):
        raise DataError(
            f"{what}: built for data {stamp.get('dataset')!r}/{stamp.get('split')!r} "
            f"(n={stamp.get('n')}, fingerprint {str(stamp.get('fingerprint'))[:12]}) but used with "
            f"{expected.get('dataset')!r}/{expected.get('split')!r} (n={expected.get('n')}, fingerprint "
            f"{str(expected.get('fingerprint'))[:12]}); rebuild it for this data"
        )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

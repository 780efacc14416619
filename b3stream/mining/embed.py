"""Stage 1, embed: the teacher embeds every query x_i and positive y_i (B3 paper, section 3.1).

Output, in ``OUT/embeddings/``:

- ``queries.npy``, ``positives.npy``: float16 ``(N, d)`` ``.npy`` files, row ``i`` is id ``i``, L2-normalised,
  written through :func:`numpy.lib.format.open_memmap` so neither side ever has to fit in memory;
- ``tasks.npy``: int32 ``(N,)`` task index of every id (names in the record);
- ``positive_keys.npy``: int64 ``(N,)`` content key of every id's prompted positive text
  (:mod:`b3stream.data.dedup`): ids sharing a key are never mined as each other's negatives;
- ``known_keys.npy`` + ``known_offsets.npy`` (only for data whose records carry ``known_positives``): int64
  content keys of every id's known positives as a CSR (``KnownKeys``): ids with those texts are never mined as
  its negatives either;
- ``embeddings.json``: the record: data stamp (``Manifest.stamp(split)``), teacher settings, rows done.

Texts get their task's instruction prompt (paper section 3.3, ``manifest.prompt(task, side)``). Rows are
embedded in chunks of ``embed_chunk`` records; after each chunk the memmaps are flushed and ``rows_done``
recorded, so an interrupted run resumes at the first unrecorded chunk (same data and teacher settings), and
the result is the same as an uninterrupted run.

Bring your own: ``--query-embeddings Q.npy --positive-embeddings P.npy`` (e.g. from an API model) are
checked (same shape, finite, non-zero rows), L2-normalised and copied in as float16. With ``--data`` the
rows must match the split's ids; without it the row numbers are the ids, there is one task, and the stamp's
fingerprint is a SHA-256 of the two arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ..progress import progress_bar

from ..config import ConfigError, EncoderConfig, MineConfig
from ..data.manifest import DataError, Manifest, check_stamp, sha256_file
from ..data.dedup import KnownKeys, content_key, known_keys_of
from .artefacts import log, new_token, read_record, remove_outputs, same_params, sweep_temps, tmp_name, write_json

FOLDER = "embeddings"
RECORD = "embeddings.json"
KEYS_FILE = "positive_keys.npy"
KNOWN_FILES = ("known_offsets.npy", "known_keys.npy")  # the CSR of known positives' keys, when there are any
# Everything the stage writes, record first: a stage starting over removes these and nothing else in the folder.
OUTPUTS = (RECORD, "queries.npy", "positives.npy", "tasks.npy", KEYS_FILE, *KNOWN_FILES)
KEY_SCHEME = "blake2b-8 of the prompted positive"  # in the params: embeddings without keys are stale
USER_DATASET = "user-embeddings"


@dataclass
class Embeddings:
    """Teacher embeddings of one split: ``queries[i]`` and ``positives[i]`` belong to id ``i``."""

    queries: np.ndarray  # (N, d) float16 memmap
    positives: np.ndarray  # (N, d) float16 memmap
    tasks: np.ndarray  # (N,) int32
    task_names: list[str]
    stamp: dict
    record: dict
    folder: Path
    keys: np.ndarray | None = None  # (N,) int64 content key of each positive; None: no same-text filtering
    known: KnownKeys | None = None  # keys of each id's known positives; None: the records carry none

    @property
    def n(self) -> int:
        return len(self.queries)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def check_vectors(arr: np.ndarray, what: str, chunk: int = 65536, hasher=None) -> None:
    """Raise :class:`DataError` naming the first row of ``arr`` that is NaN/inf or has (near) zero norm.

    Such rows would silently rank as everyone's neighbour or no one's (cosine of a zero vector is
    undefined), so they are refused rather than mined. Reads ``arr`` chunk by chunk (memmaps welcome);
    ``hasher`` (a hashlib object) is fed the raw bytes on the way.
    """
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise DataError(f"{what}: expected a 2-D (N, d) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what}: expected floating-point embeddings, got dtype {arr.dtype}")
    for start in range(0, len(arr), chunk):
        block = np.asarray(arr[start : start + chunk])
        if hasher is not None:
            hasher.update(np.ascontiguousarray(block).tobytes())
        block = block.astype(np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise DataError(f"{what}: row {row} contains NaN or inf")
        norms = np.linalg.norm(block, axis=1)
        bad = norms < 1e-6
        if bad.any():
            row = start + int(np.flatnonzero(bad)[0])
            raise DataError(f"{what}: row {row} has zero norm; cosine similarity is undefined for it")


def _normalise(block: np.ndarray) -> np.ndarray:
    block = block.astype(np.float32)
    return block / np.linalg.norm(block, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def load_embeddings(folder: str | Path, expect: dict | None = None) -> Embeddings:
    """Open finished embeddings (``OUT/embeddings`` or ``OUT``) read-only; refuse other data's.

    Args:
        folder: the embeddings folder or the mining output folder holding it.
        expect: a data stamp (``Manifest.stamp(split)``); embeddings stamped otherwise raise DataError.
    """
    folder = Path(folder)
    if not (folder / RECORD).is_file() and (folder / FOLDER / RECORD).is_file():
        folder = folder / FOLDER
    record = read_record(folder / RECORD)
    if record is None:
        raise DataError(f"{folder}: no embeddings record ({RECORD}); run `b3stream mine embed` first")
    if not record.get("complete"):
        raise DataError(f"{folder}: embeddings are incomplete ({record.get('rows_done')} of {record.get('n')} "
                        "rows); re-run `b3stream mine embed` to resume")
    if expect is not None:
        check_stamp(record.get("stamp"), expect, f"embeddings {folder}")
    q = np.load(folder / "queries.npy", mmap_mode="r")
    p = np.load(folder / "positives.npy", mmap_mode="r")
    tasks = np.load(folder / "tasks.npy")
    if not (folder / KEYS_FILE).is_file():
        raise DataError(f"{folder}: no positive content keys ({KEYS_FILE}); these embeddings predate them, "
                        "re-run `b3stream mine embed`")
    keys = np.load(folder / KEYS_FILE)
    if q.shape != p.shape or len(tasks) != len(q) or len(keys) != len(q) or len(q) != record["n"]:
        raise DataError(f"{folder}: queries {q.shape}, positives {p.shape}, tasks {tasks.shape} and keys "
                        f"{keys.shape} disagree with the record (n={record['n']})")
    known = None
    if (folder / KNOWN_FILES[0]).is_file():
        known = KnownKeys(np.load(folder / KNOWN_FILES[0]), np.load(folder / KNOWN_FILES[1]))
        o = known.offsets
        if len(o) != len(q) + 1 or o[0] != 0 or (np.diff(o) < 0).any() or o[-1] != len(known.keys):
            raise DataError(f"{folder}: {KNOWN_FILES[0]} and {KNOWN_FILES[1]} do not make one row of known "
                            f"positives per id (n={len(q)}); re-run `b3stream mine embed`")
    return Embeddings(queries=q, positives=p, tasks=tasks, task_names=list(record["task_names"]), keys=keys,
                      stamp=record["stamp"], record=record, folder=folder, known=known)


@dataclass(frozen=True)
class SnapshotModel:
    """A student snapshot to embed with (MineConfig ``student_snapshot``, refreshed mode), as the miner read
    and checked it (:func:`b3stream.refresh.miner.snapshot_model`). Handed to the stage rather than read
    here, so that mining never imports refreshed mode, which sits above it."""

    path: str  # the snapshot folder: what ``student_snapshot`` names
    step: int  # the training step it was taken at
    params: dict  # what the embeddings depend on besides the model: source, weights digest, kind
    verify: Callable[[], None]  # re-hashes its weight files; raises when they no longer match its record
    # what its weights load into: the run's student, once the snapshot's record agrees (raises otherwise)
    encoder: Callable[[], EncoderConfig]
    load: Callable  # (device, dtype) -> the frozen Encoder with the snapshot's weights


def _check_student(cfg: MineConfig, student: SnapshotModel | None) -> None:
    """``student`` must be the snapshot ``cfg.student_snapshot`` names (both or neither)."""
    named = cfg.student_snapshot
    if (named is None) != (student is None) or (student is not None and Path(student.path) != Path(named)):
        raise ConfigError(f"student_snapshot {named!r}: the embed stage embeds with a student snapshot only as "
                          "refreshed mode's miner hands it in (b3stream refresh), the one the setting names")


def expected_stamp(cfg: MineConfig) -> dict | None:
    """The stamp artefacts of this config must carry: the manifest's for ``cfg.data``, else None."""
    if cfg.data is None:
        return None
    return Manifest.load(cfg.data).stamp(cfg.split)


def load_trained_ids(path: str | None, N: int) -> np.ndarray | None:
    """The ids already trained this epoch (``trained_ids``) as a boolean mask over ``0..N-1``; None without."""
    if not path:
        return None
    ids = np.load(path)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise DataError(f"{path}: trained_ids must be a 1-D integer array of example ids, got {ids.dtype} {ids.shape}")
    if len(ids) and (ids.min() < 0 or ids.max() >= N):
        raise DataError(f"{path}: trained_ids holds ids outside 0..{N - 1} (from another dataset?)")
    mask = np.zeros(N, bool)
    mask[ids] = True
    return mask


def _kept_rows(cfg: MineConfig, record: dict | None, params: dict, stamp: dict, n: int) -> dict | None:
    """A mid-epoch refresh embeds only the ids still to come: the rows of the ids already trained this epoch
    (``trained_ids``) are kept from the folder's last complete embedding of the same texts.

    Those rows only matter after the epoch (the trainer skips their ids until then, and the rank stage ranks
    them apart), so re-embedding them would spend most of a late refresh on batches nobody trains soon; the
    first refresh of the next epoch (no id trained yet) embeds every row again. Returns what the record
    says of the kept rows (how many, from which model), or None when every row is embedded."""
    if not cfg.trained_ids or record is None:
        return None
    if record.get("kept") and record.get("trained_ids") == sha256_file(cfg.trained_ids)[:16]:
        return record["kept"]  # resuming this very refresh: its kept rows are still in place
    text = ("pooling", "normalize", "max_query_length", "max_positive_length", "keys", "prompts")
    if not (record.get("complete") and record.get("stamp") == stamp and record.get("n") == n
            and all(record["params"].get(k) == params.get(k) for k in text)):
        return None
    trained = load_trained_ids(cfg.trained_ids, n)
    return {"rows": int(trained.sum()), "source_model": record.get("source_model"),
            "source_step": record.get("source_step")} if trained.any() else None


# --------------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------------


def embed_params(cfg: MineConfig, known_files: dict | None = None, student: SnapshotModel | None = None) -> dict:
    """What the embeddings depend on; a change means re-embedding. A model is identified by the SHA-256 of
    its weight files, not by its path: a teacher folder overwritten in place is a new teacher.
    ``known_files``: the per-file digests of the last record (reused for files of unchanged size and mtime);
    ``student``: the student snapshot a refresh embeds with, instead of the teacher."""
    if cfg.query_embeddings or cfg.positive_embeddings:
        files = {}
        for side, path in (("queries", cfg.query_embeddings), ("positives", cfg.positive_embeddings)):
            st = Path(path).stat() if path and Path(path).is_file() else None
            files[side] = {"path": str(Path(path).resolve()) if path else None,
                           "bytes": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None}
        return {"source": "user", "files": files, "data": cfg.data and str(Path(cfg.data).resolve()),
                "split": cfg.split, "keys": KEY_SCHEME}
    from ..encoder import model_name, resolve_model, settled, weights_digest

    if student is not None:
        student.verify()  # every time: corruption after an earlier embedding must not go unseen
        t = student.encoder()  # the student it must be (cfg.teacher), never what the snapshot says
        source = dict(student.params)
    else:
        t = cfg.teacher
        source = {"source": "teacher"}
    t = settled(t)  # pooling auto / normalize null: as the model folder says
    digest, files = weights_digest(resolve_model(t.model), known_files)
    if t.adapter:  # a teacher with a saved adapter: its weights are part of the model
        source["adapter_sha256"] = weights_digest(t.adapter)[0]
    return {**source, "model": model_name(t), "weights_sha256": digest, "_weight_files": files,
            "pooling": t.pooling, "normalize": t.normalize, "max_query_length": t.max_query_length,
            "max_positive_length": t.max_positive_length, "keys": KEY_SCHEME}


def embed(cfg: MineConfig, progress: bool = True, student: SnapshotModel | None = None) -> Path:
    """Run the embed stage for ``cfg``; returns the embeddings folder. Resumes an interrupted run.
    ``student``: the snapshot ``cfg.student_snapshot`` names, read by the miner (:class:`SnapshotModel`)."""
    if bool(cfg.query_embeddings) != bool(cfg.positive_embeddings):
        raise ConfigError("give both --query-embeddings and --positive-embeddings, or neither")
    _check_student(cfg, student)
    if cfg.query_embeddings:
        return import_embeddings(cfg, progress=progress)
    if cfg.data is None:
        raise ConfigError("embed: give --data (a prepared dataset) or --query-embeddings/--positive-embeddings")
    return embed_with_teacher(cfg, progress=progress, student=student)


def embed_with_teacher(cfg: MineConfig, progress: bool = True, student: SnapshotModel | None = None) -> Path:
    """Embed the split with the teacher (or a student snapshot). Under a launcher (``torchrun
    --nproc_per_node N``, process group joined by the caller) each process embeds a contiguous share of the
    rows into the same memory-mapped files and rank 0 writes the rest; an interrupted multi-process run
    starts over (the single-process run resumes at its last recorded chunk)."""
    from ..data.reader import ShardedDataset
    from ..dist import barrier, split_bounds, world

    rank, size = world()
    if cfg.embed_chunk < 1 or cfg.embed_batch_size < 1:
        raise ConfigError("embed_chunk and embed_batch_size must be positive")
    from ..model_folder import model_prompts, with_model_prompts

    # the teacher's own prompts (a sentence-transformers folder's) where the dataset sets none
    manifest = with_model_prompts(Manifest.load(cfg.data), model_prompts(cfg.teacher))
    ds = ShardedDataset(cfg.data, cfg.split, manifest=manifest, verify=cfg.verify_data)
    stamp, n = ds.stamp, len(ds)
    folder = Path(cfg.out) / FOLDER
    old = read_record(folder / RECORD)
    params = {**embed_params(cfg, (old or {}).get("weight_files"), student), "prompts": manifest.prompts}
    weight_files = params.pop("_weight_files")
    same = old is not None and old.get("stamp") == stamp and same_params({**old, "complete": True}, params)
    if same and old.get("complete"):
        log.info("embed: %s is up to date (%d rows)", folder, n)
        return folder
    start, kept = _starting_point(cfg, folder, old, params, stamp, n, resumable=same and size == 1, rank=rank)
    barrier()  # every rank has read the old record before rank 0 replaces it
    encoder, snapshot = _embedding_model(cfg, rank, size, student)
    if kept and (old or {}).get("dim") != encoder.dim:  # another model width: nothing can be kept
        kept = None
    record = {"stamp": stamp, "params": params, "n": n, "dim": encoder.dim, "rows_done": start, "complete": False,
              "chunk": cfg.embed_chunk, "weight_files": weight_files,
              "source_step": snapshot.step if snapshot is not None else None, "processes": size,
              # the teacher's settings, so that refreshed mode's `model: teacher` re-mines with this teacher
              "teacher": dataclasses.asdict(encoder.cfg) if snapshot is None else None,
              **({"kept": kept, "trained_ids": sha256_file(cfg.trained_ids)[:16]} if kept else {})}
    writer = _RowWriter.open(folder, record, rank, size, fresh=not (start > 0 or kept))
    share_lo, share_hi = split_bounds(n, size, rank)
    keep = load_trained_ids(cfg.trained_ids, n) if kept else None  # rows not to embed

    def to_embed(lo: int, hi: int) -> int:  # rows of ids lo..hi-1 this stage embeds (not kept)
        return max(0, hi - lo) - (int(keep[lo:hi].sum()) if keep is not None and hi > lo else 0)

    bar = progress_bar(total=to_embed(share_lo, share_hi), initial=to_embed(share_lo, min(start, share_hi)),
                       desc="embed", unit="pair", disable=not progress or rank != 0, file=sys.stderr)
    tasks, keys, task_index = np.empty(n, dtype=np.int32), np.empty(n, dtype=np.int64), {}
    known: dict[int, list[int]] = {}  # only the ids that have any (most data has none)
    chunk: list[dict] = []
    for i, rec in enumerate(_in_id_order(ds, cfg, n)):
        tasks[i] = task_index.setdefault(rec.get("task") or "default", len(task_index))
        keys[i] = content_key(manifest.prompted(rec, "positive"))
        if rec.get("known_positives"):
            known[i] = known_keys_of(rec, manifest.prompted)
        if i < start or not share_lo <= i < share_hi or (keep is not None and keep[i]):
            continue  # already embedded by an interrupted run, another process's share, or a kept row
        chunk.append(rec)
        if len(chunk) >= cfg.embed_chunk:
            bar.update(writer.write(chunk, manifest, encoder, cfg.embed_batch_size))
            chunk = []
    if chunk:
        bar.update(writer.write(chunk, manifest, encoder, cfg.embed_batch_size))
    bar.close()
    writer.close()
    barrier()  # every share is on disk
    if rank != 0:
        return folder
    _write_array(folder, "tasks.npy", tasks)
    _write_array(folder, KEYS_FILE, keys)
    _write_known(folder, known, n)
    record.update(complete=True, rows_done=n, task_names=list(task_index), token=new_token(),
                  source_model=params["model"] if snapshot is None else f"student@step{snapshot.step}")
    write_json(folder / RECORD, record)
    log.info("embed: wrote %d x %d teacher embeddings to %s", n, encoder.dim, folder)
    return folder


def _starting_point(cfg: MineConfig, folder: Path, old: dict | None, params: dict, stamp: dict, n: int,
                    resumable: bool, rank: int) -> tuple[int, dict | None]:
    """(first row to embed, the kept rows' record or None): resume an interrupted single-process run of the
    same settings, keep the rows of ids already trained this epoch (:func:`_kept_rows`), or start over (rank
    0 removes the stage's own outputs, never other files in the folder)."""
    files_there = (folder / "queries.npy").is_file() and (folder / "positives.npy").is_file()
    kept = _kept_rows(cfg, old, params, stamp, n) if files_there else None
    start = 0
    if resumable and files_there:
        start = int(old.get("rows_done", 0))
        log.info("embed: resuming at row %d of %d", start, n)
    elif kept:
        log.info("embed: %d of %d rows (ids already trained this epoch) kept from %s", kept["rows"], n,
                 kept["source_model"])
    elif rank == 0:
        remove_outputs(folder, OUTPUTS)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        sweep_temps(folder)
    return start, kept


def placement(device: str | None, rank: int = 0, size: int = 1):
    """(device, dtype) an embedding model runs with: ``device`` (None: the first GPU if any, else the CPU;
    one GPU per process under a launcher), in half precision on a GPU (bf16 where the GPU has it: fp16
    overflows in some decoder LLMs), else fp32 (None)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    dtype = None
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, dtype


def _embedding_model(cfg: MineConfig, rank: int, size: int, student: SnapshotModel | None = None):
    """(encoder, snapshot or None): the teacher, or the student snapshot of a refresh, on this process's
    device; one GPU per process under a launcher. Half precision on a GPU: bf16 where the GPU has it (fp16
    overflows in some decoder LLMs), else fp16."""
    from ..encoder import Encoder

    device, dtype = placement(cfg.device, rank, size)
    if student is not None:
        return student.load(device, dtype), student
    return Encoder(cfg.teacher, trainable=False, device=device, dtype=dtype), None


def _in_id_order(ds, cfg: MineConfig, n: int):
    """The split's records, refusing one that does not stream ids 0, 1, ..., n-1."""
    expected = 0
    for rec in ds:
        if rec["id"] != expected:
            raise DataError(f"{cfg.data}: split {cfg.split!r} streams id {rec['id']} where {expected} was expected")
        expected += 1
        yield rec
    if expected != n:
        raise DataError(f"{cfg.data}: split {cfg.split!r} streamed {expected} records, manifest says {n}")


@dataclass
class _RowWriter:
    """The two float16 memory maps the embed stage fills, and its progress record (single process)."""

    folder: Path
    record: dict
    single: bool
    queries: np.ndarray
    positives: np.ndarray

    @classmethod
    def open(cls, folder: Path, record: dict, rank: int, size: int, fresh: bool) -> "_RowWriter":
        """Rank 0 creates (``fresh``) or reopens the files and writes the record; the other processes open
        them once they exist."""
        from ..dist import barrier

        n, dim = record["n"], record["dim"]
        if rank == 0:
            mode = "w+" if fresh else "r+"
            q = np.lib.format.open_memmap(folder / "queries.npy", mode=mode, dtype=np.float16, shape=(n, dim))
            p = np.lib.format.open_memmap(folder / "positives.npy", mode=mode, dtype=np.float16, shape=(n, dim))
            write_json(folder / RECORD, record)
        barrier()
        if rank != 0:
            q = np.lib.format.open_memmap(folder / "queries.npy", mode="r+")
            p = np.lib.format.open_memmap(folder / "positives.npy", mode="r+")
        if q.shape != (n, dim) or p.shape != (n, dim):
            raise DataError(f"{folder}: existing embedding files have the wrong shape; delete the folder")
        return cls(folder, record, size == 1, q, p)

    def write(self, rows: list[dict], manifest: Manifest, encoder, batch_size: int) -> int:
        """Embed ``rows`` (ascending ids; not contiguous where rows are kept) into their rows; returns how many."""
        ids = np.array([r["id"] for r in rows])
        lo, hi = int(ids[0]), int(ids[-1]) + 1
        for side, out in (("query", self.queries), ("positive", self.positives)):
            vectors = encoder.encode([manifest.prompted(r, side) for r in rows], side=side, batch_size=batch_size)
            check_vectors(vectors, f"teacher {side} embeddings (ids {lo}..{hi - 1})")
            out[ids] = vectors.astype(np.float16)
        # Flush before recording progress: the record must never claim rows that are not on disk.
        self.queries.flush()
        self.positives.flush()
        if self.single:  # several processes fill the rows out of order: no resume point to record
            self.record["rows_done"] = hi
            write_json(self.folder / RECORD, self.record)
        return len(rows)

    def close(self) -> None:
        del self.queries, self.positives


def _write_array(folder: Path, name: str, array: np.ndarray) -> None:
    tmp = tmp_name(folder / name)
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(folder / name)


def import_embeddings(cfg: MineConfig, progress: bool = True, chunk: int = 65536) -> Path:
    """Bring-your-own teacher embeddings: validate, normalise and copy in as float16 (see module doc)."""
    folder = Path(cfg.out) / FOLDER
    paths = {"queries": Path(cfg.query_embeddings), "positives": Path(cfg.positive_embeddings)}
    arrays = {}
    for side, path in paths.items():
        if not path.is_file():
            raise DataError(f"{path}: {side} embeddings file does not exist")
        try:
            arrays[side] = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{path}: not a .npy array ({e})") from None
    q, p = arrays["queries"], arrays["positives"]
    if q.ndim != 2 or q.shape != p.shape:
        raise DataError(f"query embeddings {q.shape} and positive embeddings {p.shape} must be two (N, d) "
                        "arrays of the same shape")
    n, dim = q.shape
    params = embed_params(cfg)
    if cfg.data is not None:
        from ..data.reader import ShardedDataset

        ds = ShardedDataset(cfg.data, cfg.split, verify=cfg.verify_data)
        stamp = ds.stamp
        if n != stamp["n"]:
            raise DataError(f"{paths['queries']}: {n} rows but split {cfg.split!r} of {cfg.data} has "
                            f"{stamp['n']} examples; row i must be id i")
    else:
        ds, stamp = None, None
    record = read_record(folder / RECORD)
    if record is not None and record.get("complete") and same_params(record, params) and \
            (stamp is None or record.get("stamp") == stamp):
        log.info("embed: %s is up to date (imported %d rows)", folder, n)
        return folder

    # Validate everything before writing anything: bad input leaves no partial output.
    hasher = hashlib.sha256()
    check_vectors(q, f"{paths['queries']}", chunk, hasher)
    check_vectors(p, f"{paths['positives']}", chunk, hasher)
    if stamp is None:
        stamp = {"dataset": USER_DATASET, "split": None, "n": n, "fingerprint": hasher.hexdigest()}
    if ds is not None:
        names = [t or "default" for t in ds.column("task")]
        task_names = list(dict.fromkeys(names))
        lookup = {t: i for i, t in enumerate(task_names)}
        tasks = np.array([lookup[t] for t in names], dtype=np.int32)
        keys, known = np.empty(n, dtype=np.int64), {}
        for i, rec in enumerate(ds):
            keys[i] = content_key(ds.manifest.prompted(rec, "positive"))
            if rec.get("known_positives"):
                known[i] = known_keys_of(rec, ds.manifest.prompted)
    else:
        task_names, tasks = ["default"], np.zeros(n, dtype=np.int32)
        keys = None  # no texts: identical positive vectors stand for identical texts (below)
        known = {}

    remove_outputs(folder, OUTPUTS)
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temps(folder)
    bar = progress_bar(total=2 * n, desc="import embeddings", unit="row", disable=not progress, file=sys.stderr)
    for side, src in (("queries", q), ("positives", p)):
        tmp = tmp_name(folder / f"{side}.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        for start in range(0, n, chunk):
            out[start : start + chunk] = _normalise(np.asarray(src[start : start + chunk])).astype(np.float16)
            bar.update(min(chunk, n - start))
        out.flush()
        del out
        tmp.replace(folder / f"{side}.npy")
    bar.close()
    if keys is None:
        stored = np.load(folder / "positives.npy", mmap_mode="r")
        keys = np.concatenate([_row_keys(np.asarray(stored[a : a + chunk])) for a in range(0, n, chunk)])
    _write_array(folder, "tasks.npy", tasks)
    _write_array(folder, KEYS_FILE, keys)
    _write_known(folder, known, n)
    write_json(folder / RECORD, {"stamp": stamp, "params": params, "n": n, "dim": dim, "rows_done": n,
                                 "complete": True, "task_names": task_names, "token": new_token(),
                                 "source_model": f"user:{paths['queries'].name}"})
    log.info("embed: imported %d x %d embeddings into %s", n, dim, folder)
    return folder


def _write_known(folder: Path, known: dict[int, list[int]], n: int) -> None:
    """The known positives' keys (id -> keys, ids without any left out) as a CSR over all ``n`` ids, when any
    id has one; else no such files (stale ones removed)."""
    if not known:
        remove_outputs(folder, KNOWN_FILES)
        return
    csr = KnownKeys.from_rows(n, known)
    _write_array(folder, KNOWN_FILES[1], csr.keys)
    _write_array(folder, KNOWN_FILES[0], csr.offsets)


def _row_keys(block: np.ndarray) -> np.ndarray:
    """Content keys of embedding rows (bring-your-own embeddings without texts): equal rows, equal keys."""
    rows = np.ascontiguousarray(block)
    return np.array([content_key(r.tobytes().hex()) for r in rows], dtype=np.int64)

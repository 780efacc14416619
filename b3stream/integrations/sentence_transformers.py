"""B3 batches inside the sentence-transformers trainer (docs/sentence_transformers.md).

sentence-transformers' ``SentenceTransformerTrainingArguments(batch_sampler=...)`` takes a
``DefaultBatchSampler`` subclass, or a factory the trainer calls as ``factory(dataset, batch_size=...,
drop_last=..., valid_label_columns=..., generator=..., seed=...)``; it calls ``set_epoch(epoch)`` on the
sampler before each epoch's batches are drawn. This module fits b3stream's schedules into that slot:

- :func:`mine_schedule` / :class:`B3Miner`: the schedule mined from a ``datasets.Dataset`` and a
  ``SentenceTransformer`` by b3stream's own mining stages (:func:`b3stream.mining.pipeline.run_all`). The dataset
  is written once as a b3stream prepared dataset (``OUT/data``: ids, the data stamp, same-text keys, stored
  negatives, read as ``prepare --format sentence-transformers`` reads the columns: anchor, positive, then
  negatives, by position), and the model's own embeddings (``model.encode``, the very model the trainer
  trains, whatever its modules) enter the stages through the bring-your-own-embeddings path
  (``MineConfig.query_embeddings`` / ``positive_embeddings`` with ``data``). Rank, partition and schedule are
  the stages ``b3stream mine`` runs; the schedules are published under ``OUT/schedules``.
- :class:`B3BatchSampler`: batches the dataset by such a schedule. Row ``i`` of the dataset is schedule id ``i``;
  the dataset's fingerprint (the one ``prepare`` gives its train split, recomputed from the rows) must match the
  schedule's data stamp, else the schedule is refused. Each epoch's batches are the plan b3stream's static mode
  trains (:class:`b3stream.train.sampler.ScheduleSampler`: the schedule's batches in a permutation seeded by the
  trainer's seed and the epoch), so every row is in exactly one batch per epoch. Under DDP each global batch of
  |B| = per-device batch size x processes is yielded as one contiguous slice per process, in rank order, which
  accelerate's ``BatchSamplerShard`` hands to the ranks one each: every rank sees the same number of batches.
- :class:`B3RemineCallback`: a ``TrainerCallback`` that re-mines from the model being trained at chosen epoch
  starts (``on_epoch_begin``, which the trainer calls before it draws the epoch's batches) and hands the new
  schedule to the sampler, which plans that epoch on it.
- :func:`with_hard_negatives`: B3++ through the dataset's negative columns: a ``b3pp`` schedule's hard
  negatives as text columns, which ``MultipleNegativesRankingLoss`` pools over the batch as B3++ does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback

from ..data.manifest import MANIFEST_NAME, DataError, Manifest, check_stamp
from ..data.shards import encode_sample, write_dataset
from ..data.sources import preset_fields, resolve_positional, to_records
from ..dist import split_bounds, world
from ..schedule import Schedule, ScheduleError, load_schedule
from ..train.sampler import ScheduleSampler

log = logging.getLogger("b3stream.integrations")

FORMAT = "sentence-transformers"  # b3stream's name for this column layout (`prepare --format sentence-transformers`)
DATASET_NAME = "sentence-transformers"  # the prepared dataset's name (the data stamp's `dataset`)
SPLIT = "train"
# Columns sentence-transformers never reads as texts: the trainer's own (multi-dataset) and its label columns
# (base/data_collator.py DEFAULT_LABEL_COLUMNS). A label column means a pair-classification or score loss, not
# (anchor, positive[, negatives]) data: refused. The dataset-name column is added by the trainer: skipped.
TRAINER_COLUMNS = ("dataset_name",)
LABEL_COLUMNS = ("label", "labels", "score", "scores")
# The negative columns with_hard_negatives() adds: mined from the rows, so not part of the rows' fingerprint.
NEGATIVE_PREFIX = "b3_negative_"


# --------------------------------------------------------------------------------------------------
# The dataset as b3stream records, and its fingerprint
# --------------------------------------------------------------------------------------------------


def _columns(dataset) -> dict[str, list]:
    """The dataset's columns as lists, read from its Arrow data (no formatting or transform the trainer may
    have set), in column order, without the trainer's own columns and the mined negatives'
    (:func:`with_hard_negatives`)."""
    plain = dataset.with_format(None) if hasattr(dataset, "with_format") else dataset
    names = [c for c in plain.column_names if c not in TRAINER_COLUMNS and not c.startswith(NEGATIVE_PREFIX)]
    labels = [c for c in names if c in LABEL_COLUMNS]
    if labels:
        raise DataError(f"the training dataset has a {labels[0]!r} column: sentence-transformers takes it for the "
                        "label of a pair-classification or score loss, so these are not (anchor, positive"
                        "[, negatives]) rows that B3 batches; drop the column")
    table = plain.select_columns(names).to_dict() if hasattr(plain, "select_columns") else \
        {c: list(plain[c]) for c in names}
    return {c: table[c] for c in names}


def dataset_records(dataset) -> list[dict]:
    """b3stream records of a sentence-transformers training dataset, row ``i`` -> record (and id) ``i``:
    the columns by position as sentence-transformers reads them (anchor, positive, then negatives: one
    column or several, ``prepare --format sentence-transformers``). Every row must give exactly one example
    (one positive text); a row b3stream cannot read (an empty or non-text cell) is a :class:`DataError`
    naming it."""
    table = _columns(dataset)
    names = list(table)
    fields = resolve_positional(preset_fields(FORMAT), names, "the training dataset")
    records = []
    for i, values in enumerate(zip(*table.values())):
        where = f"training dataset row {i}"
        recs = to_records(dict(zip(names, values)), fields, where, Path("."))
        if len(recs) != 1:
            raise DataError(f"{where}: the positive column {fields.positive!r} holds several texts; "
                            "sentence-transformers reads one positive per row")
        records.append(recs[0])
    if not records:
        raise DataError("the training dataset has no rows")
    return records


def records_fingerprint(records: Sequence[dict]) -> str:
    """The content fingerprint ``b3stream prepare`` gives a split of these records in this order (the digest
    :func:`b3stream.data.shards.write_dataset` takes over each record's stored bytes, ids 0..n-1)."""
    digest = hashlib.sha256()
    for i, rec in enumerate(records):
        digest.update(encode_sample(rec, i)[1])
    return digest.hexdigest()


def dataset_stamp(dataset, records: Sequence[dict] | None = None) -> dict:
    """The data stamp (``Manifest.stamp``) a schedule mined from ``dataset`` carries: n and the fingerprint of
    the train split that :func:`prepare_dataset` writes."""
    records = dataset_records(dataset) if records is None else records
    return {"dataset": DATASET_NAME, "split": SPLIT, "n": len(records), "fingerprint": records_fingerprint(records)}


def prepare_dataset(dataset, folder: str | Path, records: Sequence[dict] | None = None,
                    progress: bool = False) -> Manifest:
    """``dataset`` written as a b3stream prepared dataset in ``folder`` (one ``train`` split, ids in row order,
    nothing held out), or the one already there when it holds the same rows. A folder holding another
    prepared dataset is replaced; one holding anything else is refused (:func:`write_dataset`)."""
    folder = Path(folder)
    records = dataset_records(dataset) if records is None else list(records)
    stamp = dataset_stamp(dataset, records)
    if (folder / MANIFEST_NAME).is_file():
        try:
            old = Manifest.load(folder)
            if SPLIT in old.splits and len(old.splits) == 1 and old.stamp(SPLIT)["fingerprint"] == stamp["fingerprint"] \
                    and old.stamp(SPLIT)["n"] == stamp["n"]:
                return old
        except DataError:
            pass  # unreadable: written anew below
    fields = resolve_positional(preset_fields(FORMAT), list(_columns(dataset)), "the training dataset")
    manifest = write_dataset(records, folder, name=DATASET_NAME, held_out={}, overwrite=True, progress=progress,
                             fields=fields.record(), source="a sentence-transformers training dataset")
    if manifest.stamp(SPLIT)["fingerprint"] != stamp["fingerprint"]:  # the two digests must be one definition
        raise RuntimeError("the prepared dataset's fingerprint differs from the rows' fingerprint; this is a bug")
    return manifest


# --------------------------------------------------------------------------------------------------
# Mining: b3stream's stages, fed the sentence-transformers model's embeddings
# --------------------------------------------------------------------------------------------------


class B3Miner:
    """Mines b3stream schedules for one sentence-transformers training dataset, from any SentenceTransformer.

    Args:
        dataset: the ``datasets.Dataset`` the trainer trains on (anchor, positive[, negatives] columns).
        out: the mining folder: ``data/`` (the prepared dataset), ``model-embeddings/`` (the model's vectors),
            ``mine/`` (the stages' embeddings, rank and partition folders), ``schedules/`` (the versions).
        batch_size: |B|, the trainer's global batch: ``per_device_train_batch_size`` x processes.
        strategy: ``b3`` (default), ``random``, ``gcbs``, ... (``b3pp`` and the ``*_hn`` strategies mine hard
            negatives, which reach the trainer as negative columns: :func:`with_hard_negatives`).
        K, p, m, h, seed: as ``b3stream mine`` (K default: min(32, batch_size)).
        query_prompt, positive_prompt: prepended to anchors / positives when the model embeds them, as the
            trainer's ``prompts`` prepend them in training (None: none).
        query_task, positive_task: the task the anchors / positives are embedded with, as the trainer's
            ``router_mapping`` gives them in training (``query`` / ``document``: a Transformer's
            ``query_length`` / ``document_length``, a Router's route; None: none).
        encode_batch_size: the model's encode batch size.
        mine: further ``MineConfig`` fields (``{"partitioner": "kaminpar", "edges": "union"}``).
    """

    def __init__(self, dataset, out: str | Path, batch_size: int, strategy: str = "b3", K: int | None = None,
                 p: int = 30, m: int = 100, h: int = 5, seed: int = 0, query_prompt: str | None = None,
                 positive_prompt: str | None = None, query_task: str | None = None,
                 positive_task: str | None = None, encode_batch_size: int = 64, progress: bool = False,
                 mine: dict[str, Any] | None = None):
        self.dataset, self.out = dataset, Path(out)
        self.batch_size, self.strategy = int(batch_size), strategy
        self.K = int(K) if K is not None else min(32, self.batch_size)
        self.p, self.m, self.h, self.seed = p, m, h, seed
        self.query_prompt, self.positive_prompt = query_prompt, positive_prompt
        self.query_task, self.positive_task = query_task, positive_task
        self.encode_batch_size, self.progress = encode_batch_size, progress
        self.overrides = dict(mine or {})
        self.history: list[dict] = []  # every mine(): schedule path, seconds per part
        self._records: list[dict] | None = None

    @property
    def schedules(self) -> Path:
        """The folder the schedules are published in (give it to :class:`B3BatchSampler`: newest version)."""
        return self.out / "schedules"

    @property
    def records(self) -> list[dict]:
        if self._records is None:
            self._records = dataset_records(self.dataset)
        return self._records

    def config(self, seed: int | None = None, source_step: int | None = None):
        """The :class:`~b3stream.config.MineConfig` the stages run with."""
        from ..config import MineConfig, apply_overrides

        emb = self.out / "model-embeddings"
        cfg = MineConfig(data=str(self.out / "data"), split=SPLIT, out=str(self.out / "mine"),
                         schedule_dir=str(self.schedules), query_embeddings=str(emb / "queries.npy"),
                         positive_embeddings=str(emb / "positives.npy"), strategy=self.strategy,
                         batch_size=self.batch_size, K=self.K, p=self.p, m=self.m, h=self.h,
                         seed=self.seed if seed is None else seed, source_step=source_step)
        return apply_overrides(cfg, self.overrides) if self.overrides else cfg

    def mine(self, model, seed: int | None = None, source_step: int | None = None) -> Path:
        """Embed the dataset with ``model`` and run the mining stages; returns the new schedule's path.

        Under a process group (DDP) the main process mines while the others wait at a barrier, then every
        process gets the same path (the folder must be shared by the processes, as the trainer's output is)."""
        rank, size = world()
        path = None
        if rank == 0:
            path = self._mine(model, seed, source_step)
        if size > 1:
            import torch.distributed as dist

            box = [str(path) if path is not None else None]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0])
        return path

    def _mine(self, model, seed: int | None, source_step: int | None) -> Path:
        from ..mining.pipeline import run_all

        t0 = time.perf_counter()
        records = self.records
        prepare_dataset(self.dataset, self.out / "data", records, progress=self.progress)
        t1 = time.perf_counter()
        self._embed(model, records)
        t2 = time.perf_counter()
        path = run_all(self.config(seed, source_step), progress=self.progress)
        t3 = time.perf_counter()
        entry = {"schedule": str(path), "seed": self.seed if seed is None else seed, "source_step": source_step,
                 "seconds": {"prepare": round(t1 - t0, 3), "embed": round(t2 - t1, 3), "stages": round(t3 - t2, 3)}}
        self.history.append(entry)
        log.info("mined %s in %.1f s (prepare %.1f, embed %.1f, rank/partition/schedule %.1f)", path, t3 - t0,
                 t1 - t0, t2 - t1, t3 - t2)
        return path

    def _embed(self, model, records: list[dict]) -> None:
        """The model's embeddings of every anchor and positive, written as the two ``.npy`` files the embed stage
        imports (under temporary names, then renamed). The model is put back in the mode it was in."""
        import torch

        folder = self.out / "model-embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        was_training = bool(getattr(model, "training", False))
        try:
            with torch.no_grad():
                for name, side, prompt, task in (("queries", "query", self.query_prompt, self.query_task),
                                                 ("positives", "positive", self.positive_prompt, self.positive_task)):
                    texts = [r[side] for r in records]
                    vectors = model.encode(texts, batch_size=self.encode_batch_size, convert_to_numpy=True,
                                           normalize_embeddings=True, show_progress_bar=self.progress,
                                           **({"prompt": prompt} if prompt else {}), **({"task": task} if task else {}))
                    tmp = folder / f".{name}.tmp-{os.getpid()}.npy"
                    np.save(tmp, np.asarray(vectors, dtype=np.float32))
                    os.replace(tmp, folder / f"{name}.npy")
        finally:
            if was_training:
                model.train()


def mine_schedule(dataset, model, out: str | Path, batch_size: int, **kwargs) -> Path:
    """Mine a schedule for ``dataset`` from ``model`` in one call: ``B3Miner(dataset, out, batch_size,
    **kwargs).mine(model)``. Returns the schedule's path (a file under ``OUT/schedules``)."""
    return B3Miner(dataset, out, batch_size, **kwargs).mine(model)


# --------------------------------------------------------------------------------------------------
# The batch sampler
# --------------------------------------------------------------------------------------------------


class OtherDataError(ScheduleError):
    """A schedule mined from other data than the dataset the trainer passes."""


def _load(source, stamp: dict) -> Schedule:
    """A schedule (object, file, folder: its newest good version, or a miner: its folder) checked against the
    dataset's stamp, with an error that says what to do."""
    if isinstance(source, B3Miner):
        source = source.schedules
    schedule = source if isinstance(source, Schedule) else load_schedule(source)
    try:
        check_stamp(schedule.meta.get("data"), stamp, f"schedule {schedule.path or '(in memory)'}")
    except DataError as e:
        raise OtherDataError(f"{e}. This schedule was mined from other data than the trainer's training dataset "
                            f"({stamp['n']} rows, fingerprint {stamp['fingerprint'][:12]}): mine one from this "
                            "dataset (b3stream.integrations.sentence_transformers.mine_schedule)") from None
    return schedule


class B3BatchSampler(DefaultBatchSampler):
    """A sentence-transformers batch sampler that batches the training dataset by a b3stream schedule.

    Pass it to the trainer with its schedule: ``SentenceTransformerTrainingArguments(batch_sampler=
    B3BatchSampler.using(path))`` (a picklable factory, :class:`B3SamplerFactory`, since the trainer saves its
    arguments with every checkpoint), where ``path`` is a schedule file, a folder of versions (the newest good one) or a
    :class:`B3Miner` (its folder). Given several, the one mined from the dataset the trainer passes is used (a
    ``DatasetDict``: one schedule per dataset, one process).

    - Row ``i`` is schedule id ``i``; a schedule whose data stamp (n, fingerprint) is not this dataset's is
      refused (:class:`~b3stream.schedule.ScheduleError`).
    - |B| of the schedule must be the trainer's global batch, ``batch_size`` (per device) x processes.
    - Epoch ``e`` trains the plan b3stream's static mode trains in its epoch ``e`` (``ScheduleSampler``: the
      schedule's batches, permuted by ``(seed, e)``; ``seed`` is the trainer's), with its one batch shorter than
      |B| (N mod |B| rows, if any) moved to the end of the epoch, where accelerate's sharding under DDP needs
      it. ``set_epoch`` (the trainer's call before every epoch) picks the epoch; every row is in exactly one
      batch per epoch, each batch one of the miner's (a tail smaller than the number of processes is merged
      into a neighbour).
    - ``drop_last`` (the trainer's ``dataloader_drop_last``): the batch shorter than |B| is left out, every
      epoch (its rows are not trained by this schedule; a warning says how many). Without it no row is dropped.
      Under DDP sentence-transformers sets ``dataloader_drop_last=True`` itself, whatever was asked (its guard
      against ranks with different numbers of batches, which this sampler never gives), so there the sampler
      keeps the short batch unless ``drop_short=True``; ``drop_short`` overrides ``drop_last`` anywhere.
    - Under DDP every global batch is yielded as ``world`` contiguous slices, rank order, for accelerate's
      ``BatchSamplerShard`` to hand out one per rank; use the loss with ``gather_across_devices=True`` so each
      anchor sees the whole B3 batch. That gather needs every rank's slice to be the same size
      (``torch.distributed.nn.all_gather``), so with ``even_slices`` (default: under DDP) a batch whose size
      does not divide by the processes (the short one, or one a tiny tail was merged into) gives up its last
      ``size mod world`` rows for the epoch (fewer than ``world``; a warning says how many);
      ``even_slices=False`` trains them in uneven slices, for losses that do not gather.
    - :meth:`use_schedule` (the re-mining callback's) plans the epochs from the next ``__iter__`` on a new
      schedule of the same data and |B|; epochs keep their number of batches (:meth:`__len__`).

    ``generator`` is not used: the order is a function of the seed and the epoch, the same on every rank.
    """

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns: list[str] | None = None,
                 generator=None, seed: int = 0, schedule=None, world_size: int | None = None,
                 rank: int | None = None, even_slices: bool | None = None, drop_short: bool | None = None):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        if schedule is None:
            raise ValueError("B3BatchSampler needs a schedule: pass batch_sampler=B3BatchSampler.using(PATH) to "
                             "SentenceTransformerTrainingArguments, PATH a schedule mined from the training dataset "
                             "(b3stream.integrations.sentence_transformers.mine_schedule)")
        self.dataset = dataset
        detected_rank, detected_world = world()
        self.world = int(world_size) if world_size is not None else detected_world
        self.rank = int(rank) if rank is not None else detected_rank
        self.seed = int(seed) if seed is not None else 0
        self.even_slices = self.world > 1 if even_slices is None else bool(even_slices)
        # what accelerate's BatchSamplerShard reads too: with drop_last it drops a last group of short slices
        self.drop_last = bool(drop_short) if drop_short is not None else bool(drop_last) and self.world == 1
        self.stamp = dataset_stamp(dataset)
        self.n = self.stamp["n"]
        self.schedule = self._pick(schedule)
        self._plans = self._planner(self.schedule, None)
        self._epoch_steps = self._plans.epoch_steps
        self._length = self._count(self.batches(0))
        self.swaps: list[dict] = []  # every use_schedule(): {"epoch" it first trained, "from", "to", "path"}

    @classmethod
    def using(cls, *schedules, others: str = "refuse", **options) -> "B3SamplerFactory":
        """A factory for ``SentenceTransformerTrainingArguments(batch_sampler=...)`` that builds this sampler on
        ``schedules`` (a path, a folder of versions, a :class:`B3Miner`, or several: the dataset's own).
        ``others``: what a dataset no schedule was mined from gets: ``refuse`` (an error) or ``sequential``
        (batches in row order, what the trainer's evaluation on an ``eval_dataset`` needs: it builds those
        batches with the same ``batch_sampler``). ``options``: the sampler's keyword arguments
        (``even_slices``, ``drop_short``)."""
        if not schedules:
            raise ValueError("B3BatchSampler.using needs a schedule (a file, a folder of versions or a B3Miner)")
        if others not in ("refuse", "sequential"):
            raise ValueError(f"others={others!r}: expected refuse or sequential")
        picked = [str(s.schedules) if isinstance(s, B3Miner) else str(s) if isinstance(s, (str, Path)) else s
                  for s in schedules]
        return B3SamplerFactory(picked[0] if len(picked) == 1 else picked, others, options, cls)

    # -- schedules -----------------------------------------------------------------------------------
    def _pick(self, source) -> Schedule:
        """The given schedule (checked), or of several the one mined from this dataset."""
        if not isinstance(source, (list, tuple)):
            schedule = _load(source, self.stamp)
        else:
            errors = []
            for candidate in source:
                try:
                    schedule = _load(candidate, self.stamp)
                    break
                except ScheduleError as e:
                    errors.append(str(e))
            else:
                raise OtherDataError(f"none of the {len(source)} schedules was mined from this training dataset "
                                    f"({self.n} rows, fingerprint {self.stamp['fingerprint'][:12]}):\n  "
                                    + "\n  ".join(errors))
        self._check_size(schedule)
        return schedule

    def _check_size(self, schedule: Schedule) -> None:
        size = self.batch_size * self.world
        if schedule.batch_size != size:
            raise ScheduleError(
                f"schedule {schedule.path or '(in memory)'} has |B|={schedule.batch_size}, but the trainer's batch is "
                f"{size} (per_device_train_batch_size={self.batch_size} x {self.world} process"
                f"{'es' if self.world > 1 else ''}): set per_device_train_batch_size="
                f"{schedule.batch_size // self.world if schedule.batch_size % self.world == 0 else '?'} or mine "
                f"the schedule with batch_size={size}")
        schedule.check_trainable(self.n, self.world)

    def _planner(self, schedule: Schedule, epoch_steps: int | None) -> ScheduleSampler:
        return ScheduleSampler(schedule, self.n, rank=0, world_size=self.world, seed=self.seed,
                               epoch_steps=epoch_steps)

    def use_schedule(self, schedule) -> None:
        """Plan the epochs to come (from the next ``__iter__``, which the trainer starts after ``set_epoch``) on
        ``schedule``: a newer schedule of the same dataset and |B| (a file, a folder: its newest, a Schedule)."""
        new = self._pick(schedule)
        plans = self._planner(new, self._epoch_steps)
        length = self._count([plans.global_batch(i) for i in range(plans.steps_per_epoch)])
        if length != self._length:  # the trainer fixed its steps per epoch from len() at the start
            raise ScheduleError(f"schedule {new.path} makes {length} batches per epoch where this run has "
                                f"{self._length}")
        # the epoch it trains first is known at the next __iter__ (the trainer calls set_epoch after this)
        self.swaps.append({"epoch": None, "from": self.schedule.version, "to": new.version,
                           "path": str(new.path) if new.path else None})
        self.schedule, self._plans = new, plans

    # -- the epoch plan --------------------------------------------------------------------------------
    def batches(self, epoch: int | None = None) -> list[np.ndarray]:
        """The global batches (ids = dataset rows) of ``epoch`` (default: the current one), in training order:
        the plan b3stream's static mode trains in that epoch on this schedule, seed and number of processes,
        with the batch shorter than |B| (if any) moved to the end."""
        epoch = self.epoch if epoch is None else int(epoch)
        empty = np.empty(0, np.int64)
        self._plans.load_state_dict({
            "version": self.schedule.version, "epoch": epoch, "position": 0, "swaps": 0, "seed": self.seed,
            "n": self.n, "world": self.world, "before": empty, "consumed": empty, "history": [], "done": 0,
            "epoch_steps": self._epoch_steps})
        plan = [self._plans.global_batch(i).copy() for i in range(self._plans.steps_per_epoch)]
        # The short batch last: under DDP accelerate's BatchSamplerShard drops a group of slices whose last is
        # shorter than the per-device batch anywhere but at the end (the same order on one process).
        size = self.schedule.batch_size
        plan = [b for b in plan if len(b) >= size] + [b for b in plan if len(b) < size]
        if self.even_slices and self.world > 1:  # every rank's slice the same size (a gathering loss needs it)
            plan = [b[: len(b) - len(b) % self.world] for b in plan]
        return plan

    def _kept(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        if not self.drop_last:
            return batches
        return [b for b in batches if len(b) >= self.schedule.batch_size]

    def _count(self, batches: list[np.ndarray]) -> int:
        return len(self._kept(batches)) * self.world

    def __iter__(self) -> Iterator[list[int]]:
        for swap in self.swaps:
            if swap["epoch"] is None:
                swap["epoch"] = self.epoch
        batches = self.batches(self.epoch)
        kept = self._kept(batches)
        if len(kept) < len(batches):
            dropped = sum(len(b) for b in batches) - sum(len(b) for b in kept)
            log.warning("drop_last: %d of %d rows (the schedule's short batch) are not trained this epoch; "
                        "dataloader_drop_last=False trains every row", dropped, self.n)
        trimmed = self.n - sum(len(b) for b in batches)
        if trimmed:
            log.warning("even_slices: %d of %d rows are not trained this epoch, so that every one of the %d ranks' "
                        "slices has the same size (gather_across_devices needs it); even_slices=False trains them "
                        "in uneven slices", trimmed, self.n, self.world)
        for batch in kept:
            if self.world == 1:
                yield batch.tolist()
                continue
            for r in range(self.world):  # accelerate's BatchSamplerShard gives slice r to rank r
                lo, hi = split_bounds(len(batch), self.world, r)
                yield batch[lo:hi].tolist()

    def __len__(self) -> int:
        """Batches yielded per epoch (slices: ``world`` per global batch), the same every epoch."""
        return self._length


class B3SamplerFactory:
    """What :meth:`B3BatchSampler.using` returns: called by the trainer as ``factory(dataset, batch_size=...,
    drop_last=..., valid_label_columns=..., generator=..., seed=...)``; picklable (the trainer saves its
    arguments with every checkpoint)."""

    def __init__(self, schedule, others: str = "refuse", options: dict | None = None, cls=None):
        self.schedule, self.others, self.options = schedule, others, dict(options or {})
        self.cls = cls or B3BatchSampler

    def __call__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None,
                 seed: int = 0):
        try:
            return self.cls(dataset, batch_size, drop_last, valid_label_columns=valid_label_columns,
                            generator=generator, seed=seed, schedule=self.schedule, **self.options)
        except OtherDataError:
            if self.others != "sequential":
                raise
        from torch.utils.data import SequentialSampler

        log.info("B3BatchSampler: a dataset of %d rows that no schedule was mined from (an eval_dataset?) is "
                 "batched in row order", len(dataset))
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last,
                                   valid_label_columns=valid_label_columns, generator=generator, seed=seed)

    def __repr__(self) -> str:
        return f"B3BatchSampler.using({self.schedule!r}, others={self.others!r})"


# --------------------------------------------------------------------------------------------------
# B3++: the schedule's hard negatives as negative columns
# --------------------------------------------------------------------------------------------------


def with_hard_negatives(dataset, schedule, seed: int = 0):
    """``dataset`` with the hard negatives of a ``b3pp`` (or ``random_hn`` / ``task_hn``) schedule mined from it
    as ``h`` text columns ``b3_negative_1..h`` after its own: row ``i``'s are the positives of the ids the
    schedule drew for id ``i`` (B3++: from its batch's pooled neighbour lists, never a member, a member's top-p
    or a same-text positive).

    With :class:`B3BatchSampler` on the same schedule, ``MultipleNegativesRankingLoss`` then scores every anchor
    of a batch against the batch's positives and all its rows' negatives: B3++'s pool of ``h |B|`` negatives
    shared by the batch. An empty slot (a task that could not supply ``h |B|`` distinct negatives, ``-1``) takes
    another negative of its batch's pool (one seeded draw), or a random row outside the batch when the pool is
    empty. These columns are left out of the rows' fingerprint, so the schedule still fits the dataset; they
    are the schedule's, so a re-mined schedule (the callback) changes the batches but not them."""
    stamp = dataset_stamp(dataset)
    sched = _load(schedule, stamp)
    if sched.negative_ids is None or sched.negative_ids.shape[1] == 0:
        raise ScheduleError(f"schedule {sched.path or '(in memory)'} ({sched.meta.get('strategy')}) holds no hard "
                            "negatives: mine it with strategy b3pp (or random_hn / task_hn) and h > 0")
    records = dataset_records(dataset)
    n, h = len(records), sched.negative_ids.shape[1]
    negatives = np.full((n, h), -1, np.int64)
    negatives[sched.ids] = sched.negative_ids
    rng = np.random.default_rng(seed)
    for lo, hi in zip(sched.offsets[:-1], sched.offsets[1:]):
        rows = sched.ids[lo:hi]
        block = negatives[rows]
        empty = block < 0
        if not empty.any():
            continue
        pool = np.unique(block[~empty])
        if not len(pool):  # nothing drawn for this batch: random rows outside it
            pool = np.setdiff1d(np.arange(n), rows)
        block[empty] = rng.choice(pool, size=int(empty.sum()))
        negatives[rows] = block
    out = dataset.remove_columns([c for c in dataset.column_names if c.startswith(NEGATIVE_PREFIX)])
    positives = [r["positive"] for r in records]
    for j in range(h):
        out = out.add_column(f"{NEGATIVE_PREFIX}{j + 1}", [positives[i] for i in negatives[:, j]])
    return out


# --------------------------------------------------------------------------------------------------
# Re-mining at epoch starts
# --------------------------------------------------------------------------------------------------


def find_sampler(dataloader) -> B3BatchSampler | None:
    """The :class:`B3BatchSampler` under the trainer's (accelerate-prepared) DataLoader, if any."""
    seen, todo = set(), [dataloader]
    while todo:
        obj = todo.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, B3BatchSampler):
            return obj
        todo += [getattr(obj, name, None) for name in ("batch_sampler", "sampler", "base_dataloader")]
    return None


class B3RemineCallback(TrainerCallback):
    """Re-mines the schedule from the model being trained at chosen epoch starts (refreshed mode at epoch
    boundaries) and trains that epoch on it.

    The trainer calls ``on_epoch_begin`` before it calls the sampler's ``set_epoch`` and draws the epoch's
    batches, so the callback mines there, synchronously (training waits for the schedule), and hands it to the
    :class:`B3BatchSampler` (:meth:`B3BatchSampler.use_schedule`); every row stays in exactly one batch per
    epoch. Under DDP the main process mines while the others wait (:meth:`B3Miner.mine`).

    Args:
        miner: the :class:`B3Miner` of the training dataset (its |B|, strategy and parameters are kept).
        every: re-mine at the start of every ``every``-th epoch (epochs ``every``, ``2 * every``, ... counted from
            0: epoch 0 trains the schedule the sampler was given).
        epochs: instead, the epochs (0-based) at whose start to re-mine.

    Each re-mine uses seed ``miner.seed + epoch``. A run resumed in the middle of an epoch does not re-mine
    then; give the sampler the miner's folder (newest version) so it continues on that epoch's schedule.
    """

    def __init__(self, miner: B3Miner, every: int | None = 1, epochs: Iterable[int] | None = None):
        if epochs is None and (every is None or every < 1):
            raise ValueError(f"every must be a positive number of epochs, got {every}")
        self.miner = miner
        self.every = None if epochs is not None else int(every)
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.history: list[dict] = []  # every re-mine: epoch, step, schedule, seconds
        self.sampler: B3BatchSampler | None = None  # the trainer's, found at the first re-mine

    def due(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return epoch > 0 and epoch % self.every == 0

    def on_epoch_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        value = float(state.epoch or 0.0)
        epoch = int(round(value))
        if abs(value - epoch) > 1e-6 or not self.due(epoch):  # not an epoch boundary (a resumed run), or not due
            return control
        sampler = self.sampler = find_sampler(train_dataloader)
        if sampler is None:
            raise ValueError("B3RemineCallback needs the trainer's batch sampler to be a B3BatchSampler "
                             "(batch_sampler=B3BatchSampler.using(...))")
        if model is None:
            raise ValueError("B3RemineCallback: the trainer passed no model to re-mine from")
        t0 = time.perf_counter()
        path = self.miner.mine(model, seed=self.miner.seed + epoch, source_step=state.global_step)
        sampler.use_schedule(path)
        self.history.append({"epoch": epoch, "step": state.global_step, "schedule": str(path),
                             "version": sampler.schedule.version, "seconds": round(time.perf_counter() - t0, 3)})
        log.info("epoch %d: re-mined from the model at step %d in %.1f s -> %s", epoch, state.global_step,
                 time.perf_counter() - t0, path)
        return control


__all__ = ["B3BatchSampler", "B3Miner", "B3RemineCallback", "B3SamplerFactory", "OtherDataError", "dataset_records", "dataset_stamp", "find_sampler",
           "mine_schedule", "prepare_dataset", "records_fingerprint", "with_hard_negatives"]

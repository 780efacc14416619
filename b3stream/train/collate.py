"""Records by id -> prompted texts -> token tensors, one rank's batch at a time, in DataLoader workers.

Reading is by id through the data layer (``ShardedDataset[id]``, WebDataset's ``wids``), so the batch
composition is entirely the schedule's. Instruction prompts come from the manifest, per task and side
(paper section 3.3); hard negatives are other examples' positives, so they get the positive prompt.

One :class:`PlanLoader` serves a whole run: its workers persist across swaps and epochs, and the main
process sends each of them the :class:`RankBatch` to build, so they never hold a plan of their own.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.dedup import KnownKeys, content_keys, known_keys_of
from ..data.manifest import Manifest
from ..data.reader import ShardedDataset
from ..encoder import Tokenize
from .loss import token_extents
from .sampler import RankBatch, ScheduleSampler


def texts_of(records: list[dict], side: str, manifest: Manifest) -> list[str]:
    """The prompted ``side`` texts of ``records`` (side is "query" or "positive")."""
    return [manifest.prompted(r, side) for r in records]


@dataclass
class LocalBatch:
    rank_batch: RankBatch  # what the batch was built from (ids, counts, its step's place in the plan)
    features: dict[str, dict[str, torch.Tensor]]  # side -> tokenizer output
    keys: dict[str, torch.Tensor]  # "positive"/"negative" -> int64 content keys of those texts; "known" (when
    # a record has known positives): (n_local, w) keys of each query's known positives, padded with its own
    # side -> per row, one past its last real token (right padding: its length; left padding: the width),
    # kept on the host so GradCache cuts padding per chunk without reading the GPU
    extents: dict[str, torch.Tensor] | None = None

    def pin_memory(self) -> "LocalBatch":
        """Page-locked token tensors and keys (DataLoader ``pin_memory``): their copy to the GPU can then be
        asynchronous, where a copy from pageable memory makes the host wait for the GPU's queue."""
        self.features = {side: {k: v.pin_memory() for k, v in f.items()} for side, f in self.features.items()}
        self.keys = {side: v.pin_memory() for side, v in self.keys.items()}
        return self


class TokenizedBatches(Dataset):
    """A :class:`RankBatch` -> this rank's tokenised batch.

    Keyed by ``(pass, RankBatch)``, not by an index into a plan: it carries its ids, its share of the
    hard negatives and whether the plan has a negative side, so a worker needs no copy of the sampler and
    builds batches of whatever plan the main process is on. That is what lets the workers outlive a swap
    and an epoch (:class:`PlanLoader`). ``current`` is the loader's pass number in memory shared with the
    workers: a request left over from an earlier pass (prefetched before a swap) is answered with None at
    once instead of being read and tokenised for nothing, so a new pass does not wait for it."""

    def __init__(self, records: ShardedDataset, tokenize: Tokenize, current: torch.Tensor, seed: int = 0):
        self.records, self.tokenize, self.current, self.seed = records, tokenize, current, seed
        self.manifest = records.manifest

    def __getitem__(self, key: tuple[int, RankBatch]) -> LocalBatch | None:
        number, part = key
        if number != int(self.current[0]):
            return None  # an earlier pass's request: the loader drops it unseen
        recs = [self.records[i] for i in part.ids]
        texts = {side: texts_of(recs, side, self.manifest) for side in ("query", "positive")}
        features = {side: self.tokenize(texts[side], side) for side in ("query", "positive")}
        own = content_keys(texts["positive"])
        keys = {"positive": torch.from_numpy(own)}
        known = [known_keys_of(r, self.manifest.prompted) for r in recs]
        if any(known):  # the other positives of each query: masked from its logits as same-text positives
            keys["known"] = torch.from_numpy(KnownKeys.from_lists(known).padded(np.arange(len(recs)), own))
        if part.has_negative_side:
            # Every rank passes a negative side (maybe empty) so all ranks run the same collectives.
            negative_texts = texts_of([self.records[i] for i in part.hard_negative_ids], "positive", self.manifest)
            if part.num_dataset_negatives:
                negative_texts += stored_negatives(recs, part.num_dataset_negatives, self.seed, part.epoch,
                                                   self.manifest)
            features["negative"] = (self.tokenize(negative_texts, "positive")
                                    if negative_texts else {"input_ids": torch.zeros(0, 0, dtype=torch.long),
                                                            "attention_mask": torch.zeros(0, 0, dtype=torch.long)})
            keys["negative"] = torch.from_numpy(content_keys(negative_texts))
        return LocalBatch(rank_batch=part, features=features, keys=keys,
                          extents={side: token_extents(f["attention_mask"]) for side, f in features.items()})


def stored_negatives(records: list[dict], h: int, seed: int, epoch: int, manifest: Manifest) -> list[str]:
    """Up to ``h`` of each record's stored hard negatives (``prepare --negatives-field``), behind the
    positive prompt of its task: all of them when it has at most ``h``, else ``h`` drawn without replacement
    by a generator of (seed, epoch, id), so every epoch sees another draw and a resumed run the same one."""
    out = []
    for rec in records:
        stored = rec.get("negatives") or []
        if len(stored) > h:
            pick = np.random.default_rng([seed, epoch, rec["id"]]).choice(len(stored), h, replace=False)
            stored = [stored[i] for i in sorted(pick)]
        out += [manifest.prompted({"positive": text, "task": rec.get("task")}, "positive") for text in stored]
    return out


class PlanBatches(Sampler):
    """The DataLoader's sampler: this rank's batches of the remaining steps of the live sampler's current
    plan (:class:`RankBatch`), each computed in
    the main process when the loader asks for it (``prefetch_factor`` per worker ahead of training) and
    sent to a worker with the pass number as the dataset key. A pass ends with the plan: at its last step,
    or as soon as the plan changed (a swap, a new epoch), so a pass never asks for a step of a plan it did
    not start on."""

    def __init__(self, sampler: ScheduleSampler, current: torch.Tensor):
        self.sampler, self.current = sampler, current

    def _plan(self) -> tuple:
        s = self.sampler
        return s.epoch, s.swaps, s.version

    def __iter__(self):
        s, plan, number = self.sampler, self._plan(), int(self.current[0])
        for index in range(s.position, s.steps_per_epoch):
            if self._plan() != plan:
                return
            yield number, s.batch_at(index)


def _as_is(item):
    return item


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A worker ignores SIGINT and SIGTERM, which Ctrl-C sends to the whole foreground process group and a
    cluster may send to every process of a job: the trainer finishes its step, checkpoints and stops the
    workers itself (``PlanLoader.close``), while a worker killed by the signal would make the DataLoader raise
    in the trainer mid-step. A worker still ends with the trainer (torch's watchdog) and on SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class PlanLoader:
    """Batches for the remaining steps of the sampler's current plan, built by DataLoader workers that live
    as long as the loader: iterate it again after a swap or at a new epoch, and the same workers go on.

    Starting workers costs a fork of the trainer (its page tables, with the model loaded) or a pickle of
    the dataset, and the first batches of a fresh loader come without prefetch; at every swap and epoch that
    added up. Each pass over the loader is a new pass of the persistent DataLoader over :class:`PlanBatches`.
    Batches prefetched for the old plan cannot leak into a new pass: a new pass of a DataLoader with
    persistent workers first waits for every outstanding item and drops it (torch's ``_ResumeIteration``
    handshake), and the loop checks each batch's (epoch, index) against the sampler besides. So that the
    wait is short, each pass has a number the workers see in shared memory, and they skip the requests of
    an earlier one (:class:`TokenizedBatches`): a swap costs at most the batch each worker is building.

    ``num_workers=0`` reads in the main process, one batch when the loop asks for it, nothing prefetched.
    """

    def __init__(self, records: ShardedDataset, sampler: ScheduleSampler, tokenize: Tokenize,
                 num_workers: int = 1):
        workers = num_workers > 0
        self.current = torch.zeros(1, dtype=torch.int64).share_memory_()  # the pass number, seen by workers
        self.loader = DataLoader(TokenizedBatches(records, tokenize, self.current, sampler.seed), batch_size=None,
                                 sampler=PlanBatches(sampler, self.current), num_workers=num_workers,
                                 collate_fn=_as_is, pin_memory=torch.cuda.is_available(),
                                 worker_init_fn=_leave_stop_signals_to_the_trainer if workers else None,
                                 prefetch_factor=2 if workers else None, persistent_workers=workers)

    def __iter__(self):
        """The remaining steps of the sampler's current plan (one pass; break out of it at a swap)."""
        self.current += 1  # before the DataLoader's new pass: the workers skip what the last one left
        for batch in self.loader:
            if batch is None:
                raise RuntimeError("a request of an earlier pass reached the loop; this is a bug")
            yield batch

    def close(self) -> None:
        """Stop the workers now rather than whenever the loader is collected (they hold a copy of the
        trainer's memory)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None


MAX_WORKERS = 8


def auto_workers(cores: int, local_ranks: int) -> int:
    """``num_workers: null``: the cores per local rank less one (the rank's own process), at least 1 and at
    most :data:`MAX_WORKERS`. A worker builds a whole step's batch (reads, prompts, tokenizes |B|/world x
    (2 + h) texts), two steps ahead, so each of them adds a step's worth of tokenizing in parallel: 2 cores
    and 1 rank give 1 worker (as before), 16 cores and 1 GPU rank 8, 16 cores and 8 ranks 1."""
    return max(1, min(MAX_WORKERS, cores // max(1, local_ranks) - 1))


def loader_workers(num_workers: int | None) -> int:
    """``num_workers`` as configured, or :func:`auto_workers` of this process's cores (its CPU affinity) and
    the local world size when it is None."""
    if num_workers is not None:
        return num_workers
    from ..dist import local_world_size

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return auto_workers(cores, local_world_size())


def plan_loader(records: ShardedDataset, sampler: ScheduleSampler, tokenize: Tokenize,
                num_workers: int = 1) -> PlanLoader:
    """A :class:`PlanLoader`: make it once per run; each ``for batch in loader`` runs the rest of the
    sampler's current plan, and the next one (after a swap, at a new epoch) the next plan's."""
    return PlanLoader(records, sampler, tokenize, num_workers)

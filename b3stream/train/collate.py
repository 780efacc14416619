"""Records by id -> prompted texts -> token tensors, one rank's batch at a time, in DataLoader workers.

Reading is by id through the data layer (``ShardedDataset[id]``, WebDataset's ``wids``), so the batch
composition is entirely the schedule's. Instruction prompts come from the manifest, per task and side
(paper section 3.3); hard negatives are other examples' positives, so they get the positive prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.dedup import content_keys
from ..data.manifest import Manifest
from ..data.reader import ShardedDataset
from ..encoder import Tokenize
from .loss import token_extents
from .sampler import ScheduleSampler, Step


def texts_of(records: list[dict], side: str, manifest: Manifest) -> list[str]:
    """The prompted ``side`` texts of ``records`` (side is "query" or "positive")."""
    return [manifest.prompted(r, side) for r in records]


@dataclass
class LocalBatch:
    step: Step
    features: dict[str, dict[str, torch.Tensor]]  # side -> tokenizer output
    keys: dict[str, torch.Tensor]  # "positive"/"negative" -> int64 content keys of those texts
    # side -> per row, one past its last real token (right padding: its length; left padding: the width),
    # kept on the host so GradCache cuts padding per chunk without reading the GPU
    extents: dict[str, torch.Tensor] | None = None

    def pin_memory(self) -> "LocalBatch":
        """Page-locked token tensors and keys (DataLoader ``pin_memory``): their copy to the GPU can then be
        asynchronous, where a copy from pageable memory makes the host wait for the GPU's queue."""
        self.features = {side: {k: v.pin_memory() for k, v in f.items()} for side, f in self.features.items()}
        self.keys = {side: v.pin_memory() for side, v in self.keys.items()}
        return self


class StepData(Dataset):
    """Step index of the sampler's current plan -> this rank's tokenised batch."""

    def __init__(self, records: ShardedDataset, sampler: ScheduleSampler, tokenize: Tokenize):
        self.records, self.sampler, self.tokenize = records, sampler, tokenize
        self.manifest = records.manifest

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __getitem__(self, index: int) -> LocalBatch:
        step = self.sampler.step(index)
        recs = [self.records[i] for i in step.ids]
        texts = {side: texts_of(recs, side, self.manifest) for side in ("query", "positive")}
        features = {side: self.tokenize(texts[side], side) for side in ("query", "positive")}
        keys = {"positive": torch.from_numpy(content_keys(texts["positive"]))}
        if self.sampler.schedule.negatives is not None:
            # Every rank passes a negative side (maybe empty) so all ranks run the same collectives.
            negs = texts_of([self.records[i] for i in step.negative_ids], "positive", self.manifest)
            features["negative"] = (self.tokenize(negs, "positive")
                                    if negs else {"input_ids": torch.zeros(0, 0, dtype=torch.long),
                                                  "attention_mask": torch.zeros(0, 0, dtype=torch.long)})
            keys["negative"] = torch.from_numpy(content_keys(negs))
        return LocalBatch(step=step, features=features, keys=keys,
                          extents={side: token_extents(f["attention_mask"]) for side, f in features.items()})


def _as_is(item):
    return item


def step_loader(records: ShardedDataset, sampler: ScheduleSampler, tokenize: Tokenize,
                num_workers: int = 1) -> DataLoader:
    """Batches for the remaining steps of the sampler's current plan, prefetched by ``num_workers``.

    The workers get a copy of the sampler taken now; after a swap or at a new epoch make a new loader.
    """
    data = StepData(records, sampler, tokenize)
    return DataLoader(data, batch_size=None, sampler=range(sampler.position, sampler.steps_per_epoch),
                      num_workers=num_workers, collate_fn=_as_is, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if num_workers > 0 else None, persistent_workers=False)

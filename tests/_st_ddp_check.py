"""Run under ``torchrun --nproc_per_node 2``: sentence-transformers' trainer on 2 CPU ranks (gloo) with
B3BatchSampler, MultipleNegativesRankingLoss(gather_across_devices=True) and the re-mining callback, two epochs.
Each rank writes the rows of every batch it trained and the callback's history to OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/_st_ddp_check.py DATASET_DIR MINE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(data: str, mine: str, out: str) -> None:
    import torch
    from datasets import load_from_disk
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from b3stream.encoder import default_model_path
    from b3stream.integrations.sentence_transformers import B3BatchSampler, B3Miner, B3RemineCallback

    torch.set_num_threads(1)
    ds = load_from_disk(data)
    model = SentenceTransformer(default_model_path(), device="cpu")
    model.max_seq_length = 32
    miner = B3Miner(ds, mine, batch_size=16, K=8, p=2, m=10)
    callback = B3RemineCallback(miner, every=1)
    args = SentenceTransformerTrainingArguments(
        str(Path(out) / "run"), num_train_epochs=2, per_device_train_batch_size=8, ddp_backend="gloo",
        batch_sampler=B3BatchSampler.using(miner), learning_rate=5e-5, save_strategy="no", report_to="none",
        use_cpu=True, seed=3, logging_steps=100, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, callbacks=[callback],
                                         loss=MultipleNegativesRankingLoss(model, gather_across_devices=True))
    row = {a: i for i, a in enumerate(ds["anchor"])}
    seen: list[list[int]] = []
    collate = trainer.data_collator

    class Spy:
        def __getattr__(self, name):
            return getattr(collate, name)

        def __call__(self, features):
            seen.append([row[f["anchor"]] for f in features])
            return collate(features)

    trainer.data_collator = Spy()
    result = trainer.train()
    rank = torch.distributed.get_rank()
    sampler = callback.sampler
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({
        "seen": seen, "steps": result.global_step, "loss": result.training_loss, "history": callback.history,
        "world": sampler.world, "plan1": [b.tolist() for b in sampler.batches(1)],
        "versions": [s["to"] for s in sampler.swaps]}))


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""B3 batches inside the sentence-transformers trainer (b3stream/integrations/sentence_transformers.py, issue 34).

The fast tests mine with a stand-in model (a hashed bag of words: real neighbour structure, no weights) through
the real mining stages; the slow ones train the bundled MiniLM with sentence-transformers' own trainer and
losses on CPU, and run the README's example as written."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

from b3stream.schedule import ScheduleError, load_schedule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class HashModel:
    """A stand-in SentenceTransformer for mining: ``encode`` gives hashed bags of words (deterministic)."""

    training = False

    def encode(self, texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
               show_progress_bar=False, **kwargs):
        out = np.full((len(texts), 64), 1e-3, np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                out[i, zlib.crc32(word.encode()) % 64] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def pairs():
    from b3stream.data.codesearch import iter_codesearch_pairs

    found = list(iter_codesearch_pairs(packages=["json", "csv", "email", "http"], max_pairs=300, progress=False))
    assert len({p["query"] for p in found}) == len(found)  # anchors identify rows in the training tests
    return found


def st_dataset(pairs, n: int, negatives: bool = False):
    from datasets import Dataset

    rows = pairs[:n]
    columns = {"anchor": [p["query"] for p in rows], "positive": [p["positive"] for p in rows]}
    if negatives:  # a stored negative per row: the next row's positive
        columns["negative"] = [rows[(i + 1) % n]["positive"] for i in range(n)]
    return Dataset.from_dict(columns)


@pytest.fixture(scope="module")
def small(pairs, tmp_path_factory):
    """100 rows mined with the stand-in model: |B| = 16, K = 8 (100 = 6 x 16 + 4: one short batch)."""
    from b3stream.integrations.sentence_transformers import B3Miner

    ds = st_dataset(pairs, 100)
    miner = B3Miner(ds, tmp_path_factory.mktemp("st") / "mine", batch_size=16, K=8, p=2, m=12)
    return ds, miner, miner.mine(HashModel())


def sampler(ds, schedule, batch_size=16, drop_last=False, seed=42, **kw):
    from b3stream.integrations.sentence_transformers import B3BatchSampler

    return B3BatchSampler.using(schedule, **kw)(ds, batch_size=batch_size, drop_last=drop_last,
                                                valid_label_columns=None, generator=None, seed=seed)


# -- the data stamp ----------------------------------------------------------------------------------


def test_fingerprint_is_the_prepared_datasets(pairs, tmp_path):
    """The sampler's fingerprint of a Dataset is the one `b3stream prepare hf --format sentence-transformers`
    (nothing held out) gives it, so schedules mined by `b3stream mine` from that folder fit too; the
    stored negative column is part of it."""
    from b3stream.data.manifest import Manifest
    from b3stream.data.prepare import prepare_file
    from b3stream.data.sources import preset_fields
    from b3stream.integrations.sentence_transformers import dataset_stamp, prepare_dataset

    ds = st_dataset(pairs, 60, negatives=True)
    ds.save_to_disk(str(tmp_path / "saved"))
    prepare_file(str(tmp_path / "saved"), "hf", str(tmp_path / "cli"), preset_fields("sentence-transformers"),
                 held_out={}, progress=False)
    stamp = dataset_stamp(ds)
    assert stamp["n"] == 60
    assert Manifest.load(tmp_path / "cli").stamp("train")["fingerprint"] == stamp["fingerprint"]
    manifest = prepare_dataset(ds, tmp_path / "ours")
    assert manifest.stamp("train")["fingerprint"] == stamp["fingerprint"]
    assert manifest.splits["train"].negatives["total"] == 60
    assert dataset_stamp(st_dataset(pairs, 60))["fingerprint"] != stamp["fingerprint"]


def test_label_columns_refused(pairs):
    from b3stream.data.manifest import DataError
    from b3stream.integrations.sentence_transformers import dataset_records

    ds = st_dataset(pairs, 10).add_column("score", [0.5] * 10)
    with pytest.raises(DataError, match="'score' column"):
        dataset_records(ds)


# -- the sampler ---------------------------------------------------------------------------------------


def test_batches_are_the_schedules_every_row_once_per_epoch(small):
    from b3stream.train.sampler import ScheduleSampler

    ds, _, path = small
    schedule = load_schedule(path)
    mined = {tuple(sorted(b.tolist())) for b in schedule.batches}
    s = sampler(ds, path)
    assert len(s) == len(schedule.batches) == 7
    epochs = []
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert {tuple(sorted(b)) for b in batches} == mined  # the miner's batches, none broken
        assert sorted(i for b in batches for i in b) == list(range(100))  # every row exactly once
        assert batches == [b.tolist() for b in s.batches(epoch)]
        epochs.append(batches)
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation of the batches each epoch
    # the plan b3stream's static mode trains, with the trainer's seed, its short batch (4 rows) last
    plan = ScheduleSampler(schedule, 100, seed=42)
    for epoch in range(2):
        static = [plan.global_batch(i).tolist() for i in range(plan.steps_per_epoch)]
        assert epochs[epoch] == [b for b in static if len(b) == 16] + [b for b in static if len(b) < 16]
        assert len(epochs[epoch][-1]) == 4
        for _ in range(plan.steps_per_epoch):
            plan.advance()
    other = sampler(ds, path, seed=43)
    assert list(other) != epochs[0]
    assert list(sampler(ds, path)) == epochs[0]  # a pure function of schedule, seed and epoch


def test_schedule_of_other_data_refused(small, pairs):
    ds, miner, path = small
    changed = st_dataset(pairs, 100).map(lambda row, i: {"anchor": row["anchor"] + "!" if i == 50 else row["anchor"]},
                                         with_indices=True)
    with pytest.raises(ScheduleError, match="other data than the trainer's training dataset"):
        sampler(changed, path)
    with pytest.raises(ScheduleError, match="other data"):
        sampler(st_dataset(pairs, 99), miner.schedules)
    with pytest.raises(ScheduleError, match="none of the 2 schedules"):
        sampler(changed, [path, miner.schedules])
    with pytest.raises(ScheduleError, match=r"\|B\|=16, but the trainer's batch is 32 .*per_device_train_batch_size=16"):
        sampler(ds, path, batch_size=32)
    with pytest.raises(ScheduleError, match=r"trainer's batch is 32 \(per_device_train_batch_size=16 x 2 processes"):
        sampler(ds, path, world_size=2, rank=0)
    with pytest.raises(ValueError, match="needs a schedule"):
        from b3stream.integrations.sentence_transformers import B3BatchSampler

        B3BatchSampler(ds, 16, False)


def test_several_schedules_pick_the_datasets(small, pairs, tmp_path):
    """A DatasetDict trains one sampler per dataset; given several schedules each takes its own."""
    from b3stream.integrations.sentence_transformers import mine_schedule

    ds, _, path = small
    other = st_dataset(pairs[100:], 64)
    other_path = mine_schedule(other, HashModel(), tmp_path / "other", batch_size=16, K=8, p=2, m=12)
    assert sampler(ds, [other_path, path]).schedule.path == Path(path)
    assert sampler(other, [other_path, path]).schedule.path == Path(other_path)


def test_ddp_every_rank_the_same_number_of_batches(small):
    """Under DDP the trainer's accelerate wraps the sampler in BatchSamplerShard (even_batches off for
    training): rank r gets slice r of every global batch, every rank as many batches, none empty."""
    from accelerate.data_loader import BatchSamplerShard

    ds, miner, _ = small
    from b3stream.integrations.sentence_transformers import mine_schedule

    path = mine_schedule(ds, HashModel(), miner.out.parent / "ddp", batch_size=16, K=4, p=2, m=12)
    s = sampler(ds, path, batch_size=4, world_size=4, rank=0)
    s.set_epoch(1)
    batches = s.batches()
    assert len(s) == 4 * len(batches)
    shards = [list(BatchSamplerShard(s, num_processes=4, process_index=r, even_batches=False)) for r in range(4)]
    assert [len(x) for x in shards] == [len(batches)] * 4
    for step, batch in enumerate(batches):
        assert sum((shards[r][step] for r in range(4)), []) == batch.tolist()
        assert all(shards[r][step] for r in range(4))
    assert sorted(i for x in shards for b in x for i in b) == list(range(100))


def test_ddp_even_slices_for_a_gathering_loss(small, caplog):
    """MultipleNegativesRankingLoss(gather_across_devices=True) all-gathers equal shapes: with even_slices (the
    default under DDP) every rank's slice of every batch has one size; the short batch of 100 = 8 x 12 + 4 on 3
    ranks gives up 1 row. even_slices=False trains all 100 rows in uneven slices."""
    from accelerate.data_loader import BatchSamplerShard

    from b3stream.integrations.sentence_transformers import mine_schedule

    ds, miner, _ = small
    path = mine_schedule(ds, HashModel(), miner.out.parent / "ddp3", batch_size=12, K=4, p=2, m=12)
    for even, rows in ((None, 99), (False, 100)):
        s = sampler(ds, path, batch_size=4, world_size=3, rank=0, **({} if even is None else {"even_slices": even}))
        shards = [list(BatchSamplerShard(s, num_processes=3, process_index=r, even_batches=False)) for r in range(3)]
        assert [len(x) for x in shards] == [9, 9, 9]
        trained = [i for x in shards for b in x for i in b]
        assert len(trained) == len(set(trained)) == rows
        sizes = [[len(shards[r][step]) for r in range(3)] for step in range(9)]
        assert (sizes[-1] == [1, 1, 1]) if even is None else (sizes[-1] == [2, 1, 1])
        assert all(x == [4, 4, 4] for x in sizes[:-1])
    assert "1 of 100 rows are not trained this epoch" in caplog.text
    # sentence-transformers forces dataloader_drop_last=True under DDP: the short batch is kept (its slices are
    # equal), unless drop_short=True
    kept = sampler(ds, path, batch_size=4, drop_last=True, world_size=3, rank=0)
    assert not kept.drop_last and len(kept) == 27
    assert len(list(BatchSamplerShard(kept, num_processes=3, process_index=2, even_batches=False))) == 9
    dropped = sampler(ds, path, batch_size=4, drop_last=False, world_size=3, rank=0, drop_short=True)
    assert dropped.drop_last and len(dropped) == 24
    assert len(list(BatchSamplerShard(dropped, num_processes=3, process_index=2, even_batches=False))) == 8


def test_drop_last_leaves_out_only_the_short_batch(small, caplog):
    ds, _, path = small
    s = sampler(ds, path, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 6 and all(len(b) == 16 for b in batches)
    assert "4 of 100 rows" in caplog.text
    assert len({i for b in batches for i in b}) == 96


def test_use_schedule_plans_the_next_epoch_on_it(small):
    ds, miner, path = small
    s = sampler(ds, miner.schedules)
    first = list(s)
    newer = miner.mine(HashModel(), seed=5)
    s.set_epoch(1)
    s.use_schedule(newer)
    assert s.schedule.version == load_schedule(newer).version > load_schedule(path).version
    batches = list(s)
    assert {tuple(sorted(b)) for b in batches} == {tuple(sorted(b.tolist())) for b in load_schedule(newer).batches}
    assert batches != first and len(batches) == len(s)


def test_b3pp_negatives_as_columns(pairs, tmp_path):
    """B3++ through the negative columns: each batch's rows carry, as b3_negative_1..h, the positives of the
    negatives the schedule drew for them (never a member's positive); the schedule still fits the dataset."""
    from b3stream.integrations.sentence_transformers import mine_schedule, with_hard_negatives

    ds = st_dataset(pairs, 100, negatives=True)
    path = mine_schedule(ds, HashModel(), tmp_path / "b3pp", batch_size=16, K=8, p=2, m=12, strategy="b3pp", h=2)
    with pytest.raises(ScheduleError, match="holds no hard negatives"):
        with_hard_negatives(ds, mine_schedule(ds, HashModel(), tmp_path / "b3", batch_size=16, K=8, p=2, m=12))
    out = with_hard_negatives(ds, path)
    assert out.column_names == ["anchor", "positive", "negative", "b3_negative_1", "b3_negative_2"]
    again = with_hard_negatives(out, path)  # replaces its own columns, the rows' fingerprint unchanged
    assert again.column_names == out.column_names and again["b3_negative_1"] == out["b3_negative_1"]
    assert len(sampler(out, path)) == 7  # the added columns are not part of the rows' fingerprint
    schedule, positive = load_schedule(path), ds["positive"]
    columns = np.array([out["b3_negative_1"], out["b3_negative_2"]]).T
    empty = 0
    for lo, hi in zip(schedule.offsets[:-1], schedule.offsets[1:]):
        rows, drawn = schedule.ids[lo:hi], schedule.negative_ids[lo:hi]
        pool = {positive[j] for j in drawn[drawn >= 0]}
        members = {positive[i] for i in rows}
        for i, slots in zip(rows, drawn):
            for text, j in zip(columns[i], slots):
                assert text == positive[j] if j >= 0 else (text in pool or not pool)
                assert text not in members  # never a member's positive: B3++'s exclusions hold
            empty += int((slots < 0).sum())
    assert (schedule.negative_ids >= 0).mean() > 0.9, empty


def test_arguments_pickle_with_the_factory(small, tmp_path):
    """The trainer saves its arguments (torch.save) with every checkpoint: the factory must pickle."""
    from sentence_transformers import SentenceTransformerTrainingArguments

    from b3stream.integrations.sentence_transformers import B3BatchSampler

    _, miner, _ = small
    args = SentenceTransformerTrainingArguments(str(tmp_path), batch_sampler=B3BatchSampler.using(miner),
                                                report_to="none", use_cpu=True)
    again = pickle.loads(pickle.dumps(args))
    assert again.batch_sampler.schedule == str(miner.schedules) and again.batch_sampler.others == "refuse"
    assert "batch_sampler" not in args.to_dict()


def test_eval_dataset_batched_in_row_order_when_asked(small, pairs):
    """The trainer builds an eval_dataset's batches with the same batch_sampler: others='sequential' gives
    such a dataset (no schedule was mined from it) plain batches in row order; the default refuses it."""
    from sentence_transformers.base.sampler import DefaultBatchSampler

    from b3stream.integrations.sentence_transformers import B3BatchSampler, OtherDataError

    ds, miner, _ = small
    held_out = st_dataset(pairs[150:], 40)
    kw = dict(batch_size=16, drop_last=False, valid_label_columns=None, generator=None, seed=0)
    with pytest.raises(OtherDataError):
        B3BatchSampler.using(miner)(held_out, **kw)
    factory = B3BatchSampler.using(miner, others="sequential")
    plain = factory(held_out, **kw)
    assert type(plain) is DefaultBatchSampler and list(plain) == [list(range(16)), list(range(16, 32)),
                                                                  list(range(32, 40))]
    assert isinstance(factory(ds, **kw), B3BatchSampler)  # the training data still gets its schedule
    with pytest.raises(ScheduleError, match=r"\|B\|=16"):  # a schedule of the right data, wrong |B|: refused
        factory(ds, **{**kw, "batch_size": 8})


# -- the trainer -----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each pytest-xdist worker has (tests/conftest.py): two threads on a shared 2-core
    box made these runs 7 times slower (97 s against 13 s for the same 6 steps)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(ds, miner, tmp_path, epochs=2, loss="mnrl", callbacks=()):
    """sentence-transformers' trainer on B3 batches, the bundled MiniLM at 16 tokens, recording the rows of
    every batch its collator receives (in training order)."""
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)

    from b3stream.encoder import default_model_path
    from b3stream.integrations.sentence_transformers import B3BatchSampler

    model = SentenceTransformer(default_model_path(), device="cpu")
    model.max_seq_length = 16
    fn = MultipleNegativesRankingLoss(model) if loss == "mnrl" else \
        CachedMultipleNegativesRankingLoss(model, mini_batch_size=4)
    args = SentenceTransformerTrainingArguments(
        str(tmp_path / "run"), num_train_epochs=epochs, per_device_train_batch_size=miner.batch_size,
        batch_sampler=B3BatchSampler.using(miner), learning_rate=5e-5, save_strategy="no", report_to="none",
        use_cpu=True, seed=3, logging_steps=100, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=fn, callbacks=list(callbacks))
    row = {a: i for i, a in enumerate(ds["anchor"])}
    seen: list[list[int]] = []

    class Spy:  # the trainer's collator, noting the rows of every batch it collates
        def __init__(self, collate):
            self.collate = collate

        def __getattr__(self, name):
            return getattr(self.collate, name)

        def __call__(self, features):
            seen.append([row[f["anchor"]] for f in features])
            return self.collate(features)

    trainer.data_collator = Spy(trainer.data_collator)
    return model, trainer, seen


@pytest.fixture(scope="module")
def tiny(pairs, tmp_path_factory):
    """48 rows (3 batches of 16 an epoch) mined from the bundled MiniLM itself."""
    from sentence_transformers import SentenceTransformer

    from b3stream.encoder import default_model_path
    from b3stream.integrations.sentence_transformers import B3Miner

    ds = st_dataset(pairs, 48)
    model = SentenceTransformer(default_model_path(), device="cpu")
    model.max_seq_length = 16
    miner = B3Miner(ds, tmp_path_factory.mktemp("tiny") / "mine", batch_size=16, K=8, p=2, m=10)
    return ds, miner, miner.mine(model)


def _epochs(seen: list[list[int]], per_epoch: int) -> list[list[list[int]]]:
    assert len(seen) % per_epoch == 0
    return [seen[i:i + per_epoch] for i in range(0, len(seen), per_epoch)]


@pytest.mark.slow
def test_st_trainer_trains_two_epochs_on_b3_batches(tiny, tmp_path):
    """MultipleNegativesRankingLoss, two epochs: every batch the trainer trains is the sampler's plan for that
    epoch, which holds the schedule's batches, every row exactly once per epoch."""
    from b3stream.integrations.sentence_transformers import find_sampler

    ds, miner, path = tiny
    _, trainer, seen = _trainer(ds, miner, tmp_path)
    out = trainer.train()
    assert out.global_step == 6 and np.isfinite(out.training_loss)
    s = find_sampler(trainer.callback_handler.train_dataloader)
    mined = {tuple(sorted(b.tolist())) for b in load_schedule(path).batches}
    for epoch, batches in enumerate(_epochs(seen, 3)):
        assert batches == [b.tolist() for b in s.batches(epoch)]
        assert {tuple(sorted(b)) for b in batches} == mined
        assert sorted(i for b in batches for i in b) == list(range(48))
    assert seen[:3] != seen[3:]


@pytest.mark.slow
def test_cached_mnrl_trains_on_b3_batches(tiny, tmp_path):
    """The cached variant (GradCache mini-batches of 4) takes the same batches."""
    ds, miner, path = tiny
    _, trainer, seen = _trainer(ds, miner, tmp_path, epochs=1, loss="cached")
    out = trainer.train()
    assert out.global_step == 3 and np.isfinite(out.training_loss)
    assert {tuple(sorted(b)) for b in seen} == {tuple(sorted(b.tolist())) for b in load_schedule(path).batches}


@pytest.mark.slow
def test_remine_callback_schedule_trains_epoch_two(tiny, tmp_path):
    """The callback re-mines from the trained model at the start of epoch 2 (epoch index 1): the new version
    (source_step 3, the model after epoch 1) is what epoch 2 trains, batch for batch."""
    from b3stream.integrations.sentence_transformers import B3Miner, B3RemineCallback, find_sampler

    ds, shared, path = tiny
    miner = B3Miner(ds, tmp_path / "mine", batch_size=16, K=8, p=2, m=10)
    first = miner.mine(HashModel())  # epoch 1 on a stand-in's schedule: the re-mine must differ from it
    callback = B3RemineCallback(miner, every=1)
    model, trainer, seen = _trainer(ds, miner, tmp_path, callbacks=[callback])
    trainer.train()
    assert [h["epoch"] for h in callback.history] == [1] and callback.history[0]["step"] == 3
    new = load_schedule(callback.history[0]["schedule"])
    assert new.version == load_schedule(first).version + 1 and new.meta["source_step"] == 3
    s = callback.sampler
    assert s is find_sampler(trainer.callback_handler.train_dataloader)
    assert s.swaps == [{"epoch": 1, "from": 0, "to": 1, "path": str(new.path)}]
    one, two = _epochs(seen, 3)
    assert {tuple(sorted(b)) for b in one} == {tuple(sorted(b.tolist())) for b in load_schedule(first).batches}
    assert {tuple(sorted(b)) for b in two} == {tuple(sorted(b.tolist())) for b in new.batches}
    assert two == [b.tolist() for b in s.batches(1)]
    assert {tuple(sorted(b)) for b in one} != {tuple(sorted(b)) for b in two}
    assert sorted(i for b in two for i in b) == list(range(48))
    assert model.training  # the callback put the model back in training mode


@pytest.mark.slow
def test_ddp_two_ranks_with_a_gathering_loss_and_the_callback(pairs, tmp_path):
    """torchrun, 2 CPU ranks (gloo), MultipleNegativesRankingLoss(gather_across_devices=True), |B| = 16 = 8 x 2,
    51 rows (3 full batches and one of 3, which gives up a row for even slices), re-mined for epoch 2 on rank 0:
    both ranks train the same number of steps, every step's two slices make one batch of the epoch's schedule,
    each trained row once per epoch."""
    from b3stream.dist import free_port
    from b3stream.integrations.sentence_transformers import B3Miner

    from ._train_util import torchrun

    ds = st_dataset(pairs, 51)
    ds.save_to_disk(str(tmp_path / "ds"))
    B3Miner(ds, tmp_path / "mine", batch_size=16, K=8, p=2, m=10).mine(HashModel())
    res = torchrun(2, [str(REPO / "tests" / "_st_ddp_check.py"), str(tmp_path / "ds"), str(tmp_path / "mine"),
                       str(tmp_path)], free_port(), timeout=500)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 8
    assert len(r0["seen"]) == len(r1["seen"]) == 8  # 4 batches an epoch on every rank
    assert all(len(a) == len(b) for a, b in zip(r0["seen"], r1["seen"]))  # equal slices: the gather's shapes
    steps = [a + b for a, b in zip(r0["seen"], r1["seen"])]
    assert [(h["epoch"], h["step"], h["schedule"]) for h in r0["history"]] == \
        [(h["epoch"], h["step"], h["schedule"]) for h in r1["history"]] == [(1, 4, r0["history"][0]["schedule"])]
    assert r0["versions"] == r1["versions"] == [1]
    for epoch, version in ((0, 0), (1, 1)):
        batches = steps[4 * epoch: 4 * epoch + 4]
        mined = [set(b.tolist()) for b in load_schedule(tmp_path / "mine" / "schedules" / f"v{version:06d}.b3s").batches]
        assert all(any(set(b) <= m for m in mined) for b in batches)  # slices of the schedule's batches
        assert [len(b) for b in batches] == [16, 16, 16, 2]
        trained = [i for b in batches for i in b]
        assert len(set(trained)) == len(trained) == 50
    assert steps[4:] == r0["plan1"]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("### 6. Train with sentence-transformers"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_ten_lines_of_code():
    import ast

    statements = [node for node in ast.parse(readme_example()).body
                  if not isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(statements) <= 10


@pytest.mark.slow
def test_readme_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    from ._train_util import env

    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env(1), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    versions = sorted(p.name for p in (tmp_path / "b3-mine" / "schedules").glob("v*.b3s"))
    assert versions == ["v000000.b3s", "v000001.b3s"]  # mined before training, re-mined for epoch 2

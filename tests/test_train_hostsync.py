"""The hot path costs what it must and no more: the per-step statistics stay on the device until read (no
host sync per step) and read the same; a step's collectives are the embeddings' (no all-gather of row
counts the plan already gives) and the gradients' reduce-scatters, the schedule watcher agrees on CPU tensors
(one all-reduce of four integers per check, a swap included) and, when the default group is NCCL, on a gloo
group of its own, and carries the ranks' stop flags (SIGINT / SIGTERM) in the same collective; the DataLoader
workers outlive swaps and epochs and serve the new plan.

Run as a module under torchrun (``python -m torch.distributed.run --nproc_per_node 2 -m
tests.test_train_hostsync ARGS.json``), this file is also the script of the two-rank counting test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from b3stream.train.loss import InfoNCE


def test_loss_statistics_are_lazy_and_match_their_definition():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1)
    d = torch.nn.functional.normalize(q + 0.3 * torch.randn(12, 16), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    out = InfoNCE(0.05)(q, d, n)
    # Nothing copied to the host yet: the statistics are one detached tensor, the sims are not copies.
    assert isinstance(out.stats, torch.Tensor) and out.stats.shape == (4,) and not out.stats.requires_grad
    assert out._floats is None
    assert out.pos_sims.device == q.device and out.hardest_sims.device == q.device
    # Read once, all four come over together, and they are what they say.
    sims = q @ torch.cat([d, n]).T
    pos = sims.diagonal()[:12]
    masked = sims.clone()
    masked[torch.arange(12), torch.arange(12)] = -torch.inf
    hardest = masked.max(1).values
    ref_loss = torch.nn.functional.cross_entropy(sims / 0.05, torch.arange(12))
    assert out.global_loss == pytest.approx(float(ref_loss), rel=1e-5)
    assert out._floats is not None
    assert out.pos_sim == pytest.approx(float(pos.mean()), abs=1e-6)
    assert out.hardest_neg_sim == pytest.approx(float(hardest.mean()), abs=1e-6)
    assert out.accuracy == pytest.approx(float((pos > hardest).float().mean()))
    torch.testing.assert_close(out.pos_sims, pos)
    torch.testing.assert_close(out.hardest_sims, hardest)


def test_monitor_reads_tensors_only_when_a_line_is_due_and_loses_no_step(tmp_path):
    """Tensor values wait in the monitor until a console line is due; then every buffered step reaches
    TensorBoard with its own value, and close() writes the rest."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from b3stream.train.monitor import Monitor

    mon = Monitor(tmp_path, total_steps=7, log_every=3, progress=False)
    for step in range(1, 6):
        m = {"loss": torch.tensor(float(step)), "grad_norm": torch.tensor(10.0 * step), "lr": 0.1,
             "examples_per_s": None}
        mon.step(step, m)
        # steps 1-2 and 4-5 are buffered as tensors; step 3 flushed 1-3 into numbers
        assert len(mon._pending) == step % 3
        if step == 3:
            assert isinstance(m["loss"], float) and m["loss"] == 3.0
    mon.close()  # steps 4 and 5 were never due: close() writes them
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(s, float(s)) for s in range(1, 6)]
    assert [e.value for e in acc.Scalars("train/grad_norm")] == [10.0 * s for s in range(1, 6)]
    assert "train/examples_per_s" not in acc.Tags()["scalars"]  # None is skipped, not written as 0


@pytest.mark.parametrize("side", ["right", "left"])
def test_host_side_token_extents_trim_like_the_mask(side):
    """GradCache chunks cut their padding from host-side extents exactly where the mask says, for right
    padding (trimmed) and left padding (nothing to trim on the right)."""
    from b3stream.train.loss import _trim, token_extents

    lengths = torch.tensor([3, 7, 2, 5, 1, 4])
    width = 9
    cols = torch.arange(width)
    mask = (cols[None, :] < lengths[:, None]) if side == "right" else (cols[None, :] >= width - lengths[:, None])
    mask = mask.long()
    features = {"input_ids": torch.randint(1, 100, mask.shape) * mask, "attention_mask": mask}
    ext = token_extents(mask)
    assert ext.tolist() == (lengths.tolist() if side == "right" else [width] * 6)
    for rows in (slice(0, 3), slice(3, 6), slice(4, 5)):
        part = {k: v[rows] for k, v in features.items()}
        by_mask, by_host = _trim(part), _trim(part, ext[rows])
        assert by_mask.keys() == by_host.keys()
        for k in by_mask:
            assert torch.equal(by_mask[k], by_host[k])
        expected = int(lengths[rows].max()) if side == "right" else width
        assert by_host["attention_mask"].shape[1] == expected


# -- collectives per training step (two gloo ranks, real DeepSpeed engines) -----------------------------

COLLECTIVES = ("all_gather", "broadcast", "all_reduce", "all_gather_object", "reduce_scatter_single",
               "reduce_scatter_tensor")
SWAP_AFTER = 2  # rank 0 publishes schedule v2 once this many steps are trained; the check that follows
# announces it (rank 0's loader has it), the one after swaps (every rank's loader has it)
SWAP_AT = SWAP_AFTER + 1


def count_collectives(events: list) -> None:
    """Wrap torch.distributed's collectives: each call is recorded (the calling file and function, the
    group, the tensor's device) and then made as usual. b3stream and DeepSpeed look them up on the module
    at every call, so the wrappers see every collective of a step."""
    import torch.distributed as tdist

    for name in COLLECTIVES:
        def counted(*args, _real=getattr(tdist, name), _name=name, **kwargs):
            code = sys._getframe(1).f_code
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            events.append({"fn": _name, "where": f"{Path(code.co_filename).name}:{code.co_name}",
                           "group": kwargs.get("group"), "device": None if tensor is None else tensor.device.type})
            return _real(*args, **kwargs)

        setattr(tdist, name, counted)


def _publish_v2_at_the_swap_step(events: list, rank: int, args: dict) -> None:
    """Mark each step's end in ``events`` (the sampler advances once per trained step) and, on rank 0,
    publish schedule v2 into the watched folder after step SWAP_AFTER, before that step's check."""
    from b3stream.train.sampler import ScheduleSampler

    from ._train_util import random_schedule

    real, steps = ScheduleSampler.advance, []

    def advance(self):
        real(self)
        events.append({"fn": "advance"})
        steps.append(1)
        if rank == 0 and len(steps) == SWAP_AFTER:
            random_schedule(Path(args["data"]), batch_size=8, K=2, h=2, seed=1, folder=Path(args["folder"]),
                            version=2)

    ScheduleSampler.advance = advance


def _settled_checks() -> None:
    """Each check first waits for this rank's schedule loader (a thread) to have looked: which check
    announces and which swaps is then the same in every run, as the test counts them."""
    from b3stream.refresh.hotswap import ScheduleWatcher

    real = ScheduleWatcher.check

    def check(self, *args, **kwargs):
        self.settle()
        return real(self, *args, **kwargs)

    ScheduleWatcher.check = check


def _plain(events: list) -> list[dict]:
    return [{"fn": e["fn"], "where": e.get("where"), "default_group": e.get("group") is None} for e in events]


def _nccl_watcher_check(events: list, info, args: dict) -> dict:
    """A watcher told the default group is NCCL (the process group here is gloo: CPU only) must agree on a
    gloo group of its own, with CPU tensors; two checks find v2 above v1 (rank 0 announces it at the first,
    every rank has loaded it at the second: one all-reduce each)."""
    import torch.distributed as tdist

    from b3stream.data.manifest import Manifest
    from b3stream.dist import DistInfo
    from b3stream.refresh.hotswap import ScheduleWatcher

    nccl = DistInfo(rank=info["rank"], world_size=info["world"], local_rank=info["rank"],
                    device=torch.device("cpu"), backend="nccl")
    watcher = ScheduleWatcher(args["folder"], Manifest.load(args["data"]), nccl, say=lambda line: None,
                              background=False)
    events.clear()
    assert watcher.check(1) is None
    found = watcher.check(1)
    calls = [e for e in events if e["where"].startswith("hotswap.py")]
    groups = {id(e["group"]): e["group"] for e in calls}.values()  # the groups the collectives were given
    return {"found": None if found is None else found.version, "calls": [e["fn"] for e in calls],
            "groups": len(groups),
            "default_group": any(g is None or g is tdist.group.WORLD for g in groups),
            "backends": sorted(tdist.get_backend(g) for g in groups if g is not None),
            "devices": sorted({e["device"] for e in calls})}


def _counting_run(args_path: str) -> None:
    """The torchrun side of the counting test: train with counted collectives, then the NCCL watcher check;
    each rank writes what it saw to ``rank<r>.json``."""
    from b3stream.config import TrainConfig, load_config
    from b3stream.dist import finish
    from b3stream.train.loop import train

    args = json.loads(Path(args_path).read_text())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    events: list = []
    count_collectives(events)
    _publish_v2_at_the_swap_step(events, rank, args)
    _settled_checks()
    summary = train(load_config(TrainConfig, args["config"], []), progress=False)
    result = {"train": _plain(events), "swaps": summary["swaps"]}
    result["nccl_watcher"] = _nccl_watcher_check(events, {"rank": rank, "world": world}, args)
    (Path(args["out"]) / f"rank{rank}.json").write_text(json.dumps(result))
    finish(0)


def _per_step(events: list[dict], steps: int) -> tuple[list[dict], list[dict]]:
    """Per step k: the collectives b3stream/train/loss.py made while training it, and those the watcher
    (hotswap.py) made at the check after it, each as {"caller/fn": count}."""
    from collections import Counter

    loss, watch = [Counter() for _ in range(steps)], [Counter() for _ in range(steps)]
    k = 0  # steps finished so far
    for e in events:
        if e["fn"] == "advance":
            k += 1
            continue
        file, _, caller = (e["where"] or "").partition(":")
        if file == "loss.py" and k < steps:
            loss[k][f"{caller}/{e['fn']}"] += 1
            assert e["default_group"]
        elif file == "hotswap.py" and 1 <= k <= steps:
            watch[k - 1][f"{caller}/{e['fn']}" + ("" if e["default_group"] else "@other-group")] += 1
    return [dict(c) for c in loss], [dict(c) for c in watch]


@pytest.mark.slow
def test_a_step_gathers_embeddings_only_and_the_watcher_agrees_off_the_nccl_group(tmp_path, code_dataset):
    """Two gloo ranks train 4 steps (B3++ negatives, one persistent loader worker each) watching the
    schedule folder every step; v2 lands after step 2, is announced at that check and swapped at the next.
    Counted per step: the loss's collectives are the four gathers (positives, negatives and their content
    keys), the statistics' all-reduce and the two gradients' reduce-scatters, with no all-gather of row counts
    and no all-reduce of a gradient; the watcher makes one all-reduce per check (rank 0's announcement, the
    ranks' readiness and stop flags; the swap included) on the default gloo group, and the stop flags cost no
    collective of their own but the one after the last step. A watcher on an NCCL default group agrees on its
    own gloo group with CPU tensors. The batches after the swap are the new plan's."""
    from b3stream.data.manifest import Manifest
    from b3stream.refresh.swap import swap
    from b3stream.schedule import load_schedule
    from b3stream.dist import free_port
    from b3stream.train.sampler import ScheduleSampler

    from ._train_util import random_schedule, read_trace, torchrun, write_config

    folder = tmp_path / "schedules"
    v1 = random_schedule(code_dataset, batch_size=8, K=2, h=2, folder=folder, version=1)
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(folder),
                       out=str(tmp_path / "run"), max_steps=4, trace_ids=True, num_workers=1,
                       watch_schedule_every=1,
                       student={"max_query_length": 16, "max_positive_length": 16, "lora": {"r": 4, "alpha": 8}})
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config": str(cfg), "data": str(code_dataset), "folder": str(folder),
                                "out": str(tmp_path)}))
    res = torchrun(2, ["-m", "tests.test_train_hostsync", str(args)], free_port(), timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "terminate called" not in res.stderr

    import torch.distributed as tdist

    scatter = "reduce_scatter_single" if hasattr(tdist, "reduce_scatter_single") else "reduce_scatter_tensor"
    trace = read_trace(tmp_path / "run")
    # a step whose global batch has no hard negative at all (a re-cut batch after the swap) scatters no
    # negatives' gradient: one reduce-scatter, for the positives
    per_step_loss = [{"all_gather_rows/all_gather": 4, "__call__/all_reduce": 1,
                      f"reduce_scatter_rows/{scatter}": 2 if t["negatives"] else 1} for t in trace]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        loss, watch = _per_step(r["train"], 4)
        assert loss == per_step_loss, (rank, loss)
        assert not any(e["where"] and e["where"].endswith("gather_sizes") for e in r["train"])
        assert watch == [{"agree/all_reduce": 1}] * 3 + [{}], (rank, watch)
        # the stop flags ride on the watcher's check; on their own only after the last step (no check there)
        assert [e["fn"] for e in r["train"] if e["where"] == "dist.py:all_max"] == ["all_reduce"], rank
        assert [s["to"] for s in r["swaps"]] == [2] and r["swaps"][0]["step"] == SWAP_AT
        nccl = r["nccl_watcher"]
        assert nccl["found"] == 2 and nccl["calls"] == ["all_reduce", "all_reduce"], nccl
        assert nccl["groups"] == 1 and not nccl["default_group"], nccl  # one group of its own, made once
        assert nccl["backends"] == ["gloo"] and nccl["devices"] == ["cpu"], nccl

    # Steps 1-3 on v1's plan, step 4 on the plan v2 makes of the ids left (the sampler alone says which).
    n = Manifest.load(code_dataset).split("train").n
    replay = ScheduleSampler(load_schedule(v1), n, seed=0)
    expected = [replay.global_batch(i).tolist() for i in range(SWAP_AT)]
    for _ in range(SWAP_AT):
        replay.advance()
    swap(replay, load_schedule(folder / "v000002.b3s"))
    expected += [replay.global_batch(i).tolist() for i in range(4 - SWAP_AT)]
    assert [t["version"] for t in trace] == [1, 1, 1, 2]
    assert [t["ids"] for t in trace] == expected


# -- persistent DataLoader workers ---------------------------------------------------------------------------


def pid_tokenize(texts: list[str], side: str) -> dict[str, torch.Tensor]:
    """A stand-in tokenizer that stamps each batch with the process that built it."""
    n = len(texts)
    ones = torch.ones(n, 3, dtype=torch.long)
    return {"input_ids": ones, "attention_mask": ones.clone(), "worker_pid": torch.full((n,), os.getpid())}


@pytest.mark.parametrize("workers", [2, 0])
def test_loader_workers_outlive_a_swap_and_an_epoch_and_serve_the_new_plan(tmp_path, toy_dataset, workers):
    """One loader for the run: 3 steps of v1, a swap to v2 (prefetched v1 batches outstanding), the rest of
    the epoch on v2's plan, 2 steps of the next epoch. Every batch is the sampler's next step, built from
    those very records, and the same worker processes build all of them."""
    from b3stream.data.dedup import content_keys
    from b3stream.data.manifest import Manifest
    from b3stream.data.reader import ShardedDataset
    from b3stream.refresh.swap import swap
    from b3stream.schedule import load_schedule
    from b3stream.train.collate import plan_loader, texts_of
    from b3stream.train.sampler import ScheduleSampler

    from ._train_util import random_schedule

    manifest = Manifest.load(toy_dataset)
    records = ShardedDataset(toy_dataset, "train", manifest=manifest)
    v1, v2 = (load_schedule(random_schedule(toy_dataset, batch_size=8, K=2, h=2, seed=seed,
                                            folder=tmp_path / "schedules", version=seed + 1)) for seed in (0, 1))
    sampler = ScheduleSampler(v1, len(records), seed=0)
    loader = plan_loader(records, sampler, pid_tokenize, workers)
    seen: list[tuple[int, int, list[int]]] = []  # (version, worker pid, ids) per batch

    def one_pass(stop_after: int | None = None) -> None:
        for batch in loader:
            want = sampler.batch_at()
            got = batch.rank_batch
            assert (got.epoch, got.index, got.version) == (want.epoch, want.index, want.version)
            assert np.array_equal(got.ids, want.ids) and np.array_equal(got.hard_negative_ids, want.hard_negative_ids)
            texts = texts_of([records[int(i)] for i in want.ids], "positive", manifest)
            assert torch.equal(batch.keys["positive"], torch.from_numpy(content_keys(texts)))
            seen.append((got.version, int(batch.features["query"]["worker_pid"][0]), want.ids.tolist()))
            sampler.advance()
            if stop_after is not None and len(seen) == stop_after:
                return

    try:
        one_pass(stop_after=3)
        swap(sampler, v2, step=3)
        one_pass()  # ends with the epoch's plan
        epoch0 = len(seen)
        assert sampler.epoch == 1 and sampler.position == 0
        one_pass(stop_after=epoch0 + 2)
    finally:
        loader.close()

    versions = [v for v, _, _ in seen]
    assert versions == [1] * 3 + [2] * (len(seen) - 3)
    ids = [i for _, _, batch in seen[:epoch0] for i in batch]
    assert sorted(ids) == list(range(len(records)))  # epoch 0: each id once across the swap
    pids = [p for _, p, _ in seen]
    if workers:
        assert os.getpid() not in pids and len(set(pids)) == workers
        assert set(pids[3:]) == set(pids[:3])  # no new worker after the swap or the new epoch
    else:
        assert set(pids) == {os.getpid()}


if __name__ == "__main__":
    _counting_run(sys.argv[1])

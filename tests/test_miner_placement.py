"""Where the spawned miner runs, checked on the CPU: the placement is a pure function of refresh.device, the
GPUs the trainer sees and its local ranks; the child's environment and command carry it
(``CUDA_VISIBLE_DEVICES``, ``--device``); and every device the miner's code touches (the embedding, the
rank stage's torch index and FAISS GPU index, the probe, the bound) is the miner's, not GPU 0."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from b3stream.config import ConfigError, TrainConfig, from_dict
from b3stream.refresh.trainer import MinerPlacement, MinerProcess, miner_placement
from b3stream.run_paths import RunPaths


@pytest.mark.parametrize("device,gpus,ranks,visible,expect", [
    # auto: a GPU no local rank trains on (the last), else the CPU
    (None, 0, 1, None, ("cpu", "", None, False)),
    (None, 1, 1, None, ("cpu", "", None, False)),  # one GPU, one rank: never shared unless asked
    (None, 2, 1, None, ("cuda", "1", 1, False)),
    (None, 8, 4, None, ("cuda", "7", 7, False)),
    (None, 8, 8, None, ("cpu", "", None, False)),
    (None, 4, 2, "4,5,6,7", ("cuda", "7", 3, False)),  # the trainer's own CUDA_VISIBLE_DEVICES, mapped
    (None, 2, 1, "GPU-aa, GPU-bb", ("cuda", "GPU-bb", 1, False)),
    # cuda: its own GPU when there is one, else it shares the last
    ("cuda", 1, 1, None, ("cuda", "0", 0, True)),
    ("cuda", 2, 1, None, ("cuda", "1", 1, False)),
    ("cuda", 4, 4, "3,2,1,0", ("cuda", "0", 3, True)),
    # cuda:N as asked, shared or not; cpu hides every GPU
    ("cuda:1", 2, 1, None, ("cuda", "1", 1, False)),
    ("cuda:0", 2, 2, "2,3", ("cuda", "2", 0, True)),
    ("cpu", 8, 1, None, ("cpu", "", None, False)),
])
def test_the_miner_gets_a_device_of_its_own(device, gpus, ranks, visible, expect):
    p = miner_placement(device, gpus, ranks, visible)
    assert (p.device, p.visible, p.gpu, p.shared) == expect
    assert p.describe()


@pytest.mark.parametrize("device,gpus,message", [("cuda:2", 2, "sees 2 GPU"), ("cuda", 0, "sees no GPU"),
                                                 ("cuda:x", 2, "not cpu, cuda")])
def test_a_gpu_that_is_not_there_is_refused(device, gpus, message):
    with pytest.raises(ConfigError, match=message):
        miner_placement(device, gpus, 1)


def _miner(tmp_path, placement: MinerPlacement, **refresh) -> MinerProcess:
    cfg = from_dict(TrainConfig, {"data": "d", "schedule": "s", "mode": "refreshed",
                                  "refresh": {"every_steps": 4, "threads": 3, **refresh}})
    return MinerProcess(RunPaths(tmp_path), cfg, placement=placement)


@pytest.mark.parametrize("gpus,ranks,visible,child_visible,child_device", [
    (0, 1, None, "", "cpu"),
    (1, 1, None, "", "cpu"),
    (2, 1, None, "1", "cuda"),
    (4, 2, "0,1,2,3", "3", "cuda"),
    (8, 8, None, "", "cpu"),
])
def test_the_childs_environment_and_command(tmp_path, gpus, ranks, visible, child_visible, child_device):
    """What MinerProcess.start hands the child: CUDA_VISIBLE_DEVICES of its one GPU (or none), --device
    cuda (its only visible GPU) or cpu, its threads, and no launcher variables (it is no member of the
    training process group)."""
    miner = _miner(tmp_path, miner_placement(None, gpus, ranks, visible))
    parent = {"CUDA_VISIBLE_DEVICES": visible or "", "RANK": "0", "WORLD_SIZE": str(ranks), "LOCAL_RANK": "0",
              "LOCAL_WORLD_SIZE": str(ranks), "LOCAL_SIZE": str(ranks), "MASTER_ADDR": "h", "MASTER_PORT": "1",
              "PATH": "/bin"}
    env = miner.environment(parent)
    assert env["CUDA_VISIBLE_DEVICES"] == child_visible
    assert env["OMP_NUM_THREADS"] == "3" and env["PATH"] == "/bin"
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR"} & set(env)
    cmd = miner.command()
    assert cmd[cmd.index("--device") + 1] == child_device and cmd[cmd.index("--threads") + 1] == "3"


def test_the_placement_reads_the_launchers_local_world_size(monkeypatch):
    """place_miner: the GPUs torch sees, LOCAL_WORLD_SIZE (torchrun) or LOCAL_SIZE (deepspeed), and the
    trainer's CUDA_VISIBLE_DEVICES."""
    import torch

    from b3stream.refresh import trainer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "3")
    assert trainer.place_miner(None).visible == "7"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert trainer.place_miner(None).device == "cpu"
    assert trainer.place_miner("cuda").visible == "7" and trainer.place_miner("cuda").shared


# -- every device the miner's code touches --------------------------------------------------------------------


def test_the_rank_stage_puts_its_indexes_on_the_miners_gpu(monkeypatch):
    """rank(device=cuda:1): the torch index is built for cuda:1 and FAISS's GPU index on GPU 1 (it was 0
    whatever the device); device=cpu keeps both on the CPU whatever torch and FAISS see."""
    import b3stream.mining.rank as rank_module
    from b3stream.mining.embed import Embeddings
    from b3stream.mining.rank import RankParams, build_index, choose_index, rank

    seen = {"torch": [], "faiss_gpu": []}
    real = rank_module.TorchIndex

    class Recording(real):  # records where it was asked to run, runs on the CPU here
        def __init__(self, base, device=None, **kwargs):
            seen["torch"].append(str(device))
            super().__init__(base, device="cpu", **kwargs)

    monkeypatch.setattr(rank_module, "TorchIndex", Recording)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((64, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    emb = Embeddings(queries=q, positives=q.copy(), tasks=np.zeros(64, np.int32), task_names=["t"], stamp={},
                     record={}, folder=Path("memory"))
    prm = RankParams(p=1, m=4, index="torch")
    S, _, _, _ = rank(emb, prm, progress=False, device="cuda:1")
    assert seen["torch"] == ["cuda:1"] and S.shape == (64, 4)

    faiss = pytest.importorskip("faiss")
    fake = types.SimpleNamespace(IndexFlatIP=faiss.IndexFlatIP, StandardGpuResources=lambda: object(),
                                 get_num_gpus=lambda: 4,
                                 index_cpu_to_gpu=lambda res, number, index: (seen["faiss_gpu"].append(number),
                                                                               index)[1])
    monkeypatch.setattr(rank_module, "_faiss", lambda: fake)
    monkeypatch.setattr(rank_module, "faiss_installed", lambda: True)
    assert build_index(q, "flat", prm, device="cuda:2")[1]["device"] == "gpu"
    assert build_index(q, "flat", prm, device="cpu")[1]["device"] == "cpu"  # stays on the CPU
    assert seen["faiss_gpu"] == [2]
    # device cpu: no torch index on a GPU box either
    assert choose_index(64, RankParams(index="flat"), cuda=True, faiss_gpu=False) == "torch"
    assert choose_index(64, RankParams(index="flat"), cuda=True, faiss_gpu=False, device="cpu") == "flat"


def test_the_rank_stage_and_the_probe_get_the_miners_device(tmp_path, monkeypatch):
    """The pipeline's rank stage passes MineConfig.device to rank(); the probe's bound and the bound of a
    refresh run their products on the miner's device."""
    import b3stream.mining.pipeline as pipeline
    import b3stream.mining.quality as quality
    from b3stream.refresh.drift import Probe

    seen = []

    def fake_rank(emb, prm, progress=True, trained=None, device=None):
        seen.append(("rank", device))
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "rank", fake_rank)
    monkeypatch.setattr(pipeline, "_embeddings", lambda cfg: types.SimpleNamespace(n=4))
    monkeypatch.setattr(pipeline, "load_trained_ids", lambda *a: None)
    cfg = types.SimpleNamespace(device="cuda:1", trained_ids=None, out=str(tmp_path))
    monkeypatch.setattr(pipeline.RankParams, "from_config", classmethod(lambda cls, c: None))
    with pytest.raises(RuntimeError, match="stop here"):
        pipeline.rank_stage(cfg, progress=False)
    real = quality.batch_quality

    def fake_quality(*args, device=None, **kwargs):
        seen.append(("bound", device))
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "batch_quality", fake_quality)
    probe = Probe(version=0, ids=np.arange(8), offsets=np.array([0, 4, 8]))
    v = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    probe.bound(v, v, K=2, temperature=0.05, device="cuda:1")
    assert seen == [("rank", "cuda:1"), ("bound", "cuda:1")]


def test_the_miner_embeds_on_its_device(monkeypatch):
    """The embedding model's placement honours cuda:N (as rank, probe and bound now do) and cpu."""
    import torch

    from b3stream.mining.embed import placement

    assert placement("cpu") == ("cpu", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert placement("cuda:1") == ("cuda:1", torch.bfloat16)

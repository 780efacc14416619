"""`b3stream train` end to end in one process: stop + resume, export, evaluation, refusals.

Real parts throughout: the bundled MiniLM weights with LoRA, DeepSpeed (ZeRO-0, gloo), the code-search
shards read by id. Lengths are short (24 / 32 tokens), runs a few steps long, evaluations on the test split's
own corpus, and independent runs side by side (one thread each) to keep this quick on two cores; the
refusals run through the command's entry in this process.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from b3stream.config import ConfigError, TrainConfig
from b3stream.schedule import load_schedule
from b3stream.train.ds_config import build_ds_config, resolve_ds_path
from b3stream.train.sampler import ScheduleSampler

from ._train_util import random_schedule, read_trace, refused_in_process, run, run_side_by_side, write_config

B3 = [sys.executable, "-m", "b3stream"]
STUDENT = {"max_query_length": 24, "max_positive_length": 32, "lora": {"r": 4, "alpha": 8}}
EVAL = ["eval_split=test", "eval_max_queries=24", "eval_corpus=split"]  # the resumed run's closing evaluation


@pytest.fixture(scope="module")
def resumed_run(code_dataset, tmp_path_factory):
    """Train 2 steps and stop; then ask for 4 steps with export + evaluation: the second run resumes.
    Beside the first run (independent of it): the same 4 steps in one run that opens with an evaluation
    (``straight``, for test_resumed_run_reproduces_the_uninterrupted_losses_with_dropout_on)."""
    root = tmp_path_factory.mktemp("train_run")
    sched = random_schedule(code_dataset, batch_size=8, K=2, folder=root / "schedules")
    cfg = write_config(root / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(root / "run"), student=STUDENT, max_steps=2, trace_ids=True, seed=3)
    straight_cfg = write_config(root / "straight.yaml", data=str(code_dataset), schedule=str(sched),
                                out=str(root / "straight"), student=STUDENT, max_steps=4, trace_ids=True, seed=3,
                                eval_split="test", eval_max_queries=8, eval_corpus="split")  # an evaluation runs
    first, straight = run_side_by_side([*B3, "train", "--config", str(cfg)],
                                       [*B3, "train", "--config", str(straight_cfg)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert straight.returncode == 0, straight.stderr[-3000:]
    trace_first = read_trace(root / "run")
    second = run([*B3, "train", "--config", str(cfg), "max_steps=4", "export=true", *EVAL], threads=2)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"root": root, "schedule": sched, "first": first, "second": second, "trace_first": trace_first,
            "summary": json.loads((root / "run" / "summary.json").read_text()), "data": code_dataset}


@pytest.mark.slow
def test_resume_continues_with_the_same_remaining_ids(resumed_run):
    trace = read_trace(resumed_run["root"] / "run")
    assert [t["step"] for t in trace] == [1, 2, 3, 4]
    assert trace[:2] == resumed_run["trace_first"]
    assert "resuming at step 2" in resumed_run["second"].stderr
    # The uninterrupted sequence, from the sampler alone.
    from b3stream.data.manifest import Manifest

    n = Manifest.load(resumed_run["data"]).split("train").n
    sampler = ScheduleSampler(load_schedule(resumed_run["schedule"]), n, seed=3)
    expected = [sampler.global_batch(i).tolist() for i in range(4)]
    assert [t["ids"] for t in trace] == expected
    assert len(set(sum(expected, []))) == 32  # no id twice within the epoch


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_losses_with_dropout_on(resumed_run):
    """One run of 4 steps with an opening evaluation == 2 steps without one + a resumed 2 (LoRA dropout
    0.05 and the backbone's 0.1 on): dropout masks depend on (seed, step, rank), never on what ran before,
    and train mode is set explicitly rather than left to whether an evaluation ran. The one run: the fixture's
    ``straight``, launched beside the first 2 steps."""
    root = resumed_run["root"]
    summary = json.loads((root / "straight" / "summary.json").read_text())
    assert set(summary["eval"]) == {"before", "after"}, summary["eval"]  # it did open with an evaluation
    straight = read_trace(root / "straight")
    resumed = read_trace(root / "run")
    assert [t["ids"] for t in straight] == [t["ids"] for t in resumed]
    np.testing.assert_allclose([t["loss"] for t in straight], [t["loss"] for t in resumed], rtol=1e-5)


def test_summary_and_monitoring(resumed_run):
    s = resumed_run["summary"]
    assert s["steps"] == 4 and s["ranks_in_sync"] is True
    assert set(s["eval"]) == {"after"}  # a resumed run does not re-run the zero-shot evaluation
    assert s["eval"]["after"]["queries"] == 24 and s["eval"]["after"]["corpus_mode"] == "split"
    assert list((resumed_run["root"] / "run" / "tb").glob("events.out.tfevents.*"))
    assert "step 4/4" in resumed_run["second"].stderr and "ex/s" in resumed_run["second"].stderr


def infonce_of_batches(encoder, data, batches: list[list[int]], tau: float) -> float:
    """The mean in-batch InfoNCE (query -> positive, the other members' positives as negatives) of ``batches``
    of train ids under ``encoder``, in plain numpy from the embeddings (not the trainer's loss code)."""
    from b3stream.data.manifest import Manifest
    from b3stream.data.reader import ShardedDataset

    manifest = Manifest.load(data)
    records = ShardedDataset(data, "train", manifest=manifest)
    losses = []
    for ids in batches:
        rows = [records[i] for i in ids]
        q = encoder.encode([manifest.prompted(r, "query") for r in rows], "query").astype(np.float64)
        d = encoder.encode([manifest.prompted(r, "positive") for r in rows], "positive").astype(np.float64)
        logits = q @ d.T / tau
        top = logits.max(1, keepdims=True)
        losses.append(np.mean(top[:, 0] + np.log(np.exp(logits - top).sum(1)) - np.diag(logits)))
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def trained_and_base(resumed_run):
    """b3stream's encoder with the run's exported adapter, and the untrained model (built once for the tests
    below: each load is a few seconds on two cores)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from b3stream.config import EncoderConfig, LoraConfig
    from b3stream.encoder import Encoder

    trained = Encoder(EncoderConfig(**{**STUDENT, "lora": LoraConfig(r=4, alpha=8)}), trainable=True)
    set_peft_model_state_dict(trained.model, load_file(str(resumed_run["root"] / "run" / "export" / "adapter"
                                                           / "adapter_model.safetensors")))
    base = Encoder(EncoderConfig(**{**STUDENT, "lora": LoraConfig(enabled=False)}))
    return trained, base


def test_training_lowered_the_loss_of_the_batches_it_trained_on(resumed_run, trained_and_base):
    """The 4 steps (2, then 2 resumed) were gradient steps: the exported adapter's InfoNCE over the 4 batches
    it trained on (dropout off) is below the untrained model's on the same batches (a run that did not train,
    exported the base weights or stepped the wrong way would not be)."""
    batches = [t["ids"] for t in read_trace(resumed_run["root"] / "run")]
    assert len(batches) == 4
    tau = TrainConfig().temperature  # the run's (its config leaves the default)
    trained, base = trained_and_base
    before = infonce_of_batches(base, resumed_run["data"], batches, tau)
    after = infonce_of_batches(trained, resumed_run["data"], batches, tau)
    print(f"\nInfoNCE of the 4 trained batches: untrained {before:.4f}, trained {after:.4f}")
    assert after < 0.97 * before, (before, after)  # 0.284 -> 0.267 here (-6%): half that is required


def test_sentence_transformers_export_matches_our_encoder(resumed_run, trained_and_base):
    """The exported folder, loaded by sentence-transformers offline, embeds like b3stream's encoder with the
    trained adapter (and like the merged model loaded through our encoder)."""
    from sentence_transformers import SentenceTransformer

    from b3stream.data.reader import ShardedDataset
    from b3stream.encoder import Encoder
    from b3stream.evaluate import encoder_config_for

    export = resumed_run["root"] / "run" / "export"
    assert (export / "adapter" / "adapter_config.json").is_file()
    assert (export / "merged" / "config.json").is_file()
    records = ShardedDataset(resumed_run["data"], "test")
    texts = [records[i]["positive"] for i in range(6)] + [records[i]["query"] for i in range(6)]

    st = SentenceTransformer(str(export / "sentence-transformers"), device="cpu")
    st_emb = st.encode_document(texts, convert_to_numpy=True, batch_size=4)
    st_queries = st.encode_query(texts, convert_to_numpy=True, batch_size=4)

    trained, untrained = trained_and_base
    ours = trained.encode(texts, "positive", batch_size=4)
    merged = Encoder(encoder_config_for(str(export / "sentence-transformers"))).encode(texts, "positive")
    base = untrained.encode(texts, "positive")

    np.testing.assert_allclose(st_emb, ours, atol=2e-5)
    np.testing.assert_allclose(st_queries, trained.encode(texts, "query", batch_size=4), atol=2e-5)
    np.testing.assert_allclose(merged, ours, atol=2e-5)
    print(f"\nLoRA run of `b3stream train`, export vs the trained adapter: max |diff| document "
          f"{np.abs(st_emb - ours).max():.2e}")
    assert np.abs(ours - base).max() > 1e-4, "the export should hold the trained weights, not the base"


@pytest.mark.slow
def test_evaluate_command_on_the_export(resumed_run, capsys):
    """`b3stream evaluate` on the export, through the command's entry in this process (the launched command:
    test_evaluate_beir.py::test_evaluate_command_on_a_beir_folder), scores as the trainer's closing evaluation
    did (the same queries and corpus)."""
    from b3stream.cli import main

    export = resumed_run["root"] / "run" / "export" / "sentence-transformers"
    out = resumed_run["root"] / "eval.json"
    code = main(["evaluate", "--model", str(export), "--data", str(resumed_run["data"]), "--max-queries", "24",
                 "--corpus", "split", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "ndcg@10" in printed.out
    metrics = json.loads(out.read_text())
    after = resumed_run["summary"]["eval"]["after"]
    assert metrics["queries"] == after["queries"] and metrics["corpus"] == after["corpus"]
    assert metrics["ndcg@10"] == pytest.approx(after["ndcg@10"], abs=0.02)


# -- refusals, before any training ----------------------------------------------------------------------


@pytest.mark.slow
def test_one_fused_forward_trains_the_same_batches(resumed_run):
    """fuse_sides (the GPU default) through the real engine on CPU: the same batches as the run with a
    forward per side and the same loss up to dropout noise (the masks differ; tau = 1 keeps that small).
    The two runs are independent: side by side."""
    root = resumed_run["root"]
    configs = {fuse: write_config(root / f"fuse-{fuse}.yaml", data=str(resumed_run["data"]),
                                  schedule=str(resumed_run["schedule"]), out=str(root / f"fuse-{fuse}"),
                                  student=STUDENT, max_steps=1, trace_ids=True, seed=3, eval_split=None,
                                  temperature=1.0, export=False, fuse_sides=fuse == "true")
               for fuse in ("true", "false")}
    for res in run_side_by_side(*([*B3, "train", "--config", str(cfg)] for cfg in configs.values())):
        assert res.returncode == 0, res.stderr[-3000:]
    losses = {fuse: read_trace(root / f"fuse-{fuse}") for fuse in configs}
    assert all(len(trace) == 1 for trace in losses.values())
    assert [t["ids"] for t in losses["true"]] == [t["ids"] for t in losses["false"]]
    assert losses["true"][0]["loss"] == pytest.approx(losses["false"][0]["loss"], rel=0.05)


def test_unknown_config_key_is_refused(tmp_path, code_dataset, capfd):
    cfg = write_config(tmp_path / "bad.yaml", data=str(code_dataset), schedule="x", learning_rate=1e-4)
    code, err = refused_in_process(["train", "--config", str(cfg)], capfd)
    assert code == 2, err[-2000:]
    assert "unknown key(s) 'learning_rate'" in err


@pytest.mark.slow
def test_schedule_for_other_data_is_refused_before_the_model_loads(tmp_path, code_dataset, toy_dataset, capfd):
    """Refused in setup's first stage, after the (one-process) group is up and before the model loads: in this
    process, so that what a load would print to the terminal is seen too."""
    sched = random_schedule(toy_dataset, batch_size=8, folder=tmp_path / "toy_sched")
    cfg = write_config(tmp_path / "bad.yaml", data=str(code_dataset), schedule=str(sched), out=str(tmp_path / "r"))
    start = time.time()
    code, err = refused_in_process(["train", "--config", str(cfg)], capfd)
    assert code == 2, err[-2000:]
    assert "built for data 'toy'" in err and "rebuild it for this data" in err
    assert "Loading weights" not in err and "step 1/" not in err
    assert time.time() - start < 60
    assert not (tmp_path / "r").exists()


def test_deepspeed_json_may_not_restate_our_settings(tmp_path):
    cfg = TrainConfig(lr=1e-4)
    bad = json.loads(resolve_ds_path("zero2").read_text())
    bad["optimizer"]["params"]["lr"] = 0.1
    (tmp_path / "ds.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="optimizer.params.lr = 0.1"):
        build_ds_config(cfg, tmp_path / "ds.json", 1, 32, 100, "fp32")
    ds = build_ds_config(cfg, resolve_ds_path("zero2"), 2, 32, 100, "fp32")
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and "scheduler" not in ds  # the schedule is lr_schedule's
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match="does not divide over 3 ranks"):
        build_ds_config(cfg, resolve_ds_path("zero2"), 3, 32, 100, "fp32")
    # GradCache under ZeRO-3 is allowed (its gradients are tested equal to the plain ones in the 2-rank check)
    ds3 = build_ds_config(TrainConfig(grad_cache_chunk=8), resolve_ds_path("zero3"), 1, 32, 100, "fp32")
    assert ds3["zero_optimization"]["stage"] == 3
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload"):
        build_ds_config(cfg, resolve_ds_path(name), 1, 32, 100, "fp32")


def test_precision_on_cpu_is_fp32():
    from b3stream.train.ds_config import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("bf16", torch.device("cpu"))

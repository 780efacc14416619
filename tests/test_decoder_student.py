"""Decoder-LLM students, on a tiny randomly initialised Llama built from a config (no download): last-token
pooling over an appended EOS with left padding, attention implementation, Hugging Face gradient
checkpointing, LoRA on the architecture's own projection names."""

from __future__ import annotations

import json

import pytest
import torch

from b3stream.config import EncoderConfig, LoraConfig
from b3stream.encoder import Encoder

from ._train_util import write_tiny_llama

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama (hidden 32) and a word-level tokenizer whose EOS is never added by the tokenizer."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


TEXTS = ["open a file and read its lines", "return sorted list", "parse the date string to x and y of a list"]


def test_last_token_pooling_reads_the_appended_eos_whatever_the_padding(tiny_llama):
    """Each text's pooled vector equals the hidden state of its own EOS when run alone, in a left-padded
    batch (the encoder's choice for `last`) and in a right-padded one."""
    enc = Encoder(EncoderConfig(model=str(tiny_llama), pooling="last", normalize=False,
                                lora=LoraConfig(enabled=False)))
    assert enc.tokenizer.padding_side == "left"
    batch = enc.tokenize(TEXTS, "positive")
    assert (batch["input_ids"][:, -1] == enc.tokenizer.eos_token_id).all()  # EOS last in every row
    alone = []
    for text in TEXTS:
        ids = enc.tokenize([text], "positive")["input_ids"]
        assert ids[0, -1] == enc.tokenizer.eos_token_id and (ids == enc.tokenizer.eos_token_id).sum() == 1
        with torch.no_grad():
            alone.append(enc.model(input_ids=ids).last_hidden_state[0, -1])
    alone = torch.stack(alone)
    with torch.no_grad():
        left = enc(**batch)
        enc.tokenizer.padding_side = "right"
        right_batch = enc.tokenize(TEXTS, "positive")
        right = enc(**right_batch)
    assert (right_batch["attention_mask"][:, -1] == 0).any()  # the check sees right padding
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-4)
    # truncation keeps the EOS
    short = Encoder(EncoderConfig(model=str(tiny_llama), pooling="last", max_positive_length=4,
                                  lora=LoraConfig(enabled=False))).tokenize(TEXTS, "positive")["input_ids"]
    assert short.shape[1] == 4 and (short[:, -1] == 1).all()


def test_attention_checkpointing_and_lora_for_a_decoder(tiny_llama):
    enc = Encoder(EncoderConfig(model=str(tiny_llama), pooling="last", attn_implementation="eager",
                                gradient_checkpointing=True, lora=LoraConfig(r=4, alpha=8)), trainable=True)
    assert enc.model.config._attn_implementation == "eager"
    assert enc.model.base_model.model.is_gradient_checkpointing
    trainable = {n.split(".")[-4] for n, p in enc.model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}  # PEFT's targets for Llama, not BERT's query/value
    enc.train()
    out = enc(**enc.tokenize(TEXTS, "query"))
    out.pow(2).sum().backward()
    grads = [p.grad for n, p in enc.model.named_parameters() if p.requires_grad and "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    from b3stream.config import ConfigError, TrainConfig, from_dict, validate

    with pytest.raises(ConfigError, match="attn_implementation: must be one of eager, sdpa, flash_attention_2"):
        validate(from_dict(TrainConfig, {"student": {"attn_implementation": "fast"}}))


@pytest.mark.slow
def test_zero3_loads_each_rank_a_share_of_the_student(tiny_llama, code_dataset, tmp_path):
    """Two ranks, a LoRA decoder student with last-token pooling and GradCache: under ZeRO-3 the backbone is
    built inside zero.Init, so right after loading each rank holds about half of the weights (ZeRO-0: all of
    them), and both train."""
    from b3stream.dist import free_port

    from ._train_util import random_schedule, torchrun, write_config

    sched = random_schedule(code_dataset, batch_size=8, folder=tmp_path / "schedules")
    held = {}
    for stage in (0, 3):
        cfg = write_config(tmp_path / f"zero{stage}.yaml", data=str(code_dataset), schedule=str(sched.parent),
                           out=str(tmp_path / f"run{stage}"), deepspeed=f"zero{stage}", max_steps=2,
                           grad_cache_chunk=2,  # the 7B recipe's combination: ZeRO-3, LoRA, GradCache
                           student={"model": str(tiny_llama), "pooling": "last",
                                    "max_query_length": 16, "max_positive_length": 24})
        res = torchrun(2, ["-m", "b3stream.train", "--config", str(cfg)], free_port(), timeout=300)
        assert res.returncode == 0, res.stderr[-4000:]
        summary = json.loads((tmp_path / f"run{stage}" / "summary.json").read_text())
        assert summary["zero_stage"] == stage and summary["steps"] == 2
        held[stage] = summary["memory"]["student_bytes_at_load"]
        assert len(held[stage]) == 2 and all(g > 0 for g in summary["memory"]["peak_rss_gb"])
    whole = Encoder(EncoderConfig(model=str(tiny_llama), pooling="last", lora=LoraConfig(r=4, alpha=8)),
                    trainable=True)
    full = sum(p.numel() * p.element_size() for p in whole.parameters())
    assert held[0] == [full, full]
    lora = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if "lora_" in n)
    for share in held[3]:  # the backbone split in two (up to padding), the small LoRA weights whole
        assert share - lora == pytest.approx((full - lora) / 2, rel=0.02), (share, full, lora)


@pytest.mark.slow
def test_a_bf16_run_exports_the_fp32_master_weights(tiny_llama, code_dataset, tmp_path):
    """bf16 full fine-tuning under ZeRO-2 and ZeRO-3 (two ranks, on CPU), three optimizer steps, then the
    trainer's export: the merged model on disk is DeepSpeed's fp32 master copy, not the bf16 weights the
    forward ran on, and the module holds its bf16 weights again afterwards."""
    from b3stream.dist import free_port

    from ._train_util import REPO, torchrun

    out = tmp_path / "export.json"
    res = torchrun(2, [str(REPO / "tests" / "_export_check.py"), str(out), str(tiny_llama), str(code_dataset)],
                   free_port(), timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    results = json.loads(out.read_text())
    for stage in ("zero2", "zero3"):
        r = results[stage]
        assert r["module_dtype"] == "torch.bfloat16" and r["dtype_on_disk"] == ["torch.float32"], r
        assert r["vs_master"] == 0.0, r
        assert r["vs_bf16_module"] > 1e-4, r  # the masters are not the bf16 copy: the check can tell them apart
    assert results["zero2"]["restored"] is True

"""The sentence-transformers export reloads as it trained: ``SentenceTransformer(RUN/export/sentence-transformers)``
with ``encode_query`` / ``encode_document`` gives the trainer's vectors (prompts, the per-side lengths, the
pooling mode, a starting folder's Dense and Normalize, a decoder's appended EOS), for a LoRA student (merged),
a full fine-tune and a decoder student. The max |diff| of each is printed (``pytest -s``)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from b3stream.config import EncoderConfig, LoraConfig
from b3stream.encoder import Encoder
from b3stream.evaluate import encoder_config_for
from b3stream.train.export import export_all

from ._train_util import moved_student, random_schedule, run, write_config, write_tiny_llama
from .test_st_folders import st_folder

TEXTS = ["Return the sorted list.", "def f(xs):\n    return sorted(xs)", "parse the date string to x and y of a list",
         "open a file and read its lines " * 40]  # longer than both lengths: cut where training cut it
PROMPTS = {"query": "Represent this query: ", "document": "passage: "}


def diff_to_trainer(encoder, folder, prompts=PROMPTS) -> dict:
    """max |diff| between sentence-transformers on ``folder`` and ``encoder`` on the prompted texts, per side."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    q = encoder.encode([prompts.get("query", "") + t for t in TEXTS], "query", batch_size=2)
    d = encoder.encode([prompts.get("document", "") + t for t in TEXTS], "positive", batch_size=2)
    return {"query": float(np.abs(st.encode_query(TEXTS, batch_size=2) - q).max()),
            "document": float(np.abs(st.encode_document(TEXTS, batch_size=2) - d).max())}


@pytest.mark.slow
def test_a_lora_students_export_embeds_as_the_student(tmp_path):
    """Merged LoRA weights, the dataset's prompts as the model's, queries cut at 16 tokens and documents at 40
    (one max_seq_length would have cut queries at 40)."""
    student = moved_student(EncoderConfig(max_query_length=16, max_positive_length=40, lora=LoraConfig(r=4, alpha=8)))
    paths = export_all(student, tmp_path / "export", PROMPTS)
    folder = tmp_path / "export" / "sentence-transformers"
    assert paths["sentence_transformers"] == str(folder) and "adapter" in paths
    diff = diff_to_trainer(student, folder)
    print(f"\nLoRA (merged) export: max |diff| query {diff['query']:.2e}, document {diff['document']:.2e}")
    assert max(diff.values()) < 1e-5
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    assert (config["query_length"], config["document_length"]) == (16, 40)
    from sentence_transformers import SentenceTransformer

    assert SentenceTransformer(str(folder), device="cpu").max_seq_length == 40
    # b3stream reads its export back the same way: lengths per side, prompts, pooling
    cfg = encoder_config_for(str(folder))
    assert (cfg.max_query_length, cfg.max_positive_length) == (16, 40)
    again = Encoder(cfg)
    assert again.prompts == {"query": PROMPTS["query"], "positive": PROMPTS["document"]}
    np.testing.assert_allclose(again.encode([PROMPTS["query"] + t for t in TEXTS], "query"),
                               student.encode([PROMPTS["query"] + t for t in TEXTS], "query"), atol=1e-5)


@pytest.mark.slow
def test_a_full_fine_tune_of_a_dense_folder_exports_its_modules(tmp_path):
    """A student started from a sentence-transformers folder with max pooling and a Dense: the export holds the
    same modules (the Dense as loaded: it is frozen), and embeds as the student."""
    start = st_folder(tmp_path / "start", mode="max", dense=24)
    student = moved_student(EncoderConfig(model=str(start), max_query_length=24, lora=LoraConfig(enabled=False)))
    export_all(student, tmp_path / "export", {"query": "q: "})
    folder = tmp_path / "export" / "sentence-transformers"
    kinds = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert kinds == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "max"
    diff = diff_to_trainer(student, folder, {"query": "q: "})
    print(f"\nfull fine-tune (max pooling + Dense) export: max |diff| query {diff['query']:.2e}, "
          f"document {diff['document']:.2e}")
    assert max(diff.values()) < 1e-5


def test_a_decoder_students_export_appends_the_eos(tmp_path, monkeypatch):
    """pooling: last appends the EOS to every text: the export's tokenizer does too (kept when truncating), and
    sentence-transformers' lasttoken pooling reads it. A folder whose tokenizer would not is refused (the adapter
    and merged model are still written)."""
    from transformers import AutoTokenizer

    llama = write_tiny_llama(tmp_path / "llama")
    cfg = EncoderConfig(model=str(llama), pooling="last", max_query_length=8, max_positive_length=20,
                        lora=LoraConfig(r=4, alpha=8))
    student = moved_student(cfg)
    export_all(student, tmp_path / "export", PROMPTS)
    folder = tmp_path / "export" / "sentence-transformers"
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok("open a file")["input_ids"][-1] == tok.eos_token_id
    assert json.loads((folder / "1_Pooling" / "config.json").read_text())["pooling_mode"] == "lasttoken"
    diff = diff_to_trainer(student, folder)
    print(f"\ndecoder (last token over an appended EOS, LoRA) export: max |diff| query {diff['query']:.2e}, "
          f"document {diff['document']:.2e}")
    assert max(diff.values()) < 1e-5
    again = Encoder(encoder_config_for(str(folder)))  # lasttoken: the tokenizer's own EOS, nothing appended twice
    assert again.cfg.pooling == "lasttoken" and not again.tokenize.append_eos
    np.testing.assert_allclose(again.encode(["Find: " + t for t in TEXTS], "positive"),
                               student.encode(["Find: " + t for t in TEXTS], "positive"), atol=1e-5)

    monkeypatch.setattr("b3stream.train.export.append_eos", lambda tokenizer: None)
    paths = export_all(student, tmp_path / "bad", PROMPTS)
    assert "sentence_transformers" not in paths and "the ids" in paths["sentence_transformers_refused"]
    assert not (tmp_path / "bad" / "sentence-transformers").exists() and (tmp_path / "bad" / "merged").is_dir()


@pytest.mark.slow
def test_a_trained_decoder_full_fine_tune_reloads_as_it_trained(code_dataset, tmp_path):
    """`b3stream train` on the tiny Llama (full fine-tuning, pooling last, 2 steps, export): the export loaded
    by sentence-transformers embeds as b3stream's encoder does with the trained weights and the run's settings."""
    llama = write_tiny_llama(tmp_path / "llama")
    student = {"model": str(llama), "pooling": "last", "max_query_length": 8, "max_positive_length": 20,
               "lora": {"enabled": False}}
    sched = random_schedule(code_dataset, batch_size=8, K=2, folder=tmp_path / "schedules")
    cfg = write_config(tmp_path / "train.yaml", data=str(code_dataset), schedule=str(sched.parent),
                       out=str(tmp_path / "run"), student=student, max_steps=2, export=True, lr=1e-3)
    res = run([sys.executable, "-m", "b3stream", "train", "--config", str(cfg)], threads=2, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    export = tmp_path / "run" / "export"
    trained = Encoder(EncoderConfig(**{**student, "model": str(export / "merged"), "lora": LoraConfig(enabled=False)}))
    base = Encoder(EncoderConfig(**{**student, "lora": LoraConfig(enabled=False)}))
    assert np.abs(trained.encode(TEXTS, "positive") - base.encode(TEXTS, "positive")).max() > 1e-4  # it moved
    diff = diff_to_trainer(trained, export / "sentence-transformers", {})
    print(f"\ndecoder full fine-tune, trained by `b3stream train`: max |diff| query {diff['query']:.2e}, "
          f"document {diff['document']:.2e}")
    assert max(diff.values()) < 1e-5

"""Students and teachers from sentence-transformers folders are built as sentence-transformers builds them:
every Pooling mode, Dense / LayerNorm / Normalize modules, the folder's lengths and prompts; a folder b3stream
cannot build faithfully is refused, naming the module, when the config is checked. Folders are written with
sentence-transformers' own save from the bundled MiniLM."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from b3stream.config import ConfigError, EncoderConfig, LoraConfig, TrainConfig, from_dict, validate
from b3stream.encoder import Encoder, default_model_path, model_prompts, settled, with_model_prompts

TEXTS = ["Return the sorted list.", "def f(xs):\n    return sorted(xs)", "parse a date string into a datetime",
         "open the file and read all of its lines " * 12]


def st_folder(path, mode="mean", dense: int | None = None, normalize=True, prompts=None, layer_norm=False,
              query_length=None, document_length=None, max_seq_length=None):
    """A sentence-transformers folder around the bundled MiniLM, saved by sentence-transformers itself."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm, Normalize, Pooling, Transformer

    torch.manual_seed(0)
    modules = [Transformer(default_model_path(), max_seq_length=max_seq_length, query_length=query_length,
                           document_length=document_length)]
    modules.append(Pooling(384, mode))
    width = modules[-1].pooling_output_dimension
    if dense:
        modules.append(Dense(width, dense))
        width = dense
    if layer_norm:
        modules.append(LayerNorm(width))
        with torch.no_grad():  # not the identity: the check can see it
            modules[-1].norm.weight.uniform_(0.5, 1.5)
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, prompts=prompts, device="cpu").save(str(path), create_model_card=False)
    return path


def reference(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["max", "weightedmean", "mean_sqrt_len_tokens", "lasttoken", ("cls", "mean")])
def test_every_pooling_mode_embeds_as_sentence_transformers(tmp_path, mode):
    folder = st_folder(tmp_path / "st", mode=mode, normalize=mode != "mean_sqrt_len_tokens")
    enc = Encoder(EncoderConfig(model=str(folder), max_query_length=256))
    assert enc.cfg.pooling == (mode if isinstance(mode, str) else "cls+mean")
    ours = enc.encode(TEXTS, "positive", batch_size=3)
    ref = reference(folder).encode_document(TEXTS, batch_size=3)
    assert ours.shape == ref.shape == (len(TEXTS), 768 if isinstance(mode, tuple) else 384)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert enc.dim == ref.shape[1]


@pytest.mark.slow
def test_dense_layer_norm_and_normalize_are_applied_in_order(tmp_path):
    folder = st_folder(tmp_path / "st", mode="max", dense=32, layer_norm=True)
    enc = Encoder(EncoderConfig(model=str(folder)))
    assert [type(m).__name__ for m in enc.head.steps] == ["Pooling", "Dense", "LayerNorm", "Normalize"]
    assert enc.dim == 32
    np.testing.assert_allclose(enc.encode(TEXTS, "positive"), reference(folder).encode_document(TEXTS), atol=2e-5)
    # normalize: false drops the folder's Normalize; the explicit value wins, as for pooling
    raw = Encoder(EncoderConfig(model=str(folder), normalize=False)).encode(TEXTS, "positive")
    assert abs(np.linalg.norm(raw, axis=1) - 1).max() > 1e-3


def test_a_dense_student_trains_its_backbone_only(tmp_path):
    """LoRA on the backbone; the folder's Dense is applied, frozen, and passes the gradient through."""
    folder = st_folder(tmp_path / "st", dense=16)
    enc = Encoder(EncoderConfig(model=str(folder), lora=LoraConfig(r=4, alpha=8)), trainable=True)
    batch = enc.tokenize(TEXTS[:2], "query")
    emb = enc(**batch)
    assert emb.shape == (2, 16)
    emb.sum().backward()
    assert all(p.grad is None for p in enc.head.parameters()) and not any(p.requires_grad for p in enc.head.parameters())
    lora = [p for n, p in enc.model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_an_explicit_pooling_that_changes_the_width_a_dense_takes_is_refused(tmp_path):
    folder = st_folder(tmp_path / "st", mode=("cls", "mean"), dense=16)
    with pytest.raises(ConfigError, match="pooling 'mean' gives 384 dimensions"):
        Encoder(EncoderConfig(model=str(folder), pooling="mean"))
    plain = st_folder(tmp_path / "plain", mode="mean")  # no Dense: the explicit pooling simply replaces it
    enc = Encoder(EncoderConfig(model=str(plain), pooling="cls"))
    assert enc.head.steps[0].pooling_mode == "cls"


def test_the_folders_lengths_bound_the_configured_ones(tmp_path, capsys):
    """sentence-transformers >= 6 keeps max_seq_length in the tokenizer and per-task lengths in its config:
    queries and documents are cut where encode_query / encode_document cut them."""
    folder = st_folder(tmp_path / "st", max_seq_length=40, query_length=12)
    cfg = settled(EncoderConfig(model=str(folder)))
    assert (cfg.max_query_length, cfg.max_positive_length) == (12, 40)
    enc = Encoder(EncoderConfig(model=str(folder)))
    assert "at most 12 query / 40 document tokens" in capsys.readouterr().err
    st = reference(folder)
    np.testing.assert_allclose(enc.encode(TEXTS, "query"), st.encode_query(TEXTS), atol=2e-5)
    np.testing.assert_allclose(enc.encode(TEXTS, "positive"), st.encode_document(TEXTS), atol=2e-5)
    # the bundled MiniLM (256, sentence-transformers 2 format) leaves the defaults as they are
    assert settled(EncoderConfig()).max_positive_length == 256


def test_the_models_prompts_serve_where_the_dataset_has_none(tmp_path, toy_dataset):
    """E5-style prompts: the query prompt for queries, the passage prompt for positives, unless the dataset (or
    a task) sets its own; an empty dataset prompt switches the model's off."""
    import dataclasses

    from b3stream.data.manifest import Manifest

    folder = st_folder(tmp_path / "st", prompts={"query": "query: ", "passage": "passage: "})
    assert model_prompts(EncoderConfig(model=str(folder))) == {"query": "query: ", "positive": "passage: "}
    enc = Encoder(EncoderConfig(model=str(folder)))
    assert enc.prompts == {"query": "query: ", "positive": "passage: "}
    base = Manifest.load(toy_dataset)
    plain = dataclasses.replace(base, prompts={})
    rec = {"query": "sort a list", "positive": "def f(): pass", "task": "t0"}
    merged = with_model_prompts(plain, enc.prompts)
    assert merged.prompted(rec, "query") == "query: sort a list" and plain.prompts == {}
    assert merged.prompted(rec, "positive") == "passage: def f(): pass"
    own = dataclasses.replace(base, prompts={"t0": {"query": "Find code: "}, "default": {"positive": ""}})
    kept = with_model_prompts(own, enc.prompts)
    assert kept.prompted(rec, "query") == "Find code: sort a list"  # the task's own
    assert kept.prompted({**rec, "task": "t1"}, "query") == "query: sort a list"  # another task: the model's
    assert kept.prompted(rec, "positive") == "def f(): pass"  # the dataset switched it off
    st = reference(folder)
    texts = [merged.prompted({"query": t, "positive": t}, "query") for t in TEXTS]
    enc = Encoder(EncoderConfig(model=str(folder), max_query_length=256))  # sentence-transformers' length
    np.testing.assert_allclose(enc.encode(texts, "query"), st.encode_query(TEXTS), atol=2e-5)
    assert with_model_prompts(plain, {"query": "", "positive": ""}) is plain


def _edit(folder, path, **changes):
    data = json.loads((folder / path).read_text())
    data.update(changes)
    (folder / path).write_text(json.dumps(data))


def _refused(folder, match):
    with pytest.raises(ConfigError, match="student.model: .*" + match):  # when the config is checked
        validate(from_dict(TrainConfig, {"student": {"model": str(folder)}}))
    with pytest.raises(ConfigError, match=match):
        Encoder(EncoderConfig(model=str(folder)))


def test_a_folder_b3stream_cannot_build_faithfully_is_refused_naming_why(tmp_path):
    base = st_folder(tmp_path / "base", dense=16)

    def copy(name):
        return shutil.copytree(base, tmp_path / name)

    folder = copy("wlp")  # a module b3stream does not apply
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(1, {"idx": 1, "name": "x", "path": "1_WLP",
                       "type": "sentence_transformers.sentence_transformer.modules.WeightedLayerPooling"})
    (folder / "modules.json").write_text(json.dumps(modules))
    _refused(folder, r"module 1 \(sentence_transformers.*WeightedLayerPooling, path '1_WLP'\) "
                     "is not supported by b3stream")
    folder = copy("custom")  # a module class of the folder's own code
    modules = json.loads((folder / "modules.json").read_text())
    modules[2]["type"] = "my_code.Projection"
    (folder / "modules.json").write_text(json.dumps(modules))
    _refused(folder, r"module 2 \(my_code.Projection, path '2_Dense'\) is not supported")
    folder = copy("prompt")  # INSTRUCTOR-style pooling that leaves the prompt out
    _edit(folder, "1_Pooling/config.json", include_prompt=False)
    _refused(folder, "include_prompt: false")
    folder = copy("activation")
    _edit(folder, "2_Dense/config.json", activation_function="my_code.Swish")
    _refused(folder, "activation 'my_code.Swish' is code outside torch")
    folder = copy("setting")
    _edit(folder, "sentence_bert_config.json", transformer_task="fill-mask")
    _refused(folder, "transformer_task: 'fill-mask' is not supported")
    folder = copy("nopool")
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Pooling")]
    (folder / "modules.json").write_text(json.dumps(modules))
    _refused(folder, "no Pooling module")


def test_do_lower_case_is_honoured(tmp_path):
    """`do_lower_case: true` (sentence_bert_config.json): texts are lowercased as sentence-transformers does,
    on a tokenizer that is cased (the tiny Llama's word-level one: capitals are unknown words)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer

    from ._train_util import write_tiny_llama

    llama = write_tiny_llama(tmp_path / "llama")
    tok = AutoTokenizer.from_pretrained(str(llama))
    tok.pad_token = tok.eos_token  # sentence-transformers pads with it
    tok.save_pretrained(str(llama))
    folder = tmp_path / "st"
    SentenceTransformer(modules=[Transformer(str(llama)), Pooling(32, "mean")], device="cpu").save(
        str(folder), create_model_card=False)
    texts = ["OPEN a FILE and Read", "open a file and read"]
    cased = Encoder(EncoderConfig(model=str(folder))).encode(texts, "positive")
    assert np.abs(cased[0] - cased[1]).max() > 1e-3
    _edit(folder, "sentence_bert_config.json", do_lower_case=True)
    ours = Encoder(EncoderConfig(model=str(folder))).encode(texts, "positive")
    np.testing.assert_allclose(ours[0], ours[1], atol=1e-6)
    np.testing.assert_allclose(ours, reference(folder).encode_document(texts), atol=1e-6)

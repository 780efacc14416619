"""The shared encoder: bundled MiniLM loads offline and matches sentence-transformers; pooling variants."""

import numpy as np
import pytest
import torch

from b3stream.config import EncoderConfig
from b3stream.encoder import Encoder, pool


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = Encoder(EncoderConfig())
    texts = ["Return the sorted list.", "def f(xs):\n    return sorted(xs)", "parse a date string"]
    ours = enc.encode(texts, side="positive", batch_size=2)
    ref = SentenceTransformer(enc.path, device="cpu").encode(texts)
    assert ours.shape == (3, 384)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_pooling_last_token_handles_both_paddings():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]
    assert pool(hidden, right, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 5.5]


@pytest.mark.slow
def test_encode_restores_each_modules_own_mode():
    """``encode`` must not switch on dropout that was off: training would depend on whether an evaluation
    ran before it."""
    from b3stream.config import LoraConfig

    enc = Encoder(EncoderConfig(lora=LoraConfig(r=4, alpha=8)), trainable=True)
    dropouts = [m for m in enc.model.modules() if isinstance(m, torch.nn.Dropout)]
    modes = [m.training for m in enc.model.modules()]
    assert any(m.training for m in dropouts) and not all(m.training for m in dropouts)  # from_pretrained + LoRA
    enc.encode(["a query", "another"], "query")
    assert [m.training for m in enc.model.modules()] == modes
    enc.model.train()
    enc.encode(["a query"], "query")
    assert all(m.training for m in dropouts)


@pytest.mark.slow
def test_a_sentence_transformers_folder_sets_pooling_and_normalisation(tmp_path):
    """A model exported with CLS pooling and no Normalize module is embedded that way when the config leaves
    pooling on auto (the default); an explicit pooling wins."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    folder = tmp_path / "st-cls"
    shutil.copytree(Encoder(EncoderConfig()).path, folder)
    flags = json.loads((folder / "1_Pooling" / "config.json").read_text())
    flags.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    modules = [m for m in json.loads((folder / "modules.json").read_text()) if not m["type"].endswith("Normalize")]
    (folder / "modules.json").write_text(json.dumps(modules))
    texts = ["Return the sorted list.", "def f(xs):\n    return sorted(xs)"]
    enc = Encoder(EncoderConfig(model=str(folder), max_positive_length=256))
    assert (enc.cfg.pooling, enc.cfg.normalize) == ("cls", False)
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts)
    np.testing.assert_allclose(enc.encode(texts, side="positive"), ref, atol=1e-5)
    assert abs(np.linalg.norm(ref, axis=1) - 1).max() > 0.1  # not normalised: the check can see it
    assert Encoder(EncoderConfig(model=str(folder), pooling="mean")).cfg.pooling == "mean"


@pytest.mark.slow
def test_a_saved_adapter_is_continued(tmp_path):
    """`student.adapter`: the student starts from a saved LoRA adapter (trainable, the same embeddings as
    the model that saved it); a teacher embeds with it frozen; a folder that is no adapter is refused."""
    import pytest

    from b3stream.config import ConfigError, LoraConfig, TrainConfig, from_dict, validate

    from ._train_util import moved_student

    first = moved_student(EncoderConfig(lora=LoraConfig(r=4, alpha=8)), seed=0)
    first.model.save_pretrained(str(tmp_path / "adapter"))
    texts = ["open a file and read its lines", "def read(path):\n    return open(path).read()"]
    before = first.encode(texts, "positive")
    again = Encoder(EncoderConfig(adapter=str(tmp_path / "adapter")), trainable=True)
    trainable = [n for n, p in again.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    np.testing.assert_allclose(again.encode(texts, "positive"), before, atol=1e-5)
    assert np.abs(before - Encoder(EncoderConfig()).encode(texts, "positive")).max() > 1e-3  # it moved
    frozen = Encoder(EncoderConfig(adapter=str(tmp_path / "adapter")), trainable=False)
    assert not any(p.requires_grad for p in frozen.model.parameters())
    np.testing.assert_allclose(frozen.encode(texts, "positive"), before, atol=1e-5)
    with pytest.raises(ConfigError, match="student.adapter: .* is not a saved PEFT adapter"):
        validate(from_dict(TrainConfig, {"student": {"adapter": str(tmp_path)}}))

"""Exporting the trained student: LoRA adapter, merged model, sentence-transformers folder.

    RUN/export/adapter/                PEFT adapter only (adapter_config.json + weights); LoRA runs only
    RUN/export/merged/                 the adapter merged into a fresh copy of the base model:
                                       ``AutoModel.from_pretrained`` + tokenizer
    RUN/export/sentence-transformers/  the merged model + modules.json (Transformer, Pooling, Normalize)
                                       so ``SentenceTransformer(path)`` embeds exactly like our Encoder

The merge happens on a fresh base model loaded from disk, not on the live training model, so exporting
never alters the weights of a run that may continue (and works the same for any ZeRO stage once the
adapter is on disk). A bf16 / fp16 run exports DeepSpeed's fp32 master weights (:func:`master_weights`), not
the rounded copy the forward runs on.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..encoder import Encoder, resolve_model

_POOLING_FLAGS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                  "last": "pooling_mode_lasttoken"}


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_adapter(encoder: Encoder, folder: Path) -> Path | None:
    """The PEFT adapter of a LoRA student (None for full fine-tuning)."""
    if not _is_peft(encoder.model):
        return None
    encoder.model.save_pretrained(str(folder))
    return folder


def save_merged(encoder: Encoder, folder: Path, adapter: Path | None, dtype: torch.dtype = torch.float32) -> Path:
    """A plain HF model (+ tokenizer) with the adapter folded into the base weights."""
    from transformers import AutoModel

    if adapter is not None:
        from peft import PeftModel

        base = AutoModel.from_pretrained(resolve_model(encoder.cfg.model), dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.to(dtype).save_pretrained(str(folder))
    else:  # full fine-tuning: the live weights, as they are
        encoder.model.save_pretrained(str(folder))
    encoder.tokenizer.save_pretrained(str(folder))
    return folder


def write_sentence_transformers(encoder: Encoder, merged: Path, folder: Path,
                                prompts: dict[str, str] | None = None) -> Path:
    """A sentence-transformers folder around the merged model, with our pooling and normalisation."""
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(merged, folder)
    cfg = encoder.cfg
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": encoder.dim, **{flag: False for flag in
               ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")},
               "include_prompt": True}
    pooling[_POOLING_FLAGS[cfg.pooling]] = True
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    if cfg.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    # One max length in sentence-transformers: the positives' (queries are shorter).
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max(cfg.max_query_length, cfg.max_positive_length), "do_lower_case": False}, indent=2))
    st_config = {"prompts": {k: v for k, v in (prompts or {}).items() if v}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine" if cfg.normalize else "dot"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2))
    return folder


def export_all(encoder: Encoder, out: Path, prompts: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Write adapter (LoRA only), merged model and sentence-transformers folder under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    adapter = save_adapter(encoder, out / "adapter")
    merged = save_merged(encoder, out / "merged", adapter, dtype=dtype)
    st = write_sentence_transformers(encoder, merged, out / "sentence-transformers", prompts)
    paths = {"merged": str(merged), "sentence_transformers": str(st)}
    if adapter is not None:
        paths["adapter"] = str(adapter)
    return paths


@contextmanager
def master_weights(engine):
    """Within the block every trainable parameter of ``engine.module`` holds DeepSpeed's full fp32 master copy
    (``safe_get_full_fp32_param``: ZeRO 1-3 and the bf16 optimizer keep one) instead of the bf16 / fp16 copy
    the forward runs on; restored afterwards, so a run may go on. Yields the number of parameters swapped (0:
    the optimizer keeps no fp32 copy, and the module's own weights are what there is). Under ZeRO-3 every rank
    must enter (the masters are gathered), inside ``GatheredParameters``."""
    from deepspeed.utils import safe_get_full_fp32_param

    saved = []
    try:
        for p in engine.module.parameters():
            if not p.requires_grad:
                continue
            master = safe_get_full_fp32_param(p)
            if master is not None:
                saved.append((p, p.data))
                p.data = master.detach().to(p.device).reshape(p.data.shape)
        yield len(saved)
    finally:
        for p, data in saved:
            p.data = data

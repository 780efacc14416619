"""Exporting the trained student: LoRA adapter, merged model, sentence-transformers folder.

    RUN/export/adapter/                PEFT adapter only (adapter_config.json + weights); LoRA runs only
    RUN/export/merged/                 the adapter merged into a fresh copy of the base model:
                                       ``AutoModel.from_pretrained`` + tokenizer
    RUN/export/sentence-transformers/  written by sentence-transformers' own ``save``: a Transformer over the
                                       merged model, then the modules the student was trained with (Pooling
                                       in its mode, a starting folder's Dense / LayerNorm / ..., Normalize),
                                       the prompts, and the trained lengths

``SentenceTransformer(RUN/export/sentence-transformers)`` then embeds as the trainer did, through
``encode_query`` / ``encode_document`` (sentence-transformers >= 6): queries with the query prompt cut at
``max_query_length``, documents with the document prompt cut at ``max_positive_length`` (the Transformer's
``query_length`` / ``document_length``; its one ``max_seq_length``, what a plain ``encode`` cuts at, is the
longer of the two). A ``pooling: last`` student (an EOS appended to every text) gets a tokenizer whose
post-processor appends that EOS, kept when truncating; the export checks that the saved folder tokenizes both
sides exactly as the trainer did and refuses to write it otherwise (the adapter and merged model stay).

The merge happens on a fresh base model loaded from disk, not on the live training model, so exporting
never alters the weights of a run that may continue (and works the same for any ZeRO stage once the
adapter is on disk). A bf16 / fp16 run exports DeepSpeed's fp32 master weights (:func:`master_weights`), not
the rounded copy the forward runs on.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from ..encoder import Encoder, build_head, is_peft, read_sentence_transformers_folder

class ExportError(RuntimeError):
    """The sentence-transformers folder would not embed as the trainer did; the message says why."""


def save_adapter(encoder: Encoder, folder: Path) -> Path | None:
    """The PEFT adapter of a LoRA student (None for full fine-tuning)."""
    if not is_peft(encoder.model):
        return None
    encoder.model.save_pretrained(str(folder))
    return folder


def save_merged(encoder: Encoder, folder: Path, adapter: Path | None, dtype: torch.dtype = torch.float32) -> Path:
    """A plain HF model (+ tokenizer) with the adapter folded into the base weights."""
    from transformers import AutoModel

    if adapter is not None:
        from peft import PeftModel

        base = AutoModel.from_pretrained(encoder.backbone, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        merged.to(dtype).save_pretrained(str(folder))
    else:  # full fine-tuning: the live weights, as they are
        encoder.model.save_pretrained(str(folder))
    encoder.tokenizer.save_pretrained(str(folder))
    return folder


def write_sentence_transformers(encoder: Encoder, merged: Path, folder: Path, prompts: dict[str, str] | None = None,
                                dtype: torch.dtype = torch.float32) -> Path:
    """The sentence-transformers folder of ``encoder`` around the merged model, written by
    ``SentenceTransformer.save``; :class:`ExportError` (and no folder) when its tokenizer would not give the
    model the tokens the trainer gave it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Transformer

    if folder.exists():
        shutil.rmtree(folder)
    cfg = encoder.cfg
    remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
    transformer = Transformer(str(merged), model_kwargs={"dtype": dtype, **remote}, processor_kwargs=dict(remote),
                              config_kwargs=dict(remote), max_seq_length=max(cfg.max_query_length,
                                                                             cfg.max_positive_length),
                              query_length=cfg.max_query_length, document_length=cfg.max_positive_length)
    if encoder.tokenize.append_eos and not encoder.tokenize.eos_by_tokenizer:
        append_eos(transformer.tokenizer)
    # the modules after the backbone as the student's folder has them, fresh from disk (they are frozen: what
    # the run held is what it loaded), in the export's dtype
    head = build_head(cfg, read_sentence_transformers_folder(encoder.path), int(transformer.config.hidden_size))
    model = SentenceTransformer(modules=[transformer, *head.to(dtype).steps], device="cpu",
                                prompts={k: v for k, v in (prompts or {}).items() if v},
                                similarity_fn_name="cosine" if cfg.normalize else "dot")
    model.save(str(folder), create_model_card=False)
    try:
        check_tokenization(encoder, folder)
    except ExportError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def append_eos(tokenizer) -> None:
    """Make a fast tokenizer end every text in its EOS token, as ``Tokenize(append_eos=True)`` does: a template
    post-processor after its own, so truncation keeps room for it."""
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    eos = tokenizer.eos_token
    if backend is None or eos is None:
        raise ExportError("a pooling: last student's tokenizer must be a fast tokenizer with an EOS token for the "
                          "sentence-transformers folder to append the EOS as training did")
    template = processors.TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                             special_tokens=[(eos, tokenizer.eos_token_id)])
    backend.post_processor = template if backend.post_processor is None else \
        processors.Sequence([backend.post_processor, template])


PROBE = ["a", "Return the sorted list.", "open a file and read its lines " * 100]


def check_tokenization(encoder: Encoder, folder: Path) -> None:
    """The saved folder's tokenizer, called as sentence-transformers' Transformer calls it (truncation at the
    query / document length), gives the token ids the trainer's ``Tokenize`` gave, for short texts and for one
    longer than both lengths; :class:`ExportError` naming the first difference otherwise."""
    from transformers import AutoTokenizer

    remote = {"trust_remote_code": True} if encoder.cfg.trust_remote_code else {}
    saved = AutoTokenizer.from_pretrained(str(folder), **remote)
    with open(folder / "sentence_bert_config.json") as f:
        lengths = json.load(f)
    for side, key in (("query", "query_length"), ("positive", "document_length")):
        ours = encoder.tokenize(PROBE, side)
        theirs = saved(PROBE, truncation="longest_first", max_length=lengths[key])["input_ids"]
        for text, ids, mask, got in zip(PROBE, ours["input_ids"].tolist(), ours["attention_mask"].tolist(), theirs):
            trained = [t for t, m in zip(ids, mask) if m]
            if trained != got:
                raise ExportError(f"{folder}: its tokenizer gives {side} {text[:30]!r}... the ids {got[-4:]} at the "
                                  f"end where training used {trained[-4:]} ({len(got)} vs {len(trained)} tokens)")


def export_all(encoder: Encoder, out: Path, prompts: dict[str, str] | None = None,
               dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """Write adapter (LoRA only), merged model and sentence-transformers folder under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    adapter = save_adapter(encoder, out / "adapter")
    merged = save_merged(encoder, out / "merged", adapter, dtype=dtype)
    paths = {"merged": str(merged)}
    try:
        paths["sentence_transformers"] = str(write_sentence_transformers(encoder, merged, out / "sentence-transformers",
                                                                         prompts, dtype))
    except ExportError as e:  # the adapter and the merged model stand; the folder that would embed otherwise not
        print(f"b3stream export: no sentence-transformers folder: {e}", file=sys.stderr, flush=True)
        paths["sentence_transformers_refused"] = str(e)
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

"""A Hugging Face model as an embedding model: pooling, L2 normalisation, optional PEFT LoRA / DoRA.

A sentence-transformers folder is built as sentence-transformers builds it: its Transformer module is the
backbone b3stream trains, and the modules after it (Pooling in any mode, Dense, LayerNorm, Dropout, Normalize)
are sentence-transformers' own classes loaded from the folder (:class:`Head`), frozen; its lengths bound the
configured ones and its prompts serve where a dataset has none. A folder with any other module, or a setting
b3stream cannot honour, is refused (``ConfigError``) before anything trains on it.

One ``Encoder`` serves both sides of the project: the miner calls :meth:`Encoder.encode` (no gradient,
batched, progress bar) on the teacher, the trainer calls :meth:`Encoder.forward` on the student. Keeping one
code path guarantees the teacher's mined neighbourhoods and the student's training signal use the same
text formatting, truncation and pooling.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from .progress import progress_bar

from .config import ConfigError, EncoderConfig
from .model_folder import (  # noqa: F401 - re-exported: callers import them from here
    model_prompts, sentence_transformers_settings, settled, with_model_prompts)
from .st_folder import (  # noqa: F401 - re-exported: callers import them from here
    HEAD_MODULES, POOLINGS, ST_POOLING_MODES, SentenceTransformersFolder, default_model_path,
    read_sentence_transformers_folder, resolve_model, st_pooling_mode, valid_pooling)


def quiet_model_loading() -> None:
    """No progress bars from transformers / huggingface_hub ("Loading weights", downloads): ``--quiet``.

    The variable covers a huggingface_hub imported later (it reads it at import), the calls one already
    imported; transformers keeps its own switch next to the hub's.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


_NOTED: set = set()


def _note_capped_lengths(asked: EncoderConfig, cfg: EncoderConfig, st: SentenceTransformersFolder | None) -> None:
    """One line on stderr (once per process and model) when the folder's lengths lowered the configured ones."""
    changed = [f"{name} {getattr(asked, name)} -> {getattr(cfg, name)}" for name in ("max_query_length",
               "max_positive_length") if getattr(asked, name) != getattr(cfg, name)]
    if st is None or not changed or (str(st.path), tuple(changed)) in _NOTED:
        return
    _NOTED.add((str(st.path), tuple(changed)))
    print(f"b3stream: {st.path} embeds at most {st.query_limit} query / {st.document_limit} document tokens "
          f"(sentence-transformers' limits of the folder): {', '.join(changed)}", file=sys.stderr, flush=True)


@dataclass
class Tokenize:
    """The tokenizer and per-side max lengths, without the model: cheap to send to DataLoader workers.

    ``append_eos``: every sequence ends in the tokenizer's EOS token (added when the tokenizer does not add
    it, and kept when truncating), as last-token pooling of decoder models expects (E5-Mistral, gte-Qwen,
    the B3 paper's Qwen2-VL): the pooled state is then the one that has read the whole text."""

    tokenizer: object
    max_query_length: int
    max_positive_length: int
    append_eos: bool = False
    eos_by_tokenizer: bool = False  # the tokenizer ends every text in EOS itself (kept when truncating)

    def __call__(self, texts: list[str], side: str) -> dict[str, torch.Tensor]:
        limit = self.max_query_length if side == "query" else self.max_positive_length
        if not self.append_eos or self.eos_by_tokenizer:
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=limit,
                                       return_tensors="pt"))
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts, truncation=True, max_length=max(1, limit - 1))["input_ids"]
        ids = [x if x and x[-1] == eos else x[: limit - 1] + [eos] for x in ids]
        return dict(self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt"))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sequence of hidden states (B, T, d) -> one vector per sequence (B, d): mean, cls or last. A reference
    for the tests; the encoder pools with sentence-transformers' Pooling module (:class:`Head`)."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        # Works for left and right padding: the last position whose mask is 1.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r}; expected one of mean, cls, last")


class Head(torch.nn.Module):
    """The modules after the backbone, sentence-transformers' own classes: a Pooling module, then what the
    model folder has after it (Dense, LayerNorm, Dropout, Normalize), loaded with sentence-transformers'
    ``load``. Frozen: training changes the backbone (LoRA or all of it), never these weights, so a snapshot,
    a checkpoint and the export's backbone carry everything that moved."""

    def __init__(self, modules: list[torch.nn.Module]):
        super().__init__()
        self.steps = torch.nn.ModuleList(modules)
        self.requires_grad_(False)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = next(self.parameters(), None)  # a Dense / LayerNorm: computed in its own dtype, whatever
        if weights is not None and hidden.dtype != weights.dtype:  # precision the backbone runs in
            hidden = hidden.to(weights.dtype)
        features = {"token_embeddings": hidden, "attention_mask": mask}
        for module in self.steps:
            features = module(features)
        return features["sentence_embedding"]

    @property
    def dim(self) -> int | None:
        dim = None
        for module in self.steps:
            if hasattr(module, "pooling_output_dimension"):
                dim = module.pooling_output_dimension
            elif hasattr(module, "out_features"):
                dim = module.out_features
        return dim


def build_head(cfg: EncoderConfig, st: SentenceTransformersFolder | None, hidden: int) -> Head:
    """The :class:`Head` of a settled ``cfg``: a sentence-transformers folder's own modules (``st``), with an
    explicit pooling or normalisation of ``cfg`` in place of the folder's; for any other folder a Pooling of
    ``cfg.pooling`` and, when ``cfg.normalize``, a Normalize."""
    from sentence_transformers.sentence_transformer.modules import Dense, Dropout, LayerNorm, Normalize, Pooling

    mode = st_pooling_mode(cfg.pooling)
    if st is None:
        return Head([Pooling(hidden, mode)] + ([Normalize()] if cfg.normalize else []))
    classes = {"Dense": Dense, "Dropout": Dropout, "LayerNorm": LayerNorm}
    steps: list[torch.nn.Module] = []
    for i, (kind, path) in enumerate(st.modules, start=1):
        if kind == "Normalize":
            if cfg.normalize:  # normalize: false drops it
                steps.append(Normalize())
        elif kind == "Pooling":
            pooling = Pooling.load(str(st.path), subfolder=path, local_files_only=True)
            if pooling.embedding_dimension != hidden:
                raise ConfigError(f"{st.path}: module {i} (Pooling) pools {pooling.embedding_dimension} dimensions, "
                                  f"but the model's hidden states have {hidden}")
            if cfg.pooling != st.pooling:  # an explicit pooling replaces the folder's
                replaced = Pooling(hidden, mode)
                if replaced.pooling_output_dimension != pooling.pooling_output_dimension and \
                        any(k in ("Dense", "LayerNorm") for k, _ in st.modules[i:]):
                    raise ConfigError(f"pooling {cfg.pooling!r} gives {replaced.pooling_output_dimension} dimensions "
                                      f"where the modules after {st.path}'s Pooling ({st.pooling}) take "
                                      f"{pooling.pooling_output_dimension}")
                pooling = replaced
            steps.append(pooling)
        else:
            steps.append(classes[kind].load(str(st.path), subfolder=path, local_files_only=True))
    if cfg.normalize and not any(isinstance(m, Normalize) for m in steps):
        steps.append(Normalize())
    return Head(steps)


def tokenizer_appends_eos(tokenizer) -> bool:
    """Whether ``tokenizer`` itself ends every text with its EOS token (its post-processor adds it)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return False
    ids = tokenizer(["a b", ""])["input_ids"]
    return all(x and x[-1] == eos for x in ids)


def lowercase_tokenizer(tokenizer) -> None:
    """Lowercase every text before tokenizing, as sentence-transformers does for ``do_lower_case: true``
    (a Lowercase normalizer in front of the fast tokenizer's own)."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("do_lower_case: true needs a fast tokenizer")
    normalizer = backend.normalizer
    parts = [Lowercase()] + (list(normalizer) if isinstance(normalizer, NormalizerSequence)
                             else [normalizer] if normalizer is not None else [])
    backend.normalizer = NormalizerSequence(parts)


class Encoder(torch.nn.Module):
    """``EncoderConfig`` -> tokenizer + backbone (+ LoRA) + head (pooling, and a sentence-transformers folder's
    Dense / Normalize / ... modules).

    Args:
        cfg: model path, pooling, max lengths, LoRA settings.
        trainable: attach the LoRA adapter (if ``cfg.lora.enabled``); otherwise the model is frozen in eval.
        dtype: weights dtype (bf16 on GPU for training, fp32 on CPU).
    """

    def __init__(self, cfg: EncoderConfig, trainable: bool = False, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        asked = cfg
        cfg = settled(cfg)
        if not valid_pooling(cfg.pooling):
            raise ValueError(f"unknown pooling {cfg.pooling!r}; expected one of {POOLINGS}")
        self.cfg = cfg
        self.path = resolve_model(cfg.model)
        st = read_sentence_transformers_folder(self.path)
        _note_capped_lengths(asked, cfg, st)
        self.backbone = backbone = str(st.backbone) if st is not None else self.path  # the HF model's folder
        remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
        self.tokenizer = AutoTokenizer.from_pretrained(backbone, **remote)
        if st is not None and st.do_lower_case:
            lowercase_tokenizer(self.tokenizer)
        if self.tokenizer.pad_token is None:  # decoder models: pad with EOS, pool the last real token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        last = cfg.pooling == "last" and self.tokenizer.eos_token_id is not None
        if last:  # the last real token at the same place in every row; RoPE sees the same relative positions
            self.tokenizer.padding_side = "left"
        extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = AutoModel.from_pretrained(backbone, dtype=dtype or torch.float32, **remote, **extra)
        if trainable and cfg.gradient_checkpointing:
            # activations recomputed in the backward: memory for compute; non-reentrant works with LoRA's
            # frozen inputs
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.adapter is not None:  # continue from a saved adapter (trainable) or embed with it (frozen)
            from peft import PeftModel

            if trainable and not cfg.lora.enabled:
                raise ValueError(f"adapter {cfg.adapter}: continuing an adapter needs lora.enabled: true")
            model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=trainable)
            if not trainable:
                model.requires_grad_(False)
                model.eval()
        elif trainable and cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model

            model = get_peft_model(model, PeftLoraConfig(
                r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=cfg.lora.target_modules, use_dora=cfg.lora.use_dora,
            ))
        elif not trainable:
            model.requires_grad_(False)
            model.eval()
        self.model = model
        self.head = build_head(cfg, st, int(model.config.hidden_size))
        if not trainable:
            self.head.eval()
        if dtype is not None:
            self.head.to(dtype)
        # the model's own prompts (a sentence-transformers folder's), used where a dataset sets none
        self.prompts = model_prompts(st)
        self.tokenize = Tokenize(self.tokenizer, cfg.max_query_length, cfg.max_positive_length, append_eos=last,
                                 eos_by_tokenizer=last and tokenizer_appends_eos(self.tokenizer))
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return self.head(out.last_hidden_state, attention_mask)

    @torch.no_grad()
    def encode(self, texts: list[str], side: str = "query", batch_size: int = 64, progress: bool = False,
               desc: str | None = None) -> np.ndarray:
        """Embed texts (already prompted) -> float32 array (len(texts), d). Sorted by length for speed."""
        # Restore each module's own mode afterwards: ``train(True)`` on the whole model would switch on
        # dropout in modules that were deliberately in eval mode, so training would depend on whether an
        # evaluation had run.
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        bar = progress_bar(total=len(texts), desc=desc or f"embedding {side}s", unit="text",
                           disable=not progress, file=sys.stderr)
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(self.device) for k, v in self.tokenize([texts[i] for i in idx], side).items()}
            emb = self(**batch).float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
            bar.update(len(idx))
        bar.close()
        for module, mode in modes:
            module.training = mode
        return out if out is not None else np.empty((0, 0), dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.head.dim or self.model.config.hidden_size)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (a LoRA / DoRA student): its snapshot and export save the adapter."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def weights_digest(folder: str | Path, known: dict | None = None) -> tuple[str, dict]:
    """SHA-256 over a model folder's weight files, and the per-file record ``{name: {bytes, mtime_ns,
    sha256}}``. Files whose size and mtime match ``known`` (a previous record) are not re-read: hashing a
    multi-GB model on every mining run would cost minutes, while an overwrite always changes the mtime."""
    import hashlib

    folder = Path(folder)
    files: dict[str, dict] = {}
    digest = hashlib.sha256()
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) \
        if folder.is_dir() else []
    for path in paths:
        name = str(path.relative_to(folder))
        st = path.stat()
        entry = (known or {}).get(name)
        if not entry or entry.get("bytes") != st.st_size or entry.get("mtime_ns") != st.st_mtime_ns:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            entry = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}
        files[name] = entry
        digest.update(f"{name}:{entry['sha256']};".encode())
    return (digest.hexdigest() if files else f"unhashed:{folder}"), files


def model_name(cfg: EncoderConfig) -> str:
    """A short, stable name for metadata (folder name for local paths)."""
    if cfg.model in (None, "default", "minilm"):
        return "all-MiniLM-L6-v2 (bundled)"
    path = resolve_model(cfg.model)
    return Path(path).name if Path(path).exists() else path

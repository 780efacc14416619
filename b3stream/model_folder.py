"""Model folders meet encoder configs, without loading a model (no torch): a config settled by its folder
(``settled``), the folder's settings and prompts, a manifest with the model's prompts.

Reading a folder (the bundled default, a sentence-transformers folder's modules, or why b3stream refuses it)
is ``b3stream.st_folder``, on the ground floor so that the config check can use it; its names are re-exported
here.
"""

from __future__ import annotations

from pathlib import Path

from .config import EncoderConfig
from .st_folder import POOLINGS  # noqa: F401 - the poolings a folder's Pooling may name (tests/test_layers.py)
from .st_folder import SentenceTransformersFolder, read_sentence_transformers_folder, resolve_model


def sentence_transformers_settings(folder: str | Path) -> dict:
    """What a sentence-transformers model folder says of its pooling (``pooling``), normalisation
    (``normalize``), lengths (``max_seq_length``, ``query_length``, ``document_length``) and prompts
    (``prompts``: b3stream's sides, :func:`model_prompts`); empty for any other folder."""
    st = read_sentence_transformers_folder(folder)
    if st is None:
        return {}
    out = {"pooling": st.pooling, "normalize": st.normalize, "prompts": model_prompts(st)}
    for key in ("max_seq_length", "query_length", "document_length"):
        if getattr(st, key):
            out[key] = int(getattr(st, key))
    return out


def model_prompts(st: "SentenceTransformersFolder | EncoderConfig | None") -> dict[str, str]:
    """The model's own prompts for b3stream's two sides, from ``config_sentence_transformers.json``: ``query``
    is its ``query`` prompt (what ``encode_query`` prepends), ``positive`` the first non-empty of its
    ``document``, ``passage`` and ``corpus`` prompts (E5's ``passage: ``). ``default_prompt_name`` is not used:
    sentence-transformers applies it in plain ``encode`` only, never in ``encode_query`` / ``encode_document``.
    Empty strings where the model has none. A dataset's own prompt wins (:func:`with_model_prompts`)."""
    if isinstance(st, EncoderConfig):
        st = read_sentence_transformers_folder(resolve_model(st.model))
    prompts = st.prompts if st is not None else {}
    document = next((prompts[k] for k in ("document", "passage", "corpus") if prompts.get(k)), "")
    return {"query": prompts.get("query", ""), "positive": document}


def with_model_prompts(manifest, prompts: dict[str, str]):
    """``manifest`` (a :class:`b3stream.data.manifest.Manifest`) whose default prompt of each side is the
    model's (:func:`model_prompts`) where the dataset sets none: a task's own prompt, and the dataset's default
    (an empty string included: ``prompts.yaml`` ``default: {query: ""}`` switches a model's prompt off), win."""
    import copy
    import dataclasses

    if not any(prompts.values()):
        return manifest
    merged = copy.deepcopy(manifest.prompts)
    default = merged.setdefault("default", {})
    for side, text in prompts.items():
        if text and side not in default:
            default[side] = text
    return dataclasses.replace(manifest, prompts=merged)


def settled(cfg: EncoderConfig) -> EncoderConfig:
    """``cfg`` as the model folder decides it. ``pooling: auto`` and ``normalize: null``: as a
    sentence-transformers folder says (its Pooling mode, a Normalize module), else mean pooling, normalised;
    explicit values win. The lengths: at most the folder's (its query / document length, else its
    max_seq_length): the model never sees more tokens than sentence-transformers would give it. A folder
    b3stream cannot build faithfully is a ConfigError (:func:`read_sentence_transformers_folder`)."""
    import dataclasses

    st = read_sentence_transformers_folder(resolve_model(cfg.model))
    pooling = cfg.pooling if cfg.pooling != "auto" else (st.pooling if st else "mean")
    normalize = cfg.normalize if cfg.normalize is not None else (st.normalize if st else True)
    query, positive = cfg.max_query_length, cfg.max_positive_length
    if st is not None:
        query = min(query, st.query_limit or query)
        positive = min(positive, st.document_limit or positive)
    if (pooling, normalize, query, positive) == (cfg.pooling, cfg.normalize, cfg.max_query_length,
                                                 cfg.max_positive_length):
        return cfg
    return dataclasses.replace(cfg, pooling=pooling, normalize=normalize, max_query_length=query,
                               max_positive_length=positive)

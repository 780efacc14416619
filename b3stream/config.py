"""Typed configuration: dataclasses loaded from YAML, overridable from the command line.

Every YAML key mirrors a dataclass field (torchtune style), so a config file reads as the constructor
arguments of the stage it drives. An unknown key is an error that names the key and where it came from:
a typo must never silently fall back to a default.

    cfg = load_config(MineConfig, "mine.yaml", overrides=["p=30", "teacher.pooling=cls"])
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError  # noqa: F401 - defined on the floor by itself; everyone imports it from here
from .st_folder import BUNDLED_NAMES, POOLINGS, read_sentence_transformers_folder, resolve_model, valid_pooling

T = TypeVar("T")

# The names a config is checked against, here on the ground floor: the modules that implement them import
# them from here (their registries are tested to hold exactly these, tests/test_layers.py), so this module
# never imports upwards.
STRATEGY_NAMES = ("random", "random_hn", "task", "task_hn", "gcbs", "b3", "b3pp")  # mining/strategies.py
EDGE_MODES = ("mutual", "union")  # mining/graph.py: S as a graph, both directions present, or either


# --------------------------------------------------------------------------------------------------
# The configs
# --------------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """PEFT LoRA / DoRA adapter settings (paper: LoRA r=8)."""

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture
    use_dora: bool = False


@dataclass
class EncoderConfig:
    """A Hugging Face model turned into an embedding model by pooling (``b3stream.encoder``)."""

    model: str | None = None  # HF folder or hub id; None: the bundled all-MiniLM-L6-v2
    # mean | cls | last (EOS appended, last-token: decoder models, as the paper) | lasttoken (the tokenizer's own
    # tokens, the last one) | max | weightedmean | mean_sqrt_len_tokens | modes joined by + (concatenated) |
    # auto: what a sentence-transformers model folder says (its Pooling module), else mean
    pooling: str = "auto"
    normalize: bool | None = None  # None: as a sentence-transformers folder says (a Normalize module), else true
    max_query_length: int = 64  # at most a sentence-transformers folder's query (document) length or max_seq_length
    max_positive_length: int = 256
    lora: LoraConfig = field(default_factory=LoraConfig)
    # a saved PEFT adapter folder (e.g. RUN/export/adapter) to start from: the student continues training it
    # (its own r, alpha and target modules; lora.enabled must be true), a teacher embeds with it
    adapter: str | None = None
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2; None: transformers' choice
    gradient_checkpointing: bool = False  # Hugging Face activation checkpointing in the backbone (trainable)
    trust_remote_code: bool = False  # run the model folder's own modelling code: an explicit opt-in


@dataclass
class MineConfig:
    """Static B3 mining (docs/architecture.md, "Mining"). Symbols follow the paper: p, m, K, |B| (batch_size), h.

    Stages (``b3stream.mining.pipeline``): embed -> rank -> partition -> schedule, each file to file under
    ``out``. See ``configs/mine_b3.yaml`` for a commented example.
    """

    data: str | None = None  # prepared dataset folder (manifest.json); None with user embeddings
    split: str = "train"
    verify_data: bool = True  # check shard sha256s against the manifest on open (false: skip, for huge data)
    out: str = "runs/mine"
    # -- embed ------------------------------------------------------------------------------------
    teacher: EncoderConfig = field(default_factory=lambda: EncoderConfig(lora=LoraConfig(enabled=False)))
    # a student snapshot folder (refreshed mode): embed with its weights, loaded into `teacher`, which must then
    # be that run's student (the snapshot's own record is checked against it, never obeyed)
    student_snapshot: str | None = None
    device: str | None = None  # embedding device (cpu, cuda, cuda:1); None: the first GPU if any, else cpu
    embed_batch_size: int = 64
    embed_chunk: int = 2048  # rows embedded between two progress records (the resume granularity)
    query_embeddings: str | None = None  # bring-your-own teacher embeddings (N x d .npy)
    positive_embeddings: str | None = None
    # -- rank -------------------------------------------------------------------------------------
    p: int = 30  # ranks skipped (likely false negatives)
    m: int = 100  # ranks kept after the skip: S = R[:, p:p+m]
    task_params: dict[str, dict[str, int]] | None = None  # per-task p/m, e.g. {vqa: {p: 70}} (paper: VQA p=70)
    per_task: bool = True  # mine and batch each task separately (the paper mines each dataset apart)
    small_tasks: str = "error"  # error | merge: tasks of <= p+m examples are ranked and partitioned together
    index: str = "auto"  # auto | flat | ivf | hnsw | torch (exact, on a GPU that FAISS cannot use)
    exact_threshold: int = 50_000  # auto: exact search up to this many positives per task, IVF above
    ivf_nlist: int | None = None  # None: about 4 * sqrt(n) inverted lists
    ivf_nprobe: int = 32
    hnsw_m: int = 32
    hnsw_ef_search: int = 256
    recall_sample: int = 1000  # approximate indexes: queries checked against exact search (0: skip)
    margin: float | None = None  # NV-Retriever style: drop candidates scoring above margin * positive score
    # -- partition --------------------------------------------------------------------------------
    K: int = 32  # community size
    edges: str = "mutual"  # mutual | union
    rank_weights: bool = False  # weight edges by rank (closer ranks weigh more) for METIS
    partitioner: str = "metis"  # metis (the paper's) | kaminpar (multi-threaded, exact K; extra b3stream[kaminpar])
    metis_ufactor: int = 30  # METIS load imbalance in 1/1000 (30: parts up to 3% over K before repair)
    partition_threads: int | None = None  # kaminpar's threads; None: the process's torch thread count
    kaminpar_context: str = "largek"  # a KaMinPar preset (largek: many small blocks; terapart-largek: the same in
    #   less memory, what 10M examples need in 24 GB)
    trained_ids: str | None = None  # .npy of ids already trained this epoch (refreshed mode sets it from the
    #   snapshot): they are ranked and partitioned apart from the rest, so the rest's communities reach the
    #   trainer whole and are cut from full neighbour lists
    # -- schedule ---------------------------------------------------------------------------------
    strategy: str = "b3"  # random | random_hn | task | task_hn | gcbs | b3 | b3pp
    batch_size: int = 1024  # |B|, global batch
    h: int = 5  # B3++ hard negatives per example
    seed: int = 0
    mix_tasks: bool = False  # draw communities from all tasks together instead of one task per batch
    gcbs_threshold: float | None = None  # None: chosen from the similarity distribution (median of S scores)
    quality_sample: int | None = 2048  # queries scored for the Theorem-1 bound (None: all, 0: skip)
    quality_temperature: float = 0.02  # tau in exp(s / tau) for the bound (the paper trains at 0.02)
    version: int | None = None  # schedule version to write; None: next free
    schedule_dir: str | None = None  # where schedules are published; None: OUT/schedules
    overwrite: bool = False  # allow an explicit version to replace an existing schedule file
    source_step: int | None = None  # refreshed mode: the training step of the snapshot this schedule answers,
    #   recorded in its metadata also when the miner embeds with the teacher (the embeddings then carry none)
    source_epoch: int | None = None  # refreshed mode: the epoch of that snapshot (its trained_ids are that epoch's)


def default_miner_threads() -> int:
    """The background miner's CPU threads unless set: half the cores (at least one); the trainer keeps the rest."""
    import os

    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class RefreshConfig:
    """Refreshed mode (``mode: refreshed``): the trainer writes student snapshots, a background miner
    (``b3stream refresh``) re-mines from them and publishes new schedule versions, the trainer hot-swaps."""

    every_steps: int | None = None  # snapshot the student every N optimizer steps
    every_epochs: int | None = None  # and/or at the end of every N-th epoch
    spawn: bool = True  # the main rank starts the miner as a child process (false: run `b3stream refresh`)
    model: str = "student"  # student | teacher: what the miner embeds with (teacher: for data that grows)
    # the spawned miner's device: None - a GPU no local rank trains on, else the CPU; cuda - such a GPU, else it
    # shares the last one; cuda:N; cpu (refresh/trainer.py miner_placement); a standalone miner's --device wins
    device: str | None = None
    threads: int | None = None  # the miner's CPU threads; None: half the cores (at least 1)
    nice: int = 10  # the miner's niceness: it yields the CPU to the trainer
    keep: int = 2  # snapshots kept on disk
    poll_seconds: float = 2.0  # how often the miner looks for a new snapshot
    # A crashed spawned miner is restarted (with backoff) at most max_restarts times within any
    # restart_window seconds: a miner that crashes now and then over a long run keeps being restarted.
    max_restarts: int = 5
    restart_window: float = 3600.0
    # Bounded staleness: the schedule mined from the snapshot of step s is in use by step s + max_lag_steps,
    # the trainer waiting there for the miner if it must (0: synchronous; None: never wait). Without it a
    # trainer faster than its miner (a GPU, a short epoch) can finish before any refresh lands.
    max_lag_steps: int | None = None
    wait_timeout: float = 1800.0  # seconds one such wait may last; then training goes on with what it has
    # when: every - each snapshot is re-mined; bound - the miner first measures the Theorem-1 bound of the
    # schedule in use on a probe of probe_batches of its batches under the snapshot, and re-mines only when it
    # rose by bound_drift nats or more over the bound when the schedule was mined (b3stream/refresh/drift.py)
    when: str = "every"
    bound_drift: float = 0.1
    probe_batches: int = 64
    mine: dict[str, Any] = field(default_factory=dict)  # MineConfig overrides for the miner (index, teacher.model)


@dataclass
class TrainConfig:
    """The training recipe (``b3stream/train/loop.py``). Symbols follow the paper: tau (temperature), |B|
    (the schedule's global batch size), h (the schedule's hard negatives per example)."""

    data: str = ""  # prepared dataset folder; training reads its "train" split
    verify_data: bool = True  # check shard sha256s against the manifest on open (false: skip, for huge data)
    schedule: str = ""  # a schedule file, or a folder holding versioned schedules (newest good one used)
    out: str = "runs/train"  # RUN: checkpoints/, tb/, export/, summary.json
    student: EncoderConfig = field(default_factory=EncoderConfig)
    temperature: float = 0.02  # tau
    symmetric: bool = False  # also the positive -> query InfoNCE term
    mask_duplicate_positives: bool = True  # a same-text positive under another id is not a negative
    # Extra negatives in every query's InfoNCE denominator, pooled over the global batch like B3++'s:
    # mined - the schedule's B3++ / random_hn / task_hn negatives (none for the other strategies); dataset - up to
    # h_dataset of each example's stored negatives (`prepare --negatives-field`), drawn per epoch with the
    # seed, instead of the schedule's; both - the two together
    negatives: str = "mined"
    h_dataset: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    epochs: int = 1
    max_steps: int | None = None  # wins over epochs when set
    grad_cache_chunk: int | None = None  # None: no GradCache; else sub-batch size for cached embedding
    # one padded forward for all sides (auto: on CUDA, without GradCache, in steps where it adds <= 10% padding)
    fuse_sides: bool | str = "auto"
    grad_clip: float = 1.0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    deepspeed: str | None = None  # ZeRO JSON path or name in ds_configs/ ("zero2"); None: zero0
    seed: int = 0
    # DataLoader workers reading and tokenizing a step's records by id; null: the cores per local rank less one,
    # between 1 and 8 (train/collate.py auto_workers)
    num_workers: int | None = None
    log_every: int = 10
    eval_every: int | None = None  # also evaluated before training and at the end when eval_split is set
    eval_split: str | None = "validation"  # None: no evaluation; "test" only when you mean to report it
    eval_max_queries: int | None = 1000
    eval_corpus: str = "all"  # all: every split's positives (train ones as distractors) | split: the split's own
    # a BEIR-format folder (corpus.jsonl, queries.jsonl, qrels/<eval_beir_split>.tsv) also evaluated, like
    # eval_split (before, every eval_every steps, after), over its whole corpus; eval_max_queries applies
    eval_beir: str | None = None
    eval_beir_split: str = "test"
    eval_batch_size: int = 64
    save_every: int | None = None  # a checkpoint is always written at the end
    keep_checkpoints: int = 2
    resume: bool = True  # continue from RUN/checkpoints when it holds one
    overwrite: bool = False  # start afresh in an `out` that already holds files (an earlier run's are replaced)
    watch_schedule_every: int | None = None  # poll the schedule folder every N steps; swap to a newer version
    mode: str = "static"  # static: the given schedule (paper) | refreshed: re-mined while training runs
    refresh: RefreshConfig = field(default_factory=RefreshConfig)
    trace_ids: bool = False  # append every step's global batch ids to RUN/trace.jsonl
    export: bool = True


# --------------------------------------------------------------------------------------------------
# Loading and overriding
# --------------------------------------------------------------------------------------------------


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML / command-line value to the annotated type, or raise naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(float("inf"))
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if tp is int and abs(out) > 2**62:  # no setting needs more, and numpy's int64 overflows beyond
            raise ConfigError(f"{where}: {out} is out of range")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise :class:`ConfigError` naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {type(data).__name__}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: T, overrides: dict[str, Any] | list[str]) -> T:
    """Return a copy of ``cfg`` with dotted-key overrides (``{"teacher.pooling": "cls"}`` or ``["p=30"]``).

    Values given as strings are parsed as YAML scalars (so ``"none"``/``"null"`` -> None, ``"3"`` -> 3).
    """
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, raw = item.split("=", 1)
            pairs[key.strip()] = raw
        overrides = pairs
    data = to_dict(cfg)
    for key, value in overrides.items():
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else value
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section of {type(cfg).__name__}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = value
    return validate(from_dict(type(cfg), data, where="overrides"))


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict | list | None = None) -> T:
    """Load ``cls`` from a YAML file (optional), then apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"{path}: not a YAML file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    cfg = from_dict(cls, data, where=str(path) if path else "config")
    # Validated once, after the overrides: an override may correct a value of the file.
    return apply_overrides(cfg, overrides) if overrides else validate(cfg)


# --------------------------------------------------------------------------------------------------
# Validation: values each of the right type but out of range, checked when the config is loaded so that
# a bad value stops the command before any model loads or any output folder is made.
# --------------------------------------------------------------------------------------------------


def validate(cfg: T, prefix: str = "") -> T:
    """Check ``cfg`` and its nested configs; raise :class:`ConfigError` naming the dotted key. Returns ``cfg``."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate(value, f"{prefix}{f.name}.")
        else:
            _check_finite(value, f"{prefix}{f.name}")
    check = _CHECKS.get(type(cfg))
    if check is not None:
        check(cfg, _Checker(cfg, prefix))
    return cfg


def _check_finite(value: Any, where: str) -> None:
    """Refuse inf and NaN in any number of a config, also inside a mapping or list (``task_params``,
    ``refresh.mine``). A range check alone lets them through: ``lr: inf`` is ``>= 0``, and it surfaced only
    as a training traceback after the model had loaded and the run folder was written. YAML spells them
    ``.inf``/``.nan``; ``inf``/``nan`` reach a float field as strings and are converted to the same."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


class _Checker:
    def __init__(self, cfg: Any, prefix: str):
        self.cfg, self.prefix = cfg, prefix

    def fail(self, name: str, why: str) -> None:
        raise ConfigError(f"{self.prefix}{name}: {why}, got {getattr(self.cfg, name)!r}")

    def above(self, name: str, low: float, optional: bool = False) -> None:
        value = getattr(self.cfg, name)
        if value is None and optional:
            return
        if not value > low:  # also refuses NaN
            self.fail(name, f"must be > {low}" + (" (or null)" if optional else ""))

    def at_least(self, name: str, low: float, optional: bool = False) -> None:
        value = getattr(self.cfg, name)
        if value is None and optional:
            return
        if not value >= low:
            self.fail(name, f"must be >= {low}" + (" (or null)" if optional else ""))

    def between(self, name: str, low: float, high: float, why: str = "") -> None:
        """``low <= value <= high`` (both ends included)."""
        if not low <= getattr(self.cfg, name) <= high:
            self.fail(name, f"must be in [{low}, {high}]" + (f" ({why})" if why else ""))

    def one_of(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self.cfg, name) not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}")


def _check_encoder(c: EncoderConfig, v: _Checker) -> None:
    if c.pooling != "auto" and not valid_pooling(c.pooling):
        v.fail("pooling", f"must be auto, one of {', '.join(POOLINGS)}, or sentence-transformers modes joined by +")
    if c.attn_implementation is not None:
        v.one_of("attn_implementation", ("eager", "sdpa", "flash_attention_2"))
    v.above("max_query_length", 0)
    v.above("max_positive_length", 0)
    if c.adapter is not None and not (Path(c.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{v.prefix}adapter: {c.adapter} is not a saved PEFT adapter (no adapter_config.json)")
    if c.model is not None:
        problem = _model_problem(c.model)
        if problem:
            raise ConfigError(f"{v.prefix}model: {problem}")
    try:  # a sentence-transformers folder b3stream cannot build faithfully: refused before anything runs
        read_sentence_transformers_folder(resolve_model(c.model))
    except ConfigError as e:
        raise ConfigError(f"{v.prefix}model: {e}") from None


def _check_lora(c: LoraConfig, v: _Checker) -> None:
    if c.enabled:
        v.above("r", 0)
        v.above("alpha", 0)
        if not 0 <= c.dropout < 1:
            v.fail("dropout", "must be in [0, 1)")


def _check_train(c: TrainConfig, v: _Checker) -> None:
    v.above("temperature", 0)
    v.above("lr", 0)
    v.at_least("weight_decay", 0)
    if not 0 <= c.warmup_ratio < 1:
        v.fail("warmup_ratio", "must be in [0, 1) (a share of the training steps)")
    v.above("epochs", 0)
    v.above("max_steps", 0, optional=True)
    v.above("grad_cache_chunk", 0, optional=True)
    if not (c.fuse_sides == "auto" or isinstance(c.fuse_sides, bool)):
        v.fail("fuse_sides", "must be auto, true or false")
    v.at_least("grad_clip", 0)
    v.one_of("precision", ("auto", "fp32", "bf16", "fp16"))
    v.at_least("seed", 0)  # numpy's generators refuse a negative seed, deep inside the sampler
    v.at_least("num_workers", 0, optional=True)
    v.above("log_every", 0)
    for name in ("eval_every", "save_every", "watch_schedule_every", "eval_max_queries"):
        v.above(name, 0, optional=True)
    v.above("eval_batch_size", 0)
    v.one_of("eval_corpus", ("split", "all"))
    if c.eval_beir is not None:
        missing = [name for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{c.eval_beir_split}.tsv")
                   if not (Path(c.eval_beir) / name).is_file()]
        if missing:
            raise ConfigError(f"{v.prefix}eval_beir: {c.eval_beir} is not a BEIR folder with split "
                              f"{c.eval_beir_split!r}: no {', '.join(missing)}")
    v.above("keep_checkpoints", 0)
    v.one_of("negatives", ("mined", "dataset", "both"))
    v.above("h_dataset", 0)
    v.one_of("mode", ("static", "refreshed"))
    if c.mode == "refreshed" and not (c.refresh.every_steps or c.refresh.every_epochs):
        raise ConfigError(f"{v.prefix}mode: refreshed needs refresh.every_steps and/or refresh.every_epochs "
                          "(when to snapshot the student for the miner)")


def _check_refresh(c: RefreshConfig, v: _Checker) -> None:
    v.above("every_steps", 0, optional=True)
    v.above("every_epochs", 0, optional=True)
    v.one_of("model", ("student", "teacher"))
    v.above("threads", 0, optional=True)
    v.between("nice", 0, 19, "a niceness increment; a negative one needs root")
    v.above("keep", 0)
    v.above("poll_seconds", 0)
    v.at_least("max_restarts", 0)
    v.above("restart_window", 0)
    v.one_of("when", ("every", "bound"))
    v.above("probe_batches", 0)
    v.at_least("max_lag_steps", 0, optional=True)
    v.above("wait_timeout", 0)
    if c.device is not None and not (c.device == "cpu" or c.device == "cuda" or c.device.startswith("cuda:")):
        v.fail("device", "must be cpu, cuda or cuda:<index>")
    if c.when == "bound" and c.model == "teacher":
        # the drift is the rise of the schedule's bound under the *student*; a teacher's embeddings never move,
        # so the miner would compare a student probe with a teacher reference: the gap, not staleness
        raise ConfigError(f"{v.prefix}when: bound measures how far the student drifted from the schedule's "
                          "embeddings; with model: teacher they never drift. Use when: every")


def _check_mine(c: MineConfig, v: _Checker) -> None:
    """The mining parameters on their own. What depends on the data (p + m against each task's size, K and
    |B| against N) or on the stage run (K dividing |B|) is checked by the mining pipeline's pre-flight
    (``b3stream.mining.pipeline.preflight``), also before the teacher loads. The seed and the schedule
    version are checked there too (``check_seed_and_version``)."""
    v.above("embed_batch_size", 0)
    v.above("embed_chunk", 0)
    v.at_least("p", 0)
    v.at_least("m", 1)
    _check_task_params(c.task_params, v.prefix)
    v.one_of("small_tasks", ("error", "merge"))
    v.one_of("index", ("auto", "flat", "ivf", "hnsw", "torch"))
    v.at_least("exact_threshold", 0)
    v.above("ivf_nlist", 0, optional=True)
    v.above("ivf_nprobe", 0)
    v.at_least("hnsw_m", 2)  # FAISS's HNSW crashes the process with one link per node
    v.above("hnsw_ef_search", 0)
    v.at_least("recall_sample", 0)
    if c.margin is not None and not 0 < c.margin <= 1.5:
        v.fail("margin", "must be in (0, 1.5] (a fraction of the positive's score, e.g. 0.95) or null")
    v.above("K", 0)
    v.one_of("edges", EDGE_MODES)
    v.at_least("metis_ufactor", 1)  # METIS refuses 0 ("Incorrect ufactor")
    v.one_of("partitioner", ("metis", "kaminpar"))
    v.above("partition_threads", 0, optional=True)
    v.one_of("strategy", STRATEGY_NAMES)
    v.above("batch_size", 0)
    v.at_least("h", 0)
    v.at_least("quality_sample", 0, optional=True)
    v.above("quality_temperature", 0)
    v.at_least("source_step", 0, optional=True)
    v.at_least("source_epoch", 0, optional=True)


def _check_task_params(task_params: dict | None, prefix: str) -> None:
    """``{task: {p: .., m: ..}}`` with p >= 0 and m >= 1 (the rank stage's rule, ``RankParams.check``)."""
    for task, entry in (task_params or {}).items():
        if not isinstance(entry, dict) or not entry or set(entry) - {"p", "m"}:
            raise ConfigError(f"{prefix}task_params.{task}: must map to p and/or m, got {entry!r}")
        for key, value in entry.items():
            low = 0 if key == "p" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{prefix}task_params.{task}.{key}: must be an integer >= {low}, got {value!r}")


_CHECKS = {EncoderConfig: _check_encoder, LoraConfig: _check_lora, TrainConfig: _check_train,
           RefreshConfig: _check_refresh, MineConfig: _check_mine}


def _model_problem(model: str) -> str | None:
    """Why ``model`` cannot be loaded, or None. A folder must exist. A Hugging Face hub id ("org/name") is
    accepted when it can be fetched: online, or offline (HF_HUB_OFFLINE, the b3stream default) when it is
    in the local Hugging Face cache. Checked here, not when the model loads: that comes after the data,
    the schedule and the run folder."""
    import os
    import re

    path = Path(model).expanduser()
    if path.is_dir():
        return None
    if model in BUNDLED_NAMES:  # a name of the bundled model ("minilm")
        return None
    if path.exists():
        return f"{model} is a file; give the model folder"
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", model) is not None and ".." not in model
    offline = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                  for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if hub_id and (not offline or _in_hub_cache(model)):
        return None
    return (f"model folder {model} does not exist"
            + (" (nor is it a hub id in the local Hugging Face cache, and HF_HUB_OFFLINE is set)"
               if hub_id else ""))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library refuses is not in its cache either
        return False


def dump_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

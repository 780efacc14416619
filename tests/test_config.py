"""Typed configs: YAML + overrides, and unknown keys are errors that name the key."""

import pytest

from b3stream.config import ConfigError, MineConfig, TrainConfig, apply_overrides, load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("strategy: b3pp\np: 10\nteacher:\n  pooling: cls\n  max_query_length: 32\n")
    cfg = load_config(MineConfig, path, overrides=["K=16", "teacher.pooling=last", "margin=0.95"])
    assert (cfg.strategy, cfg.p, cfg.K, cfg.margin) == ("b3pp", 10, 16, 0.95)
    assert cfg.teacher.pooling == "last" and cfg.teacher.max_query_length == 32
    assert cfg.m == 100  # untouched default


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("strategy: b3\nbatchsize: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) 'batchsize' for MineConfig"):
        load_config(MineConfig, path)
    path.write_text("student:\n  poolin: mean\n")
    with pytest.raises(ConfigError, match=r"student: unknown key\(s\) 'poolin'"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="unknown key 'tau'"):
        apply_overrides(TrainConfig(), ["tau=0.05"])


def test_types_are_checked():
    with pytest.raises(ConfigError, match="K: expected int"):
        apply_overrides(MineConfig(), {"K": "many"})
    with pytest.raises(ConfigError, match="override 'p' is not of the form"):
        apply_overrides(MineConfig(), ["p"])
    cfg = apply_overrides(TrainConfig(), {"student.lora.target_modules": "query,value", "max_steps": "null"})
    assert cfg.student.lora.target_modules == ["query", "value"] and cfg.max_steps is None


def test_every_shipped_config_loads_and_the_recipe_pair_agrees():
    """configs/*.yaml are what the README tells users to run: each must load into its config class, and the
    measured recipe's mining and training halves must describe the same student (token lengths, |B|)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    loaded = {f.name: load_config(MineConfig if f.name.startswith("mine") else TrainConfig, f)
              for f in sorted(root.glob("*.yaml"))}
    assert len(loaded) >= 8
    mine, train = loaded["mine_code_recipe.yaml"], loaded["train_code_recipe.yaml"]
    assert (mine.teacher.max_query_length, mine.teacher.max_positive_length) == \
        (train.student.max_query_length, train.student.max_positive_length)
    assert mine.K == mine.batch_size == 32 and not mine.per_task and not train.student.lora.enabled
    assert train.schedule.startswith(mine.out)


# -- numbers: finite, and in range -----------------------------------------------------------------------

# (config class, key=value) -> what the error must say; every spelling of inf and NaN a user can write
NON_FINITE = {
    (TrainConfig, "lr=inf"): "lr: must be a finite number, got inf",
    (TrainConfig, "negatives=stored"): "negatives: must be one of mined, dataset, both",
    (TrainConfig, "h_dataset=0"): "h_dataset: must be > 0",
    (TrainConfig, "lr=.inf"): "lr: must be a finite number, got inf",
    (TrainConfig, "temperature=inf"): "temperature: must be a finite number, got inf",
    (TrainConfig, "temperature=nan"): "temperature: must be a finite number, got nan",
    (TrainConfig, "weight_decay=.inf"): "weight_decay: must be a finite number",
    (TrainConfig, "grad_clip=inf"): "grad_clip: must be a finite number",
    (TrainConfig, "student.lora.dropout=.nan"): "student.lora.dropout: must be a finite number",
    (TrainConfig, "refresh.poll_seconds=inf"): "refresh.poll_seconds: must be a finite number",
    (TrainConfig, "refresh.wait_timeout=inf"): "refresh.wait_timeout: must be a finite number",
    (TrainConfig, "refresh.mine={quality_temperature: .inf}"): "refresh.mine.quality_temperature: must be a finite",
    (MineConfig, "quality_temperature=-inf"): "quality_temperature: must be a finite number, got -inf",
    (MineConfig, "gcbs_threshold=nan"): "gcbs_threshold: must be a finite number",
    (MineConfig, "margin=inf"): "margin: must be a finite number",
    (MineConfig, "task_params={t0: {p: .inf}}"): "task_params.t0.p: must be a finite number",
}


@pytest.mark.parametrize("cls, override", NON_FINITE)
def test_inf_and_nan_are_refused_wherever_they_are_written(cls, override, tmp_path):
    """A range check alone lets inf through (``lr: inf`` is >= 0): it reached training, which failed only
    after the model had loaded and the run folder was written."""
    message = NON_FINITE[(cls, override)]
    with pytest.raises(ConfigError) as e:
        apply_overrides(cls(), [override])
    assert message in str(e.value)
    (tmp_path / "c.yaml").write_text(_yaml_line(*override.split("=", 1)))  # the same, written in a file
    with pytest.raises(ConfigError) as e:
        load_config(cls, tmp_path / "c.yaml")
    assert message in str(e.value)


def _yaml_line(key: str, value: str) -> str:
    """``a.b.c``, ``v`` -> the YAML a user writes for it (nested sections, the value verbatim)."""
    *sections, name = key.split(".")
    lines = [f"{'  ' * depth}{section}:" for depth, section in enumerate(sections)]
    return "\n".join([*lines, f"{'  ' * len(sections)}{name}: {value}"]) + "\n"


def test_a_config_built_in_code_is_checked_too():
    from dataclasses import replace

    from b3stream.config import validate

    with pytest.raises(ConfigError, match="lr: must be a finite number, got inf"):
        validate(TrainConfig(lr=float("inf")))
    with pytest.raises(ConfigError, match=r"teacher.max_query_length: must be > 0"):
        validate(replace(MineConfig(), teacher=replace(MineConfig().teacher, max_query_length=0)))


def test_integer_fields_refuse_infinity_with_a_message():
    """``int(float("inf"))`` raises OverflowError, which escaped as a traceback."""
    for override in ("K=.inf", "p=-.inf", "m=.nan"):
        with pytest.raises(ConfigError, match=f"{override.split('=')[0]}: expected int"):
            apply_overrides(MineConfig(), [override])


OUT_OF_RANGE = {
    (TrainConfig, "lr=0"): "lr: must be > 0",
    (TrainConfig, "seed=-1"): "seed: must be >= 0",
    (TrainConfig, "refresh.nice=-5"): "refresh.nice: must be in [0, 19]",
    (TrainConfig, "refresh.nice=20"): "refresh.nice: must be in [0, 19]",
    (TrainConfig, "student.lora.dropout=1.0"): "student.lora.dropout: must be in [0, 1)",
    (MineConfig, "K=0"): "K: must be > 0, got 0",
    (MineConfig, "K=-4"): "K: must be > 0, got -4",
    (MineConfig, "p=-1"): "p: must be >= 0, got -1",
    (MineConfig, "m=0"): "m: must be >= 1, got 0",
    (MineConfig, "h=-1"): "h: must be >= 0, got -1",
    (MineConfig, "batch_size=0"): "batch_size: must be > 0, got 0",
    (MineConfig, "embed_batch_size=0"): "embed_batch_size: must be > 0",
    (MineConfig, "embed_chunk=-1"): "embed_chunk: must be > 0",
    (MineConfig, "metis_ufactor=0"): "metis_ufactor: must be >= 1",
    (MineConfig, "hnsw_m=1"): "hnsw_m: must be >= 2",
    (MineConfig, "ivf_nlist=0"): "ivf_nlist: must be > 0 (or null)",
    (MineConfig, "ivf_nprobe=0"): "ivf_nprobe: must be > 0",
    (MineConfig, "hnsw_ef_search=0"): "hnsw_ef_search: must be > 0",
    (MineConfig, "recall_sample=-1"): "recall_sample: must be >= 0",
    (MineConfig, "exact_threshold=-1"): "exact_threshold: must be >= 0",
    (MineConfig, "margin=0"): "margin: must be in (0, 1.5]",
    (MineConfig, "margin=2"): "margin: must be in (0, 1.5]",
    (MineConfig, "quality_temperature=0"): "quality_temperature: must be > 0",
    (MineConfig, "quality_sample=-1"): "quality_sample: must be >= 0 (or null)",
    (MineConfig, "source_step=-1"): "source_step: must be >= 0 (or null)",
    (MineConfig, "small_tasks=drop"): "small_tasks: must be one of error, merge",
    (MineConfig, "index=annoy"): "index: must be one of auto, flat, ivf, hnsw, torch",
    (MineConfig, "edges=both"): "edges: must be one of mutual, union",
    (MineConfig, "strategy=hardest"): "strategy: must be one of random, random_hn, task, task_hn, gcbs, b3, b3pp",
    (MineConfig, "task_params={t0: {p: -1}}"): "task_params.t0.p: must be an integer >= 0, got -1",
    (MineConfig, "task_params={t0: {m: 0}}"): "task_params.t0.m: must be an integer >= 1, got 0",
    (MineConfig, "task_params={t0: {q: 1}}"): "task_params.t0: must map to p and/or m",
}


@pytest.mark.parametrize("cls, override", OUT_OF_RANGE)
def test_out_of_range_values_are_named_with_their_rule(cls, override):
    with pytest.raises(ConfigError) as e:
        apply_overrides(cls(), [override])
    assert OUT_OF_RANGE[(cls, override)] in str(e.value)


def test_values_at_the_edge_of_their_range_are_accepted():
    cfg = apply_overrides(MineConfig(), ["p=0", "m=1", "h=0", "K=1", "batch_size=1", "metis_ufactor=1", "hnsw_m=2",
                                         "margin=1.5", "quality_sample=0", "recall_sample=0", "gcbs_threshold=-0.5",
                                         "task_params={t0: {p: 0, m: 1}}"])
    assert (cfg.p, cfg.m, cfg.h, cfg.K) == (0, 1, 0, 1)
    cfg = apply_overrides(TrainConfig(), ["weight_decay=0", "warmup_ratio=0", "grad_clip=0", "refresh.nice=0",
                                          "refresh.nice=19", "seed=0", "lr=1e-9"])
    assert cfg.refresh.nice == 19

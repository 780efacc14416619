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

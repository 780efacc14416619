"""Bad values are refused when the config is read, before any model loads or run folder appears; the lr
schedule gives the first updates a rate above 0; ``--quiet`` silences the model-loading bar.

The refusals go through the real commands' entries (``b3stream train``, ``python -m b3stream.train``), in
this process, and one launched case per command for its exit code; the lr
schedule (transformers' warmup and decay, a JSON's own DeepSpeed WarmupDecayLR) against the formula, alone,
in a real DeepSpeed engine across a checkpoint, and in one short real training run.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from b3stream.config import ConfigError, TrainConfig, apply_overrides, load_config
from b3stream.train.ds_config import build_ds_config, lr_schedule, resolve_ds_path, start_lr_schedule

from ._train_util import random_schedule, run, write_config

B3 = [sys.executable, "-m", "b3stream"]

# key=value -> what the error must say (the key, with the allowed range)
BAD_VALUES = {
    "temperature=0": "temperature: must be > 0",
    "temperature=inf": "temperature: must be a finite number, got inf",  # passed, then failed after the model loaded
    "lr=-0.001": "lr: must be > 0",
    "lr=0": "lr: must be > 0",
    "lr=inf": "lr: must be a finite number, got inf",
    "grad_cache_chunk=0": "grad_cache_chunk: must be > 0",
    "fuse_sides=sometimes": "fuse_sides: must be auto, true or false",
    "num_workers=-1": "num_workers: must be >= 0",
    "max_steps=0": "max_steps: must be > 0",
    "epochs=0": "epochs: must be > 0",
    "warmup_ratio=1.0": "warmup_ratio: must be in [0, 1)",
    "warmup_ratio=-0.1": "warmup_ratio: must be in [0, 1)",
    "student.model=/no/such/model": "student.model: model folder /no/such/model does not exist",
}


# -- the config checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("override", BAD_VALUES)
def test_out_of_range_values_are_named(override, tmp_path):
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), [override])
    assert BAD_VALUES[override] in str(e.value)
    # The same from a YAML file, and an override may correct the file's value.
    key, value = override.split("=", 1)
    if "." not in key:
        (tmp_path / "c.yaml").write_text(f"{key}: {value}\n")
        with pytest.raises(ConfigError) as e:
            load_config(TrainConfig, tmp_path / "c.yaml")
        assert BAD_VALUES[override] in str(e.value)
        default = getattr(TrainConfig(), key)
        load_config(TrainConfig, tmp_path / "c.yaml", [f"{key}={'null' if default is None else default}"])


def test_model_folder_or_cached_hub_id(tmp_path, monkeypatch):
    assert apply_overrides(TrainConfig(), [f"student.model={tmp_path}"]).student.model == str(tmp_path)
    assert apply_overrides(TrainConfig(), ["student.model=minilm"]).student.model == "minilm"  # bundled
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="student.model: .*weights.bin is a file"):
        apply_overrides(TrainConfig(), [f"student.model={tmp_path / 'weights.bin'}"])
    # A hub id: offline (b3stream's default) it must be in the local cache, online it may be downloaded.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="student.model: model folder no-org/no-model does not exist"):
        apply_overrides(TrainConfig(), ["student.model=no-org/no-model"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    apply_overrides(TrainConfig(), ["student.model=no-org/no-model"])


def _ds_file(tmp_path, change) -> str:
    ds = json.loads(resolve_ds_path("zero2").read_text())
    change(ds)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda ds: ds["zero_optimization"].update(stagee=2),
     r"unknown DeepSpeed key zero_optimization.stagee \(did you mean 'stage'\?\)"),
    (lambda ds: ds["fp16"].update(loss_scal=0), r"unknown DeepSpeed key fp16.loss_scal"),
    (lambda ds: ds.update(zero_optimisation=ds.pop("zero_optimization")),
     r"unknown DeepSpeed key\(s\) 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"),
    (lambda ds: ds.update(scheduler={"type": "WarmupDecayLR", "params": {"warmup_typ": "linear"}}),
     r"unknown key\(s\) scheduler.params.warmup_typ for WarmupDecayLR"),
    (lambda ds: ds.update(scheduler={"type": "WarmupDecay"}), r"scheduler.type 'WarmupDecay' is neither"),
    (lambda ds: ds["zero_optimization"].update(stage="two"), r"zero_optimization.stage: Input should be"),
    (lambda ds: ds.pop("optimizer"), r'no "optimizer" section'),
])
def test_deepspeed_json_is_checked_by_deepspeed(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        build_ds_config(TrainConfig(), _ds_file(tmp_path, change), 1, 32, 100, "fp32")
    for name in ("zero0", "zero1", "zero2", "zero3", "zero2_offload"):  # the shipped files pass
        build_ds_config(TrainConfig(), resolve_ds_path(name), 2, 32, 100, "fp32")


# -- the same refusals through the commands: exit 2, the key named, no run folder, no model loaded -------


@pytest.fixture(scope="module")
def toy_schedule(toy_dataset, tmp_path_factory):
    return random_schedule(toy_dataset, batch_size=8, K=2, folder=tmp_path_factory.mktemp("val") / "schedules")


def _refused_in_process(entry, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a command entry run in this process; it returns or exits (argparse)."""
    try:
        code = entry(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override", BAD_VALUES)
def test_train_command_refuses_bad_values(override, tmp_path, toy_dataset, toy_schedule, capsys):
    """`b3stream train --config X key=value` through the command's own entry, in this process (the launched
    command's exit code: test_train_command_exits_2_on_a_bad_value)."""
    from b3stream.cli import main

    cfg = write_config(tmp_path / "train.yaml", data=str(toy_dataset), schedule=str(toy_schedule),
                       out=str(tmp_path / "run"))
    code, err = _refused_in_process(main, ["train", "--config", str(cfg), override], capsys)
    assert code == 2, err[-2000:]
    assert BAD_VALUES[override] in err
    assert "Traceback" not in err and "Loading weights" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_command_exits_2_on_a_bad_value(tmp_path, toy_dataset, toy_schedule):
    """The launched command: exit code 2, the key named, no traceback, no model loaded, no run folder (the value
    that once passed the check and failed after the model loaded)."""
    cfg = write_config(tmp_path / "train.yaml", data=str(toy_dataset), schedule=str(toy_schedule),
                       out=str(tmp_path / "run"))
    res = run([*B3, "train", "--config", str(cfg), "temperature=inf"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert BAD_VALUES["temperature=inf"] in res.stderr
    assert "Traceback" not in res.stderr and "Loading weights" not in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, message", [
    (lambda ds: ds.pop("optimizer"), 'no "optimizer" section'),
    (lambda ds: ds["zero_optimization"].update(stagee=2), "unknown DeepSpeed key zero_optimization.stagee"),
])
def test_launcher_entry_refuses_a_bad_deepspeed_json(change, message, tmp_path, toy_dataset, toy_schedule, capsys,
                                                     monkeypatch):
    """`python -m b3stream.train --deepspeed BAD.json`'s entry in this process; its ``finish`` (which ends a
    launched process with os._exit) hands the code back instead. The launched entry's exit code:
    test_launcher_entry_refuses_a_bad_value."""
    import b3stream.dist
    from b3stream.train.__main__ import main

    finished = []
    monkeypatch.setattr(b3stream.dist, "finish", finished.append)
    cfg = write_config(tmp_path / "train.yaml", data=str(toy_dataset), schedule=str(toy_schedule),
                       out=str(tmp_path / "run"))
    code, err = _refused_in_process(main, ["--config", str(cfg), "--deepspeed", _ds_file(tmp_path, change)], capsys)
    assert code == 2 and finished == [2], err[-2000:]
    assert message in err
    assert "Traceback" not in err and "Loading weights" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_launcher_entry_refuses_a_bad_value(tmp_path, toy_dataset, toy_schedule):
    cfg = write_config(tmp_path / "train.yaml", data=str(toy_dataset), schedule=str(toy_schedule),
                       out=str(tmp_path / "run"))
    res = run([sys.executable, "-m", "b3stream.train", "--config", str(cfg), "temperature=-1"])
    assert res.returncode == 2 and "temperature: must be > 0" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "Loading weights" not in res.stderr
    assert not (tmp_path / "run").exists()


# -- the lr schedule ---------------------------------------------------------------------------------------


def expected_rates(total: int, warmup_ratio: float, lr: float) -> list[float]:
    """The rate of updates 1..total, from the formula: lr * k / W while warming up over W updates (W = the
    ratio's share of the run, rounded up), the peak at update W, then linear decay to lr / (n - W) at the
    last update, n = total + 1; a warmup of 0 or 1 update is none, and the rate is then lr throughout."""
    warmup = math.ceil(warmup_ratio * total)
    if warmup < 2:
        return [lr] * total
    n = max(total, warmup) + 1
    return [lr * (k / warmup if k < warmup else (n - k) / (n - warmup)) for k in range(1, total + 1)]


def _drive(opt, sched, updates: int) -> list[float]:
    """The rate each update uses, in DeepSpeed's engine order (update with the current rate, then step the
    scheduler)."""
    rates = []
    for _ in range(updates):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def _optimizer(lr: float):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _rates(total: int, warmup_ratio: float, lr: float = 1e-3) -> list[float]:
    """b3stream's schedule (the shipped JSONs name none), built as DeepSpeed builds a client scheduler."""
    cfg = TrainConfig(lr=lr, warmup_ratio=warmup_ratio)
    ds = build_ds_config(cfg, resolve_ds_path("zero0"), 1, 8, total, "fp32")
    assert "scheduler" not in ds
    opt = _optimizer(ds["optimizer"]["params"]["lr"])
    sched = lr_schedule(ds, cfg, total)(opt)
    start_lr_schedule(sched)
    return _drive(opt, sched, total)


def _own_warmup_decay_rates(total: int, warmup_ratio: float, lr: float) -> list[float]:
    """A JSON's own DeepSpeed WarmupDecayLR with "auto" values: DeepSpeed's class, kept as before."""
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = TrainConfig(lr=lr, warmup_ratio=warmup_ratio)
    own = json.loads(resolve_ds_path("zero0").read_text())
    own["scheduler"] = {"type": "WarmupDecayLR", "params": {k: "auto" for k in (
        "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps")} | {"warmup_type": "linear"}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "ds.json"
        path.write_text(json.dumps(own))
        ds = build_ds_config(cfg, path, 1, 8, total, "fp32")
    assert lr_schedule(ds, cfg, total) is None  # DeepSpeed builds the JSON's own
    opt = _optimizer(lr)
    sched = WarmupDecayLR(opt, **copy.deepcopy(ds["scheduler"]["params"]))
    start_lr_schedule(sched)
    return _drive(opt, sched, total)


CASES = [(3, 0.9), (10, 0.3), (100, 0.1), (7, 0.0), (20, 0.05), (1, 0.5), (10, 0.15), (5, 0.2)]


@pytest.mark.parametrize("total, ratio", CASES)
def test_every_update_has_the_rate_of_the_formula(total, ratio):
    rates = _rates(total, ratio, lr=1e-3)
    assert rates == pytest.approx(expected_rates(total, ratio, 1e-3), rel=1e-12, abs=0)
    assert all(r > 0 for r in rates), rates
    assert max(rates) == pytest.approx(1e-3)
    warmup = math.ceil(ratio * total)
    if warmup < 2:
        assert rates[0] == pytest.approx(1e-3)  # no warmup: the first update at the full rate
    peak = rates.index(max(rates))
    assert all(a >= b for a, b in zip(rates[peak:], rates[peak + 1:]))  # then it decays


@pytest.mark.parametrize("total, ratio", CASES)
def test_a_json_s_own_warmup_decay_scheduler_is_kept_and_gives_the_same_rates(total, ratio):
    assert _own_warmup_decay_rates(total, ratio, 3e-4) == _rates(total, ratio, 3e-4)  # to the bit


def test_resume_reapplies_the_rate_of_the_next_update():
    """A resumed schedule holds the position of the next update (DeepSpeed saves its state_dict in the
    checkpoint); starting it again gives the optimizer that update's rate, whatever the optimizer held."""
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.5)
    ds = build_ds_config(cfg, resolve_ds_path("zero0"), 1, 8, 10, "fp32")
    opt = _optimizer(1e-3)
    sched = lr_schedule(ds, cfg, 10)(opt)
    start_lr_schedule(sched)
    before = _drive(opt, sched, 3)
    state = sched.state_dict()
    fresh = _optimizer(1e-3)
    resumed = lr_schedule(ds, cfg, 10)(fresh)
    resumed.load_state_dict(state)
    start_lr_schedule(resumed)
    after = _drive(fresh, resumed, 7)
    assert before + after == pytest.approx(expected_rates(10, 0.5, 1e-3), rel=1e-12, abs=0)


ENGINE_SCRIPT = """
import json, sys, torch, deepspeed
from b3stream.config import TrainConfig
from b3stream.dist import init_distributed
from b3stream.train.ds_config import build_ds_config, lr_schedule, resolve_ds_path, start_lr_schedule
init_distributed()  # the trainer's own start (it skips the JIT build of DeepSpeed's CPU shared-memory op)
folder, total, ratio = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = TrainConfig(lr=1e-3, warmup_ratio=ratio)
ds = build_ds_config(cfg, resolve_ds_path("zero0"), 1, 4, total, "fp32")
def engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    e, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds,
                                      lr_scheduler=lr_schedule(ds, cfg, total))
    return e
def updates(e, n):
    rates = []
    for _ in range(n):
        loss = e(torch.ones(4, 3)).pow(2).mean()
        e.backward(loss)
        rates.append(e.get_lr()[0])
        e.step()
    return rates
first = engine()
start_lr_schedule(first.lr_scheduler)
rates = updates(first, 3)
first.save_checkpoint(folder, tag="step3")
second = engine()
second.load_checkpoint(folder, tag="step3")
start_lr_schedule(second.lr_scheduler)
print(json.dumps({"before": rates, "after": updates(second, total - 3),
                  "kind": type(second.lr_scheduler).__name__}))
"""


def test_a_real_deepspeed_engine_uses_the_formula_s_rates_across_a_checkpoint(tmp_path):
    res = run([sys.executable, "-c", ENGINE_SCRIPT, str(tmp_path / "ckpt"), "8", "0.5"], timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["kind"] == "LambdaLR"  # transformers' schedule, DeepSpeed's client scheduler
    assert out["before"] + out["after"] == pytest.approx(expected_rates(8, 0.5, 1e-3), rel=1e-12, abs=0)


@pytest.mark.slow
def test_short_run_logs_rising_warmup_rates_and_quiet_hides_the_loading_bar(tmp_path, toy_dataset, toy_schedule):
    """Three real updates with warmup over all three: TensorBoard's train/lr is lr/3, 2lr/3, lr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path / "train.yaml", data=str(toy_dataset), schedule=str(toy_schedule),
                       out=str(tmp_path / "run"), max_steps=3, warmup_ratio=0.9, lr=3e-4,
                       student={"max_query_length": 16, "max_positive_length": 16})
    res = run([*B3, "train", "--config", str(cfg), "--quiet"], threads=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Loading weights" not in res.stderr
    assert "step 3/3" in res.stderr  # --quiet keeps the step lines
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(lr) == [1, 2, 3]
    assert 0 < lr[1] < lr[2] < lr[3]
    assert [lr[1], lr[2], lr[3]] == pytest.approx([1e-4, 2e-4, 3e-4])


@pytest.mark.slow
def test_mine_quiet_hides_the_loading_bar(tmp_path, toy_dataset):
    res = run([*B3, "mine", "embed", "--data", str(toy_dataset), "--out", str(tmp_path / "mine"), "--quiet",
               "--set", "teacher.max_query_length=16", "--set", "teacher.max_positive_length=16"],
              threads=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "mine" / "embeddings" / "queries.npy").is_file()
    assert "Loading weights" not in res.stderr, res.stderr[-2000:]


def test_fused_adamw_on_cuda_only_and_an_explicit_choice_wins(tmp_path):
    """On CUDA the torch AdamW gets fused=True (one kernel for all tensors); on CPU nothing changes; a
    "fused" written in the JSON is kept either way."""
    cfg = TrainConfig()
    on_gpu = build_ds_config(cfg, resolve_ds_path("zero2"), 1, 32, 100, "bf16", "cuda")
    assert on_gpu["optimizer"]["params"]["fused"] is True
    on_cpu = build_ds_config(cfg, resolve_ds_path("zero2"), 1, 32, 100, "fp32", "cpu")
    assert "fused" not in on_cpu["optimizer"]["params"]
    raw = json.loads(resolve_ds_path("zero2").read_text())
    raw["optimizer"]["params"]["fused"] = False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(raw))
    assert build_ds_config(cfg, path, 1, 32, 100, "bf16", "cuda")["optimizer"]["params"]["fused"] is False

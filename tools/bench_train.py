"""Training throughput and memory: the real trainer beside a plain sentence-transformers loop.

    python tools/bench_train.py                                   # CPU-sized: |B| = 32, LoRA, 5 timed steps
    python tools/bench_train.py --full --batch-size 32 --steps 20 --warmup 5
    python tools/bench_train.py --grad-cache 64 --memory 64,256,1024 --no-compare   # GradCache peak memory
    python tools/bench_train.py --schedule runs/mine/schedules --data data/code      # any mined strategy

What runs, each part in a fresh process (so that peak memory is that part's own):

1. **trainer**: ``b3stream.train.loop.train`` itself (DeepSpeed engine, DataLoader workers, BatchEmbedder,
   InfoNCE, GradCache when ``--grad-cache`` is set) for ``warmup + steps`` steps; the step time split
   (data / forward+backward / optimizer) and examples/s are the trainer's own TensorBoard scalars, the first
   ``warmup`` steps dropped. ``wall_examples_per_s`` is |B| x steps over the wall time between the end of the
   warm-up and the end of the last step (TensorBoard event times): it also counts what the per-step split
   does not (the monitor, the sampler, the loader hand-off). On CUDA the trainer waits for the GPU only on
   its logging steps, so ``--log-every 1`` (the default: a split for every step) costs a sync per step;
   ``--log-every 10`` times the loop as users run it, with examples/s per window of 10 steps.
2. **st**: a plain sentence-transformers loop on the same batches (the ids the trainer trained on, from its
   trace), the same model and LoRA adapter, the same max lengths: ``MultipleNegativesRankingLoss``
   (``CachedMultipleNegativesRankingLoss`` with ``--grad-cache``, mini-batch = the chunk) with
   scale = 1 / tau, ``torch.optim.AdamW`` (fused on CUDA), bf16 autocast where the trainer trains in bf16
   (on GPU; fp32 on CPU as the trainer), tokenising in the loop.
3. **memory** (``--memory 64,256,1024``): one trainer step per |B|, each in its own process; peak RSS of the
   training process (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

Hard negatives of a B3++ schedule are used by the trainer only; the sentence-transformers loop trains on
the pairs. Figures are only comparable within one run: other jobs on the machine move them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

FIELDS = ("examples_per_s", "wall_examples_per_s", "step_s", "data_s", "fwd_bwd_s", "optimizer_s",
          "peak_rss_gb", "peak_gpu_gb")


# ----------------------------------------------------------------------------------------------------------
# Inputs: a prepared dataset and a schedule of |B|
# ----------------------------------------------------------------------------------------------------------


def ensure_data(args, need: int) -> Path:
    """``--data``, or code-search pairs from the standard library prepared (once) under ``--out``."""
    if args.data:
        return Path(args.data)
    from b3stream.data.manifest import Manifest
    from b3stream.data.prepare import prepare_codesearch

    root = Path(args.out) / "data"
    if (root / "manifest.json").is_file() and Manifest.load(root).split("train").n >= need:
        return root
    # Held-out splits take a share of the pairs: ask for a margin over what training needs.
    prepare_codesearch(str(root), packages=["stdlib"], max_pairs=max(1200, int(need * 1.4)), overwrite=root.exists(),
                       progress=False)
    return root


def ensure_schedule(args, data: Path, batch_size: int) -> Path:
    """``--schedule``, or random batches of ``batch_size`` over the train split (published under ``--out``)."""
    if args.schedule:
        return Path(args.schedule)
    from b3stream.data.manifest import Manifest
    from b3stream.schedule import Schedule, latest_schedule_path, load_schedule, publish_schedule

    manifest = Manifest.load(data)
    folder = Path(args.out) / f"schedule-{batch_size}"
    stamp = manifest.stamp("train")
    if folder.is_dir():
        try:
            if load_schedule(latest_schedule_path(folder)).meta.get("data") == stamp:
                return folder
        except Exception:  # noqa: BLE001 - anything unusable is rebuilt
            pass
    n = manifest.split("train").n
    if n < batch_size:
        raise SystemExit(f"{data}: the train split has {n} pairs, fewer than |B| = {batch_size}")
    ids = np.random.default_rng(args.seed).permutation(n)
    batches = [ids[i : i + batch_size] for i in range(0, n, batch_size)]  # each id once: the last may be short
    meta = {"strategy": "random", "K": 1, "batch_size": batch_size, "h": 0, "seed": args.seed, "data": stamp}
    publish_schedule(Schedule.from_batches(batches, meta), folder)
    return folder


def student(args) -> dict:
    return {"max_query_length": args.max_query_length, "max_positive_length": args.max_positive_length,
            "lora": {"enabled": not args.full, "r": args.lora_r, "alpha": 2 * args.lora_r}}


def trainer_config(args, data: Path, schedule: Path, out: Path, steps: int) -> dict:
    return {"data": str(data), "schedule": str(schedule), "out": str(out), "student": student(args),
            "max_steps": steps, "grad_cache_chunk": args.grad_cache, "deepspeed": args.deepspeed,
            "precision": args.precision, "num_workers": args.num_workers, "log_every": args.log_every,
            "eval_split": None, "export": False, "trace_ids": True, "resume": False, "seed": args.seed,
            "lr": args.lr, "temperature": args.temperature, "keep_checkpoints": 1, "verify_data": False,
            "overwrite": True}  # the run folder holds this bench's own config


# ----------------------------------------------------------------------------------------------------------
# Children (each a fresh process)
# ----------------------------------------------------------------------------------------------------------


def _peaks() -> dict:
    import torch

    peak = {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # Linux: KiB
            "peak_gpu_gb": None}
    if torch.cuda.is_available():
        peak["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return peak


def child_trainer(spec: dict) -> dict:
    """Run the trainer; return its per-step scalars (from TensorBoard) and this process's peak memory."""
    import yaml

    from b3stream.config import TrainConfig, load_config
    from b3stream.train.loop import train

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    cfg = load_config(TrainConfig, path)
    summary = train(cfg, progress=False)
    result = {"summary": {k: summary.get(k) for k in ("steps", "batch_size", "precision", "zero_stage")},
              "scalars": _scalars(out / "tb"), **_peaks()}
    return result


def _scalars(tb: Path) -> dict:
    """TensorBoard ``train/*`` scalars -> {name: [(step, value, wall_time), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag.split("/", 1)[1]: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if tag.startswith("train/")}


def child_st(spec: dict) -> dict:
    """A plain sentence-transformers loop over the given batches of ids (see the module docstring)."""
    import torch
    from sentence_transformers import SentenceTransformer

    from b3stream.data.manifest import Manifest
    from b3stream.data.reader import ShardedDataset
    from b3stream.encoder import resolve_model

    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import losses

    torch.manual_seed(spec["seed"])
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = spec["precision"] == "bf16"
    model = SentenceTransformer(resolve_model(spec["model"]), device=device)
    if spec["lora"]:
        from peft import LoraConfig, get_peft_model

        # PEFT on the backbone, as b3stream's Encoder does (PEFT's default target modules, dropout 0.05).
        backbone = model[0]
        backbone.model = get_peft_model(backbone.model, LoraConfig(r=spec["lora_r"], lora_alpha=2 * spec["lora_r"],
                                                                   lora_dropout=0.05))
    model.train()
    scale = 1.0 / spec["temperature"]
    if spec["grad_cache"]:
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=spec["grad_cache"])
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model, scale=scale)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], fused=cuda)
    manifest = Manifest.load(spec["data"])
    records = ShardedDataset(spec["data"], "train", manifest=manifest, verify=False)

    def sync() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def features(texts: list[str], length: int) -> dict:
        model.max_seq_length = length
        tokens = (model.preprocess if hasattr(model, "preprocess") else model.tokenize)(texts)
        return {k: v.to(device, non_blocking=True) if hasattr(v, "to") else v for k, v in tokens.items()}

    steps = []
    t_first = None
    for ids in spec["batches"]:
        t0 = sync()
        t_first = t_first or t0
        recs = [records[int(i)] for i in ids]
        q = features([manifest.prompted(r, "query") for r in recs], spec["max_query_length"])
        p = features([manifest.prompted(r, "positive") for r in recs], spec["max_positive_length"])
        t1 = sync()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn([q, p], None)
        loss.backward()
        t2 = sync()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # the trainer clips at 1.0 too
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = sync()
        steps.append((len(ids), t1 - t0, t2 - t1, t3 - t2, t3))
    return {"steps": steps, **_peaks()}


def _child_main(kind: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = child_trainer(spec) if kind == "trainer" else child_st(spec)
    print("BENCH_RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the trainer's gloo group: leave without the exit-time abort (docs/architecture.md)


def run_child(kind: str, spec: dict, workdir: Path, timeout: int) -> dict:
    spec_path = workdir / f"{kind}-{time.time_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # one process of its own, not a rank of the caller's group
    res = subprocess.run([sys.executable, __file__, "--child", kind, str(spec_path)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    lines = [line for line in res.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"bench_train: the {kind} run failed (exit {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(lines[-1][len("BENCH_RESULT "):])


# ----------------------------------------------------------------------------------------------------------
# Reduction and report
# ----------------------------------------------------------------------------------------------------------


def trainer_figures(result: dict, warmup: int, batch_size: int) -> dict:
    s = result["scalars"]

    def timed(name: str) -> list[float]:
        return [v for step, v, _ in s.get(name, []) if step > warmup]

    # examples/s is logged on every step whose clock is exact (each step on CPU; on CUDA each step that
    # waited for the GPU, i.e. every log_every-th and the last), so its event times mark true step ends.
    ends = {step: wall for step, _, wall in s.get("examples_per_s", [])}
    last = max(ends) if ends else 0
    start = min((step for step in ends if step >= warmup), default=None)
    wall = (batch_size * (last - start) / (ends[last] - ends[start])
            if start is not None and last > start and ends[last] > ends[start] else None)
    out = {"examples_per_s": _median(timed("examples_per_s")), "wall_examples_per_s": wall,
           "step_s": None, "data_s": _median(timed("time_data")), "fwd_bwd_s": _median(timed("time_fwd_bwd")),
           "optimizer_s": _median(timed("time_optimizer")), "steps_timed": len(timed("examples_per_s")),
           "peak_rss_gb": result["peak_rss_gb"], "peak_gpu_gb": result["peak_gpu_gb"]}
    parts = [out["data_s"], out["fwd_bwd_s"], out["optimizer_s"]]
    if all(p is not None for p in parts):
        out["step_s"] = sum(parts)
    return out


def st_figures(result: dict, warmup: int) -> dict:
    steps = result["steps"][warmup:]
    if not steps:
        return {k: None for k in FIELDS}
    n, data, fb, opt, ends = (list(col) for col in zip(*steps))
    totals = [d + f + o for d, f, o in zip(data, fb, opt)]
    start = result["steps"][warmup - 1][4] if warmup > 0 else None
    wall = sum(n) / (ends[-1] - start) if start is not None and ends[-1] > start else None
    return {"examples_per_s": _median([b / t for b, t in zip(n, totals)]), "wall_examples_per_s": wall,
            "step_s": _median(totals), "data_s": _median(data), "fwd_bwd_s": _median(fb),
            "optimizer_s": _median(opt), "steps_timed": len(steps), "peak_rss_gb": result["peak_rss_gb"],
            "peak_gpu_gb": result["peak_gpu_gb"]}


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _cell(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    rows = [("examples/s (median step)", "examples_per_s", ".1f"), ("examples/s (wall)", "wall_examples_per_s", ".1f"),
            ("step s", "step_s", ".3f"), ("  data s", "data_s", ".3f"), ("  fwd+bwd s", "fwd_bwd_s", ".3f"),
            ("  optimizer s", "optimizer_s", ".3f"), ("peak RSS GB", "peak_rss_gb", ".2f"),
            ("peak GPU GB", "peak_gpu_gb", ".2f")]
    tr, st = report.get("trainer"), report.get("st")
    lines = [f"{'':26s} {'trainer':>10s} {'st-loop':>10s} {'ratio':>7s}"]
    for label, key, spec in rows:
        a = tr.get(key) if tr else None
        b = st.get(key) if st else None
        ratio = a / b if a is not None and b else None
        lines.append(f"{label:26s} {_cell(a, spec):>10s} {_cell(b, spec):>10s} {_cell(ratio, '.2f'):>7s}")
    if report.get("memory"):
        lines.append("")
        lines.append(f"{'|B|':>6s} {'chunk':>6s} {'peak RSS GB':>12s} {'peak GPU GB':>12s} {'step s':>8s}")
        for m in report["memory"]:
            lines.append(f"{m['batch_size']:>6d} {str(m['chunk']):>6s} {_cell(m['peak_rss_gb'], '.2f'):>12s} "
                         f"{_cell(m['peak_gpu_gb'], '.2f'):>12s} {_cell(m['step_s'], '.1f'):>8s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="prepared dataset (default: stdlib code-search pairs under --out/data)")
    ap.add_argument("--schedule", help="schedule file or folder, any strategy (default: random batches of --batch-size)")
    ap.add_argument("--batch-size", type=int, default=32, help="|B| of the generated schedule (default 32)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--grad-cache", type=int, default=None, metavar="CHUNK", help="GradCache chunk (both loops)")
    ap.add_argument("--max-query-length", type=int, default=64)
    ap.add_argument("--max-positive-length", type=int, default=128)
    ap.add_argument("--deepspeed", default="zero0")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--num-workers", type=int, default=None,
                    help="the trainer's DataLoader workers (default: its own rule, the cores per rank less one)")
    ap.add_argument("--log-every", type=int, default=1,
                    help="the trainer's log_every (1: the step split of every step; larger: fewer host syncs)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="student model (default: the bundled MiniLM)")
    ap.add_argument("--no-compare", action="store_true", help="skip the trainer / sentence-transformers timing")
    ap.add_argument("--no-st", action="store_true", help="time the trainer only")
    ap.add_argument("--memory", default=None, metavar="B1,B2,..",
                    help="peak memory of one trainer step per |B| (with --grad-cache: the GradCache check)")
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one; data cached there)")
    ap.add_argument("--json", default=None, help="also write the report here")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per child process")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child_main(*args.child)
    if args.warmup < 1 and not args.no_compare:
        ap.error("--warmup must be >= 1 (the first step compiles, allocates and warms caches)")
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
        args.out = tmp.name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(b) for b in args.memory.split(",")] if args.memory else []
    total = args.warmup + args.steps
    data = ensure_data(args, max([args.batch_size * total, *sizes]))

    import torch

    from b3stream.train.ds_config import resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(args.precision, device)
    report = {"config": {"batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
                         "lora": not args.full, "lora_r": args.lora_r if not args.full else None,
                         "grad_cache": args.grad_cache, "max_query_length": args.max_query_length,
                         "max_positive_length": args.max_positive_length, "deepspeed": args.deepspeed,
                         "precision": precision, "device": torch.cuda.get_device_name() if device.type == "cuda"
                         else f"cpu ({os.cpu_count()} cores)", "threads": torch.get_num_threads(),
                         "data": str(data)},
              "trainer": None, "st": None, "ratio": None, "memory": []}
    if not args.no_compare:
        schedule = ensure_schedule(args, data, args.batch_size)
        run_dir = out / f"trainer-{time.time_ns()}"
        tr = run_child("trainer", trainer_config(args, data, schedule, run_dir, total), out, args.timeout)
        batch = tr["summary"]["batch_size"]
        report["config"]["batch_size"] = batch
        report["trainer"] = trainer_figures(tr, args.warmup, batch)
        if not args.no_st:
            trace = [json.loads(line) for line in (run_dir / "trace.jsonl").read_text().splitlines()]
            spec = {"data": str(data), "batches": [t["ids"] for t in trace], "model": args.model,
                    "lora": not args.full, "lora_r": args.lora_r, "grad_cache": args.grad_cache,
                    "max_query_length": args.max_query_length, "max_positive_length": args.max_positive_length,
                    "precision": precision, "lr": args.lr, "temperature": args.temperature, "seed": args.seed}
            report["st"] = st_figures(run_child("st", spec, out, args.timeout), args.warmup)
            a, b = report["trainer"]["examples_per_s"], report["st"]["examples_per_s"]
            report["ratio"] = a / b if a and b else None
    for size in sizes:
        schedule = ensure_schedule(args, data, size)
        one = dict(vars(args), log_every=1)
        spec = trainer_config(argparse.Namespace(**one), data, schedule, out / f"memory-{size}-{time.time_ns()}", 1)
        res = run_child("trainer", spec, out, args.timeout)
        parts = [res["scalars"].get(k) for k in ("time_data", "time_fwd_bwd", "time_optimizer")]
        report["memory"].append({"batch_size": size, "chunk": args.grad_cache, "peak_rss_gb": res["peak_rss_gb"],
                                 "peak_gpu_gb": res["peak_gpu_gb"],
                                 "step_s": sum(p[0][1] for p in parts) if all(parts) else None})
    if report["memory"]:
        key = "peak_gpu_gb" if report["memory"][0]["peak_gpu_gb"] is not None else "peak_rss_gb"
        first = report["memory"][0][key]
        report["memory_growth"] = {str(m["batch_size"]): m[key] / first for m in report["memory"]}
    c = report["config"]
    print(f"bench_train: {c['device']}, {c['threads']} threads, |B|={c['batch_size']}, "
          f"{'LoRA r=' + str(c['lora_r']) if c['lora'] else 'full fine-tune'}, {c['precision']}, "
          f"GradCache {c['grad_cache'] or 'off'}, lengths {c['max_query_length']}/{c['max_positive_length']}, "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return report


if __name__ == "__main__":
    main()

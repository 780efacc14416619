"""Memory per rank of a decoder-LLM student: ZeRO-0 against ZeRO-3, LoRA and full fine-tuning.

    python tools/bench_rank_memory.py                          # a 189M-parameter Llama, 2 ranks, ZeRO 0 and 3
    python tools/bench_rank_memory.py --hidden 2048 --layers 16 --modes lora --json rank_memory.json

A randomly initialised Llama of the asked size (no download; word-level tokenizer) is trained for a few steps
by ``b3stream.train`` under ``torchrun --nproc_per_node RANKS`` for each ZeRO stage and mode, each run a fresh
set of processes. Printed per rank: the bytes of the student the rank holds right after loading (under ZeRO-3
the backbone is built inside ``deepspeed.zero.Init``: a share) and the rank's peak RSS over the whole run
(``ru_maxrss``: the model, gradients, AdamW states and the activations of one step, plus about 1 GB of
torch, DeepSpeed and transformers). The trainer writes both into ``RUN/summary.json`` (``memory``).

What ZeRO-3 saves grows with the model: here the fixed cost of the libraries is a large part of each rank's
peak; for a 7B student the weights alone are 28 GB in fp32 (14 GB in bf16) on every rank under ZeRO-0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["open", "a", "file", "and", "read", "its", "lines", "def", "return", "sorted", "list", "parse", "date",
         "string", "the", "of", "to", "x", "y", "("]


def write_llama(folder: Path, hidden: int = 32, layers: int = 2, intermediate: int | None = None) -> Path:
    """A randomly initialised Llama and a word-level tokenizer (EOS ``</s>``, never added by the tokenizer)
    saved in ``folder``: a decoder student with no download (the tests' tiny Llama uses it too)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>").save_pretrained(str(folder))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, eos_token_id=1, pad_token_id=1)
    LlamaModel(config).save_pretrained(str(folder))
    return folder


def prepare(work: Path, hidden: int, layers: int) -> tuple[Path, Path, Path]:
    """(model, data, schedule folder), built once in ``work``."""
    from b3stream.config import MineConfig
    from b3stream.data.prepare import prepare_codesearch
    from b3stream.mining.pipeline import run_all

    model = work / f"llama-h{hidden}-l{layers}"
    if not (model / "config.json").is_file():
        model.mkdir(parents=True, exist_ok=True)
        write_llama(model, hidden, layers, intermediate=4 * hidden)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        prepare_codesearch(str(data), packages=["stdlib"], max_pairs=400, samples_per_shard=200, progress=False)
    schedules = work / "mine" / "schedules"
    if not schedules.is_dir():
        run_all(MineConfig(data=str(data), out=str(work / "mine"), strategy="random", batch_size=8), progress=False)
    return model, data, schedules


def run_cell(work: Path, model: Path, data: Path, schedules: Path, stage: int, mode: str, ranks: int,
             steps: int) -> dict:
    from b3stream.dist import free_port

    out = work / f"run-zero{stage}-{mode}"
    cfg = {"data": str(data), "schedule": str(schedules), "out": str(out), "overwrite": True, "resume": False,
           "deepspeed": f"zero{stage}", "max_steps": steps, "log_every": 1, "num_workers": 0, "eval_split": None,
           "export": False, "save_every": None,
           "student": {"model": str(model), "pooling": "last", "max_query_length": 16, "max_positive_length": 32,
                       "lora": {"enabled": mode == "lora", "r": 8, "alpha": 16}}}
    path = work / f"zero{stage}-{mode}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                          f"--master_port={free_port()}", "-m", "b3stream.train", "--config", str(path)],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"zero{stage} {mode} failed:\n{res.stderr[-3000:]}")
    memory = json.loads((out / "summary.json").read_text())["memory"]
    return {"stage": stage, "mode": mode, "ranks": ranks,
            "student_gb_at_load": [round(b / 2**30, 3) for b in memory["student_bytes_at_load"]],
            "peak_rss_gb": memory["peak_rss_gb"], "peak_rss_gb_loaded": memory["peak_rss_gb_loaded"],
            "peak_rss_gb_engine": memory["peak_rss_gb_engine"], "peak_rss_gb_trained": memory["peak_rss_gb_trained"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/b3stream-rank-memory", help="model, data and runs (kept)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stages", default="0,3")
    ap.add_argument("--modes", default="lora,full", help="lora and / or full (fine-tuning)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data, schedules = prepare(work, args.hidden, args.layers)
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    print(f"Llama hidden {args.hidden}, {args.layers} layers: {params / 1e6:.0f}M parameters "
          f"({params * 4 / 2**30:.2f} GB in fp32); {args.ranks} ranks, {args.steps} steps, fp32 on CPU", flush=True)
    rows = []
    print("| ZeRO | mode | student held at load, GB per rank | peak RSS after loading | ... after the engine | "
          "... after the steps | ... at the end (checkpoint saved) |\n|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            row = run_cell(work, model, data, schedules, stage, mode, args.ranks, args.steps)
            rows.append(row)
            print(f"| {stage} | {mode} | " + " | ".join(" / ".join(map(str, row[k])) for k in (
                "student_gb_at_load", "peak_rss_gb_loaded", "peak_rss_gb_engine", "peak_rss_gb_trained",
                "peak_rss_gb")) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"params": params, "hidden": args.hidden, "layers": args.layers,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

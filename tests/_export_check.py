"""Run under ``torchrun --nproc_per_node 2``: a bf16 full fine-tune of a tiny Llama under ZeRO-2 and ZeRO-3 on
CPU, a few real optimizer steps, then the trainer's export. Rank 0 writes, per stage, how far the exported
weights are from DeepSpeed's fp32 master copy and from the bf16 copy the forward used, to ``argv[1]``.

Usage: _export_check.py OUT.json TINY_LLAMA_FOLDER DATASET
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(out_path: str, model: str, data: str) -> None:
    from b3stream.dist import finish, init_distributed

    info = init_distributed()
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import AutoModel

    from b3stream.config import EncoderConfig, LoraConfig, TrainConfig
    from b3stream.data.manifest import Manifest
    from b3stream.encoder import Encoder
    from b3stream.train.ds_config import build_ds_config, resolve_ds_path
    from b3stream.train.loop import _export
    from b3stream.train.loss import BatchEmbedder, InfoNCE

    texts = ["open a file and read its lines", "return sorted list", "parse the date string", "x to y"]
    results = {}
    for stage in (2, 3):
        torch.manual_seed(0)
        cfg = TrainConfig(lr=1e-3, export=True, student=EncoderConfig(model=model, pooling="last",
                                                                      lora=LoraConfig(enabled=False)))
        enc = Encoder(cfg.student, trainable=True)
        model_ = BatchEmbedder(enc)
        ds = build_ds_config(cfg, resolve_ds_path(f"zero{stage}"), info.world_size, 2 * info.world_size, 10, "bf16")
        engine, *_ = deepspeed.initialize(model=model_, config=ds,
                                          model_parameters=[p for p in model_.parameters() if p.requires_grad])
        mine = texts[2 * info.rank: 2 * info.rank + 2]
        for _ in range(3):
            emb = engine({"query": dict(enc.tokenize(mine, "query")), "positive": dict(enc.tokenize(mine, "positive"))})
            engine.backward(InfoNCE(0.05)(emb["query"], emb["positive"]).loss)
            engine.step()
        names = [n for n, p in enc.model.named_parameters() if p.requires_grad]
        masters = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in enc.model.named_parameters()
                   if p.requires_grad}  # collective under ZeRO-3: every rank
        with deepspeed.zero.GatheredParameters(list(enc.model.parameters()), enabled=stage == 3):
            module = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
        out = Path(out_path).parent / f"export-zero{stage}"
        _export(engine, enc, cfg, Manifest.load(data), out, info, stage, "bf16")
        if info.is_main:
            exported = dict(AutoModel.from_pretrained(str(out / "merged"), dtype=torch.float32).named_parameters())
            on_disk = {p.dtype for p in AutoModel.from_pretrained(str(out / "merged"), dtype="auto").parameters()}
            results[f"zero{stage}"] = {
                "params": len(names), "dtype_on_disk": sorted(str(d) for d in on_disk),
                "vs_master": max(float((exported[n] - masters[n]).abs().max()) for n in names),
                "vs_bf16_module": max(float((exported[n] - module[n].float()).abs().max()) for n in names),
                "module_dtype": str(next(iter(module.values())).dtype),
                # the run goes on after the export: the module holds its bf16 weights again
                "restored": all(torch.equal(p.detach(), module[n]) for n, p in enc.model.named_parameters())
                if stage != 3 else None,
            }
    if info.is_main:
        Path(out_path).write_text(json.dumps(results, indent=2))
    finish(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])

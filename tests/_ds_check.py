"""Run under ``torchrun --nproc_per_node 2``: real DeepSpeed engines (ZeRO 0-3) on a LoRA MiniLM.

For each stage, one engine computes the plain loss and one the GradCache loss (chunks of 2) of the same
global batch, each rank holding half of it. Their full gradients (``safe_get_full_grad``, after DeepSpeed's
cross-rank averaging) are compared with each other and with the gradient of one process holding the whole
batch without DeepSpeed. Rank 0 writes the differences to ``argv[1]`` as JSON.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

from b3stream.dist import finish, init_distributed

QUERIES = ["sort a list in place", "read a file line by line", "parse json from a string", "hash a password",
           "merge two dictionaries", "open a socket", "format a date", "reverse a string"]
DOCS = ["def sort_in_place(xs):\n    xs.sort()", "def lines(path):\n    return open(path).readlines()",
        "def parse(s):\n    return json.loads(s)", "def hash_pw(p):\n    return sha256(p).hexdigest()",
        "def merge(a, b):\n    return {**a, **b}", "def connect(host):\n    return socket.create_connection(host)",
        "def fmt(d):\n    return d.strftime('%Y')", "def rev(s):\n    return s[::-1]"]
NEGS = ["def add(a, b):\n    return a + b", "class Stack:\n    pass", "def noop():\n    pass", "x = 1"]
TAU = 0.05


def main(out_path: str) -> None:
    info = init_distributed()
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from b3stream.config import EncoderConfig, LoraConfig, TrainConfig
    from b3stream.encoder import Encoder
    from b3stream.train.ds_config import build_ds_config, resolve_ds_path
    from b3stream.train.loss import BatchEmbedder, InfoNCE

    def encoder():
        torch.manual_seed(0)
        enc = Encoder(EncoderConfig(max_query_length=16, max_positive_length=24,
                                    lora=LoraConfig(r=4, alpha=8, dropout=0.0)), trainable=True)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in enc.named_parameters():
                if "lora_B" in name:  # B = 0 at init would zero A's gradient
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        return enc

    def features(enc, texts, side):
        return dict(enc.tokenize(texts, side))

    half = len(QUERIES) // info.world_size
    lo, hi = info.rank * half, (info.rank + 1) * half
    nh = len(NEGS) // info.world_size
    results = {}

    # One process, whole batch, no DeepSpeed, no process group involved: the reference.
    ref_enc = encoder()
    ref_enc.eval()
    q = ref_enc(**features(ref_enc, QUERIES, "query"))
    d = ref_enc(**features(ref_enc, DOCS, "positive"))
    n = ref_enc(**features(ref_enc, NEGS, "positive"))
    target = torch.arange(len(QUERIES))
    ref_loss = F.cross_entropy(q @ torch.cat([d, n]).T / TAU, target)
    ref_loss.backward()
    ref = {name: p.grad.clone() for name, p in ref_enc.named_parameters() if p.requires_grad}

    for stage in (0, 1, 2, 3):
        grads = {}
        for chunk in (None, 2):
            enc = encoder()
            model = BatchEmbedder(enc, chunk=chunk)
            cfg = TrainConfig(lr=1e-4, grad_cache_chunk=chunk)
            ds = build_ds_config(cfg, resolve_ds_path(f"zero{stage}"), info.world_size, len(QUERIES), 10, "fp32")
            engine, *_ = deepspeed.initialize(model=model, config=ds,
                                              model_parameters=[p for p in model.parameters() if p.requires_grad])
            engine.module.eval()  # no dropout: the three computations must see the same function
            batch = {"query": features(enc, QUERIES[lo:hi], "query"),
                     "positive": features(enc, DOCS[lo:hi], "positive"),
                     "negative": features(enc, NEGS[info.rank * nh:(info.rank + 1) * nh], "positive")}
            emb = engine(batch)
            out = InfoNCE(TAU)(emb["query"], emb["positive"], emb["negative"])
            engine.backward(out.loss)
            grads[chunk] = {name: safe_get_full_grad(p).detach().clone()
                            for name, p in engine.module.encoder.named_parameters() if p.requires_grad}
            results[f"zero{stage}_chunk{chunk}_loss"] = out.global_loss
        plain = grads[None]
        results[f"zero{stage}_plain_vs_ref"] = max(float((plain[k] - ref[k]).abs().max()) for k in ref)
        if 2 in grads:
            results[f"zero{stage}_cached_vs_plain"] = max(float((grads[2][k] - plain[k]).abs().max()) for k in ref)
        results[f"zero{stage}_grad_scale"] = max(float(ref[k].abs().max()) for k in ref)
        results[f"zero{stage}_params"] = len(ref)
    results["ref_loss"] = float(ref_loss.detach())
    if info.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=2)
    finish(0)


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env python3
"""PyTorch eager peer of `meft bench model`: the same geometry with transformers'
LlamaForCausalLM (random init), forward and forward+backward (loss on every position, grads
for every weight), printing and writing the same JSON fields as meft.

    python3 bench/peers/torch_model.py --preset smollm2-135m --batch 8 --seq 512 --dtype bf16 --out torch.json
"""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama7b": dict(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, intermediate_size=11008, rope_theta=10000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=4096, tie_word_embeddings=False),
}


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t) * 1e3)
    return runs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=PRESETS)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = dict(PRESETS[a.preset])
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to("cuda", dtype)
    ids = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq), device="cuda")
    labels = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq), device="cuda")

    def fwd():
        with torch.no_grad():
            model(ids).logits

    def train():
        # Same loss as meft: next-token targets given explicitly, logits upcast to f32.
        logits = model(ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)

    f, t = timed(fwd, a.warmup, a.iters), timed(train, a.warmup, a.iters)
    fm, tm = statistics.median(f), statistics.median(t)
    tokens = a.batch * a.seq
    res = dict(label=f"pytorch {a.dtype}", preset=a.preset, n_layers=cfg["num_hidden_layers"], batch=a.batch, seq=a.seq,
               forward_ms=fm, forward_tokens_per_s=tokens / fm * 1e3, train_step_ms=tm, train_tokens_per_s=tokens / tm * 1e3,
               forward_runs_ms=f, train_runs_ms=t, torch=torch.__version__, gpu=torch.cuda.get_device_name(0))
    json.dump(res, open(a.out, "w"), indent=1)
    print(f"| {res['label']} | {a.preset} | {res['n_layers']} | {a.batch}×{a.seq} | {fm:.1f} | {tokens / fm * 1e3:.0f} | {tm:.1f} | {tokens / tm * 1e3:.0f} |")


if __name__ == "__main__":
    main()

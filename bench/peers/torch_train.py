#!/usr/bin/env python3
"""PyTorch eager peer of `meft bench train`: the same geometry with transformers'
LlamaForCausalLM (random init, frozen), the same adapter kinds, AdamW (lr 1e-4, no decay),
loss on every position, printing and writing the same JSON schema as meft (`{"rows": [...]}`).

Kinds (as meft's):
  none     the frozen base with only layer 0's input-norm scale trainable, so the step runs the
           full backward through every layer (the floor of any adapter's step);
  lora:R   PEFT LoRA of rank R on q_proj and v_proj, alpha 16, no dropout (PEFT keeps the
           adapter in fp32 beside a bf16 base: autocast_adapter_dtype);
  dense:N  a dense parallel adapter beside every MLP: mlp(x) + relu(x K^T) V with K, V of
           N x d in fp32 (x cast up, the output cast back), K ~ N(0, 0.02), V = 0.

Memory: *_bytes from torch.cuda: weights/adapter = parameter bytes; steady = allocated between
steps; activations = allocated after the loss minus before the forward; peak = the caching
allocator's reserved high-water mark over one step (cache emptied before it, as meft releases
cubecl's free pages), peak_allocated_bytes = max allocated.

    python3 bench/peers/torch_train.py --preset llama7b --layers 4 --batch 4 --seqs 512 \
        --kinds none,lora:8,dense:65536 --dtype bf16 --out torch-train.json
"""
import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torch_model import PRESETS


class DenseAdapterMlp(torch.nn.Module):
    """A frozen MLP plus a dense ReLU key/value adapter of n neurons (fp32)."""

    def __init__(self, mlp, d, n):
        super().__init__()
        self.mlp = mlp
        dev = next(mlp.parameters()).device
        self.keys = torch.nn.Parameter(torch.randn(n, d, device=dev) * 0.02)
        self.values = torch.nn.Parameter(torch.zeros(n, d, device=dev))

    def forward(self, x):
        xa = x.to(self.keys.dtype)
        y = torch.relu(xa @ self.keys.t()) @ self.values
        return self.mlp(x) + y.to(x.dtype)


def build(cfg, kind, dtype):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa")).to("cuda", dtype)
    model.requires_grad_(False)
    family, _, arg = kind.partition(":")
    if family == "none":
        model.model.layers[0].input_layernorm.weight.requires_grad_(True)
    elif family == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=int(arg), lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        )
    elif family == "dense":
        for layer in model.model.layers:
            layer.mlp = DenseAdapterMlp(layer.mlp, cfg["hidden_size"], int(arg))
    else:
        raise SystemExit(f"unknown kind {kind!r} (none, lora:R, dense:N)")
    return model


def param_bytes(model):
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def measure(a, cfg, kind, seq, dtype):
    row = dict(label=f"torch eager {a.dtype}", model=a.preset, layers=cfg["num_hidden_layers"],
               d_model=cfg["hidden_size"], batch=a.batch, seq=seq, adapter=kind,
               family=kind.partition(":")[0], neurons=None, step_ms=None, tokens_per_s=None,
               runs_ms=[], weights_bytes=None, adapter_bytes=None, optimizer_bytes=None,
               activation_bytes=None, steady_bytes=None, peak_bytes=None, peak_allocated_bytes=None,
               host_store_bytes=0, h2d_bytes=0.0, d2h_bytes=0.0, exposed_transfer_ms=0.0,
               active_rows=0.0, error=None)
    if row["family"] == "dense":
        row["neurons"] = int(kind.partition(":")[2])
    torch.cuda.empty_cache()
    m0 = torch.cuda.memory_allocated()
    model = build(cfg, kind, dtype)
    m1 = torch.cuda.memory_allocated()
    row["adapter_bytes"], row["weights_bytes"] = param_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator(device="cuda").manual_seed(7)
    ids = torch.randint(0, cfg["vocab_size"], (a.batch, seq), device="cuda", generator=g)

    def step(mem=None):
        if mem is not None:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            mem["steady"] = before
        loss = model(input_ids=ids, labels=ids).loss
        if mem is not None:
            torch.cuda.synchronize()
            mem["activations"] = torch.cuda.memory_allocated() - before
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if mem is not None:
            mem["peak"] = torch.cuda.max_memory_reserved()
            mem["peak_allocated"] = torch.cuda.max_memory_allocated()

    mem = {}
    for i in range(a.warmup):
        step(mem if i == a.warmup - 1 else None)
    row.update(activation_bytes=mem["activations"], steady_bytes=mem["steady"], peak_bytes=mem["peak"],
               peak_allocated_bytes=mem["peak_allocated"], optimizer_bytes=max(0, mem["steady"] - (m1 - m0)))
    runs = []
    for _ in range(a.iters):
        t = time.perf_counter()
        step()
        runs.append((time.perf_counter() - t) * 1e3)
    ms = statistics.median(runs)
    row.update(runs_ms=runs, step_ms=ms, tokens_per_s=a.batch * seq / (ms / 1e3))
    del model, opt
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smollm2-135m", choices=PRESETS)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqs", default="512")
    ap.add_argument("--kinds", default="none,lora:8,dense:4096")
    ap.add_argument("--dtype", default="bf16", choices=["f32", "bf16"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cfg = dict(PRESETS[a.preset])
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    rows = []
    for seq in [int(s) for s in a.seqs.split(",")]:
        cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], seq)
        for kind in a.kinds.split(","):
            try:
                row = measure(a, cfg, kind, seq, dtype)
            except torch.cuda.OutOfMemoryError as e:
                row = dict(label=f"torch eager {a.dtype}", model=a.preset, adapter=kind, seq=seq,
                           family=kind.partition(":")[0], error=f"out of memory: {str(e)[:200]}")
            torch.cuda.empty_cache()
            gib = lambda b: "–" if b is None else f"{b / 2**30:.2f}"
            print(f"| {row['label']} | {kind} | {seq} | {row.get('step_ms') or row.get('error')} ms | "
                  f"peak {gib(row.get('peak_bytes'))} GiB | act {gib(row.get('activation_bytes'))} GiB |", flush=True)
            rows.append(row)
    with open(a.out, "w") as f:
        json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

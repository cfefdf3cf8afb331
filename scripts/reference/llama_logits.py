#!/usr/bin/env python3
"""Independent reference logits for meft's LLaMA implementation.

Reads a GGUF file with the `gguf` package (its own dequantizer), runs a float64 numpy
forward pass with llama.cpp's adjacent-pair ("normal") RoPE applied to the GGUF weights as
stored (meft instead un-permutes Q/K and uses rotate-half RoPE: two different routes to the
same numbers), and writes, for each prompt and position, the logits of a subset of token ids
(the reference's top 16 plus 48 fixed ids) to a JSON fixture.

Token ids come from a small pure-Python byte-level BPE written here from the GGUF vocabulary
and merges (GPT-2 byte map and regex, digits split one by one as SmolLM's pre-tokenizer does,
ChatML markers as special tokens) -- independent of the `tokenizers` crate meft uses -- or are
given as fixed ids for the tinycoder fixture.

Usage (the command that made tests/fixtures/reference_logits.json):
    pip install gguf numpy regex
    python3 scripts/reference/llama_logits.py --out tests/fixtures/reference_logits.json
"""
import argparse
import json
import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOL = "assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "assets/tinycoder/tiny.gguf"

SMOL_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "In the beginning God created the heaven and the earth. Verse 1:31, year 1611!",
]
TINY_IDS = [[1, 450, 4996, 17354, 1701, 29916], [1, 29871, 13, 1576, 2]]


def field(r, key):
    f = r.fields.get(key)
    return None if f is None else f.contents()


def load(path):
    r = GGUFReader(path)
    cfg = {
        "d": field(r, "llama.embedding_length"),
        "layers": field(r, "llama.block_count"),
        "heads": field(r, "llama.attention.head_count"),
        "kv_heads": field(r, "llama.attention.head_count_kv") or field(r, "llama.attention.head_count"),
        "eps": field(r, "llama.attention.layer_norm_rms_epsilon"),
        "theta": field(r, "llama.rope.freq_base") or 10000.0,
    }
    w = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64).reshape(list(reversed(t.shape.tolist()))) for t in r.tensors}
    return cfg, w


def rms(x, g, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g


def rope_adjacent(x, theta):
    """x: [heads, T, hd]; rotates adjacent pairs (2i, 2i+1) by pos * theta^(-2i/hd)."""
    h, t, hd = x.shape
    freqs = theta ** (-np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * freqs[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def forward(cfg, w, ids):
    d, H, KV = cfg["d"], cfg["heads"], cfg["kv_heads"]
    hd = d // H
    x = w["token_embd.weight"][ids]
    T = len(ids)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(cfg["layers"]):
        p = lambda n: w[f"blk.{i}.{n}.weight"]
        h = rms(x, p("attn_norm"), cfg["eps"])
        q = (h @ p("attn_q").T).reshape(T, H, hd).transpose(1, 0, 2)
        k = (h @ p("attn_k").T).reshape(T, KV, hd).transpose(1, 0, 2)
        v = (h @ p("attn_v").T).reshape(T, KV, hd).transpose(1, 0, 2)
        q, k = rope_adjacent(q, cfg["theta"]), rope_adjacent(k, cfg["theta"])
        k, v = np.repeat(k, H // KV, 0), np.repeat(v, H // KV, 0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ v).transpose(1, 0, 2).reshape(T, d)
        x = x + a @ p("attn_output").T
        h = rms(x, p("ffn_norm"), cfg["eps"])
        g = h @ p("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    x = rms(x, w["output_norm.weight"], cfg["eps"])
    head = w.get("output.weight", w["token_embd.weight"])
    return x @ head.T


def cases(path, prompts_or_ids, tokenizer):
    cfg, w = load(os.path.join(ROOT, path))
    out = []
    for item in prompts_or_ids:
        ids = tokenizer(item) if tokenizer else item
        logits = forward(cfg, w, ids)
        vocab = logits.shape[1]
        fixed = np.linspace(0, vocab - 1, 48).astype(int)
        rows = []
        for t in range(len(ids)):
            top = np.argsort(-logits[t])[:16]
            sel = sorted(set(top.tolist()) | set(fixed.tolist()))
            rows.append({"ids": sel, "logits": [float(logits[t, j]) for j in sel], "argmax": int(top[0])})
        out.append({"prompt": item if tokenizer else None, "token_ids": [int(i) for i in ids], "positions": rows})
    return out


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ByteLevelBpe:
    GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, path):
        import regex

        r = GGUFReader(path)
        self.tokens = field(r, "tokenizer.ggml.tokens")
        types = field(r, "tokenizer.ggml.token_type")
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): i for i, m in enumerate(field(r, "tokenizer.ggml.merges"))}
        self.specials = [t for t, ty in zip(self.tokens, types) if ty in (3, 4)]
        self.byte_map = bytes_to_unicode()
        self.pat = regex.compile(self.GPT2_PAT)
        self.special_pat = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(self.specials, key=len, reverse=True)) + ")")

    def bpe(self, word):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
        return [self.vocab[p] for p in parts]

    def encode(self, text):
        import regex

        ids = []
        for chunk in self.special_pat.split(text):
            if not chunk:
                continue
            if chunk in self.specials:
                ids.append(self.vocab[chunk])
                continue
            # SmolLM pre-tokenizer: Digits(individual) then GPT-2 byte-level regex.
            for piece in regex.split(r"(\p{N})", chunk):
                for word in self.pat.findall(piece):
                    ids += self.bpe("".join(self.byte_map[b] for b in word.encode("utf-8")))
        return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    encode = ByteLevelBpe(os.path.join(ROOT, SMOL)).encode
    fixture = {
        "command": "python3 scripts/reference/llama_logits.py --out tests/fixtures/reference_logits.json",
        "method": "gguf-package dequantization, float64 numpy forward, adjacent-pair RoPE on GGUF Q/K, pure-Python byte-level BPE",
        "models": {SMOL: cases(SMOL, SMOL_PROMPTS, encode), TINY: cases(TINY, TINY_IDS, None)},
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f)
    for m, cs in fixture["models"].items():
        for c in cs:
            print(m, c["prompt"], c["token_ids"], "next:", c["positions"][-1]["argmax"])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the fuzz targets' seed inputs into fuzz/seeds/<target>/ (committed; small, valid or
nearly valid files so the fuzzer starts deep inside each format). Re-run to regenerate."""
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
rng = random.Random(7)


def out(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def gguf(kv, tensors):
    """GGUF v3: kv = [(key, type_id, payload bytes)], tensors = [(name, dims, type, data)]."""
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        b += struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", t) + v
    data, offset = b"", 0
    for name, dims, ty, raw in tensors:
        b += struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(dims))
        b += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ty, offset)
        data += raw
        data += b"\0" * (-len(data) % 32)
        offset = len(data)
    b += b"\0" * (-len(b) % 32)
    return b + data


def s(v):
    return struct.pack("<Q", len(v)) + v.encode()


def u32(v):
    return struct.pack("<I", v)


def f32(v):
    return struct.pack("<f", v)


def strs(v):
    return struct.pack("<IQ", 8, len(v)) + b"".join(s(x) for x in v)


llama_kv = [
    ("general.architecture", 8, s("llama")),
    ("llama.embedding_length", 4, u32(8)),
    ("llama.block_count", 4, u32(1)),
    ("llama.attention.head_count", 4, u32(2)),
    ("llama.attention.head_count_kv", 4, u32(1)),
    ("llama.feed_forward_length", 4, u32(16)),
    ("llama.context_length", 4, u32(32)),
    ("llama.attention.layer_norm_rms_epsilon", 6, f32(1e-5)),
    ("tokenizer.ggml.model", 8, s("gpt2")),
    ("tokenizer.ggml.tokens", 9, strs(["a", "b", "ab", "<s>"])),
    ("tokenizer.ggml.merges", 9, strs(["a b"])),
]


def rand(n):
    return bytes(rng.randrange(256) for _ in range(n))


# type id -> bytes per 32-element block (or per element for float types)
blocks = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}
for ty, (bs, bb) in blocks.items():
    n = 64
    out("gguf", f"type{ty}.gguf", gguf(llama_kv, [("token_embd.weight", [8, n // 8], ty, rand(n // bs * bb))]))
out("gguf", "meta-only.gguf", gguf(llama_kv, []))
out("gguf", "empty.gguf", gguf([], []))

# tokenizer: head byte, then tokens \xff merges \xff types \xff text \xff ids
toks = b"\0".join([b"a", b"b", b"ab", b"<s>", b"</s>", b"<|im_start|>", b"\xe2\x96\x81a"])
for head, merges in [(0, b"a b"), (2, b""), (0x40, b"a b\0ab ab")]:
    out("tokenizer", f"head{head}.bin", bytes([head]) + toks + b"\xff" + merges + b"\xff"
        + bytes([1, 1, 1, 3, 3, 4, 1]) + b"\xffabba <|im_start|> a\xff\x03\x04")

# config: the committed configs, one with overrides after a NUL byte
cfgs = os.path.join(ROOT, "configs")
for name in sorted(os.listdir(cfgs)):
    if name.endswith(".toml"):
        out("config", name, open(os.path.join(cfgs, name), "rb").read())
out("config", "overrides.toml", open(os.path.join(cfgs, "countryinfo-smollm2.toml"), "rb").read()
    + b"\0optimizer.lr=3e-4\nadapter.neurons=8192\nlemo.budget=0.5\nlayers.only=[1,2]\n")

out("jsonl", "good.jsonl", '{"prompt": "Capital of France?", "answer": "Paris"}\n'
    '{"id": "x", "prompt": "Two colours?", "answers": ["red", "blue"]}\n\n')
out("jsonl", "bad.jsonl", '{"prompt": "q"}\n{"prompt": 3, "answer": "a"}\nnot json\n')


def safetensors(tensors, metadata=None):
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


state = json.dumps({"format": 2, "step": 2, "examples": 16, "seed": 0,
                    "fingerprint": {"model": {"d_model": 16, "n_layers": 2},
                                    "adapter": {"meft": {"neurons": 64}}, "layers": "all"},
                    "losses": [3.5, 3.25], "skipped": []}).encode()
trainable = safetensors([("model.layers.0.ffn.router.weight", "F32", [2, 4], rand(32)),
                         ("steps", "U32", [2], rand(8))], {"step": "2"})
for name, parts in [("full.bin", [state, trainable, b""]), ("state-only.bin", [state]),
                    ("tensors-only.bin", [b"", trainable])]:
    out("checkpoint", name, b"".join(struct.pack("<I", len(p)) + p for p in parts))
# fuzz/seeds/checkpoint/real-lora.bin (not written here) packs the three files of a real
# checkpoint: `meft train` on the tinycoder GGUF, LoRA rank 1 on layer 0's q, 2 steps.
print("seeds written under", os.path.join(HERE, "seeds"))

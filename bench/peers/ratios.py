#!/usr/bin/env python3
"""Prints burn-vs-PyTorch time ratios from `meft bench model` and torch_model.py JSON files.

    python3 bench/peers/ratios.py burn-bf16.json torch-bf16.json [burn-f32.json torch-f32.json ...]
"""
import json
import sys

files = sys.argv[1:]
print("| pair | forward burn/torch time | fwd+bwd burn/torch time |")
print("|---|---|---|")
for burn_path, torch_path in zip(files[::2], files[1::2]):
    b, t = json.load(open(burn_path)), json.load(open(torch_path))
    print(f"| {b['label']} vs {t['label']} | {b['forward_ms'] / t['forward_ms']:.2f}× | {b['train_step_ms'] / t['train_step_ms']:.2f}× |")

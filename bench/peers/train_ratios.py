#!/usr/bin/env python3
"""Ratios from `meft bench train` JSON (burn) and torch_train.py JSON (PyTorch), same run:

1. burn vs PyTorch for every (adapter, seq) both measured: step time and peak GPU memory;
2. within burn, MEFT against LoRA and the dense adapter (the issue's goals: MEFT peak
   <= 1.3x LoRA's, MEFT step <= 0.5x dense's and <= 2x LoRA's), with the PyTorch dense and
   LoRA rows as a second reference when present.

    python3 bench/peers/train_ratios.py burn-train.json torch-train.json
"""
import json
import sys


def rows(path):
    return [r for r in json.load(open(path))["rows"] if not r.get("error")]


def family_rows(rs, family):
    return [r for r in rs if r["family"] == family]


def main():
    burn = rows(sys.argv[1])
    torch = rows(sys.argv[2]) if len(sys.argv) > 2 else []
    gib = lambda b: b / 2**30
    print("| adapter | batch×seq | burn ms | torch ms | time burn/torch | burn peak GiB | torch peak GiB | peak burn/torch |")
    print("|---|---|---|---|---|---|---|---|")
    for b in burn:
        for t in torch:
            if t["adapter"].split(":")[:2] == b["adapter"].split(":")[:2] and t["seq"] == b["seq"]:
                print(f"| {b['adapter']} | {b['batch']}×{b['seq']} | {b['step_ms']:.1f} | {t['step_ms']:.1f} | "
                      f"{b['step_ms'] / t['step_ms']:.2f}× | {gib(b['peak_bytes']):.2f} | {gib(t['peak_bytes']):.2f} | "
                      f"{b['peak_bytes'] / t['peak_bytes']:.2f}× |")
    print()
    print("| MEFT row | vs | step ratio | peak ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for m in family_rows(burn, "meft"):
        refs = [(r, "burn") for r in burn if r["seq"] == m["seq"]] + [(r, "torch") for r in torch if r["seq"] == m["seq"]]
        for r, who in refs:
            if r["family"] == "lora":
                step, peak = m["step_ms"] / r["step_ms"], m["peak_bytes"] / r["peak_bytes"]
                ok = step <= 2.0 and peak <= 1.3
                print(f"| {m['adapter']} | {who} {r['adapter']} | {step:.2f}× | {peak:.2f}× | step ≤ 2×, peak ≤ 1.3× | {'yes' if ok else 'no'} |")
            elif r["family"] == "dense" and r.get("neurons") == m.get("neurons"):
                step, peak = m["step_ms"] / r["step_ms"], m["peak_bytes"] / r["peak_bytes"]
                print(f"| {m['adapter']} | {who} {r['adapter']} | {step:.2f}× | {peak:.2f}× | step ≤ 0.5× | {'yes' if step <= 0.5 else 'no'} |")


if __name__ == "__main__":
    main()

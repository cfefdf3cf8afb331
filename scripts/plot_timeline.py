#!/usr/bin/env python3
"""Plots the pipeline timeline written by `meft bench adapter --timeline FILE` as a PNG.

Usage: plot_timeline.py OUT.png TIMELINE.json [TIMELINE.json ...] [--steps N]

One panel per MEFT run (overlapped and serial), one row per lane: `main` (the thread that
queues the model's device work: waits, read-backs, selection, gathers), `copy` (row copies
host -> device, timed by CUDA events), `worker` (the host worker: row-gradient read-backs and
sparse AdamW). Dashed lines mark step starts. Needs matplotlib (not a test dependency).
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {
    "wait device": "#d9d9d9",
    "wait update": "#fb9a99",
    "backward (queue)": "#eeeeee",
    "router AdamW (queue)": "#eeeeee",
    "d2h hidden+routing": "#a6cee3",
    "select": "#33a02c",
    "gather rows": "#b2df8a",
    "h2d rows": "#1f78b4",
    "d2h row grads": "#6a3d9a",
    "accumulate grads": "#cab2d6",
    "sparse AdamW": "#ff7f00",
}
LANES = ["main", "copy", "worker"]


def main():
    args = sys.argv[1:]
    steps = 2
    if "--steps" in args:
        i = args.index("--steps")
        steps = int(args[i + 1])
        del args[i : i + 2]
    out, *sources = args
    runs = [run for src in sources for run in json.load(open(src))]
    fig, axes = plt.subplots(len(runs), 1, figsize=(15, 2.6 * len(runs) + 0.8), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        starts = run["step_starts"]
        t0 = starts[0]
        t1 = starts[min(steps, len(starts) - 1)]
        seen = set()
        for s in run["spans"]:
            if s["end"] < t0 or s["start"] > t1:
                continue
            lane = s["lane"] if s["lane"] in LANES else "main"
            y = LANES.index(lane)
            color = COLORS.get(s["stage"], "#999999")
            label = s["stage"] if s["stage"] not in seen else None
            seen.add(s["stage"])
            ax.barh(
                y,
                (s["end"] - s["start"]) * 1e3,
                left=(s["start"] - t0) * 1e3,
                height=0.7,
                color=color,
                edgecolor="black" if s["kind"] == "transfer" else "none",
                linewidth=0.3,
                label=label,
            )
        for st in starts[: steps + 1]:
            ax.axvline((st - t0) * 1e3, color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(LANES)))
        ax.set_yticklabels(LANES)
        ax.invert_yaxis()
        ax.set_xlim(0, (t1 - t0) * 1e3)
        ax.set_xlabel("ms since the first timed step")
        ax.set_title(
            f"{run['method']}: {run['layers']} layers, {run['batch']}x{run['seq']} tokens, "
            f"step {run['step_ms']:.0f} ms, transfer {run['transfer_ms']:.1f} ms/step, "
            f"exposed {run['exposed_transfer_ms']:.1f} ms/step",
            fontsize=9,
        )
        ax.legend(fontsize=6, ncol=1, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

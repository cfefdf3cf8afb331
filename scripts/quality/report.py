#!/usr/bin/env python3
"""Quality study (issue 8): one table from the runs of scripts/gpu/quality.sh.

usage: report.py RUNS_DIR [DATASET ...] [--json OUT.json] [--plot OUT.png]
       report.py --from-json ROWS.json [--plot OUT.png]   (tables and plot of saved rows)

RUNS_DIR holds one folder per row (`meft train` output: results.json, adapter.safetensors) and
`<dataset>-base.eval.json` (`meft eval` without an adapter). Prints a Markdown table per dataset;
--json writes the rows, --plot draws eval EM against the row's GPU memory (needs matplotlib).
"""
import json
import os
import statistics
import sys


def rows_of(runs, dataset):
    out = []
    base = os.path.join(runs, f"{dataset}-base.eval.json")
    if os.path.exists(base):
        b = json.load(open(base))
        out.append(dict(row="base model (no adapter)", dataset=dataset, em=b["em"], f1=b["f1"],
                        examples=b["examples"], gib=None, tok_s=None, loss=None, adapter_mb=0.0,
                        finished=True))
    for name in sorted(os.listdir(runs)):
        d = os.path.join(runs, name)
        if not (os.path.isdir(d) and name.startswith(dataset + "-")):
            continue
        row = name[len(dataset) + 1:]
        res = os.path.join(d, "results.json")
        if not os.path.exists(res):
            out.append(dict(row=row, dataset=dataset, finished=False))
            continue
        r = json.load(open(res))
        after = r.get("after") or {}
        losses = r.get("losses") or []
        tail = losses[-20:]
        st = os.path.join(d, "adapter.safetensors")
        size_file = os.path.join(d, "adapter_bytes.txt")
        size = None
        if os.path.exists(st):
            size = os.path.getsize(st)
        elif os.path.exists(size_file) and open(size_file).read().strip():
            size = int(open(size_file).read().strip())
        out.append(dict(
            row=row, dataset=dataset, finished=True,
            em=after.get("em"), f1=after.get("f1"), examples=after.get("examples"),
            gib=(r["peak_device_bytes"] / 2**30) if r.get("peak_device_bytes") else None,
            tok_s=r.get("tokens_per_sec"),
            loss=statistics.mean(tail) if tail else None,
            adapter_mb=size / 1e6 if size else None,
        ))
    return out


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


def table(rows):
    lines = ["| row | EM | token F1 | GPU peak GiB (own pool) | tokens/s (rows concurrent) "
             "| train loss, last 20 steps | adapter file MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["finished"]:
            lines.append(f"| {r['row']} | unfinished at the deadline | | | | | |")
            continue
        lines.append(f"| {r['row']} | {fmt(r['em'], '.1f')} | {fmt(r['f1'], '.1f')} | "
                     f"{fmt(r['gib'], '.2f')} | {fmt(r['tok_s'], '.0f')} | {fmt(r['loss'], '.3f')} "
                     f"| {fmt(r['adapter_mb'], '.0f')} |")
    return "\n".join(lines)


def plot(all_rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    datasets = sorted({r["dataset"] for r in all_rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for r in all_rows:
            if r["dataset"] != ds or not r["finished"] or r["gib"] is None or r["em"] is None:
                continue
            fam = r["row"].split("-")[0]
            marker = {"lora": "o", "dense": "s", "meft": "^"}.get(fam, "x")
            ax.scatter(r["gib"], r["em"], marker=marker, s=50)
            ax.annotate(r["row"], (r["gib"], r["em"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        base = [r for r in all_rows if r["dataset"] == ds and r["row"].startswith("base")]
        if base:
            ax.axhline(base[0]["em"], color="grey", lw=0.8, ls="--", label="base model")
            ax.legend(fontsize=8)
        ax.set_xlabel("GPU memory, peak of the row's own pool (GiB)")
        ax.set_ylabel("held-out EM")
        ax.set_title(f"{ds}: EM vs GPU memory")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv):
    args, json_out, plot_out, json_in = [], None, None, None
    it = iter(argv)
    for a in it:
        if a == "--json":
            json_out = next(it)
        elif a == "--plot":
            plot_out = next(it)
        elif a == "--from-json":
            json_in = next(it)
        else:
            args.append(a)
    if json_in:
        all_rows = json.load(open(json_in))
        for ds in sorted({r["dataset"] for r in all_rows}):
            print(f"### {ds}\n\n{table([r for r in all_rows if r['dataset'] == ds])}\n")
        if plot_out:
            plot(all_rows, plot_out)
        return
    runs, datasets = args[0], args[1:] or ["fanoutqa", "countryinfo"]
    all_rows = []
    for ds in datasets:
        rows = rows_of(runs, ds)
        if not rows:
            continue
        all_rows += rows
        print(f"### {ds}\n\n{table(rows)}\n")
    if json_out:
        json.dump(all_rows, open(json_out, "w"), indent=1)
    if plot_out:
        plot(all_rows, plot_out)


if __name__ == "__main__":
    main(sys.argv[1:])

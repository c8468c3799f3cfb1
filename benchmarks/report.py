"""Turn bench_models.py JSON into the markdown tables of docs/performance.md (and a plot of
step time vs. ratio against the f(r) line when matplotlib is installed).

    python benchmarks/report.py perf.json [more.json ...] --md out.md --plot out.png
"""

from __future__ import annotations

import argparse
import json
import os


def load(paths):
    runs = []
    for p in paths:
        with open(p) as fh:
            runs.append(json.load(fh))
        runs[-1].setdefault("name", os.path.splitext(os.path.basename(p))[0])
    return runs


def markdown(runs) -> str:
    out = []
    for run in runs:
        out.append(f"Card: **{run['card']}**, torch {run['torch']}, bf16.\n")
        out.append("Per step (ms; in brackets: time / original model's time, and f = share of tokens computed):\n")
        out.append("| model | mode | original | RAS dense step | r=1 | r=0.75 | r=0.5 | r=0.25 | r=0.125 |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for res in run["results"]:
            if res.get("error"):
                out.append(f"| {res['label']} | failed: {res['error']} |||||||")
                continue
            for mode, row in res["modes"].items():
                cells = []
                for r in ("1.0", "0.75", "0.5", "0.25", "0.125"):
                    s = row["steps"].get(r)
                    cells.append(f"{s['ms']:.1f} ({s['vs_original']:.2f}; f {s['f']:.2f})" if s else "-")
                dense = row.get("ras_dense_ms")  # missing in a run cut short
                dense_cell = f"{dense:.1f} ({dense / row['original_ms']:.3f})" if dense else "-"
                out.append(f"| {res['label']} | {mode} | {row['original_ms']:.1f} | {dense_cell} | "
                           + " | ".join(cells) + " |")
        same = [(res, mode, r, s) for res in run["results"] for mode, row in res.get("modes", {}).items()
                for r, s in row["steps"].items() if s.get("original_same_tokens_ms")]
        if same:
            out.append("\nThe RAS step against the original model run on the same number of image tokens "
                       "(its queries attend to those tokens only, the RAS step's to every cached key):\n")
            out.append("| model | mode | ratio | image tokens | RAS step ms | original, same tokens ms | RAS / same tokens |")
            out.append("|---|---|---|---|---|---|---|")
            for res, mode, r, s in same:
                out.append(f"| {res['label']} | {mode} | {r} | {s['n_active']} | {s['ms']:.2f} | "
                           f"{s['original_same_tokens_ms']:.2f} | {s['ms'] / s['original_same_tokens_ms']:.2f} |")
        out.append("\nWhole 28-step runs (transformer calls only; 4 dense warm-up steps, dense resets at 12 and 20):\n")
        out.append("| model | mode | ratio | dense 28 steps | RAS 28 steps | speed-up | ideal | of ideal |")
        out.append("|---|---|---|---|---|---|---|---|")
        for res in run["results"]:
            for mode, row in res.get("modes", {}).items():
                for r, s in row.get("schedules", {}).items():
                    out.append(f"| {res['label']} | {mode} | {r} | {s['dense_ms']:.0f} ms | {s['ras_ms']:.0f} ms | "
                               f"{s['speedup']:.2f}x | {s['ideal']:.2f}x | {s['of_ideal']:.0%} |")
        out.append("\nMemory and capture:\n")
        out.append("| model | mode | caches | peak GPU memory | capture (export + analysis) |")
        out.append("|---|---|---|---|---|")
        for res in run["results"]:
            for mode, row in res.get("modes", {}).items():
                t = row.get("capture_timings", {})
                cap = t.get("export", 0) + t.get("export_alt", 0) + t.get("analysis", 0)
                out.append(f"| {res['label']} | {mode} | {row['cache_bytes'] / 2**30:.2f} GiB | "
                           f"{row.get('peak_mem_gb', float('nan')):.1f} GiB | {cap:.1f} s |")
        fused = [(res, mode, row) for res in run["results"] for mode, row in res.get("modes", {}).items()
                 if row.get("unfused") or row.get("fused")]
        if fused:
            out.append("\nTriton gather/scatter GeMM fusion on vs. off (ms per step):\n")
            out.append("| model | mode | r=0.5 fused | r=0.5 unfused | r=0.25 fused | r=0.25 unfused |")
            out.append("|---|---|---|---|---|---|")
            for res, mode, row in fused:
                # older runs fused by default and timed the unfused path separately
                f = row.get("fused") or {r: row["steps"][r]["ms"] for r in ("0.5", "0.25")}
                u = row.get("unfused") or {r: row["steps"][r]["ms"] for r in ("0.5", "0.25")}
                out.append(f"| {res['label']} | {mode} | {f['0.5']:.2f} | {u['0.5']:.2f} | {f['0.25']:.2f} | {u['0.25']:.2f} |")
        if run.get("attention_ms"):
            out.append("\nSDPA backends, active queries (2 x 24 heads x 1357) against the full cache (4429 keys), ms:\n")
            out.append("| " + " | ".join(run["attention_ms"]) + " |")
            out.append("|" + "---|" * len(run["attention_ms"]))
            out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v)
                                         for v in run["attention_ms"].values()) + " |")
        out.append("")
    return "\n".join(out)


def plot(runs, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    seen: dict = {}
    for run in runs:
        for res in run["results"]:
            for mode, row in res.get("modes", {}).items():
                seen[(res["model"], mode)] = seen.get((res["model"], mode), 0) + 1
    f_drawn = set()
    for run in runs:
        for res in run["results"]:
            for mode, row in res.get("modes", {}).items():
                pts = sorted((float(r), s["vs_original"], s["f"]) for r, s in row["steps"].items())
                label = f"{res['model']} {mode}"
                if seen[(res["model"], mode)] > 1:  # the same model and mode in several runs
                    label += f" ({run.get('name', '?')})"
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                if res["model"] not in f_drawn:  # the model's f(r) (conditioning tokens included)
                    f_drawn.add(res["model"])
                    ax.plot([p[0] for p in pts], [p[2] for p in pts], ":", color=line.get_color(),
                            label=f"{res['model']} f(r)")
    ax.set_xlabel("ratio r (share of image tokens computed)")
    ax.set_ylabel("step time / original step time")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+")
    ap.add_argument("--md", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    runs = load(args.json)
    text = markdown(runs)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(text)
    else:
        print(text)
    if args.plot and not plot(runs, args.plot):
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()

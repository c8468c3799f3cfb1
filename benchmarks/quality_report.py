"""The outputs of ``quality.py``: the markdown tables (``render_markdown``), the Pareto plot and
the sample strips, ``OUT/quality.json`` / ``quality.md`` (``write_outputs``) and the splice of
the tables into a doc between ``BEGIN_MARK`` and ``END_MARK`` (``splice_doc``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import torch

from h2h_report import (  # benchmarks/h2h_report.py
    agg_pyplot, copy_beside_doc, doc_text, md_table, save_figure, splice_between,
)
from quality_metrics import is_default  # benchmarks/quality_metrics.py
from shapes_eval import jsonable, panel_figure  # examples/shapes_eval.py

BEGIN_MARK = "<!-- quality.py results: begin -->"
END_MARK = "<!-- quality.py results: end -->"


def _f(x, fmt="{:.2f}", none="–") -> str:
    """A number for a table cell (``none`` for None, ∞ for an infinite PSNR)."""
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return fmt.format(x)


def render_markdown(res: dict, plot: Optional[str], samples: Optional[str]) -> str:
    """The results as markdown (no title), linking ``plot`` and ``samples`` where given."""
    su, tm = res["setup"], res["timing"]
    fid = res.get("fidelity", [])
    L: list[str] = []
    quick = " **CPU `--quick` run: 1 image, 1-3 steps; the numbers only show the format.**" if su["quick"] else ""
    L += [
        f"Measured by `benchmarks/quality.py` on {su['device_name']} ({su['device']}), {su['dtype']}, torch {su['torch']}, "
        f"diffusers {su['diffusers']}, eager mode; fidelity set: {su['fid_images']} image{'s' if su['fid_images'] != 1 else ''} (batch {su['batch']}, guidance "
        f"{su['guidance']}, classes cycled), reference: dense {su['ref_steps']} steps from the same noise; whole run "
        f"{tm.get('total_s', 0):.0f} s (budget {su['budget_s']:g} s).{quick}",
        "",
    ]
    pf = res.get("precision_floor")
    if pf:
        L += [f"Precision floor: the {su['dtype']} reference against a float32 one ({pf['images']} images, "
              f"{pf['steps']} steps) reaches PSNR {pf['psnr']:.2f} dB / SSIM {pf['ssim']:.4f}; differences near that "
              f"level are numerical noise.", ""]
    ref = res.get("reference")
    if ref:
        L += [f"Reference: {ref['ms_per_image']:.3f} ms per image ({ref['steps']} steps), class accuracy "
              f"{ref['class_acc']:.3f}. Compute is in dense-step equivalents (sum over steps of the share of image "
              f"tokens computed); time is measured per image at batch {su['batch']}.", ""]

    # RAS grid: steps x ratio.
    ras = [r for r in fid if r["kind"] == "ras" and is_default(r)]
    dense = sorted((r for r in fid if r["kind"] == "dense"), key=lambda r: r["steps"])
    if ras:
        steps = sorted({r["steps"] for r in ras})
        ratios = sorted({r["ratio"] for r in ras}, reverse=True)
        by = {(r["steps"], r["ratio"]): r for r in ras}
        d_by = {r["steps"]: r for r in dense}
        L += ["### Fidelity to the dense reference: RAS (PSNR dB / SSIM, compute)", ""]
        head = ["steps", "dense (ratio 1)"] + [f"RAS {q:g}" for q in ratios]
        rows = []
        for s in steps:
            cells = [str(s), _cell(d_by.get(s))] + [_cell(by.get((s, q))) for q in ratios]
            rows.append(cells)
        L += [*md_table(head, rows), ""]
    if dense:
        L += ["### Fidelity to the dense reference: dense sampling with fewer steps", ""]
        L += [*md_table(["steps", "compute", "ms / image", "PSNR dB", "SSIM", "class acc."],
                        [[str(d["steps"]), _f(d["compute"]), _f(d["ms_per_image"], "{:.3f}"), _f(d["psnr"]),
                          _f(d["ssim"], "{:.4f}"), _f(d["class_acc"], "{:.3f}")] for d in dense]), ""]
    if ras:
        L += ["RAS runs in full:", ""]
        L += [*md_table(["run", "dense steps", "compute", "ms / image", "PSNR dB", "SSIM", "class acc.",
                         "steps on shape / background"],
                        [[r["label"], str(len(r["dense_steps"])), _f(r["compute"]), _f(r["ms_per_image"], "{:.3f}"),
                          _f(r["psnr"]), _f(r["ssim"], "{:.4f}"), _f(r["class_acc"], "{:.3f}"), _where(r)] for r in ras]), ""]
        share = (res.get("reference") or {}).get("subject_share")
        L += ["Steps on shape / background: mean number of steps that computed a pixel of the shape (estimated "
              "from the reference image: RGB distance > 0.2 to a quadratic background fitted to the border) and of "
              "the background" + ("" if share is None else f"; the shape covers {100 * share:.0f}% of the pixels") + ".", ""]

    eq = res.get("equal_compute", [])
    if eq:
        L += ["### Equal compute: RAS with more steps vs dense with fewer steps (paper Table 2)", "",
              "ΔPSNR / ΔSSIM: RAS minus dense sampling interpolated (linearly in steps) at the same compute, "
              "and at the same measured time; \"beats\": RAS is better in both PSNR and SSIM than the cheapest "
              "dense run that costs at least as much.", ""]
        rows = []
        wins = 0
        for e in eq:
            c, t = e["at_compute"], e["at_time"]
            above = c["dense_above"]
            beats = c["beats_dense_above"]
            wins += bool(beats)
            rows.append([f"RAS {e['ratio']:g}@{e['steps']}", _f(e["compute"]), _f(e["psnr"]), _f(e["ssim"], "{:.4f}"),
                         "–" if above is None else f"dense {above['steps']}: {above['psnr']:.2f} / {above['ssim']:.4f}",
                         _f(c["delta_psnr"], "{:+.2f}"), _f(c["delta_ssim"], "{:+.4f}"),
                         _f(t["delta_psnr"], "{:+.2f}"), _f(t["delta_ssim"], "{:+.4f}"),
                         "–" if beats is None else ("yes" if beats else "no")])
        L += [*md_table(["RAS run", "compute", "PSNR", "SSIM", "cheapest dense ≥ its compute (PSNR / SSIM)",
                         "ΔPSNR @compute", "ΔSSIM @compute", "ΔPSNR @time", "ΔSSIM @time", "beats"], rows), ""]
        L += [f"RAS beats the dense run of at least equal compute in {wins} of {len(eq)} configurations.", ""]

    abl = res.get("ablations", [])
    for a in abl:
        L += [f"### Ablations at {a['steps']} steps, ratio {a['ratio']:g} (paper Table 3)", ""]
        rows = []
        base = next((v for v in a["variants"] if v["name"] == "default" and not v.get("skipped")), None)
        for v in a["variants"]:
            if not v["supported"]:
                rows.append([v["name"], "not supported", "", "", "", "", "", v["what"]])
            elif v.get("skipped"):
                rows.append([v["name"], "skipped (budget)", "", "", "", "", "", v["what"]])
            else:
                d = "" if base is None or v is base else f"{v['psnr'] - base['psnr']:+.2f}"
                rows.append([v["name"], _f(v["psnr"]), d, _f(v["ssim"], "{:.4f}"), _f(v["class_acc"], "{:.3f}"),
                             _f(v["compute"]), _where(v), v["what"]])
        L += [*md_table(["variant", "PSNR dB", "Δ vs default", "SSIM", "class acc.", "compute",
                         "steps on shape / bg", "what"], rows), ""]

    dist = res.get("distribution") or {}
    if dist.get("configs"):
        L += [f"### Distribution: {dist['samples']} samples per configuration vs {dist['samples']} real images", "",
              f"Fréchet distance of the shipped classifier's 192-d penultimate features (FID formula; not comparable "
              f"with Inception FID), real vs real at this sample count: {dist['real_vs_real_fd']:.3f}. Class accuracy: "
              f"the classifier finds the class asked for.", ""]
        L += [*md_table(["run", "compute", "ms / image", "FD ↓", "class acc. ↑"],
                        [[c["label"], _f(c["compute"]), _f(c["ms_per_image"], "{:.3f}"), _f(c["fd"], "{:.3f}"),
                          _f(c["class_acc"], "{:.3f}")] for c in dist["configs"]]), ""]
        pairs = []
        dense_d = [c for c in dist["configs"] if c["kind"] == "dense"]
        for c in (c for c in dist["configs"] if c["kind"] == "ras"):
            if not dense_d:
                break
            d = min(dense_d, key=lambda d: abs(d["compute"] - c["compute"]))
            verdict = "better" if c["fd"] < d["fd"] else "worse"
            pairs.append(f"{c['label']} (compute {c['compute']:.1f}) FD {c['fd']:.3f} vs {d['label']} ({d['compute']:.1f}) "
                         f"FD {d['fd']:.3f}: RAS {verdict}")
        if pairs:
            L += ["Compute-matched pairs: " + "; ".join(pairs) + ".", ""]
        if dist.get("skipped"):
            L += [f"Not run (budget): {', '.join(dist['skipped'])}.", ""]
    elif dist.get("skipped_reason"):
        L += [f"Distribution metric skipped: {dist['skipped_reason']}.", ""]

    if plot:
        L += [f"![quality vs compute]({plot})", "",
              f"[{os.path.basename(plot)}]({plot}): PSNR / SSIM to the reference against compute and measured time; "
              f"dense sampling as a line over its step counts, RAS per ratio over 7-28 steps; FD of the distribution runs.", ""]
    if samples:
        L += [f"![samples]({samples})", "", f"[{os.path.basename(samples)}]({samples}): the first fidelity images per run "
              f"(one row per run, same noise).", ""]
    if res.get("skipped"):
        L += ["Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in res["skipped"]) + ".", ""]
    for n in res.get("notes", []):
        L += [f"Note: {n}.", ""]
    return "\n".join(L).rstrip() + "\n"


def _where(r: dict) -> str:
    if r.get("subject_steps") is None:
        return "–"
    return f"{r['subject_steps']:.1f} / {r['background_steps']:.1f}"


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "–"
    return f"{_f(r['psnr'])} / {r['ssim']:.4f} ({r['compute']:.1f})"


def plot_pareto(res: dict, path: str) -> Optional[str]:
    """Quality vs compute / time (matplotlib); returns None (with a message) without matplotlib."""
    plt = agg_pyplot()
    if plt is None:
        return None
    fid = res.get("fidelity", [])
    dense = sorted((r for r in fid if r["kind"] == "dense"), key=lambda r: r["steps"])
    ras = [r for r in fid if r["kind"] == "ras" and is_default(r)]
    ratios = sorted({r["ratio"] for r in ras}, reverse=True)
    dist = (res.get("distribution") or {}).get("configs", [])
    panels = [("compute", "psnr"), ("compute", "ssim"), ("ms_per_image", "psnr")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    axes = list(axes.flat)
    xl = {"compute": "transformer compute (dense-step equivalents)", "ms_per_image": "measured ms per image"}
    yl = {"psnr": "PSNR to dense-50 reference (dB)", "ssim": "SSIM to dense-50 reference"}
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, (x, y) in zip(axes, panels):
        if dense:
            ax.plot([d[x] for d in dense], [d[y] for d in dense], "k-o", ms=3, label="dense, fewer steps")
            for d in dense:
                ax.annotate(str(d["steps"]), (d[x], d[y]), fontsize=6, xytext=(2, -7), textcoords="offset points")
        for c, q in zip(colors, ratios):
            pts = sorted((r for r in ras if r["ratio"] == q), key=lambda r: r["steps"])
            ax.plot([r[x] for r in pts], [r[y] for r in pts], "-s", color=c, ms=4, label=f"RAS {q:g}")
            for r in pts:
                ax.annotate(str(r["steps"]), (r[x], r[y]), fontsize=6, color=c, xytext=(2, 3), textcoords="offset points")
        ax.set_xlabel(xl[x])
        ax.set_ylabel(yl[y])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    if not dist:
        ax.text(0.5, 0.5, "distribution metric not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for kind, mk, col in (("dense", "o", "k"), ("ras", "s", "tab:red")):
            pts = [c for c in dist if c["kind"] == kind]
            ax.scatter([c["compute"] for c in pts], [c["fd"] for c in pts], marker=mk, color=col,
                       label="dense" if kind == "dense" else "RAS")
            for c in pts:
                ax.annotate(c["label"], (c["compute"], c["fd"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rr = res["distribution"].get("real_vs_real_fd")
        if rr is not None:
            ax.axhline(rr, color="gray", ls="--", lw=1, label="real vs real")
        ax.set_xlabel(xl["compute"])
        ax.set_ylabel(f"FD, classifier features ({res['distribution']['samples']} samples) ↓")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    su = res["setup"]
    return save_figure(fig, path, f"RAS vs dense on the shapes DiT: {su['device_name']}, {su['dtype']}"
                       + (" (quick CPU run)" if su["quick"] else ""))


def save_strips(strips: dict[str, torch.Tensor], path: str, order: Sequence[str]) -> Optional[str]:
    """One row per run (first images of the fidelity set), labelled."""
    if not strips:
        return None
    import matplotlib.pyplot as plt

    names = ([k for k in order if k in strips] + [k for k in strips if k not in order])[:10]
    n = min(t.shape[0] for t in strips.values())
    fig = panel_figure([[strips[k][i] for i in range(n)] for k in names], [f"image {i}" for i in range(n)], names,
                       tile=1.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(res: dict, out: str) -> dict:
    """OUT/quality.json, quality.md, pareto.png and samples.png (from ``res["_strips"]``) -> their names."""
    os.makedirs(out, exist_ok=True)
    strips = res.pop("_strips", None)
    files = dict(json="quality.json", markdown="quality.md", plot=None, samples=None)
    if plot_pareto(res, os.path.join(out, "pareto.png")):
        files["plot"] = "pareto.png"
    if strips:
        ref_key = next((k for k in strips if k.endswith("(ref)")), None)
        order = [ref_key, "dense 28", "dense 12", "dense 7", "RAS 0.5@28", "RAS 0.25@28", "RAS 0.125@28",
                 "RAS 0.25@14", "RAS 0.25@7"]
        if save_strips(strips, os.path.join(out, "samples.png"), [o for o in order if o]):
            files["samples"] = "samples.png"
    res["files"] = files
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(jsonable(res), f, indent=2)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write("# RAS quality benchmark\n\n" + render_markdown(res, files["plot"], files["samples"]))
    return files


def splice_doc(res: dict, src_dir: str, doc: str, text_only: bool = False) -> None:
    """Put the rendered results between the marker lines of ``doc``; pictures (and the JSON) go to
    <doc dir>/quality/ unless ``text_only``."""
    text = doc_text(doc, BEGIN_MARK, END_MARK)
    if text_only:
        splice_between(doc, text, BEGIN_MARK, END_MARK, render_markdown(res, None, None))
        print(f"spliced the results (tables only) into {doc}")
        return
    files = res.get("files") or {}
    names = dict(plot=files.get("plot"), samples=files.get("samples"), json="quality.json")
    pic_dir, links = copy_beside_doc(src_dir, names, doc, required=("json",))
    block = render_markdown(res, links.get("plot"), links.get("samples"))
    block += "\nAll numbers: [quality/quality.json](quality/quality.json).\n"
    splice_between(doc, text, BEGIN_MARK, END_MARK, block)
    print(f"spliced the results into {doc} (pictures in {pic_dir})")

"""Figures and report of ``examples/demo.py`` (matplotlib; report.html rendered from report.md by
``markdown``, the renderer mkdocs uses)."""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

import torch

from shapes_eval import Scale, jsonable, mask_on_grid, panel_figure, pixel_map, subject_mask

CAPTIONS = {
    "comparison": (
        "What you are looking at: each row is one class, sampled from the same initial noise by every run. "
        "'plain': the unmodified pipeline. 'RAS r': region-adaptive sampling, which computes only a share r of the "
        "image tokens on most steps and lets the others reuse their last noise prediction; under each image its "
        "PSNR / SSIM against the plain image (higher is closer; identical = inf dB / 1). '|RAS - plain| x4': where "
        "the images differ (black: the same). Column titles: the median wall-clock speed-up over the plain run, "
        "measured here in interleaved rounds."
    ),
    "heatmaps": (
        "What you are looking at: for every image token (a 2x2-pixel patch), how many of the {steps} steps computed "
        "it. One colour scale for every map (colour bar): yellow = computed on all {steps} steps, dark = reused "
        "most of the time. The dense warm-up and reset steps compute every token, so no token gets fewer than "
        "{dense} steps. White line: the shape's outline in the plain image. Under each map: mean steps on the "
        "shape / on the background."
    ),
    "noise_std": (
        "What you are looking at: the channel std of the last step's noise prediction per token, what RAS ranks "
        "tokens by (one colour scale, colour bar). RAS computes the low-std (dark) tokens next and reuses the "
        "cached noise of the others. The paper finds low std on the main subject; white line: the shape's outline."
    ),
}


def heatmap_rows(jobs: list, plain_images: torch.Tensor) -> dict[str, Any]:
    """Per RAS run, the (B, H, W) per-pixel maps of computed steps and last noise std, and the shape masks."""
    maps = {}
    for job in jobs[1:]:
        if job.stats is None:
            continue
        computed, std = pixel_map(job.stats, "computed"), pixel_map(job.stats, "std")
        if computed is not None and std is not None and computed.shape[0] == plain_images.shape[0]:
            maps[job.name] = dict(computed=computed, std=std)
    mask = subject_mask(plain_images)  # (B, H, W) image pixels
    if maps:  # on the maps' grid (latent pixels: 16x16 for the latent model)
        mask = mask_on_grid(mask, tuple(next(iter(maps.values()))["computed"].shape[-2:]))
    return dict(maps=maps, mask=mask)


def _speed_title(run: dict) -> str:
    return f"{run['name']}\n{run['speedup_wall']:.2f}x wall, {run['speedup_cpu']:.2f}x CPU"


def comparison_figure(res: dict, jobs: list):
    plain = jobs[0].images
    runs = res["runs"]
    rows, titles = [], []
    for i in range(plain.shape[0]):
        rows.append([plain[i]] + [j.images[i] for j in jobs[1:]]
                    + [((j.images[i] - plain[i]).abs() * 4).clamp(0, 1) for j in jobs[1:]])
        titles.append([""] + [f"{r['psnr'][i]:.1f} dB / {r['ssim'][i]:.3f}" for r in runs[1:]] + [""] * (len(jobs) - 1))
    cols = ["plain"] + [_speed_title(r) for r in runs[1:]] + [f"|{j.name} - plain| x4" for j in jobs[1:]]
    title = (f"plain vs RAS: {res['steps']} steps on {res['device_name']} ({res['device']}), median of "
             f"{res['rounds']} interleaved rounds; plain {runs[0]['wall_s']:.1f} s wall")
    return panel_figure(rows, cols, res["classes"], cell_titles=titles, title=title, caption=CAPTIONS["comparison"])


def _mean_on(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else float("nan")


def heatmap_figure(res: dict, jobs: list, heat: dict):
    """Computed steps per token for every RAS run: one colour scale (0..steps), one colour bar."""
    names = list(heat["maps"])
    if not names:
        return None
    mask = heat["mask"]
    rows, titles = [], []
    for i in range(mask.shape[0]):
        maps = [heat["maps"][n]["computed"][i] for n in names]
        rows.append([jobs[0].images[i]] + maps)
        titles.append([""] + [f"shape {_mean_on(m, mask[i]):.1f} / bg {_mean_on(m, ~mask[i]):.1f}" for m in maps])
    dense = min(len(r.get("dense_steps", [])) for r in res["runs"][1:])
    scale = Scale(0, res["steps"], f"steps that computed it (of {res['steps']})")
    return panel_figure(rows, ["plain"] + [f"{n}: computed steps" for n in names], res["classes"],
                        kinds=[None] + ["computed"] * len(names), scales={"computed": scale}, cell_titles=titles,
                        outlines=list(mask), title=f"Where RAS computed: {res['steps']} steps",
                        caption=CAPTIONS["heatmaps"].format(steps=res["steps"], dense=dense))


def noise_std_figure(res: dict, jobs: list, heat: dict):
    """Last noise std per token for every RAS run: one colour scale, one colour bar."""
    names = list(heat["maps"])
    if not names:
        return None
    top = max(float(heat["maps"][n]["std"].max()) for n in names)
    rows = [[jobs[0].images[i]] + [heat["maps"][n]["std"][i] for n in names] for i in range(heat["mask"].shape[0])]
    scale = Scale(0, top, "channel std of the last noise prediction")
    return panel_figure(rows, ["plain"] + [f"{n}: noise std" for n in names], res["classes"],
                        kinds=[None] + ["std"] * len(names), scales={"std": scale}, outlines=list(heat["mask"]),
                        title="What RAS ranks tokens by", caption=CAPTIONS["noise_std"])


def _psnr_text(v: float) -> str:
    return "identical" if v == float("inf") else f"{v:.2f} dB"


TABLE_HEADER = ["run", "wall s (median)", "CPU s (median)", "speed-up wall", "speed-up CPU", "est. FLOPs share (bound)",
                "PSNR vs plain", "SSIM vs plain"]


def table_rows(res: dict) -> list[list[str]]:
    rows = []
    for r in res["runs"]:
        rows.append([r["name"], f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['speedup_wall']:.2f}x",
                     f"{r['speedup_cpu']:.2f}x", f"{r['flops_fraction']:.3f} ({1 / r['flops_fraction']:.2f}x)",
                     _psnr_text(statistics.mean(r["psnr"])), f"{statistics.mean(r['ssim']):.4f}"])
    return rows


def timing_table(res: dict) -> str:
    rows = [TABLE_HEADER] + table_rows(res)
    widths = [max(len(r[j]) for r in rows) for j in range(len(TABLE_HEADER))]
    lines = [f"{res['steps']}-step runs, median of {res['rounds']} interleaved rounds (measured on this machine):"]
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fidelity_text(res: dict) -> str:
    lines = ["per image, fidelity to the plain image from the same noise (PSNR dB / SSIM):"]
    for i, name in enumerate(res["classes"]):
        lines.append(f"  {name:9s} " + "  ".join(f"{r['name']}: {r['psnr'][i]:5.2f} / {r['ssim'][i]:.4f}"
                                                 for r in res["runs"][1:]))
    return "\n".join(lines)


def where_text(res: dict) -> str:
    lines = [f"where the compute went: mean number of the {res['steps']} steps that computed a pixel, on the shape "
             f"(estimated from the plain image) vs the background:"]
    found = [r for r in res["runs"][1:] if r.get("computed")]
    for r in found:
        c = r["computed"]
        lines.append(f"  {r['name']:9s} shape {c['subject']:5.2f}  background {c['background']:5.2f}  "
                     f"({c['images']} images, shape = {100 * c['subject_share']:.0f}% of the pixels)")
    if found and found[0]["computed"]["subject"] < found[0]["computed"]["background"]:
        lines.append("  RAS computed the background more often than the shape here, the opposite of the paper's "
                     "premise (low noise std on the main subject): on both shipped models (pixels and latents) the "
                     "channel std of the predicted noise is higher on the shapes than on their smooth backgrounds "
                     "(see noise_std.png; measured in docs/how-ras-works.md, benchmarks/noise_std_premise.py).")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def report_markdown(res: dict, figures: dict) -> str:
    runs = res["runs"]
    lines = [
        "# rasfx demo: plain sampling vs region-adaptive sampling",
        "",
        f"Model `{res['model']}` (10.4 M-parameter SD3 transformer, 64x64 pixels, 1024 image tokens), "
        f"{res['steps']} Euler steps, guidance {res['guidance']}, one image per class ({', '.join(res['classes'])}), "
        f"seeds {res['seeds'][0]}..{res['seeds'][-1]}; every run starts from the same noise.",
        f"Device: {res['device']} ({res['device_name']}), {res['dtype']}, {res['threads']} CPU threads of "
        f"{res['cores']} cores, torch {res['torch']}, diffusers {res['diffusers']}, rasfx {res['rasfx']}. "
        f"{res['mode_note']}" + (f" (mode that ran: `{runs[1].get('mode')}`)." if len(runs) > 1 else ".")
        + (" **Quick run (tiny, for tests): the numbers mean little.**" if res["quick"] else ""),
        "",
        f"## Speed and fidelity (measured: median of {res['rounds']} interleaved rounds)",
        "",
        _md_table(TABLE_HEADER, table_rows(res)),
        "",
        "Wall and process CPU time of each whole pipeline call; the configurations ran in turn, the order rotating "
        "every round, so a change of the machine's load hits each alike. The FLOPs share is rasfx's estimate (the "
        "bound), not a measurement. Per round (wall s): "
        + "; ".join(f"{r['name']} " + ", ".join(f"{x['wall_s']:.1f}" for x in r["rounds"]) for r in runs) + ".",
        "",
        *[f"* {v}" for v in res["verdict"]],
        "",
        "```",
        fidelity_text(res),
        "",
        where_text(res),
        "```",
        "",
    ]
    for key, alt in (("comparison", "plain vs RAS"), ("heatmaps", "computed steps per token"),
                     ("noise_std", "noise std per token")):
        if figures.get(key) is not None:
            lines += [f"![{alt}]({key}.png)", "", f"[{key}.png]({key}.png). {CAPTIONS[key].format(steps=res['steps'], dense='the dense')}", ""]
    lines += ["## rasfx.stats", ""]
    for r in runs[1:]:
        lines += [f"{r['name']}:", "", "```", r.get("summary", ""), "```", ""]
    lines += ["All numbers: [results.json](results.json).", ""]
    return "\n".join(lines)


def write_outputs(out: str, res: dict, jobs: list, heat: dict) -> list[str]:
    """Writes the figures, results.json, report.md and report.html into ``out``; returns the file names.
    The figures stay in ``res["figures"]`` (matplotlib ``Figure`` objects)."""
    import markdown
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    figures = dict(comparison=comparison_figure(res, jobs), heatmaps=heatmap_figure(res, jobs, heat),
                   noise_std=noise_std_figure(res, jobs, heat))
    files = []
    for key, fig in figures.items():
        if fig is not None:
            fig.savefig(os.path.join(out, f"{key}.png"), dpi=100)
            plt.close(fig)
            files.append(f"{key}.png")
    res["files"] = dict(figures=files, report_md="report.md", report_html="report.html")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(jsonable({k: v for k, v in res.items() if k != "figures"}), f, indent=2)
    text = report_markdown(res, figures)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write("<!doctype html><html><head><meta charset='utf-8'><title>rasfx demo</title><style>"
                "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}</style></head><body>\n"
                f"{body}\n</body></html>\n")
    res["figures"] = figures
    return files + ["results.json", "report.md", "report.html"]

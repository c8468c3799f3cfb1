"""The demo (`make demo`), its metrics and figures, and the quality benchmark, end to end on the
CPU in their --quick modes.

Both run in-process on one loaded pipeline and one shared RAS module (the graph capture
happens once), so the whole file takes well under a minute on an idle 2-core machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models", "shapes-dit")
for _p in (ROOT, os.path.join(ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import demo  # noqa: E402  (examples/demo.py)
import shapes_eval  # noqa: E402  (examples/shapes_eval.py)


def _load_quality():
    spec = importlib.util.spec_from_file_location("rasfx_quality_bench", os.path.join(ROOT, "benchmarks", "quality.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def shared():
    from shapes_pipeline import ShapesPipeline

    # Batches of 1-2 images gain little from a second thread, and on a busy shared machine two
    # threads spin-wait for each other: one thread is faster there and about as fast when idle.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = ShapesPipeline.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).to("cpu")
        yield pipe, shapes_eval.ReusedTransform()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------- metrics


def _ssim_reference(x: np.ndarray, y: np.ndarray, win: int = 11, sigma: float = 1.5) -> float:
    """SSIM by explicit windows (float64 numpy), one channel: the textbook definition."""
    g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - win + 1):
        for j in range(x.shape[1] - win + 1):
            a, b = x[i : i + win, j : j + win], y[i : i + win, j : j + win]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_psnr_of_known_images():
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, :, :4] += 0.01  # MSE 1e-4 / 2 -> 40 + 10 log10(2) dB
    p = shapes_eval.psnr(y, x)
    assert p.shape == (2,) and p.dtype == torch.float64
    # torchmetrics converts natural log to dB with a float32 constant: ~1e-7 relative
    assert p.tolist() == pytest.approx([20.0, 40.0 + 10 * math.log10(2)], abs=1e-5)
    assert math.isinf(float(shapes_eval.psnr(x, x)[0]))


def test_ssim_matches_the_explicit_window_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 18, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    s = shapes_eval.ssim(x, y)
    assert s.shape == (2,)
    for b in range(2):
        ref = np.mean([_ssim_reference(x[b, c].double().numpy(), y[b, c].double().numpy()) for c in range(3)])
        assert abs(float(s[b]) - ref) < 1e-10
    assert torch.allclose(shapes_eval.ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(shapes_eval.ssim(x, y), shapes_eval.ssim(y, x))
    z = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (shapes_eval.ssim(x, z) < s).all()  # more noise, less similar


# ------------------------------------------------------------------------------------- figures


def _heatmap_images(fig):
    """The 2-D (heatmap) images of a figure's axes, and the colour bars of the figure."""
    images = [im for ax in fig.axes for im in ax.get_images() if im.get_array().ndim == 2]
    bars = [im.colorbar for im in images if im.colorbar is not None]
    return images, bars


def test_panel_figure_one_scale_and_one_colour_bar_per_kind():
    rgb = torch.rand(3, 16, 16)
    a1, a2, b1 = torch.rand(16, 16) * 5, torch.rand(16, 16) * 2, torch.rand(16, 16)
    fig = shapes_eval.panel_figure(
        [[rgb, a1, a2, b1], [rgb, a2, a1, b1]], ["img", "a", "a'", "b"], ["r0", "r1"],
        kinds=[None, "a", "a", "b"], scales=dict(a=shapes_eval.Scale(0, 5, "A units"), b=shapes_eval.Scale(0, 1, "B")),
        caption="what you are looking at")
    images, bars = _heatmap_images(fig)
    assert len(images) == 6
    assert sorted(b.ax.get_ylabel() for b in bars) == ["A units", "B"]
    clims = {im.get_clim() for im in images}
    assert clims == {(0.0, 5.0), (0.0, 1.0)}  # one scale per kind, whatever each map's own range
    for bar in bars:
        same_kind = [im for im in images if im.get_clim() == bar.mappable.get_clim()]
        assert len(same_kind) == (4 if bar.ax.get_ylabel() == "A units" else 2)
    assert "what you are looking at" in fig.get_supxlabel()


# ------------------------------------------------------------------------------------- demo


def test_demo_quick_interleaved_timing_figures_and_report(tmp_path, shared):
    pipe, tf = shared
    out = tmp_path / "outputs"
    res = demo.main(["--quick", "--out", str(out)], pipe=pipe, transform=tf)

    for name in ("comparison.png", "heatmaps.png", "noise_std.png", "report.md", "report.html", "results.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    links = set(re.findall(r"\]\(([^)]+)\)", report))
    assert {"comparison.png", "heatmaps.png", "noise_std.png", "results.json"} <= links
    for link in links:
        assert (out / link).is_file(), f"report.md links a missing file {link}"
    html = (out / "report.html").read_text()
    for name in ("comparison.png", "heatmaps.png", "noise_std.png"):
        assert f'src="{name}"' in html
    assert "What you are looking at" in report

    data = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["plain", "RAS 0.5", "RAS 0.25"]
    assert data["quick"] is True and data["steps"] == 2 and data["rounds"] == 2
    for run in data["runs"]:
        assert len(run["rounds"]) == 2
        assert run["wall_s"] == pytest.approx(float(np.median([r["wall_s"] for r in run["rounds"]])))
        assert run["cpu_s"] == pytest.approx(float(np.median([r["cpu_s"] for r in run["rounds"]])))
        assert run["speedup_wall"] == pytest.approx(data["runs"][0]["wall_s"] / run["wall_s"])
        assert run["repeatable"] is True  # the same noise gave the same images in every round
    for run in data["runs"][1:]:
        assert 0 < run["flops_fraction"] < 1 and run["mode"] == "eager" and run["ras_steps"] == [1]
        assert all(0 < p < 100 for p in run["psnr"]) and all(-1 <= s <= 1 for s in run["ssim"])
    assert len(data["verdict"]) == 2 and all(v.startswith(("RAS 0.5:", "RAS 0.25:")) for v in data["verdict"])

    # the figures: every heatmap on one scale (0 .. steps) with one colour bar; numbers written on them
    fig = res["figures"]["heatmaps"]
    images, bars = _heatmap_images(fig)
    assert len(images) == 2 and {im.get_clim() for im in images} == {(0.0, 2.0)}
    assert len(bars) == 1 and bars[0].mappable.get_clim() == (0.0, 2.0) and "steps" in bars[0].ax.get_ylabel()
    assert "What you are looking at" in fig.get_supxlabel()
    images, bars = _heatmap_images(res["figures"]["noise_std"])
    assert len(images) == 2 and len({im.get_clim() for im in images}) == 1 and len(bars) == 1
    comp = res["figures"]["comparison"]
    labels = [ax.get_xlabel() for ax in comp.axes]
    for run in data["runs"][1:]:
        assert f"{run['psnr'][0]:.1f} dB / {run['ssim'][0]:.3f}" in labels
        assert any(f"{run['speedup_wall']:.2f}x wall" in ax.get_title() for ax in comp.axes)


def test_verdict_says_why_wall_time_shows_no_speedup():
    def run(name, wall, cpu, ff, load=4.0):
        return dict(name=name, wall_s=wall, cpu_s=cpu, speedup_wall=40.0 / wall, speedup_cpu=30.0 / cpu,
                    speedup_wall_per_round=[40.0 / wall], cpu_share=cpu / wall / torch.get_num_threads(),
                    flops_fraction=ff, load=load, repeatable=True)

    res = dict(rounds=1, runs=[run("plain", 40.0, 30.0, 1.0), run("RAS 0.5", 32.0, 20.0, 0.6),
                               run("RAS 0.25", 50.0, 15.0, 0.4), run("RAS 0.1", 60.0, 45.0, 0.3)])
    faster, busy, slower = demo.verdict(res, torch.device("cpu"))
    assert faster.startswith("RAS 0.5: 1.25x faster") and "1.50x less CPU time" in faster and "1.67x" in faster
    # wall time slower, CPU time faster: the numbers that explain it (CPU share, load, cores)
    assert busy.startswith("RAS 0.25: NOT faster in median wall time (0.80x") and "2.00x less CPU time" in busy
    assert f"{100 * 15 / 50 / torch.get_num_threads():.0f}% (RAS)" in busy and "load average of 4.0" in busy
    assert slower.startswith("RAS 0.1: NOT faster (0.67x wall, 0.67x CPU time")


# ------------------------------------------------------------------------------------- quality


def test_quality_quick_schema_and_doc_splice(tmp_path, shared):
    pipe, tf = shared
    q = _load_quality()
    out = tmp_path / "quality"
    q.main(["--quick", "--out", str(out)], pipe=pipe, transform=tf)

    data = json.loads((out / "quality.json").read_text())
    assert data["schema"] == "rasfx-quality/1"
    assert {"setup", "timing", "reference", "fidelity", "equal_compute", "ablations", "precision_floor",
            "distribution", "skipped", "notes", "files"} <= set(data)
    su = data["setup"]
    assert su["quick"] is True and su["dtype"] == "float32" and su["device"] == "cpu"
    assert data["reference"]["steps"] == 3

    kinds = {(r["kind"], r["steps"], r["ratio"]) for r in data["fidelity"]}
    assert kinds == {("dense", 1, None), ("dense", 2, None), ("ras", 2, 0.5), ("ras", 2, 0.25)}
    for r in data["fidelity"]:
        for k in ("compute", "flops_fraction", "seconds", "ms_per_image", "psnr", "ssim", "class_acc", "dense_steps"):
            assert k in r, k
        assert 0 < r["flops_fraction"] <= 1 and r["compute"] == pytest.approx(r["flops_fraction"] * r["steps"])
        assert 0 <= r["class_acc"] <= 1 and -1 <= r["ssim"] <= 1
        if r["kind"] == "ras":
            assert r["flops_fraction"] < 1 and r["dense_steps"] == [0]

    assert len(data["equal_compute"]) == 2
    for e in data["equal_compute"]:
        assert {"at_compute", "at_time", "psnr", "ssim", "compute"} <= set(e)
        assert {"dense_below", "dense_above", "delta_psnr", "beats_dense_above"} <= set(e["at_compute"])

    (abl,) = data["ablations"]
    assert (abl["steps"], abl["ratio"]) == (2, 0.25)
    keys = [v["key"] for v in abl["variants"]]
    assert keys == ["default", "no-starvation", "no-kv-cache"]
    default, kv = abl["variants"][0], abl["variants"][-1]
    assert all(v["supported"] and not v["skipped"] and "psnr" in v for v in abl["variants"])
    # the K/V-cache ablation runs another compiled graph: the images differ from the default's, and
    # its attention over the active tokens only costs fewer FLOPs (rasfx.stats reads the graph)
    assert kv["psnr"] != default["psnr"] and kv["flops_fraction"] < default["flops_fraction"]

    dist = data["distribution"]
    assert dist["samples"] == 2 and isinstance(dist["real_vs_real_fd"], float)
    assert [(c["kind"], c["steps"]) for c in dist["configs"]] == [("dense", 1), ("ras", 2)]
    for c in dist["configs"]:
        assert {"fd", "class_acc", "compute", "ms_per_image"} <= set(c)

    md = (out / "quality.md").read_text()
    assert "Equal compute" in md and "Ablations at 2 steps" in md and "no K/V cache" in md
    assert (out / "samples.png").is_file()
    assert (out / "pareto.png").is_file() == (data["files"]["plot"] == "pareto.png")

    # Re-render from the JSON and splice into a doc between the marker lines.
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "doc.md"
    doc.write_text(f"# Doc\n\nbefore\n\n{q.BEGIN_MARK}\nold\n{q.END_MARK}\n\nafter\n")
    q.main(["--from-json", str(out / "quality.json"), "--doc", str(doc)])
    text = doc.read_text()
    assert "old" not in text and "before" in text and "after" in text and "Equal compute" in text
    assert (tmp_path / "docs" / "quality" / "quality.json").is_file()
    assert "quality/samples.png" in text and (tmp_path / "docs" / "quality" / "samples.png").is_file()


def test_quality_head_to_head_quick(tmp_path, shared):
    """``quality.py --head-to-head --quick``: dense with fewer steps, RAS, diffusers' cache hooks and
    the combined sampler on the shipped model over 2 seeds, each at its measured compute, with
    t-intervals, a winners table with verdicts, the Pareto plot, the doc splice and the budget guard."""
    pipe, tf = shared
    q = _load_quality()
    out = tmp_path / "h2h"
    q.main(["--head-to-head", "--quick", "--out", str(out)], pipe=pipe, transform=tf)

    data = json.loads((out / "head_to_head_shapes-dit.json").read_text())
    su = data["setup"]
    assert data["schema"] == "rasfx-head-to-head/2" and su["quick"] is True and su["steps"] == 3
    assert su["seeds"] == 2 and len(set(su["seed_ids"])) == 2 and su["noise_shape"] == [3, 64, 64]
    runs = {r["name"]: r for r in data["methods"]}
    assert {r["family"] for r in runs.values()} == {"dense", "RAS", "combined", "diffusers"}
    assert [runs[f"dense {k} steps"]["compute"]["mean"] for k in (1, 2, 3)] == [1, 2, 3]
    t1 = 12.706  # two-sided 95 % Student t, 1 degree of freedom
    for r in runs.values():
        assert [s["seed"] for s in r["per_seed"]] == su["seed_ids"]
        assert 0 < r["compute"]["mean"] <= 3 + 1e-9 and abs(r["compute_share"] - r["compute"]["mean"] / 3) < 1e-12
        for key in ("psnr", "ssim", "class_acc"):
            iv, vals = r[key], [s[key] for s in r["per_seed"]]
            assert iv["n"] == 2 and iv["low"] <= iv["mean"] <= iv["high"]
            assert math.isclose(iv["mean"], sum(vals) / 2, abs_tol=1e-12)
            assert math.isclose(iv["high"] - iv["mean"], t1 * abs(vals[0] - vals[1]) / 2, rel_tol=1e-3, abs_tol=1e-9)
        assert 0 < r["psnr"]["mean"] < 100 and -1 <= r["ssim"]["mean"] <= 1 and 0 <= r["class_acc"]["mean"] <= 1
        assert r["fd"] is None  # one image per seed: no covariance
    # skipping every 2nd RAS-kind step saves compute over RAS alone at the same ratio
    both = runs["RAS 0.5 + skip every 2nd, extrapolate"]
    assert all(s["skipped_steps"] for s in both["per_seed"]) and both["compute"]["mean"] < runs["RAS 0.5"]["compute"]["mean"]
    assert "RAS 0.5 (metric random)" in runs  # the default ablation variant
    # every diffusers cache family ran or says why not; the ones that ran are priced by their linear-layer work
    hooks = [r for r in runs.values() if r["family"] == "diffusers"]
    named = {r["hook"] for r in hooks} | {n["name"] for n in data["not_applicable"]}
    assert named == {"FirstBlockCache", "TaylorSeer", "TaylorSeer lite", "MagCache", "FasterCache",
                     "PyramidAttentionBroadcast", "SeaCache", "TextKVCache"}
    assert any(r["compute"]["mean"] < 3 - 1e-6 for r in hooks)
    assert [w["budget_share"] for w in data["winners"]] == [0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6]
    for w in data["winners"]:
        fitting = [r for r in runs.values() if r["compute"]["mean"] <= w["budget"] + 1e-9]
        best = [w[f] for f in ("dense", "RAS", "combined", "diffusers") if w[f] is not None]
        assert (not fitting) == (not best)
        if fitting:
            assert max(b["psnr"]["mean"] for b in best) == max(r["psnr"]["mean"] for r in fitting)
            assert w["verdict"].endswith("wins (outside CI)") or w["verdict"].startswith(("tie within CI", w["leader"]))
    assert set(data["target"]) == {"budgets", "combined_wins", "met"} and data["target"]["budgets"] == 8
    md = (out / "head_to_head_shapes-dit.md").read_text()
    assert "t-interval" in md and "verdict" in md and "RAS 0.5 + skip every 2nd" in md and "**Target**" in md
    assert (out / "head_to_head_shapes-dit.png").is_file() == (data["files"]["plot"] == "head_to_head_shapes-dit.png")

    # Re-render from the JSON and splice into a doc between this model's marker lines.
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "doc.md"
    doc.write_text("# Doc\n\n<!-- head_to_head.py shapes-dit: begin -->\nold\n<!-- head_to_head.py shapes-dit: end -->\n")
    q.main(["--head-to-head", "--from-json", str(out / "head_to_head_shapes-dit.json"), "--doc", str(doc)])
    text = doc.read_text()
    assert "old" not in text and "**Target**" in text and (tmp_path / "docs" / "quality" / "head_to_head_shapes-dit.json").is_file()

    # The budget guard: after the references nothing fits; the JSON says what was skipped.
    cut = tmp_path / "cut"
    q.main(["--head-to-head", "--quick", "--seeds", "1", "--budget-s", "0.5", "--out", str(cut)], pipe=pipe, transform=tf)
    data = json.loads((cut / "head_to_head_shapes-dit.json").read_text())
    assert data["methods"] == [] and "dense 1 steps" in data["skipped"] and data["setup"]["seeds"] == 1

#!/usr/bin/env python3
"""rasfx demo: plain sampling vs region-adaptive sampling (RAS) on the shipped shapes DiT.

    python examples/demo.py                      # what `make demo` runs (CPU, a few minutes)
    python examples/demo.py --quick --out /tmp/o # a tiny run (tests)

What it does:

1. loads the shipped pipeline (``models/shapes-dit``: a 10.4 M-parameter diffusers
   ``SD3Transformer2DModel`` in pixel space, 64x64 RGB, 1024 image tokens) with
   ``ShapesPipeline.from_pretrained``;
2. generates one image per class (fixed per-image seeds, the same initial noise for every run)
   with the plain pipeline, then with RAS at each ratio (``rasfx.enable(pipe, RASConfig(ratio))``),
   28 Euler steps, classifier-free guidance 4.0;
3. prints each run's wall time and process CPU time, the speed-up over the plain run (measured,
   nothing claimed), the estimated FLOPs share from ``rasfx.stats``, and the fidelity of every RAS
   image to its plain counterpart (PSNR and SSIM);
4. writes ``outputs/``: ``grid.png`` (plain | RAS per ratio), ``diff.png`` (amplified
   differences), per-token computed-steps heatmaps (the paper's Fig. 10) and noise-std maps
   (Fig. 11) for a couple of images, ``results.json``, and ``report.md`` / ``report.html`` linking
   them with the numbers.

RAS's one-time graph capture (``torch.export`` of the transformer) happens in a short warm-up run
that is timed and reported separately, so the timed runs compare steady-state sampling.

``psnr`` and ``ssim`` (Gaussian window 11 / sigma 1.5, the standard constants) are importable:
``benchmarks/quality.py`` uses the same functions.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import platform
import sys
import time
from typing import Any, Optional, Sequence

# torch's CPU threads spin-wait between ops by default; on a busy (shared) machine that costs several
# times the work itself. Sleeping threads cost nothing measurable on an idle one. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

DEFAULT_MODEL = os.path.join(ROOT, "models", "shapes-dit")
DEFAULT_CLASSES = "star,heart,ring,triangle,crescent,square"

__all__ = ["psnr", "ssim", "gaussian_window", "subject_mask", "computed_on_subject", "ReusedTransform", "main"]


# ----------------------------------------------------------------------------------------------
# Image fidelity metrics (torch only)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, data_range]; identical images give +inf."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of (B, C, H, W) images in [0, data_range].

    Gaussian window ``window`` x ``window`` with std ``sigma`` (separable), constants
    C1 = (k1 L)^2, C2 = (k2 L)^2, statistics over the valid region only (no padding), computed
    per channel and averaged over channels and positions (as skimage's
    ``structural_similarity(..., gaussian_weights=True, channel_axis=..., use_sample_covariance=False)``).
    Float64 throughout.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    x, y = a.double(), b.double()
    c = x.shape[1]
    g = gaussian_window(window, sigma, device=x.device)
    gh = g.view(1, 1, 1, -1).expand(c, 1, 1, window)
    gv = g.view(1, 1, -1, 1).expand(c, 1, window, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gh, groups=c), gv, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1)


def subject_mask(images: torch.Tensor, border: int = 3, threshold: float = 0.2) -> torch.Tensor:
    """(B, H, W) bool: pixels of the foreground shape of (B, 3, H, W) images in [0, 1] (an estimate).

    The shapes data puts one object on a smooth linear or radial gradient: per image and channel a
    quadratic surface ``a + bx + cy + dx^2 + ey^2 + fxy`` is fitted (least squares) to the border
    pixels, and a pixel belongs to the subject when its RGB distance to that background exceeds
    ``threshold``.
    """
    b, c, h, w = images.shape
    lin = torch.linspace(-1, 1, h, dtype=torch.float64, device=images.device)
    yy, xx = torch.meshgrid(lin, torch.linspace(-1, 1, w, dtype=torch.float64, device=images.device), indexing="ij")
    basis = torch.stack([torch.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], -1)  # (H, W, 6)
    edge = torch.zeros(h, w, dtype=torch.bool, device=images.device)
    edge[:border] = edge[-border:] = True
    edge[:, :border] = edge[:, -border:] = True
    x = images.double()
    coef = torch.linalg.pinv(basis[edge]) @ x.permute(0, 2, 3, 1)[:, edge]  # (B, 6, C)
    background = torch.einsum("hwk,bkc->bchw", basis, coef)
    return (x - background).norm(dim=1) > threshold


def computed_on_subject(stats, mask: torch.Tensor) -> Optional[dict]:
    """Mean number of steps that computed a pixel, on the subject and on the background.

    ``stats``: a ``rasfx.stats`` run whose latent rows are the images of ``mask`` ((R, H, W) bool,
    pixel space, as this model's latents). Images whose mask is empty or full are left out.
    """
    if stats.computed_steps is None or stats.token_grid is None:
        return None
    grid = stats.token_grid.to(torch.long)
    if tuple(grid.shape) != tuple(mask.shape[1:]) or stats.computed_steps.shape[0] != mask.shape[0]:
        return None
    per_pixel = stats.computed_steps.to(torch.float64)[:, grid]  # (R, H, W)
    m = mask.cpu()
    fg, bg = m.sum((1, 2)), (~m).sum((1, 2))
    ok = (fg > 0) & (bg > 0)
    if not bool(ok.any()):
        return None
    subj = (per_pixel * m).sum((1, 2))[ok] / fg[ok]
    back = (per_pixel * ~m).sum((1, 2))[ok] / bg[ok]
    return dict(subject=float(subj.mean()), background=float(back.mean()), images=int(ok.sum()),
                subject_per_image=subj.tolist(), background_per_image=back.tolist(),
                subject_share=float(m[ok].double().mean()))


# ----------------------------------------------------------------------------------------------
# RAS helpers


class ReusedTransform:
    """A ``transform=`` for ``rasfx.enable`` that keeps one ``RASModule`` per model.

    ``rasfx.disable`` drops every cache of the module but keeps its captured graphs, so handing
    the same module to the next ``enable`` (another ratio or config) skips the graph capture.
    """

    def __init__(self, transform_config: Any = None) -> None:
        self.transform_config = transform_config
        self._modules: dict[int, tuple[Any, Any]] = {}

    def __call__(self, model):
        import rasfx

        entry = self._modules.get(id(model))
        if entry is None or entry[0] is not model:
            entry = (model, rasfx.transform(model, self.transform_config))
            self._modules[id(model)] = entry
        return entry[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 N(0, I) noise, image i from a CPU generator seeded with seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


# ----------------------------------------------------------------------------------------------
# Pictures (PIL only)


def _font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _to_pil(img: torch.Tensor, scale: int):
    """(3, H, W) in [0, 1] -> PIL image upscaled ``scale`` x (nearest)."""
    from PIL import Image

    arr = (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    im = Image.fromarray(arr)
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST)


def labelled_grid(rows: list[list[Any]], col_titles: list[str], row_titles: list[str], path: str, tile: int) -> str:
    """Tiles (PIL images of ``tile`` x ``tile``) in a table with column and row captions."""
    from PIL import Image, ImageDraw

    font = _font(13)
    pad, top, left = 6, 24, 84
    ncol = len(col_titles)
    w = left + ncol * (tile + pad) + pad
    h = top + len(rows) * (tile + pad) + pad
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(col_titles):
        draw.text((left + pad + j * (tile + pad), 5), title, fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (tile + pad)
        draw.text((6, y + tile // 2 - 7), row_titles[i], fill=(0, 0, 0), font=font)
        for j, im in enumerate(row):
            if im is not None:
                canvas.paste(im.resize((tile, tile), Image.NEAREST), (left + pad + j * (tile + pad), y))
    canvas.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# The demo


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder (default: models/shapes-dit)")
    p.add_argument("--steps", type=int, default=28, help="Euler steps (default 28)")
    p.add_argument("--ratios", default="0.5,0.25", help="RAS ratios, comma separated (default 0.5,0.25)")
    p.add_argument("--classes", default=DEFAULT_CLASSES, help=f"class names or ids, one image each (default {DEFAULT_CLASSES})")
    p.add_argument("--seed", type=int, default=0, help="image i uses initial-noise seed SEED + i")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice, usually one per core)")
    p.add_argument("--heatmap-images", type=int, default=2, help="images that get heatmaps (default 2)")
    p.add_argument("--no-warmup", action="store_true",
                   help="no warm-up run: the first RAS run's time then includes the one-time graph capture")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 1 class, 2 steps, no warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 2)
        args.classes = args.classes.split(",")[0]
        args.no_warmup = True
    return args


def _run(pipe, labels, latents, steps: int, guidance: float, device: torch.device, desc: str) -> tuple[torch.Tensor, float, float]:
    """One pipeline call; returns (images (B, 3, H, W) in [0, 1] float32 CPU, wall s, CPU s)."""
    pipe.set_progress_bar_config(desc=desc, leave=True, dynamic_ncols=True)
    _sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    images = pipe(labels, num_inference_steps=steps, guidance_scale=guidance, latents=latents).images
    _sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return images.float().cpu(), wall, cpu


def main(argv: Optional[Sequence[str]] = None, pipe=None, transform: Optional[ReusedTransform] = None) -> dict:
    """Command line entry; ``pipe`` (a loaded ``ShapesPipeline``) and ``transform`` (a shared
    :class:`ReusedTransform`) let tests reuse one model and its captured graphs."""
    args = _parse(argv)
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # no loader chatter; the demo prints what matters
    import rasfx
    from rasfx import RASConfig, disable, enable, save_heatmap
    from rasfx import stats as ras_stats
    from shapes_pipeline import ShapesPipeline

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "heatmaps"), exist_ok=True)

    print(f"rasfx {rasfx.__version__} demo: plain sampling vs RAS on {os.path.relpath(args.model, ROOT)}")
    print(f"device {device} ({_device_name(device)}), {args.dtype}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}, {torch.get_num_threads()} CPU threads")
    t0 = time.perf_counter()
    if pipe is None:
        pipe = ShapesPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    else:
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
        args.dtype = str(dtype).replace("torch.", "")
    load_s = time.perf_counter() - t0
    names = pipe.class_embeddings.class_names
    items = [c.strip() for c in args.classes.split(",") if c.strip()]
    labels = pipe.labels_to_tensor([int(c) if c.isdigit() else c for c in items])
    label_names = [names[i] for i in labels.tolist()]
    cfg = pipe.transformer.config
    seeds = [args.seed + i for i in range(len(labels))]
    latents = initial_noise(seeds, (cfg.in_channels, cfg.sample_size, cfg.sample_size)).to(device, dtype)
    print(f"loaded in {load_s:.1f} s; {len(labels)} images ({', '.join(label_names)}), seeds {seeds[0]}..{seeds[-1]}, "
          f"{args.steps} steps, guidance {args.guidance}, RAS ratios {', '.join(f'{r:g}' for r in ratios)}\n")

    reuse = transform if transform is not None else ReusedTransform()
    # Warm-up: RAS's one-time graph capture (and the first-call costs of the plain model).
    warm_steps = 0 if args.no_warmup else 2
    warm_wall = warm_cpu = 0.0
    if warm_steps:
        enable(pipe, RASConfig(ratio=min(ratios)), transform=reuse)
        try:
            _, warm_wall, warm_cpu = _run(pipe, labels, latents, warm_steps, args.guidance, device,
                                          f"warm-up: graph capture + {warm_steps} steps")
        finally:
            disable(pipe)

    runs: list[dict] = []
    images, wall, cpu = _run(pipe, labels, latents, args.steps, args.guidance, device, f"plain     {args.steps} steps")
    dense_images = images
    runs.append(dict(name="plain", ratio=1.0, wall_s=wall, cpu_s=cpu, flops_fraction=1.0, images=images))
    all_stats = {}
    for r in ratios:
        enable(pipe, RASConfig(ratio=r), transform=reuse)
        try:
            images, wall, cpu = _run(pipe, labels, latents, args.steps, args.guidance, device, f"RAS {r:<5g} {args.steps} steps")
            st = ras_stats(pipe)
        finally:
            disable(pipe)
        all_stats[r] = st
        runs.append(dict(name=f"RAS {r:g}", ratio=r, wall_s=wall, cpu_s=cpu, flops_fraction=st.flops_fraction,
                         images=images, stats=st))

    # ---------------------------------------------------------------- numbers
    mask = subject_mask(dense_images)  # (B, H, W): the shape, estimated from the plain images
    for run in runs[1:]:
        run["computed"] = computed_on_subject(run["stats"], mask)
    base = runs[0]
    for run in runs:
        run["speedup_wall"] = base["wall_s"] / run["wall_s"]
        run["speedup_cpu"] = base["cpu_s"] / run["cpu_s"] if run["cpu_s"] > 0 else float("nan")
        if run is base:
            run["psnr"], run["ssim"] = [float("inf")] * len(labels), [1.0] * len(labels)
        else:
            run["psnr"] = psnr(run["images"], dense_images).tolist()
            run["ssim"] = ssim(run["images"], dense_images).tolist()

    print()
    print(_warmup_text(warm_steps, warm_wall, warm_cpu))
    print(_table_text(runs, args.steps))
    print("\nper image, fidelity to the plain image (PSNR dB / SSIM):")
    for i, name in enumerate(label_names):
        cells = "  ".join(f"{run['name']}: {run['psnr'][i]:5.2f} / {run['ssim'][i]:.4f}" for run in runs[1:])
        print(f"  {name:9s} {cells}")
    print(_timing_note(device))
    print("\n" + _where_text(runs, args.steps))
    for r, st in all_stats.items():
        print(f"\nrasfx.stats, RAS ratio {r:g}:\n{st.summary()}")

    # ---------------------------------------------------------------- pictures
    tile = 192
    col_titles = ["plain"] + [f"RAS {r:g}" for r in ratios]
    rows = [[_to_pil(run["images"][i], 3) for run in runs] for i in range(len(labels))]
    labelled_grid(rows, col_titles, label_names, os.path.join(out, "grid.png"), tile)
    diff_rows = [
        [_to_pil(run["images"][i], 3) for run in runs[:1]]
        + [_to_pil(((run["images"][i] - dense_images[i]).abs() * 4).clamp(0, 1), 3) for run in runs[1:]]
        for i in range(len(labels))
    ]
    labelled_grid(diff_rows, ["plain"] + [f"|RAS {r:g} - plain| x4" for r in ratios], label_names,
                  os.path.join(out, "diff.png"), tile)

    heat = []  # (image index, ratio, computed path, std path, computed range, std range)
    n_heat = min(args.heatmap_images, len(labels))
    for r, st in all_stats.items():
        for i in range(n_heat):
            if st.computed_steps is None:
                continue
            stem = f"r{r:g}_{i}_{label_names[i]}"
            pc = save_heatmap(st, os.path.join(out, "heatmaps", f"computed_steps_{stem}.png"), "computed", row=i, size=(tile, tile))
            ps = save_heatmap(st, os.path.join(out, "heatmaps", f"noise_std_{stem}.png"), "std", row=i, size=(tile, tile))
            cs, ns = st.token_values("computed", i), st.token_values("std", i)
            heat.append(dict(image=i, ratio=r, computed=os.path.relpath(pc, out), std=os.path.relpath(ps, out),
                             computed_min=int(cs.min()), computed_max=int(cs.max()),
                             std_min=float(ns.min()), std_max=float(ns.max())))
    if heat:
        from PIL import Image

        hrows, htitles = [], []
        for h in heat:
            i = h["image"]
            run = next(rr for rr in runs if rr["ratio"] == h["ratio"])
            hrows.append([_to_pil(dense_images[i], 3), _to_pil(run["images"][i], 3),
                          Image.open(os.path.join(out, h["computed"])), Image.open(os.path.join(out, h["std"]))])
            htitles.append(f"{label_names[i]}\nRAS {h['ratio']:g}")
        labelled_grid(hrows, ["plain", "RAS", "computed steps (Fig. 10)", "last noise std (Fig. 11)"], htitles,
                      os.path.join(out, "heatmaps.png"), tile)

    # ---------------------------------------------------------------- report
    total_s = time.perf_counter() - t_start
    results = dict(
        device=str(device), device_name=_device_name(device), dtype=args.dtype, torch=torch.__version__,
        diffusers=diffusers.__version__, rasfx=rasfx.__version__, threads=torch.get_num_threads(),
        platform=platform.platform(), model=os.path.relpath(args.model, ROOT), steps=args.steps, guidance=args.guidance,
        classes=label_names, seeds=seeds, ratios=ratios, load_s=load_s, warmup_steps=warm_steps, warmup_wall_s=warm_wall, warmup_cpu_s=warm_cpu,
        total_s=total_s, quick=args.quick,
        runs=[{k: v for k, v in run.items() if k not in ("images", "stats")} for run in runs],
        stats={f"{r:g}": dict(num_steps=st.num_steps, num_tokens=st.num_tokens, dense_steps=st.dense_steps,
                               ras_steps=st.ras_steps, ras_ratio=st.ras_ratio, flops_fraction=st.flops_fraction,
                               longest_inactive_streak=st.longest_inactive_streak, summary=st.summary())
               for r, st in all_stats.items()},
        heatmaps=heat,
        files=dict(grid="grid.png", diff="diff.png", heatmaps="heatmaps.png" if heat else None,
                   report_md="report.md", report_html="report.html"),
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(jsonable(results), f, indent=2)
    _write_markdown(os.path.join(out, "report.md"), results, runs, label_names, heat, all_stats, device)
    _write_html(os.path.join(out, "report.html"), results, runs, label_names, heat, all_stats, device)
    print(f"\nwrote {out}/: grid.png, diff.png, heatmaps.png, heatmaps/ ({2 * len(heat)} maps), results.json, "
          f"report.md, report.html  (total {total_s:.0f} s)")
    return results


def _where_text(runs: list[dict], steps: int) -> str:
    lines = [f"where the compute went: mean number of the {steps} steps that computed a pixel, on the shape "
             f"(estimated from the plain image) vs the background:"]
    for run in runs[1:]:
        c = run.get("computed")
        if c:
            lines.append(f"  {run['name']:9s} shape {c['subject']:5.2f}  background {c['background']:5.2f}  "
                         f"({c['images']} images, shape = {100 * c['subject_share']:.0f}% of the pixels)")
    if len(lines) > 1:
        c = next(r["computed"] for r in runs[1:] if r.get("computed"))
        if c["subject"] < c["background"]:
            lines.append("  RAS computed the background more often than the shape here, the opposite of the paper's "
                         "premise (low noise std on the main subject). A likely reason: in pixel space the channel std "
                         "of the predicted noise (noise - image) follows the colour saturation of the image, high on "
                         "the saturated shapes and low on the muted backgrounds (see the noise-std maps).")
    return "\n".join(lines)


def _warmup_text(steps: int, wall: float, cpu: float) -> str:
    if not steps:
        return "No warm-up run: the first RAS run's time includes the one-time graph capture."
    return (f"Warm-up run (RAS's one-time graph capture + {steps} steps, not in the table): {wall:.1f} s wall, "
            f"{cpu:.1f} s CPU.")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def jsonable(x):
    """``x`` with non-finite floats as strings and tuples as lists, for json.dump."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _fmt_psnr(v: float) -> str:
    return "identical" if math.isinf(v) else f"{v:.2f} dB"


def _table_rows(runs: list[dict]) -> list[list[str]]:
    rows = []
    for run in runs:
        ideal = 1.0 / run["flops_fraction"]
        rows.append([
            run["name"], f"{run['wall_s']:.1f}", f"{run['cpu_s']:.1f}", f"{run['speedup_wall']:.2f}x",
            f"{run['speedup_cpu']:.2f}x", f"{run['flops_fraction']:.3f} ({ideal:.2f}x)",
            _fmt_psnr(_mean(run["psnr"])), f"{_mean(run['ssim']):.4f}",
        ])
    return rows


TABLE_HEADER = ["run", "wall s", "CPU s", "speed-up (wall)", "speed-up (CPU)", "est. FLOPs share (ideal)",
                "PSNR vs plain", "SSIM vs plain"]


def _table_text(runs: list[dict], steps: int) -> str:
    rows = [TABLE_HEADER] + _table_rows(runs)
    widths = [max(len(r[j]) for r in rows) for j in range(len(TABLE_HEADER))]
    lines = [f"{steps}-step runs (measured on this machine):"]
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _timing_note(device: torch.device) -> str:
    if device.type == "cuda":
        return ("\nTimes are measured with a device sync around each whole pipeline call, eager mode. "
                "A 10 M-parameter model at 64x64 leaves the GPU partly idle, so the speed-up is below the FLOPs ratio.")
    return ("\nTimes are measured here, eager mode, on the CPU threads above. The speed-up is what this machine gave: "
            "a small model, Python and per-op overhead, gather/scatter and cache copies take a share that does not shrink "
            "with the token count, and other processes on a shared machine make wall times noisy (process CPU time is "
            "steadier). The FLOPs share is the ideal bound, not a measurement.")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _write_markdown(path, res, runs, names, heat, all_stats, device) -> None:
    lines = [
        "# rasfx demo: plain sampling vs region-adaptive sampling",
        "",
        f"Model `{res['model']}` (10.4 M-parameter SD3 transformer, 64x64 pixels, 1024 image tokens), "
        f"{res['steps']} Euler steps, guidance {res['guidance']}, one image per class ({', '.join(names)}), "
        f"seeds {res['seeds'][0]}..{res['seeds'][-1]}; every run starts from the same noise.",
        f"Device: {res['device']} ({res['device_name']}), {res['dtype']}, {res['threads']} CPU threads, "
        f"torch {res['torch']}, diffusers {res['diffusers']}, rasfx {res['rasfx']}."
        + (" **Quick run (tiny, for tests): the numbers mean little.**" if res["quick"] else ""),
        "",
        "## Speed and fidelity (measured)",
        "",
        _md_table(TABLE_HEADER, _table_rows(runs)),
        "",
        _warmup_text(res["warmup_steps"], res["warmup_wall_s"], res["warmup_cpu_s"]) + f" Model load: {res['load_s']:.1f} s.",
        _timing_note(device).strip(),
        "",
        "Fidelity per image (PSNR dB / SSIM against the plain image from the same noise):",
        "",
        _md_table(["class"] + [r["name"] for r in runs[1:]],
                  [[n] + [f"{r['psnr'][i]:.2f} / {r['ssim'][i]:.4f}" for r in runs[1:]] for i, n in enumerate(names)]),
        "",
        "```",
        _where_text(runs, res["steps"]),
        "```",
        "",
        "## Images",
        "",
        "![plain vs RAS](grid.png)",
        "",
        "[grid.png](grid.png): plain | RAS per ratio, one class per row.",
        "",
        "![differences](diff.png)",
        "",
        "[diff.png](diff.png): absolute difference to the plain image, amplified 4x.",
        "",
    ]
    if heat:
        lines += [
            "## Where RAS spent its compute",
            "",
            "![heatmaps](heatmaps.png)",
            "",
            "[heatmaps.png](heatmaps.png): per image token, how many of the steps computed it (paper Fig. 10), and "
            "the channel std of the last step's noise prediction (Fig. 11; RAS computes the low-std tokens, "
            "which the paper finds on the main subject). Colours are min-max scaled per map (viridis: dark = low, yellow = high).",
            "",
            _md_table(["image", "ratio", "computed steps (min..max)", "noise std (min..max)"],
                      [[f"{names[h['image']]}", f"{h['ratio']:g}",
                        f"[{h['computed_min']}..{h['computed_max']}]({h['computed']})",
                        f"[{h['std_min']:.3f}..{h['std_max']:.3f}]({h['std']})"] for h in heat]),
            "",
        ]
    lines += ["## rasfx.stats", ""]
    for r, st in all_stats.items():
        lines += [f"RAS ratio {r:g}:", "", "```", st.summary(), "```", ""]
    lines += ["All numbers: [results.json](results.json).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _write_html(path, res, runs, names, heat, all_stats, device) -> None:
    def table(header, rows):
        h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
        body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    esc = [[html.escape(c) for c in r] for r in _table_rows(runs)]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>rasfx demo</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "th{background:#f3f3f3}pre{background:#f7f7f7;padding:.6em;overflow-x:auto}img{max-width:100%}</style></head><body>",
        "<h1>rasfx demo: plain sampling vs region-adaptive sampling</h1>",
        f"<p>Model <code>{html.escape(res['model'])}</code>, {res['steps']} Euler steps, guidance {res['guidance']}, "
        f"classes {html.escape(', '.join(names))}, seeds {res['seeds'][0]}..{res['seeds'][-1]}. Device "
        f"{html.escape(res['device'])} ({html.escape(res['device_name'])}), {res['dtype']}, {res['threads']} CPU threads, "
        f"torch {html.escape(res['torch'])}.{' <b>Quick run (tiny, for tests).</b>' if res['quick'] else ''}</p>",
        "<h2>Speed and fidelity (measured)</h2>",
        table(TABLE_HEADER, esc),
        f"<p>{html.escape(_warmup_text(res['warmup_steps'], res['warmup_wall_s'], res['warmup_cpu_s']))} "
        f"{html.escape(_timing_note(device).strip())}</p>",
        table(["class"] + [html.escape(r["name"]) for r in runs[1:]],
              [[html.escape(n)] + [f"{r['psnr'][i]:.2f} / {r['ssim'][i]:.4f}" for r in runs[1:]] for i, n in enumerate(names)]),
        f"<pre>{html.escape(_where_text(runs, res['steps']))}</pre>",
        "<h2>Images</h2><p><a href='grid.png'><img src='grid.png' alt='plain vs RAS'></a></p>",
        "<p><a href='diff.png'><img src='diff.png' alt='differences'></a><br>|RAS - plain|, amplified 4x.</p>",
    ]
    if heat:
        parts += [
            "<h2>Where RAS spent its compute</h2><p><a href='heatmaps.png'><img src='heatmaps.png' alt='heatmaps'></a></p>",
            "<p>Computed steps per token (paper Fig. 10) and last noise std (Fig. 11), min-max scaled per map.</p>",
            table(["image", "ratio", "computed steps", "noise std"],
                  [[html.escape(names[h["image"]]), f"{h['ratio']:g}",
                    f"<a href='{h['computed']}'>{h['computed_min']}..{h['computed_max']}</a>",
                    f"<a href='{h['std']}'>{h['std_min']:.3f}..{h['std_max']:.3f}</a>"] for h in heat]),
        ]
    parts.append("<h2>rasfx.stats</h2>")
    for r, st in all_stats.items():
        parts.append(f"<p>RAS ratio {r:g}</p><pre>{html.escape(st.summary())}</pre>")
    parts.append("<p>All numbers: <a href='results.json'>results.json</a>.</p></body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()

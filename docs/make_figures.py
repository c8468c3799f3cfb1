#!/usr/bin/env python3
"""Make the figures of docs/how-ras-works.md (and the quickstart) with rasfx itself.

    python docs/make_figures.py                # CPU: ~10-40 min on 2 busy cores; a GPU: ~1 min
    python docs/make_figures.py --steps 10     # a quicker, coarser set (not the committed one)

Everything comes from the shipped model ``models/shapes-dit`` (a 10.4 M-parameter pixel-space
SD3 transformer, 64x64 RGB, 2x2 patches -> 1024 image tokens) sampled with its diffusers-style
``ShapesPipeline`` (``examples/shapes_pipeline.py``), densely and with ``rasfx.enable``:

* ``img/dense_vs_ras.png``   dense | RAS 0.5 | RAS 0.25 | |RAS 0.25 - dense| x4, one class per row;
* ``img/computed_steps.png`` image | computed steps per token | noise std per token (the paper's
                             Figures 10 and 11; one colour scale and colour bar per kind);
* ``img/focus_steps.png``    one image through the run: the sample x_t, the per-token std of the
                             noise prediction at that step, and the tokens chosen for the next step;
* ``img/schedule.png``       active image tokens per step of a 28-step run (``rasfx.sampler.build_plan``);
* ``img/figures.json``       the numbers quoted in the text (PSNR, FLOPs share, streaks).

The PNGs are small (tens of KiB) and committed; the docs test only checks that they exist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, os.path.join(ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import rasfx  # noqa: E402
from rasfx.sampler import PixelLayout, build_plan, token_scores  # noqa: E402
from shapes_eval import Scale, initial_noise, panel_figure, pixel_map, psnr, subject_mask  # noqa: E402  (examples/)

TILE = 1.45  # inches per 64x64 image in the figures


def save_png(fig, path: str) -> None:
    """A 256-colour PNG of a matplotlib figure: the figures stay small enough to commit."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    img = Image.open(buf).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def schedule_image(path: str, steps: int = 28, num_tokens: int = 1024) -> dict:
    """Bar chart of the active token count per step for ratios 0.5 and 0.25 (static schedule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = {r: build_plan(rasfx.RASConfig(ratio=r), steps, num_tokens) for r in (0.5, 0.25)}
    fig, axes = plt.subplots(1, len(plans), figsize=(11, 2.6), sharey=True, layout="constrained")
    for ax, (r, plan) in zip(axes, plans.items()):
        colors = ["dimgray" if plan.is_dense(i) else "teal" for i in range(steps)]
        ax.bar(range(steps), plan.active, color=colors)
        ax.set_title(f"ratio {r:g}: {plan.token_fraction:.0%} of the dense token evaluations", fontsize=9)
        ax.set_xlabel("step (grey: dense, teal: RAS)", fontsize=8)
        ax.set_xticks(range(0, steps, 4))
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("active image tokens", fontsize=8)
    axes[0].set_yticks([0, num_tokens // 2, num_tokens])
    save_png(fig, path)
    return {f"{r:g}": dict(active=list(p.active), dense=[i for i in range(steps) if p.is_dense(i)],
                           token_fraction=p.token_fraction) for r, p in plans.items()}


class RecordingRAS(rasfx.RASModule):
    """A ``RASModule`` that keeps, per denoising step (``step``, advanced by the pipeline's step
    callback), the active set it is given and the output it returns (a ``transform=`` for
    ``rasfx.enable``; for figures only). Steps that rasfx runs on the plain model (leading dense
    steps whose caches no later step reads) are not recorded."""

    def __init__(self, model):
        super().__init__(model, rasfx.TransformConfig())
        self.step = 0
        self.active_log: dict = {}
        self.outputs: dict = {}

    def set_active(self, index, check: bool = True) -> None:
        self.active_log[self.step] = None if index is None else index.detach().cpu().clone()
        super().set_active(index, check)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.outputs[self.step] = out[0].detach().float().cpu()
        return out


def main(argv=None) -> None:
    from shapes_pipeline import ShapesPipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--classes", default="star,heart,crescent")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--out", default=os.path.join(HERE, "img"))
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    t0 = time.perf_counter()

    numbers: dict = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed, "device": str(device)}
    numbers["schedule"] = schedule_image(os.path.join(args.out, "schedule.png"), args.steps)

    pipe = ShapesPipeline.from_pretrained(os.path.join(ROOT, "models", "shapes-dit")).to(device)
    pipe.set_progress_bar_config(disable=True)
    names = [c.strip() for c in args.classes.split(",")]
    labels = pipe.labels_to_tensor(names)
    cfg = pipe.transformer.config
    latents = initial_noise([args.seed + i for i in range(len(names))],
                            (cfg.in_channels, cfg.sample_size, cfg.sample_size)).to(device)

    def run(ras_config=None, transform=None, callback=None):
        kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, latents=latents,
                  callback_on_step_end=callback)
        if ras_config is None:
            return pipe(labels, **kw).images.float().cpu(), None
        with rasfx.enabled(pipe, ras_config, transform=transform):
            images = pipe(labels, **kw).images.float().cpu()
        return images, rasfx.stats(pipe)

    print(f"dense run, {args.steps} steps ...", flush=True)
    dense, _ = run()
    results = {}
    recorder = {}
    for ratio in (0.5, 0.25):
        print(f"RAS {ratio} ...", flush=True)
        samples: list = []
        transform = None
        if ratio == 0.25:  # record the run that the step-by-step figure shows
            def transform(model):
                recorder["ras"] = RecordingRAS(model)
                return recorder["ras"]

        def keep(pipe_, i, t, kw, samples=samples):
            samples.append(kw["latents"].detach().float().cpu())
            if "ras" in recorder:
                recorder["ras"].step = i + 1
            return {}

        images, st = run(rasfx.RASConfig(ratio=ratio), transform, keep)
        results[ratio] = (images, st, samples)
        numbers[f"ras_{ratio:g}"] = dict(
            psnr_vs_dense=[round(float(v), 2) for v in psnr(images, dense)],
            flops_fraction=round(st.flops_fraction, 4), ras_ratio=round(st.ras_ratio, 4),
            dense_steps=st.dense_steps, longest_inactive_streak=st.longest_inactive_streak,
            computed_min_max=[int(st.computed_steps.min()), int(st.computed_steps.max())],
        )

    # 1. dense vs RAS
    img25, st25, samples25 = results[0.25]
    img50 = results[0.5][0]
    rows = [[dense[i], img50[i], img25[i], ((img25[i] - dense[i]).abs() * 4).clamp(0, 1)] for i in range(len(names))]
    cells = [["", f"{numbers['ras_0.5']['psnr_vs_dense'][i]:.1f} dB", f"{numbers['ras_0.25']['psnr_vs_dense'][i]:.1f} dB", ""]
             for i in range(len(names))]
    save_png(panel_figure(rows, ["dense", "RAS 0.5", "RAS 0.25", "|RAS 0.25 - dense| x4"], names, cell_titles=cells,
                          tile=TILE), os.path.join(args.out, "dense_vs_ras.png"))

    # 2. computed steps and noise std per token (Figures 10 and 11): one scale per kind, with its colour bar
    computed, std = pixel_map(st25, "computed"), pixel_map(st25, "std")
    rows = [[img25[i], computed[i], std[i]] for i in range(len(names))]
    scales = dict(computed=Scale(0, args.steps, f"steps computed (of {args.steps})"),
                  std=Scale(0, float(std.max()), "noise std, last step", cmap="magma"))
    save_png(panel_figure(rows, ["RAS 0.25", "computed steps", "noise std, last step"], names,
                          kinds=[None, "computed", "std"], scales=scales, outlines=list(subject_mask(dense)), tile=TILE),
             os.path.join(args.out, "computed_steps.png"))

    # 3. one image through the run: x_t, noise std per token at step t, tokens computed at t + 1
    ras = recorder["ras"]
    n_tok = ras.num_image_tokens
    token_grid = ras.token_map()[0, 0].cpu()  # [H, W] token of every pixel
    layout = PixelLayout.channels_first(token_grid, n_tok, cfg.in_channels)
    shown = [s for s in (3, 7, 11, 16, 21, 26) if s + 1 < args.steps and s in ras.outputs]
    g = args.guidance
    cols, titles = [], []
    for s in shown:
        out = ras.outputs[s]  # [2B, C, H, W]: uncond rows, then cond rows
        u, c = out.chunk(2)
        noise = u + g * (c - u)  # what the scheduler integrates
        std_t = token_scores(noise[:1], layout, "std")[0]  # [N] for image 0
        nxt = ras.active_log.get(s + 1)  # None: a dense step
        mask = torch.zeros(n_tok, dtype=torch.bool)
        if nxt is None:
            mask[:] = True
        else:
            mask[(nxt[0] if nxt.dim() == 2 else nxt).long()] = True
        x_t = (samples25[s][0] / 2 + 0.5).clamp(0, 1)
        computed_next = mask[token_grid.long()].float().expand(3, -1, -1)  # white: computed, black: reused
        cols.append([x_t, std_t[token_grid.long()], computed_next])
        titles.append(f"step {s}" + (" -> dense" if nxt is None else ""))
    rows = [list(r) for r in zip(*cols)]
    top = max(float(c[1].max()) for c in cols)
    kinds = [[None] * len(shown), ["std"] * len(shown), [None] * len(shown)]
    save_png(panel_figure(rows, titles, ["sample\nafter t", "noise std\nat step t", "computed\nat t+1\n(white)"],
                          kinds=kinds, scales=dict(std=Scale(0, top, "noise std at step t", cmap="magma")), tile=1.25),
             os.path.join(args.out, "focus_steps.png"))
    numbers["focus_steps"] = dict(image=names[0], steps=shown)

    numbers["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "figures.json"), "w") as f:
        json.dump(numbers, f, indent=1)
    print(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()

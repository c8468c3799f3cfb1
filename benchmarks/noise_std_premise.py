#!/usr/bin/env python3
"""The paper's premise on both shapes models: is the noise prediction's std lower on the subject?

    python3 benchmarks/noise_std_premise.py                       # both models, CPU (~a few minutes)
    python3 benchmarks/noise_std_premise.py --classes star,heart --out /tmp/premise

RAS (Liu et al., 2025) ranks tokens by the per-token standard deviation, over channels, of the
model's (guided) noise prediction, and computes the lowest-std tokens; the paper's premise is that
those are the main subject ("fast-update region"). This script samples dense runs (``--steps``,
guidance ``--guidance``) of one image per class of ``--classes`` on each ``--models`` folder and
records, at every step, exactly that score: the guided transformer output (a forward hook on the
transformer, classifier-free guidance applied here), laid out on the latent grid ((3, 64, 64)
pixels for ``models/shapes-dit``, unpacked (C, 16, 16) latents for ``models/shapes-latent-dit``),
the std over channels per latent pixel, averaged over each token's pixels (2x2 patches, resp. 1).
The subject is ``shapes_eval.subject_mask`` of the final image, brought to the token grid by
``mask_on_grid``. Per step and image:

* the mean score on subject and on background tokens;
* the AUC: the probability that a random subject token scores lower than a random background
  token (ties count half). AUC > 0.5: the premise holds (low std marks the subject); 0.5: no
  relation; < 0.5: the opposite;
* the subject's share among the 25 % lowest-scoring tokens (what RAS at ratio 0.25 computes next),
  against its share of all tokens.

Writes ``OUT/noise_std_premise.json`` and ``OUT/noise_std_premise.png`` (per model and image: the
sample, the score averaged over steps with the subject outlined, and the AUC per step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see quality.py: busy shared CPUs
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from shapes_eval import initial_noise, jsonable, mask_on_grid, subject_mask  # noqa: E402  (examples/shapes_eval.py)

MODELS = ("models/shapes-dit", "models/shapes-latent-dit")
#: the share of tokens RAS computes in the "lowest 25 %" statistic
LOW_SHARE = 0.25


def token_scores(pipe, velocity: torch.Tensor) -> torch.Tensor:
    """Guided prediction of one step (the transformer's layout: (B, C, H, W) pixels or packed
    (B, h * w, C) latents) -> (B, th, tw) RAS scores: channel std per latent pixel, averaged over
    each token's patch."""
    if velocity.dim() == 3:  # Flux: packed tokens, patch 1
        side = pipe.latent_size
        velocity = pipe._unpack_latents(velocity, side, side)
    std = velocity.float().std(dim=1, unbiased=False)  # (B, H, W) on the latent grid
    patch = int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
    if patch > 1:
        std = torch.nn.functional.avg_pool2d(std[:, None], patch)[:, 0]
    return std


def region_stats(scores: torch.Tensor, mask: torch.Tensor, low_share: float = LOW_SHARE) -> dict:
    """One image's token scores (th, tw) and subject mask (th, tw bool) -> subject / background
    mean score, AUC (P(subject score < background score), ties half) and the subject's share of
    the ``low_share`` lowest-scoring tokens."""
    s, m = scores.flatten().double(), mask.flatten().bool()
    subj, back = s[m], s[~m]
    if subj.numel() == 0 or back.numel() == 0:
        return dict(subject=None, background=None, auc=None, low_subject_share=None, subject_share=float(m.double().mean()))
    less = (subj[:, None] < back[None, :]).double().mean() + 0.5 * (subj[:, None] == back[None, :]).double().mean()
    k = max(1, round(low_share * s.numel()))
    lowest = torch.topk(s, k, largest=False).indices
    return dict(subject=float(subj.mean()), background=float(back.mean()), auc=float(less),
                low_subject_share=float(m[lowest].double().mean()), subject_share=float(m.double().mean()))


def run_model(folder: str, classes: list[str], steps: int, guidance: float, seed: int, device: str) -> dict:
    from shapes_pipeline import load_pipeline

    pipe = load_pipeline(os.path.join(ROOT, folder), device=device)
    pipe.set_progress_bar_config(disable=True)
    outputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_hook(lambda mod, args, out: outputs.append(out[0].detach()))
    noise = initial_noise([seed + i for i in range(len(classes))], tuple(pipe.noise_shape(1)[1:]))
    try:
        images = pipe(classes, num_inference_steps=steps, guidance_scale=guidance, latents=noise.to(device)).images
    finally:
        hook.remove()
    per_step = []
    for out in outputs:  # one batched [uncond, cond] call per step
        u, c = out.chunk(2)
        per_step.append(token_scores(pipe, u + guidance * (c - u)).cpu())
    scores = torch.stack(per_step)  # (steps, B, th, tw)
    masks = mask_on_grid(subject_mask(images.cpu()), tuple(scores.shape[-2:]))
    rows = []
    for b, name in enumerate(classes):
        stats = [region_stats(scores[i, b], masks[b]) for i in range(len(per_step))]
        mean_map = scores[:, b].mean(0)
        rows.append(dict(cls=name, per_step=stats, over_steps=region_stats(mean_map, masks[b]),
                         mean_auc=_mean([s["auc"] for s in stats]), image=images[b].cpu(), mean_map=mean_map,
                         mask=masks[b]))
    return dict(model=os.path.basename(folder), pipeline=type(pipe).__name__, token_grid=list(scores.shape[-2:]),
                images=rows, mean_auc=_mean([r["mean_auc"] for r in rows]),
                auc_of_mean_map=_mean([r["over_steps"]["auc"] for r in rows]))


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(r["images"]) for r in results)
    fig, axes = plt.subplots(len(results) * 2, n + 1, figsize=(1.9 * (n + 1), 3.9 * len(results)), squeeze=False)
    for k, res in enumerate(results):
        maps = torch.stack([row["mean_map"] for row in res["images"]])
        vmin, vmax = float(maps.min()), float(maps.max())
        for j in range(n + 1):
            for ax in (axes[2 * k, j], axes[2 * k + 1, j]):
                ax.axis("off")
        for j, row in enumerate(res["images"]):
            ax = axes[2 * k, j]
            ax.imshow(row["image"].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_title(row["cls"], fontsize=8)
            ax = axes[2 * k + 1, j]
            im = ax.imshow(row["mean_map"].numpy(), cmap="viridis", vmin=vmin, vmax=vmax)
            ax.contour(row["mask"].float().numpy(), levels=[0.5], colors="red", linewidths=0.8)
            ax.set_title(f"AUC {row['over_steps']['auc']:.2f}" if row["over_steps"]["auc"] is not None else "no subject",
                         fontsize=7)
        fig.colorbar(im, ax=axes[2 * k + 1, n - 1], fraction=0.046, pad=0.04)
        ax = axes[2 * k, n]
        ax.axis("on")
        for row in res["images"]:
            ax.plot([s["auc"] if s["auc"] is not None else float("nan") for s in row["per_step"]], lw=1, label=row["cls"])
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("AUC (low std on subject)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title(res["model"], fontsize=8)
        axes[2 * k + 1, n].text(0, 0.5, f"{res['model']}\n({res['pipeline']})\ntokens {res['token_grid'][0]}x"
                                f"{res['token_grid'][1]}\nmean AUC over steps\n{res['mean_auc']:.2f}",
                                fontsize=7, va="center")
    fig.suptitle("Noise-prediction std per token (RAS's score), mean over steps; red: subject outline", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="model folders, comma separated (default: both)")
    p.add_argument("--classes", default="star,heart,crescent,ring,triangle", help="one image per class")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    args = p.parse_args(argv)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    results = [run_model(f.strip(), classes, args.steps, args.guidance, args.seed, args.device)
               for f in args.models.split(",") if f.strip()]
    os.makedirs(args.out, exist_ok=True)
    plot(results, os.path.join(args.out, "noise_std_premise.png"))
    keep = [dict(r, images=[{k: v for k, v in row.items() if k not in ("image", "mean_map", "mask")}
                            for row in r["images"]]) for r in results]
    with open(os.path.join(args.out, "noise_std_premise.json"), "w") as f:
        json.dump(jsonable(dict(steps=args.steps, guidance=args.guidance, seed=args.seed, classes=classes,
                                low_share=LOW_SHARE, models=keep)), f, indent=1)
    for r in results:
        print(f"{r['model']}: mean AUC over steps {r['mean_auc']:.3f} (P(subject token std < background token std); "
              f"0.5 = no relation), AUC of the step-averaged map {r['auc_of_mean_map']:.3f}")
        for row in r["images"]:
            o = row["over_steps"]
            if o["auc"] is None:
                print(f"  {row['cls']:9s} no subject found in the final image")
                continue
            print(f"  {row['cls']:9s} subject {o['subject']:.4f}  background {o['background']:.4f}  AUC {o['auc']:.3f}  "
                  f"subject share of lowest 25 % {o['low_subject_share']:.2f} (of all {o['subject_share']:.2f})")
    return results


if __name__ == "__main__":
    main()

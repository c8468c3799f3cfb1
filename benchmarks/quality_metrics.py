"""Measurements of ``quality.py``: the image metrics of a run against the reference (PSNR, SSIM,
class accuracy), the record of a run (its compute from ``rasfx.stats``), and the paper's Table 2
comparison of RAS against dense sampling interpolated at equal compute and equal time.
"""

from __future__ import annotations

from typing import Optional

import torch

from shapes_eval import psnr, ssim  # examples/shapes_eval.py


def cfg_key(cfg) -> Optional[tuple]:
    """A hashable key of a ``RASConfig`` (None: dense sampling)."""
    return None if cfg is None else tuple(sorted((k, v) for k, v in cfg.as_dict().items()))


def image_metrics(images: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, clf) -> dict:
    """PSNR and SSIM of ``images`` against ``ref`` (means and spreads; identical images have an
    infinite PSNR and are counted apart) and the classifier's accuracy on ``labels``."""
    p = psnr(images, ref)
    finite = p[torch.isfinite(p)]
    s = ssim(images, ref)
    pred, _ = clf.predict(images * 2 - 1)
    return dict(
        psnr=float(finite.mean()) if finite.numel() else float("inf"),
        psnr_std=float(finite.std()) if finite.numel() > 1 else 0.0,
        identical=int((~torch.isfinite(p)).sum()),
        ssim=float(s.mean()), ssim_std=float(s.std()) if s.numel() > 1 else 0.0,
        class_acc=float((pred.cpu() == labels.cpu()).float().mean()),
    )


def run_record(kind: str, steps: int, ratio: Optional[float], cfg, seconds: float, n: int, st, dense_plan) -> dict:
    """The JSON record of one run: its compute (``flops_fraction`` x steps), dense steps and time."""
    if st is not None:
        frac = float(st.flops_fraction)
        dense_steps, ras_ratio = list(st.dense_steps), float(st.ras_ratio)
    else:
        frac, dense_steps, ras_ratio = 1.0, list(range(steps)), 1.0
        if cfg is not None:  # no stats (should not happen): fall back to the plan
            n_dense, shares = dense_plan
            frac = (n_dense + sum(shares)) / steps
    return dict(kind=kind, steps=steps, ratio=ratio, config=None if cfg is None else cfg_json(cfg),
                flops_fraction=frac, compute=frac * steps, dense_steps=dense_steps, ras_ratio=ras_ratio,
                seconds=seconds, ms_per_image=1e3 * seconds / n)


def cfg_json(cfg) -> dict:
    """A ``RASConfig`` as JSON (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.as_dict().items()}


def equal_compute(fidelity: list[dict]) -> list[dict]:
    """For every RAS run: the dense runs around its compute and its measured time, and the PSNR/SSIM
    difference to dense sampling interpolated at the same compute (positive: RAS better)."""
    dense = sorted((r for r in fidelity if r["kind"] == "dense"), key=lambda r: r["steps"])
    out = []
    if len(dense) < 1:
        return out
    for r in (r for r in fidelity if r["kind"] == "ras" and is_default(r)):
        row = dict(steps=r["steps"], ratio=r["ratio"], compute=r["compute"], ms_per_image=r["ms_per_image"],
                   psnr=r["psnr"], ssim=r["ssim"], class_acc=r["class_acc"])
        for axis, key in (("at_compute", "compute"), ("at_time", "ms_per_image")):
            lo = [d for d in dense if d[key] <= r[key]]
            hi = [d for d in dense if d[key] >= r[key]]
            d_lo = max(lo, key=lambda d: d[key]) if lo else None
            d_hi = min(hi, key=lambda d: d[key]) if hi else None
            interp = {}
            for m in ("psnr", "ssim"):
                if d_lo is not None and d_hi is not None:
                    span = d_hi[key] - d_lo[key]
                    w = 0.0 if span <= 0 else (r[key] - d_lo[key]) / span
                    interp[m] = d_lo[m] + w * (d_hi[m] - d_lo[m])
                else:
                    interp[m] = None  # outside the dense sweep: no equal-cost dense run
            row[axis] = dict(
                dense_below=None if d_lo is None else dict(steps=d_lo["steps"], value=d_lo[key], psnr=d_lo["psnr"], ssim=d_lo["ssim"]),
                dense_above=None if d_hi is None else dict(steps=d_hi["steps"], value=d_hi[key], psnr=d_hi["psnr"], ssim=d_hi["ssim"]),
                dense_psnr=interp["psnr"], dense_ssim=interp["ssim"],
                delta_psnr=None if interp["psnr"] is None else r["psnr"] - interp["psnr"],
                delta_ssim=None if interp["ssim"] is None else r["ssim"] - interp["ssim"],
                beats_dense_above=None if d_hi is None else (r["psnr"] > d_hi["psnr"] and r["ssim"] > d_hi["ssim"]),
            )
        out.append(row)
    return out


def is_default(r: dict) -> bool:
    """Whether run record ``r`` is RAS with the default settings (not an ablation variant)."""
    cfg = r.get("config") or {}
    default = dict(metric="std", starvation_scale=0.1, warmup=None, reset_steps=None, schedule="static", high_ratio=1.0)
    return all(cfg.get(k) == v for k, v in default.items())


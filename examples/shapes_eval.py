"""Evaluation helpers for the shipped shapes DiT, shared by ``examples/demo.py``,
``benchmarks/quality.py`` and ``docs/make_figures.py``.

* fidelity: :func:`psnr` and :func:`ssim`, per image, from torchmetrics;
* the same initial noise for every run (:func:`initial_noise`);
* where RAS spent its steps: :func:`subject_mask` (the shape in an image, estimated) and
  :func:`computed_on_subject` (mean computed steps on the shape and on the background);
* :class:`ReusedTransform`: one captured ``RASModule`` per model across ``enable`` calls;
* :func:`panel_figure`: images and heatmaps in a labelled matplotlib table, one colour scale
  and one colour bar per kind of heatmap.

Needs the ``demo`` extra (``pip install -e ".[demo]"``: torchmetrics and matplotlib).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Optional, Sequence

import torch

__all__ = ["psnr", "ssim", "initial_noise", "subject_mask", "mask_on_grid", "computed_on_subject", "ReusedTransform",
           "jsonable", "panel_figure", "Scale"]

#: SSIM window: Gaussian, sigma 1.5, 11 taps (torchmetrics takes int(3.5 sigma + 0.5) taps each side)
SSIM_SIGMA = 1.5
_SSIM_BORDER = int(3.5 * SSIM_SIGMA + 0.5)


# ----------------------------------------------------------------------------------------------
# Fidelity metrics (torchmetrics)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, data_range]; identical images give +inf."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(a.double(), b.double(), data_range=data_range, reduction="none", dim=(1, 2, 3))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004; float64) of (B, C, H, W) images in [0, data_range].

    torchmetrics' SSIM map (Gaussian window sigma 1.5, 11 taps, K1 = 0.01, K2 = 0.03), averaged over
    the positions whose window lies inside the image and over the channels: the convention of the
    paper and of scikit-image (``structural_similarity(..., gaussian_weights=True,
    use_sample_covariance=False)``). torchmetrics' own mean also counts the reflect-padded border.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _, full = structural_similarity_index_measure(a.double(), b.double(), sigma=SSIM_SIGMA, data_range=data_range,
                                                  reduction="none", return_full_image=True)
    k = _SSIM_BORDER
    return full[..., k:-k, k:-k].flatten(1).mean(1)


# ----------------------------------------------------------------------------------------------
# Runs


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) float32 N(0, I) noise, image i from a CPU generator seeded with seeds[i]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


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


def jsonable(x):
    """``x`` with non-finite floats as strings and tuples as lists, for json.dump."""
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# Where RAS computed


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


def pixel_map(stats, which: str = "computed") -> Optional[torch.Tensor]:
    """(R, H, W) float64: ``stats``' per-token values (``computed`` steps or last noise ``std``) on
    the pixels of the latent grid; ``None`` when the run recorded none."""
    values = stats.computed_steps if which == "computed" else stats.noise_std
    if values is None or stats.token_grid is None:
        return None
    return values.to(torch.float64).cpu()[:, stats.token_grid.to(torch.long).cpu()]


def mask_on_grid(mask: torch.Tensor, grid: tuple[int, ...]) -> Optional[torch.Tensor]:
    """(B, H, W) bool image-pixel mask -> (B, h, w) bool on a coarser grid (a latent grid or a
    token grid) that divides it: a cell is in the mask when at least half of its pixels are.
    ``None`` when ``grid`` does not divide (H, W)."""
    h, w = mask.shape[-2:]
    if len(grid) != 2 or h % grid[0] or w % grid[1]:
        return None
    if (h, w) == tuple(grid):
        return mask.bool()
    share = torch.nn.functional.avg_pool2d(mask.float()[:, None], (h // grid[0], w // grid[1]))[:, 0]
    return share >= 0.5


def computed_on_subject(stats, mask: torch.Tensor) -> Optional[dict]:
    """Mean number of steps that computed a pixel, on the subject and on the background.

    ``stats``: a ``rasfx.stats`` run whose latent rows are the images of ``mask`` ((R, H, W) bool,
    image pixels; brought to the latent grid by ``mask_on_grid``). Images whose mask is empty or
    full are left out.
    """
    per_pixel = pixel_map(stats, "computed")
    if per_pixel is None:
        return None
    m = mask_on_grid(mask.cpu(), tuple(per_pixel.shape[1:]))
    if m is None or m.shape[0] != per_pixel.shape[0]:
        return None
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
# Figures (matplotlib)


class Scale(dict):
    """A colour scale shared by every heatmap cell of one kind: ``Scale(vmin, vmax, label, cmap)``."""

    def __init__(self, vmin: float, vmax: float, label: str, cmap: str = "viridis") -> None:
        super().__init__(vmin=float(vmin), vmax=float(vmax), label=label, cmap=cmap)


def _as_hwc(img) -> Any:
    """(3, H, W) tensor in [0, 1] or (H, W[, 3]) array -> something ``imshow`` draws."""
    if isinstance(img, torch.Tensor):
        t = img.detach().float().cpu()
        if t.dim() == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0).clamp(0, 1)
        return t.numpy()
    return img


def panel_figure(
    rows: list[list[Any]],
    col_titles: Sequence[str],
    row_titles: Sequence[str],
    *,
    kinds: Optional[Sequence[Any]] = None,
    scales: Optional[dict[str, Scale]] = None,
    cell_titles: Optional[list[list[str]]] = None,
    outlines: Optional[Sequence[Any]] = None,
    title: str = "",
    caption: str = "",
    tile: float = 1.5,
):
    """A matplotlib figure: ``rows`` of cells (images: (3, H, W) tensors in [0, 1]; heatmaps: (H, W)
    values; ``None``: blank) under column and row titles.

    ``kinds[j]`` names the :class:`Scale` of column j (``None``: an image), or ``kinds[i][j]`` that of
    cell (i, j) when ``kinds`` is a list of per-row lists. Every heatmap of a
    kind is drawn with that one scale, and each kind gets one colour bar beside all its cells, so
    cells and rows can be compared. ``outlines[i]`` ((H, W) bool) is drawn as a white contour on
    the heatmaps of row i. ``cell_titles`` go under the cells; ``caption`` under the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_r, n_c = len(rows), len(col_titles)
    if kinds is None:
        kinds = [None] * n_c
    cell_kinds = [list(k) for k in kinds] if kinds and isinstance(kinds[0], (list, tuple)) else [list(kinds)] * n_r
    scales = scales or {}
    n_bars = len({k for row in cell_kinds for k in row if k is not None})
    width = 1.2 + tile * n_c + 0.9 * n_bars
    caption = "\n".join(textwrap.fill(par, width=int(width * 17)) for par in caption.split("\n")) if caption else ""
    cap_lines = caption.count("\n") + 1 if caption else 0
    fig = plt.figure(figsize=(width, 0.6 + (tile + 0.35) * n_r + 0.16 * cap_lines), dpi=100, layout="constrained")
    axes = fig.subplots(n_r, n_c, squeeze=False)
    mappables: dict[str, tuple[Any, list]] = {}
    for i, row in enumerate(rows):
        for j, cell in enumerate(row):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col_titles[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(row_titles[i], fontsize=9, rotation=0, ha="right", va="center")
            if cell_titles is not None and cell_titles[i][j]:
                ax.set_xlabel(cell_titles[i][j], fontsize=8)
            if cell is None:
                ax.set_frame_on(False)
                continue
            kind = cell_kinds[i][j]
            if kind is None:
                ax.imshow(_as_hwc(cell), interpolation="nearest")
                continue
            s = scales[kind]
            im = ax.imshow(_as_hwc(cell), cmap=s["cmap"], vmin=s["vmin"], vmax=s["vmax"], interpolation="nearest")
            if outlines is not None and outlines[i] is not None:
                ax.contour(_as_hwc(torch.as_tensor(outlines[i]).float()), levels=[0.5], colors="white", linewidths=0.8)
            mappables.setdefault(kind, (im, []))[1].append(ax)
    for kind, (im, kind_axes) in mappables.items():
        fig.colorbar(im, ax=kind_axes, label=scales[kind]["label"], fraction=0.05, pad=0.03)
    if title:
        fig.suptitle(title, fontsize=10)
    if caption:
        fig.supxlabel(caption, fontsize=8, x=0.01, ha="left", multialignment="left")
    return fig

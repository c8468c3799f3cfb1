"""Per-token heatmaps of a RAS run (paper Figures 10 and 11), drawn with matplotlib (the
``plot`` extra: ``pip install 'rasfx[plot]'``).

Colours are matplotlib's ``viridis`` on one scale per kind of map, shared by every row of a
run, so that maps can be compared: ``computed`` (steps each token was computed) from 0 to the
run's step count, ``std`` (the last step's noise std per token) from the lowest to the highest
value of any row. ``vmin`` / ``vmax`` set another scale (e.g. one shared by several runs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from .errors import ToolMissingError, UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL.Image import Image

    from .run_stats import RunStats

__all__ = ["heatmap_figure", "heatmap_image", "save_heatmap"]

PLOT_EXTRA_HINT = "pip install 'rasfx[plot]' (or pip install matplotlib)"
#: what each kind of map shows: (column title, colour bar label)
LABELS = {"computed": ("computed steps", "steps"), "std": ("noise std", "std of the last step")}


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.figure  # noqa: F401  (the Figure class, without pyplot's global state)
    except ImportError:
        raise ToolMissingError(f"rasfx draws heatmaps with matplotlib, which is not installed: {PLOT_EXTRA_HINT}") from None
    return matplotlib


def _mosaic(frames: torch.Tensor) -> torch.Tensor:
    """``[F, H, W]`` -> ``[rows * H, cols * W]`` tiled row-major; unused tiles take the minimum."""
    f, h, w = frames.shape
    cols = int(math.ceil(math.sqrt(f)))
    rows = int(math.ceil(f / cols))
    out = torch.full((rows * h, cols * w), float(frames.min()), dtype=frames.dtype)
    for k in range(f):
        r, c = divmod(k, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = frames[k]
    return out


def _grid(stats: RunStats, which: str, row: int, frame: Optional[int]) -> torch.Tensor:
    grid = stats.grid_map(which, row)
    if grid.dim() == 3:
        grid = _mosaic(grid) if frame is None else grid[frame]
    elif grid.dim() != 2:
        raise UsageError(f"cannot draw a token grid of shape {tuple(grid.shape)}")
    return grid


def color_scale(stats: RunStats, which: str, vmin: Optional[float] = None,
                vmax: Optional[float] = None) -> tuple[float, float]:
    """The colour scale of ``which`` maps of a run (see the module doc)."""
    if vmin is None or vmax is None:
        if which == "computed":
            lo, hi = 0.0, float(stats.num_steps)
        else:
            values = torch.stack([stats.token_values(which, r) for r in range(_rows(stats, which))])
            lo, hi = float(values.min()), float(values.max())
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    if not vmax > vmin:  # a constant map: mid-scale
        vmin, vmax = vmin - 0.5, vmin + 0.5
    return float(vmin), float(vmax)


def _rows(stats: RunStats, which: str) -> int:
    values = stats.computed_steps if which == "computed" else stats.noise_std
    if values is None:
        stats.token_values(which)  # raises the UsageError that says why
    return int(values.shape[0]) if values is not None else 0


def heatmap_image(
    stats: RunStats,
    which: str = "computed",
    *,
    row: int = 0,
    frame: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
) -> Image:
    """A PIL image of a per-token map, upsampled (nearest) to image resolution, without a
    colour bar (a tile for image grids; :func:`heatmap_figure` draws the colour bars).

    ``which``: ``"computed"`` (steps each token was computed, Figure 10) or ``"std"`` (last noise
    std, Figure 11). Video grids ``[F, H, W]`` show frame ``frame``, or a mosaic of all latent frames
    when ``frame`` is None. ``size`` = ``(width, height)`` overrides the output size (default: the
    latent grid times ``stats.pixel_scale``). Colours: see the module doc.
    """
    from PIL import Image

    mpl = _matplotlib()
    lo, hi = color_scale(stats, which, vmin, vmax)
    grid = _grid(stats, which, row, frame)
    rgba = mpl.colormaps["viridis"](mpl.colors.Normalize(lo, hi, clip=True)(grid.numpy()), bytes=True)
    img = Image.fromarray(rgba[..., :3])
    scale = max(1, int(stats.pixel_scale))
    width, height = (img.width * scale, img.height * scale) if size is None else size
    return img.resize((int(width), int(height)), resample=Image.Resampling.NEAREST)


def heatmap_figure(
    stats: RunStats,
    which: Union[str, Sequence[str]] = ("computed", "std"),
    *,
    rows: Optional[Sequence[int]] = None,
    frame: Optional[int] = None,
    row_titles: Optional[Sequence[str]] = None,
    tile_inches: float = 1.6,
) -> Figure:
    """A matplotlib ``Figure`` of per-token maps: one row per latent row (``rows``, default all),
    one column per kind in ``which``, each column on its shared scale with one colour bar."""
    _matplotlib()
    from matplotlib.figure import Figure

    kinds = [which] if isinstance(which, str) else list(which)
    rows = list(range(_rows(stats, kinds[0]))) if rows is None else list(rows)
    if not rows or not kinds:
        raise UsageError("heatmap_figure needs at least one row and one kind of map")
    fig = Figure(figsize=((tile_inches + 1.1) * len(kinds), tile_inches * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), len(kinds), squeeze=False)
    for j, kind in enumerate(kinds):
        lo, hi = color_scale(stats, kind)
        images = []
        for i, r in enumerate(rows):
            ax = axes[i][j]
            images.append(ax.imshow(_grid(stats, kind, r, frame).numpy(), cmap="viridis", vmin=lo, vmax=hi,
                              interpolation="nearest"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(LABELS.get(kind, (kind, ""))[0], fontsize=9)
            if j == 0 and row_titles is not None:
                ax.set_ylabel(row_titles[i], fontsize=8)
        bar = fig.colorbar(images[-1], ax=[axes[i][j] for i in range(len(rows))], shrink=0.9)
        bar.set_label(LABELS.get(kind, ("", kind))[1] + (f" (of {stats.num_steps})" if kind == "computed" else ""),
                      fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def save_heatmap(
    stats: RunStats,
    path: Union[str, PathLike],
    which: str = "computed",
    *,
    row: int = 0,
    frame: Optional[int] = None,
    size: Optional[tuple[int, int]] = None,
    colorbar: bool = True,
) -> str:
    """Write one map as a PNG to ``path``; returns the path. With ``colorbar`` (default) a
    matplotlib figure of the map and its labelled colour bar (``size``: the map's size in
    pixels, about); without, the pixels of :func:`heatmap_image` (exactly ``size``)."""
    if not colorbar:
        heatmap_image(stats, which, row=row, frame=frame, size=size).save(path, format="PNG")
        return str(path)
    dpi = 100
    fig = heatmap_figure(stats, which, rows=[row], frame=frame)
    if size is not None:
        fig.set_size_inches(size[0] / dpi * 1.6, size[1] / dpi * 1.15)
    fig.savefig(path, format="png", dpi=dpi)
    return str(path)

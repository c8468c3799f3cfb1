"""Procedural "shapes" dataset: detailed foreground objects over smooth or mildly textured backgrounds.

This is the training data of rasfx's small demo DiT (``models/shapes-dit``). It is made for what
region-adaptive sampling is about: every image has one detailed, sharp-edged foreground object
(a textured, often outlined shape) that covers a part of the frame, over a background that is a
smooth gradient or only mildly textured. RAS should spend its compute on the object.

Everything is rendered in pure torch with signed distance functions (SDFs), vectorised over the
batch (no Python loop per image), so it runs on CPU or GPU; a batch of 256 images takes a few
milliseconds on a GPU. Randomness comes only from the ``torch.Generator`` passed in, so a seed
gives the same images on the same device.

Images are ``(B, 3, 64, 64)`` float32 RGB in ``[-1, 1]``, labels are ``(B,)`` int64 class ids
(see ``CLASS_NAMES``), captions are short strings such as ``"a red striped star"``.

Example::

    g = torch.Generator(device="cuda").manual_seed(0)
    batch = generate_shapes(256, generator=g)          # batch.images: (256, 3, 64, 64)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

__all__ = [
    "CLASS_NAMES",
    "COLOR_NAMES",
    "NUM_CLASSES",
    "TEXTURE_NAMES",
    "ShapesBatch",
    "caption_to_label",
    "generate_shapes",
    "make_generator",
    "save_image_grid",
]

# Class ids are the positions in this tuple.
CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "heart",
    "crescent",
    "diamond",
    "hexagon",
)
NUM_CLASSES = len(CLASS_NAMES)

# Saturated foreground palette (RGB in [0, 1]); each colour gets a small random jitter.
_PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.96, 0.52, 0.06),
    "yellow": (0.96, 0.86, 0.12),
    "green": (0.12, 0.68, 0.20),
    "cyan": (0.10, 0.80, 0.86),
    "blue": (0.12, 0.26, 0.90),
    "purple": (0.56, 0.16, 0.80),
    "pink": (0.96, 0.42, 0.72),
    "white": (0.96, 0.96, 0.96),
}
COLOR_NAMES: tuple[str, ...] = tuple(_PALETTE)

# Fill textures of the foreground; "" (solid) is left out of captions.
TEXTURE_NAMES: tuple[str, ...] = ("solid", "striped", "checkered", "dotted", "banded")


@dataclass
class ShapesBatch:
    """One generated batch."""

    images: torch.Tensor  # (B, 3, H, W) float32 in [-1, 1]
    labels: torch.Tensor  # (B,) int64 class ids into CLASS_NAMES
    captions: list[str] | None  # B strings, e.g. "a red striped star" (None if not asked for)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A seeded ``torch.Generator`` on ``device`` (the generator's device is where images are made)."""
    return torch.Generator(device=device).manual_seed(int(seed))


def caption_to_label(caption: str) -> int:
    """Class id of the shape named in a caption (``"a red striped star"`` -> 3).

    Raises ``ValueError`` when the caption names no known shape.
    """
    words = re.findall(r"[a-z]+", caption.lower())
    for word in reversed(words):  # the noun comes last in our captions
        name = word[:-1] if word.endswith("s") and word[:-1] in CLASS_NAMES else word
        if name in CLASS_NAMES:
            return CLASS_NAMES.index(name)
    raise ValueError(f"no known shape in caption {caption!r}; known: {', '.join(CLASS_NAMES)}")


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 8, padding: int = 2) -> None:
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid with ``nrow`` images per row (PIL only)."""
    from PIL import Image

    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = imgs.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    canvas = torch.full((3, nrows * (h + padding) + padding, ncol * (w + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        y0, x0 = padding + r * (h + padding), padding + c * (w + padding)
        canvas[:, y0 : y0 + h, x0 : x0 + w] = imgs[i]
    Image.fromarray(canvas.permute(1, 2, 0).numpy()).save(path)


# --------------------------------------------------------------------------------------------
# Signed distance functions. Inputs u, v: (B, H, W) local object coordinates (y up), the object
# spans roughly [-1, 1]. Output: (B, H, W) signed distance in the same units, negative inside.
# Formulas after Inigo Quilez, https://iquilezles.org/articles/distfunctions2d/
# --------------------------------------------------------------------------------------------


def _length(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(u * u + v * v + 1e-12)


def _sd_box(u: torch.Tensor, v: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    qx, qy = u.abs() - bx, v.abs() - by
    return _length(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _sd_circle(u, v):
    return _length(u, v) - 0.9


def _sd_square(u, v):
    return _sd_box(u, v, 0.72, 0.72)


def _sd_triangle(u, v):
    # Equilateral triangle, apex up, circumradius 1 (r = half side).
    r, k = 0.866, math.sqrt(3.0)
    v = v + 0.1  # optical centring
    px, py = u.abs() - r, v + r / k
    fold = (px + k * py) > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - px.clamp(-2 * r, 0.0)
    return -_length(px, py) * torch.sign(py)


def _sd_star(u, v):
    # Five-pointed star, outer radius 1, inner-ratio rf.
    r, rf = 1.0, 0.45
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = u.abs(), v + 0.05
    d = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * d * k1x, py - 2 * d * k1y
    d = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * d * k2x, py - 2 * d * k2y
    px, py = px.abs(), py - r
    bax, bay = rf * -k1y, rf * k1x - 1.0
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(0.0, r)
    return _length(px - bax * h, py - bay * h) * torch.sign(py * bax - px * bay)


def _sd_ring(u, v):
    return (_length(u, v) - 0.68).abs() - 0.24


def _sd_cross(u, v):
    return torch.minimum(_sd_box(u, v, 0.88, 0.27), _sd_box(u, v, 0.27, 0.88))


def _sd_heart(u, v):
    s = 1.6  # IQ's heart spans y in [0, 1.1]; scale it to ~[-0.88, 0.88]
    px, py = u.abs() / s, (v + 0.88) / s
    upper = _length(px - 0.25, py - 0.75) - math.sqrt(2.0) / 4
    m = 0.5 * (px + py).clamp(min=0)
    d2 = torch.minimum(px * px + (py - 1.0) ** 2, (px - m) ** 2 + (py - m) ** 2)
    lower = torch.sqrt(d2 + 1e-12) * torch.sign(px - py)
    return torch.where(py + px > 1.0, upper, lower) * s


def _sd_crescent(u, v):
    return torch.maximum(_length(u, v) - 0.92, -(_length(u - 0.45, v - 0.15) - 0.74))


def _sd_diamond(u, v):
    a, b = 0.6, 1.0  # half width, half height: clearly taller than wide (not a rotated square)
    return (u.abs() * b + v.abs() * a - a * b) / math.sqrt(a * a + b * b)


def _sd_hexagon(u, v):
    r = 0.8  # apothem
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    px, py = u.abs(), v.abs()
    d = (kx * px + ky * py).clamp(max=0)
    px, py = px - 2 * d * kx, py - 2 * d * ky
    px = px - px.clamp(-kz * r, kz * r)
    py = py - r
    return _length(px, py) * torch.sign(py)


_SDFS = (
    _sd_circle,
    _sd_square,
    _sd_triangle,
    _sd_star,
    _sd_ring,
    _sd_cross,
    _sd_heart,
    _sd_crescent,
    _sd_diamond,
    _sd_hexagon,
)
assert len(_SDFS) == NUM_CLASSES


def _uniform(shape, lo, hi, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=generator, device=device)


@torch.no_grad()
def generate_shapes(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    labels: torch.Tensor | list[int] | None = None,
    image_size: int = 64,
    with_captions: bool = True,
) -> ShapesBatch:
    """Render ``batch_size`` random images.

    Args:
        batch_size: B.
        generator: source of all randomness (its device is used when ``device`` is None).
        device: where to render; defaults to the generator's device, else CPU.
        labels: optional (B,) class ids to render; random uniform classes when None.
        image_size: H = W (64 for the shipped model).
        with_captions: build the caption strings (one host sync); off for training loops.

    Returns:
        ShapesBatch(images (B, 3, H, W) in [-1, 1], labels (B,) int64, captions list or None).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    B, H, W = int(batch_size), int(image_size), int(image_size)
    g = generator

    def rnd(lo, hi, *shape):  # (B, *shape) uniform
        return _uniform((B, *shape), lo, hi, g, device)

    # ---- per-image random parameters (drawn in a fixed order for reproducibility) ----
    if labels is None:
        labels_t = torch.randint(0, NUM_CLASSES, (B,), generator=g, device=device)
    else:
        labels_t = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(B)
        if labels_t.numel() and (labels_t.min() < 0 or labels_t.max() >= NUM_CLASSES):
            raise ValueError(f"labels must be in [0, {NUM_CLASSES})")
    cx, cy = rnd(-0.26, 0.26, 1, 1), rnd(-0.26, 0.26, 1, 1)  # (B,1,1) object centre
    scale = rnd(0.44, 0.66, 1, 1)  # (B,1,1) object radius in image units ([-1, 1] frame)
    theta = rnd(-0.45, 0.45, 1, 1)  # (B,1,1) rotation, radians
    color_idx = torch.randint(0, len(COLOR_NAMES), (B,), generator=g, device=device)
    color2_off = torch.randint(1, len(COLOR_NAMES), (B,), generator=g, device=device)
    texture_idx = torch.randint(0, len(TEXTURE_NAMES), (B,), generator=g, device=device)
    tex_freq = rnd(2.2, 4.5, 1, 1)  # (B,1,1) texture periods per object unit
    tex_angle = rnd(0.0, math.pi, 1, 1)
    has_outline = (rnd(0, 1, 1, 1) < 0.6).float()  # (B,1,1)
    outline_px = rnd(1.0, 2.4, 1, 1)  # outline width in pixels
    outline_dark = (rnd(0, 1, 1, 1, 1) < 0.7).float()  # (B,1,1,1) dark vs white outline
    jitter = rnd(-0.06, 0.06, 2, 3, 1, 1)  # (B,2,3,1,1) colour jitter of colour 1 and 2
    bg_type = torch.randint(0, 3, (B,), generator=g, device=device)  # linear / radial / textured
    bg_cols = rnd(0.2, 0.85, 2, 3)  # (B,2,3) two background colours
    bg_angle = rnd(0.0, 2 * math.pi, 1, 1)
    bg_centre = rnd(-0.8, 0.8, 2, 1, 1)  # (B,2,1,1) radial gradient centre
    bg_noise = torch.rand((B, 3, 8, 8), generator=g, device=device)  # low-frequency value noise
    bg_noise_amp = rnd(0.04, 0.10, 1, 1, 1)
    bg_line_freq = rnd(6.0, 14.0, 1, 1)
    grain = torch.randn((B, 1, H, W), generator=g, device=device)

    # ---- pixel grid, y up: (1, H, W) in [-1, 1] ----
    ys = 1.0 - (torch.arange(H, device=device, dtype=torch.float32) + 0.5) * (2.0 / H)
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) * (2.0 / W) - 1.0
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    x, y = x[None], y[None]  # (1, H, W)

    # ---- background: (B, 3, H, W) in [0, 1] ----
    bg_cols = 0.55 * bg_cols + 0.45 * bg_cols.mean(dim=2, keepdim=True)  # desaturate (muted)
    ca, cb = bg_cols[:, 0, :, None, None], bg_cols[:, 1, :, None, None]  # (B,3,1,1)
    lin = (0.5 + 0.5 * (x * torch.cos(bg_angle) + y * torch.sin(bg_angle)) / math.sqrt(2)).clamp(0, 1)
    rad = (_length(x - bg_centre[:, 0], y - bg_centre[:, 1]) / 2.0).clamp(0, 1)
    ramp = torch.where((bg_type == 1)[:, None, None], rad, lin)[:, None]  # (B,1,H,W)
    bg = ca + (cb - ca) * ramp
    bg_noise = 0.7 * bg_noise.mean(dim=1, keepdim=True) + 0.3 * bg_noise  # mostly luminance noise
    noise = torch.nn.functional.interpolate(bg_noise, size=(H, W), mode="bicubic", align_corners=False)
    lines = torch.sin(bg_line_freq * math.pi * (x + y))[:, None]  # faint diagonal weave
    texture = bg_noise_amp * ((noise - 0.5) * 2.0 + 0.25 * lines) + 0.012 * grain
    bg = bg + texture * (bg_type == 2).float()[:, None, None, None]

    # ---- object-local coordinates (B, H, W), object spans ~[-1, 1] ----
    c, s = torch.cos(theta), torch.sin(theta)
    dx, dy = x - cx, y - cy
    u = (c * dx + s * dy) / scale
    v = (-s * dx + c * dy) / scale

    # ---- signed distance of the chosen shape, in pixels ----
    sdf_all = torch.stack([f(u, v) for f in _SDFS])  # (K, B, H, W)
    d = sdf_all[labels_t, torch.arange(B, device=device)]  # (B, H, W)
    d_px = d * scale * (W / 2.0)
    alpha = (0.5 - d_px).clamp(0, 1)  # anti-aliased coverage

    # ---- fill texture mask m in [0, 1] (B, H, W), in object coordinates ----
    ta, tb = torch.cos(tex_angle), torch.sin(tex_angle)
    f = tex_freq * math.pi
    sharp = 3.0  # > 1: crisp edges, still anti-aliased
    stripes = torch.sin(f * (ta * u + tb * v))
    checker = torch.sin(f * u) * torch.sin(f * v) * 2.0
    gu = u * tex_freq * 0.8
    gv = v * tex_freq * 0.8
    gu, gv = gu - torch.round(gu), gv - torch.round(gv)
    dots = (0.28 - _length(gu, gv)) * 8.0
    bands = torch.sin(f * _length(u, v) * 1.2)
    solid = torch.full_like(u, -1.0)
    tex_all = torch.stack([solid, stripes, checker, dots, bands])  # (T, B, H, W)
    m = (0.5 + sharp * tex_all[texture_idx, torch.arange(B, device=device)]).clamp(0, 1)

    # ---- colours (B, 3, 1, 1) ----
    pal = torch.tensor(list(_PALETTE.values()), device=device, dtype=torch.float32)  # (C, 3)
    color2_idx = (color_idx + color2_off) % len(COLOR_NAMES)
    c1 = (pal[color_idx][:, :, None, None] + jitter[:, 0]).clamp(0, 1)
    c2 = (pal[color2_idx][:, :, None, None] + jitter[:, 1]).clamp(0, 1)
    shade = (1.0 - 0.18 * (u + 0.5 * v).clamp(-1.5, 1.5) / 1.5)[:, None]  # soft lighting (B,1,H,W)
    fill = (c1 + (c2 - c1) * m[:, None]) * shade
    outline_col = outline_dark * 0.06 + (1 - outline_dark) * 0.97  # (B,1,1,1)
    ol = ((d_px + outline_px + 0.5).clamp(0, 1) * has_outline)[:, None]  # (B,1,H,W)
    fg = fill + (outline_col - fill) * ol

    img = bg + (fg - bg) * alpha[:, None]
    img = (img * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()  # (B, 3, H, W) in [-1, 1]

    captions = None
    if with_captions:
        rows = torch.stack([labels_t, color_idx, texture_idx, has_outline.view(B).long()], 1).tolist()
        captions = []
        for lab, col, tex, outl in rows:
            tex_word = "" if tex == 0 else TEXTURE_NAMES[tex] + " "
            cap = f"a {COLOR_NAMES[col]} {tex_word}{CLASS_NAMES[lab]}"
            captions.append(cap + (" with an outline" if outl else ""))
    return ShapesBatch(images=img, labels=labels_t, captions=captions)


if __name__ == "__main__":  # python examples/shapes_data.py out.png  -> a labelled preview grid
    import sys
    import time

    gen = make_generator(0)
    batch = generate_shapes(NUM_CLASSES * 8, generator=gen, labels=torch.arange(NUM_CLASSES).repeat_interleave(8))
    t0 = time.perf_counter()
    generate_shapes(256, generator=gen, with_captions=False)
    print(f"256 images on CPU: {1e3 * (time.perf_counter() - t0):.1f} ms")
    print("\n".join(batch.captions[::8]))
    save_image_grid(batch.images, sys.argv[1] if len(sys.argv) > 1 else "shapes_preview.png", nrow=8)

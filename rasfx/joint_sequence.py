"""Second-resolution candidates for a model whose pipeline builds the inputs over one joint
sequence ``[prefix, image]`` (OmniGen: ``[text, time, image]``, ``S = T + 1 + N``): position ids
``[B, S]`` and a square attention mask ``[B, S, S]`` (or ``[B, 1, S, S]``) passed in, the image
tokens last. Their image part must follow the image to another size the way the pipeline builds it,
not as random values: the positions go on counting (OmniGen's processor numbers
``text, time, image`` with one ``arange`` after the left padding), and every image token's mask row
and column are the same (the image block attends to the prefix and to itself bidirectionally; the
prefix sees no image token), so one image token's row and column stand for all of them.

``joint_sequence_candidates`` is tried only after every other candidate kind failed (see
``planned_capture._analysis_captures``): models that capture without it are analysed as before.
"""

from __future__ import annotations

from typing import Any

import torch

from .second_resolution import LATE_GRID_STEPS, _frames, _resized


def _image_part_step(rows: torch.Tensor, n: int) -> torch.Tensor | None:
    """Per-row step ``d`` [B, 1] when the last ``n`` entries of each row of ``rows`` [B, S] count on
    as ``a + k * d`` (``d`` may be 0: one position for the whole image); None otherwise."""
    part = rows[:, -n:]
    step = part[:, 1:2] - part[:, :1] if n > 1 else torch.zeros_like(part[:, :1])
    expect = part[:, :1] + torch.arange(n, dtype=rows.dtype, device=rows.device) * step
    return step if bool((part == expect).all()) else None


def _positions(t: torch.Tensor, n: int, n2: int) -> torch.Tensor | None:
    """Position ids ``t`` [B, S] (integers, ``S > n``) with their image part (the last ``n``)
    continued to ``n2`` entries, or None when ``t`` is no such table."""
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 2 or int(t.shape[1]) <= n:
        return None
    step = _image_part_step(t, n)
    if step is None:
        return None
    image = t[:, -n:-n + 1] + torch.arange(n2, dtype=t.dtype, device=t.device) * step
    return torch.cat([t[:, :-n], image], dim=1)


def _square_mask(t: torch.Tensor, n: int, n2: int) -> torch.Tensor | None:
    """A mask ``t`` [..., S, S] (``S > n``) whose last ``n`` rows are all equal and whose last ``n``
    columns are all equal, with its image rows and columns repeated to ``n2`` of each; None when
    ``t`` is no such mask."""
    if t.dim() < 3 or t.shape[-1] != t.shape[-2] or int(t.shape[-1]) <= n:
        return None
    p = int(t.shape[-1]) - n
    if not (bool((t[..., p:, :] == t[..., p:p + 1, :]).all()) and bool((t[..., :, p:] == t[..., :, p:p + 1]).all())):
        return None
    index = torch.cat([torch.arange(p), torch.full((n2,), p)]).to(t.device)
    return t.index_select(-2, index).index_select(-1, index)


def _resize_joint(kwargs: dict, new: dict, image_key: str, n: int, n2: int) -> dict | None:
    """``new`` with every other input of ``kwargs`` that is a joint-sequence position table or square
    mask over ``n`` image tokens (batch first, like the image) resized to ``n2`` of them; None when
    there is none."""
    batch = int(kwargs[image_key].shape[0])
    out = dict(new)
    for key, value in kwargs.items():
        if key == image_key or not isinstance(value, torch.Tensor) or value.dim() < 2 or int(value.shape[0]) != batch:
            continue
        resized = _positions(value, n, n2)
        resized = _square_mask(value, n, n2) if resized is None else resized
        if resized is not None:
            out[key] = resized
    return out if any(out[k] is not new[k] for k in new) else None


def joint_sequence_candidates(kwargs: dict, image_key: str) -> list[tuple[dict, dict]]:
    """Candidates with the image input resized (to a few other grids, or a packed ``[B, N, C]``
    sequence to other lengths) and the inputs over a joint sequence whose image tokens come last
    resized with it (``_positions``, ``_square_mask``), for each token count the image may have
    (patch sizes 1, 2, 4, 8 and the frame counts of a video). Conservative: the image tokens are the
    last ``N`` of the joint sequence and one tensor input (not lists) carries the image."""
    x = kwargs[image_key]
    if not isinstance(x, torch.Tensor) or x.dim() < 3:
        return []
    out: list[tuple[dict, dict]] = []
    if x.dim() == 3:
        n = int(x.shape[1])
        for n2 in (n + max(4, n // 2), 2 * n):
            new = dict(kwargs, **{image_key: _resized(x, {1: n2})})
            resized = _resize_joint(kwargs, new, image_key, n, n2)
            if resized is not None:
                out.append((resized, {"mode": "packed", "n": n, "n2": n2, "resized": _RESIZED}))
        return out
    h, w = int(x.shape[-2]), int(x.shape[-1])
    for dh, dw in LATE_GRID_STEPS:
        h2, w2 = h + dh, w + dw
        if h2 <= 0 or w2 <= 0:
            continue
        new = dict(kwargs, **{image_key: _resized(x, {x.dim() - 2: h2, x.dim() - 1: w2})})
        desc: dict[str, Any] = {"mode": "grid", "hw": (h, w), "hw2": (h2, w2), "batch": int(x.shape[0]),
                                "resized": _RESIZED}
        for p in (1, 2, 4, 8):
            if h % p or w % p or h2 % p or w2 % p:
                continue
            for f in sorted(_frames(x, False)):
                n, n2 = f * (h // p) * (w // p), f * (h2 // p) * (w2 // p)
                resized = _resize_joint(kwargs, new, image_key, n, n2) if n > 1 else None
                if resized is not None:
                    out.append((resized, desc))
    return out


_RESIZED = "the position ids and square masks over a joint [prefix, image] sequence"


"""A second resolution of a call's inputs, for the token analysis (``passes.token_analysis``).

The token analysis compares two captures of one forward: this module finds the image input
of a call and builds candidate inputs at another size (``second_resolution_candidates``): the image input
resized, and with it every input that carries per-token data (position tables, masks over a
joint text + image sequence, grid sizes passed as ints or tuples), first with narrow guesses,
then wider ones and other input layouts. A model that pads its tokens to a multiple (found by
``token_padding`` in the two captures) is analysed at a size that keeps its padding
(``padding_neutral_candidates``). When none of these captures, ``image_grid_candidates`` also
resizes the other inputs on the image's grid (pose or control latents, masks over the latent
grid), and then ``patchified_candidates`` takes the image input for one the pipeline patchified
already (tokens in dim 1, each token's patch pixels in the trailing dims). ``resized_model``
makes a model built for one input size look built for the other one during that capture.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterator, cast

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from .errors import CaptureError, RasfxError
from .passes.token_analysis import align, find_token_count


# the (dH, dW) of the grids tried by the candidate kinds tried late (after second_resolution_candidates)
LATE_GRID_STEPS = ((8, 16), (-8, -16), (16, 8))
IMAGE_INPUT_NAMES = ("hidden_states", "x", "sample", "latents", "img", "image")


def _is_image(value: Any) -> bool:
    """A tensor of rank >= 3, or a list / tuple of them (per-sample inputs, as the original
    Wan code takes ``x: list[Tensor]``)."""
    if isinstance(value, torch.Tensor):
        return value.dim() >= 3
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(v, torch.Tensor) and v.dim() >= 3 for v in value))


def image_batch(x: Any) -> int:
    """The batch size of an image input: its first dim, or the number of per-sample tensors."""
    return len(x) if isinstance(x, (list, tuple)) else int(x.shape[0])


def find_image_input(kwargs: dict, name: str | None = None) -> str:
    """Name of the input that carries the image (or video) tokens."""
    if name is not None:
        if name not in kwargs or not _is_image(kwargs[name]):
            raise CaptureError(
                f"image input {name!r} is not a tensor argument of rank >= 3 (or a list of them) of this call; "
                f"got {sorted(kwargs)}"
            )
        return name
    for cand in IMAGE_INPUT_NAMES:
        if _is_image(kwargs.get(cand)):
            return cand
    for key, value in kwargs.items():
        if _is_image(value):
            return key
    raise CaptureError(
        "found no image input (a tensor of rank >= 3: [B, C, H, W], [B, C, F, H, W] or packed [B, N, C], or a "
        f"list of per-sample tensors); inputs were {sorted(kwargs)}. Pass TransformConfig(image_input=...) to name it."
    )


def _frames(x: torch.Tensor, per_sample: bool) -> set[int]:
    """Candidate frame counts of an image input: 1 for images; for video latents
    ([B, C, F, H, W] or [B, F, C, H, W], per sample without B) either dim before H, W."""
    lead = x.shape[:-2] if per_sample else x.shape[1:-2]
    return {1} if len(lead) <= 1 else {int(s) for s in lead}


def _resized(t: torch.Tensor, sizes: dict[int, int]) -> torch.Tensor:
    shape = list(t.shape)
    for d, s in sizes.items():
        shape[d] = s
    if t.is_floating_point() or t.is_complex():
        return torch.randn(shape, dtype=t.dtype, device=t.device)
    return torch.zeros(shape, dtype=t.dtype, device=t.device)


def _resize_token_tables(kwargs: dict, new: dict, image_key: str, counts, row_counts=()) -> dict:
    """Copy of ``new`` where tensors (also inside tuples/lists, e.g. RoPE (cos, sin)) whose
    non-feature dims equal a token count ``n1`` get ``n2`` there. ``row_counts``: lengths of a
    joint text + image sequence, also looked for in the last dim of int/bool tensors and of
    per-sample rows ``[B, L]`` (a mask over the joint sequence, as Chroma passes it)."""
    batch = image_batch(kwargs[image_key])
    ints = {n1: n2 for n1, n2 in counts if n1 > 1}

    def resize(t):
        if type(t) is int and t in ints:  # a sequence length passed as an int (original Wan's seq_len)
            return ints[t]
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            return t
        sizes = {d: n2 for n1, n2 in counts for d, s in enumerate(t.shape[:-1]) if s == n1 and n1 > 1}
        row = not (t.is_floating_point() or t.is_complex()) or (t.dim() == 2 and t.shape[0] == batch)
        if row:
            sizes.update({t.dim() - 1: n2 for n1, n2 in row_counts if t.shape[-1] == n1})
        return _resized(t, sizes) if sizes else t

    out = dict(new)
    for key, value in kwargs.items():
        if key != image_key:
            resized = pytree.tree_map(resize, value)
            if any(a is not b for a, b in zip(pytree.tree_leaves(resized), pytree.tree_leaves(value))):
                out[key] = resized
    return out


def _grid_tuple(v: Any) -> bool:
    """A tuple of two or more positive ints (a grid passed as ``(frames, h, w)``)."""
    return isinstance(v, tuple) and len(v) >= 2 and all(type(i) is int and i > 0 for i in v)


def _resize_everything(kwargs: dict, new: dict, image_key: str, counts, sides) -> dict:
    """A wider guess than ``_resize_token_tables``, tried after it: per-token data in any
    form a pipeline passes it. Every dim of an int / bool tensor, and every non-last dim of a
    float one, equal to a token count (image or joint text + image) follows it (token ids
    [B, N], a float position table [T + N, 3]); a 1-D or 2-D tensor whose first dim is a
    grid side (per-axis RoPE tables [gh, d], aranges [gw]) follows that side; tuples of ints
    ending in the grid (``img_shapes=[[(1, h, w)]]``) get the new grid, and so do lists of
    per-axis tables ending in the grid's (Kandinsky 5's ``[arange(F), arange(gh), arange(gw)]``:
    the frame table stays, even when F equals a side). Where such a list is passed, it holds
    the grid's tables: no other tensor is taken for one (Kandinsky's text positions
    ``arange(T)`` stay when T equals a side)."""
    sizes_of = {a: b for a, b in counts if a > 1}
    batch = image_batch(kwargs[image_key])
    grid = {a: b for a, b in sides}
    per_axis = {k for k, v in kwargs.items() if k != image_key and _per_axis_tables(v, grid)}
    side_of: dict[int, int] = {}
    for (a, b), (a2, b2) in sides if not per_axis else ():
        side_of.setdefault(a, a2)
        side_of.setdefault(b, b2)

    def resize(t):
        if isinstance(t, tuple) and len(t) >= 2 and all(type(v) is int for v in t) and tuple(t[-2:]) in grid:
            return (*t[:-2], *grid[tuple(t[-2:])])
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        floating = t.is_floating_point() or t.is_complex()
        dims = range(t.dim() - 1) if floating and t.dim() > 1 else range(t.dim())
        sizes = {d: sizes_of[int(t.shape[d])] for d in dims if int(t.shape[d]) in sizes_of}
        if not sizes and t.dim() <= 2 and int(t.shape[0]) in side_of and int(t.shape[0]) != batch:
            sizes = {0: side_of[int(t.shape[0])]}
        return _resized(t, sizes) if sizes else t

    def resize_axes(tables):
        lead, (th, tw) = tables[:-2], tables[-2:]
        sides2 = grid[(int(th.shape[0]), int(tw.shape[0]))]
        return type(tables)([*lead, _resized(th, {0: sides2[0]}), _resized(tw, {0: sides2[1]})])

    out = dict(new)
    for key, value in kwargs.items():
        if key in per_axis:
            out[key] = resize_axes(value)
        elif key != image_key:
            resized = pytree.tree_map(resize, value, is_leaf=_grid_tuple)
            before, after = pytree.tree_leaves(value, is_leaf=_grid_tuple), pytree.tree_leaves(resized, is_leaf=_grid_tuple)
            if any(a is not b for a, b in zip(after, before)):
                out[key] = resized
    return out


def _lengths(kwargs: dict, image_key: str) -> tuple[list[int], list[int]]:
    """Conditioning lengths T (dim 1 of the other inputs): masks over a joint sequence are
    T + N long. The first list: inputs [B, T, D]; the second, for the wider guesses, also
    conditioning of other ranks ([B, T, 2, D] text states)."""
    others = [v for k, v in kwargs.items() if k != image_key and isinstance(v, torch.Tensor)]
    return (sorted({int(v.shape[1]) for v in others if v.dim() == 3}),
            sorted({int(v.shape[1]) for v in others if v.dim() >= 3}))


def _per_axis_tables(value: Any, grid: dict) -> bool:
    """A list / tuple of 1-D or 2-D tensors whose last two are as long as the sides of a grid of ``grid``."""
    return (isinstance(value, (list, tuple)) and len(value) >= 2
            and all(isinstance(t, torch.Tensor) and 1 <= t.dim() <= 2 for t in value)
            and (int(value[-2].shape[0]), int(value[-1].shape[0])) in grid)


def second_resolution_candidates(kwargs: dict, image_key: str) -> list[tuple[dict, dict]]:
    """Candidate inputs at another resolution, each with a description
    {"mode": "grid"|"packed", sizes before/after}. Tried in order until one captures."""
    x = kwargs[image_key]
    samples = list(x) if isinstance(x, (list, tuple)) else None  # per-sample tensors, unbatched
    if samples is not None:
        x = samples[0]
        if not all(u.shape == x.shape for u in samples) or x.dim() < 3:
            return []  # per-sample sizes that differ, or packed samples: not analysed
    candidates: list[tuple[dict, dict]] = []
    lengths, all_lengths = _lengths(kwargs, image_key)
    if x.dim() >= 4:
        h, w = x.shape[-2], x.shape[-1]
        deltas = [(8, 16), (-8, -16), (16, 8), (-16, -8), (8, 8), (-8, -8), (16, 16), (-16, -16), (4, 8), (-4, -8)]
        for dh, dw in deltas:
            if h + dh > 0 and w + dw > 0:
                candidates += _grid_candidates(kwargs, image_key, (h + dh, w + dw), before=len(candidates))
    elif x.dim() == 3:
        candidates += _sequence_candidates(kwargs, image_key, x, lengths, all_lengths)
    if samples is None:
        candidates += _other_layouts(kwargs, image_key, x, all_lengths)
    return candidates


def _sequence_candidates(kwargs: dict, image_key: str, x: torch.Tensor, lengths,
                         all_lengths) -> list[tuple[dict, dict]]:
    """The image input ``x``'s sequence of tokens (dim 1) resized: with its grid passed as ints
    or tuples of ints (``_grid_int_candidates``, ``_grid_tuple_candidates``), then to a few other
    lengths, with the per-token inputs, alone, and with every per-token input."""
    n = int(x.shape[1])
    candidates = _grid_int_candidates(kwargs, image_key, n, lengths)
    candidates += _grid_tuple_candidates(kwargs, image_key, n, lengths)
    for n2 in (n + max(4, n // 2), max(1, n - max(4, n // 3)), 2 * n):
        if n2 == n or n2 <= 1:
            continue
        new = dict(kwargs)
        new[image_key] = _resized(x, {1: n2})
        desc = {"mode": "packed", "n": n, "n2": n2}
        # Per-token inputs (position ids) follow the sequence length; feature dims (last)
        # never do. If a conditioning length equals N by chance, the plain candidate helps.
        resized = _resize_token_tables(kwargs, new, image_key, [(n, n2)], _joint(n, n2, lengths))
        candidates.append((resized, dict(desc, resized=True)))
        if any(resized[k] is not new[k] for k in new):
            candidates.append((new, desc))
        wider = _resize_everything(kwargs, new, image_key, [(n, n2), *_joint(n, n2, all_lengths)], [])
        if any(wider[k] is not resized[k] for k in new):
            candidates.append((wider, dict(desc, resized="every per-token input")))
    return candidates


def patchified_candidates(kwargs: dict, image_key: str) -> list[tuple[dict, dict]]:
    """Candidates for an image input that the pipeline patchified already (JoyImage Edit Plus:
    ``[B, P, C, pt, ph, pw]``, ``P = t * h * w`` tokens in dim 1, each token's patch pixels in the
    trailing dims): the sequence resized along dim 1 like a packed ``[B, N, C]`` one
    (``_sequence_candidates``: with the grid passed as ints or tuples of ints whose product is
    ``P``, as JoyImage's ``shape_list=[[(t, h, w)]] * B``), the patch dims kept. Tried only when no
    other candidate captures: the trailing dims of such an input look like a grid (its patch), so
    ``second_resolution_candidates`` resizes the patch first. Conservative: the tokens are dim 1
    only (after the batch, as in packed sequences); rank >= 4 tensors, not lists of them."""
    x = kwargs[image_key]
    if not isinstance(x, torch.Tensor) or x.dim() < 5 or int(x.shape[1]) <= 1:  # [B, C, H, W] is a grid
        return []
    lengths, all_lengths = _lengths(kwargs, image_key)
    out = []
    for new, desc in _sequence_candidates(kwargs, image_key, x, lengths, all_lengths):
        out.append((new, dict(desc, resized="a pre-patchified sequence (tokens in dim 1)" + _and_tables(desc))))
    return out


def _and_tables(desc: dict) -> str:
    """What else a candidate resized, to follow what a wider candidate kind resizes in its name."""
    tables = desc.get("resized")
    return f" and {tables}" if isinstance(tables, str) else " and the per-token tables" if tables else ""


def _grid_candidates(kwargs: dict, image_key: str, hw2: tuple[int, int], before: int = 0) -> list[tuple[dict, dict]]:
    """The image input (or each per-sample tensor) resized to the grid ``hw2``: alone, then with
    the inputs that carry a per-token table, then with every per-token input (only while
    ``before``, the number of candidates before these, is small: each failed one costs an export)."""
    x = kwargs[image_key]
    samples = list(x) if isinstance(x, (list, tuple)) else None
    if samples is not None:
        x = samples[0]
    lengths, all_lengths = _lengths(kwargs, image_key)
    (h, w), (h2, w2) = x.shape[-2:], hw2
    new = dict(kwargs)
    sizes = {x.dim() - 2: h2, x.dim() - 1: w2}
    new[image_key] = (_resized(x, sizes) if samples is None
                      else type(kwargs[image_key])(_resized(u, sizes) for u in samples))
    desc: dict[str, Any] = {"mode": "grid", "hw": (h, w), "hw2": (h2, w2), "batch": image_batch(kwargs[image_key]),
                            "lengths": tuple(lengths)}
    candidates = [(new, desc)]
    # Inputs that carry a per-token table (e.g. RoPE cos/sin passed in by the pipeline)
    # must follow the resolution: a second candidate resizes non-feature dims that
    # equal the token count of a usual patch size.
    counts = []
    # video latents are [B, C, F, H, W] or [B, F, C, H, W]: either dim may be the frames
    frames = _frames(x, samples is not None)
    for p in (1, 2, 4, 8):
        if h % p or w % p or h2 % p or w2 % p:
            continue
        for f in frames:
            counts.append((f * (h // p) * (w // p), f * (h2 // p) * (w2 // p)))
    joint = [pair for n, n2 in counts for pair in _joint(n, n2, lengths)]
    resized = _resize_token_tables(kwargs, new, image_key, counts, joint)
    if any(resized[k] is not new[k] for k in new):
        candidates.append((resized, dict(desc, resized=True)))
    if before + len(candidates) <= 6:
        sides = [((h // p, w // p), (h2 // p, w2 // p)) for p in (1, 2, 4, 8)
                 if not (h % p or w % p or h2 % p or w2 % p)]
        # a temporal patch (CogVideoX 1.5: 2 frames a token) halves the frames
        temporal = [((f // 2) * (h // p) * (w // p), (f // 2) * (h2 // p) * (w2 // p))
                    for f in frames if f % 2 == 0 and f > 2 for p in (1, 2, 4, 8)
                    if not (h % p or w % p or h2 % p or w2 % p)]
        joint_all = [pair for a, b in counts for pair in _joint(a, b, all_lengths)]
        wide = _resize_everything(kwargs, new, image_key, counts + joint_all + temporal, sides)
        if any(wide[k] is not resized[k] for k in new):
            candidates.append((wide, dict(desc, resized="every per-token input")))
    return candidates


def _on_grid(t: Any, hw: tuple[int, int]) -> bool:
    """A tensor of rank >= 3 whose last two dims are the grid ``hw``."""
    return isinstance(t, torch.Tensor) and t.dim() >= 3 and tuple(map(int, t.shape[-2:])) == hw


def image_grid_candidates(kwargs: dict, image_key: str) -> list[tuple[dict, dict]]:
    """Candidates for a model that adds another input on the image's grid to the image (Wan
    Animate's pose latents ``[B, C, F - 1, H, W]``; control latents, masks ``[B, H, W]`` over the
    latent grid): the image and those inputs (tensors of rank >= 3, also in lists, whose last two
    dims are the image's ``H, W``) resized to the same grid, with the per-token guesses of
    ``_grid_candidates``. Tried only when no ``second_resolution_candidates`` entry captures, so a
    model that captures without them is analysed as before. All such inputs first; when several
    are, each alone after (one may match the grid by chance: a square pixel input as large as a
    square latent). Empty for packed image inputs, or when no other input is
    on the grid."""
    x = kwargs[image_key]
    x = x[0] if isinstance(x, (list, tuple)) else x
    if x.dim() < 4:
        return []
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    names = [k for k, v in kwargs.items() if k != image_key and any(_on_grid(t, hw) for t in pytree.tree_leaves(v))]
    if not names:
        return []
    groups = [names] + ([[k] for k in names] if len(names) > 1 else [])
    out: list[tuple[dict, dict]] = []
    for dh, dw in LATE_GRID_STEPS:
        h2, w2 = hw[0] + dh, hw[1] + dw
        if h2 <= 0 or w2 <= 0:
            continue
        for group in groups:
            moved = dict(kwargs)
            for key in group:
                moved[key] = pytree.tree_map(
                    lambda t: _resized(t, {t.dim() - 2: h2, t.dim() - 1: w2}) if _on_grid(t, hw) else t, kwargs[key])
            inputs = f"the image-grid input{'s' if len(group) > 1 else ''} {', '.join(group)}"
            # the per-token guesses of _grid_candidates see these inputs at the new grid already
            for new, desc in _grid_candidates(moved, image_key, (h2, w2), before=len(out)):
                out.append((new, dict(desc, resized=inputs + _and_tables(desc))))
    return out


def padding_neutral_candidates(kwargs: dict, image_key: str, n: int, multiple: int) -> list[tuple[dict, dict]]:
    """Candidates at a grid whose token count ``N2`` differs from ``n`` by a multiple of
    ``multiple``, for a model that pads its image tokens to a multiple of it (Z-Image pads each
    sample to 32): the padded sequence is then ``N + c`` with the same ``c`` at both sizes, as
    the token analysis needs. Both sides change (one side alone would scale with the area like
    the tokens), by steps that keep the grid divisible like the original one (up to 8); the
    nearest grids first, larger before smaller."""
    x = kwargs[image_key]
    x = x[0] if isinstance(x, (list, tuple)) else x
    if x.dim() < 4:
        return []
    h, w = int(x.shape[-2]), int(x.shape[-1])
    step = math.gcd(h, w, 8)
    grids = []
    for i, j in itertools.product(range(-4, 9), repeat=2):
        h2, w2 = h + i * step, w + j * step
        if i == 0 or j == 0 or h2 <= 0 or w2 <= 0 or (n * h2 * w2) % (h * w):
            continue
        n2 = n * h2 * w2 // (h * w)
        if n2 != n and (n2 - n) % multiple == 0:
            grids.append((max(abs(i), abs(j)), i < 0 or j < 0, (h2, w2)))
    return [c for *_, hw2 in sorted(grids)[:3] for c in _grid_candidates(kwargs, image_key, hw2)]


def token_padding(gm: fx.GraphModule, gm_alt: fx.GraphModule, resolutions: dict) -> tuple[int, int] | None:
    """``(N, M)`` when the graph pads its image tokens to a multiple of ``M`` (Z-Image pads each
    sample's tokens to 32 with copies of a pad token), found in the two captures ``gm`` and
    ``gm_alt``: a dim that is ``N`` rounded up to ``M`` at both resolutions, not ``N`` at one of
    them, and grows with ``N``. The padding then differs between the two sizes, so the padded
    sequence is not ``N + c`` and no op after it gets a token axis; a second resolution whose
    ``N`` differs by a multiple of ``M`` keeps ``c`` (``padding_neutral_candidates``). ``M`` is a
    power of two, at least 8 (conservative: the multiples kernels pad to; smaller ones match by
    chance too often). None when nothing is padded, or when the token count is not found (the
    token analysis says why)."""
    pairs = align(gm.graph, gm_alt.graph)
    try:
        n1, n2, _ = find_token_count(pairs, resolutions)
    except (RasfxError, GuardOnDataDependentSymNode):  # a size computed from values: the analysis names it
        return None
    found = {0}
    for a, b in pairs.items():
        for t1, t2 in zip(pytree.tree_leaves(a.meta.get("val")), pytree.tree_leaves(b.meta.get("val"))):
            if not isinstance(t1, torch.Tensor) or not isinstance(t2, torch.Tensor) or t1.dim() != t2.dim():
                continue
            if not all(isinstance(s, int) for s in (*t1.shape, *t2.shape)):  # data-dependent sizes
                continue
            for s1, s2 in zip(map(int, t1.shape), map(int, t2.shape)):
                if s1 == s2 or (s1, s2) == (n1, n2):
                    continue
                m = math.gcd(s1, s2) & -math.gcd(s1, s2)  # the largest power of two dividing both
                while m >= 8 and (-(-n1 // m) * m, -(-n2 // m) * m) != (s1, s2):
                    m //= 2
                found.add(m if m >= 8 else 0)
    return (n1, max(found)) if max(found) else None


def _other_layouts(kwargs: dict, image_key: str, x: torch.Tensor, lengths) -> list[tuple[dict, dict]]:
    """Candidates for image inputs laid out otherwise, tried after the usual ones: channels
    last (Kandinsky 5's [B, F, H, W, C]: the grid is the two dims before the last) and tokens
    last (Stable Audio's [B, C, L]: the sequence is the last dim)."""
    out: list[tuple[dict, dict]] = []
    if x.dim() >= 5:
        h, w = int(x.shape[-3]), int(x.shape[-2])
        frames = {int(s) for s in x.shape[1:-3]} or {1}
        for dh, dw in LATE_GRID_STEPS:
            h2, w2 = h + dh, w + dw
            if h2 <= 0 or w2 <= 0:
                continue
            new = dict(kwargs)
            new[image_key] = _resized(x, {x.dim() - 3: h2, x.dim() - 2: w2})
            desc: dict[str, Any] = {"mode": "grid", "hw": (h, w), "hw2": (h2, w2), "batch": int(x.shape[0]),
                                    "resized": "a channels-last grid and every per-token input"}
            ps = [p for p in (1, 2, 4, 8) if not (h % p or w % p or h2 % p or w2 % p)]
            # a count as small as the batch (one token a frame for the largest patch) would resize the batch dims
            counts = [(f * (h // p) * (w // p), f * (h2 // p) * (w2 // p)) for p in ps for f in frames
                      if f * (h // p) * (w // p) > int(x.shape[0])]
            joint = [pair for a, b in counts for pair in _joint(a, b, lengths)]
            sides = [((h // p, w // p), (h2 // p, w2 // p)) for p in ps]
            out.append((_resize_everything(kwargs, new, image_key, counts + joint, sides), desc))
    elif x.dim() == 3:
        n = int(x.shape[-1])
        for n2 in (n + max(4, n // 2), 2 * n):
            new = dict(kwargs)
            new[image_key] = _resized(x, {2: n2})
            desc = {"mode": "packed", "n": n, "n2": n2, "resized": "a tokens-last sequence and every per-token input"}
            out.append((_resize_everything(kwargs, new, image_key, [(n, n2), *_joint(n, n2, lengths)], []), desc))
    return out


# layers whose weights are [out, in]-like feature dims, never per-token tables
_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd, torch.nn.LayerNorm, torch.nn.GroupNorm,
           torch.nn.modules.batchnorm._NormBase, torch.nn.RMSNorm)


# attribute names that hold an input size, a patch grid or a token count (timm / DiT style)
_SIZE_NAMES = ("img_size", "image_size", "input_size", "sample_size", "grid", "resolution", "patches", "tokens",
               "seq_len")


@contextlib.contextmanager
def resized_model(model: torch.nn.Module, desc: dict, x: Any, tokens: int | None = None,
                  extra_tokens: int = 0) -> Iterator[bool]:
    """For the analysis capture of a model built for one input size (the reference DiT: a
    patch embedding asserting ``img_size``, a position table built in ``__init__``): within
    the context, the model looks built for the candidate's size ``desc``. Parameters and
    buffers with a non-feature dim equal to a token count get random tables of the new
    count (not the weights of linear, conv and norm layers); attributes named for a size
    (``img_size``, ``grid_size``, ``num_patches``, ... see ``_SIZE_NAMES``) that equal the input
    size, a patch grid or a token count get the new values, and so do int attributes named
    for a side (``sample_height``, ``sample_width``) equal to that side of the input. Tables over
    a conditioning sequence and the tokens (T + N rows) count too. ``tokens``: the image's token
    count ``N`` at the captured size, when a capture without resizing found it (its sequence then
    did not follow the image): an int attribute named for a sequence length (``max_seq``) longer
    than ``N`` is a length the tokens are padded to (HiDream pads non-square latents to
    ``max_seq``), and grows with the tokens, so that the padding stays as many extra tokens.
    ``extra_tokens``: tables of up to that many rows more than a token count (or a joint text + image
    count) count too and keep their extra rows: tokens the model makes itself and puts in the sequence
    (U-ViT's time and class tokens, a table of ``2 + N`` rows); then it yields whether such a table
    changed (without one the attempt is the one without ``extra_tokens``). Everything is restored on
    exit. Yields whether anything changed."""
    tuples: dict = {}
    counts: dict = {}
    sides: dict = {}  # a word of an attribute's name -> (input side, new side): CogVideoX's sample_height
    if desc["mode"] == "grid":
        (h, w), (h2, w2) = desc["hw"], desc["hw2"]
        per_sample = isinstance(x, (list, tuple))
        frames = _frames(x[0] if per_sample else x, per_sample)
        tuples[(h, w)] = (h2, w2)
        for p in (1, 2, 4, 8):
            if not (h % p or w % p or h2 % p or w2 % p):
                tuples.setdefault((h // p, w // p), (h2 // p, w2 // p))
                for f in frames:
                    counts.setdefault(f * (h // p) * (w // p), f * (h2 // p) * (w2 // p))
        # a table over [text, image] (CogVideoX's joint sin-cos positions, T + N rows)
        for n, n2 in list(counts.items()):
            for a, b in _joint(n, n2, desc.get("lengths", ())):
                counts.setdefault(a, b)
        sides = {"height": (h, h2), "width": (w, w2)}
    else:
        counts[desc["n"]] = desc["n2"]
    counts = {a: b for a, b in counts.items() if a > 1}
    extras: dict[int, int] = {}  # the fewest extra rows first: 18 rows over 16 tokens are 16 + 2, not 4 + 14
    for k in range(1, extra_tokens + 1):
        for a, b in counts.items():
            if a + k not in counts:
                extras.setdefault(a + k, b + k)
    # a padded length: the tokens' count plus padding that stays the same at both sizes
    grow = counts[tokens] - tokens if tokens in counts else None
    undo: list[tuple[dict, str, Any]] = []  # (namespace, name, original value)
    extra_tables = False  # a table resized as one of ``extras``
    try:
        for mod in model.modules():
            tables: tuple[dict[str, Any], ...] = () if isinstance(mod, _LAYERS) else (mod._parameters, mod._buffers)
            for table in tables:
                for name, t in list(table.items()):
                    if t is None or t.dim() < 2:
                        continue
                    sizes = {d: counts[s] for d, s in enumerate(t.shape[:-1]) if s in counts}
                    with_extras = {d: extras[s] for d, s in enumerate(t.shape[:-1]) if s in extras}
                    extra_tables |= bool(with_extras)
                    sizes.update(with_extras)
                    if sizes:
                        new = _resized(t.detach(), sizes)
                        table[name] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
                        undo.append((table, name, t))
            for name, value in list(vars(mod).items()) if not isinstance(mod, _LAYERS) else ():
                side = next((pair for word, pair in sides.items() if word in name), None)
                padded = grow is not None and "seq" in name and type(value) is int and value > cast(int, tokens)
                if name.startswith("_") or not (side or padded or any(k in name for k in _SIZE_NAMES)):
                    continue
                new_value = None
                if side is not None:
                    new_value = side[1] if type(value) is int and value == side[0] else None
                elif isinstance(value, tuple) and value in tuples:
                    new_value = tuples[value]
                elif padded:
                    new_value = value + cast(int, grow)
                elif type(value) is int and value in counts:
                    new_value = counts[value]
                if new_value is not None:
                    vars(mod)[name] = new_value
                    undo.append((vars(mod), name, value))
        yield extra_tables if extra_tokens else bool(undo)
    finally:
        for namespace, name, value in reversed(undo):
            namespace[name] = value


def _joint(n: int, n2: int, lengths) -> list[tuple[int, int]]:
    """Lengths of text + image sequences at both resolutions, for masks over them."""
    return [(n + t, n2 + t) for t in sorted(lengths) if t != n]


def _grid_int_candidates(kwargs: dict, image_key: str, n: int, lengths) -> list[tuple[dict, dict]]:
    """Packed tokens whose grid is also passed as ints (LTX: ``num_frames``, ``height``,
    ``width`` with F * H * W = N, for its RoPE coordinates): the second resolution must change
    the ints with the sequence, so the last of them grows or shrinks with N."""
    ints = {k: v for k, v in kwargs.items() if type(v) is int and v > 1}
    for size in (3, 2):
        for names in itertools.combinations(ints, size):
            if math.prod(ints[k] for k in names) != n:
                continue
            last = names[-1]
            rest = n // ints[last]
            out = []
            for delta in (4, -2, 2):
                w2 = ints[last] + delta
                if w2 < 2:
                    continue
                n2 = rest * w2
                new = dict(kwargs)
                new[image_key] = _resized(kwargs[image_key], {1: n2})
                new[last] = w2
                new = _resize_token_tables(kwargs, new, image_key, [(n, n2)], _joint(n, n2, lengths))
                out.append((new, {"mode": "packed", "n": n, "n2": n2, "resized": True, "grid_ints": list(names)}))
            return out
    return []


def _grid_tuple_candidates(kwargs: dict, image_key: str, n: int, lengths) -> list[tuple[dict, dict]]:
    """Packed tokens whose grid is passed as tuples of ints, per sample (QwenImage's
    ``img_shapes=[[(1, h, w)]] * B``, for its RoPE): the second resolution changes the grid's
    last side in every such tuple, and every per-token input with it (``_resize_everything``)."""
    found = [t for k, v in kwargs.items() if k != image_key
             for t in pytree.tree_leaves(v, is_leaf=_grid_tuple) if _grid_tuple(t) and math.prod(t) == n]
    if not found:
        return []
    grid = tuple(found[0][-2:])
    rest = n // grid[1]
    out = []
    for delta in (4, -2, 2):
        w2 = grid[1] + delta
        if w2 < 2:
            continue
        n2 = rest * w2
        new = dict(kwargs)
        new[image_key] = _resized(kwargs[image_key], {1: n2})
        new = _resize_everything(kwargs, new, image_key, [(n, n2), *_joint(n, n2, lengths)], [(grid, (grid[0], w2))])
        out.append((new, {"mode": "packed", "n": n, "n2": n2, "resized": "the grid tuples and per-token inputs"}))
    return out

"""Second-resolution candidates for a boolean mask over a joint sequence whose image part must
follow the image (``joint_mask_candidates``).

QwenImage 2.1 passes ``img_mask [B, T + N / 4]``: ``False`` at the text positions of its
vision-language sequence, ``True`` at its image slots, each standing for 2x2 latent tokens; the
forward expands the slots four-fold (``repeat_interleave``) and writes the image tokens through
the expanded mask. A second resolution must then give the mask ``N2 / 4`` slots, all ``True``,
where the other candidates give it zeros of a joint length (or keep it): the expanded mask then
marks ``N`` tokens, not ``N2``. These candidates are the packed ones of
``second_resolution_candidates`` with such masks resized keeping their values: the run of
``True`` that stands for the image's tokens becomes as long as the image's new token count
needs, the positions before and after it stay. Tried only after every other kind of candidate
failed (``planned_capture._analysis_captures``), so a model that captures without them is
analysed as before.
"""

from __future__ import annotations

import torch

from .prompt_values import true_runs
from .second_resolution import second_resolution_candidates

#: Tokens per position of the mask's image part: one position a token (a mask marking the image
#: tokens of a joint sequence), or a slot for a 2x2 or 4x4 group of them (QwenImage 2.1's 2x2 slots).
TOKENS_PER_SLOT = (1, 4, 16)


def _image_run(mask: torch.Tensor, n: int) -> tuple[int, int, int] | None:
    """(start, length, tokens per slot) of the run of ``True`` that stands for the ``n`` image
    tokens in every row of ``mask`` (rank 1 or 2, bool): a run of ``n / k`` positions for a ``k``
    of ``TOKENS_PER_SLOT``, the last such run of a row (QwenImage 2.1 puts the target image last,
    after its condition images), at the same place in every row. None when a row has none, when the
    rows disagree, or when the run is the whole row (conservative: then the mask is not over a joint
    sequence, and may be a text mask whose length matches by chance)."""
    rows = mask.reshape(-1, mask.shape[-1]).tolist()
    found = set()
    for row in rows:
        runs = [(s, c, n // c) for s, c in true_runs(row) if n % c == 0 and n // c in TOKENS_PER_SLOT]
        if not runs:
            return None
        found.add(runs[-1])
    if len(found) != 1:
        return None
    run = found.pop()
    return run if run[1] < mask.shape[-1] else None


def _resized_mask(mask: torch.Tensor, run: tuple[int, int, int], n2: int) -> torch.Tensor:
    """``mask`` with its image run (``_image_run``) as long as ``n2`` tokens need, the rest kept."""
    start, length, k = run
    slots = torch.ones(*mask.shape[:-1], n2 // k, dtype=mask.dtype, device=mask.device)
    return torch.cat([mask[..., :start], slots, mask[..., start + length:]], -1)


def joint_mask_candidates(kwargs: dict, image_key: str) -> list[tuple[dict, dict]]:
    """The packed candidates of ``second_resolution_candidates`` (the image's tokens resized from
    ``N`` to ``N2``, with the grid passed as ints or tuples and the per-token inputs) with every
    boolean mask over a joint sequence whose image part stands for the ``N`` tokens (``_image_run``)
    resized to ``N2`` keeping its values (``_resized_mask``). When several inputs are such masks,
    each alone after all of them (one may match by chance). Conservative: packed candidates only
    (a grid candidate's token count depends on a patch size it does not know); boolean masks only
    (an integer one is a text attention mask more often than a mask of image slots); a candidate
    whose ``N2`` is not a whole number of slots is left out."""
    masks = {k: v for k, v in kwargs.items() if k != image_key and isinstance(v, torch.Tensor)
             and v.dtype == torch.bool and 1 <= v.dim() <= 2}
    out: list[tuple[dict, dict]] = []
    for new, desc in second_resolution_candidates(kwargs, image_key):
        if desc["mode"] != "packed":
            continue
        n, n2 = desc["n"], desc["n2"]
        runs = {k: run for k, v in masks.items() if (run := _image_run(v, n)) is not None and n2 % run[2] == 0}
        groups = [list(runs)] + ([[k] for k in runs] if len(runs) > 1 else [])
        for group in groups if runs else ():
            moved = dict(new)
            for key in group:
                moved[key] = _resized_mask(masks[key], runs[key], n2)
            resized = desc.get("resized")
            before = f" and {resized}" if isinstance(resized, str) else " and the per-token inputs" if resized else ""
            out.append((moved, dict(desc, resized=f"the joint mask{'s' if len(group) > 1 else ''} "
                                                 f"{', '.join(group)}{before}")))
    return out

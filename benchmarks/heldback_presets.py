"""Held-back checks of presets made to pass in session 11, at sizes, batches and masks their
tests do not use (CPU, seconds): relative error ``max|ras - model| / max|model|`` of the
transformed model against the model, dense, with a quarter of the tokens shared by all rows,
and with a third of them per row, on the same inputs after a dense forward. GLM-Image also gets
a random per-token drop mask (its tests drop whole rows), then the flipped mask (a new prompt).

    python benchmarks/heldback_presets.py
"""

from __future__ import annotations

import torch

import rasfx
from rasfx.presets import get_preset


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)


def check(name: str, hw: tuple[int, int], batch: int, **overrides) -> list[float]:
    p = get_preset(name)
    model = p.build(0).eval()
    kw = dict(p.inputs(batch, *hw, seed=11), **overrides)
    ras = rasfx.transform(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        want = _first(model(**kw))
        errors = [_rel(_first(ras(**kw)), want)]
        n = ras.num_image_tokens
        ras.set_active(torch.randperm(n, generator=g)[: n // 4].sort().values)
        errors.append(_rel(_first(ras(**kw)), want))
        ras.set_active(torch.stack([torch.randperm(n, generator=g)[: n // 3] for _ in range(batch)]))
        errors.append(_rel(_first(ras(**kw)), want))
    return errors


def main() -> None:
    g = torch.Generator().manual_seed(7)
    n = (10 // 2) * (14 // 2)
    mask = torch.rand(3, n, generator=g) < 0.4
    cases = [("omnigen-tiny", (12, 20), 3, {}, ""), ("qwenimage21-tiny", (16, 8), 3, {}, ""),
             ("glm-image-tiny", (10, 14), 3, {"prior_token_drop": mask}, " (random per-token mask)"),
             ("glm-image-tiny", (10, 14), 3, {"prior_token_drop": ~mask}, " (that mask flipped)")]
    for name, hw, batch, overrides, extra in cases:
        errors = check(name, hw, batch, **overrides)
        print(f"{name} {hw[0]}x{hw[1]} batch {batch}{extra}: dense / shared 1/4 / per-row 1/3 relative error "
              + " / ".join(f"{e:.1e}" for e in errors), flush=True)


if __name__ == "__main__":
    main()

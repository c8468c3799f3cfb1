#!/usr/bin/env python3
"""Head to head at equal compute: dense with fewer steps, RAS, diffusers' step caches, and rasfx's
combined (token + step sparse) sampler, on the shipped shapes DiT.

    python3 benchmarks/quality.py --head-to-head --out OUT/h2h            # the comparison (GPU or CPU)
    python3 benchmarks/quality.py --head-to-head --quick --out /tmp/h2h   # CPU: a tiny run (tests)

Every run starts from the same noise as a dense ``--ref-steps`` reference; PSNR and SSIM are
against it. Compute is in dense-step equivalents:

* dense with ``k`` steps: ``k``;
* rasfx (RAS, the combined sampler): ``rasfx.stats(pipe).flops_fraction`` times the steps (the
  share of image tokens computed; a skipped step computes none);
* diffusers' cache hooks (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``, ... through the
  model's ``enable_cache``; the shipped ``SD3Transformer2DModel`` class has no ``CacheMixin``, so a
  subclass that adds it is loaded with the same weights): the share of the linear-layer
  multiply-adds a dense run of the same steps executes (forward hooks on every ``nn.Linear``;
  a skipped block or a predicted attention calls none of its own).

Neither count includes the attention-score products; both measure per-token work, which is what
the methods save. A hook that does not apply to the model is listed with the reason. Measured
seconds are reported too (wall clock of the pipeline call). Writes ``OUT/head_to_head.json``
(schema ``rasfx-head-to-head/1``) and ``OUT/head_to_head.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from shapes_eval import ReusedTransform, initial_noise, jsonable, psnr, ssim  # noqa: E402  (examples/shapes_eval.py)

SCHEMA = "rasfx-head-to-head/1"
DEFAULT_MODEL = os.path.join(ROOT, "models", "shapes-dit")
FAMILIES = ("dense", "RAS", "diffusers", "combined")
#: budgets of the winners table, as shares of the dense run of --steps
BUDGETS = (0.25, 0.4, 0.5, 0.6)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-to-head", action="store_true", help="(the switch that selects this mode in quality.py)")
    p.add_argument("--out", required=True, help="output folder (head_to_head.json, head_to_head.md)")
    p.add_argument("--quick", action="store_true", help="tiny CPU run for tests (1 image, 6 steps)")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--images", type=int, default=16, help="images (one batch; labels cycle over the classes)")
    p.add_argument("--steps", type=int, default=28, help="steps of RAS, the caches and the combined sampler")
    p.add_argument("--ref-steps", type=int, default=50)
    p.add_argument("--dense-steps", default="6,8,10,12,14,17,20,24,28")
    p.add_argument("--ratios", default="0.5,0.25")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.steps, args.ref_steps, args.dense_steps, args.ratios = 1, 6, 12, "2,3,4,6", "0.5,0.25"
    return args


def combined_configs(ratios: Sequence[float]) -> list[tuple[str, dict]]:
    """(name, RASConfig fields) of the combined sampler's settings."""
    out = []
    for r in ratios:
        out.append((f"RAS {r} + skip every 2nd, extrapolated",
                    dict(ratio=r, skip_every=2, skip_estimate="extrapolate", inactive_estimate="extrapolate")))
    out.append(("dense or skip, adaptive 0.3, extrapolated",
                dict(ratio=1.0, skip_threshold=0.3, skip_sync=True, skip_estimate="extrapolate")))
    out.append((f"RAS {ratios[0]} + adaptive 0.3",
                dict(ratio=ratios[0], skip_threshold=0.3, skip_sync=True, inactive_estimate="extrapolate")))
    return out


def cache_configs(steps: int) -> list[tuple[str, Callable[[], Any]]]:
    """(name, config factory) of the diffusers cache hooks tried on the model."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    def taylor(interval: int):
        return lambda: TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=max(1, steps // 7),
                                             taylor_factors_dtype=torch.float32)

    return [("FirstBlockCache 0.1", lambda: FirstBlockCacheConfig(threshold=0.1)),
            ("FirstBlockCache 0.2", lambda: FirstBlockCacheConfig(threshold=0.2)),
            ("TaylorSeer interval 2", taylor(2)),
            ("TaylorSeer interval 3", taylor(3))]


class LinearWork:
    """Multiply-adds of every ``nn.Linear`` call under a module (forward hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.macs = 0
        self.handles = [m.register_forward_hook(self._count) for m in module.modules() if isinstance(m, torch.nn.Linear)]

    def _count(self, module: torch.nn.Linear, args: tuple, output: Any) -> None:
        x = args[0]
        self.macs += (x.numel() // x.shape[-1]) * module.in_features * module.out_features

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def cached_pipeline(pipe):
    """A second pipeline whose transformer is the same model in a ``CacheMixin`` subclass (the
    shipped class has none), so diffusers' cache hooks apply through ``enable_cache``."""
    from diffusers.models.cache_utils import CacheMixin

    base = type(pipe.transformer)
    cls = base if issubclass(base, CacheMixin) else type(f"Cached{base.__name__}", (CacheMixin, base), {})
    model = cls.from_config(pipe.transformer.config).to(pipe.transformer.device)
    if model.dtype != pipe.transformer.dtype:
        model.to(pipe.transformer.dtype)
    model.load_state_dict(pipe.transformer.state_dict())
    model.eval()
    return type(pipe)(transformer=model, scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
                      class_embeddings=pipe.class_embeddings)


def run_head_to_head(args, pipe=None, transform=None) -> dict:
    import rasfx
    from shapes_pipeline import ShapesPipeline

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if pipe is None:
        pipe = ShapesPipeline.from_pretrained(args.model, torch_dtype=torch.float32).to(device)
    device = pipe.transformer.device
    pipe.set_progress_bar_config(disable=True)
    transform = transform or ReusedTransform()
    names = pipe.class_embeddings.class_names
    labels = [names[i % len(names)] for i in range(args.images)]
    cfg = pipe.transformer.config
    noise = initial_noise(range(args.seed, args.seed + args.images), (cfg.in_channels, cfg.sample_size, cfg.sample_size))
    noise = noise.to(device)
    S = args.steps

    def sample(p, steps: int) -> tuple[torch.Tensor, float]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images = p(labels, num_inference_steps=steps, guidance_scale=args.guidance, latents=noise).images.float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images, time.perf_counter() - t0

    reference, _ = sample(pipe, args.ref_steps)
    runs: list[dict] = []

    def record(family: str, name: str, steps: int, compute: float, images: torch.Tensor, seconds: float, **extra):
        p, s = psnr(images, reference), ssim(images, reference)
        runs.append(dict(family=family, name=name, steps=steps, compute=compute, compute_share=compute / S,
                         psnr=float(p.mean()), ssim=float(s.mean()), seconds=seconds, **extra))
        print(f"  {family:9s} {name:44s} compute {compute:5.2f}  PSNR {runs[-1]['psnr']:6.2f}  "
              f"SSIM {runs[-1]['ssim']:.3f}  {seconds:6.2f} s", flush=True)

    for k in (int(x) for x in args.dense_steps.split(",") if x.strip()):
        images, seconds = sample(pipe, k)
        record("dense", f"dense {k} steps", k, float(k), images, seconds)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    rasfx_runs = [("RAS", f"RAS {r}", dict(ratio=r)) for r in ratios]
    rasfx_runs += [("combined", name, fields) for name, fields in combined_configs(ratios)]
    for family, name, fields in rasfx_runs:
        config = rasfx.RASConfig(**fields)
        with rasfx.enabled(pipe, config, transform=transform):
            images, seconds = sample(pipe, S)
            st = rasfx.stats(pipe)
        record(family, name, S, st.flops_fraction * S, images, seconds, skipped_steps=st.skipped_steps,
               config={k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()})

    not_applicable: list[dict] = []
    hooked = cached_pipeline(pipe)
    hooked.set_progress_bar_config(disable=True)
    work = LinearWork(hooked.transformer)
    try:
        sample(hooked, S)
        dense_macs, work.macs = work.macs, 0
        for name, make in cache_configs(S):
            hooked.transformer.enable_cache(make())
            try:
                with hooked.transformer.cache_context("cond"):  # one batched CFG call per step
                    images, seconds = sample(hooked, S)
            except Exception as e:  # the hook does not support this model's blocks
                not_applicable.append(dict(name=name, reason=f"{type(e).__name__}: {e}"))
                print(f"  diffusers {name}: does not apply ({type(e).__name__}: {e})", flush=True)
                continue
            finally:
                hooked.transformer.disable_cache()
                macs, work.macs = work.macs, 0
            record("diffusers", name, S, S * macs / dense_macs, images, seconds)
    finally:
        work.remove()
    return dict(schema=SCHEMA, quick=bool(args.quick), device=str(device), images=args.images, steps=S,
                ref_steps=args.ref_steps, guidance=args.guidance, runs=runs, not_applicable=not_applicable,
                winners=winners(runs, S))


def winners(runs: list[dict], steps: int) -> list[dict]:
    """Per budget (a share of the dense run of ``steps``): the best PSNR of each family within it."""
    out = []
    for share in BUDGETS:
        row: dict[str, Any] = {"budget_share": share, "budget": share * steps}
        for family in FAMILIES:
            fitting = [r for r in runs if r["family"] == family and r["compute"] <= share * steps + 1e-9]
            best = max(fitting, key=lambda r: r["psnr"], default=None)
            row[family] = None if best is None else {k: best[k] for k in ("name", "compute", "psnr", "ssim")}
        ranked = [f for f in FAMILIES if row[f] is not None]
        row["winner"] = max(ranked, key=lambda f: row[f]["psnr"]) if ranked else None
        out.append(row)
    return out


def render_markdown(res: dict) -> str:
    lines = [f"Shapes DiT, {res['images']} images, {res['steps']} steps against a dense {res['ref_steps']}-step "
             f"reference from the same noise ({res['device']})."
             + (" **CPU `--quick` run: the numbers only show the format.**" if res["quick"] else ""), "",
             "| family | method | compute (dense steps) | share | PSNR (dB) | SSIM | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(res["runs"], key=lambda r: r["compute"]):
        lines.append(f"| {r['family']} | {r['name']} | {r['compute']:.2f} | {r['compute_share']:.2f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['seconds']:.2f} |")
    lines += ["", "Best PSNR of each family within a compute budget:", "",
              "| budget | " + " | ".join(FAMILIES) + " | best |", "| --- " * (len(FAMILIES) + 2) + "|"]
    for w in res["winners"]:
        cells = [("–" if w[f] is None else f"{w[f]['psnr']:.2f} ({w[f]['name']})") for f in FAMILIES]
        lines.append(f"| {w['budget_share']:.0%} ({w['budget']:.1f}) | " + " | ".join(cells) + f" | {w['winner'] or '–'} |")
    for n in res["not_applicable"]:
        lines.append(f"\n*{n['name']} does not apply to this model:* `{n['reason']}`")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None, pipe=None, transform=None) -> dict:
    """Command line entry; ``pipe`` (a loaded ``ShapesPipeline``) and ``transform`` (a shared
    ``demo.ReusedTransform``) let tests reuse one model and its captured graphs."""
    args = _parse(argv)
    t0 = time.perf_counter()
    res = run_head_to_head(args, pipe, transform)
    res["total_s"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head_to_head.json"), "w") as f:
        json.dump(jsonable(res), f, indent=1)
    with open(os.path.join(args.out, "head_to_head.md"), "w") as f:
        f.write("# Head to head at equal compute\n\n" + render_markdown(res))
    print(f"wrote {args.out}: head_to_head.json, head_to_head.md  (total {res['total_s']:.1f} s)")
    return res


if __name__ == "__main__":
    main()

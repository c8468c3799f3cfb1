#!/usr/bin/env python3
"""Quality of region-adaptive sampling (RAS) on either shipped shapes DiT, against dense sampling.

    python3 benchmarks/quality.py --out OUT/quality                 # GPU: the full benchmark, ~2 min
    python3 benchmarks/quality.py --model models/shapes-latent-dit --out OUT/quality-latent
                                                                    # the latent model (AutoencoderKL + Flux DiT)
    python3 benchmarks/quality.py --out /tmp/q --quick              # CPU: a tiny run (tests)
    python3 benchmarks/quality.py --from-json OUT/quality/quality.json --doc docs/quality.md
                                                                    # re-render tables/plot, splice into the doc

Measures (every run starts from the same initial noise as the reference):

1. Fidelity to a dense ``--ref-steps`` (50) reference: PSNR and SSIM of RAS at ``--ratios``
   (0.75/0.5/0.25/0.125) over ``--ras-steps`` (7/10/14/28), and of dense sampling with fewer
   steps (``--dense-steps``, 3..28); plus class accuracy of the samples (shipped classifier).
2. The paper's Table 2 question: at equal transformer compute, is RAS with more steps better than
   dense sampling with fewer steps? Compute = sum over steps of the share of image tokens computed
   (``rasfx.stats(...).flops_fraction`` x steps, in dense-step equivalents; for this model every
   per-token cost, attention queries included, scales with it). Also compared at equal measured
   time. Pareto plot (matplotlib if installed).
3. Ablations in the spirit of the paper's Table 3 at 28 steps / ratio 0.25 and at the paper's
   10 steps / ratio 0.125: metric std vs L2 vs random, error reset on/off, starvation prevention
   on/off (``starvation_scale=0``), static vs dynamic schedule, inverted region choice, and without
   the K/V cache (``rasfx.TransformConfig(kv_cache=False)``: the active tokens attend to each other
   and the conditioning only).
4. A distribution metric over ``--dist-samples`` (2048) generated images per configuration:
   Frechet distance of the shipped classifier's 192-d penultimate features against as many real
   procedural images (plus the real-vs-real floor), and class accuracy, for compute-matched
   dense / RAS pairs. ``--budget-s`` shrinks the sample count (down to 1/4) or drops pairs so the
   whole script ends in time; what was skipped is listed in the outputs.

GPU runs use bfloat16 by default (the speed setting of the paper and of ``bench_models.py``);
the bf16-vs-fp32 difference of the dense reference is measured and reported as the precision
floor. ``--model`` is either model folder (``shapes_pipeline.load_pipeline`` reads it); both are
judged by the same evaluation classifier (``--classifier``, default
``models/shapes-dit/classifier.safetensors``, trained on the shapes images). Eager mode, large batches (``--batch`` images per pipeline call; classifier-free guidance
doubles the transformer batch).

Writes ``OUT/quality.json`` (schema ``rasfx-quality/1``), ``OUT/quality.md`` (tables),
``OUT/pareto.png`` and ``OUT/samples.png``. Imports only torch, diffusers, numpy, safetensors,
torchmetrics, matplotlib (the ``demo`` extra) and this repository.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

# torch's CPU threads spin-wait between ops by default; on a busy (shared) machine that costs several
# times the work itself. Sleeping threads cost nothing measurable on an idle one. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from ras_ablations import ABLATIONS, TRANSFORM_ABLATIONS  # noqa: E402  (benchmarks/ras_ablations.py)
from shapes_eval import (  # noqa: E402  (examples/shapes_eval.py)
    ReusedTransform, panel_figure, computed_on_subject, initial_noise, jsonable, psnr, ssim, subject_mask,
)

SCHEMA = "rasfx-quality/1"
DEFAULT_MODEL = os.path.join(ROOT, "models", "shapes-dit")
DEFAULT_CLASSIFIER = os.path.join(DEFAULT_MODEL, "classifier.safetensors")
BEGIN_MARK = "<!-- quality.py results: begin -->"
END_MARK = "<!-- quality.py results: end -->"

DIST_DEFAULT = "dense:28,ras:28:0.25,dense:12,ras:14:0.25,dense:7,ras:28:0.5,dense:17"


# ----------------------------------------------------------------------------------------------
# Arguments


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _parse_spec(item: str) -> tuple[str, int, Optional[float]]:
    parts = item.strip().split(":")
    if parts[0] == "dense" and len(parts) == 2:
        return ("dense", int(parts[1]), None)
    if parts[0] == "ras" and len(parts) == 3:
        return ("ras", int(parts[1]), float(parts[2]))
    raise argparse.ArgumentTypeError(f"bad run spec {item!r}: use dense:STEPS or ras:STEPS:RATIO")


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (quality.json, quality.md, pareto.png, samples.png)")
    p.add_argument("--quick", action="store_true", help="tiny CPU run for tests (1 image, 1-4 steps)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="models/shapes-dit (default) or models/shapes-latent-dit")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER,
                   help="the evaluation classifier (default: models/shapes-dit/classifier.safetensors; it judges "
                        "the images of either model)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=256, help="images per pipeline call (default 256)")
    p.add_argument("--fid-images", type=int, default=256, help="images of the fidelity set (default 256)")
    p.add_argument("--ref-steps", type=int, default=50)
    p.add_argument("--ras-steps", default="7,10,14,28")
    p.add_argument("--ratios", default="0.75,0.5,0.25,0.125")
    p.add_argument("--dense-steps", default="3,4,5,6,7,8,9,10,11,12,14,17,20,24,28")
    p.add_argument("--ablations", default="28:0.25,10:0.125", help="STEPS:RATIO settings of the ablation table")
    p.add_argument("--ablation-variants", default=",".join(a[0] for a in ABLATIONS),
                   help="variants, comma separated (default: all of " + ", ".join(a[0] for a in ABLATIONS) + ")")
    p.add_argument("--no-warmup", action="store_true", help="no warm-up runs (the first RAS run then includes the graph capture)")
    p.add_argument("--dist-samples", type=int, default=2048, help="generated (and real) images per distribution config")
    p.add_argument("--dist-configs", default=DIST_DEFAULT, help="priority-ordered dense:S / ras:S:R list")
    p.add_argument("--no-precision-floor", action="store_true", help="skip the fp32 reference (only with bf16/fp16)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=140.0, help="wall-clock budget of the whole script (default 140)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--from-json", help="render quality.md / pareto.png from an existing quality.json (no sampling)")
    p.add_argument("--doc", help="splice the rendered results into this markdown file between the marker lines "
                                 "and copy its pictures next to it (into <doc dir>/quality/)")
    p.add_argument("--doc-text-only", action="store_true", help="with --doc: tables only, no pictures copied or linked")
    p.add_argument("--head-to-head", action="store_true",
                   help="compare dense-fewer-steps, RAS, diffusers' cache hooks and rasfx's combined sampler at equal "
                        "compute instead (benchmarks/head_to_head.py; its own options)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.fid_images, args.ref_steps = 1, 1, 3
        args.ras_steps, args.ratios, args.dense_steps = "2", "0.5,0.25", "1,2"
        args.ablations, args.ablation_variants = "2:0.25", "default,no-starvation,no-kv-cache"
        args.dist_samples, args.dist_configs = 2, "dense:1,ras:2:0.25"
        args.no_warmup, args.no_precision_floor = True, True
        args.budget_s = max(args.budget_s, 900.0)
    unknown = set(args.ablation_variants.split(",")) - {a[0] for a in ABLATIONS}
    if unknown:
        p.error(f"unknown --ablation-variants {sorted(unknown)}; known: {', '.join(a[0] for a in ABLATIONS)}")
    if not args.from_json and not args.out:
        p.error("--out is required (unless --from-json)")
    return args


# ----------------------------------------------------------------------------------------------
# Sampling


class Bench:
    """Pipeline, RAS module reuse, timing and the budget."""

    def __init__(self, args, pipe, device, dtype, transform=None):
        from rasfx import RASConfig, disable, enable
        from rasfx import stats as ras_stats
        from rasfx.sampler import build_plan

        self.RASConfig, self._enable, self._disable, self._stats, self._build_plan = (
            RASConfig, enable, disable, ras_stats, build_plan)
        self.args, self.pipe, self.device, self.dtype = args, pipe, device, dtype
        self.reuse = transform if transform is not None else ReusedTransform()
        self.measured: dict[tuple, float] = {}  # (steps, cfg key) -> seconds per batch
        self.dense_step_s: Optional[float] = None
        self.ras_overhead = 0.35  # share of a dense step a RAS step costs regardless of its ratio (learned)
        self.skipped: list[dict] = []
        _, h, w = pipe.noise_shape(1)[1:]
        patch = int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
        self.num_tokens = (h // patch) * (w // patch)  # pixel model: 32 x 32 patches; latent model: 16 x 16

    # -------------------------------------------------------------- budget
    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - _T0)

    def plan(self, steps: int, cfg) -> tuple[int, list[float]]:
        """(dense steps, active shares of the RAS steps) of a run."""
        if cfg is None:
            return steps, []
        plan = self._build_plan(cfg, steps, self.num_tokens)
        shares = [plan.active[i] / plan.num_tokens for i in range(steps) if not plan.is_dense(i)]
        return steps - len(shares), shares

    def estimate(self, steps: int, cfg, batches: int = 1) -> float:
        key = (steps, _cfg_key(cfg))
        if key in self.measured:
            return self.measured[key] * batches
        ds = self.dense_step_s if self.dense_step_s is not None else 1.0
        n_dense, shares = self.plan(steps, cfg)
        a = self.ras_overhead
        return batches * ds * (n_dense + sum(a + (1 - a) * s for s in shares))

    def _learn(self, steps: int, cfg, seconds: float) -> None:
        if self.dense_step_s is None:
            return
        n_dense, shares = self.plan(steps, cfg)
        if not shares:
            return
        # seconds = ds * (n_dense + sum(a + (1 - a) s)) -> a
        rest = seconds / self.dense_step_s - n_dense - sum(shares)
        denom = sum(1 - s for s in shares)
        if denom > 0:
            self.ras_overhead = min(1.5, max(self.ras_overhead, rest / denom))

    def fits(self, what: str, seconds: float, reserve: float = 6.0) -> bool:
        if seconds <= self.left() - reserve:
            return True
        self.skipped.append(dict(what=what, why=f"budget: needs ~{seconds:.1f} s, {max(0.0, self.left()):.1f} s left "
                                                f"of --budget-s {self.args.budget_s:g}"))
        print(f"  skipped {what}: ~{seconds:.1f} s needed, {self.left():.1f} s left", flush=True)
        return False

    # -------------------------------------------------------------- runs
    def sample(self, labels: torch.Tensor, latents: torch.Tensor, steps: int, cfg=None, pipe=None, transform=None):
        """One pipeline call -> (images (B, 3, H, W) float32 in [0, 1] on the device, seconds, stats)."""
        pipe = pipe or self.pipe
        st = None
        if cfg is not None:
            self._enable(pipe, cfg, transform=transform or self.reuse)
        try:
            _sync(self.device)
            t0 = time.perf_counter()
            images = pipe(labels, num_inference_steps=steps, guidance_scale=self.args.guidance, latents=latents).images
            _sync(self.device)
            seconds = time.perf_counter() - t0
            if cfg is not None:
                st = self._stats(pipe)
        finally:
            if cfg is not None:
                self._disable(pipe)
        return images.float(), seconds, st

    def run(self, labels_b: list[torch.Tensor], latents_b: list[torch.Tensor], steps: int, cfg=None, pipe=None,
            transform=None):
        """Every batch of a set -> (images on the device, total seconds, stats of the last batch)."""
        outs, total, st = [], 0.0, None
        for lab, lat in zip(labels_b, latents_b):
            images, seconds, st = self.sample(lab, lat, steps, cfg, pipe, transform)
            outs.append(images)
            total += seconds
        if pipe is None and transform is None:
            self.measured[(steps, _cfg_key(cfg))] = total / len(labels_b)
            if cfg is not None:
                self._learn(steps, cfg, total / len(labels_b))
        return torch.cat(outs), total, st


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cfg_key(cfg) -> Optional[tuple]:
    return None if cfg is None else tuple(sorted((k, v) for k, v in cfg.as_dict().items()))


def _split(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x.split(size))


def _image_metrics(images: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, clf) -> dict:
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


def _run_record(kind: str, steps: int, ratio: Optional[float], cfg, seconds: float, n: int, st, dense_plan) -> dict:
    if st is not None:
        frac = float(st.flops_fraction)
        dense_steps, ras_ratio = list(st.dense_steps), float(st.ras_ratio)
    else:
        frac, dense_steps, ras_ratio = 1.0, list(range(steps)), 1.0
        if cfg is not None:  # no stats (should not happen): fall back to the plan
            n_dense, shares = dense_plan
            frac = (n_dense + sum(shares)) / steps
    return dict(kind=kind, steps=steps, ratio=ratio, config=None if cfg is None else _cfg_json(cfg),
                flops_fraction=frac, compute=frac * steps, dense_steps=dense_steps, ras_ratio=ras_ratio,
                seconds=seconds, ms_per_image=1e3 * seconds / n)


def _cfg_json(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.as_dict().items()}


# ----------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(args, pipe=None, transform=None) -> dict:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    import rasfx
    from shapes_classifier import frechet_distance, load_classifier
    from shapes_data import generate_shapes, make_generator
    from h2h_methods import check_classifier, load_pipeline  # benchmarks/h2h_methods.py

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    t_load = time.perf_counter()
    if pipe is None:
        pipe = load_pipeline(args.model, device, dtype)
    else:
        device, dtype = pipe.transformer.device, pipe.transformer.dtype
    pipe.set_progress_bar_config(disable=True)
    clf = load_classifier(check_classifier(args.classifier), device)
    load_s = time.perf_counter() - t_load
    bench = Bench(args, pipe, device, dtype, transform)
    RASConfig = bench.RASConfig
    from rasfx import TransformConfig
    ncls = pipe.class_embeddings.num_classes
    shape = tuple(pipe.noise_shape(1)[1:])  # (3, 64, 64) pixels or (C, 16, 16) latents
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"rasfx quality benchmark on {name} ({device}), {str(dtype).replace('torch.', '')}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}; budget {args.budget_s:g} s", flush=True)

    res: dict[str, Any] = dict(
        schema=SCHEMA,
        setup=dict(device=str(device), device_name=name, dtype=str(dtype).replace("torch.", ""), torch=torch.__version__,
                   diffusers=diffusers.__version__, rasfx=rasfx.__version__, model=os.path.relpath(args.model, ROOT),
                   pipeline=type(pipe).__name__, classifier=os.path.relpath(os.path.abspath(args.classifier), ROOT),
                   batch=args.batch, fid_images=args.fid_images, ref_steps=args.ref_steps, guidance=args.guidance,
                   seed=args.seed, quick=bool(args.quick), budget_s=args.budget_s, num_tokens=bench.num_tokens,
                   mode="eager", ras_steps=_ints(args.ras_steps), ratios=_floats(args.ratios),
                   dense_steps=_ints(args.dense_steps)),
        timing=dict(load_s=load_s),
        notes=[],
    )

    # ---------------------------------------------------------------- fidelity set
    n_fid = args.fid_images
    batch = max(1, min(args.batch, n_fid))
    labels = torch.arange(n_fid) % ncls
    latents = initial_noise([args.seed * 1_000_003 + i for i in range(n_fid)], shape).to(device, dtype)
    lab_b, lat_b = _split(labels, batch), _split(latents, batch)

    # Warm-up: first-call costs of the plain model and RAS's one-time graph capture (per batch shape).
    warm_dense = warm_ras = 0.0
    if not args.no_warmup:
        t = time.perf_counter()
        bench.sample(lab_b[0], lat_b[0], 2)
        warm_dense = time.perf_counter() - t
        t = time.perf_counter()
        bench.sample(lab_b[0], lat_b[0], 2, RASConfig(ratio=0.25))
        warm_ras = time.perf_counter() - t
    else:
        res["notes"].append("no warm-up runs: the first RAS run's time includes the one-time graph capture")
    res["timing"].update(warmup_dense_s=warm_dense, warmup_ras_capture_s=warm_ras)
    print(f"loaded in {load_s:.1f} s; warm-up {warm_dense:.1f} s dense, {warm_ras:.1f} s RAS (graph capture)", flush=True)

    # Reference.
    ref, ref_s, _ = bench.run(lab_b, lat_b, args.ref_steps)
    bench.dense_step_s = ref_s / len(lab_b) / args.ref_steps
    res["reference"] = dict(steps=args.ref_steps, seconds=ref_s, ms_per_image=1e3 * ref_s / n_fid,
                            class_acc=_image_metrics(ref, ref, labels, clf)["class_acc"])
    print(f"reference: dense {args.ref_steps} steps, {ref_s:.2f} s for {n_fid} images "
          f"({1e3 * bench.dense_step_s:.1f} ms per step and batch of {batch}); class accuracy "
          f"{res['reference']['class_acc']:.3f}", flush=True)
    mask = subject_mask(ref).cpu()  # (N, H, W): the shape in every reference image (estimate)
    res["reference"]["subject_share"] = float(mask.double().mean())
    keep = min(8, n_fid)
    strips: dict[str, torch.Tensor] = {f"dense {args.ref_steps} (ref)": ref[:keep].cpu()}

    fidelity: list[dict] = []
    done: dict[tuple, dict] = {}

    transforms: dict[str, Any] = {}

    def fid_run(kind: str, steps: int, ratio: Optional[float], cfg, tag: str = "") -> Optional[dict]:
        transform = None
        if tag in TRANSFORM_ABLATIONS:
            if tag not in transforms:
                transforms[tag] = ReusedTransform(TransformConfig(**TRANSFORM_ABLATIONS[tag]))
            transform = transforms[tag]
        key = (steps, _cfg_key(cfg), tag if transform is not None else "")
        if key in done:
            return done[key]
        label = (f"dense {steps}" if cfg is None else f"RAS {ratio:g}@{steps}") + (f" {tag}" if tag else "")
        if not bench.fits(f"fidelity run {label}", bench.estimate(steps, cfg, len(lab_b))):
            return None
        images, seconds, st = bench.run(lab_b, lat_b, steps, cfg, transform=transform)
        rec = _run_record(kind, steps, ratio, cfg, seconds, n_fid, st, bench.plan(steps, cfg))
        rec.update(_image_metrics(images, ref, labels, clf))
        rec["label"] = label
        where = computed_on_subject(st, mask[-len(lab_b[-1]):]) if st is not None else None
        rec["subject_steps"] = None if where is None else where["subject"]
        rec["background_steps"] = None if where is None else where["background"]
        strips[label] = images[:keep].cpu()
        done[key] = rec
        print(f"  {label:24s} compute {rec['compute']:6.2f}  {rec['ms_per_image']:7.3f} ms/img  PSNR {rec['psnr']:6.2f}  "
              f"SSIM {rec['ssim']:.4f}  acc {rec['class_acc']:.3f}", flush=True)
        return rec

    print("fidelity to the reference (same noise):", flush=True)
    for s in _ints(args.dense_steps):
        r = fid_run("dense", s, None, None)
        if r is not None:
            fidelity.append(r)
    for s in sorted(_ints(args.ras_steps), reverse=True):
        for ratio in _floats(args.ratios):
            r = fid_run("ras", s, ratio, RASConfig(ratio=ratio))
            if r is not None:
                fidelity.append(r)
    res["fidelity"] = fidelity
    res["equal_compute"] = equal_compute(fidelity)

    # ---------------------------------------------------------------- ablations
    ablations = []
    print("ablations:", flush=True)
    for item in args.ablations.split(","):
        if not item.strip():
            continue
        s, ratio = item.split(":")
        s, ratio = int(s), float(ratio)
        variants = []
        for key, vname, over, what in ABLATIONS:
            if key not in args.ablation_variants.split(","):
                continue
            cfg = RASConfig(ratio=ratio, **over)
            r = fid_run("ras", s, ratio, cfg, "" if key == "default" else key)
            if r is None:
                variants.append(dict(key=key, name=vname, overrides=over, what=what, supported=True, skipped=True))
                continue
            v = {k: r[k] for k in ("psnr", "psnr_std", "ssim", "ssim_std", "class_acc", "compute", "ms_per_image",
                                   "dense_steps", "flops_fraction", "subject_steps", "background_steps")}
            variants.append(dict(key=key, name=vname, overrides={k: (list(x) if isinstance(x, tuple) else x) for k, x in over.items()},
                                 what=what, supported=True, skipped=False, **v))
        ablations.append(dict(steps=s, ratio=ratio, variants=variants))
    res["ablations"] = ablations

    # ---------------------------------------------------------------- precision floor
    res["precision_floor"] = None
    if dtype != torch.float32 and not args.no_precision_floor:
        n_pf = min(64, n_fid)
        est = bench.dense_step_s * args.ref_steps * (n_pf / batch) * 4 + 3  # fp32: ~4x slower than bf16 (guess)
        if bench.fits("precision floor (fp32 reference)", est):
            t = time.perf_counter()
            pipe32 = load_pipeline(args.model, device, torch.float32)
            pipe32.set_progress_bar_config(disable=True)
            ref32, s32, _ = bench.run([labels[:n_pf]], [latents[:n_pf].float()], args.ref_steps, pipe=pipe32)
            m = _image_metrics(ref[:n_pf], ref32, labels[:n_pf], clf)
            res["precision_floor"] = dict(images=n_pf, steps=args.ref_steps, psnr=m["psnr"], ssim=m["ssim"],
                                          fp32_seconds=s32, seconds=time.perf_counter() - t)
            print(f"precision floor: dense {args.ref_steps} steps {res['setup']['dtype']} vs float32 on {n_pf} images: "
                  f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}", flush=True)
            del pipe32

    # ---------------------------------------------------------------- distribution
    res["distribution"] = distribution(args, bench, clf, ncls, shape, device, dtype, generate_shapes, make_generator,
                                       frechet_distance)

    res["skipped"] = bench.skipped
    res["timing"]["total_s"] = time.perf_counter() - _T0
    res["_strips"] = strips
    return res


def equal_compute(fidelity: list[dict]) -> list[dict]:
    """For every RAS run: the dense runs around its compute and its measured time, and the PSNR/SSIM
    difference to dense sampling interpolated at the same compute (positive: RAS better)."""
    dense = sorted((r for r in fidelity if r["kind"] == "dense"), key=lambda r: r["steps"])
    out = []
    if len(dense) < 1:
        return out
    for r in (r for r in fidelity if r["kind"] == "ras" and _is_default(r)):
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


def _is_default(r: dict) -> bool:
    cfg = r.get("config") or {}
    default = dict(metric="std", starvation_scale=0.1, warmup=None, reset_steps=None, schedule="static", high_ratio=1.0)
    return all(cfg.get(k) == v for k, v in default.items())


def distribution(args, bench: Bench, clf, ncls, shape, device, dtype, generate_shapes, make_generator, frechet_distance) -> dict:
    specs = [_parse_spec(x) for x in args.dist_configs.split(",") if x.strip()]
    RASConfig = bench.RASConfig
    batch = max(1, min(args.batch, args.dist_samples))
    out: dict[str, Any] = dict(samples=0, requested_samples=args.dist_samples, batch=batch, configs=[], skipped=[],
                               real_vs_real_fd=None, feature="shipped classifier, 192-d penultimate features")

    def cost(n: int, chosen) -> float:
        b = math.ceil(n / batch)
        return sum(bench.estimate(s, None if r is None else RASConfig(ratio=r), b) for _, s, r in chosen) + 2.0

    n = args.dist_samples
    chosen = list(specs)
    reserve = 8.0
    while n > max(batch, args.dist_samples // 4) and cost(n, chosen) > bench.left() - reserve:
        n = max(batch, n // 2)
    while chosen and cost(n, chosen) > bench.left() - reserve:
        dropped = chosen.pop()
        out["skipped"].append(f"{dropped[0]}:{dropped[1]}" + ("" if dropped[2] is None else f":{dropped[2]:g}"))
    n = batch * max(1, n // batch)
    if not chosen:
        why = f"budget: {bench.left():.1f} s left, the smallest distribution run needs ~{cost(n, specs[:1]):.1f} s"
        bench.skipped.append(dict(what="distribution metric", why=why))
        out["skipped_reason"] = why
        print(f"distribution metric skipped ({why})", flush=True)
        return out
    if out["skipped"]:
        bench.skipped.append(dict(what="distribution configs " + ", ".join(out["skipped"]),
                                  why=f"budget ({bench.left():.1f} s left)"))
    out["samples"] = n
    print(f"distribution metric: {n} samples per config, {len(chosen)} configs", flush=True)

    # Real images (balanced classes), and a second independent real set for the floor.
    labels = torch.arange(n) % ncls
    feats_real = []
    feats_real2 = []
    for i, lab in enumerate(_split(labels, batch)):
        a = generate_shapes(len(lab), generator=make_generator(10_000 + i, device), labels=lab.to(device), with_captions=False)
        b = generate_shapes(len(lab), generator=make_generator(20_000 + i, device), labels=lab.to(device), with_captions=False)
        feats_real.append(clf.predict(a.images)[1])
        feats_real2.append(clf.predict(b.images)[1])
    feats_real, feats_real2 = torch.cat(feats_real), torch.cat(feats_real2)
    out["real_vs_real_fd"] = frechet_distance(feats_real, feats_real2)

    seeds = [(args.seed + 7) * 1_000_003 + 500_000 + i for i in range(n)]
    noise = _split(initial_noise(seeds, shape).to(device, dtype), batch)  # the same noise for every config
    for kind, s, r in chosen:
        cfg = None if r is None else RASConfig(ratio=r)
        feats, preds, total, st = [], [], 0.0, None
        for lab, lat in zip(_split(labels, batch), noise):
            images, seconds, st = bench.sample(lab, lat, s, cfg)
            total += seconds
            p, f = clf.predict(images * 2 - 1)
            feats.append(f)
            preds.append(p.cpu())
        feats_t, preds_t = torch.cat(feats), torch.cat(preds)
        frac = float(st.flops_fraction) if st is not None else 1.0
        rec = dict(kind=kind, steps=s, ratio=r, compute=frac * s, flops_fraction=frac, seconds=total,
                   ms_per_image=1e3 * total / n, fd=frechet_distance(feats_t, feats_real),
                   class_acc=float((preds_t == labels).float().mean()))
        rec["label"] = f"dense {s}" if r is None else f"RAS {r:g}@{s}"
        out["configs"].append(rec)
        print(f"  {rec['label']:14s} compute {rec['compute']:6.2f}  FD {rec['fd']:7.3f}  acc {rec['class_acc']:.3f}  "
              f"{total:.1f} s", flush=True)
    print(f"  real vs real FD (floor): {out['real_vs_real_fd']:.3f}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Rendering (markdown, plots)


def _f(x, fmt="{:.2f}", none="–") -> str:
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    return fmt.format(x)


def render_markdown(res: dict, plot: Optional[str], samples: Optional[str]) -> str:
    su, tm = res["setup"], res["timing"]
    fid = res.get("fidelity", [])
    L: list[str] = []
    quick = " **CPU `--quick` run: 1 image, 1-3 steps; the numbers only show the format.**" if su["quick"] else ""
    L += [
        f"Measured by `benchmarks/quality.py` on {su['device_name']} ({su['device']}), {su['dtype']}, torch {su['torch']}, "
        f"diffusers {su['diffusers']}, eager mode; fidelity set: {su['fid_images']} image{'s' if su['fid_images'] != 1 else ''} (batch {su['batch']}, guidance "
        f"{su['guidance']}, classes cycled), reference: dense {su['ref_steps']} steps from the same noise; whole run "
        f"{tm.get('total_s', 0):.0f} s (budget {su['budget_s']:g} s).{quick}",
        "",
    ]
    pf = res.get("precision_floor")
    if pf:
        L += [f"Precision floor: the {su['dtype']} reference against a float32 one ({pf['images']} images, "
              f"{pf['steps']} steps) reaches PSNR {pf['psnr']:.2f} dB / SSIM {pf['ssim']:.4f}; differences near that "
              f"level are numerical noise.", ""]
    ref = res.get("reference")
    if ref:
        L += [f"Reference: {ref['ms_per_image']:.3f} ms per image ({ref['steps']} steps), class accuracy "
              f"{ref['class_acc']:.3f}. Compute is in dense-step equivalents (sum over steps of the share of image "
              f"tokens computed); time is measured per image at batch {su['batch']}.", ""]

    # RAS grid: steps x ratio.
    ras = [r for r in fid if r["kind"] == "ras" and _is_default(r)]
    dense = sorted((r for r in fid if r["kind"] == "dense"), key=lambda r: r["steps"])
    if ras:
        steps = sorted({r["steps"] for r in ras})
        ratios = sorted({r["ratio"] for r in ras}, reverse=True)
        by = {(r["steps"], r["ratio"]): r for r in ras}
        d_by = {r["steps"]: r for r in dense}
        L += ["### Fidelity to the dense reference: RAS (PSNR dB / SSIM, compute)", ""]
        head = ["steps", "dense (ratio 1)"] + [f"RAS {q:g}" for q in ratios]
        rows = []
        for s in steps:
            cells = [str(s), _cell(d_by.get(s))] + [_cell(by.get((s, q))) for q in ratios]
            rows.append(cells)
        L += [_md_table(head, rows), ""]
    if dense:
        L += ["### Fidelity to the dense reference: dense sampling with fewer steps", ""]
        L += [_md_table(["steps", "compute", "ms / image", "PSNR dB", "SSIM", "class acc."],
                        [[str(d["steps"]), _f(d["compute"]), _f(d["ms_per_image"], "{:.3f}"), _f(d["psnr"]),
                          _f(d["ssim"], "{:.4f}"), _f(d["class_acc"], "{:.3f}")] for d in dense]), ""]
    if ras:
        L += ["RAS runs in full:", ""]
        L += [_md_table(["run", "dense steps", "compute", "ms / image", "PSNR dB", "SSIM", "class acc.",
                         "steps on shape / background"],
                        [[r["label"], str(len(r["dense_steps"])), _f(r["compute"]), _f(r["ms_per_image"], "{:.3f}"),
                          _f(r["psnr"]), _f(r["ssim"], "{:.4f}"), _f(r["class_acc"], "{:.3f}"), _where(r)] for r in ras]), ""]
        share = (res.get("reference") or {}).get("subject_share")
        L += ["Steps on shape / background: mean number of steps that computed a pixel of the shape (estimated "
              "from the reference image: RGB distance > 0.2 to a quadratic background fitted to the border) and of "
              "the background" + ("" if share is None else f"; the shape covers {100 * share:.0f}% of the pixels") + ".", ""]

    eq = res.get("equal_compute", [])
    if eq:
        L += ["### Equal compute: RAS with more steps vs dense with fewer steps (paper Table 2)", "",
              "ΔPSNR / ΔSSIM: RAS minus dense sampling interpolated (linearly in steps) at the same compute, "
              "and at the same measured time; \"beats\": RAS is better in both PSNR and SSIM than the cheapest "
              "dense run that costs at least as much.", ""]
        rows = []
        wins = 0
        for e in eq:
            c, t = e["at_compute"], e["at_time"]
            above = c["dense_above"]
            beats = c["beats_dense_above"]
            wins += bool(beats)
            rows.append([f"RAS {e['ratio']:g}@{e['steps']}", _f(e["compute"]), _f(e["psnr"]), _f(e["ssim"], "{:.4f}"),
                         "–" if above is None else f"dense {above['steps']}: {above['psnr']:.2f} / {above['ssim']:.4f}",
                         _f(c["delta_psnr"], "{:+.2f}"), _f(c["delta_ssim"], "{:+.4f}"),
                         _f(t["delta_psnr"], "{:+.2f}"), _f(t["delta_ssim"], "{:+.4f}"),
                         "–" if beats is None else ("yes" if beats else "no")])
        L += [_md_table(["RAS run", "compute", "PSNR", "SSIM", "cheapest dense ≥ its compute (PSNR / SSIM)",
                         "ΔPSNR @compute", "ΔSSIM @compute", "ΔPSNR @time", "ΔSSIM @time", "beats"], rows), ""]
        L += [f"RAS beats the dense run of at least equal compute in {wins} of {len(eq)} configurations.", ""]

    abl = res.get("ablations", [])
    for a in abl:
        L += [f"### Ablations at {a['steps']} steps, ratio {a['ratio']:g} (paper Table 3)", ""]
        rows = []
        base = next((v for v in a["variants"] if v["name"] == "default" and not v.get("skipped")), None)
        for v in a["variants"]:
            if not v["supported"]:
                rows.append([v["name"], "not supported", "", "", "", "", "", v["what"]])
            elif v.get("skipped"):
                rows.append([v["name"], "skipped (budget)", "", "", "", "", "", v["what"]])
            else:
                d = "" if base is None or v is base else f"{v['psnr'] - base['psnr']:+.2f}"
                rows.append([v["name"], _f(v["psnr"]), d, _f(v["ssim"], "{:.4f}"), _f(v["class_acc"], "{:.3f}"),
                             _f(v["compute"]), _where(v), v["what"]])
        L += [_md_table(["variant", "PSNR dB", "Δ vs default", "SSIM", "class acc.", "compute",
                         "steps on shape / bg", "what"], rows), ""]

    dist = res.get("distribution") or {}
    if dist.get("configs"):
        L += [f"### Distribution: {dist['samples']} samples per configuration vs {dist['samples']} real images", "",
              f"Fréchet distance of the shipped classifier's 192-d penultimate features (FID formula; not comparable "
              f"with Inception FID), real vs real at this sample count: {dist['real_vs_real_fd']:.3f}. Class accuracy: "
              f"the classifier finds the class asked for.", ""]
        L += [_md_table(["run", "compute", "ms / image", "FD ↓", "class acc. ↑"],
                        [[c["label"], _f(c["compute"]), _f(c["ms_per_image"], "{:.3f}"), _f(c["fd"], "{:.3f}"),
                          _f(c["class_acc"], "{:.3f}")] for c in dist["configs"]]), ""]
        pairs = []
        dense_d = [c for c in dist["configs"] if c["kind"] == "dense"]
        for c in (c for c in dist["configs"] if c["kind"] == "ras"):
            if not dense_d:
                break
            d = min(dense_d, key=lambda d: abs(d["compute"] - c["compute"]))
            verdict = "better" if c["fd"] < d["fd"] else "worse"
            pairs.append(f"{c['label']} (compute {c['compute']:.1f}) FD {c['fd']:.3f} vs {d['label']} ({d['compute']:.1f}) "
                         f"FD {d['fd']:.3f}: RAS {verdict}")
        if pairs:
            L += ["Compute-matched pairs: " + "; ".join(pairs) + ".", ""]
        if dist.get("skipped"):
            L += [f"Not run (budget): {', '.join(dist['skipped'])}.", ""]
    elif dist.get("skipped_reason"):
        L += [f"Distribution metric skipped: {dist['skipped_reason']}.", ""]

    if plot:
        L += [f"![quality vs compute]({plot})", "",
              f"[{os.path.basename(plot)}]({plot}): PSNR / SSIM to the reference against compute and measured time; "
              f"dense sampling as a line over its step counts, RAS per ratio over 7-28 steps; FD of the distribution runs.", ""]
    if samples:
        L += [f"![samples]({samples})", "", f"[{os.path.basename(samples)}]({samples}): the first fidelity images per run "
              f"(one row per run, same noise).", ""]
    if res.get("skipped"):
        L += ["Skipped: " + "; ".join(f"{s['what']} ({s['why']})" for s in res["skipped"]) + ".", ""]
    for n in res.get("notes", []):
        L += [f"Note: {n}.", ""]
    return "\n".join(L).rstrip() + "\n"


def _where(r: dict) -> str:
    if r.get("subject_steps") is None:
        return "–"
    return f"{r['subject_steps']:.1f} / {r['background_steps']:.1f}"


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "–"
    return f"{_f(r['psnr'])} / {r['ssim']:.4f} ({r['compute']:.1f})"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def plot_pareto(res: dict, path: str) -> Optional[str]:
    """Quality vs compute / time (matplotlib); returns None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # not installed here
        print(f"no plot: matplotlib is not available ({type(e).__name__}: {e})", flush=True)
        return None
    fid = res.get("fidelity", [])
    dense = sorted((r for r in fid if r["kind"] == "dense"), key=lambda r: r["steps"])
    ras = [r for r in fid if r["kind"] == "ras" and _is_default(r)]
    ratios = sorted({r["ratio"] for r in ras}, reverse=True)
    dist = (res.get("distribution") or {}).get("configs", [])
    panels = [("compute", "psnr"), ("compute", "ssim"), ("ms_per_image", "psnr")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9.5))
    axes = list(axes.flat)
    xl = {"compute": "transformer compute (dense-step equivalents)", "ms_per_image": "measured ms per image"}
    yl = {"psnr": "PSNR to dense-50 reference (dB)", "ssim": "SSIM to dense-50 reference"}
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for ax, (x, y) in zip(axes, panels):
        if dense:
            ax.plot([d[x] for d in dense], [d[y] for d in dense], "k-o", ms=3, label="dense, fewer steps")
            for d in dense:
                ax.annotate(str(d["steps"]), (d[x], d[y]), fontsize=6, xytext=(2, -7), textcoords="offset points")
        for c, q in zip(colors, ratios):
            pts = sorted((r for r in ras if r["ratio"] == q), key=lambda r: r["steps"])
            ax.plot([r[x] for r in pts], [r[y] for r in pts], "-s", color=c, ms=4, label=f"RAS {q:g}")
            for r in pts:
                ax.annotate(str(r["steps"]), (r[x], r[y]), fontsize=6, color=c, xytext=(2, 3), textcoords="offset points")
        ax.set_xlabel(xl[x])
        ax.set_ylabel(yl[y])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[3]
    if not dist:
        ax.text(0.5, 0.5, "distribution metric not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for kind, mk, col in (("dense", "o", "k"), ("ras", "s", "tab:red")):
            pts = [c for c in dist if c["kind"] == kind]
            ax.scatter([c["compute"] for c in pts], [c["fd"] for c in pts], marker=mk, color=col,
                       label="dense" if kind == "dense" else "RAS")
            for c in pts:
                ax.annotate(c["label"], (c["compute"], c["fd"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        rr = res["distribution"].get("real_vs_real_fd")
        if rr is not None:
            ax.axhline(rr, color="gray", ls="--", lw=1, label="real vs real")
        ax.set_xlabel(xl["compute"])
        ax.set_ylabel(f"FD, classifier features ({res['distribution']['samples']} samples) ↓")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    su = res["setup"]
    fig.suptitle(f"RAS vs dense on the shapes DiT: {su['device_name']}, {su['dtype']}"
                 + (" (quick CPU run)" if su["quick"] else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_strips(strips: dict[str, torch.Tensor], path: str, order: Sequence[str]) -> Optional[str]:
    """One row per run (first images of the fidelity set), labelled."""
    if not strips:
        return None
    import matplotlib.pyplot as plt

    names = ([k for k in order if k in strips] + [k for k in strips if k not in order])[:10]
    n = min(t.shape[0] for t in strips.values())
    fig = panel_figure([[strips[k][i] for i in range(n)] for k in names], [f"image {i}" for i in range(n)], names,
                       tile=1.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(res: dict, out: str) -> dict:
    os.makedirs(out, exist_ok=True)
    strips = res.pop("_strips", None)
    files = dict(json="quality.json", markdown="quality.md", plot=None, samples=None)
    if plot_pareto(res, os.path.join(out, "pareto.png")):
        files["plot"] = "pareto.png"
    if strips:
        ref_key = next((k for k in strips if k.endswith("(ref)")), None)
        order = [ref_key, "dense 28", "dense 12", "dense 7", "RAS 0.5@28", "RAS 0.25@28", "RAS 0.125@28",
                 "RAS 0.25@14", "RAS 0.25@7"]
        if save_strips(strips, os.path.join(out, "samples.png"), [o for o in order if o]):
            files["samples"] = "samples.png"
    res["files"] = files
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(jsonable(res), f, indent=2)
    with open(os.path.join(out, "quality.md"), "w") as f:
        f.write("# RAS quality benchmark\n\n" + render_markdown(res, files["plot"], files["samples"]))
    return files


def splice_doc(res: dict, src_dir: str, doc: str, text_only: bool = False) -> None:
    """Put the rendered results between the marker lines of ``doc``; pictures (and the JSON) go to
    <doc dir>/quality/ unless ``text_only``."""
    text = open(doc).read()
    if BEGIN_MARK not in text or END_MARK not in text:
        raise SystemExit(f"{doc}: no marker lines {BEGIN_MARK!r} / {END_MARK!r}")
    if text_only:
        _splice(doc, text, render_markdown(res, None, None))
        print(f"spliced the results (tables only) into {doc}")
        return
    pic_dir = os.path.join(os.path.dirname(os.path.abspath(doc)), "quality")
    os.makedirs(pic_dir, exist_ok=True)
    files = res.get("files") or {}
    links = {}

    def copy(name: str) -> None:
        src, dst = os.path.join(src_dir, name), os.path.join(pic_dir, name)
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)

    for k in ("plot", "samples"):
        if files.get(k) and os.path.isfile(os.path.join(src_dir, files[k])):
            copy(files[k])
            links[k] = f"quality/{files[k]}"
    copy("quality.json")
    block = render_markdown(res, links.get("plot"), links.get("samples"))
    block += "\nAll numbers: [quality/quality.json](quality/quality.json).\n"
    _splice(doc, text, block)
    print(f"spliced the results into {doc} (pictures in {pic_dir})")


def _splice(doc: str, text: str, block: str) -> None:
    head, rest = text.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    with open(doc, "w") as f:
        f.write(head + BEGIN_MARK + "\n" + block + END_MARK + tail)


def _unjson(x):
    if isinstance(x, str) and x in ("inf", "-inf", "nan"):
        return float(x)
    if isinstance(x, dict):
        return {k: _unjson(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    return x


def main(argv: Optional[Sequence[str]] = None, pipe=None, transform=None) -> dict:
    """Command line entry; ``pipe`` (a loaded ``ShapesPipeline`` or ``LatentShapesPipeline``) and ``transform`` (a shared
    ``shapes_eval.ReusedTransform``) let tests reuse one model and its captured graphs."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--head-to-head" in argv:
        import head_to_head  # benchmarks/head_to_head.py

        return head_to_head.main(argv, pipe=pipe, transform=transform)
    args = _parse(argv)
    if args.from_json:
        with open(args.from_json) as f:
            res = _unjson(json.load(f))
        src = os.path.dirname(os.path.abspath(args.from_json))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            if os.path.abspath(args.out) != src:
                for k in ("plot", "samples"):
                    name = (res.get("files") or {}).get(k)
                    if name and os.path.isfile(os.path.join(src, name)):
                        shutil.copyfile(os.path.join(src, name), os.path.join(args.out, name))
            files = res.get("files") or {}
            if plot_pareto(res, os.path.join(args.out, "pareto.png")):
                files["plot"] = "pareto.png"
            with open(os.path.join(args.out, "quality.md"), "w") as f:
                f.write("# RAS quality benchmark\n\n" + render_markdown(res, files.get("plot"), files.get("samples")))
        if args.doc:
            splice_doc(res, src, args.doc, args.doc_text_only)
        return res
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    res = run_benchmark(args, pipe=pipe, transform=transform)
    files = write_outputs(res, args.out)
    print(f"wrote {args.out}: " + ", ".join(v for v in files.values() if v) + f"  (total {time.perf_counter() - _T0:.1f} s)")
    if args.doc:
        splice_doc(res, os.path.abspath(args.out), args.doc, args.doc_text_only)
    return res


if __name__ == "__main__":
    main()

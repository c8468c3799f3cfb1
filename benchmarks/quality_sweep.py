"""The sampling of ``quality.py``: ``Bench`` (the pipeline, RAS module reuse, timing and the
wall-clock budget) and the sweep itself, ``run_benchmark``: the dense reference, dense runs with
fewer steps and RAS over steps x ratios (the fidelity set), the ablations, the precision floor,
and ``distribution``: the Fréchet distance of generated against real images.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Optional

import torch

from quality_metrics import cfg_key, equal_compute, image_metrics, run_record  # benchmarks/quality_metrics.py
from ras_ablations import ABLATIONS, TRANSFORM_ABLATIONS  # benchmarks/ras_ablations.py
from shapes_eval import ReusedTransform, computed_on_subject, initial_noise, subject_mask  # examples/shapes_eval.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "rasfx-quality/1"


def ints(s: str) -> list[int]:
    """A comma-separated option as ints."""
    return [int(x) for x in s.split(",") if x.strip()]


def floats(s: str) -> list[float]:
    """A comma-separated option as floats."""
    return [float(x) for x in s.split(",") if x.strip()]


def parse_spec(item: str) -> tuple[str, int, Optional[float]]:
    """``dense:STEPS`` / ``ras:STEPS:RATIO`` of ``--dist-configs`` -> (kind, steps, ratio or None)."""
    parts = item.strip().split(":")
    if parts[0] == "dense" and len(parts) == 2:
        return ("dense", int(parts[1]), None)
    if parts[0] == "ras" and len(parts) == 3:
        return ("ras", int(parts[1]), float(parts[2]))
    raise argparse.ArgumentTypeError(f"bad run spec {item!r}: use dense:STEPS or ras:STEPS:RATIO")


class Bench:
    """Pipeline, RAS module reuse, timing and the budget."""

    def __init__(self, args, pipe, device, dtype, transform=None, t0: Optional[float] = None):
        from rasfx import RASConfig, disable, enable
        from rasfx import stats as ras_stats
        from rasfx.sampler import build_plan

        self.RASConfig, self._enable, self._disable, self._stats, self._build_plan = (
            RASConfig, enable, disable, ras_stats, build_plan)
        self.args, self.pipe, self.device, self.dtype = args, pipe, device, dtype
        self.t0 = time.perf_counter() if t0 is None else t0  # the start of the --budget-s clock
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
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def plan(self, steps: int, cfg) -> tuple[int, list[float]]:
        """(dense steps, active shares of the RAS steps) of a run."""
        if cfg is None:
            return steps, []
        plan = self._build_plan(cfg, steps, self.num_tokens)
        shares = [plan.active[i] / plan.num_tokens for i in range(steps) if not plan.is_dense(i)]
        return steps - len(shares), shares

    def estimate(self, steps: int, cfg, batches: int = 1) -> float:
        key = (steps, cfg_key(cfg))
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
            self.measured[(steps, cfg_key(cfg))] = total / len(labels_b)
            if cfg is not None:
                self._learn(steps, cfg, total / len(labels_b))
        return torch.cat(outs), total, st


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _split(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """``x`` in batches of ``size`` along its first axis."""
    return list(x.split(size))


# ----------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(args, pipe=None, transform=None, t0: Optional[float] = None) -> dict:
    """The whole measurement (``quality.py``'s options in ``args``) -> the ``rasfx-quality/1`` result;
    ``t0``: when the --budget-s clock started (default: now)."""
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
    bench = Bench(args, pipe, device, dtype, transform, t0)
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
                   mode="eager", ras_steps=ints(args.ras_steps), ratios=floats(args.ratios),
                   dense_steps=ints(args.dense_steps)),
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
                            class_acc=image_metrics(ref, ref, labels, clf)["class_acc"])
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
        key = (steps, cfg_key(cfg), tag if transform is not None else "")
        if key in done:
            return done[key]
        label = (f"dense {steps}" if cfg is None else f"RAS {ratio:g}@{steps}") + (f" {tag}" if tag else "")
        if not bench.fits(f"fidelity run {label}", bench.estimate(steps, cfg, len(lab_b))):
            return None
        images, seconds, st = bench.run(lab_b, lat_b, steps, cfg, transform=transform)
        rec = run_record(kind, steps, ratio, cfg, seconds, n_fid, st, bench.plan(steps, cfg))
        rec.update(image_metrics(images, ref, labels, clf))
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
    for s in ints(args.dense_steps):
        r = fid_run("dense", s, None, None)
        if r is not None:
            fidelity.append(r)
    for s in sorted(ints(args.ras_steps), reverse=True):
        for ratio in floats(args.ratios):
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
            m = image_metrics(ref[:n_pf], ref32, labels[:n_pf], clf)
            res["precision_floor"] = dict(images=n_pf, steps=args.ref_steps, psnr=m["psnr"], ssim=m["ssim"],
                                          fp32_seconds=s32, seconds=time.perf_counter() - t)
            print(f"precision floor: dense {args.ref_steps} steps {res['setup']['dtype']} vs float32 on {n_pf} images: "
                  f"PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.4f}", flush=True)
            del pipe32

    # ---------------------------------------------------------------- distribution
    res["distribution"] = distribution(args, bench, clf, ncls, shape, device, dtype, generate_shapes, make_generator,
                                       frechet_distance)

    res["skipped"] = bench.skipped
    res["timing"]["total_s"] = time.perf_counter() - bench.t0
    res["_strips"] = strips
    return res


def distribution(args, bench: Bench, clf, ncls, shape, device, dtype, generate_shapes, make_generator, frechet_distance) -> dict:
    """Fréchet distance (classifier features) and class accuracy of the ``--dist-configs`` runs
    against real images, with fewer samples or fewer configs where ``--budget-s`` asks for it."""
    specs = [parse_spec(x) for x in args.dist_configs.split(",") if x.strip()]
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


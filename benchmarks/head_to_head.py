#!/usr/bin/env python3
"""Head to head at equal compute: dense sampling with fewer steps, RAS, diffusers' cache hooks
and rasfx's combined (token + step sparse) sampler, on either shapes model.

    python3 benchmarks/quality.py --head-to-head --out OUT/h2h                     # shapes-dit (GPU or CPU)
    python3 benchmarks/quality.py --head-to-head --model models/shapes-latent-dit --out OUT/h2h
    python3 benchmarks/quality.py --head-to-head --from-json OUT/h2h/head_to_head_shapes-dit.json \\
        --doc docs/quality.md                                                      # re-render, splice into the doc
    python3 benchmarks/quality.py --head-to-head --quick --out /tmp/h2h            # CPU: a tiny run (tests)

``--seeds`` seeds (default 3), each its own noise set of ``--images`` images and its own dense
``--ref-steps`` reference from that noise. Per method and seed: PSNR and SSIM against the
reference, class accuracy of the evaluation classifier (``examples/shapes_classifier.py``)
against the labels asked for, and the Fréchet distance of its features against the same seed's
reference images; per method the mean and a 95 % t-interval over the per-seed means
(``h2h_report.py``). Compute is in dense-step equivalents:

* dense with ``k`` steps: ``k``;
* rasfx (RAS, the combined sampler): ``rasfx.stats(pipe).flops_fraction`` times the steps;
* diffusers' cache hooks (``enable_cache`` with ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``,
  ``MagCacheConfig`` (ratios from its calibration mode), ``FasterCacheConfig``,
  ``PyramidAttentionBroadcastConfig``, ``SeaCacheConfig``; ``h2h_methods.py``): the share of the
  linear-layer multiply-adds a dense run of the same steps executes (counted by forward hooks).

Measured seconds per pipeline call are reported too (hooks: one run without the counters). The
JSON is rewritten after every method, and ``--budget-s`` skips the methods that would not finish
in time (listed), so a run that is cut short still leaves its results. Writes
``OUT/head_to_head_<model>.json`` (schema ``rasfx-head-to-head/2``), ``.md`` and ``.png`` (the
Pareto plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import h2h_methods as hm  # noqa: E402  (benchmarks/h2h_methods.py)
import h2h_report as hr  # noqa: E402  (benchmarks/h2h_report.py)
from ras_ablations import ABLATIONS  # noqa: E402  (benchmarks/ras_ablations.py)
from shapes_eval import ReusedTransform, initial_noise, jsonable, psnr, ssim  # noqa: E402  (examples/shapes_eval.py)

SCHEMA = "rasfx-head-to-head/2"
DEFAULT_MODEL = os.path.join(ROOT, "models", "shapes-dit")
#: seconds kept back for the plot and the last write
RESERVE_S = 15.0


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-to-head", action="store_true", help="(the switch that selects this mode in quality.py)")
    p.add_argument("--out", help="output folder (head_to_head_<model>.json / .md / .png)")
    p.add_argument("--quick", action="store_true", help="tiny CPU run for tests (2 seeds x 1 image, 3 steps)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="models/shapes-dit or models/shapes-latent-dit")
    p.add_argument("--classifier", default=hm.DEFAULT_CLASSIFIER,
                   help="the evaluation classifier (default: models/shapes-dit/classifier.safetensors, trained on "
                        "the shapes data; it judges the images of either model)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: bfloat16 on CUDA (as quality.py), float32 on CPU")
    p.add_argument("--images", type=int, default=64, help="images per seed (one batch; classes cycled)")
    p.add_argument("--seeds", type=int, default=3, help="noise sets, each with its own reference (default 3)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--steps", type=int, default=28, help="steps of RAS, the caches and the combined sampler")
    p.add_argument("--ref-steps", type=int, default=50)
    p.add_argument("--dense-steps", default="4,5,6,7,8,10,12,14,17,20,24,28")
    p.add_argument("--ratios", default="0.5,0.25,0.125", help="RAS ratios (0.5 is RASConfig()'s default)")
    p.add_argument("--ras-ablation", default="random",
                   help="RAS variants run besides the default at every ratio, comma separated, of: "
                        + ", ".join(a[0] for a in ABLATIONS) + " (default: random, the best PSNR of quality.py's "
                        "ablations at 28 steps / 0.25 on shapes-dit; 'default': none); the verdicts take the best")
    p.add_argument("--cache-settings", type=int, default=3,
                   help="settings per diffusers cache family, at most (2-3 defined; default 3)")
    p.add_argument("--combined-settings", type=int, default=16,
                   help="settings of the combined sampler, the first so many (16 defined: 7 each with both "
                        "estimates, then 6 with skips extrapolated, inactive tokens reused and one step in k "
                        "computed, then 3 with RAS steps between dense ones, inactive tokens extrapolated; "
                        "default 16)")
    p.add_argument("--combined-match", default="",
                   help="keep only the combined settings whose name contains this text (e.g. 'between dense'; "
                        "default: all of --combined-settings)")
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (default 480)")
    p.add_argument("--from-json", help="re-render the markdown and plot of an existing JSON (no sampling)")
    p.add_argument("--doc", help="splice the rendered results into this markdown file between the model's marker "
                                 "lines; plot and JSON are copied to <doc dir>/quality/")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.seeds, args.steps, args.ref_steps = 1, min(args.seeds, 2), 3, 4
        args.dense_steps, args.ratios, args.cache_settings, args.combined_settings = "1,2,3", "0.5", 1, 1
    args.ras_ablations = [a.strip() for a in args.ras_ablation.split(",") if a.strip()]
    unknown = sorted(set(args.ras_ablations) - {a[0] for a in ABLATIONS})
    if unknown:
        p.error(f"unknown --ras-ablation {unknown}; known: {', '.join(a[0] for a in ABLATIONS)}")
    if args.cache_settings < 0 or args.combined_settings < 0:
        p.error("--cache-settings and --combined-settings must be >= 0")
    if not args.from_json and not args.out:
        p.error("--out is required (unless --from-json)")
    if args.seeds < 1 or args.images < 1:
        p.error("--seeds and --images must be >= 1")
    return args


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


class Runner:
    """The pipelines, noise, references and classifier of one run; samples a method on a seed."""

    def __init__(self, args, pipe, transform, t0: float) -> None:
        import diffusers
        from shapes_classifier import load_classifier

        diffusers.utils.logging.set_verbosity_error()
        self.args, self.t0 = args, t0
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
        dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
        self.pipe = pipe if pipe is not None else hm.load_pipeline(args.model, device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.dtype = self.pipe.transformer.device, self.pipe.transformer.dtype
        self.transforms = {None: transform or ReusedTransform()}
        self.warmed: set = set()
        self.clf = load_classifier(hm.check_classifier(args.classifier), self.device)
        names = self.pipe.class_embeddings.class_names
        self.labels = [names[i % len(names)] for i in range(args.images)]
        self.label_idx = torch.tensor([i % len(names) for i in range(args.images)])
        self.shape = hm.noise_shape(self.pipe)
        self.seeds = [args.seed + j for j in range(args.seeds)]
        self.noise = {s: initial_noise([s * 1_000_003 + i for i in range(args.images)], self.shape) for s in self.seeds}
        self.hooked = None
        self.step_context: Optional[hm.StepContext] = None
        self.ref: dict[int, torch.Tensor] = {}
        self.ref_feats: dict[int, torch.Tensor] = {}
        self.dense_macs_per_step = 0.0
        self.ref_step_s = 0.0  # seconds per dense step (from the references)
        self.mag_ratios: Optional[list[float]] = None
        self.mag_note = ""

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def sample(self, pipe, steps: int, seed: int) -> tuple[torch.Tensor, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        images = pipe(self.labels, num_inference_steps=steps, guidance_scale=self.args.guidance,
                      latents=self.noise[seed].to(self.device, self.dtype)).images
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return images.float(), time.perf_counter() - t

    def references(self) -> dict:
        """The dense reference of every seed (the first one also counts the linear-layer work per step)."""
        per_seed = []
        for k, s in enumerate(self.seeds):
            if k == 0:
                with hm.LinearWork(self.pipe.transformer) as work:
                    images, seconds = self.sample(self.pipe, self.args.ref_steps, s)
                self.dense_macs_per_step = work.macs / self.args.ref_steps
            else:
                images, seconds = self.sample(self.pipe, self.args.ref_steps, s)
            pred, feats = self.clf.predict(images * 2 - 1)
            self.ref[s], self.ref_feats[s] = images, feats
            per_seed.append(dict(seed=s, seconds=seconds, class_acc=float((pred.cpu() == self.label_idx).float().mean())))
        return dict(hr.summarize(per_seed), per_seed=per_seed)

    def metrics(self, images: torch.Tensor, seed: int) -> dict:
        from shapes_classifier import frechet_distance

        p = psnr(images, self.ref[seed])
        finite = p[torch.isfinite(p)]
        pred, feats = self.clf.predict(images * 2 - 1)
        return dict(psnr=float(finite.mean()) if finite.numel() else None, identical=int((~torch.isfinite(p)).sum()),
                    ssim=float(ssim(images, self.ref[seed]).mean()),
                    class_acc=float((pred.cpu() == self.label_idx).float().mean()),
                    fd=frechet_distance(feats, self.ref_feats[seed]) if images.shape[0] > 1 else None)

    # ------------------------------------------------------------------ methods
    def transform_for(self, m: hm.Method):
        key = None if not m.transform else tuple(sorted(m.transform.items()))
        if key not in self.transforms:
            from rasfx import TransformConfig

            self.transforms[key] = ReusedTransform(TransformConfig(**m.transform))
        return key, self.transforms[key]

    def run_rasfx(self, m: hm.Method, seed: int) -> dict:
        import rasfx

        key, transform = self.transform_for(m)
        if key not in self.warmed and not self.args.quick:  # the one-time graph capture, untimed
            with rasfx.enabled(self.pipe, rasfx.RASConfig(), transform=transform):
                self.sample(self.pipe, m.steps, seed)
        self.warmed.add(key)
        with rasfx.enabled(self.pipe, rasfx.RASConfig(**m.fields), transform=transform):
            images, seconds = self.sample(self.pipe, m.steps, seed)
            st = rasfx.stats(self.pipe)
        return dict(self.metrics(images, seed), seed=seed, seconds=seconds, compute=st.flops_fraction * m.steps,
                    skipped_steps=list(st.skipped_steps))

    def hooks_ready(self) -> Optional[list[float]]:
        """The cache-capable pipeline and its step context; MagCache's calibrated ratios (or None)."""
        if self.hooked is None:
            self.hooked = hm.cache_capable(self.pipe)
            self.step_context = hm.StepContext(self.hooked.transformer, self.hooked.scheduler)
            calib = 10_000 + self.args.seed  # noise of its own, not one of the evaluation seeds
            self.noise[calib] = initial_noise([calib * 1_000_003 + i for i in range(self.args.images)], self.shape)
            self.mag_ratios, self.mag_note = hm.calibrate_magcache(
                lambda: self.sample(self.hooked, self.args.steps, calib), self.hooked.transformer, self.args.steps)
        return self.mag_ratios

    def run_cache(self, m: hm.Method, seed: int, timed: bool) -> dict:
        transformer = self.hooked.transformer
        transformer.enable_cache(m.make())
        try:
            with hm.LinearWork(transformer) as work, hm.diffusers_warnings() as warnings:
                images, seconds = self.sample(self.hooked, m.steps, seed)
        finally:
            transformer.disable_cache()
        out = dict(self.metrics(images, seed), seed=seed, compute=work.macs / self.dense_macs_per_step,
                   seconds=None if self.device.type == "cuda" else seconds, warnings=sorted(set(warnings)))
        if timed:  # again without the counters' overhead
            transformer.enable_cache(m.make())
            try:
                out["seconds"] = self.sample(self.hooked, m.steps, seed)[1]
            finally:
                transformer.disable_cache()
        return out

    def run(self, m: hm.Method, seed: int, first: bool) -> dict:
        if m.kind == "dense":
            images, seconds = self.sample(self.pipe, m.steps, seed)
            return dict(self.metrics(images, seed), seed=seed, seconds=seconds, compute=float(m.steps))
        if m.kind == "rasfx":
            return self.run_rasfx(m, seed)
        # CUDA: the hooks' time from a second run without the work counters (their forward hooks
        # cost launches and syncs there); CPU: the counted run's time (the counters cost little)
        return self.run_cache(m, seed, timed=first and not self.args.quick and self.device.type == "cuda")

    def estimate_s(self, m: hm.Method) -> float:
        step_s = self.ref_step_s
        factor = {"dense": 1.0, "rasfx": 1.3, "cache": 1.6}[m.kind]
        runs = len(self.seeds) + (1 if m.kind == "cache" and not self.args.quick and self.device.type == "cuda" else 0)
        capture = 0.0 if m.kind != "rasfx" or self.transform_for(m)[0] in self.warmed else 20.0 + m.steps * step_s
        return runs * m.steps * step_s * factor + capture


def run_head_to_head(args, pipe=None, transform=None, t0: Optional[float] = None, save=None) -> dict:
    import diffusers
    import rasfx

    t0 = time.perf_counter() if t0 is None else t0
    r = Runner(args, pipe, transform, t0)
    model = os.path.basename(os.path.normpath(args.model))
    name = torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else "CPU"
    res: dict[str, Any] = dict(
        schema=SCHEMA,
        setup=dict(model=model, pipeline=type(r.pipe).__name__, device=str(r.device), device_name=name,
                   dtype=str(r.dtype).replace("torch.", ""), torch=torch.__version__, diffusers=diffusers.__version__,
                   rasfx=rasfx.__version__, images=args.images, seeds=len(r.seeds), seed_ids=r.seeds,
                   steps=args.steps, ref_steps=args.ref_steps, guidance=args.guidance, noise_shape=list(r.shape),
                   quick=bool(args.quick), budget_s=args.budget_s, ras_ablation=args.ras_ablation,
                   classifier=os.path.relpath(os.path.abspath(args.classifier), ROOT),
                   fd_against="the same seed's dense reference images (classifier features)",
                   compute="dense-step equivalents; rasfx: flops_fraction x steps; hooks: linear-layer MAC share"),
        methods=[], not_applicable=[], skipped=[], notes=[], hook_warnings={})
    save = save or (lambda res: None)
    print(f"head to head on {model} ({type(r.pipe).__name__}), {name}, {res['setup']['dtype']}: {len(r.seeds)} seeds x "
          f"{args.images} images, {args.steps} steps; budget {args.budget_s:g} s", flush=True)
    res["reference"] = r.references()
    r.ref_step_s = res["reference"]["seconds"]["mean"] / args.ref_steps
    print(f"  references: {args.ref_steps} steps, {res['reference']['seconds']['mean']:.2f} s per seed", flush=True)
    save(res)

    # Families take turns (a budget cut leaves some of each): the first of dense, RAS, combined, then
    # the cache hooks (None: built when reached, after MagCache's calibration) alternating with the rest.
    dense = hm.dense_methods(_ints(args.dense_steps))
    ras = hm.ras_methods([float(x) for x in args.ratios.split(",") if x.strip()], args.steps, args.ras_ablations)
    combined = [m for m in hm.combined_methods(args.steps, args.combined_settings) if args.combined_match in m.name]
    queue: list[Optional[hm.Method]] = [x[0] for x in (dense, ras, combined) if x] + [None] + interleave(
        dense[1:], ras[1:], combined[1:])
    failed_hooks: set = set()
    while queue:
        m = queue.pop(0)
        if m is None:
            if r.left() < RESERVE_S + 2 * args.steps * r.ref_step_s:
                res["skipped"].append("diffusers cache hooks (MagCache calibration)")
                continue
            mag = r.hooks_ready()
            if mag is None:
                res["not_applicable"].append(dict(name="MagCache", reason=r.mag_note))
            else:
                res["notes"].append(f"MagCache ratios {r.mag_note}")
            cache, not_applicable = hm.cache_methods(args.steps, r.step_context, mag, args.cache_settings,
                                                     packed_tokens=hasattr(r.pipe, "_pack_latents"))
            res["not_applicable"] += not_applicable
            queue = interleave(cache, queue)
            continue
        if m.hook in failed_hooks:
            continue
        if r.estimate_s(m) > r.left() - RESERVE_S:
            res["skipped"].append(m.name)
            print(f"  skipped {m.name} (budget: {r.left():.0f} s left, needs ~{r.estimate_s(m):.0f} s)", flush=True)
            continue
        rec = run_method(r, m, res, failed_hooks)
        if rec is None:
            continue
        res["methods"].append(rec)
        print(f"  {m.family:9s} {m.name:48s} compute {rec['compute']['mean']:5.2f}  PSNR {hr.fmt_ci(rec['psnr'])}  "
              f"SSIM {hr.fmt_ci(rec['ssim'], '{:.3f}')}", flush=True)
        save(res)
    if r.step_context is not None:
        r.step_context.remove()
    return res


def interleave(*lists: list) -> list:
    """Round robin: the first of each list, then the second of each, ... (shorter lists drop out)."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def run_method(r: Runner, m: hm.Method, res: dict, failed_hooks: set) -> Optional[dict]:
    """``m`` on every seed: its record, or None for a cache hook that does not apply to the model
    (raises, or gives up and runs every step in full: listed, and its other settings skipped)."""
    per_seed: list[dict] = []
    try:
        for k, s in enumerate(r.seeds):
            per_seed.append(r.run(m, s, first=k == 0))
            fail_open = [w for w in per_seed[-1].get("warnings", []) if "fail-open" in w]
            if fail_open and per_seed[-1]["compute"] >= m.steps - 1e-6:
                raise RuntimeError("runs every step in full here: " + fail_open[0])
    except Exception as e:
        if m.kind != "cache":
            raise
        failed_hooks.add(m.hook)
        res["not_applicable"].append(dict(name=m.hook, reason=f"{type(e).__name__}: {e}"))
        print(f"  diffusers {m.hook}: does not apply ({type(e).__name__}: {e})", flush=True)
        return None
    rec = dict(family=m.family, name=m.name, kind=m.kind, hook=m.hook, steps=m.steps, config=m.fields or None,
               transform=m.transform, per_seed=per_seed, **hr.summarize(per_seed))
    rec["compute_share"] = rec["compute"]["mean"] / r.args.steps  # of the dense --steps run
    if m.kind == "cache" and rec["compute"]["mean"] >= m.steps - 1e-6:
        res["notes"].append(f"{m.name} computed every step in full on this model (no saving)")
    for w in sorted({w for s in per_seed for w in s.get("warnings", [])}):
        if w not in res["hook_warnings"].setdefault(m.hook, []):
            res["hook_warnings"][m.hook].append(w)
    return rec


def finish(res: dict) -> dict:
    """Winners, verdicts and the target from the methods so far."""
    res["winners"] = hr.winners(res["methods"], res["setup"]["steps"])
    res["target"] = hr.target(res["winners"])
    return res


def write_outputs(res: dict, out: str, plot: bool) -> dict:
    os.makedirs(out, exist_ok=True)
    stem = f"head_to_head_{res['setup']['model']}"
    files = dict(json=f"{stem}.json", markdown=f"{stem}.md", plot=None)
    finish(res)
    if plot and hr.plot_pareto(res, os.path.join(out, f"{stem}.png")):
        files["plot"] = f"{stem}.png"
    res["files"] = files
    with open(os.path.join(out, files["json"]), "w") as f:
        json.dump(jsonable(res), f, indent=1)
    with open(os.path.join(out, files["markdown"]), "w") as f:
        f.write(f"# Head to head at equal compute: {res['setup']['model']}\n\n" + hr.render_markdown(res, files["plot"]))
    return files


def main(argv: Optional[Sequence[str]] = None, pipe=None, transform=None) -> dict:
    """Command line entry; ``pipe`` (a loaded pipeline) and ``transform`` (a shared
    ``shapes_eval.ReusedTransform``) let tests reuse one model and its captured graphs."""
    t0 = time.perf_counter()
    args = _parse(argv)
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        src = os.path.dirname(os.path.abspath(args.from_json))
        out = args.out or src
        files = write_outputs(res, out, plot=True)
        if args.doc:
            hr.splice_doc(res, out, files, args.doc)
        return res
    res = run_head_to_head(args, pipe, transform, t0, save=lambda res: write_outputs(res, args.out, plot=False))
    res["total_s"] = time.perf_counter() - t0
    files = write_outputs(res, args.out, plot=True)
    print(f"wrote {args.out}: " + ", ".join(v for v in files.values() if v) + f"  (total {res['total_s']:.1f} s)")
    if args.doc:
        hr.splice_doc(res, args.out, files, args.doc)
    return res


if __name__ == "__main__":
    main()

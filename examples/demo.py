#!/usr/bin/env python3
"""rasfx demo: plain sampling vs region-adaptive sampling (RAS) on the shipped shapes DiT.

    python examples/demo.py                      # what `make demo` runs (CPU: about 4-6 minutes)
    python examples/demo.py --quick --out /tmp/o # a tiny run (tests)

What it does:

1. loads the shipped pipeline (``models/shapes-dit``: a 10.4 M-parameter diffusers
   ``SD3Transformer2DModel`` in pixel space, 64x64 RGB, 1024 image tokens) with
   ``shapes_pipeline.load_pipeline``; ``--model models/shapes-latent-dit`` runs the latent model
   (``AutoencoderKL`` + ``FluxTransformer2DModel``, 256 latent tokens) the same way;
2. warms up: RAS's one-time graph capture (``torch.export``) and the first call of every
   configuration, timed and reported apart;
3. times ``--rounds`` interleaved rounds of the same job (one image per class, 28 Euler steps,
   guidance 4.0, the same initial noise every time) with the plain pipeline and with
   ``rasfx.enable(pipe, RASConfig(ratio))`` at each ratio, the order rotating from round to round
   (plain, 0.5, 0.25 / 0.5, 0.25, plain / ...), so that a change of the machine's load hits every
   configuration alike; reports the median wall time and the median process CPU time of each;
4. compares every RAS image with the plain image from the same noise (PSNR, SSIM: torchmetrics);
5. writes ``outputs/``: ``comparison.png`` (the images, PSNR / SSIM and the measured speed-up on
   them), ``heatmaps.png`` (how many steps computed each token, one colour scale, the shape
   outlined), ``noise_std.png`` (what RAS ranks tokens by), ``results.json`` and ``report.md`` /
   ``report.html``.

On a CUDA GPU it runs RAS in rasfx's default fast mode (``TransformConfig(mode="auto")``: CUDA
graphs) and prints the mode that ran. On a CPU, RAS runs eagerly; when the median wall time
shows no speed-up, the demo says why with the numbers it measured (CPU time, load).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Optional, Sequence

# torch's CPU threads spin-wait between ops by default; on a busy (shared) machine that costs several
# times the work itself. Sleeping threads cost nothing measurable on an idle one. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from demo_report import fidelity_text, heatmap_rows, timing_table, where_text, write_outputs  # noqa: E402  (examples/, beside this file)
from shapes_eval import ReusedTransform, computed_on_subject, initial_noise, psnr, ssim, subject_mask  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "models", "shapes-dit")
DEFAULT_CLASSES = "star,heart,ring"

__all__ = ["main", "ReusedTransform"]


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder: models/shapes-dit (default) or models/shapes-latent-dit")
    p.add_argument("--steps", type=int, default=28, help="Euler steps (default 28)")
    p.add_argument("--ratios", default="0.5,0.25", help="RAS ratios, comma separated (default 0.5,0.25)")
    p.add_argument("--classes", default=DEFAULT_CLASSES, help=f"class names or ids, one image each (default {DEFAULT_CLASSES})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; medians are reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="image i uses initial-noise seed SEED + i")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--no-warmup", action="store_true",
                   help="no warm-up: the first RAS run's time then includes the one-time graph capture")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 1 class, 2 steps, 2 rounds, no warm-up")
    args = p.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 2)
        args.classes = args.classes.split(",")[0]
        args.rounds = min(args.rounds, 2)
        args.no_warmup = True
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform
        return float("nan")


class Job:
    """One configuration (plain, or RAS at a ratio) of the same sampling job."""

    def __init__(self, pipe, labels, latents, guidance: float, device: torch.device, reuse: ReusedTransform,
                 ratio: Optional[float]):
        self.pipe, self.labels, self.latents, self.guidance, self.device = pipe, labels, latents, guidance, device
        self.reuse, self.ratio = reuse, ratio
        self.name = "plain" if ratio is None else f"RAS {ratio:g}"
        self.rounds: list[dict] = []  # wall_s, cpu_s, load per timed round
        self.images: Optional[torch.Tensor] = None
        self.stats = None
        self.repeatable = True  # every round gave the same images

    def __call__(self, steps: int, desc: str) -> tuple[torch.Tensor, float, float]:
        """Runs the pipeline; returns (images (B, 3, H, W) float32 CPU, wall s, process CPU s)."""
        import rasfx

        self.pipe.set_progress_bar_config(desc=desc, leave=False, dynamic_ncols=True)
        if self.ratio is not None:
            rasfx.enable(self.pipe, rasfx.RASConfig(ratio=self.ratio), transform=self.reuse)
        try:
            _sync(self.device)
            w0, c0 = time.perf_counter(), time.process_time()
            images = self.pipe(self.labels, num_inference_steps=steps, guidance_scale=self.guidance,
                               latents=self.latents).images
            _sync(self.device)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            if self.ratio is not None:
                self.stats = rasfx.stats(self.pipe)
        finally:
            if self.ratio is not None:
                rasfx.disable(self.pipe)
        return images.float().cpu(), wall, cpu

    def timed(self, steps: int, round_index: int) -> None:
        load0 = _load()
        images, wall, cpu = self(steps, f"round {round_index + 1} {self.name:9s}")
        self.rounds.append(dict(wall_s=wall, cpu_s=cpu, load=(load0 + _load()) / 2))
        if self.images is None:
            self.images = images
        elif not torch.equal(images, self.images):
            self.repeatable = False
        print(f"  round {round_index + 1}  {self.name:9s} wall {wall:6.1f} s  CPU {cpu:6.1f} s", flush=True)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.rounds)


def main(argv: Optional[Sequence[str]] = None, pipe=None, transform: Optional[ReusedTransform] = None) -> dict:
    """Command line entry; ``pipe`` (a loaded ``ShapesPipeline`` or ``LatentShapesPipeline``) and ``transform`` (a shared
    :class:`ReusedTransform`) let tests reuse one model and its captured graphs."""
    args = _parse(argv)
    t_start = time.perf_counter()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    import diffusers

    diffusers.utils.logging.set_verbosity_error()  # no loader chatter; the demo prints what matters
    import rasfx
    from shapes_pipeline import load_pipeline

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    t0 = time.perf_counter()
    if pipe is None:
        pipe = load_pipeline(args.model, device=device, dtype=getattr(torch, args.dtype))
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    args.dtype = str(dtype).replace("torch.", "")
    load_s = time.perf_counter() - t0
    names = pipe.class_embeddings.class_names
    labels = pipe.labels_to_tensor([int(c) if c.isdigit() else c for c in (c.strip() for c in args.classes.split(",")) if c])
    label_names = [names[i] for i in labels.tolist()]
    seeds = [args.seed + i for i in range(len(labels))]
    latents = initial_noise(seeds, tuple(pipe.noise_shape(1)[1:])).to(device, dtype)
    mode_note = ("CUDA GPU: RAS runs in rasfx's default fast mode (TransformConfig(mode='auto') = CUDA graphs); "
                 "the plain pipeline runs eager PyTorch" if device.type == "cuda" else
                 "CPU: RAS and the plain pipeline both run eager PyTorch (CUDA graphs need a CUDA GPU)")
    print(f"rasfx {rasfx.__version__} demo: plain sampling vs RAS on {os.path.relpath(args.model, ROOT)}")
    print(f"device {device} ({_device_name(device)}), {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads of {os.cpu_count()} cores\n{mode_note}")
    print(f"{len(labels)} images ({', '.join(label_names)}), {args.steps} steps, guidance {args.guidance}, "
          f"RAS ratios {', '.join(f'{r:g}' for r in ratios)}, {args.rounds} interleaved timing rounds\n")

    reuse = transform if transform is not None else ReusedTransform()
    jobs = [Job(pipe, labels, latents, args.guidance, device, reuse, r) for r in [None] + ratios]
    warm: dict = {}
    if not args.no_warmup:  # graph capture + first calls, 2 steps of every configuration (one RAS step)
        for job in jobs:
            _, wall, cpu = job(2, f"warm-up {job.name}")
            warm[job.name] = dict(wall_s=wall, cpu_s=cpu)
        print("warm-up (graph capture and first calls, 2 steps each, not timed below): "
              + ", ".join(f"{k} {v['wall_s']:.1f} s" for k, v in warm.items()), flush=True)
    for k in range(args.rounds):
        for job in jobs[k % len(jobs):] + jobs[: k % len(jobs)]:  # rotate the order every round
            job.timed(args.steps, k)

    results = summarize(args, jobs, device)
    results.update(device=str(device), device_name=_device_name(device), mode_note=mode_note, dtype=args.dtype,
                   torch=torch.__version__, diffusers=diffusers.__version__, rasfx=rasfx.__version__,
                   threads=torch.get_num_threads(), cores=os.cpu_count(), platform=platform.platform(),
                   model=os.path.relpath(args.model, ROOT), classes=label_names, seeds=seeds, load_s=load_s,
                   warmup=warm, quick=args.quick)
    modes = sorted({r["mode"] for r in results["runs"][1:] if r.get("mode")})
    print(f"\nRAS ran in mode {', '.join(modes) or '?'} (rasfx.stats(pipe).mode)"
          + ("; CUDA graphs were expected here: see rasfx.stats(pipe).notes" if device.type == "cuda"
             and modes != ["cuda_graph"] else ""))
    print("\n" + timing_table(results) + "\n")
    print("\n".join(results["verdict"]))
    print("\n" + fidelity_text(results))
    print("\n" + where_text(results))
    heat = heatmap_rows(jobs, jobs[0].images)
    out = os.path.abspath(args.out)
    results["total_s"] = time.perf_counter() - t_start
    files = write_outputs(out, results, jobs, heat)
    print(f"\nwrote {out}/: {', '.join(files)}  (total {results['total_s']:.0f} s)")
    return results


def summarize(args: argparse.Namespace, jobs: list[Job], device: torch.device) -> dict:
    """The numbers of a demo run: medians, speed-ups, fidelity, where RAS computed, the verdict."""
    plain = jobs[0]
    mask = subject_mask(plain.images)  # (B, H, W): the shape, estimated from the plain images
    runs = []
    for job in jobs:
        wall, cpu = job.median("wall_s"), job.median("cpu_s")
        st = job.stats
        run = dict(name=job.name, ratio=job.ratio, rounds=job.rounds, wall_s=wall, cpu_s=cpu,
                   speedup_wall=plain.median("wall_s") / wall, speedup_cpu=plain.median("cpu_s") / cpu if cpu > 0 else float("nan"),
                   speedup_wall_per_round=[p["wall_s"] / r["wall_s"] for p, r in zip(plain.rounds, job.rounds)],
                   cpu_share=cpu / wall / torch.get_num_threads() if wall > 0 else float("nan"),
                   load=statistics.median(r["load"] for r in job.rounds), repeatable=job.repeatable,
                   flops_fraction=1.0 if st is None else st.flops_fraction,
                   psnr=psnr(job.images, plain.images).tolist(), ssim=ssim(job.images, plain.images).tolist())
        if st is not None:
            run.update(mode=st.mode, dense_steps=st.dense_steps, ras_steps=st.ras_steps, ras_ratio=st.ras_ratio,
                       longest_inactive_streak=st.longest_inactive_streak, computed=computed_on_subject(st, mask),
                       summary=st.summary())
        runs.append(run)
    res = dict(steps=args.steps, guidance=args.guidance, ratios=[j.ratio for j in jobs[1:]], rounds=args.rounds, runs=runs)
    res["verdict"] = verdict(res, device)
    return res


def verdict(res: dict, device: torch.device) -> list[str]:
    """Plain sentences: was RAS faster in median wall time, and if not, why (with the numbers)."""
    plain = res["runs"][0]
    lines = []
    for run in res["runs"][1:]:
        rounds = ", ".join(f"{s:.2f}x" for s in run["speedup_wall_per_round"])
        bound = f"the FLOPs bound is {1 / run['flops_fraction']:.2f}x"
        if run["speedup_wall"] > 1:
            lines.append(f"{run['name']}: {run['speedup_wall']:.2f}x faster than plain in median wall time over "
                         f"{res['rounds']} rounds (per round: {rounds}); {run['speedup_cpu']:.2f}x less CPU time; {bound}.")
        elif run["speedup_cpu"] > 1 and device.type == "cpu":
            lines.append(
                f"{run['name']}: NOT faster in median wall time ({run['speedup_wall']:.2f}x; per round: {rounds}), "
                f"although it used {run['speedup_cpu']:.2f}x less CPU time ({bound}). The wall time measured the "
                f"machine, not RAS: the process got {100 * run['cpu_share']:.0f}% (RAS) and "
                f"{100 * plain['cpu_share']:.0f}% (plain) of its {torch.get_num_threads()} threads' time, with a load "
                f"average of {run['load']:.1f} on {os.cpu_count()} cores: other processes had the cores. Run the demo "
                f"on an idle machine, or read the CPU-time column.")
        else:
            lines.append(f"{run['name']}: NOT faster ({run['speedup_wall']:.2f}x wall, {run['speedup_cpu']:.2f}x CPU time; "
                         f"{bound}): at this size the per-op overhead of RAS (gathers, scatters, cache copies, Python) "
                         f"outweighs the FLOPs it saves on this device.")
    if not all(r["repeatable"] for r in res["runs"]):
        lines.append("Note: some configuration gave different images from round to round (non-deterministic kernels).")
    return lines


if __name__ == "__main__":
    main()

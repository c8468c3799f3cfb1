"""Context parallelism with region-adaptive sampling: per-image time on 1, 2, 4, 8 GPUs.

For each model case (real-size architectures with random weights, the model's diffusers pipeline,
random prompt embeddings of the real shapes, ``output_type="latent"``; builders shared with
``bench_pipeline.py``) and each GPU count, the setups:

* ``dense`` (1 GPU): the plain pipeline;
* ``rasfx RAS`` : ``rasfx.enable(pipe, RASConfig(ratio=R))``, on 1 GPU without ``parallel``,
  on more GPUs with ``parallel=rasfx.ParallelConfig()`` (tokens of every step shared equally);
* ``rasfx dense CP``: the same at ratio 1 across the GPUs (rasfx's dense context parallelism);
* ``diffusers CP``: diffusers' own context parallelism (``transformer.enable_parallelism(
  ContextParallelConfig(ulysses_degree=G))``, ring where the heads do not divide) for models
  with a ``_cp_plan`` (Flux, Wan); last, since it cannot be undone on the transformer.

Every setup runs one warm-up image (capture, compilation) and ``--images`` timed images (the
median is reported; the time of an image is the slowest rank's). The rasfx rows add, from
``rasfx.stats(pipe).parallel``, the worst imbalance of a RAS step (max / mean active tokens per
rank) and that of contiguous sharding of the same active set, and the bytes a rank receives per
RAS and per dense step.

The driver starts one ``torchrun`` per GPU count (``python -m torch.distributed.run
--standalone --nproc-per-node G bench_parallel.py --worker ...``); rank 0 of each writes its rows
after every setup, so a run cut short by ``--budget-s`` keeps what it measured. Output: JSON
(``--out``) and a markdown table (``--md``).

    # CPU, gloo, tiny Flux and Wan on 1 and 2 processes (a test runs this)
    python benchmarks/bench_parallel.py --quick --out par.json --md par.md
    # 8 GPUs (one host): Flux.1-dev 1024 / 2048, Wan 2.1 1.3B / 14B at 720p, 81 frames
    python benchmarks/bench_parallel.py --gpus 1,2,4,8 --cases flux-1024,flux-2048,wan-1.3b,wan-14b \\
        --ratio 0.25 --out par.json --md par.md --budget-s 3000

Keep NCCL's NVLink multicast off (``NCCL_NVLS_ENABLE=0``, set here unless already set).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

#: case -> (pipeline, transformer config overrides (None: bench_models' real geometry), size, steps)
CASES = {
    "flux-1024": ("flux", None, (1024, 1024), 28),
    "flux-2048": ("flux", None, (2048, 2048), 28),
    "wan-1.3b": ("wan", None, (720, 1280, 81), 50),
    "wan-14b": ("wan", dict(num_attention_heads=40, ffn_dim=13824, num_layers=40), (720, 1280, 81), 50),
    # --quick (CPU): tiny configs, a few steps
    "flux-tiny": ("flux", "tiny", (128, 128), 8),
    "wan-tiny": ("wan", "tiny", (64, 96, 9), 8),
}
SETUPS = ("dense", "rasfx RAS", "rasfx dense CP", "diffusers CP")


# ----------------------------------------------------------------------------- worker (every rank)
def build(case, dev, dt):
    """(pipe, call kwargs of image ``i``): the case's pipeline (``bench_pipeline.build_pipeline``:
    weights N(0, 0.02) drawn on ``dev``, the same on every rank: same seed)."""
    import bench_pipeline

    name, overrides, size, _ = CASES[case]
    scale = "tiny" if overrides == "tiny" else "real"
    torch.manual_seed(0)
    if dev.type == "cuda":
        torch.cuda.manual_seed(0)
    pipe, txt, dim, pooled = bench_pipeline.build_pipeline(name, scale, dev, dt,
                                                           overrides if isinstance(overrides, dict) else None)

    def call(i, steps):
        return bench_pipeline.call_kwargs(name, scale, dev, dt, txt, dim, pooled, i, steps=steps, sizes={i: size})

    return pipe, call


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _slowest(seconds, dev):
    """The slowest rank's time (every rank calls)."""
    import torch.distributed as dist

    t = torch.tensor([seconds], dtype=torch.float64, device=dev if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _parallel_fields(pipe):
    import rasfx

    st = rasfx.stats(pipe)
    out = {"ras_steps": len(st.ras_steps), "steps": len(st.steps)}
    par = getattr(st, "parallel", None)
    if par is not None:
        out.update(imbalance=par.max_imbalance, contiguous_imbalance=par.max_contiguous_imbalance,
                   ras_bytes_per_step=par.ras_bytes_per_step, dense_bytes_per_step=par.dense_bytes_per_step)
    return out


def time_setup(pipe, call, steps, images, dev):
    """Warm-up image, then ``images`` timed ones; the median of the slowest rank's times."""
    import torch.distributed as dist

    times = []
    for i in range(images + 1):
        kw = call(i, steps)
        dist.barrier()
        _sync(dev)
        t = time.perf_counter()
        pipe(**kw)
        _sync(dev)
        seconds = _slowest(time.perf_counter() - t, dev)
        if i:
            times.append(seconds)
    return {"per_image_s": statistics.median(times), "times_s": times}


def run_case(case, args, dev, dt, emit):
    """Every setup of ``case`` at this world size (every rank calls; rank 0 emits the rows)."""
    import torch.distributed as dist

    import rasfx

    world = dist.get_world_size()
    name, _, size, default_steps = CASES[case]
    steps = args.steps or default_steps
    pipe, call = build(case, dev, dt)
    setups = ["dense", "rasfx RAS"] if world == 1 else ["rasfx RAS", "rasfx dense CP", "diffusers CP"]
    ras = None
    for setup in setups:
        row = {"case": case, "model": name, "size": list(size), "setup": setup, "gpus": world, "steps": steps,
               "ratio": 1.0 if setup in ("dense", "rasfx dense CP", "diffusers CP") else args.ratio}
        if time.time() > args.deadline:
            row["skipped"] = "budget (--budget-s) spent"
        elif setup == "diffusers CP" and dev.type != "cuda":
            row["skipped"] = "diffusers' context parallelism needs an accelerator (it places its mesh on one)"
        elif setup == "diffusers CP" and getattr(pipe.transformer, "_cp_plan", None) is None:
            row["skipped"] = f"{type(pipe.transformer).__name__} has no diffusers context-parallel plan"
        if "skipped" in row:
            emit(row)
            continue
        try:
            if setup == "dense" or setup == "diffusers CP":
                if setup == "diffusers CP":
                    row.update(_enable_diffusers_cp(pipe, world))
                row.update(time_setup(pipe, call, steps, args.images, dev))
            else:
                if ras is None:  # one capture, shared by the setups of this case
                    ras = rasfx.transform(pipe.transformer, rasfx.TransformConfig(mode=args.mode))
                parallel = rasfx.ParallelConfig(timeout_s=args.timeout_s) if world > 1 else None
                with rasfx.enabled(pipe, rasfx.RASConfig(ratio=row["ratio"]), transform=lambda m, ras=ras: ras,
                                   parallel=parallel):
                    row.update(time_setup(pipe, call, steps, args.images, dev))
                    row.update(_parallel_fields(pipe))
        except Exception as e:  # an out-of-memory setup (one GPU for 14B at 720p) or no diffusers plan
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            if args.verbose:
                traceback.print_exc()
        if dev.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        emit(row)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        dist.barrier()
    del pipe, ras
    gc.collect()


def _enable_diffusers_cp(pipe, world):
    """diffusers' own context parallelism on ``pipe.transformer``: Ulysses where the heads divide
    by ``world``, else ring attention (the caller checks that the model has a plan)."""
    from diffusers import ContextParallelConfig

    tr = pipe.transformer
    heads = tr.config.num_attention_heads
    kind = "ulysses_degree" if heads % world == 0 else "ring_degree"
    tr.enable_parallelism(config=ContextParallelConfig(**{kind: world}))
    return {"diffusers_cp": kind.removesuffix("_degree")}


def worker(args):
    import datetime

    import torch.distributed as dist

    cuda = torch.cuda.is_available() and not args.cpu
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s),
                            device_id=dev if cuda else None)
    dt = torch.bfloat16 if cuda else torch.float32
    rows = []

    def emit(row):
        rows.append(row)
        if dist.get_rank() == 0:
            with open(args.rows, "w") as f:
                json.dump(rows, f)
            print(_row_line(row), flush=True)

    try:
        for case in args.cases.split(","):
            run_case(case, args, dev, dt, emit)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver
def _row_line(r):
    head = f"{r['case']:10s} {r['setup']:15s} {r['gpus']} GPU(s): "
    if "per_image_s" in r:
        extra = "".join(f", {k} {r[k]:.3f}" for k in ("imbalance", "contiguous_imbalance") if r.get(k) is not None)
        return head + f"{r['per_image_s']:.3f} s per image{extra}"
    return head + r.get("error", r.get("skipped", "?"))


def _mib(x):
    return "-" if x is None else f"{x / 2**20:.2f}"


def markdown(doc):
    """One table per case: per-image time per setup and GPU count, then the rasfx RAS rows'
    speed-up over dense context parallelism on the same GPUs, imbalance and bytes."""
    out = [f"Device: {doc['device']}; ratio {doc['ratio']}; {doc['images']} timed image(s) after one warm-up; "
           "per-image time of the slowest rank (median).", ""]
    gpus = sorted({r["gpus"] for r in doc["rows"]})
    for case in dict.fromkeys(r["case"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["case"] == case]
        at = {(r["setup"], r["gpus"]): r for r in rows}
        out += [f"### {case} ({'x'.join(map(str, rows[0]['size']))}, {rows[0]['steps']} steps)", "",
                "| setup | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |",
                "|---|" + "---:|" * len(gpus)]
        for setup in SETUPS:
            if not any((setup, g) in at for g in gpus):
                continue
            cells = []
            for g in gpus:
                r = at.get((setup, g))
                cells.append("" if r is None else f"{r['per_image_s']:.3f} s" if "per_image_s" in r
                             else "error" if "error" in r else "n/a")
            out.append(f"| {setup} | " + " | ".join(cells) + " |")
        out += ["", "| GPUs | RAS vs dense CP (rasfx) | RAS vs diffusers CP | imbalance | contiguous sharding "
                "| MiB/rank per RAS step | per dense step |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for g in gpus:
            r = at.get(("rasfx RAS", g))
            if r is None or "per_image_s" not in r or g == 1:
                continue

            def vs(setup, r=r, g=g):
                d = at.get((setup, g), {})
                return f"{d['per_image_s'] / r['per_image_s']:.2f}x" if "per_image_s" in d else "-"

            out.append(f"| {g} | {vs('rasfx dense CP')} | {vs('diffusers CP')} | {r.get('imbalance', 1.0):.3f} | "
                       f"{r.get('contiguous_imbalance', 1.0):.3f} | {_mib(r.get('ras_bytes_per_step'))} | "
                       f"{_mib(r.get('dense_bytes_per_step'))} |")
        notes = [r for r in rows if "error" in r or "skipped" in r]
        out += [""] + [f"- {r['setup']} on {r['gpus']}: {r.get('error') or r['skipped']}" for r in notes]
        out += [""] if notes else []
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="flux-1024,flux-2048,wan-1.3b,wan-14b", help=f"comma list of {list(CASES)}")
    ap.add_argument("--gpus", default="1,2,4,8", help="comma list of GPU (process) counts, each <= the GPUs here")
    ap.add_argument("--ratio", type=float, default=0.25, help="RASConfig.ratio of the rasfx RAS setups")
    ap.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: Flux 28, Wan 50)")
    ap.add_argument("--images", type=int, default=1, help="timed images per setup (after one warm-up image)")
    ap.add_argument("--mode", default="auto", help="TransformConfig.mode of the rasfx setups")
    ap.add_argument("--timeout-s", type=float, default=600.0,
                    help="ParallelConfig / process-group timeout: a rank that fails stops the others after it")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting setups after this many seconds")
    ap.add_argument("--quick", action="store_true", help="CPU / gloo: tiny Flux and Wan on 1 and 2 processes")
    ap.add_argument("--cpu", action="store_true", help="run on CPUs (gloo) even where GPUs exist")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--md", default=None, help="write the markdown tables here")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.cpu = True
        args.gpus = "1,2" if args.gpus == ap.get_default("gpus") else args.gpus
        args.cases = "flux-tiny,wan-tiny" if args.cases == ap.get_default("cases") else args.cases
        args.steps = args.steps or 6
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; one of {list(CASES)}")
    cpu = args.cpu or not torch.cuda.is_available()
    gpus = [int(g) for g in args.gpus.split(",")]
    if not cpu and max(gpus) > torch.cuda.device_count():
        ap.error(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPUs here")
    start = time.time()
    deadline = start + args.budget_s if args.budget_s else float("inf")
    env = dict(os.environ, NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE", "0"),
               PYTHONPATH=os.pathsep.join([os.path.join(HERE, ".."), os.environ.get("PYTHONPATH", "")]))
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    doc = {"device": device, "quick": args.quick, "ratio": args.ratio, "images": args.images, "gpus": gpus,
           "cases": args.cases.split(","), "rows": [], "launches": []}
    for g in gpus:
        with tempfile.TemporaryDirectory() as tmp:
            rows_path = os.path.join(tmp, "rows.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={g}",
                   os.path.abspath(__file__), "--worker", "--rows", rows_path, "--cases", args.cases,
                   "--ratio", str(args.ratio), "--images", str(args.images), "--mode", args.mode,
                   "--timeout-s", str(args.timeout_s), "--deadline", str(deadline)]
            cmd += ["--steps", str(args.steps)] if args.steps else []
            cmd += ["--cpu"] if cpu else []
            cmd += ["--verbose"] if args.verbose else []
            left = deadline - time.time()
            launch = {"gpus": g, "command": " ".join(cmd)}
            if left <= 0:
                launch["skipped"] = "budget (--budget-s) spent"
            else:  # the budget stops new setups; a setup running past it gets twice the rest
                try:
                    r = subprocess.run(cmd, env=env, timeout=None if left == float("inf") else 2 * left + 300)
                    launch["returncode"] = r.returncode
                except subprocess.TimeoutExpired:
                    launch["returncode"] = "timeout"
                if os.path.exists(rows_path):
                    with open(rows_path) as f:
                        doc["rows"] += json.load(f)
            doc["launches"].append(launch)
        doc["elapsed_s"] = round(time.time() - start, 1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)
    md = markdown(doc)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    failed = [x for x in doc["launches"] if x.get("returncode") not in (0, None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

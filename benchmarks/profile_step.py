"""Where the time of one step goes: GPU kernel time by category, kernel counts, and the gap
between the kernels' sum and the step's CUDA-graph replay time.

For a real-size architecture with random weights (see bench_models.py): the original model, the
transformed model's dense step, and RAS steps at a few ratios. Kernels are profiled in an eager
run (torch.profiler, CUDA activity) and classified by name; the same step replayed as a CUDA
graph gives the wall time, so ``replay - kernels`` is what launching and scheduling cost inside
the graph (the per-kernel gaps), not the kernels themselves.

    python benchmarks/profile_step.py --model sd3 --ratios 0.25,0.125 --out profile.md
    python benchmarks/profile_step.py --model sd3 --mode compile --out profile_compiled.md

``--mode compile`` profiles the ``torch.compile``d original against rasfx's compile mode (kernel
times of the compiled functions, replay of compile+cuda_graph): compiled against compiled.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter, defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models as bm  # noqa: E402

import rasfx  # noqa: E402

# first match wins; names of cuBLAS / CUTLASS / flash / cuDNN / ATen / Triton kernels
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa"),
    ("gemm", r"gemm|xmma|cutlass|cublas|nvjet|sm90_|matmul|splitK"),
    ("gather/scatter", r"index|gather|scatter|take"),
    ("copy/cat", r"copy|Memcpy|Memset|CatArray|cat_|direct_copy"),
    ("norm", r"norm|welford|reduce"),
    ("elementwise", r"."),
)


def categorize(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "elementwise"


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_shapes(prof, iters: int) -> list[tuple[str, str, float, float]]:
    """(op, input shapes, calls per step, GPU ms per step) of the GEMM ops of a profile, slowest
    first: which GEMMs shrink with the active tokens and which do not (adaLN rows, text stream)."""
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        if evt.key not in GEMM_OPS:
            continue
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0) or 0.0
        rows.append((evt.key, str(evt.input_shapes), evt.count / iters, us / 1e3 / iters))
    return sorted(rows, key=lambda r: -r[3])


def kernel_times(fn, iters: int = 3) -> tuple[dict, int, Counter, list]:
    """(ms per call by category, kernels per call, top kernels by time, GEMMs by shape) of ``fn``
    run without CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    by_cat: dict = defaultdict(float)
    top: Counter = Counter()
    count = 0
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA") is False:
            continue
        us = getattr(e, "device_time", None)
        if us is None:
            us = getattr(e, "cuda_time", 0.0)
        if not us:
            continue
        by_cat[categorize(e.name)] += us / 1e3 / iters
        top[e.name[:60]] += us / 1e3 / iters
        count += 1
    return dict(by_cat), count // iters, top, gemm_shapes(prof, iters)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd3", choices=sorted(bm.MODELS))
    ap.add_argument("--ratios", default="0.5,0.25,0.125")
    ap.add_argument("--out", default="profile.md")
    ap.add_argument("--mode", default="eager", choices=["eager", "compile"],
                    help="eager: kernels of the eager graphs, replay of cuda_graph; compile: both compiled")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        model, kw, n_img, n_txt = bm.MODELS[args.model]("real", dev, dt)
    model = model.to(dev, dt).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    f = lambda n: (n + n_txt) / (n_img + n_txt)  # noqa: E731
    compiled = args.mode == "compile"
    eager = rasfx.transform(model, rasfx.TransformConfig(mode="compile" if compiled else "eager"))
    graphed = rasfx.transform(model, rasfx.TransformConfig(mode="compile+cuda_graph" if compiled else "cuda_graph"))
    original = torch.compile(model, dynamic=False) if compiled else model
    g = torch.Generator().manual_seed(0)
    cases = [("original", None), ("RAS dense step", "dense")]
    cases += [(f"RAS r={r}", float(r)) for r in args.ratios.split(",")]
    rows, tops, gemm_rows = [], {}, {}
    with torch.no_grad():
        for m in (eager, graphed):
            m(**kw)  # capture, dense caches
        for label, what in cases:
            if what is None:
                fn_eager = lambda: original(**kw)  # noqa: E731
                fn_graph = bm.GraphedModel(fn_eager, dev)
                n = n_img
            else:
                n = n_img if what == "dense" else bm.active_count(what, n_img)
                idx = None if what == "dense" else torch.randperm(n_img, generator=g)[:n].sort().values.to(dev)
                for m in (eager, graphed):
                    m.set_active(idx, check=False)
                fn_eager = lambda: eager(**kw)  # noqa: E731
                fn_graph = lambda: graphed(**kw)  # noqa: E731
            cats, count, top, gemms = kernel_times(fn_eager)
            replay, _ = bm.time_call(fn_graph, dev, 10)
            eager_ms, _ = bm.time_call(fn_eager, dev, 5)
            total = sum(cats.values())
            rows.append((label, f(n), cats, count, total, replay, eager_ms))
            tops[label] = top.most_common(12)
            gemm_rows[label] = gemms[:12]
            print(f"{label}: kernels {count}, kernel time {total:.2f} ms, graph replay {replay:.2f} ms, "
                  f"eager {eager_ms:.2f} ms, {dict((k, round(v, 2)) for k, v in cats.items())}", flush=True)
    names = [c for c, _ in CATEGORIES]
    lines = [
        f"# Step profile: {bm.LABELS[args.model]} on {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16"
        + (", compiled (torch.compile)" if compiled else ""),
        "",
        "GPU kernel time per step (ms, run under torch.profiler without CUDA graph) by kernel category; `replay`",
        "is the same step replayed as a CUDA graph (wall time), `gaps` = replay - kernel time; `eager wall` is the",
        "step's wall time without CUDA graph.",
        "",
        "| step | f | " + " | ".join(names) + " | kernels | kernel time | replay | gaps | eager wall |",
        "|" + "---|" * (len(names) + 7),
    ]
    for label, share, cats, count, total, replay, eager_ms in rows:
        cells = " | ".join(f"{cats.get(c, 0.0):.2f}" for c in names)
        lines.append(f"| {label} | {share:.3f} | {cells} | {count} | {total:.2f} | {replay:.2f} | "
                     f"{replay - total:.2f} | {eager_ms:.2f} |")
    lines += ["", "Top kernels by time (ms per step):", ""]
    for label, top in tops.items():
        lines.append(f"* {label}: " + "; ".join(f"`{k}` {v:.2f}" for k, v in top))
    lines += ["", "GEMMs by input shapes (GPU ms per step, calls per step), slowest first:", ""]
    for label, gemms in gemm_rows.items():
        lines += [f"* {label}:"] + [f"  * `{op}` {shapes}: {ms:.2f} ms, {calls:g} calls" for op, shapes, calls, ms in gemms]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

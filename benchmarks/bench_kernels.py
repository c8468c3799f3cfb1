"""Benchmark the gather-/scatter-fused GeMMs against unfused PyTorch and plain cuBLAS.

Shapes are those of a RAS step on SD3-medium (hidden 1536) and Flux (hidden 3072):
4096 image tokens per sample, batch 2 and 1, a fraction `ratio` of the tokens active.
Per case, in bf16, GPU time per call from `triton.testing.do_bench_cudagraph` (the calls
replayed as a CUDA graph, as rasfx runs them: host launch overhead excluded; `--timer launch`
times eager launches with `do_bench` instead, which for these 10-200 us GeMMs mostly
measures the Python launch path):

* gather:  gather_linear(x, idx, W, b)            vs  F.linear(x[:, idx], W, b)
* scatter: linear_scatter_(cache, x_act, idx, W, b) vs  cache.index_copy_(1, idx, F.linear(x_act, W, b))
* cuBLAS:  F.linear(x_act, W, b) on the same number of rows, no gather or scatter: the
  speed a fused kernel would reach if gathering/scattering were free.

The fused column measures the Triton kernels themselves: the script sets
RASFX_KERNELS_PATH=fused (by default the ops run, per shape, the faster of the fused kernel and
the unfused path; see rasfx/kernels/_common.py FasterPath).

"% cuBLAS" is cuBLAS time / op time (100% = as fast as the dense GeMM of the same size).
Needs only torch and triton and a CUDA GPU:

    python benchmarks/bench_kernels.py --out bench_kernels.md
    python benchmarks/bench_kernels.py --sweep-tiles --hidden 1536 --out tiles.md   # every tile, no autotuner
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TOKENS = 4096
MODELS = {1536: "SD3-medium", 3072: "Flux"}


def import_kernels():
    """Import rasfx.kernels without needing rasfx's own dependencies.

    rasfx.kernels needs only torch and triton, but `import rasfx.kernels` first runs
    rasfx/__init__.py, which may import heavier modules (diffusers, ...). If that fails,
    load the kernels package under a bare `rasfx` namespace instead.
    """
    try:
        return importlib.import_module("rasfx.kernels")
    except ImportError:
        if "rasfx.kernels" in sys.modules:
            # rasfx/__init__.py got as far as importing the kernels (and so registering the
            # custom ops, which must not happen twice) before something else failed.
            return sys.modules["rasfx.kernels"]
        for name in [m for m in sys.modules if m == "rasfx" or m.startswith("rasfx.")]:
            del sys.modules[name]
        pkg = types.ModuleType("rasfx")
        pkg.__path__ = [str(ROOT / "rasfx")]
        sys.modules["rasfx"] = pkg
        return importlib.import_module("rasfx.kernels")


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def operands(hidden, batch, ratio, device, dtype=torch.bfloat16):
    """(n, generator, x, weight, bias) of one benchmark shape, seeded by the shape."""
    n = max(1, round(TOKENS * ratio))
    g = torch.Generator(device="cpu").manual_seed(hidden * 10 + batch)
    x = torch.randn(batch, TOKENS, hidden, generator=g).to(device, dtype)  # x: [B, 4096, H]
    w = (torch.randn(hidden, hidden, generator=g) / hidden**0.5).to(device, dtype)  # weight: [H, H]
    b = torch.randn(hidden, generator=g).to(device, dtype)  # bias: [H]
    return n, g, x, w, b


def bench_case(kernels, do_bench, hidden, batch, ratio, per_row, rep, warmup, device="cuda"):
    """Time the variants for one shape; returns table rows (gather, scatter)."""
    dtype = torch.bfloat16
    n, g, x, w, b = operands(hidden, batch, ratio, device, dtype)
    if per_row:
        idx = torch.stack([torch.randperm(TOKENS, generator=g)[:n].sort().values for _ in range(batch)])  # [B, n]
    else:
        idx = torch.randperm(TOKENS, generator=g)[:n].sort().values  # [n]
    idx = idx.to(device)
    x_act = kernels.gather_rows(x, idx).contiguous()  # x_act: [B, n, H], the active tokens
    cache = torch.zeros(batch, TOKENS, hidden, device=device, dtype=dtype)  # cache: [B, 4096, H]
    ref_cache = torch.zeros_like(cache)

    def gather_unfused():
        return F.linear(kernels.gather_rows(x, idx), w, b)

    def scatter_unfused():
        kernels.scatter_rows_(ref_cache, F.linear(x_act, w, b), idx)

    # Correctness first (and autotuning, outside the timed region).
    y_fused = kernels.gather_linear(x, idx, w, b)
    torch.testing.assert_close(y_fused, gather_unfused(), rtol=2e-2, atol=2e-2)
    kernels.linear_scatter_(cache, x_act, idx, w, b)
    scatter_unfused()
    torch.testing.assert_close(cache, ref_cache, rtol=2e-2, atol=2e-2)

    def timed(fn):
        return do_bench(fn, warmup=warmup, rep=rep)

    t_cublas = timed(lambda: F.linear(x_act, w, b))
    t = {
        "gather": (timed(lambda: kernels.gather_linear(x, idx, w, b)), timed(gather_unfused)),
        "scatter": (timed(lambda: kernels.linear_scatter_(cache, x_act, idx, w, b)), timed(scatter_unfused)),
    }
    flops = 2.0 * batch * n * hidden * hidden
    rows = []
    for op, (t_fused, t_unfused) in t.items():
        rows.append(
            [
                MODELS.get(hidden, "-"),
                str(hidden),
                str(batch),
                f"{ratio:g}",
                str(n),
                op,
                f"{t_fused:.4f}",
                f"{t_unfused:.4f}",
                f"{t_cublas:.4f}",
                f"{tflops(flops, t_fused):.0f}",
                f"{tflops(flops, t_unfused):.0f}",
                f"{tflops(flops, t_cublas):.0f}",
                f"{100 * t_cublas / t_fused:.0f}%",
                f"{100 * t_cublas / t_unfused:.0f}%",
                f"{t_unfused / t_fused:.2f}x",
            ]
        )
    return rows


def sweep_tiles(kernels, do_bench, hidden, batch, ratio, rep, warmup, device="cuda"):
    """Every tile of the autotuning sets, launched without the autotuner: which tile, if
    any, reaches cuBLAS at this shape (rows: op, tile, ms, % cuBLAS)."""
    from rasfx.kernels import _common, gather_gemm, scatter_gemm

    dtype = torch.bfloat16
    n, g, x, w, b = operands(hidden, batch, ratio, device, dtype)
    idx = torch.randperm(TOKENS, generator=g)[:n].sort().values.to(device)  # [n]
    x_act = kernels.gather_rows(x, idx).contiguous()  # [B, n, H]
    cache = torch.zeros(batch, TOKENS, hidden, device=device, dtype=dtype)
    t_cublas = do_bench(lambda: F.linear(x_act, w, b), warmup=warmup, rep=rep)
    rows = []
    tiles = _common._HOPPER_TILES + _common._DEFAULT_TILES + EXTRA_TILES
    saved = gather_gemm.launch_mode, scatter_gemm.launch_mode
    try:
        for tile in dict.fromkeys(_common.tile_key(t) for t in tiles):
            meta = _common.tile_meta(tile)
            gather_gemm.launch_mode = scatter_gemm.launch_mode = lambda m=meta: (False, False, m)
            for op, fn in (("gather", lambda: kernels.gather_linear(x, idx, w, b)),
                           ("scatter", lambda: kernels.linear_scatter_(cache, x_act, idx, w, b))):
                try:
                    fn()
                    ms = do_bench(fn, warmup=warmup, rep=rep)
                    rows.append([str(hidden), str(batch), f"{ratio:g}", str(n), op, str(tile), f"{ms:.4f}",
                                 f"{t_cublas:.4f}", f"{100 * t_cublas / ms:.0f}%"])
                except Exception as e:  # a tile may not fit this GPU's shared memory
                    rows.append([str(hidden), str(batch), f"{ratio:g}", str(n), op, str(tile), "-", f"{t_cublas:.4f}",
                                 type(e).__name__])
                print(" | ".join(rows[-1]), flush=True)
    finally:
        gather_gemm.launch_mode, scatter_gemm.launch_mode = saved
    return rows


# Candidates beyond the autotuning sets, tried by --sweep-tiles only.
EXTRA_TILES = (
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 128, 128, 4, 3),
    (128, 64, 128, 4, 3),
    (128, 128, 64, 8, 5, 64),
    (128, 128, 128, 8, 2, 64),
    (64, 128, 64, 4, 5, 64),
    (64, 128, 128, 4, 3, 64),
    (64, 128, 64, 8, 4, 64),
)

SWEEP_HEADER = ["hidden", "B", "ratio", "rows", "op", "tile (BM, BN, BK, warps, stages, BN2)", "ms", "cuBLAS ms",
                "% cuBLAS"]

HEADER = [
    "model",
    "hidden",
    "B",
    "ratio",
    "rows",
    "op",
    "fused ms",
    "unfused ms",
    "cuBLAS ms",
    "fused TFLOP/s",
    "unfused TFLOP/s",
    "cuBLAS TFLOP/s",
    "fused % cuBLAS",
    "unfused % cuBLAS",
    "fused speedup",
]


def markdown_table(rows, header=None) -> str:
    header = header or HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ["RASFX_KERNELS_PATH"] = "fused"  # time the kernels, not the per-shape choice
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("bench_kernels.md"), help="markdown output file"
    )
    parser.add_argument("--hidden", type=int, nargs="+", default=[1536, 3072])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25, 0.125])
    parser.add_argument("--per-row", action="store_true", help="a [B, n] index (one row set per sample)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    parser.add_argument("--timer", choices=["cudagraph", "launch"], default="cudagraph",
                        help="cudagraph: GPU time of calls replayed as a CUDA graph (default); launch: eager do_bench")
    parser.add_argument("--sweep-tiles", action="store_true", help="time every tile without the autotuner")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench as _do_bench
    from triton.testing import do_bench_cudagraph

    def do_bench(fn, warmup, rep):
        if args.timer == "launch":
            return _do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        return do_bench_cudagraph(fn, rep=rep, return_mode="median")

    kernels = import_kernels()
    if not kernels.use_triton(torch.empty(0, device="cuda")):
        print("bench_kernels: the Triton kernels are not in use (TRITON_INTERPRET set?)", file=sys.stderr)
        return 2

    if args.sweep_tiles:
        rows = []
        for hidden in args.hidden:
            for batch in args.batch:
                for ratio in args.ratios:
                    rows += sweep_tiles(kernels, do_bench, hidden, batch, ratio, args.rep, args.warmup)
        report = (f"# Tile sweep of the fused GeMMs\n\n{torch.cuda.get_device_name()} | triton {triton.__version__} | "
                  f"bf16 | timer {args.timer}\n\n" + markdown_table(rows, SWEEP_HEADER) + "\n")
        args.out.write_text(report)
        print(f"wrote {args.out}")
        return 0

    rows = []
    for hidden in args.hidden:
        for batch in args.batch:
            for ratio in args.ratios:
                new = bench_case(kernels, do_bench, hidden, batch, ratio, args.per_row, args.rep, args.warmup)
                for r in new:
                    print(" | ".join(r), flush=True)
                rows += new

    index_kind = "per-row [B, n]" if args.per_row else "shared [n]"
    title = (
        f"# rasfx fused gather/scatter GeMM benchmark\n\n"
        f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | bf16 | "
        f"{TOKENS} image tokens | index {index_kind} | timer {args.timer} (median)\n\n"
        "fused % cuBLAS = time of F.linear on the same rows without gather/scatter / time of the op.\n"
    )
    report = title + "\n" + markdown_table(rows) + "\n"
    print()
    print(report)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

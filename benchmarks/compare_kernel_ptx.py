"""Compile the gather / scatter GeMM kernels of two source trees for a GPU target, without a GPU,
and compare the PTX each gives: instructions per opcode, for every load path (pointers, TMA) and
tile shape (one column block, two).

A refactor of the kernels' Python (e.g. a main loop shared through ``triton.jit`` helpers, which
Triton inlines) that leaves every count unchanged emits the same instructions; only their order
and the register names may differ. This is the check that runs where no GPU is at hand; the
timing check is ``benchmarks/run_kernels_ab.sh`` on a GPU.

    git archive REV rasfx | tar -x -C outputs/baseline
    python benchmarks/compare_kernel_ptx.py outputs/baseline .          # sm_90 (Hopper)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTERS = {"x_ptr", "idx_ptr", "w_ptr", "w2_ptr", "bias_ptr", "y_ptr", "cache_ptr"}


def kernels(root: str) -> dict:
    """The two kernels of the tree at ``root`` (its ``rasfx`` package imported afresh)."""
    for name in [k for k in sys.modules if k == "rasfx" or k.startswith("rasfx.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        gather = importlib.import_module("rasfx.kernels.gather_gemm")._gather_linear_kernel
        scatter = importlib.import_module("rasfx.kernels.scatter_gemm")._linear_scatter_kernel
    finally:
        sys.path.pop(0)
    return {"gather": gather, "scatter": scatter}


def ptx(kernel, *, tma: bool, block_n2: int, arch: int) -> str:
    """PTX of ``kernel`` for bf16 operands, 128 x 128 (+ block_n2) x 64 tiles, 8 warps, 3 stages."""
    fn = triton.jit(getattr(kernel, "fn", kernel))
    names = fn.arg_names
    scatter = "cache_ptr" in names
    consts = dict(HAS_BIAS=True, INPUT_PRECISION="tf32", DOT_IN_FP32=False, EVEN_K=True, X_TMA=tma and scatter,
                  W_TMA=tma, BLOCK_M=128, BLOCK_N=128, BLOCK_N2=block_n2, BLOCK_K=64, GROUP_M=8)
    signature = {}
    for n in names:
        if n in consts:
            signature[n] = "constexpr"
        elif tma and n == "x_ptr" and scatter:
            signature[n] = "tensordesc<bf16[128,64]>"
        elif tma and n in ("w_ptr", "w2_ptr"):
            signature[n] = f"tensordesc<bf16[{128 if n == 'w_ptr' else max(block_n2, 16)},64]>"
        elif n in POINTERS:
            signature[n] = "*i64" if n == "idx_ptr" else "*bf16"
        else:
            signature[n] = "i32"
    source = ASTSource(fn, signature, {(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=8, num_stages=3))
    return compiled.asm["ptx"]


def opcodes(text: str) -> Counter:
    """Instructions of a PTX listing, counted by opcode (directives, labels and braces left out)."""
    counts: Counter = Counter()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith((".", "//", "$", "{", "}", "(", ")")) or line.endswith(":"):
            continue
        counts[line.split()[0].rstrip(";")] += 1
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", help="root of the older tree (holds rasfx/)")
    p.add_argument("after", help="root of the newer tree")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: Hopper)")
    args = p.parse_args(argv)
    old, new = kernels(args.before), kernels(args.after)
    same_everywhere = True
    print(f"triton {triton.__version__}, sm_{args.arch}, bf16, tiles 128 x (128 + BLOCK_N2) x 64, 8 warps, 3 stages")
    for name in ("gather", "scatter"):
        for tma in (False, True):
            for block_n2 in (0, 64):
                a = opcodes(ptx(old[name], tma=tma, block_n2=block_n2, arch=args.arch))
                b = opcodes(ptx(new[name], tma=tma, block_n2=block_n2, arch=args.arch))
                changed = {k: b[k] - a[k] for k in sorted(set(a) | set(b)) if a[k] != b[k]}
                same_everywhere &= not changed
                mma = [sum(v for k, v in c.items() if "mma" in k) for c in (a, b)]
                print(f"{name:7s} {'TMA' if tma else 'pointers':8s} BLOCK_N2={block_n2:<3d} instructions "
                      f"{sum(a.values())} -> {sum(b.values())}, mma {mma[0]} -> {mma[1]}, "
                      f"{'same opcode counts' if not changed else f'changed: {changed}'}")
    print("every variant emits the same instructions" if same_everywhere else "some variants differ (above)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

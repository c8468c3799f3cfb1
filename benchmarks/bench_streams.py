"""Can two CUDA streams fill the GPU better than one at RAS-step sizes?

A RAS step at r <= 0.25 runs hundreds of small kernels (GEMMs of 600-2000 rows) whose
ramp-up and tail leave SMs idle; a CFG batch has two independent halves. This script times
the original model at the token counts of such steps (a proxy: the plain model on a smaller
latent, so its GEMMs have the RAS step's row counts) in three ways, each replayed as one CUDA
graph, side by side in one run:

* ``one call``: the batch of 2 in one forward (what runs today);
* ``halves, one stream``: two batch-1 forwards one after the other;
* ``halves, two streams``: the two batch-1 forwards on two streams forked and joined inside
  the graph, so each half's kernels can fill the other's idle SMs.

    python benchmarks/bench_streams.py --models sd3,pixart --sizes 128,64,46 --out streams.md
    python benchmarks/bench_streams.py --models sd3 --sizes 46 --compile --out streams_compiled.md

``--sizes``: latent side lengths (128 = 4096 image tokens at patch 2, 64 = 1024, 46 = 529).
GPU only.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_models import MODELS  # noqa: E402


def _half(kw, i):
    return {k: (v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 2 else v) for k, v in kw.items()}


def time_model(name, sizes, compiled, dev, dt) -> list[str]:
    import triton.testing

    torch.manual_seed(0)
    with torch.device(dev):
        model, kw, _, n_txt = MODELS[name]("full", dev, dt, batch=2)
    model = model.to(dev, dt).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    fn = torch.compile(model, dynamic=False) if compiled else model
    side = torch.cuda.Stream()
    rows = []
    for hw in sizes:
        x = kw["hidden_states"]
        kw2 = dict(kw, hidden_states=torch.randn(*x.shape[:2], hw, hw, device=dev, dtype=dt))
        halves = [_half(kw2, 0), _half(kw2, 1)]

        def one():
            with torch.no_grad():
                return fn(**kw2)

        def seq():
            with torch.no_grad():
                return fn(**halves[0]), fn(**halves[1])

        def two():
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.no_grad():
                a = fn(**halves[0])
                with torch.cuda.stream(side):
                    b = fn(**halves[1])
            main.wait_stream(side)
            return a, b

        with torch.no_grad():
            ref = fn(**kw2)[0].float()
            got = torch.cat([fn(**h)[0] for h in halves]).float()
        err = ((got - ref).norm() / ref.norm()).item()
        # do_bench_cudagraph captures each function as one CUDA graph and times its replays
        t = {k: triton.testing.do_bench_cudagraph(f, rep=200) for k, f in
             (("one", one), ("seq", seq), ("two", two))}
        tokens = (hw // 2) ** 2
        row = (f"| {name} | {'compiled' if compiled else 'eager'} | {tokens} + {n_txt} | {t['one']:.3f} | "
               f"{t['seq']:.3f} | {t['two']:.3f} | {t['two'] / t['one']:.3f} | {err:.1e} |")
        print(row, flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sd3,pixart")
    ap.add_argument("--sizes", default="128,64,46", help="latent side lengths")
    ap.add_argument("--compile", action="store_true", help="torch.compile(dynamic=False) the model first")
    ap.add_argument("--out", default=None, help="write the table (markdown) here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_streams.py times CUDA graphs and needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    out = [f"card: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
           "| model | mode | tokens (image + text) | batch 2, one call ms | halves, one stream ms | "
           "halves, two streams ms | two streams / one call | halves vs batch (rel. err) |",
           "|---|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    for name in args.models.split(","):
        out += time_model(name, [int(s) for s in args.sizes.split(",")], args.compile, dev, dt)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

This file is the command line; the sampling sweep is ``quality_sweep.py``, the metrics and the
equal-compute comparison ``quality_metrics.py``, the tables, plots and doc splice ``quality_report.py``.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from typing import Optional, Sequence  # noqa: E402

# torch's CPU threads spin-wait between ops by default; on a busy (shared) machine that costs several
# times the work itself. Sleeping threads cost nothing measurable on an idle one. Must precede torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from h2h_methods import DEFAULT_CLASSIFIER  # noqa: E402  (benchmarks/h2h_methods.py)
from quality_report import (  # noqa: E402, F401  (benchmarks/quality_report.py)
    BEGIN_MARK, END_MARK, plot_pareto, render_markdown, splice_doc, write_outputs,
)
from quality_sweep import SCHEMA, run_benchmark  # noqa: E402, F401  (benchmarks/quality_sweep.py)
from ras_ablations import ABLATIONS  # noqa: E402  (benchmarks/ras_ablations.py)

DEFAULT_MODEL = os.path.join(ROOT, "models", "shapes-dit")

DIST_DEFAULT = "dense:28,ras:28:0.25,dense:12,ras:14:0.25,dense:7,ras:28:0.5,dense:17"


# ----------------------------------------------------------------------------------------------
# Arguments



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
# Driver


def _unjson(x):
    """JSON back to numbers: "inf" / "-inf" / "nan" strings (written by ``jsonable``) as floats."""
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
    res = run_benchmark(args, pipe=pipe, transform=transform, t0=_T0)
    files = write_outputs(res, args.out)
    print(f"wrote {args.out}: " + ", ".join(v for v in files.values() if v) + f"  (total {time.perf_counter() - _T0:.1f} s)")
    if args.doc:
        splice_doc(res, os.path.abspath(args.out), args.doc, args.doc_text_only)
    return res


if __name__ == "__main__":
    main()

"""What a user waits for: whole diffusers pipeline calls, dense vs. rasfx, side by side.

Real pipelines (StableDiffusion3Pipeline, FluxPipeline, PixArtSigmaPipeline, WanPipeline) with
real-size transformers (the architectures of bench_models.py, weights re-drawn from N(0, 0.02):
never zeros), the pipeline's usual scheduler and ``output_type="latent"``. Nothing is downloaded:
text encoders are not built, every image gets fresh random prompt embeddings of the real shapes
(SD3 333 x 4096 + pooled 2048, CFG 7; Flux.1-dev 512 x 4096 + pooled 768, guidance 3.5, no CFG;
PixArt-Sigma 300 x 4096 with a padding mask, CFG 4.5; Wan 2.1 1.3B 512 x 4096, CFG 5, 480 x 832,
33 frames); the VAE is a tiny one with the real latent channels and scale factors (never run).

Each model's pipeline is built once; each *setup* then runs a session of ``--images`` pipeline
calls in a row (different seeds and embeddings per image, the same ones in every setup) and
records the wall time of each whole ``pipe(...)`` call (synchronised). Setups:

* ``dense-eager``: the plain pipeline; ``dense-compile``: ``pipe.transformer =
  torch.compile(pipe.transformer)`` (restored afterwards);
* ``MODE r=R`` for MODE in ``default`` (``rasfx.enable(pipe, RASConfig(ratio=R))``), ``eager``,
  ``cuda_graph``, ``compile+cuda_graph`` (``transform_config=TransformConfig(mode=MODE)``).

The first image pays for capture / compilation; the median of images 2..N is the steady state.
Per rasfx image, ``rasfx.stats(pipe)`` is recorded (mode, exports, CUDA-graph captures and
compiles of that run, loop and transformer time where the installed rasfx reports them). The
JSON is written after every image (a GPU run cut short keeps what it measured).

    # CPU dry run (tiny configs, float32)
    python benchmarks/bench_pipeline.py --scale tiny --models sd3,flux,pixart,wan --images 2 --steps 3
    # GPU: SD3 in every setup at r = 1, 0.5, 0.25; Flux, PixArt, Wan r=0.25 CUDA graph vs dense eager
    # (H100: about 9.5 minutes; the budget leaves SD3's last compiled setup out if time runs short)
    python benchmarks/bench_pipeline.py \\
        --models pixart:dense-eager+cuda_graph:0.25,wan:dense-eager+cuda_graph:0.25,flux:dense-eager+cuda_graph:0.25,sd3 \\
        --modes dense-eager,cuda_graph,eager,default,dense-compile,compile+cuda_graph --ratios 1,0.5,0.25 \\
        --out pipe.json --md pipe.md --budget-s 450
    # SD3 only: 4 images per call, and a session switching resolutions
    python benchmarks/bench_pipeline.py --models sd3:dense-eager --batch-case --switch-case --out pipe2.json

Runs with torch + diffusers only (rasfx is imported from this checkout).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shlex
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_models  # noqa: E402  (the model configs; it imports rasfx from this checkout)
import rasfx  # noqa: E402

DENSE = ("dense-eager", "dense-compile")
RAS_MODES = ("default", "eager", "cuda_graph", "compile+cuda_graph")
MODES = DENSE + RAS_MODES
# what rasfx.stats(pipe) reports per run (getattr: older RunStats lack some of these)
STAT_FIELDS = ("mode", "exports", "graph_captures", "compiles", "run_time_s", "transformer_time_s", "work")
# guidance scale per model (text tokens and widths come from bench_models' inputs); size: (h, w[, frames])
GUIDANCE = {"sd3": 7.0, "flux": 3.5, "pixart": 4.5, "wan": 5.0}
SIZE = {"real": {"sd3": (1024, 1024), "flux": (1024, 1024), "pixart": (1024, 1024), "wan": (480, 832, 33)},
        "tiny": {"sd3": (128, 128), "flux": (128, 128), "pixart": (128, 128), "wan": (64, 96, 9)}}
SWITCH_ALT = {"real": (768, 1024), "tiny": (96, 128)}  # --switch-case: SD3's other resolution (h, w)


# ----------------------------------------------------------------------------- pipelines
def _vae(name, dev, dt):
    """A tiny VAE with the real latent channels and scale factors: output_type="latent" never runs
    it, the pipeline only reads its config (8x spatial, Wan 4x temporal)."""
    from diffusers import AutoencoderKL, AutoencoderKLWan

    if name == "wan":
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True])
    else:  # 4 blocks: vae_scale_factor = 2 ** 3 = 8
        vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=4,
                            latent_channels=4 if name == "pixart" else 16, scaling_factor=1.5305, shift_factor=0.0609)
    return vae.to(dev, dt).eval()


def _scheduler(name):
    """The scheduler each model ships with (configs of the diffusers-format checkpoints)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "sd3":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    if name == "flux":
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    if name == "pixart":
        return DPMSolverMultistepScheduler()  # linear betas, DPM-Solver++ order 2, epsilon
    # Wan2.1-T2V-1.3B-Diffusers ships UniPC with flow sigmas (flow_shift 3.0 at 480p)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def build_pipeline(name, scale, dev, dt, overrides=None):
    """(pipe, text tokens, text dim, pooled dim): the transformer of bench_models.MODELS[name]
    with weights re-drawn from N(0, 0.02) on ``dev``, inside the model's diffusers pipeline.
    ``overrides``: transformer config entries replaced (another geometry: Wan 14B)."""
    import diffusers

    with torch.device(dev):
        model, kw, _, _ = bench_models.MODELS[name](scale, dev, dt)
        if overrides:
            model = type(model)(**{**{k: v for k, v in model.config.items() if not k.startswith("_")}, **overrides})
    txt, dim = kw["encoder_hidden_states"].shape[1:]
    pooled = kw["pooled_projections"].shape[-1] if "pooled_projections" in kw else None
    del kw
    model = model.to(dev, dt).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    common = dict(transformer=model, scheduler=_scheduler(name), vae=_vae(name, dev, dt), text_encoder=None,
                  tokenizer=None)
    if name == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(**common, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                                  tokenizer_3=None)
    elif name == "flux":
        pipe = diffusers.FluxPipeline(**common, text_encoder_2=None, tokenizer_2=None)
    elif name == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(**common)
    else:
        pipe = diffusers.WanPipeline(**common)
    pipe.set_progress_bar_config(disable=True)
    return pipe, int(txt), int(dim), pooled


def call_kwargs(name, scale, dev, dt, txt, dim, pooled, seed, *, steps, sizes, batch=1):
    """The arguments of image ``seed``'s pipeline call (at ``sizes[seed]``): fresh random prompt
    embeddings (and masks) from ``seed``, as a text encoder would hand them over (``batch`` rows:
    one prompt, ``batch`` images)."""
    from diffusers.utils.torch_utils import randn_tensor

    size = sizes[seed]

    g = torch.Generator(dev).manual_seed(10_000 + seed)
    emb = lambda *shape: randn_tensor((1, *shape), generator=g, device=dev, dtype=dt).expand(  # noqa: E731
        batch, *shape).contiguous()
    kw = dict(num_inference_steps=steps, guidance_scale=GUIDANCE[name], output_type="latent",
              generator=torch.Generator(dev).manual_seed(seed), height=size[0], width=size[1],
              prompt_embeds=emb(txt, dim))
    if name in ("sd3", "flux"):
        kw["pooled_prompt_embeds"] = emb(pooled)
    if name in ("sd3", "pixart", "wan"):  # classifier-free guidance: a negative prompt's embeddings too
        kw["negative_prompt_embeds"] = emb(txt, dim)
    if name == "sd3":
        kw["negative_pooled_prompt_embeds"] = emb(pooled)
    if name == "pixart":  # T5 pads to 300 tokens: the prompt's length varies, "" is one token
        n = int(torch.randint(min(8, txt), txt + 1, (1,), generator=torch.Generator().manual_seed(seed)))
        mask = (torch.arange(txt, device=dev) < n).long().expand(batch, txt).contiguous()
        kw.update(prompt_attention_mask=mask, negative_prompt_attention_mask=torch.zeros_like(mask),
                  negative_prompt=None, use_resolution_binning=scale == "real")
        kw["negative_prompt_attention_mask"][:, 0] = 1
    if name == "wan":
        kw.update(num_frames=size[2], negative_prompt=None)
    return kw


# ----------------------------------------------------------------------------- one session
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _gib(x):
    return round(x / 2**30, 3)


def run_session(pipe, row, kwargs_for, n_images, dev, progress, use_stats):
    """Call the pipeline ``n_images`` times; per image: wall time, rasfx stats, dynamo graphs,
    GPU memory held afterwards. ``progress()`` after every image."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(n_images):
        kw = kwargs_for(i)
        graphs0 = bench_models._dynamo_graphs()
        _sync(dev)
        t = time.perf_counter()
        pipe(**kw)
        _sync(dev)
        img = {"image": i, "seed": i, "height": kw["height"], "width": kw["width"], "time_s": time.perf_counter() - t,
               "dynamo_graphs": bench_models._dynamo_graphs() - graphs0}
        if use_stats:
            st = rasfx.stats(pipe)
            img.update({k: getattr(st, k, None) for k in STAT_FIELDS})
            img["ras_steps"], img["steps"] = len(st.ras_steps), len(st.steps)
            img["skipped_steps"], img["flops_fraction"] = len(st.skipped_steps), st.flops_fraction
        if dev.type == "cuda":
            img["held_gib"] = _gib(torch.cuda.memory_allocated())
            row["peak_gib"] = _gib(torch.cuda.max_memory_allocated())
        row["images"].append(img)
        rest = [x["time_s"] for x in _repeats(row)]
        row["first_s"] = row["images"][0]["time_s"]
        row["median_rest_s"] = statistics.median(rest) if rest else None
        progress()
        extra = " ".join(f"{k}={img[k]}" for k in ("mode", "exports", "graph_captures", "compiles", "ras_steps",
                                                   "skipped_steps")
                         if img.get(k) is not None)
        print(f"  {row['model']} {row['setup']} image {i} {kw['height']}x{kw['width']}: {img['time_s']:.3f} s "
              f"{extra} dynamo_graphs={img['dynamo_graphs']}", flush=True)


def run_setup(pipe, row, kwargs_for, n_images, dev, progress, compile_mode):
    """One setup on the shared pipeline; the pipeline is left as it was (rasfx disabled, the
    original transformer back) even when the setup fails."""
    mode, ratio = row["mode"], row["ratio"]
    original = pipe.transformer
    try:
        if mode == "dense-compile":
            pipe.transformer = torch.compile(original, mode=compile_mode)
        elif mode in RAS_MODES:
            tc = None if mode == "default" else rasfx.TransformConfig(mode=mode)
            rasfx.enable(pipe, rasfx.RASConfig(ratio=ratio, **row.get("ras_fields", {})), transform_config=tc)
        run_session(pipe, row, kwargs_for, n_images, dev, progress, use_stats=mode in RAS_MODES)
    except Exception as e:  # keep the other setups' numbers
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"  {row['model']} {row['setup']}: FAILED {row['error']}", flush=True)
    finally:
        try:
            if rasfx.is_enabled(pipe):
                rasfx.disable(pipe)  # restores every patch even where it raises
        except Exception as e:
            row["error"] = row.get("error") or f"rasfx.disable: {type(e).__name__}: {e}"
        pipe.transformer = original
        if "compile" in mode:
            torch._dynamo.reset()  # drop compiled code (and what it holds) before the next setup
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            row["held_after_gib"] = _gib(torch.cuda.memory_allocated())
        progress()


# ----------------------------------------------------------------------------- report
def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def _repeats(row):
    """The images after the first at their resolution: images 2..N, except in the switch case."""
    seen, out = set(), []
    for img in row["images"]:
        size = (img["height"], img["width"])
        out += [img] if size in seen else []
        seen.add(size)
    return out


def _sum(row, key):
    vals = [img.get(key) for img in _repeats(row)]
    return None if not vals or any(v is None for v in vals) else sum(vals)


def table(doc) -> str:
    lines = [("| model | setup | first image s | median images 2..N s | vs dense-eager | vs dense-compile "
              "| captures/exports/compiles 2..N | peak GiB |"), "|" + "---|" * 8]
    rows = doc["rows"]
    for row in rows:
        base = {r["mode"]: r.get("median_rest_s") for r in rows
                if r["model"] == row["model"] and r["group"] == row["group"] and r["mode"] in DENSE}
        med = row.get("median_rest_s")
        sp = [f"{base[m] / med:.2f}x" if med and base.get(m) else "-" for m in DENSE]
        if row["mode"] == "dense-compile":  # no rasfx stats: dynamo's graph count stands for compiles
            cnt = f"-/-/{_fmt(_sum(row, 'dynamo_graphs'), 'd')}"
        elif row["mode"] in RAS_MODES:
            cnt = "/".join(_fmt(_sum(row, k), "d") for k in ("graph_captures", "exports", "compiles"))
        else:
            cnt = "-"
        setup = row["setup"] + (f" FAILED ({row['error'][:60]})" if row.get("error") else "")
        lines.append(f"| {row['label']} | {setup} | {_fmt(row.get('first_s'))} | {_fmt(med)} | {sp[0]} | {sp[1]} "
                     f"| {cnt} | {_fmt(row.get('peak_gib'), '.1f')} |")
    lines += ["", f"Card: {doc['card']}, torch {doc['torch']}, diffusers {doc['diffusers']}, {doc['dtype']}, "
              f"{doc['steps']} steps, output_type=\"latent\"; speed-ups of the medians. \"x4\": 4 images per call. "
              "Switch: images alternate between two resolutions, 2..N are those at a resolution seen before.",
              f"Command: `{doc['command']}`"]
    if doc["skipped"]:
        lines.append(f"Skipped (time budget): {', '.join(doc['skipped'])}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_models(spec, modes, ratios):
    """``NAME[:MODE+MODE[:R+R]]`` per comma-separated entry -> [(name, modes, ratios)]."""
    out = []
    for entry in spec.split(","):
        name, *rest = entry.split(":")
        if name not in GUIDANCE:
            raise SystemExit(f"unknown model {name!r} (known: {', '.join(GUIDANCE)})")
        m = rest[0].replace("compile+cuda_graph", "compile&cuda_graph").split("+") if rest and rest[0] else modes
        m = [x.replace("&", "+") for x in m]
        r = [ratio_spec(x) for x in rest[1].split("+")] if len(rest) > 1 else ratios
        bad = [x for x in m if x not in MODES]
        if bad:
            raise SystemExit(f"unknown setup(s) {bad} (known: {', '.join(MODES)})")
        out.append((name, m, r))
    return out


def ratio_spec(token):
    """``R`` or ``R@FIELD=V@FIELD=V`` (more RASConfig fields, e.g. ``0.25@skip_every=2``) -> (R, {FIELD: V})."""
    ratio, *fields = token.split("@")
    extra = {}
    for f in fields:
        key, sep, value = f.partition("=")
        if not sep or key not in rasfx.RASConfig.__dataclass_fields__:
            raise SystemExit(f"bad ratio entry {token!r}: use R or R@FIELD=VALUE with a RASConfig field")
        for cast in (int, float, str):
            try:
                extra[key] = cast(value)
                break
            except ValueError:
                continue
    rasfx.RASConfig(ratio=float(ratio), **extra)  # refuse a bad combination before any model is built
    return float(ratio), extra


def setups(modes, ratios):
    """[(setup name, mode, (ratio, more RASConfig fields))] in the order given: each rasfx mode at every ratio."""
    out = []
    for m in modes:
        out += [(m, m, None)] if m in DENSE else [
            (f"{m} r={r:g}" + "".join(f" {k}={v}" for k, v in extra.items()), m, (r, extra)) for r, extra in ratios]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd3,flux,pixart,wan",
                    help="comma list of sd3, flux, pixart, wan; NAME:MODE+MODE overrides --modes for one model and "
                         "NAME:MODE+MODE:R+R also --ratios (e.g. flux:dense-eager+cuda_graph:0.25)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="comma list of setups, run in this order: dense-eager (plain pipeline), dense-compile "
                         "(torch.compile of the transformer), and the rasfx modes default (no TransformConfig: what rasfx "
                         "picks; each image's 'mode' records what ran), "
                         "eager, cuda_graph, compile+cuda_graph (each at every --ratios)")
    ap.add_argument("--ratios", default="1,0.5,0.25",
                    help="comma list of RASConfig ratios for the rasfx modes; R@FIELD=V adds RASConfig fields "
                         "(e.g. 0.25@skip_every=2@skip_estimate=extrapolate: token and step sparsity)")
    ap.add_argument("--images", type=int, default=5, help="pipeline calls per setup (a session); image 1 pays setup")
    ap.add_argument("--steps", type=int, default=28, help="num_inference_steps of every call")
    ap.add_argument("--scale", default="real", choices=["real", "tiny"],
                    help="real: real-size models on CUDA in bf16; tiny: tiny configs on the CPU in float32 (dry run)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of dense-compile (default: torch's; e.g. max-autotune-no-cudagraphs)")
    ap.add_argument("--batch-case", action="store_true",
                    help="SD3 only: also 4 images per call (one prompt), dense-eager vs cuda_graph r=0.25")
    ap.add_argument("--switch-case", action="store_true",
                    help="SD3 only: also one cuda_graph r=0.25 session alternating 1024x1024 / 768x1024 "
                         "(tiny: 128x128 / 96x128): what returning to a resolution captures again")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no further setup after this many seconds (what was measured is always written)")
    ap.add_argument("--out", default=None, help="write JSON here (after every image)")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)

    if args.scale == "real" and not torch.cuda.is_available():
        raise SystemExit("bench_pipeline.py --scale real needs a CUDA GPU (use --scale tiny for a CPU dry run)")
    dev = torch.device("cuda" if args.scale == "real" else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    import diffusers

    ratios = [ratio_spec(r) for r in args.ratios.split(",")]
    plan = parse_models(args.models, args.modes.split(","), ratios)
    doc = {"card": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "diffusers": diffusers.__version__, "dtype": str(dt).replace("torch.", ""), "scale": args.scale,
           "steps": args.steps, "images": args.images,
           "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "models": {}, "rows": [],
           "skipped": []}
    print(f"# rasfx pipeline benchmark on {doc['card']}, torch {doc['torch']}, diffusers {doc['diffusers']}, "
          f"{doc['dtype']}", flush=True)

    def save():
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(doc, fh, indent=1)
        if args.md:
            with open(args.md, "w") as fh:
                fh.write(table(doc) + "\n")

    t0 = time.perf_counter()
    over = lambda: args.budget_s is not None and time.perf_counter() - t0 > args.budget_s  # noqa: E731
    first_sd3 = min((i for i, (name, _, _) in enumerate(plan) if name == "sd3"), default=None)
    for k, (name, modes, model_ratios) in enumerate(plan):
        todo = [(s, m, r, "", None) for s, m, r in setups(modes, model_ratios)]
        if k == first_sd3 and args.batch_case:  # once, with the first sd3 entry of --models
            todo += [("dense-eager x4", "dense-eager", None, "batch4", None),
                     ("cuda_graph r=0.25 x4", "cuda_graph", (0.25, {}), "batch4", None)]
        if k == first_sd3 and args.switch_case:
            a, b = SIZE[args.scale]["sd3"], SWITCH_ALT[args.scale]
            todo.append(("switch cuda_graph r=0.25", "cuda_graph", (0.25, {}), "switch", [a, b, a, b, a]))
        if over():
            doc["skipped"] += [f"{name} {s[0]}" for s in todo]
            save()
            continue
        t = time.perf_counter()
        torch.manual_seed(0)
        pipe, txt, dim, pooled = build_pipeline(name, args.scale, dev, dt)
        _sync(dev)
        label = bench_models.LABELS[name] + (" (tiny)" if args.scale == "tiny" else "")
        doc["models"][name] = {"label": label, "build_s": time.perf_counter() - t,
                               "params_b": sum(p.numel() for p in pipe.transformer.parameters()) / 1e9,
                               "text_tokens": txt, "size": SIZE[args.scale][name],
                               "scheduler": type(pipe.scheduler).__name__,
                               "weights_gib": _gib(torch.cuda.memory_allocated()) if dev.type == "cuda" else None}
        print(f"{name}: built in {doc['models'][name]['build_s']:.1f} s ({doc['models'][name]['params_b']:.2f} B "
              f"params, {txt} text tokens, {doc['models'][name]['scheduler']})", flush=True)
        for setup, mode, ratio, group, sizes in todo:
            if over():
                doc["skipped"].append(f"{name} {setup}")
                print(f"  skipping {name} {setup}: time budget spent", flush=True)
                continue
            batch = 4 if group == "batch4" else 1
            n_images = len(sizes) if sizes else args.images
            ratio, fields = ratio if ratio is not None else (None, {})
            row = {"model": name, "label": doc["models"][name]["label"], "setup": setup, "mode": mode, "ratio": ratio,
                   "ras_fields": fields,
                   "group": group, "images_per_call": batch, "images": []}
            doc["rows"].append(row)

            size = SIZE[args.scale][name]
            kwargs_for = functools.partial(call_kwargs, name, args.scale, dev, dt, txt, dim, pooled, steps=args.steps,
                                           sizes=[(*s, *size[2:]) for s in sizes] if sizes else [size] * n_images,
                                           batch=batch)
            run_setup(pipe, row, kwargs_for, n_images, dev, save, args.compile_mode)
        del pipe
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    save()
    print(table(doc), flush=True)


if __name__ == "__main__":
    main()

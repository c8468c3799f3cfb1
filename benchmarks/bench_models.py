"""Dense vs. RAS, side by side, on real-size DiT architectures with random weights.

Timing does not depend on weight values (weights are re-drawn from N(0, 0.02): never
zeros, which can run faster). For each model: one forward of the original model and of
the transformed one at ratios 1 .. 0.125, in the same execution mode (eager vs eager,
CUDA graph vs CUDA graph), then whole 28-step schedules (4 dense warm-up steps, dense
resets at 12 and 20, RAS at ratio r on the other 22 steps). Prints one markdown table and
writes JSON.

    python benchmarks/bench_models.py --models sd3,flux --modes eager,cuda_graph --out perf.json

Runs with torch + diffusers only (rasfx is imported from this checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rasfx  # noqa: E402
from rasfx.runtime import GraphRunner  # noqa: E402
from rasfx.target import ExecutionTarget, contiguous_attention_caches, fusion_pays_off  # noqa: E402

RATIOS = (1.0, 0.75, 0.5, 0.25, 0.125)


# ----------------------------------------------------------------------------- models
def _sd3(scale, dev, dt, batch=2, hw=128):
    from diffusers import SD3Transformer2DModel

    if scale == "tiny":
        cfg = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=32, out_channels=16,
                   pos_embed_max_size=64)
        txt, hw = 7, 16
    else:  # SD3-medium
        cfg = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                   joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=192)
        txt = 333
    model = SD3Transformer2DModel(**cfg)
    kw = dict(
        hidden_states=torch.randn(batch, 16, hw, hw, device=dev, dtype=dt),
        encoder_hidden_states=torch.randn(batch, txt, cfg["joint_attention_dim"], device=dev, dtype=dt),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], device=dev, dtype=dt),
        timestep=torch.full((batch,), 500.0, device=dev, dtype=dt),
        return_dict=False,
    )
    return model, kw, (hw // 2) ** 2, txt


def _flux(scale, dev, dt, batch=1, hw=64):
    from diffusers import FluxTransformer2DModel

    if scale == "tiny":
        cfg = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
                   num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
                   axes_dims_rope=(4, 6, 6))
        txt, hw = 7, 8
    else:  # Flux.1-dev (12B)
        cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                   axes_dims_rope=(16, 56, 56))
        txt = 512
    model = FluxTransformer2DModel(**cfg)
    n = hw * hw
    ids = torch.zeros(hw, hw, 3)
    ids[..., 1] = torch.arange(hw)[:, None]
    ids[..., 2] = torch.arange(hw)[None, :]
    kw = dict(
        hidden_states=torch.randn(batch, n, 64, device=dev, dtype=dt),
        encoder_hidden_states=torch.randn(batch, txt, cfg["joint_attention_dim"], device=dev, dtype=dt),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], device=dev, dtype=dt),
        timestep=torch.full((batch,), 0.5, device=dev, dtype=dt),
        img_ids=ids.reshape(n, 3).to(dev, dt),
        txt_ids=torch.zeros(txt, 3, device=dev, dtype=dt),
        guidance=torch.full((batch,), 3.5, device=dev, dtype=dt),
        return_dict=False,
    )
    return model, kw, n, txt


def _pixart(scale, dev, dt, batch=2, hw=128):
    from diffusers import PixArtTransformer2DModel

    if scale == "tiny":
        cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                   cross_attention_dim=32, sample_size=16, patch_size=2, caption_channels=64, norm_type="ada_norm_single",
                   use_additional_conditions=False, interpolation_scale=None)
        txt, hw = 7, 16
    else:  # PixArt-Sigma 1024
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
                   norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=2)
        txt = 300
    model = PixArtTransformer2DModel(**cfg)
    kw = dict(
        hidden_states=torch.randn(batch, 4, hw, hw, device=dev, dtype=dt),
        encoder_hidden_states=torch.randn(batch, txt, cfg["caption_channels"], device=dev, dtype=dt),
        encoder_attention_mask=torch.ones(batch, txt, device=dev, dtype=dt),
        timestep=torch.full((batch,), 500.0, device=dev, dtype=dt),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    return model, kw, (hw // 2) ** 2, 0


def _lumina(scale, dev, dt, batch=2, hw=128):
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    if scale == "tiny":
        cfg = dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
                   num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True,
                   qk_norm=True, cross_attention_dim=32, scaling_factor=1.0)
        txt, hw = 7, 16
    else:  # Lumina-Next-SFT 2B
        cfg = dict(sample_size=128, patch_size=2, in_channels=4, hidden_size=2304, num_layers=24, num_attention_heads=32,
                   num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True,
                   qk_norm=True, cross_attention_dim=2048, scaling_factor=1.0)
        txt = 256
    model = LuminaNextDiT2DModel(**cfg)
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kw = dict(
        hidden_states=torch.randn(batch, 4, hw, hw, device=dev, dtype=dt),
        timestep=torch.full((batch,), 0.5, device=dev, dtype=dt),
        encoder_hidden_states=torch.randn(batch, txt, cfg["cross_attention_dim"], device=dev, dtype=dt),
        encoder_mask=torch.ones(batch, txt, device=dev, dtype=torch.bool),
        image_rotary_emb=get_2d_rotary_pos_embed_lumina(head_dim, 384, 384).to(dev),
        cross_attention_kwargs={"base_sequence_length": (1024 // 16) ** 2},
        return_dict=False,
    )
    return model, kw, (hw // 2) ** 2, 0


def _wan(scale, dev, dt, batch=1, frames=9, h=60, w=104):
    from diffusers import WanTransformer3DModel

    if scale == "tiny":
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
                   text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
        txt, frames, h, w = 7, 3, 8, 12
    else:  # Wan 2.1 T2V 1.3B, 480x832, 33 frames -> latent 9 x 60 x 104
        cfg = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                   text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
        txt = 512
    model = WanTransformer3DModel(**cfg)
    kw = dict(
        hidden_states=torch.randn(batch, 16, frames, h, w, device=dev, dtype=dt),
        timestep=torch.full((batch,), 500, device=dev, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, txt, cfg["text_dim"], device=dev, dtype=dt),
        return_dict=False,
    )
    return model, kw, frames * (h // 2) * (w // 2), txt


MODELS = {"sd3": _sd3, "flux": _flux, "pixart": _pixart, "lumina": _lumina, "wan": _wan}


def same_tokens_inputs(name, kw, n):
    """The original model's inputs with ``n`` image tokens instead of all (the conditioning
    tokens unchanged), or None where the model's inputs cannot shrink to exactly ``n``.

    Times what the original model costs at a RAS step's token count: the floor a RAS step
    can reach with the same kernels, short of the attention over every cached key."""
    x = kw["hidden_states"]
    if name in ("sd3", "pixart", "lumina"):  # [B, C, H, W] latent, patch 2: a grid of (H/2, n/(H/2)) tokens
        rows = x.shape[2] // 2
        if n % rows:
            return None
        return dict(kw, hidden_states=x[:, :, :, : 2 * (n // rows)].contiguous())
    if name == "flux":  # [B, N, C] packed latent and its [N, 3] position ids
        return dict(kw, hidden_states=x[:, :n].contiguous(), img_ids=kw["img_ids"][:n].contiguous())
    return None  # wan: a video latent has no F x H x W grid of exactly n tokens at most ratios


LABELS = {"sd3": "SD3-medium 1024px, CFG batch 2", "flux": "Flux.1-dev 1024px", "pixart": "PixArt-Sigma 1024px, CFG batch 2",
          "lumina": "Lumina-Next 2B 1024px, CFG batch 2", "wan": "Wan2.1-1.3B 480x832x33f"}


# ----------------------------------------------------------------------------- timing
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, dev, iters, warmup=3):
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), (max(times) - min(times))


class GraphedModel:
    """A call replayed as one CUDA graph (the fair baseline for rasfx's CUDA-graph modes);
    on CPU it just calls ``fn``."""

    def __init__(self, fn, dev):
        self.fn, self.graph = fn, None
        if dev.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


def _dynamo_graphs() -> int:
    """Graphs dynamo compiled so far in this process (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def baseline(model, kw, dev, mode):
    """The original model in the same execution mode as rasfx's ``mode``: compiled with
    ``torch.compile(dynamic=False)`` for the compile modes, replayed as a CUDA graph for the
    CUDA-graph modes."""
    fn = torch.compile(model, dynamic=False) if "compile" in mode else model
    call = lambda: fn(**kw)  # noqa: E731
    return GraphedModel(call, dev) if "cuda_graph" in mode else call


def active_count(ratio, n_img, round_to=64):
    n = int(round(ratio * n_img / round_to)) * round_to if n_img >= 4 * round_to else int(round(ratio * n_img))
    return max(1, min(n_img, n))


def schedule(steps=28, warmup=4, resets=(12, 20)):
    return ["dense" if (i < warmup or i in resets) else "ras" for i in range(steps)]


def run_model(name, scale, dev, dt, modes, iters, ratios, log, schedule_ratios=(0.5, 0.25), fusion=True,
              fuse_qkv=False, progress=lambda res: None, same_tokens=False):
    """Time one model in each mode. ``progress(res)`` is called after every measurement with the
    results so far (a GPU call cut short by its time limit keeps what it measured).
    ``same_tokens``: also time the original model (same mode) on inputs with only as many image
    tokens as each RAS step computes (``same_tokens_inputs``)."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model, kw, n_img, n_txt = MODELS[name](scale, dev, dt)
    model = model.to(dev, dt).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    label = LABELS[name]
    if fuse_qkv:
        # diffusers' own speed option (one Q/K/V projection GEMM): applied to the original
        # and therefore to what rasfx captures, so both sides of every comparison have it
        if not hasattr(model, "fuse_qkv_projections"):
            raise SystemExit(f"{name}: {type(model).__name__} has no fuse_qkv_projections()")
        model.fuse_qkv_projections()
        label += ", fused QKV"
    build_s = time.perf_counter() - t0
    f = lambda r: (r * n_img + n_txt) / (n_img + n_txt)  # noqa: E731
    res = {"model": name, "label": label, "fuse_qkv": fuse_qkv, "n_img": n_img, "n_cond": n_txt, "build_s": build_s, "modes": {}}
    g = torch.Generator().manual_seed(0)
    ras = rasfx.transform(model)
    with torch.no_grad():
        for mode in modes:
            torch.cuda.empty_cache() if dev.type == "cuda" else None
            graphs0 = _dynamo_graphs()
            t = time.perf_counter()
            # "MODE@producer-layout": the same runner with attention caches in the producer's
            # layout instead of the runner's default (an A/B of the cache layout)
            mode, _, variant = mode.partition("@")
            base_fn = baseline(model, kw, dev, mode)
            base_fn()
            _sync(dev)
            base_setup_s = time.perf_counter() - t
            base_ms, base_spread = time_call(base_fn, dev, iters)
            # One capture serves every mode: only the runner changes ("@no-hoist" captures
            # again without the step-invariant prologue, an A/B of hoist_invariants).
            if variant not in ("", "producer-layout", "no-hoist"):
                raise SystemExit(f"unknown mode variant {variant!r} (known: producer-layout, no-hoist)")
            hoist = variant != "no-hoist"
            ras.reset(captures=ras.config.hoist_invariants != hoist)
            ras.config.hoist_invariants = hoist
            ras.runner = GraphRunner(mode)
            ras.target = ExecutionTarget(mode, ras.target.fuse,
                                         contiguous_attention_caches(mode) and variant != "producer-layout")
            mode = f"{mode}@{variant}" if variant else mode
            t = time.perf_counter()
            ras(**kw)
            _sync(dev)
            capture_s = time.perf_counter() - t
            cc = ras.captures()[0]
            row = {"original_ms": base_ms, "original_spread_ms": base_spread, "capture_s": capture_s,
                   "original_setup_s": base_setup_s,
                   "capture_timings": dict((k, v) for k, v in cc.timings.items() if isinstance(v, float)),
                   "cache_bytes": ras.cache_bytes(), "steps": {},
                   "hoisted": {k: v for k, v in cc.variant("dense").counters.items() if k.startswith("hoisted")}}
            res["modes"][mode] = row  # filled in as it is measured
            ras.set_active(None)
            row["ras_dense_ms"], _ = time_call(lambda: ras(**kw), dev, iters)
            progress(res)
            log(f"  {name} {mode} dense step: {row['ras_dense_ms']:.2f} ms (original {base_ms:.2f}, "
                f"ratio {row['ras_dense_ms'] / base_ms:.3f}; first call incl. capture/compile {capture_s:.1f} s, "
                f"original's {base_setup_s:.1f} s)")
            for r in ratios:
                n = active_count(r, n_img)
                idx = torch.randperm(n_img, generator=g)[:n].sort().values.to(dev)
                ras.set_active(idx, check=False)
                ms, spread = time_call(lambda: ras(**kw), dev, iters)
                row["steps"][str(r)] = {"n_active": n, "ms": ms, "spread_ms": spread, "f": f(n / n_img),
                                        "vs_original": ms / base_ms}
                progress(res)
                log(f"  {name} {mode} r={r} n={n}: {ms:.2f} ms (original {base_ms:.2f}; f={f(n / n_img):.3f}, "
                    f"ratio {ms / base_ms:.3f})")
            for r in ratios if same_tokens and not variant else ():
                n = active_count(r, n_img)
                kw_n = same_tokens_inputs(name, kw, n)
                if r >= 1 or kw_n is None:
                    continue
                fn_n = baseline(model, kw_n, dev, mode)  # compiled modes: one more compile per shape
                ms, _ = time_call(fn_n, dev, iters)
                row["steps"][str(r)]["original_same_tokens_ms"] = ms
                del fn_n
                progress(res)
                log(f"  {name} {mode} original model on {n} image tokens (r={r}'s count): {ms:.2f} ms "
                    f"(RAS step {row['steps'][str(r)]['ms']:.2f} ms)")
            if fusion and fusion_pays_off(dev):
                # the same steps with the Triton gather/scatter GeMM fusion (off by default)
                row["fused"] = {}
                ras.target = ExecutionTarget(ras.target.mode, True, ras.target.contiguous_attention)
                for r in (0.5, 0.25):
                    n = active_count(r, n_img)
                    idx = torch.randperm(n_img, generator=g)[:n].sort().values.to(dev)
                    ras.set_active(idx, check=False)
                    row["fused"][str(r)] = time_call(lambda: ras(**kw), dev, iters)[0]
                    log(f"  {name} {mode} r={r} with fusion: {row['fused'][str(r)]:.2f} ms")
                ras.target = ExecutionTarget(ras.target.mode, False, ras.target.contiguous_attention)
            # whole 28-step schedules at ratio 0.25 and 0.5 (transformer calls only)
            row["schedules"] = {}
            for r in schedule_ratios:
                n = active_count(r, n_img)
                idx = torch.randperm(n_img, generator=g)[:n].sort().values.to(dev)
                plan = schedule()

                def run_schedule():
                    ras.reset() if mode == "eager" else None
                    for kind in plan:
                        ras.set_active(None if kind == "dense" else idx, check=False)
                        ras(**kw)

                def run_dense():
                    for _ in plan:
                        base_fn()

                dense_ms, _ = time_call(run_dense, dev, max(1, iters // 5), warmup=1)
                ras_ms, _ = time_call(run_schedule, dev, max(1, iters // 5), warmup=1)
                nd = sum(1 for k in plan if k == "dense")
                ideal = len(plan) / (nd + (len(plan) - nd) * f(n / n_img))
                row["schedules"][str(r)] = {"dense_ms": dense_ms, "ras_ms": ras_ms, "speedup": dense_ms / ras_ms,
                                            "ideal": ideal, "of_ideal": dense_ms / ras_ms / ideal}
                log(f"  {name} {mode} 28 steps r={r}: dense {dense_ms:.0f} ms, RAS {ras_ms:.0f} ms, "
                    f"{dense_ms / ras_ms:.2f}x (ideal {ideal:.2f}x)")
                progress(res)
            if dev.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
            row["cache_bytes"] = ras.cache_bytes()
            row["hoisted_bytes"] = ras.hoisted_bytes()
            # compiles / CUDA-graph captures over everything above: one per (variant, active count)
            row["runner_stats"] = dict(ras.runner.stats)
            row["runner_stats"]["dynamo_graphs"] = _dynamo_graphs() - graphs0
            log(f"  {name} {mode} runner: {row['runner_stats']}")
            base_fn = None  # frees the compiled baseline (a `del` would hide the closures above from linters)
            progress(res)
    ras = model = None
    return res


def attention_backends(dev, dt, log) -> dict:
    """Active queries against the full K/V cache (SD3-medium shapes at r=0.25, batch 2):
    which SDPA backend is fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    if dev.type != "cuda":
        return out
    q = torch.randn(2, 24, 1024 + 333, 64, device=dev, dtype=dt)
    k = torch.randn(2, 24, 4096 + 333, 64, device=dev, dtype=dt)
    v = torch.randn_like(k)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("auto", None)):
        try:
            if backend is None:
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            else:
                def fn(b=backend):
                    with sdpa_kernel([b]):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out[name] = time_call(fn, dev, 20)[0]
            log(f"  attention {name}: {out[name]:.3f} ms")
        except Exception as e:  # a backend may be unavailable for these shapes
            out[name] = f"unavailable: {type(e).__name__}"
    return out


def table(results) -> str:
    lines = ["| model | mode | original ms | RAS r=1 | " + " | ".join(f"r={r}" for r in RATIOS[1:])
             + " | 28 steps r=0.5 | 28 steps r=0.25 | caches |",
             "|" + "---|" * (7 + len(RATIOS) - 1)]
    for res in results:
        for mode, row in res["modes"].items():
            cells = []
            for r in RATIOS:
                s = row["steps"].get(str(r))
                cells.append(f"{s['ms']:.1f} ({s['vs_original']:.2f}; f {s['f']:.2f})" if s else "-")
            sch = [row["schedules"].get(k) for k in ("0.5", "0.25")]
            sch_txt = [f"{s['speedup']:.2f}x (ideal {s['ideal']:.2f}x)" if s else "-" for s in sch]
            lines.append(f"| {res['label']} | {mode} | {row['original_ms']:.1f} | " + " | ".join(cells)
                         + f" | {sch_txt[0]} | {sch_txt[1]} | {row['cache_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd3,flux",
                    help=f"comma list of {','.join(MODELS)}; NAME:MODE+MODE overrides --modes for one model")
    ap.add_argument("--modes", default="eager,cuda_graph",
                    help="comma list of rasfx modes (eager, cuda_graph, compile, ...); MODE@no-hoist: without "
                         "hoist_invariants, MODE@producer-layout: attention caches in the producer's layout")
    ap.add_argument("--scale", default="real", choices=["real", "tiny"], help="tiny: small configs for a CPU dry run")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)), help="per-step ratios to time")
    ap.add_argument("--schedule-ratios", default="0.5,0.25", help="ratios of the whole 28-step schedules")
    ap.add_argument("--no-fusion", action="store_true", help="skip the Triton fusion on/off comparison")
    ap.add_argument("--fuse-qkv", action="store_true",
                    help="call diffusers' model.fuse_qkv_projections() first (original and rasfx alike)")
    ap.add_argument("--same-tokens", action="store_true",
                    help="also time the original model on only as many image tokens as each RAS step computes")
    ap.add_argument("--budget-s", type=float, default=480, help="skip remaining models after this many seconds")
    ap.add_argument("--out", default=None, help="write JSON results here")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"# rasfx model benchmark on {card}, torch {torch.__version__}, {dt}", flush=True)
    t0, results = time.perf_counter(), []
    attention = attention_backends(dev, dt, lambda m: print(m, flush=True))

    def save(partial=None):
        if args.out:  # after every measurement: a run cut short keeps what it measured
            with open(args.out, "w") as fh:
                json.dump({"card": card, "torch": torch.__version__, "attention_ms": attention,
                           "results": results + ([partial] if partial else [])}, fh, indent=1)

    for spec in args.models.split(","):
        name, _, own_modes = spec.partition(":")
        modes = own_modes.split("+") if own_modes else args.modes.split(",")
        if time.perf_counter() - t0 > args.budget_s:
            print(f"skipping {name}: time budget spent", flush=True)
            continue
        try:
            results.append(run_model(name, args.scale, dev, dt, modes, args.iters,
                                     tuple(float(r) for r in args.ratios.split(",")),
                                     lambda m: print(m, flush=True),
                                     tuple(float(r) for r in args.schedule_ratios.split(",")), not args.no_fusion,
                                     args.fuse_qkv, save, args.same_tokens))
        except Exception as e:  # keep the other models' numbers
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            results.append({"model": name, "error": f"{type(e).__name__}: {e}", "modes": {}, "label": LABELS[name]})
        save()
    print(table([r for r in results if r["modes"]]))


if __name__ == "__main__":
    main()

"""Worker processes of tests/test_parallel.py (a module of its own: ``torch.multiprocessing.spawn``
imports the worker function by module name in every child).

Each worker joins a gloo process group, builds the same tiny diffusers pipelines from the same
seeds as every other rank, computes the one-process references itself (rasfx without
``parallel``; the plain pipeline for ratio 1), then runs the same calls with
``rasfx.ParallelConfig`` and writes what it saw to ``<out>/rank<r>.json``; the test asserts on
those files. The worker checks nothing itself, so a wrong result can never pass silently.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import torch
import torch.distributed as dist

STEPS = 6
TEXT_TOKENS = 5  # conditioning tokens of every tiny pipeline


def build(name: str):
    """A tiny pipeline with enough image tokens that a 0.5 share splits evenly within 2%."""
    from diffusers import (AutoencoderKL, AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                           UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)

    from rasfx.presets import randomize_

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0, scaling_factor=1.0)
    if name == "sd3":  # 64 px, VAE factor 2, patch 2: 16 x 16 = 256 image tokens, 5 text tokens, CFG batched
        tr = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                   pooled_projection_dim=8, out_channels=4, pos_embed_max_size=32)
        pipe = StableDiffusion3Pipeline(transformer=randomize_(tr, 0), scheduler=FlowMatchEulerDiscreteScheduler(),
                                        vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        kw = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, 16), negative_prompt_embeds=torch.randn(1, TEXT_TOKENS, 16),
                  pooled_prompt_embeds=torch.randn(1, 8), negative_pooled_prompt_embeds=torch.randn(1, 8),
                  height=64, width=64, guidance_scale=3.0)
    elif name == "flux":  # 64 px: packed 16 x 16 = 256 image tokens, 5 text tokens
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                    pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
        pipe = FluxPipeline(transformer=randomize_(tr, 0), scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
        kw = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, 16), pooled_prompt_embeds=torch.randn(1, 8), height=64,
                  width=64, guidance_scale=3.0)
    else:  # wan: 192 px, 5 frames: 2 latent frames of 12 x 12 patches = 288 tokens, cross-attention to text
        tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                   out_channels=4, text_dim=16, freq_dim=16, ffn_dim=16, num_layers=1,
                                   rope_max_seq_len=32)
        wan_vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                   temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                   latents_std=[1.0] * 4)
        sched = UniPCMultistepScheduler(flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)
        pipe = WanPipeline(transformer=randomize_(tr, 0), scheduler=sched, vae=wan_vae, text_encoder=None,
                           tokenizer=None)
        kw = dict(prompt_embeds=torch.randn(1, TEXT_TOKENS, 16),
                  negative_prompt_embeds=torch.randn(1, TEXT_TOKENS, 16), height=192, width=192, num_frames=5,
                  guidance_scale=3.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe, kw


def generate(pipe, kw, seed=0, fail_at=None):
    """Latents after every step (CPU copies); ``fail_at``: raise in the step-end callback there."""
    steps = []

    def keep(p, i, t, kwargs):
        if fail_at is not None and i == fail_at:
            raise RuntimeError(f"injected failure at step {i}")
        steps.append(kwargs["latents"].detach().clone())
        return kwargs

    pipe(**kw, num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(seed),
         callback_on_step_end=keep)
    return steps


def compare(got, want) -> dict:
    diffs = [float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12) for a, b in zip(got, want)]
    return {"steps": len(got), "want_steps": len(want), "bitwise": all(torch.equal(a, b) for a, b in zip(got, want)),
            "max_rel": max(diffs) if diffs else 0.0}


def stats_of(pipe) -> dict:
    import rasfx

    s = rasfx.stats(pipe)
    par = s.parallel
    out = {"ras_steps": s.ras_steps, "dense_steps": s.dense_steps, "num_tokens": s.num_tokens,
            "summary": s.summary(),
            "parallel": [{"index": p.index, "kind": p.kind, "world": p.world, "active": p.active_tokens,
                          "per_rank": p.tokens_per_rank, "imbalance": p.imbalance,
                          "contiguous": p.contiguous_imbalance, "bytes": p.bytes_per_rank,
                          "by_kind": p.bytes_by_kind} for p in par.steps] if par is not None else None}
    return out


def worker(rank: int, world: int, port: int, out: str, models: list) -> None:
    """Every model: the one-process references, then the 3-rank group (ratio 1, ratio 0.5, a failing
    rank, the run after it), then the 2-rank group of ranks 0 and 1 (ratio 1, ratio 0.5; rank 2 sits
    it out). The groups are formed in the same order on every rank."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    result: dict = {"rank": rank, "world": world, "models": {}}
    try:
        import rasfx

        groups = {world: None, 2: (0, 1)}  # ParallelConfig.ranks of each group size
        for name in models:
            t0 = time.perf_counter()
            pipe, kw = build(name)
            ras = rasfx.transform(pipe.transformer)  # one capture per process, shared by every run below

            def transform(model, ras=ras):
                return ras

            rec: dict = {}
            plain = generate(pipe, kw)
            with rasfx.enabled(pipe, rasfx.RASConfig(ratio=0.5), transform=transform):
                one = generate(pipe, kw)
                rec["one_process"] = stats_of(pipe)
            for size, ranks in groups.items():
                if rank not in (ranks or range(world)):
                    continue
                parallel = rasfx.ParallelConfig(timeout_s=3.0, join_timeout_s=60.0, ranks=ranks)
                g: dict = rec.setdefault(str(size), {})
                with rasfx.enabled(pipe, rasfx.RASConfig(ratio=1.0), transform=transform, parallel=parallel):
                    g["ratio1"] = compare(generate(pipe, kw), plain)
                    g["ratio1_stats"] = stats_of(pipe)
                with rasfx.enabled(pipe, rasfx.RASConfig(ratio=0.5), transform=transform, parallel=parallel):
                    runtime = rasfx.pipeline._STATES[pipe].parallel
                    before = sum(runtime.comm.received.values())
                    g["ras"] = compare(generate(pipe, kw), one)
                    g["ras_measured_bytes"] = sum(runtime.comm.received.values()) - before
                    g["ras_stats"] = stats_of(pipe)
                    if size == world and name == models[0]:  # the last rank raises in the callback of step 2
                        t1 = time.perf_counter()
                        try:
                            generate(pipe, kw, fail_at=2 if rank == world - 1 else None)
                            g["failure"] = {"raised": None}
                        except Exception as e:
                            g["failure"] = {"raised": type(e).__name__, "message": str(e),
                                            "seconds": time.perf_counter() - t1}
                        g["after_failure"] = compare(generate(pipe, kw), one)
                        g["regroups"] = runtime.regroups
            rec["seconds"] = time.perf_counter() - t0
            result["models"][name] = rec
    except Exception:
        result["error"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()

"""Fast CPU checks of the latent-space demo model code: ``examples/latent_pipeline.py`` (a tiny
random-weight ``LatentShapesPipeline`` built here, plain, under rasfx and under a diffusers cache
hook) and ``examples/train_latent_dit.py`` (a tiny smoke run that writes a loadable folder).

The trained model (models/shapes-latent-dit) is made on a GPU by train_latent_dit.py; nothing here
reads it.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import tarfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import rasfx  # noqa: E402
from diffusers import AutoencoderKL, FirstBlockCacheConfig, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402
from latent_pipeline import LatentShapesPipeline  # noqa: E402
from shapes_data import generate_shapes, make_generator  # noqa: E402
from shapes_pipeline import ClassEmbeddings, ShapesPipeline, load_pipeline  # noqa: E402

CHANNELS, LATENT, TOKENS, COND_DIM = 4, 8, 3, 8  # tiny: 32x32 images -> (4, 8, 8) latents, 64 tokens
CLASS_NAMES = ["circle", "square", "star"]
SCALE, SHIFT = 0.7, 0.1


def tiny_vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=1,
        latent_channels=CHANNELS, norm_num_groups=4, sample_size=4 * LATENT,
    )
    vae.register_to_config(scaling_factor=SCALE, shift_factor=SHIFT)
    return vae


@pytest.fixture(scope="module")
def pipe() -> LatentShapesPipeline:
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=COND_DIM, pooled_projection_dim=COND_DIM, axes_dims_rope=(4, 6, 6),
    )
    table = ClassEmbeddings(torch.randn(len(CLASS_NAMES) + 1, TOKENS, COND_DIM),
                            torch.randn(len(CLASS_NAMES) + 1, COND_DIM), CLASS_NAMES)
    p = LatentShapesPipeline(transformer.eval(), FlowMatchEulerDiscreteScheduler(shift=1.0), tiny_vae().eval(), table)
    p.set_progress_bar_config(disable=True)
    return p


def noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, LATENT, LATENT, generator=torch.Generator().manual_seed(1))


def run(pipe, steps: int = 4, **kw) -> torch.Tensor:
    return pipe(["star", 0], num_inference_steps=steps, guidance_scale=3.0, latents=noise(), **kw).images


# ------------------------------------------------------------------------------------- pipeline


def test_pipeline_matches_a_hand_written_flux_euler_loop(pipe):
    """Reference: Euler on sigma with Flux's conventions written out here (tokens row-major with
    channels last, ids (0, row, col), timestep = sigma, CFG, decode z / scaling + shift)."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].shape, kw["timestep"].clone())), with_kwargs=True)
    try:
        images = run(pipe)
    finally:
        hook.remove()
    assert images.shape == (2, 3, 4 * LATENT, 4 * LATENT) and 0 <= images.min() and images.max() <= 1

    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(4)
    sigmas = sched.sigmas  # (5,), 1 -> 0
    assert [c[0] for c in calls] == [(4, LATENT * LATENT, CHANNELS)] * 4  # one [uncond, cond] call per step
    for (_, t), s in zip(calls, sigmas[:4]):
        torch.testing.assert_close(t, torch.full((4,), float(s)), atol=1e-6, rtol=0)

    table = pipe.class_embeddings
    enc = torch.cat([table.encoder[[3, 3]], table.encoder[[2, 0]]])  # null class 3, then star=2, circle=0
    pooled = torch.cat([table.pooled[[3, 3]], table.pooled[[2, 0]]])
    rows, cols = torch.meshgrid(torch.arange(LATENT), torch.arange(LATENT), indexing="ij")
    img_ids = torch.stack([torch.zeros(LATENT * LATENT), rows.flatten().float(), cols.flatten().float()], -1)
    x = noise().permute(0, 2, 3, 1).reshape(2, LATENT * LATENT, CHANNELS)
    with torch.no_grad():
        for i in range(4):
            v = pipe.transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=enc, pooled_projections=pooled,
                                 timestep=sigmas[i].expand(4), img_ids=img_ids, txt_ids=torch.zeros(TOKENS, 3),
                                 return_dict=False)[0]
            v_u, v_c = v.chunk(2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + 3.0 * (v_c - v_u))
        z = x.reshape(2, LATENT, LATENT, CHANNELS).permute(0, 3, 1, 2)
        ref = (pipe.vae.decode(z / SCALE + SHIFT).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ref, atol=1e-5, rtol=1e-5)

    latents = run(pipe, output_type="latent")
    torch.testing.assert_close(latents, z, atol=1e-5, rtol=1e-5)  # unpacked (B, C, h, w)
    with pytest.raises(ValueError, match="must have shape"):
        pipe(["star"], num_inference_steps=1, latents=torch.zeros(1, LATENT * LATENT, CHANNELS))


def test_pipeline_folder_round_trip_and_dispatching_loader(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "latent")
    assert json.loads((tmp_path / "latent" / "model_index.json").read_text())["_class_name"] == "LatentShapesPipeline"
    loaded = load_pipeline(tmp_path / "latent")
    assert type(loaded) is LatentShapesPipeline and loaded.latent_size == LATENT
    assert loaded.class_embeddings.class_names == CLASS_NAMES
    assert loaded.vae.config.scaling_factor == SCALE and loaded.vae.config.shift_factor == SHIFT
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, steps=2), run(pipe, steps=2), atol=0, rtol=0)
    # the pixel model's folder (no model_index.json) still loads as a ShapesPipeline
    assert type(load_pipeline(os.path.join(ROOT, "models", "shapes-dit"))) is ShapesPipeline


def test_rasfx_on_the_latent_pipeline(pipe):
    plain = run(pipe)
    with rasfx.enabled(pipe, rasfx.RASConfig(ratio=1.0)):
        dense = run(pipe)
    assert torch.equal(dense, plain)
    with rasfx.enabled(pipe, rasfx.RASConfig(ratio=0.5, warmup=1)):
        ras = run(pipe)
        stats = rasfx.stats(pipe)
    assert ras.shape == plain.shape and not torch.equal(ras, plain)
    assert stats.num_tokens == LATENT * LATENT and stats.ras_steps and not stats.notes
    # patch 1, row-major: token i is latent pixel (i // w, i % w); the heatmap covers the image
    assert torch.equal(stats.token_grid, torch.arange(LATENT * LATENT).view(LATENT, LATENT))
    assert stats.pixel_scale == 4
    assert rasfx.heatmap_image(stats, "computed").size == (4 * LATENT, 4 * LATENT)


def test_diffusers_cache_hook_applies(pipe):
    plain = run(pipe)
    try:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never reuses: exact
        exact = run(pipe)
        pipe.transformer.disable_cache()
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # reuses after step 0
        reused = run(pipe)
    finally:
        pipe.transformer.disable_cache()
    torch.testing.assert_close(exact, plain, atol=1e-6, rtol=0)
    assert (reused - plain).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- training


def test_latent_normalisation_gives_unit_latents():
    import train_latent_dit

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    with torch.no_grad():  # latents far from N(0, 1): mean ~3, std >> 1, almost no posterior noise
        vae.quant_conv.weight[:CHANNELS] *= 10
        vae.quant_conv.bias[:CHANNELS] += 3
        vae.quant_conv.weight[CHANNELS:] = 0
        vae.quant_conv.bias[CHANNELS:] = -10
    args = argparse.Namespace(seed=0, vae_stats_images=64)
    stats = train_latent_dit.set_latent_normalisation(args, vae, torch.device("cpu"), log=lambda m: None)
    assert stats["latent_scaling_factor"] == vae.config.scaling_factor < 0.5
    x = generate_shapes(64, generator=make_generator(99), with_captions=False).images  # other images
    with torch.no_grad():
        z = (vae.encode(x).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(z.mean().item()) < 0.15 and abs(z.std().item() - 1) < 0.15


def test_training_smoke_run_writes_a_loadable_folder(tmp_path):
    import train_latent_dit

    out, pack = tmp_path / "out", tmp_path / "pack"
    train_latent_dit.main([
        "--out", str(out), "--pack-dir", str(pack), "--vae-max-steps", "2", "--max-steps", "2",
        "--batch-size", "2", "--vae-batch-size", "2", "--vae-channels", "8,8,16", "--vae-norm-groups", "4",
        "--latent-channels", "4", "--num-layers", "1", "--num-single-layers", "1", "--num-heads", "1",
        "--head-dim", "16", "--cond-dim", "8", "--cond-tokens", "2", "--eval-per-class", "1", "--grid-per-class", "1",
        "--num-inference-steps", "1", "--eval-guidance", "2.0", "--vae-stats-images", "4", "--vae-test-size", "4",
        "--compile", "off",
    ])
    for name in ("model_index.json", "class_embeddings.safetensors", "classes.json", "loss.csv", "loss.png",
                 "samples.png", "data_samples.png", "vae_recon.png", "metrics.json", "train.log"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vae_steps"] == 2 and metrics["steps"] == 2 and "vae_recon_psnr_db" in metrics
    assert set(metrics["per_guidance"]) == {"2.0"}
    phases = [line.split(",")[0] for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert phases == ["vae", "vae", "dit", "dit"]

    loaded = load_pipeline(out)
    assert type(loaded) is LatentShapesPipeline
    cfg = loaded.transformer.config
    assert (cfg.patch_size, cfg.in_channels, cfg.guidance_embeds) == (1, 4, False)
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim == 16
    assert loaded.vae.config.scaling_factor == pytest.approx(metrics["latent_scaling_factor"])
    assert loaded.latent_size == 16  # 64x64 images, factor 4
    from safetensors import safe_open

    with safe_open(str(out / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # stored in fp16

    parts = sorted(glob.glob(str(pack / "shapes-latent-dit.tar.part*")))
    assert parts
    blob = b"".join(open(p, "rb").read() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        names = set(tar.getnames())
    assert {"shapes-latent-dit/model_index.json", "shapes-latent-dit/vae/config.json",
            "shapes-latent-dit/train.log"} <= names


# ------------------------------------------------------------------------------------- shipped model

SHIPPED = os.path.join(ROOT, "models", "shapes-latent-dit")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model_index.json")),
                    reason="models/shapes-latent-dit is not trained yet (README.md only)")
def test_shipped_latent_model_loads_and_samples():
    weights = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(SHIPPED)
                  for f in files if f.endswith(".safetensors"))
    assert weights <= 25 * 1024 * 1024
    shipped = load_pipeline(SHIPPED)
    assert type(shipped) is LatentShapesPipeline and shipped.transformer.dtype == torch.float32
    shipped.set_progress_bar_config(disable=True)
    images = shipped(["star", 0], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


# ------------------------------------------------------------------------------------- head to head


def test_head_to_head_quick_on_a_latent_flux_pipeline(pipe, tmp_path):
    """``quality.py --head-to-head --quick`` on a (tiny) ``LatentShapesPipeline``: the hooks go
    through the Flux transformer's own ``enable_cache`` (on a copy, no subclass), every cache family ran or
    says why not, both skip estimates of the combined sampler ran, and a dense run's PSNR equals
    one recomputed here from the same noise and a dense reference sampled here."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import head_to_head
    import h2h_methods
    from shapes_eval import initial_noise, psnr

    hooked = h2h_methods.cache_capable(pipe)  # a copy for the hooks; Flux has CacheMixin: no subclass
    assert type(hooked.transformer) is FluxTransformer2DModel and hooked.transformer is not pipe.transformer
    assert all(torch.equal(a, b) for a, b in zip(hooked.transformer.state_dict().values(),
                                                 pipe.transformer.state_dict().values()))
    out = tmp_path / "h2h"
    head_to_head.main(["--head-to-head", "--quick", "--model", str(tmp_path / "tiny-latent"), "--out", str(out)],
                      pipe=pipe)
    data = json.loads((out / "head_to_head_tiny-latent.json").read_text())
    su = data["setup"]
    assert su["pipeline"] == "LatentShapesPipeline" and su["noise_shape"] == [CHANNELS, LATENT, LATENT]
    assert su["classifier"].replace(os.sep, "/") == "models/shapes-dit/classifier.safetensors"
    runs = {r["name"]: r for r in data["methods"]}
    hooks = {r["hook"] for r in runs.values() if r["family"] == "diffusers"}
    assert hooks | {n["name"] for n in data["not_applicable"]} == {
        "FirstBlockCache", "TaylorSeer", "TaylorSeer lite", "MagCache", "FasterCache", "PyramidAttentionBroadcast",
        "SeaCache", "TextKVCache"}
    assert "FasterCache attention every 2 (attention reuse only)" in runs  # its uncond-branch FFT needs BCHW outputs
    for estimate in ("extrapolate", "reuse"):
        r = runs[f"RAS 0.5 + skip every 2nd, {estimate}"]
        assert all(s["skipped_steps"] for s in r["per_seed"]) and r["compute"]["mean"] < runs["RAS 0.5"]["compute"]["mean"]

    seed = su["seed_ids"][1]
    x = initial_noise([seed * 1_000_003], (CHANNELS, LATENT, LATENT))
    ref = pipe(["circle"], num_inference_steps=su["ref_steps"], guidance_scale=su["guidance"], latents=x).images
    two = pipe(["circle"], num_inference_steps=2, guidance_scale=su["guidance"], latents=x).images
    recorded = next(s for s in runs["dense 2 steps"]["per_seed"] if s["seed"] == seed)
    assert abs(recorded["psnr"] - float(psnr(two, ref).mean())) < 1e-4

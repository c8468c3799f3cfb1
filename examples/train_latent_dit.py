"""Train rasfx's small latent-space demo model: an AutoencoderKL, then a Flux DiT on its latents.

Two phases on the procedural shapes data (``shapes_data.py``, 64x64 RGB), time-boxed together:

a. a small diffusers ``AutoencoderKL`` (3 blocks -> spatial factor 4 -> (C, 16, 16) latents),
   L1 + MSE reconstruction and a small KL term, bf16 autocast on a GPU. The latents' mean and std
   over fresh images give ``shift_factor`` and ``scaling_factor`` (stored in the VAE config,
   diffusers' convention: z = (latent - shift_factor) * scaling_factor).
b. a class-conditioned ``FluxTransformer2DModel`` (double- and single-stream blocks, 3-axis RoPE, no
   guidance embedding) on those latents, patch 1: 16x16 = 256 image tokens of C channels. The
   rectified-flow loop is ``train_small_dit.train_flow_model`` (same conditioning table with a null
   class, label dropout, logit-normal t, AdamW, warm-up + cosine decay, EMA, bf16 autocast,
   ``torch.compile`` of the blocks). Flux multiplies the timestep by 1000 inside the model, so the
   model gets t in (0, 1) (``LatentShapesPipeline`` passes the scheduler's t / 1000, as
   ``FluxPipeline`` does).

Evaluation uses the classifier shipped with the pixel model (``models/shapes-dit/classifier.safetensors``,
same data at 64x64). The run writes to ``--out`` a folder ``LatentShapesPipeline.from_pretrained`` reads:

    model_index.json, transformer/, vae/, scheduler/   diffusers pipeline layout (fp16 weights)
    class_embeddings.safetensors, classes.json         conditioning table (EMA) incl. null class
    loss.csv, loss.png                                 loss logs of both phases (column ``phase``)
    samples.png, data_samples.png, vae_recon.png       generated (class per row), real, and real /
                                                       reconstructed row pairs
    metrics.json, train.log                            steps, times, losses, PSNR, accuracies, FD

The VAE is saved (and packed) as soon as it is trained, the DiT as soon as it is trained, so a run
cut off later still leaves its finished parts. With ``--pack-dir`` the folder is also packed as
``shapes-latent-dit.tar.partNN`` there (``cat shapes-latent-dit.tar.part* | tar x``).

Example (the shipped model):

    python examples/train_latent_dit.py --out models/shapes-latent-dit --minutes 8.5

CPU smoke test:

    python examples/train_latent_dit.py --out /tmp/sl --vae-max-steps 2 --max-steps 2 --batch-size 4 \\
        --vae-batch-size 4 --vae-channels 8,8,16 --latent-channels 4 --num-layers 1 --num-single-layers 1 \\
        --eval-per-class 1 --grid-per-class 1 --num-inference-steps 2 --compile off
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from latent_pipeline import LatentShapesPipeline, image_ids, text_ids
from shapes_classifier import ShapesClassifier, frechet_distance, load_classifier
from shapes_data import CLASS_NAMES, NUM_CLASSES, generate_shapes, make_generator, save_image_grid
from shapes_pipeline import ClassEmbeddings
from train_small_dit import (
    ClassConditioner,
    Clock,
    add_common_args,
    evaluate,
    loop_progress,
    lr_factor,
    pack_folder,
    plot_loss_png,
    start_run,
    train_flow_model,
    write_loss_csv,
)

PACK_NAME = "shapes-latent-dit"
DEFAULT_CLASSIFIER = os.path.join(os.path.dirname(HERE), "models", "shapes-dit", "classifier.safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/shapes-latent-dit", help="output pipeline folder")
    p.add_argument("--minutes", type=float, default=8.5, help="wall-clock budget of the whole run")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="evaluation classifier (shapes_classifier.py)")
    # VAE
    p.add_argument("--vae-from", default=None, metavar="DIR",
                   help="reuse the VAE of an earlier (possibly cut-off) run: its output folder (DIR/vae, "
                        "DIR/loss.csv, DIR/metrics.json); skips phase a")
    p.add_argument("--vae-minutes", type=float, default=2.25)
    p.add_argument("--vae-max-steps", type=int, default=0, help="VAE step limit (0: clock only)")
    p.add_argument("--vae-batch-size", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=5e-4)
    p.add_argument("--vae-warmup-steps", type=int, default=100)
    p.add_argument("--vae-decay-start", type=float, default=0.5, help="progress where cosine LR decay starts")
    p.add_argument("--vae-channels", default="32,64,96", help="block_out_channels (3 blocks -> factor 4)")
    p.add_argument("--vae-norm-groups", type=int, default=16)
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--vae-kl-weight", type=float, default=1e-5, help="weight of the per-element mean KL")
    p.add_argument("--vae-stats-images", type=int, default=2048, help="images for the latent scale/shift")
    p.add_argument("--vae-test-size", type=int, default=1000, help="images for the reconstruction metrics")
    # DiT
    p.add_argument("--num-layers", type=int, default=4, help="double-stream (MMDiT) blocks")
    p.add_argument("--num-single-layers", type=int, default=8, help="single-stream blocks")
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64, help="split over RoPE axes (id, row, column)")
    p.add_argument("--reserve-minutes", type=float, default=0.75, help="kept for saving + evaluation")
    add_common_args(p, pack_name=PACK_NAME)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models


def build_vae(args) -> AutoencoderKL:
    channels = tuple(int(c) for c in args.vae_channels.split(","))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=args.latent_channels,
        norm_num_groups=args.vae_norm_groups,
        sample_size=64,
    )


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """The 3 RoPE axes (id, row, column) of ``head_dim``: about 1/4 for the id axis (constant here),
    the rest split evenly between rows and columns, all even; 64 -> (16, 24, 24)."""
    first = 2 * (head_dim // 8)
    side = 2 * ((head_dim - first) // 4)
    return first + (head_dim - first - 2 * side), side, side


def build_transformer(args) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=args.latent_channels,
        num_layers=args.num_layers,
        num_single_layers=args.num_single_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.num_heads,
        joint_attention_dim=args.cond_dim,
        pooled_projection_dim=args.cond_dim,
        guidance_embeds=False,
        axes_dims_rope=rope_axes(args.head_dim),
    )
    # adaLN-Zero initialisation (DiT): every block starts as the identity, the output as zero.
    zeroed = [m.norm1.linear for m in model.transformer_blocks] + [m.norm1_context.linear for m in model.transformer_blocks]
    zeroed += [m.norm.linear for m in model.single_transformer_blocks] + [model.norm_out.linear, model.proj_out]
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def fp16_copy(model: nn.Module) -> nn.Module:
    """A float16 CPU copy for saving (buffers included: see ``train_small_dit.save_dit``)."""
    return copy.deepcopy(model).to("cpu").to(torch.float16)


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator) -> torch.Tensor:
    """L1 + MSE reconstruction + ``kl_weight`` * KL to N(0, 1), each a mean over its elements."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample.float()
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    return F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * kl


# ----------------------------------------------------------------------------- VAE phase


def train_vae(args, device, log) -> tuple[AutoencoderKL, list[dict], dict]:
    torch.manual_seed(args.seed + 20)
    vae = build_vae(args).to(device)
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"VAE: {n_params / 1e6:.2f} M parameters, block_out_channels {vae.config.block_out_channels}, "
        f"latents ({args.latent_channels}, 16, 16)")
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=device.type == "cuda")
    schedule = argparse.Namespace(warmup_steps=args.vae_warmup_steps, decay_start=args.vae_decay_start)
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}
    gen = make_generator(args.seed + 21, device)
    budget = args.vae_minutes * 60.0
    t0 = time.perf_counter()
    rows: list[dict] = []
    step = 0
    while True:
        progress = loop_progress(step, args.vae_max_steps, t0, budget)
        if progress is None:
            break
        for g in opt.param_groups:
            g["lr"] = args.vae_lr * lr_factor(step, progress, schedule)
        x = generate_shapes(args.vae_batch_size, generator=gen, with_captions=False).images
        with torch.autocast(**amp):
            loss = vae_loss(vae, x, args.vae_kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1 or step == args.vae_max_steps:
            rows.append({"phase": "vae", "step": step, "time_s": round(time.perf_counter() - t0, 2),
                         "loss": loss.item(), "grad_norm": gnorm.item(), "lr": opt.param_groups[0]["lr"]})
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    stats = {"vae_steps": step, "vae_wall_s": round(wall, 1), "vae_images_seen": step * args.vae_batch_size,
             "vae_final_loss": rows[-1]["loss"] if rows else float("nan"), "vae_parameters": n_params}
    log(f"VAE: {step} steps in {wall:.1f} s, final loss {stats['vae_final_loss']:.4f}")
    return vae.eval().requires_grad_(False), rows, stats


def load_trained_vae(folder: str, device, log) -> tuple[AutoencoderKL, list[dict], dict]:
    """The VAE of an earlier run's output ``folder`` (float32, eval mode), its loss rows and its
    VAE metrics (training and latent normalisation), so phase b can run on its own."""
    path = os.path.join(folder, "vae")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--vae-from {folder!r}: no vae/config.json there; pass the output folder "
                                "of an earlier train_latent_dit.py run")
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).to(device)
    if vae.config.shift_factor is None or vae.config.scaling_factor in (None, 1.0):
        raise ValueError(f"--vae-from {folder!r}: the VAE config has no latent normalisation "
                         "(shift_factor / scaling_factor); the run that saved it did not finish phase a")
    rows: list[dict] = []
    csv_path = os.path.join(folder, "loss.csv")
    if os.path.isfile(csv_path):
        import csv

        with open(csv_path) as f:
            rows = [{k: (v if k == "phase" else float(v)) for k, v in r.items() if v != ""}
                    for r in csv.DictReader(f) if r.get("phase") == "vae"]
    stats: dict = {}
    metrics_path = os.path.join(folder, "metrics.json")
    if os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            stats = {k: v for k, v in json.load(f).items() if k.startswith(("vae_", "latent_"))}
    stats["vae_from"] = folder
    log(f"VAE: reused from {folder} (shift_factor {vae.config.shift_factor:.4f}, "
        f"scaling_factor {vae.config.scaling_factor:.4f}, {len(rows)} loss rows)")
    return vae.eval().requires_grad_(False), rows, stats


@torch.no_grad()
def set_latent_normalisation(args, vae: AutoencoderKL, device, log) -> dict:
    """Measure the latents' mean / std on fresh images and store shift_factor = mean and
    scaling_factor = 1 / std in the VAE config (normalised latents have mean 0, std 1)."""
    gen = make_generator(args.seed + 30, device)
    zs = []
    for i in range(0, args.vae_stats_images, 256):
        x = generate_shapes(min(256, args.vae_stats_images - i), generator=gen, with_captions=False).images
        zs.append(vae.encode(x).latent_dist.sample(generator=gen).float())
    z = torch.cat(zs)  # (N, C, 16, 16)
    shift, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    zn = (z - shift) / std
    stats = {
        "latent_shift_factor": shift,
        "latent_scaling_factor": 1.0 / std,
        "latent_channel_mean": [round(v, 4) for v in zn.mean(dim=(0, 2, 3)).tolist()],
        "latent_channel_std": [round(v, 4) for v in zn.std(dim=(0, 2, 3)).tolist()],
    }
    log(f"latents: shift_factor {shift:.4f}, scaling_factor {1.0 / std:.4f}; normalised channel std {stats['latent_channel_std']}")
    return stats


@torch.no_grad()
def evaluate_vae(args, out: str, vae: AutoencoderKL, clf: ShapesClassifier, device, log) -> dict:
    """Reconstruction PSNR (images in [0, 1]), the classifier's accuracy on reconstructions, the FD
    of reconstructions against their originals, and ``vae_recon.png`` (row pairs: real / recon)."""
    batch = generate_shapes(args.vae_test_size, generator=make_generator(args.seed + 1000, device), with_captions=False)
    recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
                       for x in batch.images.split(250)])
    mse = ((recon - batch.images) / 2).pow(2).flatten(1).mean(1)  # per image, [0, 1] scale
    psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
    pred, f_rec = clf.predict(recon)
    _, f_real = clf.predict(batch.images)
    stats = {
        "vae_test_size": args.vae_test_size,
        "vae_recon_psnr_db": round(psnr, 2),
        "vae_recon_class_accuracy": round(float((pred == batch.labels).float().mean()), 4),
        "vae_recon_fd": round(frechet_distance(f_rec, f_real), 3),
    }
    log(f"VAE reconstructions: PSNR {psnr:.2f} dB, class accuracy {stats['vae_recon_class_accuracy']:.4f}, "
        f"FD against the originals {stats['vae_recon_fd']:.3f}")
    n, cols = min(40, args.vae_test_size), 8
    pairs = [t for i in range(0, n, cols) for t in (batch.images[i : i + cols], recon[i : i + cols])]
    save_image_grid(torch.cat(pairs), os.path.join(out, "vae_recon.png"), nrow=cols)
    return stats


# ----------------------------------------------------------------------------- DiT phase


def train_latent_dit(args, vae: AutoencoderKL, device, clock: Clock, log):
    torch.manual_seed(args.seed)
    model = build_transformer(args).to(device)
    cond = ClassConditioner(NUM_CLASSES, args.cond_tokens, args.cond_dim, args.cond_dim).to(device)
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    size = vae.config.sample_size // (2 ** (len(vae.config.block_out_channels) - 1))  # 16
    img_ids, txt_ids = image_ids(size, size, device=device), text_ids(args.cond_tokens, device=device)

    @torch.no_grad()
    def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = generate_shapes(args.batch_size, generator=gen, with_captions=False)
        with torch.autocast(**amp):
            z = vae.encode(batch.images).latent_dist.sample(generator=gen)
        z = (z.float() - shift) * scale  # (B, C, 16, 16), about N(0, 1)
        packed = LatentShapesPipeline._pack_latents(z, z.shape[0], z.shape[1], size, size)
        return packed.contiguous(), batch.labels  # (B, 256, C), (B,)

    def predict(model, x_t, t, enc, pooled) -> torch.Tensor:
        return model(hidden_states=x_t, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t,
                     img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]  # Flux: timestep * 1000 inside

    budget = clock.left() - args.reserve_minutes * 60.0
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    return train_flow_model(args, device, budget, log, model, cond, blocks, make_batch, predict)


# ----------------------------------------------------------------------------- saving


def save_pipeline(args, out: str, vae: AutoencoderKL, ema_model, ema_cond: ClassConditioner) -> None:
    pipe = LatentShapesPipeline(
        transformer=fp16_copy(ema_model),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=fp16_copy(vae),
        class_embeddings=ClassEmbeddings(
            encoder=ema_cond.tokens.detach().float().cpu(),
            pooled=ema_cond.pooled.detach().float().cpu(),
            class_names=list(CLASS_NAMES),
            extra={"image_size": 64, "pixel_range": [-1.0, 1.0], "data": "examples/shapes_data.py",
                   "default_guidance_scale": args.guidance_scale},
        ),
    )
    pipe.save_pretrained(out, safe_serialization=True)


def save_losses(out: str, vae_rows: list[dict], dit_rows: list[dict]) -> None:
    """loss.csv (both phases) and loss.png (VAE curve above the DiT curve)."""
    from PIL import Image

    rows = vae_rows + [{"phase": "dit", **r} for r in dit_rows]
    write_loss_csv(rows, os.path.join(out, "loss.csv"))
    panels = []
    for name, part, title in (("vae", vae_rows, "VAE loss: L1 + MSE + KL"), ("dit", dit_rows, "DiT flow-matching MSE")):
        if part:
            path = os.path.join(out, f".loss_{name}.png")
            plot_loss_png(part, path, title=title)
            with Image.open(path) as im:
                panels.append(im.copy())
            os.remove(path)
    if panels:
        sheet = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)), "white")
        for i, p in enumerate(panels):
            sheet.paste(p, (0, sum(q.height for q in panels[:i])))
        sheet.save(os.path.join(out, "loss.png"))


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    clock, device, card = start_run(args)
    out = args.out
    log_file = open(os.path.join(out, "train.log"), "w")

    def log(msg: str) -> None:
        line = f"[{clock.elapsed():7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    def save_metrics() -> None:
        with open(os.path.join(out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        if args.pack_dir:
            pack_folder(out, args.pack_dir, name=PACK_NAME)

    import diffusers

    if not os.path.isfile(args.classifier):
        raise FileNotFoundError(f"evaluation classifier {args.classifier!r} not found; pass --classifier "
                                "(models/shapes-dit/classifier.safetensors of the repository)")
    clf = load_classifier(args.classifier, device)
    log(f"device {card}; torch {torch.__version__}; diffusers {diffusers.__version__}; args {vars(args)}")
    metrics: dict = {"card": card, "torch": torch.__version__, "diffusers": diffusers.__version__, "args": vars(args)}

    if args.vae_from:
        vae, vae_rows, vae_stats = load_trained_vae(args.vae_from, device, log)
        metrics.update(vae_stats)
    else:
        vae, vae_rows, vae_stats = train_vae(args, device, log)
        metrics.update(vae_stats)
        metrics.update(set_latent_normalisation(args, vae, device, log))
    metrics.update(evaluate_vae(args, out, vae, clf, device, log))
    fp16_copy(vae).save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    save_losses(out, vae_rows, [])
    save_metrics()
    log("saved the VAE")

    ema_model, ema_cond, dit_rows, dit_stats = train_latent_dit(args, vae, device, clock, log)
    save_pipeline(args, out, vae, ema_model, ema_cond)
    save_losses(out, vae_rows, dit_rows)
    metrics.update(dit_stats)
    del ema_model
    save_metrics()
    log("saved the pipeline")

    metrics.update(evaluate(args, out, device, clf, clock, log))
    metrics["total_wall_s"] = round(clock.elapsed(), 1)
    save_metrics()
    summary = {k: metrics[k] for k in ("vae_recon_psnr_db", "steps", "final_loss", "per_guidance")}
    log(f"done: {json.dumps(summary)}")
    log_file.close()
    if args.pack_dir:  # the closed log goes in the final pack too
        pack_folder(out, args.pack_dir, name=PACK_NAME)


if __name__ == "__main__":
    main()

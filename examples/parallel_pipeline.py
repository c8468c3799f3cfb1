"""Region-adaptive sampling across several processes (context parallelism) from an ordinary
diffusers pipeline. Every process runs this same script, makes the same pipeline call with the
same seed, and gets the whole image; each computes an equal share of the active tokens of every
step (docs/parallel.md).

    # CPU, gloo: a tiny Flux pipeline with random weights (seconds)
    torchrun --standalone --nproc-per-node 2 examples/parallel_pipeline.py --check

    # GPUs, nccl: the same script, a real model
    torchrun --standalone --nproc-per-node 4 examples/parallel_pipeline.py \\
        --model black-forest-labs/FLUX.1-dev --size 1024 --steps 28 --ratio 0.25 --out flux.png

``--out`` saves the image (rank 0; every rank decodes it). ``--check`` runs the same call again
on this process alone (rasfx without ``parallel``) and prints whether every rank's latents equal
it (exactly in float32 on CPUs; on GPUs within rounding: another kernel shape per rank).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rasfx  # noqa: E402


def tiny_flux(seed: int = 0):
    """A Flux pipeline with random weights (same on every rank: same seed) and random prompt
    embeddings: 64 x 64 px, 256 image tokens, 5 text tokens."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from rasfx.presets import randomize_

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.0, scaling_factor=1.0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(transformer=randomize_(transformer, seed), scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    prompt = dict(prompt_embeds=torch.randn(1, 5, 16), pooled_prompt_embeds=torch.randn(1, 8))
    return pipe, prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (random weights, CPU) or a diffusers Flux checkpoint")
    ap.add_argument("--prompt", default="a red fox in the snow, photograph")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.25, help="RASConfig.ratio (1.0: dense context parallelism)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=600.0, help="ParallelConfig.timeout_s")
    ap.add_argument("--check", action="store_true", help="compare with the same call on one process")
    ap.add_argument("--out", default=None, help="save the image here (rank 0)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout_s),
                            device_id=device if cuda else None)
    rank = dist.get_rank()
    try:
        if args.model == "tiny":
            pipe, prompt = tiny_flux(args.seed)
            pipe.to(device)
            prompt = {k: v.to(device) for k, v in prompt.items()}
        else:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
            prompt = dict(prompt=args.prompt)
        pipe.set_progress_bar_config(disable=rank != 0)
        call = dict(prompt, height=args.size, width=args.size, num_inference_steps=args.steps)

        def generate(output_type):
            generator = torch.Generator("cpu").manual_seed(args.seed)  # the same latents on every rank
            return pipe(**call, generator=generator, output_type=output_type)[0]

        # every rank: the same enable and the same pipeline call
        rasfx.enable(pipe, rasfx.RASConfig(ratio=args.ratio),
                     parallel=rasfx.ParallelConfig(timeout_s=args.timeout_s))
        output_type = "pil" if args.out and not args.check else "latent"
        t0 = time.perf_counter()
        latents = generate(output_type)
        seconds = time.perf_counter() - t0
        stats = rasfx.stats(pipe)
        if rank == 0:
            print(f"{dist.get_world_size()} ranks ({dist.get_backend()}), {args.steps} steps: "
                  f"{seconds:.2f} s per image")
            print(stats.parallel.summary())
        if args.check:
            rasfx.disable(pipe)
            rasfx.enable(pipe, rasfx.RASConfig(ratio=args.ratio))  # this process alone
            alone = generate("latent")
            diff = float((latents.float() - alone.float()).abs().max())
            print(f"rank {rank}: same as one process: {torch.equal(latents, alone)} (max difference {diff:.3g})")
        if output_type == "pil" and rank == 0:
            latents[0].save(args.out)
            print(f"saved {args.out}")
        rasfx.disable(pipe)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

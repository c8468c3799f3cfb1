"""Train rasfx's small demo DiT (and its evaluation classifier) on procedural shapes.

A diffusers ``SD3Transformer2DModel`` is trained in pixel space (64x64 RGB, patch 2 -> 1024 image
tokens) with rectified flow as in SD3: x_t = (1 - t) x0 + t noise, the model predicts the velocity
noise - x0, the timestep is fed as t * 1000 (``FlowMatchEulerDiscreteScheduler``'s convention).
Conditioning replaces SD3's text encoders with a learned table: a class label selects T tokens
(``encoder_hidden_states``) and a pooled vector (``pooled_projections``); an extra "null" class,
used for 10% of the training labels, gives classifier-free guidance.

The run is time-boxed (``--minutes``, wall clock, split into DiT training, classifier training and a
final evaluation) and/or step-boxed (``--max-steps``). It writes to ``--out``:

    config.json, diffusion_pytorch_model.safetensors   EMA transformer (fp16), SD3Transformer2DModel
    scheduler/scheduler_config.json                    FlowMatchEulerDiscreteScheduler
    class_embeddings.safetensors, classes.json         conditioning table (EMA) incl. null class
    classifier.safetensors                             ShapesClassifier (shapes_classifier.py)
    loss.csv, loss.png                                 training loss log and curve
    samples.png, data_samples.png                      generated (class per row) and real images
    metrics.json                                       steps, times, losses, accuracies, FD scores

With ``--pack-dir`` the folder is also packed as ``shapes-dit.tar.partNN`` (<= 15 MiB each) there,
once after the DiT is saved and again at the end (for fetching from a remote GPU machine).

Reproducibility: everything is seeded; with ``--max-steps`` binding (not the clock) a run on the same
device/software repeats up to GPU kernel non-determinism. The learning-rate decay follows the
larger of step and clock progress, so clock-bound runs differ in their step count.

Example (the shipped model):

    python examples/train_small_dit.py --out models/shapes-dit --minutes 8.75

CPU smoke test:

    python examples/train_small_dit.py --out /tmp/sd --max-steps 3 --batch-size 4 --clf-max-steps 3 \\
        --eval-per-class 1 --grid-per-class 1 --num-layers 2 --compile off
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import sys
import tarfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from shapes_classifier import ShapesClassifier, classifier_loss, frechet_distance, save_classifier
from shapes_data import CLASS_NAMES, NUM_CLASSES, generate_shapes, make_generator, save_image_grid
from shapes_pipeline import ClassEmbeddings, load_pipeline

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="outputs/shapes-dit", help="output model folder")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of the whole run")
    # model
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    # classifier
    p.add_argument("--clf-minutes", type=float, default=0.75)
    p.add_argument("--clf-max-steps", type=int, default=0)
    p.add_argument("--clf-batch-size", type=int, default=256)
    p.add_argument("--clf-test-size", type=int, default=10000)
    p.add_argument("--reserve-minutes", type=float, default=0.9, help="kept for saving + evaluation")
    add_common_args(p, pack_name="shapes-dit")
    return p.parse_args(argv)


def add_common_args(p: argparse.ArgumentParser, pack_name: str) -> None:
    """The arguments both trainers share: run, conditioning table, the flow-matching loop
    (``train_flow_model``) and the evaluation (``evaluate``)."""
    p.add_argument("--pack-dir", default=None, help=f"also write {pack_name}.tar.partNN here")
    p.add_argument("--max-steps", type=int, default=0, help="DiT step limit (0: clock only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--cond-dim", type=int, default=64, help="joint_attention_dim = pooled_projection_dim")
    p.add_argument("--cond-tokens", type=int, default=8, help="encoder tokens per class")
    # optimisation
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--decay-start", type=float, default=0.7, help="progress where cosine LR decay starts")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1, help="fraction of null labels (CFG)")
    p.add_argument("--t-sampling", choices=["logit-normal", "uniform"], default="logit-normal")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile the blocks")
    p.add_argument("--log-every", type=int, default=25)
    # evaluation / samples
    p.add_argument("--num-inference-steps", type=int, default=28)
    p.add_argument("--guidance-scale", type=float, default=4.0, help="for samples.png")
    p.add_argument("--eval-guidance", default="1.0,2.0,4.0", help="guidance scales for metrics")
    p.add_argument("--eval-per-class", type=int, default=50)
    p.add_argument("--grid-per-class", type=int, default=8)


# ----------------------------------------------------------------------------- helpers


class ClassConditioner(nn.Module):
    """Learned conditioning table; row ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, num_tokens: int, dim: int, pooled_dim: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, dim))  # (K+1, T, D)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_dim) * 0.5)  # (K+1, P)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens[labels], self.pooled[labels]  # (B, T, D), (B, P)


def build_transformer(args) -> SD3Transformer2DModel:
    inner = args.num_heads * args.head_dim
    model = SD3Transformer2DModel(
        sample_size=64,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=args.num_layers,
        attention_head_dim=args.head_dim,
        num_attention_heads=args.num_heads,
        joint_attention_dim=args.cond_dim,
        caption_projection_dim=inner,
        pooled_projection_dim=args.cond_dim,
        pos_embed_max_size=32,
    )
    # adaLN-Zero initialisation (DiT): every block starts as the identity, the output as zero.
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            nn.init.zeros_(norm.linear.weight)
            nn.init.zeros_(norm.linear.bias)
    nn.init.zeros_(model.norm_out.linear.weight)
    nn.init.zeros_(model.norm_out.linear.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def sample_t(n: int, mode: str, generator: torch.Generator, device) -> torch.Tensor:
    """(n,) flow times in (0, 1); t = 1 is pure noise (SD3 convention)."""
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(torch.randn(n, generator=generator, device=device))  # logit-normal(0, 1)


def lr_factor(step: int, progress: float, args) -> float:
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    if progress <= args.decay_start:
        return warm
    q = min(1.0, (progress - args.decay_start) / max(1e-6, 1.0 - args.decay_start))
    return warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * q)))


def plot_loss_png(
    rows: list[dict], path: str, width: int = 640, height: int = 360, title: str = "flow-matching MSE"
) -> None:
    """Loss curve (raw log points and a centred moving average, log-y) as a PNG, with PIL only."""
    from PIL import Image, ImageDraw

    if not rows:
        return
    steps = [r["step"] for r in rows]
    loss = [max(1e-6, r["loss"]) for r in rows]
    win = 5  # points on each side; centred, so the average does not lag a steep curve
    smooth = [sum(loss[max(0, i - win) : i + win + 1]) / len(loss[max(0, i - win) : i + win + 1]) for i in range(len(loss))]
    lo, hi = math.log10(min(loss)), math.log10(max(loss))
    hi = hi if hi > lo else lo + 1
    x0, y0, x1, y1 = 60, 20, width - 20, height - 40
    smax = max(steps[-1], 1)

    def xy(s, v):
        return x0 + (x1 - x0) * s / smax, y1 - (y1 - y0) * (math.log10(v) - lo) / (hi - lo)

    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([x0, y0, x1, y1], outline="black")
    for k in range(5):  # y ticks
        v = 10 ** (lo + (hi - lo) * k / 4)
        _, y = xy(0, v)
        d.line([x0 - 4, y, x0, y], fill="black")
        d.text((4, y - 6), f"{v:.3g}", fill="black")
    for k in range(5):  # x ticks
        s = smax * k / 4
        x, _ = xy(s, 10**lo)
        d.line([x, y1, x, y1 + 4], fill="black")
        d.text((x - 12, y1 + 8), f"{int(s)}", fill="black")
    d.text(((x0 + x1) // 2 - 20, height - 16), "step", fill="black")
    d.text((x0 + 6, y0 + 4), f"{title} (log scale); grey: log points, blue: moving average", fill="black")
    d.line([xy(s, v) for s, v in zip(steps, loss)], fill=(170, 170, 170), width=1)
    d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 200), width=2)
    im.save(path)


def pack_folder(folder: str, pack_dir: str, part_bytes: int = 15 * 2**20, name: str = "shapes-dit") -> list[str]:
    """tar ``folder`` (as ``name``/...) and split it into <= part_bytes files ``name``.tar.partNN in
    ``pack_dir`` (unpack: ``cat name.tar.part* | tar x``)."""
    os.makedirs(pack_dir, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(folder, arcname=name)
    data = buf.getvalue()
    for old in os.listdir(pack_dir):
        if old.startswith(f"{name}.tar.part"):
            os.remove(os.path.join(pack_dir, old))
    paths = []
    for i in range(0, len(data), part_bytes):
        path = os.path.join(pack_dir, f"{name}.tar.part{i // part_bytes:02d}")
        with open(path + ".tmp", "wb") as f:
            f.write(data[i : i + part_bytes])
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def loop_progress(step: int, max_steps: int, t0: float, budget_s: float) -> float | None:
    """Progress in [0, 1] of a step- and/or time-boxed loop started at ``t0`` (the larger of step
    and clock progress); None once it is done: ``max_steps`` (0: no limit) reached, or the budget
    spent after at least one step."""
    elapsed = time.perf_counter() - t0
    if (max_steps and step >= max_steps) or (step > 0 and elapsed >= budget_s):
        return None
    return max(step / max_steps if max_steps else 0.0, elapsed / max(budget_s, 1e-6))


class Clock:
    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.budget = minutes * 60.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed()


# ----------------------------------------------------------------------------- DiT training


def train_dit(args, device, clock: Clock, log) -> tuple[nn.Module, ClassConditioner, list[dict], dict]:
    torch.manual_seed(args.seed)
    model = build_transformer(args).to(device)
    cond = ClassConditioner(NUM_CLASSES, args.cond_tokens, args.cond_dim, args.cond_dim).to(device)

    def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = generate_shapes(args.batch_size, generator=gen, with_captions=False)
        return batch.images, batch.labels  # (B, 3, 64, 64) in [-1, 1], (B,)

    def predict(model, x_t, t, enc, pooled) -> torch.Tensor:
        return model(
            hidden_states=x_t, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t * 1000.0, return_dict=False
        )[0]

    # Time left for the DiT = budget - classifier - reserve (evaluation, saving).
    budget = clock.left() - args.clf_minutes * 60.0 - args.reserve_minutes * 60.0
    return train_flow_model(args, device, budget, log, model, cond, list(model.transformer_blocks), make_batch, predict)


def train_flow_model(
    args, device, budget_s: float, log, model: nn.Module, cond: ClassConditioner, blocks: list[nn.Module],
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]],
    predict: Callable[..., torch.Tensor],
) -> tuple[nn.Module, ClassConditioner, list[dict], dict]:
    """The rectified-flow training loop of both trainers (this one and ``train_latent_dit.py``).

    ``make_batch(generator)`` gives clean samples x0 (B, ...) and class labels (B,);
    ``predict(model, x_t, t, enc, pooled)`` the velocity for flow times ``t`` in (0, 1) (the model's
    timestep convention is the caller's). ``blocks`` are compiled one by one (``--compile``).
    Optimiser, LR schedule, label dropout, EMA and logging follow ``args`` (see ``parse_args``).
    Returns the EMA model and conditioner, the loss log rows and run statistics.
    """
    n_params = sum(p.numel() for p in model.parameters())
    log(f"transformer: {n_params / 1e6:.2f} M parameters; conditioner {sum(p.numel() for p in cond.parameters())}")

    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    ema_cond = copy.deepcopy(cond).eval().requires_grad_(False)
    params = list(model.parameters()) + list(cond.parameters())
    ema_params = list(ema_model.parameters()) + list(ema_cond.parameters())

    decay, no_decay = [], []
    for p in params:
        (decay if p.ndim >= 2 and p is not cond.tokens and p is not cond.pooled else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        eps=1e-8,
        fused=device.type == "cuda",
    )

    if device.type == "cuda":
        # cuDNN's fused attention fails in backward on these shapes (torch 2.11, H100: "mha_graph.execute
        # ... is_good()", before that an illegal memory access); flash / memory-efficient SDPA do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if use_compile:
        for block in blocks:  # regional compilation: one graph per distinct block type
            block.compile(dynamic=False)
        log("torch.compile: transformer blocks")

    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}
    gen = make_generator(args.seed + 1, device)  # data + noise + times + label dropout
    t_start = time.perf_counter()
    rows: list[dict] = []
    step, compile_s = 0, 0.0
    bar = tqdm(total=args.max_steps or None, desc="DiT", mininterval=10.0, file=sys.stdout) if tqdm else None
    while True:
        progress = loop_progress(step, args.max_steps, t_start, budget_s)
        if progress is None:
            break
        for grp in opt.param_groups:
            grp["lr"] = args.lr * lr_factor(step, progress, args)

        x0, labels = make_batch(gen)
        drop = torch.rand(args.batch_size, generator=gen, device=device) < args.label_dropout
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)  # (B,)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = sample_t(args.batch_size, args.t_sampling, gen, device)  # (B,)
        tb = t.view(-1, *([1] * (x0.dim() - 1)))
        x_t = (1.0 - tb) * x0 + tb * noise
        target = noise - x0  # velocity

        t_step = time.perf_counter()
        try:
            with torch.autocast(**amp):
                enc, pooled = cond(labels)  # (B, T, D), (B, P)
                pred = predict(model, x_t, t, enc, pooled)
            loss = F.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as exc:  # torch.compile trouble on the first step: fall back to eager
            if not (use_compile and step == 0):
                raise
            if isinstance(exc, torch.AcceleratorError):  # the CUDA context is lost: nothing to fall back to
                raise RuntimeError("torch.compile'd blocks failed on the device and the CUDA context is "
                                   "lost; rerun with --compile off") from exc
            log(f"torch.compile failed ({type(exc).__name__}: {exc}); continuing in eager mode")
            for block in blocks:
                block._compiled_call_impl = None
            use_compile = False
            opt.zero_grad(set_to_none=True)
            continue
        gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        with torch.no_grad():
            d = min(args.ema_decay, (1.0 + step) / (10.0 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - d)
        if step == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            compile_s = time.perf_counter() - t_step
            log(f"first step (incl. compile/warm-up): {compile_s:.1f} s")
        step += 1
        if step % args.log_every == 0 or step == 1 or (args.max_steps and step == args.max_steps):
            row = {
                "step": step,
                "time_s": round(time.perf_counter() - t_start, 2),
                "loss": loss.item(),
                "grad_norm": gnorm.item(),
                "lr": opt.param_groups[0]["lr"],
            }
            rows.append(row)
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t_start
    tail = [r["loss"] for r in rows[-max(1, len(rows) // 10) :]]
    stats = {
        "steps": step,
        "dit_wall_s": round(wall, 1),
        "first_step_s": round(compile_s, 1),
        "steps_per_s": round(step / max(wall, 1e-9), 2),
        "images_seen": step * args.batch_size,
        "final_loss": rows[-1]["loss"] if rows else float("nan"),
        "final_loss_mean_last10pct": sum(tail) / len(tail) if tail else float("nan"),
        "parameters": n_params,
        "compiled": use_compile,
    }
    log(f"DiT: {step} steps in {wall:.1f} s, final loss {stats['final_loss']:.4f} (mean last 10%: {stats['final_loss_mean_last10pct']:.4f})")
    return ema_model, ema_cond, rows, stats


def save_dit(args, out: str, ema_model, ema_cond: ClassConditioner, rows, stats) -> None:
    os.makedirs(out, exist_ok=True)
    # fp16 storage (half the size). Cast the whole model, buffers included: diffusers (without
    # accelerate) then copies into float32 parameters for from_pretrained(..., torch_dtype=float32);
    # with a float32 buffer first in the state dict it would assign the fp16 tensors instead.
    half = copy.deepcopy(ema_model).to("cpu")
    half.to(torch.float16)  # (warns about _keep_in_fp32_modules, which is empty for SD3)
    half.save_pretrained(out, safe_serialization=True)
    del half
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(os.path.join(out, "scheduler"))
    ClassEmbeddings(
        encoder=ema_cond.tokens.detach().float().cpu(),
        pooled=ema_cond.pooled.detach().float().cpu(),
        class_names=list(CLASS_NAMES),
        extra={
            "image_size": 64,
            "pixel_range": [-1.0, 1.0],
            "data": "examples/shapes_data.py",
            "default_guidance_scale": args.guidance_scale,
        },
    ).save(out)
    write_loss_csv(rows, os.path.join(out, "loss.csv"))
    plot_loss_png(rows, os.path.join(out, "loss.png"))


def write_loss_csv(rows: list[dict], path: str) -> None:
    """The loss log rows (dicts with the same keys) as CSV."""
    fields = list(rows[0]) if rows else ["step", "time_s", "loss", "grad_norm", "lr"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------- classifier


def train_classifier(args, device, log) -> tuple[ShapesClassifier, dict]:
    torch.manual_seed(args.seed + 2)
    clf = ShapesClassifier(NUM_CLASSES).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=0.05)
    gen = make_generator(args.seed + 3, device)
    budget = args.clf_minutes * 60.0
    t0 = time.perf_counter()
    step, loss = 0, torch.tensor(float("nan"))
    amp = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}
    while True:
        progress = loop_progress(step, args.clf_max_steps, t0, budget)
        if progress is None:
            break
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        batch = generate_shapes(args.clf_batch_size, generator=gen, with_captions=False)
        x = batch.images
        # Robustness to generated images: mild Gaussian noise on a random half of the batch.
        sigma = torch.rand(x.shape[0], 1, 1, 1, generator=gen, device=device) * 0.1
        sigma = sigma * (torch.rand(x.shape[0], 1, 1, 1, generator=gen, device=device) < 0.5)
        x = x + sigma * torch.randn(x.shape, generator=gen, device=device)
        with torch.autocast(**amp):
            loss = classifier_loss(clf, x, batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    clf.eval()
    # Held-out accuracy on fresh images from another seed.
    test_gen = make_generator(args.seed + 1000, device)
    correct, n = 0, 0
    with torch.no_grad():
        for i in range(0, args.clf_test_size, 1000):
            b = generate_shapes(min(1000, args.clf_test_size - i), generator=test_gen, with_captions=False)
            pred, _ = clf.predict(b.images)
            correct += int((pred == b.labels).sum())
            n += b.labels.numel()
    stats = {
        "clf_steps": step,
        "clf_wall_s": round(time.perf_counter() - t0, 1),
        "clf_final_loss": loss.item(),
        "clf_test_accuracy": correct / max(n, 1),
        "clf_test_size": n,
    }
    log(f"classifier: {step} steps, test accuracy {stats['clf_test_accuracy']:.4f} on {n} fresh images")
    return clf, stats


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(args, out: str, device, clf: ShapesClassifier, clock: Clock, log) -> dict:
    """Samples grid, data grid and per-guidance class accuracy / FD of the model saved in ``out``
    (either pipeline, see ``load_pipeline``), in float32."""
    pipe = load_pipeline(out, device=device, dtype=torch.float32)  # also tests the saved folder
    pipe.set_progress_bar_config(disable=True)
    metrics: dict = {"eval_dtype": "float32", "num_inference_steps": args.num_inference_steps}

    # Samples grid: one class per row.
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.grid_per_class)
    t0 = time.perf_counter()
    imgs = pipe(
        labels,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).images * 2 - 1  # (B, 3, 64, 64) in [-1, 1]
    metrics["grid_seconds"] = round(time.perf_counter() - t0, 2)
    save_image_grid(imgs, os.path.join(out, "samples.png"), nrow=args.grid_per_class)
    real = generate_shapes(len(labels), generator=make_generator(args.seed + 7), labels=labels)
    save_image_grid(real.images, os.path.join(out, "data_samples.png"), nrow=args.grid_per_class)

    # Real-data reference features, and a real-vs-real FD for scale.
    n_eval = NUM_CLASSES * args.eval_per_class
    r1 = generate_shapes(n_eval, generator=make_generator(args.seed + 11, device), with_captions=False)
    r2 = generate_shapes(n_eval, generator=make_generator(args.seed + 12, device), with_captions=False)
    _, f_r1 = clf.predict(r1.images)
    _, f_r2 = clf.predict(r2.images)
    metrics["eval_samples"] = n_eval
    metrics["fd_real_vs_real"] = round(frechet_distance(f_r1, f_r2), 3)

    scales = [float(s) for s in args.eval_guidance.split(",") if s.strip()]
    per_scale = {}
    eval_labels = torch.arange(NUM_CLASSES).repeat(args.eval_per_class)
    for gscale in scales:
        if clock.left() < 25 and per_scale:
            log(f"skipping guidance {gscale}: {clock.left():.0f} s left")
            continue
        t0 = time.perf_counter()
        x = pipe(
            eval_labels,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=gscale,
            generator=torch.Generator().manual_seed(args.seed + 100),
        ).images * 2 - 1  # (B, 3, 64, 64) in [-1, 1], clamped
        dt = time.perf_counter() - t0
        pred, feats = clf.predict(x)
        acc = float((pred.cpu() == eval_labels).float().mean())
        fd = frechet_distance(feats, f_r1)
        per_scale[str(gscale)] = {"class_accuracy": round(acc, 4), "fd": round(fd, 3), "seconds": round(dt, 2)}
        log(f"guidance {gscale}: class accuracy {acc:.3f}, FD {fd:.3f} ({dt:.1f} s for {n_eval} images)")
    metrics["per_guidance"] = per_scale
    return metrics


# ----------------------------------------------------------------------------- main


def start_run(args) -> tuple[Clock, torch.device, str]:
    """Start the clock, pick the device (TF32 on CUDA), create ``args.out``; -> (clock, device, card name)."""
    clock = Clock(args.minutes)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    return clock, device, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main(argv=None) -> None:
    args = parse_args(argv)
    clock, device, card = start_run(args)
    out = args.out

    def log(msg: str) -> None:
        print(f"[{clock.elapsed():7.1f}s] {msg}", flush=True)

    import diffusers

    log(f"device {card}; torch {torch.__version__}; diffusers {diffusers.__version__}; args {vars(args)}")
    ema_model, ema_cond, rows, dit_stats = train_dit(args, device, clock, log)
    save_dit(args, out, ema_model, ema_cond, rows, dit_stats)
    metrics = {"card": card, "torch": torch.__version__, "diffusers": diffusers.__version__, "args": vars(args)}
    metrics.update(dit_stats)
    del ema_model
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if args.pack_dir:
        pack_folder(out, args.pack_dir)
    log("saved the DiT")

    clf, clf_stats = train_classifier(args, device, log)
    save_classifier(clf, os.path.join(out, "classifier.safetensors"), test_accuracy=clf_stats["clf_test_accuracy"])
    metrics.update(clf_stats)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if args.pack_dir:
        pack_folder(out, args.pack_dir)

    metrics.update(evaluate(args, out, device, clf, clock, log))
    metrics["total_wall_s"] = round(clock.elapsed(), 1)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if args.pack_dir:
        pack_folder(out, args.pack_dir)
    log(f"done: {json.dumps({k: metrics[k] for k in ('steps', 'final_loss', 'clf_test_accuracy', 'per_guidance')})}")


if __name__ == "__main__":
    main()

"""The GEMMs and attention calls a RAS step runs, one by one, against the tile choices that
could serve them better.

A RAS step at a small ratio runs GEMMs of 600-2000 rows; at those sizes a GEMM's time is set
by how its output tiles fill the GPU's SMs (wave quantisation), not by its FLOPs. This script
times, per shape, in CUDA-graph replays (no launch overhead):

* ``cublas``: ``F.linear`` as eager PyTorch and the default ``torch.compile`` run it;
* ``autotune``: ``torch.compile`` with ``max_autotune_gemm`` (Inductor benchmarks its Triton
  GEMM templates against cuBLAS and keeps the fastest);
* ``grouped``: the image-stream and text-stream GEMMs of an MM-DiT block (different weights,
  same K and N) as one ``torch._grouped_mm`` launch instead of two;
* adaLN modulation: the per-block ``Linear(silu(temb))`` GEMVs (2 rows) one by one vs. one GEMV
  over the concatenated weights;
* attention: active queries against the full key set, at the query count a ratio gives and at
  the next multiple of 128 (the flash kernels' query tile), and split over 2-4 slices of the keys
  merged by their log-sum-exp (more CTAs for few queries);
* the image and text GEMMs of a joint block on two CUDA streams (inside one CUDA graph) instead of
  one after the other.

    python benchmarks/bench_gemm_shapes.py --out gemm_shapes.md
    python benchmarks/bench_gemm_shapes.py --ratios 0.125 --autotune --out gemm_shapes.md   # + Inductor autotuning
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

# (name, K, N) of the projections of each model; rows = batch x tokens computed.
MODELS = {
    "sd3": dict(hidden=1536, mlp=6144, batch=2, n_img=4096, n_txt=333, heads=24, head_dim=64, blocks=24),
    "pixart": dict(hidden=1152, mlp=4608, batch=2, n_img=4096, n_txt=0, heads=16, head_dim=72, blocks=28),
}


def bench(fn) -> float:
    import triton.testing

    fn()
    return triton.testing.do_bench_cudagraph(fn, rep=50)


def linear_rows(model: str, ratios) -> list[tuple[str, int, int, int]]:
    cfg = MODELS[model]
    h, mlp, b = cfg["hidden"], cfg["mlp"], cfg["batch"]
    kn = [("qkv/out", h, h), ("fused qkv", h, 3 * h), ("mlp up", h, mlp), ("mlp down", mlp, h)]
    rows = [(f"image r={r}", b * round(r * cfg["n_img"] / 64) * 64) for r in ratios]
    if cfg["n_txt"]:
        rows.append(("text", b * cfg["n_txt"]))
    return [(f"{who} {what}", m, k, n) for who, m in rows for what, k, n in kn]


def time_linears(model, ratios, dev, dt, autotune: bool) -> list[str]:
    out = ["| GEMM | M | K | N | cuBLAS ms | TFLOP/s | " + ("autotuned ms | autotuned / cuBLAS |" if autotune else ""),
           "|---|---|---|---|---|---|" + ("---|---|" if autotune else "")]
    for name, m, k, n in linear_rows(model, ratios):
        x = torch.randn(m, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        bias = torch.randn(n, device=dev, dtype=dt)
        t = bench(lambda: F.linear(x, w, bias))
        row = f"| {name} | {m} | {k} | {n} | {t:.4f} | {2 * m * k * n / t / 1e9:.0f} |"
        if autotune:
            torch._dynamo.reset()
            fn = torch.compile(lambda x, w, bias: F.linear(x, w, bias), dynamic=False,
                               options={"max_autotune_gemm": True, "triton.cudagraphs": False})
            ta = bench(lambda: fn(x, w, bias))
            row += f" {ta:.4f} | {ta / t:.2f} |"
        out.append(row)
        print(row, flush=True)
    return out


def time_grouped(model, ratios, dev, dt) -> list[str]:
    cfg = MODELS[model]
    if not cfg["n_txt"] or not hasattr(torch, "_grouped_mm"):
        return []
    h, mlp, b = cfg["hidden"], cfg["mlp"], cfg["batch"]
    out = ["| image rows | text rows | K | N | two F.linear ms | on two streams ms | streams / one stream "
           "| one _grouped_mm ms | grouped / two |", "|---|---|---|---|---|---|---|---|---|"]
    side = torch.cuda.Stream()
    m_txt = b * cfg["n_txt"]
    for r in ratios:
        m_img = b * round(r * cfg["n_img"] / 64) * 64
        for k, n in [(h, h), (h, 3 * h), (h, mlp), (mlp, h)]:
            xi = torch.randn(m_img, k, device=dev, dtype=dt)
            xt = torch.randn(m_txt, k, device=dev, dtype=dt)
            w = torch.randn(2, n, k, device=dev, dtype=dt) / k**0.5  # [G, N, K]
            x = torch.cat([xi, xt])
            offs = torch.tensor([m_img, m_img + m_txt], device=dev, dtype=torch.int32)
            t2 = bench(lambda: (F.linear(xi, w[0]), F.linear(xt, w[1])))

            def two_streams():  # the text GEMM on a side stream, joined before the next op
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                yi = F.linear(xi, w[0])
                with torch.cuda.stream(side):
                    yt = F.linear(xt, w[1])
                main.wait_stream(side)
                return yi, yt

            ts = bench(two_streams)
            try:
                tg = bench(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
                ref = torch.cat([F.linear(xi, w[0]), F.linear(xt, w[1])]).float()
                err = (torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).float() - ref).abs().max().item()
                cell = f"{tg:.4f} | {tg / t2:.2f} (err {err:.2g}) |"
            except Exception as e:  # noqa: BLE001 - report what the build does not support
                cell = f"n/a ({type(e).__name__}: {str(e)[:60]}) | |"
            row = f"| {m_img} | {m_txt} | {k} | {n} | {t2:.4f} | {ts:.4f} | {ts / t2:.2f} | {cell}"
            out.append(row)
            print(row, flush=True)
    return out


def time_adaln(model, dev, dt) -> list[str]:
    cfg = MODELS[model]
    h, b, nb = cfg["hidden"], cfg["batch"], cfg["blocks"]
    streams = 2 if cfg["n_txt"] else 1
    ws = [torch.randn(6 * h, h, device=dev, dtype=dt) for _ in range(nb * streams)]
    x = torch.randn(b, h, device=dev, dtype=dt)
    wcat = torch.cat(ws)
    t_each = bench(lambda: [F.linear(x, w) for w in ws])
    t_cat = bench(lambda: F.linear(x, wcat))
    gb = wcat.numel() * wcat.element_size() / 1e9
    line = (
        f"adaLN modulation: {len(ws)} GEMVs [{b}, {h}] x [{h}, {6 * h}] ({gb:.2f} GB of weights): "
        f"one by one {t_each:.3f} ms ({gb / t_each:.2f} TB/s), concatenated {t_cat:.3f} ms ({gb / t_cat:.2f} TB/s)"
    )
    print(line, flush=True)
    return [line]


def time_attention(model, ratios, dev, dt) -> list[str]:
    cfg = MODELS[model]
    b, hds, d = cfg["batch"], cfg["heads"], cfg["head_dim"]
    n_kv = cfg["n_img"] + cfg["n_txt"]
    k = torch.randn(b, hds, n_kv, d, device=dev, dtype=dt)
    v = torch.randn_like(k)
    splits = (2, 3, 4)
    # "same tokens": the queries attending to themselves only, what the original model pays on a
    # RAS step's token count; the difference x blocks is what attending to every cached key adds
    out = ["| queries | padded to 128 | SDPA ms | padded SDPA ms | ms per query row vs dense | same tokens ms | "
           "all keys - same tokens, x blocks ms | " + " | ".join(f"{s}-way split keys ms" for s in splits) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(splits)]
    t_dense = None
    for r in [1.0, *ratios]:
        nq = round(r * cfg["n_img"] / 64) * 64 + cfg["n_txt"]
        pad = -(-nq // 128) * 128
        q = torch.randn(b, hds, nq, d, device=dev, dtype=dt)
        qp = torch.randn(b, hds, pad, d, device=dev, dtype=dt)
        t = bench(lambda: F.scaled_dot_product_attention(q, k, v))
        tp = bench(lambda: F.scaled_dot_product_attention(qp, k, v))
        t_dense = t_dense or t / nq
        ks, vs = k[:, :, :nq].contiguous(), v[:, :, :nq].contiguous()
        t_same = bench(lambda: F.scaled_dot_product_attention(q, ks, vs))
        cells = []
        ref = F.scaled_dot_product_attention(q, k, v).float()
        for parts in splits:
            try:
                err = (split_kv_attention(q, k, v, parts).float() - ref).abs().max().item()
                cells.append(f"{bench(lambda: split_kv_attention(q, k, v, parts)):.4f} (err {err:.1g})")
            except Exception as e:  # noqa: BLE001 - a backend without the log-sum-exp output
                cells.append(f"n/a ({type(e).__name__})")
        out.append(f"| {nq} | {pad} | {t:.4f} | {tp:.4f} | {t / nq / t_dense:.2f} | {t_same:.4f} | "
                   f"{(t - t_same) * cfg['blocks']:.2f} | " + " | ".join(cells) + " |")
        print(out[-1], flush=True)
    return out


def split_kv_attention(q, k, v, parts: int, attend=None):
    """Attention over ``parts`` slices of the keys, merged by their log-sum-exp (flash-decoding):
    more CTAs for few queries, i.e. fewer idle SMs in the last wave.

    q: [B, H, Lq, D], k / v: [B, H, Lk, D] -> [B, H, Lq, D]. ``attend(q, k, v)`` returns
    (output, log-sum-exp [B, H, Lq]); default: the CUDA flash kernel.
    """
    attend = attend or (lambda *qkv: torch.ops.aten._scaled_dot_product_flash_attention(*qkv)[:2])
    outs, lses = [], []
    for kc, vc in zip(k.chunk(parts, dim=2), v.chunk(parts, dim=2)):
        o, lse = attend(q, kc, vc)  # lse: [B, H, Lq]
        outs.append(o)
        lses.append(lse)
    lse = torch.stack(lses)  # [parts, B, H, Lq]
    w = torch.softmax(lse, dim=0).unsqueeze(-1)  # [parts, B, H, Lq, 1]: each part's share of the mass
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 parts are summed in fp32
    return (torch.stack(outs).to(acc) * w.to(acc)).sum(0).to(q.dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sd3,pixart")
    ap.add_argument("--ratios", default="0.5,0.25,0.125")
    ap.add_argument("--only", default=None, help="comma list of sections to run: adaLN, attention, grouped, GEMMs (default: all)")
    ap.add_argument("--autotune", action="store_true",
                    help="add the max_autotune_gemm column (Inductor autotunes each shape: ~45 s per shape on an H200)")
    ap.add_argument("--out", default=None, help="write the tables (markdown) here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gemm_shapes: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    ratios = [float(r) for r in args.ratios.split(",")]
    lines = [f"# GEMM and attention shapes of a RAS step on {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16", ""]
    for model in args.models.split(","):
        for title, fn in [
            ("adaLN", lambda: time_adaln(model, dev, dt)),
            ("attention", lambda: time_attention(model, ratios, dev, dt)),
            ("grouped image+text GEMMs", lambda: time_grouped(model, ratios, dev, dt)),
            ("GEMMs", lambda: time_linears(model, ratios, dev, dt, args.autotune)),
        ]:
            if args.only and title.split()[0] not in args.only.split(","):
                continue
            part = fn()  # rows are printed as they are timed
            if part:
                lines += [f"## {model}: {title}", "", *part, ""]
            if args.out:  # after every part: a run cut short keeps what it measured
                with open(args.out, "w") as f:
                    f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

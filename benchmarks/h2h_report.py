"""Statistics, verdicts and rendering of ``head_to_head.py``: t-intervals over seeds, the best
method of each family within a compute budget with a paired verdict, the markdown, the Pareto
plot, and splicing the markdown into a doc between marker lines. The markdown table, the
matplotlib import and the doc splice serve ``quality_report.py`` too.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Optional, Sequence

import torch

#: the families compared (diffusers: the best of its cache hooks)
GROUPS = ("dense", "RAS", "combined", "diffusers")
#: budgets of the winners table, as shares of the dense run of --steps (the target: 25 % to 60 %)
BUDGETS = (0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
#: per-seed values summarised with a mean and a t-interval
METRICS = ("psnr", "ssim", "class_acc", "fd", "compute", "seconds")
CONFIDENCE = 0.95


def begin_mark(model: str) -> str:
    return f"<!-- head_to_head.py {model}: begin -->"


def end_mark(model: str) -> str:
    return f"<!-- head_to_head.py {model}: end -->"


# ----------------------------------------------------------------------------------------------
# Statistics


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (> 0.5) of Student's t with ``df`` degrees of freedom: bisection on the CDF,
    integrated numerically after the substitution t = tan(theta) (the integrand stays bounded)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    scale = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def mass(theta: float) -> float:  # P(0 < T < tan theta)
        th = torch.linspace(0.0, theta, 4001, dtype=torch.float64)
        dens = scale * (1 + torch.tan(th) ** 2 / df) ** (-(df + 1) / 2) / torch.cos(th) ** 2
        return float(torch.trapezoid(dens, th))

    lo, hi = 0.0, math.pi / 2 - 1e-9
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < p - 0.5 else (lo, mid)
    return math.tan((lo + hi) / 2)


def interval(values: Sequence[float]) -> Optional[dict]:
    """Mean and two-sided 95 % t-interval of ``values`` (one per seed); ``low``/``high`` are None
    with a single value; None without values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return dict(mean=mean, low=None, high=None, n=n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
    return dict(mean=mean, low=mean - half, high=mean + half, n=n)


def summarize(per_seed: list[dict]) -> dict:
    """{metric: interval} over the per-seed records."""
    return {k: interval([s.get(k) for s in per_seed]) for k in METRICS}


def paired(a: dict, b: dict, key: str) -> Optional[dict]:
    """t-interval of the per-seed difference a - b of ``key`` over the seeds both ran (same noise,
    same reference per seed, so the difference is paired)."""
    sb = {s["seed"]: s.get(key) for s in b["per_seed"]}
    diffs = [s[key] - sb[s["seed"]] for s in a["per_seed"]
             if s.get(key) is not None and sb.get(s["seed"]) is not None]
    return interval(diffs)


def beats(a: dict, b: dict) -> bool:
    """``a`` better than ``b`` in PSNR and SSIM, each paired difference's interval above 0."""
    for key in ("psnr", "ssim"):
        d = paired(a, b, key)
        if d is None or d["low"] is None or d["low"] <= 0:
            return False
    return True


def winners(methods: list[dict], steps: int) -> list[dict]:
    """Per budget: each family's best method (mean PSNR) within it, the verdict among the families
    and whether the combined sampler beats both RAS alone and the best diffusers cache."""
    out = []
    for share in BUDGETS:
        row: dict[str, Any] = {"budget_share": share, "budget": share * steps}
        best: dict[str, dict] = {}
        for fam in GROUPS:
            fitting = [m for m in methods if m["family"] == fam and m["compute"] and m["psnr"]
                       and m["compute"]["mean"] <= share * steps + 1e-9]
            if fitting:
                best[fam] = max(fitting, key=lambda m: m["psnr"]["mean"])
            row[fam] = None if fam not in best else dict(
                name=best[fam]["name"], compute=best[fam]["compute"]["mean"], psnr=best[fam]["psnr"],
                ssim=best[fam]["ssim"])
        row["verdict"], row["leader"] = verdict(best)
        if all(f in best for f in ("combined", "RAS", "diffusers")):
            row["combined_beats_ras_and_caches"] = beats(best["combined"], best["RAS"]) and beats(
                best["combined"], best["diffusers"])
        else:
            row["combined_beats_ras_and_caches"] = None
        out.append(row)
    return out


def verdict(best: dict[str, dict]) -> tuple[str, Optional[str]]:
    """"X wins (outside CI)" when the family with the best mean PSNR beats every other (paired,
    PSNR and SSIM); else "tie within CI" with the families it does not beat."""
    if not best:
        return "no method fits", None
    leader = max(best, key=lambda f: best[f]["psnr"]["mean"])
    if len(best) == 1:
        return f"{leader} only", leader
    unbeaten = [f for f in best if f != leader and not beats(best[leader], best[f])]
    if not unbeaten:
        return f"{leader} wins (outside CI)", leader
    return "tie within CI (" + ", ".join([leader] + unbeaten) + ")", leader


def target(rows: list[dict]) -> dict:
    """The issue's target: the combined sampler beats RAS alone and the best diffusers cache
    (outside the CI, PSNR and SSIM) in at least half of the budgets from 25 % to 60 %."""
    judged = [r for r in rows if 0.25 - 1e-9 <= r["budget_share"] <= 0.6 + 1e-9]
    wins = sum(1 for r in judged if r["combined_beats_ras_and_caches"])
    return dict(budgets=len(judged), combined_wins=wins, met=wins * 2 >= len(judged) and wins > 0)


# ----------------------------------------------------------------------------------------------
# Markdown


def fmt_ci(iv: Optional[dict], fmt: str = "{:.2f}") -> str:
    if iv is None:
        return "–"
    if iv["low"] is None:
        return fmt.format(iv["mean"])
    return f"{fmt.format(iv['mean'])} ± {fmt.format((iv['high'] - iv['low']) / 2)}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def render_markdown(res: dict, plot: Optional[str] = None) -> str:
    su = res["setup"]
    seeds = su["seeds"]
    L = [f"`{su['model']}` ({su['pipeline']}), measured by `benchmarks/head_to_head.py` on {su['device_name']} "
         f"({su['dtype']}, torch {su['torch']}, diffusers {su['diffusers']}): {seeds} seed{'s' if seeds != 1 else ''} × "
         f"{su['images']} images (classes cycled, guidance {su['guidance']}), {su['steps']} steps against a dense "
         f"{su['ref_steps']}-step reference from the same noise; whole run {res.get('total_s', 0):.0f} s "
         f"(budget {su['budget_s']:g} s)." + (" **CPU `--quick` run: the numbers only show the format.**"
                                             if su["quick"] else ""), "",
         f"Each seed is its own noise set and its own dense reference. Values: mean over seeds ± the half-width "
         f"of the {CONFIDENCE:.0%} t-interval over the per-seed means (n = {seeds}; none with one seed). Compute: "
         f"dense-step equivalents (share = of the dense {su['steps']}-step run). FD: Fréchet distance of the "
         f"evaluation classifier's features against the same seed's reference images (lower is better; noisy "
         f"with few images, so methods are ranked by PSNR / SSIM).", ""]
    rows = []
    for m in sorted(res["methods"], key=lambda m: m["compute"]["mean"] if m["compute"] else 0):
        rows.append([m["family"], m["name"], fmt_ci(m["compute"]), f"{m['compute_share']:.2f}", fmt_ci(m["psnr"]),
                     fmt_ci(m["ssim"], "{:.3f}"), fmt_ci(m["class_acc"], "{:.3f}"), fmt_ci(m["fd"], "{:.3f}"),
                     fmt_ci(m["seconds"], "{:.3f}")])
    L += md_table(["family", "method", "compute (dense steps)", "share", "PSNR dB", "SSIM", "class acc.", "FD ↓",
                 "seconds / seed"], rows) + [""]
    ref = res.get("reference") or {}
    if ref:
        L += [f"Reference: class accuracy {fmt_ci(ref.get('class_acc'), '{:.3f}')}, {fmt_ci(ref.get('seconds'), '{:.3f}')} s "
              f"per seed ({su['ref_steps']} steps).", ""]
    rows = []
    for w in res.get("winners", []):
        cells = []
        for fam in GROUPS:
            b = w[fam]
            cells.append("–" if b is None else f"{fmt_ci(b['psnr'])} / {fmt_ci(b['ssim'], '{:.3f}')} ({b['name']}, "
                                               f"{b['compute']:.1f})")
        t = w["combined_beats_ras_and_caches"]
        rows.append([f"{w['budget_share']:.0%} ({w['budget']:.1f})", *cells, w["verdict"],
                     "–" if t is None else ("yes" if t else "no")])
    L += ["Best method of each family within a compute budget (PSNR dB / SSIM, its compute). Verdict: the "
          "family with the best mean PSNR wins when the paired per-seed differences to every other family, "
          "in PSNR and in SSIM, have t-intervals above 0; otherwise the families it does not beat tie with "
          "it. Target: the combined sampler beats both RAS and the best diffusers cache that way.", ""]
    L += md_table(["budget (share of dense)", *GROUPS, "verdict", "combined beats RAS and caches"], rows) + [""]
    tg = res.get("target")
    if tg:
        L += [f"**Target** (combined beats RAS alone and the best diffusers cache outside the CI in at least half "
              f"of the budgets from 25 % to 60 %): {tg['combined_wins']} of {tg['budgets']} budgets, "
              f"**{'met' if tg['met'] else 'not met'}**.", ""]
    for n in res.get("not_applicable", []):
        L += [f"*{n['name']} does not apply to this model:* `{n['reason']}`", ""]
    if res.get("skipped"):
        L += ["Not run (budget): " + ", ".join(res["skipped"]) + ".", ""]
    for n in res.get("notes", []):
        L += [f"Note: {n}.", ""]
    for hook, messages in (res.get("hook_warnings") or {}).items():
        L += [f"diffusers warned ({hook}): " + " / ".join(f"“{w.strip()}”" for w in messages), ""]
    if plot:
        L += [f"![PSNR against compute]({plot})", "", f"[{os.path.basename(plot)}]({plot}): PSNR and SSIM against "
              f"compute share, {CONFIDENCE:.0%} intervals as error bars, the Pareto frontier over all methods dashed.", ""]
    return "\n".join(L).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------
# Pareto plot


def agg_pyplot():
    """``matplotlib.pyplot`` on the Agg backend; None (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # not installed here
        print(f"no plot: matplotlib is not available ({type(e).__name__}: {e})", flush=True)
        return None
    return plt


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (compute, quality) points no cheaper-or-equal point beats, by compute."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def plot_pareto(res: dict, path: str) -> Optional[str]:
    """PSNR and SSIM against compute share, one marker per family (a colour per diffusers hook),
    interval error bars, the frontier; None (with a message) without matplotlib."""
    plt = agg_pyplot()
    if plt is None:
        return None
    style = {"dense": ("o", "black"), "RAS": ("s", "tab:blue"), "combined": ("*", "tab:red")}
    hook_colours = ["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    hooks = sorted({m["hook"] for m in res["methods"] if m.get("hook")})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, label in ((axes[0], "psnr", "PSNR to the dense reference (dB)"),
                           (axes[1], "ssim", "SSIM to the dense reference")):
        done = set()
        for m in res["methods"]:
            if not m[key] or not m["compute"]:
                continue
            if m["family"] == "diffusers":
                marker, colour, legend = "^", hook_colours[hooks.index(m["hook"]) % len(hook_colours)], m["hook"]
            else:
                (marker, colour), legend = style[m["family"]], m["family"]
            iv = m[key]
            err = None if iv["low"] is None else [[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]]
            ax.errorbar([m["compute_share"]], [iv["mean"]], yerr=err, fmt=marker, color=colour, ms=7 if marker == "*" else 5,
                        capsize=2, label=None if legend in done else legend)
            done.add(legend)
        pts = frontier([(m["compute_share"], m[key]["mean"]) for m in res["methods"] if m[key] and m["compute"]])
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="gray", lw=1, label="Pareto frontier")
        ax.axvspan(0.25, 0.6, color="gray", alpha=0.07)
        ax.set_xlabel(f"compute (share of a dense {res['setup']['steps']}-step run)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    su = res["setup"]
    return save_figure(fig, path, f"Head to head on {su['model']}: {su['seeds']} seeds × {su['images']} images, "
                                  f"{su['device_name']}" + (" (quick CPU run)" if su["quick"] else ""))


def save_figure(fig, path: str, title: str) -> str:
    """``fig`` with ``title`` laid out, written to ``path`` (110 dpi) and closed -> ``path``."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Doc


def doc_text(doc: str, begin: str, end: str) -> str:
    """The text of ``doc``; SystemExit, naming the marker lines to add, where it lacks them."""
    text = open(doc).read()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: no marker lines {begin!r} / {end!r}; add them where the results go")
    return text


def copy_beside_doc(src_dir: str, names: dict[str, Optional[str]], doc: str,
                    required: Sequence[str] = ()) -> tuple[str, dict[str, str]]:
    """Copy the files ``names`` ({key: file name in ``src_dir``}) to <doc dir>/quality/ -> (that
    folder, {key: the link from the doc}); a missing file is left out unless its key is ``required``."""
    pic_dir = os.path.join(os.path.dirname(os.path.abspath(doc)), "quality")
    os.makedirs(pic_dir, exist_ok=True)
    links = {}
    for key, name in names.items():
        if not name:
            continue
        src, dst = os.path.join(src_dir, name), os.path.join(pic_dir, name)
        if key not in required and not os.path.isfile(src):
            continue
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copyfile(src, dst)
        links[key] = f"quality/{name}"
    return pic_dir, links


def splice_between(doc: str, text: str, begin: str, end: str, block: str) -> None:
    """Write ``text`` to ``doc`` with ``block`` in place of what stood between the marker lines."""
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(doc, "w") as f:
        f.write(head + begin + "\n" + block + end + tail)


def splice_doc(res: dict, src_dir: str, files: dict, doc: str) -> None:
    """Put the rendered results between this model's marker lines of ``doc``; the plot and the
    JSON are copied to <doc dir>/quality/ and linked."""
    model = res["setup"]["model"]
    begin, end = begin_mark(model), end_mark(model)
    text = doc_text(doc, begin, end)
    pic_dir, links = copy_beside_doc(src_dir, {key: files.get(key) for key in ("plot", "json")}, doc)
    block = render_markdown(res, links.get("plot"))
    if "json" in links:
        block += f"\nAll numbers: [{links['json']}]({links['json']}).\n"
    splice_between(doc, text, begin, end, block)
    print(f"spliced the {model} results into {doc} (plot and JSON in {pic_dir})")

#!/usr/bin/env python3
"""Generate the measured tuning table of docs/tuning.md and the quickstart's starting points
from the committed quality benchmark results (``docs/quality/quality.json``).

    python docs/gen_tuning.py            # rewrites the blocks between the marker lines
    python docs/gen_tuning.py --check    # exit 1 if a committed page differs from what it would write

Both pages get their numbers from one table (one row per ratio at the model's usual step count,
plain sampling included), and the settings they recommend are chosen from it by fixed rules
(:data:`USES`), so the two pages cannot disagree. After a new benchmark run
(``benchmarks/quality.py --from-json OUT/quality.json --doc docs/quality.md`` copies its JSON to
``docs/quality/``), run this script and commit. ``tests/test_tuning_table.py`` checks that the
committed pages are up to date.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUALITY_JSON = HERE / "quality" / "quality.json"
PAGES = {"tuning": HERE / "tuning.md", "quickstart": HERE / "quickstart.md"}
BEGIN = "<!-- gen_tuning.py: {name} begin (generated: run `python docs/gen_tuning.py`) -->"
END = "<!-- gen_tuning.py: {name} end -->"
STEPS = 28  #: the shipped model's (and SD3's) usual step count
PAPER_RATIO = 0.25  #: the paper's setting for SD3 at 28 steps


def measured_rows(data: dict, steps: int = STEPS) -> list[dict]:
    """Plain sampling and RAS at every measured ratio, ``steps`` steps, from a ``rasfx-quality/1`` JSON.

    Per row: ``ratio`` (1.0 = plain), ``compute`` (dense-step equivalents), ``speedup`` (plain's
    measured ms per image / this row's), ``psnr`` / ``ssim`` / ``class_acc`` against the dense
    reference, ``loss_db`` (plain's PSNR minus this row's) and ``equal_compute_db`` (PSNR minus
    that of plain sampling with fewer steps at the same compute; ``None`` where not measured).
    """
    fid = [r for r in data["fidelity"] if r["steps"] == steps]
    plain = next(r for r in fid if r["kind"] == "dense")
    eq = {(e["steps"], e["ratio"]): e["at_compute"] for e in data.get("equal_compute", [])}
    rows = []
    for r in [plain] + sorted((r for r in fid if r["kind"] == "ras"), key=lambda r: -r["ratio"]):
        ratio = 1.0 if r["kind"] == "dense" else r["ratio"]
        at = eq.get((steps, r["ratio"]))
        rows.append(dict(ratio=ratio, compute=r["compute"], speedup=plain["ms_per_image"] / r["ms_per_image"],
                         ms_per_image=r["ms_per_image"], psnr=r["psnr"], ssim=r["ssim"], class_acc=r["class_acc"],
                         loss_db=plain["psnr"] - r["psnr"],
                         equal_compute_db=None if at is None or at["delta_psnr"] is None else at["delta_psnr"],
                         beats=bool(at and at["beats_dense_above"])))
    return rows


def _closest(rows):
    return max(rows[1:], key=lambda r: r["psnr"])


def _paper(rows):
    return next((r for r in rows if r["ratio"] == PAPER_RATIO), None)


def _beats(rows):
    wins = [r for r in rows[1:] if r["beats"]]
    return max(wins, key=lambda r: r["speedup"]) if wins else None


#: (use, rule choosing a row, why): the recommendations both pages print
USES = [
    ("closest to plain sampling", _closest, "the highest PSNR of the RAS ratios measured"),
    ("the paper's setting", _paper, "the paper's SD3 setting: 28 steps at ratio 0.25"),
    ("fastest that beat plain sampling with fewer steps at equal compute", _beats,
     "RAS better in PSNR and SSIM than the cheapest plain run of at least its compute"),
]


def recommendations(rows: list[dict]) -> list[tuple[str, dict | None, str]]:
    return [(use, rule(rows), why) for use, rule, why in USES]


def _setting(r: dict) -> str:
    return f"`RASConfig(ratio={r['ratio']:g})`"


def _measured(r: dict) -> str:
    return f"{r['speedup']:.2f}x faster, PSNR {r['psnr']:.2f} dB ({-r['loss_db']:+.2f} dB)"


def _source(data: dict) -> str:
    su = data["setup"]
    return (f"`benchmarks/quality.py` on {su['device_name']} ({su['dtype']}, {su['mode']} mode, batch {su['batch']}), "
            f"{su['fid_images']} images against a dense {su['ref_steps']}-step reference from the same noise; "
            f"`docs/quality/quality.json`")


def tuning_block(data: dict) -> str:
    rows = measured_rows(data)
    plain = rows[0]
    table = ["| ratio | compute (of 28 dense steps) | measured speed-up | PSNR dB | SSIM | class acc. | "
             "PSNR vs plain 28 steps | vs plain with fewer steps, equal compute |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        eq = "–" if r["equal_compute_db"] is None else f"{r['equal_compute_db']:+.2f} dB" + (" (beats)" if r["beats"] else "")
        name = "1 (plain)" if r is plain else f"{r['ratio']:g}"
        table.append(f"| {name} | {r['compute']:.2f} | {r['speedup']:.2f}x "
                     f"({r['ms_per_image']:.2f} ms/image) | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['class_acc']:.3f} | "
                     + ("– |" if r is plain else f"{-r['loss_db']:+.2f} dB |") + f" {eq} |")
    lines = [f"Measured at {STEPS} steps by {_source(data)}. PSNR, SSIM and class accuracy are against the "
             "reference; \"vs plain with fewer steps\" is RAS minus plain sampling interpolated to the same compute "
             "(positive: RAS is better).", "", *table, "", "| use | setting | measured | chosen as |",
             "| --- | --- | --- | --- |"]
    for use, r, why in recommendations(rows):
        lines.append(f"| {use} | " + ("none measured | – " if r is None else f"{_setting(r)} | {_measured(r)} ")
                     + f"| {why} |")
    lines.append("| exactly the plain pipeline | `RASConfig(ratio=1.0)` | every step dense, bit for bit | – |")
    near = [r for r in rows[1:] if r["loss_db"] < 1.0]
    lines += ["", ("Near-lossless (within 1 dB of plain sampling): " + ", ".join(_setting(r) for r in near)) if near
              else f"No ratio was near-lossless on this model: the closest, {_setting(_closest(rows))}, is "
                   f"{_closest(rows)['loss_db']:.1f} dB below plain sampling at {STEPS} steps."]
    return "\n".join(lines)


def quickstart_block(data: dict) -> str:
    rows = measured_rows(data)
    lines = [f"| use | setting | on the shipped model ({STEPS} steps, {data['setup']['device_name']}) |",
             "| --- | --- | --- |"]
    for use, r, _ in recommendations(rows):
        lines.append(f"| {use} | " + ("none measured | – |" if r is None else f"{_setting(r)} | {_measured(r)} |"))
    lines.append("| exactly the plain pipeline | `RASConfig(ratio=1.0)` | every step dense, the transformer runs unmodified |")
    lines += ["", "Measured numbers, chosen by the rules of the [tuning table](tuning.md#measured-settings) "
                  "(PSNR against a dense 50-step reference; plain sampling at 28 steps: "
                  f"{rows[0]['psnr']:.2f} dB). On your model the numbers differ: "
                  "[measure them](tuning.md#measuring-on-your-model)."]
    return "\n".join(lines)


BLOCKS = {"tuning": tuning_block, "quickstart": quickstart_block}


def splice(text: str, name: str, block: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"gen_tuning.py: the page needs one line {begin!r} and, below it, one line {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block}\n{end}{tail}"


def render(quality_json: Path = QUALITY_JSON) -> dict[str, str]:
    """``{page name: the page's text with its generated block}`` for the committed pages."""
    data = json.loads(Path(quality_json).read_text())
    return {name: splice(PAGES[name].read_text(), name, BLOCKS[name](data)) for name in PAGES}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a committed page differs from what it would write")
    p.add_argument("--quality-json", default=str(QUALITY_JSON))
    args = p.parse_args(argv)
    stale = []
    for name, text in render(Path(args.quality_json)).items():
        if PAGES[name].read_text() != text:
            stale.append(str(PAGES[name].relative_to(HERE.parent)))
            if not args.check:
                PAGES[name].write_text(text)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `python docs/gen_tuning.py`", file=sys.stderr)
        return 1
    print(("would rewrite: " if args.check else "rewrote: ") + (", ".join(stale) or "nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/bench_pipeline.py runs end to end on the CPU (tiny configs): the GPU run that times
whole pipeline calls must not be the first to find a crash."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_pipeline_tiny_dry_run(tmp_path):
    out, md = tmp_path / "x.json", tmp_path / "x.md"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pipeline.py"), "--scale", "tiny", "--models",
         "sd3:dense-eager+default:1+0.5,sd3:eager:1+0.5@skip_every=2@skip_estimate=extrapolate", "--images", "3",
         "--steps", "6",
         "--out", str(out), "--md", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    skip = "eager r=0.5 skip_every=2 skip_estimate=extrapolate"
    want = ["dense-eager", "default r=1", "default r=0.5", "eager r=1", skip]
    rows = {row["setup"]: row for row in doc["rows"]}
    assert list(rows) == want and doc["skipped"] == []
    for setup, row in rows.items():
        assert row["model"] == "sd3" and "error" not in row, (setup, row.get("error"))
        assert len(row["images"]) == 3 and all(img["time_s"] > 0 for img in row["images"]), setup
        assert row["first_s"] > 0 and row["median_rest_s"] > 0
    # rasfx images carry that run's stats: a ratio-1 run is all dense, a 0.5 run has RAS steps
    assert all(img["ras_steps"] == 0 and img["steps"] == 6 for img in rows["eager r=1"]["images"])
    assert all(img["ras_steps"] > 0 and img["skipped_steps"] == 0 for img in rows["default r=0.5"]["images"])
    # R@FIELD=V adds RASConfig fields: step sparsity on top of the token ratio
    assert rows[skip]["ratio"] == 0.5 and rows[skip]["ras_fields"] == {"skip_every": 2, "skip_estimate": "extrapolate"}
    assert all(img["skipped_steps"] > 0 for img in rows[skip]["images"])
    assert all(img["flops_fraction"] < r["flops_fraction"]
               for img, r in zip(rows[skip]["images"], rows["default r=0.5"]["images"]))
    # the first image of a session exports the model, later ones reuse it
    assert [img["exports"] for img in rows["default r=0.5"]["images"]] == [1, 0, 0]
    assert all(img["mode"] == "eager" for img in rows["default r=0.5"]["images"])  # default on CPU
    assert "ras_steps" not in rows["dense-eager"]["images"][0]
    assert doc["card"] == "cpu" and "bench_pipeline.py" in doc["command"]
    table = md.read_text()
    for setup in want:
        assert f"| {setup} |" in table, setup
    assert "| SD3-medium" in table and "vs dense-eager" in table and "Card: cpu" in table
    assert "1.00x" in table  # dense-eager against itself

"""The benchmark scripts run (tiny configs on the CPU) and fail clearly where they need a GPU.

Their numbers come from a GPU machine (docs/performance.md); these tests keep the scripts from
rotting between GPU sessions: a script that crashes on the GPU machine wastes its time budget.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_models_tiny_dry_run_and_report(tmp_path):
    """bench_models.py --scale tiny on the CPU writes results that report.py turns into tables."""
    out = tmp_path / "perf.json"
    r = run("bench_models.py", "--scale", "tiny", "--models", "sd3", "--modes", "eager,eager@no-hoist", "--iters", "1",
            "--ratios", "1,0.5", "--schedule-ratios", "0.5", "--no-fusion", "--same-tokens", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [row["model"] for row in rows] == ["sd3"] and "eager" in rows[0]["modes"]
    steps = rows[0]["modes"]["eager"]["steps"]
    assert steps["0.5"]["original_same_tokens_ms"] > 0 and "original_same_tokens_ms" not in steps["1.0"]
    # the @no-hoist A/B captures again without the step-invariant prologue
    modes = rows[0]["modes"]
    assert modes["eager"]["hoisted"]["hoisted_values"] > 0 and modes["eager@no-hoist"]["hoisted"] == {}
    assert modes["eager"]["hoisted_bytes"] > 0 and modes["eager@no-hoist"]["hoisted_bytes"] == 0
    md = tmp_path / "perf.md"
    r = run("report.py", out, "--md", md)
    assert r.returncode == 0, r.stderr[-2000:]
    table = md.read_text()
    assert "SD3-medium" in table and "| eager |" in table and "28 steps" in table
    assert "original, same tokens" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
@pytest.mark.parametrize("script", ["bench_kernels.py", "bench_gemm_shapes.py", "bench_streams.py", "profile_step.py"])
def test_gpu_only_scripts_say_so_without_cuda(script):
    r = run(script, timeout=120)
    assert "needs a CUDA GPU" in (r.stdout + r.stderr), r.stderr[-2000:]


@pytest.mark.parametrize("name", ["sd3", "pixart", "flux"])
def test_same_tokens_inputs_have_the_active_count(name):
    """The same-token baseline's inputs give the model exactly n image tokens."""
    sys.path.insert(0, str(BENCH))
    import bench_models

    model, kw, n_img, _ = bench_models.MODELS[name]("tiny", torch.device("cpu"), torch.float32)
    n = n_img // 2
    kw_n = bench_models.same_tokens_inputs(name, kw, n)
    with torch.no_grad():
        full, half = model(**kw)[0], model(**kw_n)[0]
    assert half.numel() * n_img == full.numel() * n  # outputs are per image token
    assert bench_models.same_tokens_inputs(name, kw, n + 1) is None or name == "flux"


def test_split_kv_attention_merge_is_exact():
    """bench_gemm_shapes.split_kv_attention's log-sum-exp merge equals attention over all keys."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gemm_shapes", BENCH / "bench_gemm_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def attend(q, k, v):  # math attention with its log-sum-exp
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (10, 17, 17))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for parts in (1, 2, 3, 4):
        got = mod.split_kv_attention(q, k, v, parts, attend=attend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)



def test_report_reads_a_run_cut_short():
    """bench_models.py saves after every measurement; report.py turns a row that stops after the
    original's timing (no dense step, no schedules) into tables with '-' cells."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("report", BENCH / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    row = {"original_ms": 40.0, "capture_timings": {"export": 1.0}, "cache_bytes": 2**30, "steps": {}}
    run = {"card": "GPU", "torch": "x", "results": [
        {"model": "sd3", "label": "SD3", "modes": {"compile": row}},
    ]}
    md = report.markdown([run])
    assert "| SD3 | compile | 40.0 | - | - | - | - | - | - |" in md
    row["ras_dense_ms"] = 41.0
    row["steps"]["0.5"] = {"ms": 22.0, "vs_original": 0.55, "f": 0.54}
    assert "| SD3 | compile | 40.0 | 41.0 (1.025) | - | - | 22.0 (0.55; f 0.54) | - | - |" in report.markdown([run])


def _load_bench(name):
    import importlib.util

    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_head_to_head_t_interval_matches_the_t_table():
    """h2h_report's Student-t quantiles against the printed two-sided 95 % table, and its interval
    against the textbook formula on known numbers."""
    hr = _load_bench("h2h_report")
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042, 1000: 1.962}
    for df, want in table.items():
        assert abs(hr.t_quantile(0.975, df) - want) < 1.5e-3, df
    iv = hr.interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: half-width 4.303 / sqrt(3)
    assert iv["n"] == 3 and iv["mean"] == 2.0
    assert abs(iv["high"] - iv["mean"] - 4.3027 / 3**0.5) < 1e-3 and abs(iv["mean"] - iv["low"] - 4.3027 / 3**0.5) < 1e-3
    assert hr.interval([5.0]) == dict(mean=5.0, low=None, high=None, n=1) and hr.interval([]) is None


def test_head_to_head_verdicts_and_frontier():
    """A family that is better on every seed wins outside the CI; one whose per-seed differences
    change sign ties; budgets only see the methods that fit; the frontier drops dominated points."""
    hr = _load_bench("h2h_report")

    def method(family, compute, psnrs, ssims):
        per_seed = [dict(seed=i, psnr=p, ssim=s, compute=compute) for i, (p, s) in enumerate(zip(psnrs, ssims))]
        return dict(family=family, name=f"{family} {compute}", per_seed=per_seed, **hr.summarize(per_seed))

    ras = method("RAS", 9.0, [20.0, 21.0, 22.0], [0.70, 0.71, 0.72])
    caches = method("diffusers", 9.0, [19.0, 20.5, 21.0], [0.69, 0.70, 0.70])
    combined = method("combined", 9.0, [21.0, 22.1, 23.0], [0.72, 0.73, 0.74])
    assert hr.beats(combined, ras) and hr.beats(combined, caches) and not hr.beats(ras, combined)
    assert hr.verdict({"RAS": ras, "diffusers": caches, "combined": combined})[0] == "combined wins (outside CI)"
    noisy = method("combined", 9.0, [23.0, 20.5, 23.0], [0.72, 0.70, 0.74])  # seed 1 below RAS
    assert hr.verdict({"RAS": ras, "combined": noisy})[0] == "tie within CI (combined, RAS)"
    dense = method("dense", 30.0, [30.0, 31.0, 32.0], [0.9, 0.91, 0.92])  # too expensive for every budget
    rows = hr.winners([ras, caches, combined, dense], steps=28)
    assert [r["budget_share"] for r in rows] == list(hr.BUDGETS)
    assert all(r["dense"] is None for r in rows)
    # 9 of 28 steps is 32 %: the 25 % and 30 % budgets hold no method
    assert [r["combined_beats_ras_and_caches"] for r in rows] == [None] * 2 + [True] * 6
    assert rows[0]["verdict"] == "no method fits" and rows[2]["verdict"] == "combined wins (outside CI)"
    assert hr.target(rows) == dict(budgets=8, combined_wins=6, met=True)
    assert hr.frontier([(0.5, 20.0), (0.3, 18.0), (0.4, 17.0), (0.6, 19.0), (0.7, 21.0)]) == [
        (0.3, 18.0), (0.5, 20.0), (0.7, 21.0)]


def test_subject_mask_on_a_coarser_grid():
    """``shapes_eval.mask_on_grid``: a cell is subject when at least half of its pixels are (hand
    counted here); a grid that does not divide the image is refused (None)."""
    sys.path.insert(0, str(BENCH.parent / "examples"))
    from shapes_eval import mask_on_grid

    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :4] = True  # the top-left cell of a 2x2 grid, whole
    mask[0, 4:6, 4:8] = True  # half of the bottom-right cell
    mask[0, 0, 4] = True  # one pixel of 16 in the top-right cell
    assert mask_on_grid(mask, (2, 2)).tolist() == [[[True, False], [False, True]]]
    assert torch.equal(mask_on_grid(mask, (8, 8)), mask)
    assert mask_on_grid(mask, (3, 3)) is None


def test_noise_std_premise_region_stats():
    """``noise_std_premise.region_stats`` on a hand-made 2x3 score map: subject tokens score 1 and
    3, background 2, 4, 5, 5 -> AUC = P(subject < background) = (4 + 3) / 8 with no ties; the
    lowest 2 tokens (34 % of 6, rounded) hold one subject token."""
    sys.path.insert(0, str(BENCH))
    from noise_std_premise import region_stats

    scores = torch.tensor([[1.0, 2.0, 5.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, False, False], [True, False, False]])
    st = region_stats(scores, mask, low_share=0.34)
    assert st["auc"] == 7 / 8 and st["subject"] == 2.0 and st["background"] == 4.0
    assert st["low_subject_share"] == 0.5 and abs(st["subject_share"] - 2 / 6) < 1e-12
    tied = region_stats(torch.ones(2, 3), mask)  # no relation at all: AUC one half
    assert tied["auc"] == 0.5
    assert region_stats(scores, torch.zeros(2, 3, dtype=torch.bool))["auc"] is None


def test_head_to_head_families_take_turns():
    sys.path.insert(0, str(BENCH))
    from head_to_head import interleave

    assert interleave([1, 2, 3], ["a"], [], ["x", "y"]) == [1, "a", "x", 2, "y", 3]
    assert interleave() == [] and interleave([], []) == []

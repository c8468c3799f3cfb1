"""``rasfx.stats``: the FLOPs share of a RAS step is the transformed graph's own estimate (the
numbers ``rasfx inspect`` prints), the execution mode is what ran (fallbacks named, with a
``RASWarning``); the heatmaps are matplotlib's, on a shared scale, with colour bars."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from collections import Counter

import pytest
import torch

pytest.importorskip("transformers")  # diffusers pipelines import transformers classes
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, StableDiffusion3Pipeline  # noqa: E402

import rasfx  # noqa: E402
from rasfx import cli  # noqa: E402
from rasfx.heatmaps import heatmap_figure, heatmap_image, save_heatmap  # noqa: E402
from rasfx.presets import PRESETS  # noqa: E402
from rasfx.run_stats import RunStats, ran_modes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = rasfx.RASConfig(ratio=0.25, warmup=1, reset_steps=())


# ------------------------------------------------------------------------------------ pipelines


def _prompt(batch_text: int = 7) -> dict:
    g = torch.Generator().manual_seed(1)
    return dict(prompt_embeds=torch.randn(1, batch_text, 16, generator=g),
                negative_prompt_embeds=torch.randn(1, batch_text, 16, generator=g))


def sana_pipe():
    """The ``sana-tiny`` preset model in a SanaPipeline, fed the preset's shapes: latents 8 x 12,
    7 text tokens, CFG batch 2 (no VAE: latents out, 32 pixels per latent pixel)."""
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=PRESETS["sana-tiny"].build(0),
                        scheduler=FlowMatchEulerDiscreteScheduler())
    mask = torch.ones(1, 7, dtype=torch.int64)
    kw = dict(_prompt(), prompt_attention_mask=mask, negative_prompt_attention_mask=mask, negative_prompt=None,
              height=8 * 32, width=12 * 32, use_resolution_binning=False)
    return pipe, kw


def sd3_pipe():
    """The ``sd3-tiny`` preset model in a StableDiffusion3Pipeline with the preset's shapes."""
    pipe = StableDiffusion3Pipeline(transformer=PRESETS["sd3-tiny"].build(0),
                                    scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)
    g = torch.Generator().manual_seed(2)
    kw = dict(_prompt(), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
              negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g), height=8 * 8, width=12 * 8)
    return pipe, kw


def run(pipe, kw, steps=4, **enable):
    pipe.set_progress_bar_config(disable=True)
    with rasfx.enabled(pipe, CFG, **enable):
        pipe(**kw, num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
    return rasfx.stats(pipe)


def inspect_share(preset: str, n: int, num_tokens: int) -> float:
    """``rasfx inspect PRESET --batch 2 --ratio n/N``: at_ratio / dense of its JSON summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(["inspect", preset, "--batch", "2", "--ratio", repr(n / num_tokens), "--format", "json",
                       "--no-timings"])
    assert rc == 0
    flops = json.loads(out.getvalue())["summary"]["flops"]
    assert flops["n"] == n
    return flops["at_ratio"] / flops["dense"]


@pytest.mark.parametrize("preset, make", [("sana-tiny", sana_pipe), ("sd3-tiny", sd3_pipe)])
def test_stats_flops_share_is_the_estimate_rasfx_inspect_prints(preset, make):
    """Sana runs its conv, and attention over cached keys, at full length: its RAS steps were
    reported at the token share (0.25) while inspect estimates 69%."""
    st = run(*make())
    assert st.flops_source == "graph" and st.num_tokens == {"sana-tiny": 96, "sd3-tiny": 24}[preset]
    ras = [s for s in st.steps if not s.dense]
    assert ras and all(s.flops_fraction == 1.0 for s in st.steps if s.dense)
    for s in ras:
        token_share = s.active_tokens / s.num_tokens
        assert token_share < s.flops_fraction < 1.0
        assert s.flops_fraction == pytest.approx(inspect_share(preset, s.active_tokens, s.num_tokens), rel=1e-12)
    assert st.flops_fraction == pytest.approx(sum(s.flops_fraction for s in st.steps) / len(st.steps))
    assert "(graph)" in st.summary()
    if preset == "sana-tiny":  # the numbers of issue 23
        assert ras[0].active_tokens == 24 and round(ras[0].flops_fraction, 3) == 0.687


def test_a_custom_transform_counts_the_token_share():
    from test_pipeline import StandInRAS

    st = run(*sd3_pipe(), transform=StandInRAS)
    assert st.flops_source == "token share" and st.mode == "custom transform"
    assert all(s.flops_fraction == (1.0 if s.dense else s.active_tokens / s.num_tokens) for s in st.steps)


# ------------------------------------------------------------------------------------ modes


def test_stats_mode_is_what_ran_and_a_fallback_warns():
    """CUDA graphs asked for on CPU tensors: the graphs run eagerly, rasfx says so once
    (RASWarning) and rasfx.stats reports eager, naming the graphs that fell back."""
    pipe, kw = sd3_pipe()
    with pytest.warns(rasfx.RASWarning, match="CUDA graphs need CUDA tensors") as caught:
        st = run(pipe, kw, transform_config=rasfx.TransformConfig(mode="cuda_graph"))
    assert sum("CUDA graphs need CUDA tensors" in str(w.message) for w in caught) == 1
    assert st.mode == "eager"
    assert set(st.modes.values()) == {"eager"} and "dense" in st.modes
    assert any(graph.startswith("shared [") for graph in st.modes)
    assert any("not the mode asked for" in note and "CUDA graphs need CUDA tensors" in note for note in st.notes)
    # the default mode resolves to eager on CPU by design: no warning, no note
    with warnings.catch_warnings():
        warnings.simplefilter("error", rasfx.RASWarning)
        st = run(*sd3_pipe())
    assert st.mode == "eager" and not any("not the mode asked for" in n for n in st.notes)


def test_modes_of_a_run_name_each_graph_and_why_it_fell_back():
    """A graph whose CUDA-graph capture failed ran eagerly (stats said cuda_graph): the mode is
    what the runner recorded (a real failed capture: tests/test_lifecycle.py)."""
    ran = Counter({("shared [6]", "eager"): 2})
    mode, modes, notes = ran_modes(ran, 2, {"shared [6]": "CUDA-graph capture failed (x)", "dense": "y"}, "cuda_graph")
    assert mode == "eager" and modes == {"shared [6]": "eager", "original forward": "eager"}
    assert notes == ["graph shared [6] ran eager, not the mode asked for: CUDA-graph capture failed (x)"]
    mode, modes, _ = ran_modes(ran + Counter({("dense", "cuda_graph"): 3}), 0, {}, "cuda_graph")
    assert mode == "eager, cuda_graph" and modes["dense"] == "cuda_graph"
    assert ran_modes(Counter(), 0, {}, "cuda_graph")[0] == "cuda_graph"  # nothing ran yet: what it resolves to


# ------------------------------------------------------------------------------------ heatmaps

VIRIDIS_LOW, VIRIDIS_HIGH = (68, 1, 84), (253, 231, 36)  # viridis at 0 and 1: (0.267, 0.005, 0.329), (0.993, 0.906, 0.144)


def two_rows() -> RunStats:
    """Two latent rows of 6 tokens (a 2 x 3 grid): row 0 computed 1..3 times, row 1 4 times each."""
    computed = torch.tensor([[1, 1, 2, 2, 3, 3], [4, 4, 4, 4, 4, 4]])
    std = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.6, 0.6, 0.6, 0.6, 0.6, 0.6]])
    return RunStats(config=None, num_steps=4, num_tokens=6, computed_steps=computed, noise_std=std)


def test_heatmap_colours_are_viridis_on_a_scale_shared_by_the_rows():
    st = two_rows()
    row0, row1 = (heatmap_image(st, "computed", row=r) for r in (0, 1))
    assert row0.size == (3, 2)
    assert row1.getpixel((0, 0)) == VIRIDIS_HIGH  # computed on every step: the top of the scale (0..steps)
    assert row0.getpixel((0, 0)) != VIRIDIS_LOW  # 1 of 4 steps: not the bottom (the old maps were min-max per map)
    std0, std1 = (heatmap_image(st, "std", row=r) for r in (0, 1))
    assert std0.getpixel((0, 0)) == VIRIDIS_LOW and std0.getpixel((2, 1)) == VIRIDIS_HIGH == std1.getpixel((1, 1))
    # an explicit scale (e.g. shared by several runs)
    assert heatmap_image(st, "computed", row=1, vmin=0, vmax=8).getpixel((0, 0)) not in (VIRIDIS_LOW, VIRIDIS_HIGH)
    assert heatmap_image(st, "computed", size=(30, 20)).size == (30, 20)


def test_heatmap_figure_has_one_colour_bar_per_kind(tmp_path):
    st = two_rows()
    fig = heatmap_figure(st, ("computed", "std"), row_titles=["a", "b"])
    maps = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(maps) == 4 and len(bars) == 2
    assert [ax.get_ylabel() for ax in bars] == ["steps (of 4)", "std of the last step"]
    assert {tuple(ax.images[0].get_clim()) for ax in maps[::2]} == {(0.0, 4.0)}  # one scale per column
    from PIL import Image

    with_bar = Image.open(save_heatmap(st, tmp_path / "bar.png", "std", row=1, size=(120, 80)))
    plain = Image.open(save_heatmap(st, tmp_path / "plain.png", "std", row=1, size=(120, 80), colorbar=False))
    assert plain.size == (120, 80) and with_bar.width > 120


def test_heatmaps_without_matplotlib_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(rasfx.RasfxError, match=r"rasfx\[plot\]"):
        heatmap_image(two_rows())

"""A multistep scheduler under RAS, step for step against the hand-written reference.

Multistep solvers (UniPC, DPM-Solver++) keep the model outputs of earlier steps and combine
them; an output that rasfx later overwrote (an alias of its output cache) would silently
change that history. Here a real pipeline runs twice with the same scheduler configuration:
once through rasfx, once through ``HandRAS`` (tests/reference_ras.py, the hand-patched RAS of
the official code) driven with the active sets rasfx used, and the latents agree after every
step.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import UniPCMultistepScheduler  # noqa: E402

import rasfx  # noqa: E402
import rasfx.module  # noqa: E402
from reference_ras import HandRAS  # noqa: E402
from test_pipeline import StandInRAS, build_flux, build_sd3  # noqa: E402

CFG = rasfx.RASConfig(ratio=0.25, warmup=2, reset_steps=(4,))
STEPS = 7


class HandRASModule(StandInRAS):
    """The ``RASModule`` contract on top of ``HandRAS`` (one per cache slot), computing the
    active sets given in ``replay`` (one entry per call, in call order)."""

    def __init__(self, model, replay):
        super().__init__(model)
        self.replay = list(replay)
        self.refs: dict[str, HandRAS] = {}

    def reset(self) -> None:
        super().reset()
        for ref in self.refs.values():
            ref.reset()

    def forward(self, *args, **kwargs):
        assert not args
        index = self.replay.pop(0)
        ref = self.refs.setdefault(self._slot_name, HandRAS(self.model))
        with torch.no_grad():
            out = ref(index, **kwargs)
        self._token_map = self._map(out)
        self._slot()["dense"] = index is None
        return (out,)


def _flow_unipc():
    return UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)


def _latents_per_step(pipe, kw, steps=STEPS):
    """The latents after every step of a ``steps``-step run from seed 0."""
    seen = []

    def keep(p, i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        return {}

    pipe.set_progress_bar_config(disable=True)
    pipe(**kw, num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
         callback_on_step_end=keep)
    return seen


@pytest.mark.parametrize("build", [build_sd3, build_flux], ids=["sd3", "flux"])
def test_unipc_flow_matching_matches_the_hand_written_reference_step_for_step(build, monkeypatch):
    pipe, kw = build(0)
    pipe.scheduler = _flow_unipc()
    plain = _latents_per_step(pipe, kw)
    used = []  # the active set of every call that went through rasfx
    real_set_active = rasfx.module.RASModule.set_active

    def record(self, index, check=True):
        used.append(None if index is None else index.clone())
        return real_set_active(self, index, check)

    monkeypatch.setattr(rasfx.module.RASModule, "set_active", record)
    with rasfx.enabled(pipe, CFG, transform_config=rasfx.TransformConfig(mode="eager")):
        got = _latents_per_step(pipe, kw)
        stats = rasfx.stats(pipe)
    assert stats.ras_steps == [2, 3, 5, 6] and sum(i is not None for i in used) >= 4
    with rasfx.enabled(pipe, CFG, transform=lambda m: HandRASModule(m, used)):
        want = _latents_per_step(pipe, kw)
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want)):
        err = float((g - w).abs().max() / w.abs().max())
        assert err <= 1e-5, f"step {step}: latents differ from the reference by {err:.2e}"
    assert float((got[-1] - plain[-1]).abs().max()) > 1e-3  # RAS changed the result: the test has teeth

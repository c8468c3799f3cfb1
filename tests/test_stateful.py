"""Stateful test of a transformed model's runtime state (hypothesis ``RuleBasedStateMachine``).

A state machine drives ``ras = rasfx.transform(model)`` through random sequences of the
operations a user or a pipeline performs, on the tiny SD3.5-style model (``make_sd3_tiny``:
dual attention, RMS qk-norm) and the tiny Flux model (``make_flux_tiny``) of
``tests/reference_ras.py``, and checks every forward against an independent reference:

* a **dense** step must equal the plain (live-weight) model, ``model(**kw)``: relative error
  ``max|got - want| / max|want| <= 1e-5`` (the metric of ``tests/test_equivalence.py``);
* a **partial** step must equal ``HandRAS(model)`` (the hand-written RAS oracle), driven in
  lock-step with the same active sets and the same inputs: ``||got - want|| / ||want|| <= 1e-5``
  (the metric and bound ``tests/test_core.py`` / ``tests/test_fuzz.py`` use for this
  comparison); a partial step whose active set covers every token must also equal the model;
* every output ``ras`` returned stays what it was when returned (invariant, checked after every
  rule): an output must never alias a cache or a graph buffer that a later forward rewrites.

Rules: ``forward`` (fresh latents and timestep at every call, like a pipeline step; the prompt
tensors are kept, replaced, or edited in place), ``ras_step`` (``set_active`` + ``forward``),
``set_active`` (shared ``[n]`` sorted or not, per-row ``[B, n]``, every token, ``None``; int64
or int32, sometimes a strided view; the index is then overwritten in place with garbage, which
must not matter: ``set_active`` snapshots it), ``set_active_invalid`` (must raise
``rasfx.InvalidIndexError`` and change nothing; followed by a forward), ``reset``,
``change_signature`` (to the example's other input signature and back: odd token grids, batch
2 / 1; followed by a forward, which must be dense whatever the active set),
``edit_weights`` (an in-place change of a random parameter, of a parameter on the prompt path
only, or ``load_state_dict`` of another model's weights), ``edit_output`` (``mul_(0)`` on an
output ``ras`` returned earlier, then a forward).

What the machine expects (its model of the state):

* ``live``: ``ras`` holds caches for the current input signature (there was a forward since the
  last ``reset()`` / signature change);
* ``active``: a copy of the index of the last valid ``set_active`` (``None``: dense), dropped by
  ``reset()`` and by a signature change;
* the next forward is dense iff ``active is None or not live``; an invalid ``set_active``
  changes nothing (an index ``>= N`` and a per-row index with the wrong row count are tried
  only while ``live``: after ``reset()`` the module no longer knows N and B of the next forward).

Weight edits keep the lock-step (neither ``ras`` nor the oracle is reset): both read the weights
live for everything they compute, and both keep in their caches the keys/values and outputs of
the inactive tokens exactly as last computed (with the old weights), so the RAS result after an
edit is well defined and the same for both. Nothing else may survive an edit: in particular the
values ``ras`` computes once per prompt (``TransformConfig.hoist_invariants``) depend on the
weights too (the text embedder, the pooled-projection embedder), so a dense step after an edit
must equal the edited model even when the prompt tensors did not change.

One case is left out on purpose: a signature change right after ``reset()`` while an active set
is pending (``reset(); set_active(i); forward at another resolution``). ``ras`` cannot tell that
the signature changed (``reset`` forgot it), so whether ``i`` still applies afterwards is not
specified; the machine only changes the signature when that question does not arise.

Cost: a fresh model and ``rasfx.transform(model)`` per example (no state shared between
examples), so each example pays a capture (~2 s of CPU, two ``torch.export`` runs) per input
signature it visits; an example therefore uses two of its model's three signatures (drawn by
``start``). Captures are ~85 % of the time, forwards are cheap, so examples are long (40 steps)
and few (10 per model): ~75 s on 2 CPU cores for the file. ``derandomize=True`` (fixed
examples, deterministic CI) and no shrinking (every example is a series of captures); the
failing sequence of rules is printed as found. ``RASFX_EXAMPLES=k`` multiplies the number of
examples for longer exploration runs.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from reference_ras import HandRAS, flux_inputs, make_flux_tiny, make_sd3_tiny

import rasfx

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")

TOL_DENSE = 1e-5  # max|d| / max|want|, dense (and all-tokens) step vs the plain model
TOL_PARTIAL = 1e-5  # ||d|| / ||want||, partial step vs HandRAS
# RASFX_EXAMPLES=k multiplies max_examples (longer exploration runs), as in test_equivalence.
_SCALE = float(os.environ.get("RASFX_EXAMPLES", "1") or 1)


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """tests/test_equivalence.py's relative error: max|got - want| / max|want|."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    err = float((got.double() - want.double()).abs().max())
    r = err / max(float(want.double().abs().max()), 1e-30)
    return math.inf if math.isnan(r) else r


def norm_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """tests/test_core.py's relative error: ||got - want|| / ||want||."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    r = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-12))
    return math.inf if math.isnan(r) else r


# ------------------------------------------------------------------------------ the two models


class _SD3:
    name = "sd3"
    # (H, W, B): latent pixels (patch 2) -> token grids 3x5, 4x4, 5x3 (15, 16, 15 tokens)
    combos = ((6, 10, 2), (8, 8, 1), (10, 6, 2))
    text_len = 5
    # read only on the prompt path (what rasfx computes once per prompt)
    prompt_params = (
        "context_embedder.weight", "context_embedder.bias",
        "time_text_embed.text_embedder.linear_1.weight", "time_text_embed.text_embedder.linear_1.bias",
        "time_text_embed.text_embedder.linear_2.weight", "time_text_embed.text_embedder.linear_2.bias",
    )

    @staticmethod
    def build(seed):
        return make_sd3_tiny(seed)

    @staticmethod
    def n_tokens(combo):
        H, W, _ = combo
        return (H // 2) * (W // 2)

    @staticmethod
    def fixed(combo):
        return {}

    @classmethod
    def prompt(cls, combo, g):
        B = combo[2]
        return dict(encoder_hidden_states=torch.randn(B, cls.text_len, 16, generator=g),
                    pooled_projections=torch.randn(B, 8, generator=g))

    @staticmethod
    def step(combo, g):
        H, W, B = combo
        return dict(hidden_states=torch.randn(B, 4, H, W, generator=g),
                    timestep=torch.rand(B, generator=g) * 1000.0)


class _Flux:
    name = "flux"
    # (h, w, B): packed token grid -> 15, 16, 20 tokens. Every pair differs in shape: Flux takes packed
    # tokens [B, N, C], so 3x5 -> 5x3 at the same batch is no new input signature (only img_ids values)
    combos = ((3, 5, 2), (4, 4, 1), (5, 4, 2))
    text_len = 6
    prompt_params = _SD3.prompt_params

    @staticmethod
    def build(seed):
        return make_flux_tiny(seed)

    @staticmethod
    def n_tokens(combo):
        return combo[0] * combo[1]

    @classmethod
    def fixed(cls, combo):
        h, w, B = combo
        kw = flux_inputs(B, h, w, seed=0, text_len=cls.text_len)
        return dict(img_ids=kw["img_ids"], txt_ids=kw["txt_ids"])

    prompt = _SD3.__dict__["prompt"]  # the same prompt tensors (a classmethod: reads cls.text_len)

    @staticmethod
    def step(combo, g):
        h, w, B = combo
        return dict(hidden_states=torch.randn(B, h * w, 16, generator=g), timestep=torch.rand(B, generator=g))


_seeds = st.integers(0, 2**31 - 1)


# ------------------------------------------------------------------------------ the machine


class _RASMachine(RuleBasedStateMachine):
    KIND = _SD3

    # -------------------------------------------------------------------- set-up
    @initialize(seed=st.integers(0, 3), combos=st.permutations(range(3)), data_seed=_seeds)
    def start(self, seed, combos, data_seed):
        kind = self.KIND
        # the example's two input signatures (a capture each), out of the model's three
        self.signatures = combos[:2]
        combo = combos[0]
        self.model = kind.build(seed)
        with torch.no_grad():
            self.states = [
                {k: v.clone() for k, v in self.model.state_dict().items()},
                {k: v.clone() for k, v in kind.build(seed + 10).state_dict().items()},
            ]
        self.loaded = 0  # which of self.states the model was last loaded with
        self.ras = rasfx.transform(self.model)
        self.ref = HandRAS(self.model)
        self.combo = combo
        self.prompts: dict = {}  # combo -> prompt tensors, kept across steps like a pipeline keeps them
        self.fixed: dict = {}  # combo -> inputs that never change (Flux img_ids / txt_ids)
        self.live = False
        self.active = None
        self.kept: list = []  # (output, its clone when returned, what returned it)
        self.calls = 0
        self._forward(data_seed, "keep", "the first forward")

    # -------------------------------------------------------------------- helpers
    @property
    def N(self) -> int:
        return self.KIND.n_tokens(self.KIND.combos[self.combo])

    @property
    def B(self) -> int:
        return self.KIND.combos[self.combo][2]

    def _inputs(self, seed: int, prompt: str) -> dict:
        kind, combo = self.KIND, self.KIND.combos[self.combo]
        g = torch.Generator().manual_seed(seed)
        if self.combo not in self.prompts or prompt == "new":
            self.prompts[self.combo] = kind.prompt(combo, g)
        elif prompt == "in_place":
            for t in self.prompts[self.combo].values():
                t.mul_(0.5).add_(torch.randn(t.shape, generator=g))
        if self.combo not in self.fixed:
            self.fixed[self.combo] = kind.fixed(combo)
        return dict(**kind.step(combo, g), **self.prompts[self.combo], **self.fixed[self.combo], return_dict=False)

    def _forward(self, seed: int, prompt: str, what: str) -> None:
        self.calls += 1
        what = f"forward #{self.calls} ({what})"
        kw = self._inputs(seed, prompt)
        dense = self.active is None or not self.live
        expect = "dense" if dense else f"partial, active set {self.active.tolist()}"
        with torch.no_grad():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RASWarning / signature-change warnings are allowed
                try:
                    got = self.ras(**kw)[0]
                except Exception as e:  # any exception is a failure, reported with context
                    raise AssertionError(f"{what}: ras raised {type(e).__name__}: {e} (expected: {expect})") from e
            if dense:
                want = self.model(**kw)[0]
                self.ref(None, **kw)  # the oracle refills its caches, in lock-step
                err = max_rel(got, want)
                assert err <= TOL_DENSE, f"{what}: dense step != plain model: relative error {err:.3e}"
            else:
                want = self.ref(self.active, **kw)
                err = norm_rel(got, want)
                assert err <= TOL_PARTIAL, (
                    f"{what}: partial step != HandRAS: relative error {err:.3e} (expected: {expect})")
                if self._covers_all(self.active):
                    err = max_rel(got, self.model(**kw)[0])
                    assert err <= TOL_DENSE, f"{what}: every token active != plain model: relative error {err:.3e}"
        assert self.ras.last_forward_dense == dense, (
            f"{what}: last_forward_dense is {self.ras.last_forward_dense}, expected {dense} ({expect})")
        self.live = True
        self.kept.append((got, got.clone(), what))

    def _covers_all(self, index: torch.Tensor) -> bool:
        rows = index.view(-1, index.shape[-1])
        return rows.shape[-1] == self.N and all(torch.equal(r.sort().values, torch.arange(self.N)) for r in rows)

    def _valid_index(self, data, form: str, g: torch.Generator) -> torch.Tensor | None:
        N, B = self.N, self.B
        if form == "none":
            return None
        if form == "all":
            return torch.arange(N)
        if form == "all_rowwise":
            return torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
        n = data.draw(st.integers(1, N), label="n")
        if form == "rowwise":
            return torch.stack([torch.randperm(N, generator=g)[:n] for _ in range(B)])
        idx = torch.randperm(N, generator=g)[:n]
        return idx.sort().values if form == "sorted" else idx

    def _set_active_valid(self, data, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        form = data.draw(st.sampled_from(["shared", "sorted", "rowwise", "all", "all_rowwise", "none"]), label="form")
        index = self._valid_index(data, form, g)
        given = index
        if index is not None:
            layout = data.draw(st.sampled_from(["int64", "int64", "int32", "strided"]), label="layout")
            if layout == "int32":
                given = index.to(torch.int32)
            elif layout == "strided":  # a non-contiguous view of a larger int64 tensor
                base = torch.full((*index.shape[:-1], 2 * index.shape[-1]), -7, dtype=torch.int64)
                base[..., ::2] = index
                given = base[..., ::2]
        try:
            self.ras.set_active(given)
        except Exception as e:
            raise AssertionError(f"set_active({form}, {None if index is None else index.tolist()}) raised "
                                 f"{type(e).__name__}: {e}") from e
        self.active = None if index is None else index.clone()
        if given is not None:
            # the caller reuses its tensor: the active set must be the values given at call time
            garbage = data.draw(st.sampled_from(["none", "other_set", "zeros", "huge", "negative"]), label="garbage")
            if garbage == "other_set":
                given.copy_(torch.stack([torch.randperm(self.N, generator=g)[: given.shape[-1]]
                                         for _ in range(given.numel() // given.shape[-1])]).view(given.shape))
            elif garbage == "zeros":
                given.fill_(0)
            elif garbage == "huge":
                given.fill_(10_000)
            elif garbage == "negative":
                given.fill_(-1)

    # -------------------------------------------------------------------- rules
    @rule(seed=_seeds, prompt=st.sampled_from(["keep", "keep", "keep", "new", "in_place"]))
    def forward(self, seed, prompt):
        self._forward(seed, prompt, f"prompt {prompt}")

    @rule(data=st.data(), seed=_seeds)
    def ras_step(self, data, seed):
        """A pipeline step: a new active set, then a forward."""
        self._set_active_valid(data, seed)
        self._forward(seed + 1, "keep", "after set_active")

    @rule(data=st.data(), seed=_seeds)
    def set_active(self, data, seed):
        self._set_active_valid(data, seed)

    @rule(data=st.data(), seed=_seeds)
    def set_active_invalid(self, data, seed):
        N, B = self.N, self.B
        kinds = ["negative", "duplicate", "duplicate_in_a_row", "empty", "empty_rowwise", "float", "bool",
                 "rank3", "scalar", "list", "more_than_N"]
        if self.live:  # N and B of the slot's signature are known (after reset() they are not)
            kinds += ["too_high", "wrong_batch"]
        bad = data.draw(st.sampled_from(kinds), label="invalid")
        k = max(1, N // 3)
        index = {
            "negative": lambda: torch.tensor([0, -1, 2]),
            "too_high": lambda: torch.tensor([0, N, 1]),
            "duplicate": lambda: torch.tensor([1, 3, 1]),
            "duplicate_in_a_row": lambda: torch.stack([torch.arange(k)] * (B - 1) + [torch.tensor([0] * k)]),
            "empty": lambda: torch.zeros(0, dtype=torch.int64),
            "empty_rowwise": lambda: torch.zeros(B, 0, dtype=torch.int64),
            "float": lambda: torch.arange(k, dtype=torch.float32),
            "bool": lambda: torch.arange(N) < k,
            "rank3": lambda: torch.arange(k).view(1, 1, k).expand(B, 1, k).contiguous(),
            "scalar": lambda: torch.tensor(0),
            "list": lambda: list(range(k)),
            "more_than_N": lambda: torch.arange(N + 1) % N,
            "wrong_batch": lambda: torch.stack([torch.arange(k)] * (B + 1)),
        }[bad]()
        try:
            self.ras.set_active(index)
        except rasfx.InvalidIndexError as e:
            assert isinstance(e, ValueError)
        except Exception as e:
            raise AssertionError(f"set_active({bad}: {index}) raised {type(e).__name__} instead of "
                                 f"rasfx.InvalidIndexError: {e}") from e
        else:
            raise AssertionError(f"set_active({bad}: {index}) was accepted; expected rasfx.InvalidIndexError")
        # nothing changed: the next forward is the one the machine expects without the call
        self._forward(seed, "keep", f"after the invalid set_active({bad})")

    @rule()
    def reset(self):
        self.ras.reset()
        self.ref.reset()
        self.live, self.active = False, None

    @precondition(lambda self: self.live or self.active is None)  # see the module docstring
    @rule(seed=_seeds)
    def change_signature(self, seed):
        new = next(i for i in self.signatures if i != self.combo)
        self.combo, self.live = new, False
        self.ref.reset()  # the oracle's caches are of the old shape
        self._forward(seed, "keep", f"new signature {self.KIND.combos[new]}")  # dense, whatever the active set
        self.active = None  # dropped by the signature change

    @rule(data=st.data(), seed=_seeds,
          how=st.sampled_from(["prompt_param", "prompt_param", "any_param", "load_state_dict", "ras.load_state_dict"]))
    def edit_weights(self, data, seed, how):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if how.endswith("load_state_dict"):
                self.loaded = 1 - self.loaded
                (self.ras if how.startswith("ras.") else self.model).load_state_dict(self.states[self.loaded])
            else:
                params = dict(self.model.named_parameters())
                names = self.KIND.prompt_params if how == "prompt_param" else sorted(params)
                p = params[data.draw(st.sampled_from(names), label="parameter")]
                p.add_(0.01 * torch.randn(p.shape, generator=g))

    @precondition(lambda self: self.kept)
    @rule(which=st.sampled_from(["latest", "latest", "any"]), data=st.data(), seed=_seeds)
    def edit_output(self, which, data, seed):
        """The caller zeroes an output it was given, then runs the next step: rasfx's caches
        must not see the edit."""
        i = len(self.kept) - 1 if which == "latest" else data.draw(st.integers(0, len(self.kept) - 1), label="output")
        out, _, what = self.kept[i]
        out.mul_(0)
        self.kept[i] = (out, out.clone(), what)
        self._forward(seed, "keep", f"after zeroing the output of {what}")

    # -------------------------------------------------------------------- invariants
    @invariant()
    def returned_outputs_never_change(self):
        for out, snapshot, what in getattr(self, "kept", ()):
            if not torch.equal(out, snapshot):
                changed = int((out != snapshot).sum())
                raise AssertionError(
                    f"the output of {what} changed after it was returned ({changed} of {out.numel()} values): "
                    "it aliases a cache or buffer that a later forward writes"
                )


class SD3Machine(_RASMachine):
    KIND = _SD3


class FluxMachine(_RASMachine):
    KIND = _Flux


_SETTINGS = dict(
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
    # no shrinking: each example costs captures of ~2 s; the failing sequence is printed as found
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    report_multiple_bugs=False,
    suppress_health_check=list(HealthCheck),
)
SD3Machine.TestCase.settings = settings(max_examples=max(1, round(10 * _SCALE)), **_SETTINGS)
FluxMachine.TestCase.settings = settings(max_examples=max(1, round(10 * _SCALE)), **_SETTINGS)

TestSD3Stateful = SD3Machine.TestCase
TestFluxStateful = FluxMachine.TestCase

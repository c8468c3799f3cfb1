"""``RASModule`` (rasfx/module.py): one capture per input signature (resolution, aspect ratio,
batch, optional inputs, dtype, device), reused when a signature comes back, evicted by the LRU;
captures made by concurrent threads; the model's state dict; changes to the model after capture
(rasfx/model_structure.py); ``reset(captures=True)``; a signature with a single image token.

Every test here can fail: each one compares against the original model, a hand-written RAS
reference (``tests/reference_ras.py``, ``tests/tiny_dit.py``) or a separate run, or checks a
typed error and its message (docs/reliability.md).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from reference_ras import HandRAS, make_sd3_tiny
from state_helpers import kw_sd3, rel, same, warm
from tiny_dit import TinyDiT, TinyOracle

import rasfx
from rasfx.capture import input_signature

# Tiny models: one intra-op thread is much faster than two on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _first(out):
    return out[0]  # a tuple (return_dict=False) or a diffusers output object (indexable the same way)


def _switch_and_back(ras, model, kw_a, kw_b, idx_a, idx_b, kw_b2):
    """A (sparse, caches warm) -> B -> B sparse -> A. B and the return to A start dense and equal
    the model; B is captured unless its signature was seen before; A's capture is reused; the
    sparse step at B equals the hand-written RAS fed the same inputs (no state crosses over)."""
    ras.reset()
    sig_b = input_signature(model, kw_b)
    b_known = any(cc.capture.signature == sig_b for cc in ras.captures())
    with torch.no_grad():
        ras(**kw_a)
        ras.set_active(idx_a)
        ras(**kw_a)
        assert not ras.last_forward_dense
        before = {id(cc) for cc in ras.captures()}
        cc_a = ras._current_capture()
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(**kw_b)
        assert ras.last_forward_dense, "a new input signature must start dense"
        assert type(out) is type(model(**kw_b))
        assert rel(_first(out), _first(model(**kw_b))) <= 1e-6
        cc_b = ras._current_capture()
        assert cc_b is not cc_a and cc_b.capture.signature == sig_b
        assert (id(cc_b) in before) == b_known, "captured iff the signature is new"

        ras.set_active(idx_b)
        got = _first(ras(**kw_b2))
        assert not ras.last_forward_dense
        ref = HandRAS(model)
        ref(None, **kw_b)
        assert rel(got, ref(idx_b, **kw_b2)) <= 1e-5

        n_captures = len(ras.captures())
        ras.set_active(None)
        out = ras(**kw_a)  # index already dropped: no warning needed, still dense
        assert ras.last_forward_dense and rel(_first(out), _first(model(**kw_a))) <= 1e-6
        assert ras._current_capture() is cc_a and len(ras.captures()) == n_captures, "A's capture is reused"


SIGNATURE_CHANGES = {
    # name: (kw_a, kw_b, idx_a, idx_b)
    "resolution": (kw_sd3(2, 8, 8), kw_sd3(2, 8, 12), torch.arange(5), torch.tensor([0, 7, 23, 11])),
    # 24 tokens either way: the grid differs, the token count does not
    "aspect_ratio": (kw_sd3(2, 8, 12), kw_sd3(2, 12, 8), torch.arange(6), torch.tensor([3, 2, 20])),
    "batch_size": (kw_sd3(2, 8, 8), kw_sd3(1, 8, 8), torch.stack([torch.arange(4), torch.arange(4, 8)]),
                   torch.tensor([[1, 9, 15]])),
    "optional_list_input_given": (kw_sd3(2, 8, 8), kw_sd3(2, 8, 8, skip_layers=[1]), torch.arange(4),
                                  torch.tensor([2, 3, 12])),
    "optional_flag_omitted": (kw_sd3(2, 8, 8), {k: v for k, v in kw_sd3(2, 8, 8).items() if k != "return_dict"},
                              torch.arange(4), torch.tensor([5, 0])),
}


@pytest.mark.parametrize("change", list(SIGNATURE_CHANGES))
def test_signature_change_recaptures_starts_dense_and_is_exact(change, ras, sd3):
    kw_a, kw_b, idx_a, idx_b = SIGNATURE_CHANGES[change]
    kw_b2 = {k: (v + 0.5 if k == "hidden_states" else v) for k, v in kw_b.items()}
    _switch_and_back(ras, sd3, kw_a, kw_b, idx_a, idx_b, kw_b2)
    # coming back to B later reuses its capture
    n = len(ras.captures())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ras(**kw_b)
    assert len(ras.captures()) == n and ras.last_forward_dense


def test_dtype_change_recaptures_starts_dense_and_is_exact():
    """float32 -> float64 (the model converted with .double(): the module reads its parameters live)."""
    torch.manual_seed(5)
    model = TinyDiT("rope").eval()
    ras = rasfx.transform(model)
    x32 = torch.randn(2, 12, 4)
    with torch.no_grad():
        ras(hidden_states=x32)
        ras.set_active(torch.arange(5))
        ras(hidden_states=x32)
        assert not ras.last_forward_dense
        model.double()
        x64 = x32.double()
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(hidden_states=x64)
        assert out.dtype == torch.float64 and ras.last_forward_dense and len(ras.captures()) == 2
        assert rel(out, model(hidden_states=x64)) <= 1e-12
        assert all(c.dtype == torch.float64 for c in ras._slot.caches)
        oracle = TinyOracle(model)
        oracle(x64)
        for idx in (torch.tensor([0, 3, 9]), torch.stack([torch.arange(4), torch.arange(4, 8)])):
            x64 = x64 * 0.5 + 0.1
            ras.set_active(idx)
            got = ras(hidden_states=x64)
            assert not ras.last_forward_dense and got.dtype == torch.float64
            assert rel(got, oracle(x64, idx)) <= 1e-12


@pytest.mark.gpu
def test_device_change_recaptures_starts_dense_and_is_exact(sd3):
    model = copy.deepcopy(sd3)
    ras = rasfx.transform(model)
    kw = kw_sd3(2, 8, 8)
    with torch.no_grad():
        ras(**kw)
        ras.set_active(torch.arange(5))
        ras(**kw)
        model.cuda()
        kwc = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(**kwc)[0]
        assert out.is_cuda and ras.last_forward_dense and len(ras.captures()) == 2
        assert rel(out, model(**kwc)[0]) <= 1e-5
        assert all(c.is_cuda for c in ras._slot.caches)
        with pytest.raises(rasfx.InvalidIndexError, match="move it with .to()"):
            ras.set_active(torch.arange(3))  # a CPU index for a CUDA model
        idx = torch.tensor([0, 3, 9], device="cuda")
        ras.set_active(idx)
        got = ras(**kwc)[0]
        ref = HandRAS(model)
        ref(None, **kwc)
        assert not ras.last_forward_dense and rel(got, ref(idx, **kwc)) <= 1e-4


def test_lru_eviction_recaptures_and_stays_exact():
    """max_captures=1: a second signature evicts the first; coming back captures it again, starts
    dense and equals the model."""
    torch.manual_seed(2)
    model = TinyDiT("rope").eval()
    ras = rasfx.transform(model, rasfx.TransformConfig(max_captures=1))
    a, b = torch.randn(2, 12, 4), torch.randn(2, 16, 4)
    with torch.no_grad():
        ras(hidden_states=a)
        first = ras.captures()[0]
        ras(hidden_states=b)
        assert len(ras.captures()) == 1 and ras.captures()[0] is not first
        ras.set_active(torch.arange(3))
        with pytest.warns(UserWarning, match="signature changed"):
            out = ras(hidden_states=a)
        assert ras.last_forward_dense and len(ras.captures()) == 1 and ras.captures()[0] is not first
        assert rel(out, model(hidden_states=a)) <= 1e-6
        assert len(ras._resolvers) == 1
        ras.set_active(torch.tensor([4, 0, 7]))
        oracle = TinyOracle(model)
        oracle(a)
        assert rel(ras(hidden_states=a * 2), oracle(a * 2, torch.tensor([4, 0, 7]))) <= 1e-5


_CONCURRENT_CAPTURE_SCRIPT = r"""
import sys, threading
import torch
import torch.nn.functional as F
import rasfx

torch.set_num_threads(1)


class Dit(torch.nn.Module):  # packed tokens -> embedding -> attention -> output
    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 24), torch.nn.Linear(8, 4)

    def forward(self, hidden_states):
        h = self.embed(hidden_states)
        q, k, v = (t.view(*t.shape[:2], 2, 4).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(h + a)


events = [threading.Event(), threading.Event()]


def meet(who):  # both threads wait for each other inside their first capture (or go on after 3 s)
    def pre_hook(module, args):
        if torch.compiler.is_exporting() and not events[who].is_set():
            events[who].set()
            events[1 - who].wait(timeout=3.0)
    return pre_hook


torch.manual_seed(0)
models = [Dit().eval(), Dit().eval()]
x = torch.randn(2, 12, 4)
alone = [m(hidden_states=x) for m in models]
for who, m in enumerate(models):
    m.embed.register_forward_pre_hook(meet(who))
mods = [rasfx.transform(m) for m in models]
results, errors = [None, None], []
barrier = threading.Barrier(2)


def work(i):
    try:
        barrier.wait(timeout=60)
        with torch.no_grad():
            results[i] = mods[i](hidden_states=x)
    except BaseException as e:
        errors.append(f"{type(e).__name__}: {e}")


threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=120)
if errors:
    print("ERROR", errors[0][:400])
    sys.exit(1)
bad = [i for i in range(2) if not torch.allclose(results[i], alone[i], rtol=1e-5, atol=1e-6)]
print("MISMATCH" if bad else "OK", bad)
sys.exit(1 if bad else 0)
"""


def test_threads_capturing_at_the_same_time_match_running_alone():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _CONCURRENT_CAPTURE_SCRIPT], capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout + proc.stderr)[-2000:]


def test_state_dict_is_the_models_without_caches(ras, sd3, tmp_path):
    with torch.no_grad():
        warm(ras, kw_sd3(2, 8, 8))
        with ras.cache_context("uncond"):
            ras(**kw_sd3(2, 8, 8))
    assert ras.cache_bytes() > 0  # caches are live while the state dict is taken
    sd, ref = ras.state_dict(), sd3.state_dict()
    assert list(sd) == list(ref)
    assert all(sd[k] is ref[k] or (torch.equal(sd[k], ref[k]) and sd[k].data_ptr() == ref[k].data_ptr()) for k in ref)
    assert not any("ras" in k or "cache" in k for k in sd)
    assert {k.removeprefix("model.") for k, _ in ras.named_buffers()} == {k for k, _ in sd3.named_buffers()}
    assert sum(p.numel() for p in ras.parameters()) == sum(p.numel() for p in sd3.parameters())
    # round trip through a file into a fresh model with other weights
    torch.save(sd, tmp_path / "sd.pt")
    fresh = make_sd3_tiny(7)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    kw = kw_sd3(1, 8, 8, seed=3)
    with torch.no_grad():
        assert same(fresh(**kw)[0], sd3(**kw)[0])
        # load_state_dict of the transformed module loads into the model; the next forward uses it
        other = make_sd3_tiny(8)
        ras_other = rasfx.transform(other)
        ras_other.load_state_dict(sd)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), ref.values()))


@pytest.mark.parametrize("change", ["replace_submodule", "swap_attention_processor"])
def test_model_changed_after_capture_is_followed(change):
    """A replaced submodule (what a LoRA/peft layer does) or a swapped attention processor is
    seen at the next forward: RASWarning, the captures are dropped, that forward is dense and
    equals the changed model; the following partial steps equal a fresh transform of it."""
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    kw, kw2 = kw_sd3(1, 8, 8), kw_sd3(1, 8, 8, seed=1)
    idx = torch.tensor([0, 3, 5, 9, 14])
    with torch.no_grad():
        ras(**kw)
        ras.set_active(idx)
        ras(**kw2)  # live caches of the old model
        if change == "replace_submodule":
            torch.manual_seed(1)
            model.proj_out = torch.nn.Linear(model.proj_out.in_features, model.proj_out.out_features)
        else:
            attn = model.transformer_blocks[0].attn
            inner = attn.processor

            class Halved:
                def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
                    out = inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kw)
                    return tuple(o * 0.5 for o in out) if isinstance(out, tuple) else out * 0.5

            attn.set_processor(Halved())
        want = model(**kw)[0]
        with pytest.warns(rasfx.RASWarning, match="changed since it was captured"):
            got = ras(**kw)[0]
        assert ras.last_forward_dense and rel(got, want) <= 1e-6
        fresh = rasfx.transform(model)
        fresh(**kw)
        for m in (ras, fresh):
            m.set_active(idx)
        assert rel(ras(**kw2)[0], fresh(**kw2)[0]) <= 1e-6 and not ras.last_forward_dense
        assert rel(ras(**kw2)[0], model(**kw2)[0]) > 1e-3  # a real partial step, not the dense output


def test_unchanged_model_is_not_recaptured_when_other_modules_are_built():
    """Building modules elsewhere in the process (which bumps rasfx's registration counter) does
    not look like a change: no warning, the capture and the caches are kept."""
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw_sd3(1, 8, 8))
        captured = ras.captures()
        make_sd3_tiny(1, num_layers=1)  # registers many submodules, none in `model`
        ras.set_active(torch.tensor([1, 2, 3]))
        with warnings.catch_warnings():
            warnings.simplefilter("error", rasfx.RASWarning)
            ras(**kw_sd3(1, 8, 8, seed=1))
    assert not ras.last_forward_dense and ras.captures() == captured


def test_reset_with_captures_drops_the_graphs():
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    with torch.no_grad():
        ras(**kw_sd3(1, 8, 8))
        assert len(ras.captures()) == 1 and ras.cache_bytes() > 0
        ras.reset()
        assert len(ras.captures()) == 1 and ras.cache_bytes() > 0
        ras.reset(captures=True)
        assert ras.captures() == [] and ras.cache_bytes() == 0
        assert same(ras(**kw_sd3(1, 8, 8))[0], model(**kw_sd3(1, 8, 8))[0])


def test_single_image_token_module_runs_the_plain_model():
    model = make_sd3_tiny(0, num_layers=1)
    ras = rasfx.transform(model)
    kw = kw_sd3(1, 2, 2)  # a 2 x 2 latent, patch 2: one token
    with torch.no_grad(), pytest.warns(rasfx.RASWarning, match="single token"):
        out = ras(**kw)[0]
    assert same(out, model(**kw)[0]) and ras.last_forward_dense
    assert ras.num_image_tokens == 1 and ras.captures() == []
    with pytest.raises(rasfx.UnsupportedModelError, match="single token"):
        ras.token_map()
    with torch.no_grad():
        ras.set_active(torch.tensor([0]))
        assert same(ras(**kw)[0], model(**kw)[0])  # still dense, no second warning needed
        ras(**kw_sd3(1, 8, 8))  # another resolution is captured as usual
    assert len(ras.captures()) == 1

"""Tests of the gather-/scatter-fused GeMM kernels in rasfx.kernels.

Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be
switched on before triton is imported (hence the environment line below, ahead of the
rasfx import). With a GPU the same small-shape tests run the compiled kernels on CUDA,
and the `gpu`-marked tests add real SD3/Flux shapes.

Accuracy criterion: both the fused op and the unfused PyTorch reference in the same
dtype are compared with a float64 reference; the fused error must stay within a small
multiple of the reference's own rounding error plus half an ulp of the largest output.
(The interpreter rounds fp32 -> bf16 toward zero rather than to nearest, so bf16 results
there can be one ulp off where the GPU is within half an ulp; the multiple covers it.)
"""

import ast
import os
import pathlib

import torch

# Interpreter on machines without CUDA; compiled kernels where a GPU exists. Set before
# triton is imported, as Triton asks; restored right after the imports, and set again only
# while this module's tests run (fixture below), so other test modules in the same pytest
# process do not push their CPU calls of the ops through the slow interpreter.
_OUTER_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:  # optional on the GPU machine: the property tests skip without it
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:
    given = settings = st = None

import rasfx.kernels as K  # noqa: E402
from rasfx.kernels import (  # noqa: E402
    check_index,
    gather_gemm,
    gather_linear,
    gather_linear_reference,
    linear_scatter_,
    linear_scatter_reference_,
    scatter_gemm,
    triton_available,
    use_triton,
)


def _set_interpret(value):
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value


_set_interpret(_OUTER_INTERPRET)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_triton = pytest.mark.skipif(not triton_available(), reason="triton is not importable")
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on_cpu():
    """TRITON_INTERPRET=1 for this module's tests on machines without CUDA (the kernels
    read it at launch time), restored afterwards. The ops run the fused kernels here
    (RASFX_KERNELS_PATH=fused): on a GPU they would otherwise take, per shape, the faster of
    the kernel and the unfused path, and these tests are about the kernels."""
    outer = os.environ.get("TRITON_INTERPRET")
    outer_path = os.environ.get("RASFX_KERNELS_PATH")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ["RASFX_KERNELS_PATH"] = "fused"
    yield
    _set_interpret(outer)
    if outer_path is None:
        os.environ.pop("RASFX_KERNELS_PATH", None)
    else:
        os.environ["RASFX_KERNELS_PATH"] = outer_path


# ----------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------


def make_tensors(B, M, n, Kd, N, dtype, *, per_row, bias=True, seed=0, device=DEVICE):
    """Random operands; index rows are distinct (a valid scatter) and unsorted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, Kd, generator=g).to(device, dtype)  # x: [B, M, K]
    w = (torch.randn(N, Kd, generator=g) / Kd**0.5).to(device, dtype)  # weight: [N, K]
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None  # bias: [N]
    if per_row:
        index = torch.stack([torch.randperm(M, generator=g)[:n] for _ in range(B)])  # [B, n]
    else:
        index = torch.randperm(M, generator=g)[:n]  # [n]
    return x, index.to(device), w, b


def exact(t):
    return None if t is None else t.double()


def assert_accurate(fused, ref, exact_out, dtype, multiple=4.0):
    """Fused error vs float64 must be within `multiple` x the same-dtype reference's error (+ half an ulp)."""
    assert fused.shape == exact_out.shape
    assert fused.dtype == dtype
    assert torch.isfinite(fused).all(), "fused output has non-finite values"
    err_fused = (fused.double() - exact_out).abs().max().item() if fused.numel() else 0.0
    err_ref = (ref.double() - exact_out).abs().max().item() if ref.numel() else 0.0
    scale = exact_out.abs().max().item() if exact_out.numel() else 0.0
    half_ulp = 0.5 * torch.finfo(dtype).eps * max(scale, 1.0)
    assert err_fused <= multiple * err_ref + half_ulp, (
        f"{dtype}: fused error {err_fused:.3g} vs reference error {err_ref:.3g} (scale {scale:.3g})"
    )


def run_gather_case(B, M, n, Kd, N, dtype, *, per_row, bias, seed=0, device=DEVICE, poison_out=False):
    """Op vs reference; with `poison_out`, also the kernel into a NaN-filled output buffer."""
    x, index, w, b = make_tensors(B, M, n, Kd, N, dtype, per_row=per_row, bias=bias, seed=seed, device=device)
    y = gather_linear(x, index, w, b)
    ref = gather_linear_reference(x, index, w, b)
    ex = gather_linear_reference(exact(x), index, exact(w), exact(b))
    assert_accurate(y, ref, ex, dtype)
    if poison_out:
        out = torch.full_like(ref, float("nan"))
        gather_gemm._gather_linear_triton(x, index, w, b, out=out)
        assert_accurate(out, ref, ex, dtype)


def run_scatter_case(B, M, n, Kd, N, dtype, *, per_row, bias, seed=0, device=DEVICE):
    """Scatter into a NaN-poisoned cache: every indexed row written, no other row touched."""
    g = torch.Generator().manual_seed(seed + 1)
    _, index, w, b = make_tensors(B, M, n, Kd, N, dtype, per_row=per_row, bias=bias, seed=seed, device=device)
    x = torch.randn(B, n, Kd, generator=g).to(device, dtype)  # x: [B, n, K]
    cache = torch.full((B, M, N), float("nan"), dtype=dtype, device=device)  # cache: [B, M, N]
    ref_cache = cache.clone()
    linear_scatter_(cache, x, index, w, b)
    linear_scatter_reference_(ref_cache, x, index, w, b)
    ex = F.linear(exact(x), exact(w), exact(b))  # [B, n, N]

    rows = index if index.dim() == 2 else index.expand(B, n)  # rows: [B, n]
    written = torch.zeros(B, M, dtype=torch.bool, device=device)
    written.scatter_(1, rows.long(), True)
    assert torch.isnan(cache[~written]).all(), "a row outside the index was touched"
    got = torch.gather(cache, 1, rows.long().unsqueeze(-1).expand(-1, -1, N))  # [B, n, N]
    want = torch.gather(ref_cache, 1, rows.long().unsqueeze(-1).expand(-1, -1, N))
    assert_accurate(got, want, ex, dtype)


# ----------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------


@requires_triton
def test_triton_path_is_taken(monkeypatch):
    """The tests below exercise the kernel, not the reference (interpreter on CPU, CUDA on GPU)."""
    assert use_triton(torch.empty(1, device=DEVICE))
    calls = []
    real = gather_gemm._gather_linear_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gather_gemm, "_gather_linear_triton", spy)
    run_gather_case(1, 5, 3, 8, 4, torch.float32, per_row=False, bias=True)
    assert calls


@requires_triton
@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointers"])
@pytest.mark.parametrize("Kd", [72, 37], ids=["K72", "K37"])
def test_tma_and_pointer_operand_loads(tma, Kd, monkeypatch):
    """Both operand-load paths of the kernels run and are exact: TMA descriptors (Hopper; the
    interpreter on CPU) where the layout allows, pointer loads otherwise. K=37 bf16 rows are
    74 bytes, not 16-byte aligned: TMA must decline them and the pointer path serve."""
    from rasfx.kernels import _common, _mainloop

    monkeypatch.setenv("RASFX_KERNELS_TMA", tma)
    made = []
    real = _common.tma_descriptor

    def spy(t, meta, rows):
        d = real(t, meta, rows)
        made.append(d is not None)
        return d

    monkeypatch.setattr(_mainloop, "tma_descriptor", spy)  # the launch shared by both kernels
    run_gather_case(2, 50, 37, Kd, 40, torch.bfloat16, per_row=True, bias=True, poison_out=True)
    run_scatter_case(2, 50, 37, Kd, 40, torch.bfloat16, per_row=False, bias=True)
    run_scatter_case(1, 50, 33, Kd, 24, torch.float16, per_row=True, bias=False)
    assert made, "the launchers did not ask for descriptors"
    expect_tma = tma == "1" and Kd == 72 and (ON_GPU is False or torch.cuda.get_device_capability()[0] >= 9)
    assert any(made) == expect_tma, made


@requires_triton
@pytest.mark.parametrize("tma", ["1", "0"], ids=["tma", "pointers"])
@pytest.mark.parametrize("N", [40, 100, 48], ids=["N40", "N100", "N48"])
def test_two_block_tiles(tma, N, monkeypatch):
    """Tiles widened by a second column block (BLOCK_N2, e.g. 128 + 64 = 192 columns on Hopper)
    write every output column once and only those. With the CPU tile (32 + 16 columns) N=40 ends
    inside the first tile's second block, N=100 inside a third tile's first block, N=48 exactly
    on a tile edge."""
    from rasfx.kernels import _common

    if ON_GPU:
        monkeypatch.setenv("RASFX_KERNELS_AUTOTUNE", "0")
        monkeypatch.setattr(_common, "_UNTUNED_TILE", (64, 64, 32, 4, 3, 32))
    else:
        monkeypatch.setattr(_common, "_INTERPRET_TILE", (16, 32, 32, 4, 1, 16))
    monkeypatch.setenv("RASFX_KERNELS_TMA", tma)
    assert _common.launch_mode()[2]["BLOCK_N2"] > 0  # the launches below use two-block tiles
    run_gather_case(2, 50, 37, 72, N, torch.bfloat16, per_row=True, bias=True, poison_out=True)
    run_gather_case(1, 29, 20, 40, N, torch.float32, per_row=False, bias=False, poison_out=True)
    run_scatter_case(2, 50, 37, 72, N, torch.bfloat16, per_row=False, bias=True)
    run_scatter_case(1, 29, 20, 40, N, torch.float16, per_row=True, bias=False)


def test_reference_path_without_triton(monkeypatch):
    """With dispatch forced to the reference, the ops equal the unfused PyTorch code."""
    monkeypatch.setattr(gather_gemm, "use_triton", lambda t: False)
    monkeypatch.setattr(scatter_gemm, "use_triton", lambda t: False)
    x, index, w, b = make_tensors(2, 11, 5, 8, 6, torch.float32, per_row=True, device="cpu")
    want_y = F.linear(torch.stack([x[i, index[i]] for i in range(2)]), w, b)
    torch.testing.assert_close(gather_linear(x, index, w, b), want_y)
    cache = torch.zeros(2, 11, 6)
    xa = x[:, :5]
    linear_scatter_(cache, xa, index, w, b)
    want = torch.zeros(2, 11, 6)
    for i in range(2):
        want[i, index[i]] = F.linear(xa[i], w, b)
    torch.testing.assert_close(cache, want)


def test_kernels_package_has_only_torch_and_triton_dependencies():
    """rasfx.kernels must import on a bare torch+triton install (the benchmark relies on it)."""
    allowed = {"__future__", "functools", "os", "typing", "torch", "triton"}
    for path in pathlib.Path(K.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


# ----------------------------------------------------------------------------------
# Gather: accuracy on small odd shapes
# ----------------------------------------------------------------------------------

# n per batch size: all rows (a permutation), a strict subset, a single row.
GATHER_ROWS = {1: 37, 2: 13, 3: 1}
SCATTER_ROWS = {1: 50, 2: 23, 3: 1}


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gather_linear_matches_reference(dtype, B, per_row, bias):
    run_gather_case(B, 37, GATHER_ROWS[B], 72, 40, dtype, per_row=per_row, bias=bias, seed=B)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_linear_writes_every_output_element(dtype):
    """A NaN-poisoned output buffer comes back fully overwritten (int32 index, repeated rows)."""
    x, _, w, b = make_tensors(2, 37, 0, 72, 40, dtype, per_row=False)
    index = torch.tensor([36, 0, 5, 5, 36, 17, 2], dtype=torch.int32, device=DEVICE)  # repeats are fine for a gather
    out = torch.full((2, 7, 40), float("nan"), dtype=dtype, device=DEVICE)
    gather_gemm._gather_linear_triton(x, index, w, b, out=out)
    ex = gather_linear_reference(exact(x), index, exact(w), exact(b))
    assert_accurate(out, gather_linear_reference(x, index, w, b), ex, dtype)


@requires_triton
def test_gather_linear_strided_operands():
    """Non-contiguous x (every other row, batch-interleaved) and a transposed weight."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(40, 3, 72, generator=g).to(DEVICE)
    x = big.transpose(0, 1)[:, ::2]  # x: [3, 20, 72], strides (72, 432, 1)
    w = torch.randn(72, 40, generator=g).to(DEVICE).t()  # weight: [40, 72], strides (1, 40)
    b = torch.randn(40, generator=g).to(DEVICE)
    index = torch.tensor([[3, 19, 0], [1, 1, 7], [18, 2, 9]], device=DEVICE)
    y = gather_linear(x, index, w, b)
    ex = gather_linear_reference(exact(x), index, exact(w), exact(b))
    assert_accurate(y, gather_linear_reference(x, index, w, b), ex, torch.float32)


@requires_triton
@pytest.mark.parametrize("Kd", [64, 1, 0])
def test_gather_linear_reduction_edges(Kd):
    """K a multiple of BLOCK_K (unmasked path), K=1 and K=0 (output is just the bias)."""
    run_gather_case(2, 37, 9, Kd, 40, torch.float32, per_row=True, bias=True)


@requires_triton
def test_gather_linear_empty_index():
    x, _, w, b = make_tensors(2, 37, 0, 72, 40, torch.float32, per_row=False)
    y = gather_linear(x, torch.empty(0, dtype=torch.int64, device=DEVICE), w, b)
    assert y.shape == (2, 0, 40)


@requires_triton
def test_gather_kernel_masks_out_of_range_rows():
    """Bypassing validation, out-of-range ids read as zero rows: no fault, output = bias."""
    x, _, w, b = make_tensors(1, 37, 0, 72, 40, torch.float32, per_row=False)
    index = torch.tensor([4, 37, -1, 1000], device=DEVICE)
    y = gather_gemm._gather_linear_triton(x, index, w, b)
    torch.testing.assert_close(y[0, 0], F.linear(x[0, 4], w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(y[0, 1:], b.expand(3, -1))


# ----------------------------------------------------------------------------------
# Scatter: accuracy and untouched rows on small odd shapes
# ----------------------------------------------------------------------------------


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 2, 3])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_scatter_matches_reference(dtype, B, per_row, bias):
    run_scatter_case(B, 50, SCATTER_ROWS[B], 72, 40, dtype, per_row=per_row, bias=bias, seed=B)


@requires_triton
def test_linear_scatter_sentinel_and_strided_cache():
    """A cache that is a strided view, int32 index, sentinel fill: only indexed rows change."""
    g = torch.Generator().manual_seed(5)
    storage = torch.full((50, 2, 40), 1234.5, device=DEVICE)
    cache = storage.transpose(0, 1)  # cache: [2, 50, 40], strides (40, 80, 1)
    x = torch.randn(2, 6, 72, generator=g).to(DEVICE)
    w = torch.randn(40, 72, generator=g).to(DEVICE)
    index = torch.tensor([49, 0, 12, 13, 7, 30], dtype=torch.int32, device=DEVICE)
    linear_scatter_(cache, x, index, w)
    want = torch.full((2, 50, 40), 1234.5, device=DEVICE)
    want[:, index.long()] = F.linear(x, w)
    torch.testing.assert_close(cache, want, rtol=1e-5, atol=1e-4)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index.long().cpu()] = False
    assert (cache[:, untouched.to(DEVICE)] == 1234.5).all()


@requires_triton
@pytest.mark.parametrize("Kd", [64, 1, 0])
def test_linear_scatter_reduction_edges(Kd):
    run_scatter_case(2, 50, 9, Kd, 40, torch.float32, per_row=True, bias=True)


@requires_triton
def test_linear_scatter_empty_index_is_noop():
    cache = torch.full((2, 50, 40), float("nan"), device=DEVICE)
    x = torch.randn(2, 0, 72, device=DEVICE)
    w = torch.randn(40, 72, device=DEVICE)
    linear_scatter_(cache, x, torch.empty(0, dtype=torch.int64, device=DEVICE), w)
    assert torch.isnan(cache).all()


@requires_triton
def test_scatter_kernel_drops_out_of_range_rows():
    """Bypassing validation, out-of-range ids are not written: nothing outside the cache changes."""
    storage = torch.full((3, 50, 40), float("nan"), device=DEVICE)
    cache = storage[1:2]  # cache: [1, 50, 40]; the neighbours detect stray writes
    x = torch.randn(1, 3, 72, device=DEVICE)
    w = torch.randn(40, 72, device=DEVICE)
    scatter_gemm._linear_scatter_triton(cache, x, torch.tensor([50, 2, -1], device=DEVICE), w, None)
    torch.testing.assert_close(cache[0, 2], F.linear(x[0, 1], w), rtol=1e-5, atol=1e-4)
    written = torch.zeros(3, 50, dtype=torch.bool, device=DEVICE)
    written[1, 2] = True
    assert torch.isnan(storage[~written]).all()


# ----------------------------------------------------------------------------------
# Property tests (small: the interpreter is slow)
# ----------------------------------------------------------------------------------

if st is not None:
    shapes = st.tuples(
        st.integers(1, 3),  # B
        st.integers(1, 40),  # M
        st.integers(1, 70),  # K
        st.integers(1, 48),  # N
    ).flatmap(lambda s: st.tuples(st.just(s), st.integers(0, s[1])))  # n <= M

    @requires_triton
    @settings(max_examples=6 if ON_GPU else 10, deadline=None, derandomize=True)
    @given(shape=shapes, per_row=st.booleans(), bias=st.booleans(), dtype=st.sampled_from(DTYPES))
    def test_gather_linear_property(shape, per_row, bias, dtype):
        (B, M, Kd, N), n = shape
        run_gather_case(B, M, n, Kd, N, dtype, per_row=per_row, bias=bias)

    @requires_triton
    @settings(max_examples=6 if ON_GPU else 10, deadline=None, derandomize=True)
    @given(shape=shapes, per_row=st.booleans(), bias=st.booleans(), dtype=st.sampled_from(DTYPES))
    def test_linear_scatter_property(shape, per_row, bias, dtype):
        (B, M, Kd, N), n = shape
        run_scatter_case(B, M, n, Kd, N, dtype, per_row=per_row, bias=bias)
else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_tests_need_hypothesis():
        pass


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------


def _gather_args(**over):
    x, index, w, b = make_tensors(2, 37, 5, 72, 40, torch.float32, per_row=False, device="cpu")
    args = {"x": x, "index": index, "weight": w, "bias": b}
    args.update(over)
    return args


def _scatter_args(**over):
    _, index, w, b = make_tensors(2, 37, 5, 72, 40, torch.float32, per_row=False, device="cpu")
    args = {"cache": torch.zeros(2, 37, 40), "x": torch.randn(2, 5, 72), "index": index, "weight": w, "bias": b}
    args.update(over)
    return args


GATHER_BAD = [
    ({"index": torch.tensor([1.0, 2.0])}, "int64 or int32"),
    ({"index": torch.tensor([1, 2], dtype=torch.int16)}, "int64 or int32"),
    ({"index": torch.zeros(2, 3, 4, dtype=torch.int64)}, r"shape \[n\] or \[B, n\]"),
    ({"index": torch.zeros(3, 4, dtype=torch.int64)}, "B == 2"),
    ({"index": torch.tensor([0, 37])}, r"\[0, 37\)"),
    ({"index": torch.tensor([-1, 3])}, r"\[0, 37\)"),
    ({"x": torch.randn(37, 72)}, r"x must be \[B, M, K\]"),
    ({"x": torch.randn(2, 37, 72, dtype=torch.float64)}, "float16, bfloat16 or float32"),
    ({"weight": torch.randn(40, 71)}, r"weight must be \[N, K=72\]"),
    ({"weight": torch.randn(40, 72, dtype=torch.float16)}, "weight dtype"),
    ({"bias": torch.randn(41)}, r"bias must be \[N=40\]"),
    ({"bias": torch.randn(40, dtype=torch.bfloat16)}, "bias dtype"),
]


@pytest.mark.parametrize("over,match", GATHER_BAD, ids=[m for _, m in GATHER_BAD])
def test_gather_linear_rejects_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        gather_linear(**_gather_args(**over))


SCATTER_BAD = [
    ({"index": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}, "int64 or int32"),
    ({"index": torch.zeros(1, 2, 5, dtype=torch.int64)}, r"shape \[n\] or \[B, n\]"),
    ({"index": torch.zeros(1, 5, dtype=torch.int64)}, "B == 2"),
    ({"index": torch.arange(4)}, "index holds 4 rows per batch row but x has n=5"),
    ({"index": torch.tensor([0, 1, 2, 3, 37])}, r"\[0, 37\)"),
    ({"cache": torch.zeros(37, 40)}, r"cache must be \[B, M, N\]"),
    ({"cache": torch.zeros(3, 37, 40)}, "batch size"),
    ({"cache": torch.zeros(2, 37, 41)}, r"weight must be \[N=41, K=72\]"),
    ({"cache": torch.zeros(2, 37, 40, dtype=torch.float16)}, "cache dtype"),
    ({"x": torch.randn(2, 5, 71)}, r"weight must be \[N=40, K=71\]"),
    ({"x": torch.randn(5, 72)}, r"x must be \[B, n, K\]"),
    ({"bias": torch.randn(39)}, r"bias must be \[N=40\]"),
]


@pytest.mark.parametrize("over,match", SCATTER_BAD, ids=[m for _, m in SCATTER_BAD])
def test_linear_scatter_rejects_bad_inputs(over, match):
    with pytest.raises(ValueError, match=match):
        linear_scatter_(**_scatter_args(**over))


def test_check_index():
    check_index(torch.tensor([0, 36, 5]), 37)
    check_index(torch.tensor([[0, 1], [1, 0]], dtype=torch.int32), 2, unique=True)
    check_index(torch.tensor([3, 3]), 37)  # repeats are fine for a gather
    check_index(torch.empty(0, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        check_index(torch.tensor([0, 37]), 37)
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        check_index(torch.tensor([[-1, 2]]), 37)
    with pytest.raises(ValueError, match="repeated"):
        check_index(torch.tensor([[0, 1], [4, 4]]), 37, unique=True)
    with pytest.raises(ValueError, match="int64 or int32"):
        check_index(torch.tensor([0.0]), 37)
    with pytest.raises(ValueError, match=r"shape \[n\] or \[B, n\]"):
        check_index(torch.zeros(1, 1, 1, dtype=torch.int64), 37)


# ----------------------------------------------------------------------------------
# torch.compile / torch.export
# ----------------------------------------------------------------------------------


class _RasBlock(torch.nn.Module):
    """Toy RAS step: Q from the gathered active rows, K written straight into a cache."""

    def __init__(self, M=37, Kd=72, N=40, B=2):
        super().__init__()
        self.q = torch.nn.Linear(Kd, N)
        self.k = torch.nn.Linear(Kd, N)
        self.register_buffer("k_cache", torch.zeros(B, M, N))  # k_cache: [B, M, N]

    def forward(self, x, index):  # x: [B, M, K], index: [n]
        q = gather_linear(x, index, self.q.weight, self.q.bias)  # q: [B, n, N]
        active = K.gather_rows(x, index)  # active: [B, n, K]
        linear_scatter_(self.k_cache, active, index, self.k.weight, self.k.bias)
        return q, self.k_cache * 1.0


def _compile_case(device):
    torch.manual_seed(0)
    eager, compiled = _RasBlock().to(device), _RasBlock().to(device)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(2, 37, 72, device=device)
    index = torch.randperm(37)[:11].to(device)
    return eager, compiled, x, index


@pytest.mark.parametrize("force_reference", [True, False], ids=["reference", "kernel"])
def test_torch_compile_fullgraph_keeps_ops_as_nodes(force_reference, monkeypatch):
    """fullgraph compile through the reference path on CPU, and through the kernel
    (interpreter on CPU, compiled on a GPU) when Triton imports."""
    if not force_reference and not triton_available():
        pytest.skip("triton is not importable")
    if force_reference:
        monkeypatch.setattr(gather_gemm, "use_triton", lambda t: False)
        monkeypatch.setattr(scatter_gemm, "use_triton", lambda t: False)
    torch._dynamo.reset()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    eager, compiled, x, index = _compile_case("cpu" if force_reference else DEVICE)
    with torch.no_grad():
        want_q, want_k = eager(x, index)
        got_q, got_k = torch.compile(compiled, fullgraph=True, backend=recording_backend)(x, index)
    targets = [node.target for gm in graphs for node in gm.graph.nodes]
    assert targets.count(torch.ops.rasfx.gather_linear.default) == 1
    assert targets.count(torch.ops.rasfx.linear_scatter_.default) == 1
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    torch.testing.assert_close(compiled.k_cache, eager.k_cache)


def test_torch_compile_aot_functionalizes_the_cache_mutation(monkeypatch):
    """Through AOTAutograd (functionalisation of the in-place op) the buffer is still updated."""
    monkeypatch.setattr(gather_gemm, "use_triton", lambda t: False)
    monkeypatch.setattr(scatter_gemm, "use_triton", lambda t: False)
    torch._dynamo.reset()
    eager, compiled, x, index = _compile_case("cpu")
    with torch.no_grad():
        want_q, want_k = eager(x, index)
        got_q, got_k = torch.compile(compiled, fullgraph=True, backend="aot_eager")(x, index)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    torch.testing.assert_close(compiled.k_cache, eager.k_cache)
    assert compiled.k_cache.abs().sum() > 0


def test_torch_export_sees_single_nodes():
    eager, _, x, index = _compile_case("cpu")
    ep = torch.export.export(eager, (x, index))
    targets = [node.target for node in ep.graph.nodes]
    assert torch.ops.rasfx.gather_linear.default in targets
    assert torch.ops.rasfx.linear_scatter_.default in targets


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 37, 72)
        w = torch.empty(40, 72)
        y = torch.ops.rasfx.gather_linear(x, torch.empty(3, 9, dtype=torch.int64), w, None)
        assert y.shape == (3, 9, 40) and y.dtype == x.dtype
        cache = torch.empty(3, 37, 40)
        torch.ops.rasfx.linear_scatter_(cache, torch.empty(3, 9, 72), torch.empty(9, dtype=torch.int32), w, None)
        with pytest.raises(ValueError, match="weight must be"):
            torch.ops.rasfx.gather_linear(x, torch.empty(9, dtype=torch.int64), torch.empty(40, 71), None)


# ----------------------------------------------------------------------------------
# GPU: real SD3-medium (1536) and Flux (3072) shapes
# ----------------------------------------------------------------------------------

REAL_M = 4096


@pytest.fixture(autouse=True)
def _fixed_tile_on_gpu(monkeypatch):
    """GPU tests launch one fixed tile: the autotuner times every candidate as a CUDA graph for
    each new shape (seconds per shape). test_gpu_autotuned_launch covers the autotuned path;
    RASFX_TEST_AUTOTUNE=1 runs every test through it."""
    if ON_GPU and os.environ.get("RASFX_TEST_AUTOTUNE") != "1":
        monkeypatch.setenv("RASFX_KERNELS_AUTOTUNE", "0")


@gpu
@requires_cuda
@requires_triton
def test_gpu_autotuned_launch(monkeypatch):
    """The autotuner (candidates timed as CUDA-graph replays) picks a tile that is correct."""
    monkeypatch.setenv("RASFX_KERNELS_AUTOTUNE", "1")
    run_gather_case(2, REAL_M, 1024, 1536, 1536, torch.bfloat16, per_row=False, bias=True, poison_out=True)
    run_scatter_case(2, REAL_M, 1024, 1536, 1536, torch.bfloat16, per_row=True, bias=True)


def test_faster_path_runs_the_faster_path_per_shape_and_remembers(monkeypatch):
    """FasterPath times both paths once per key (only where asked to measure) and keeps the
    choice; RASFX_KERNELS_PATH forces a path; a bad value is an error."""
    from rasfx.kernels._common import FasterPath

    monkeypatch.setenv("RASFX_KERNELS_PATH", "auto")
    ms = {"fused": 2.0, "unfused": 1.0}
    calls = []

    def path(name):
        def run():
            calls.append(name)
            return ms[name]
        return run

    fp = FasterPath(timer=lambda fn: fn())  # the "time" of a path is what it returns
    fused, unfused = path("fused"), path("unfused")
    assert fp.use_fused("a", True, fused, unfused) is False
    assert fp.timings["a"] == (2.0, 1.0)
    seen = len(calls)
    assert fp.use_fused("a", True, fused, unfused) is False and len(calls) == seen  # remembered
    ms["fused"] = 0.5
    assert fp.use_fused("b", True, fused, unfused) is True  # another shape, the kernel wins
    assert fp.use_fused("c", False, fused, unfused) is True and "c" not in fp.choices  # not measured
    monkeypatch.setenv("RASFX_KERNELS_PATH", "unfused")
    assert fp.use_fused("b", True, fused, unfused) is False
    monkeypatch.setenv("RASFX_KERNELS_PATH", "fused")
    assert fp.use_fused("a", True, fused, unfused) is True
    monkeypatch.setenv("RASFX_KERNELS_PATH", "sometimes")
    with pytest.raises(ValueError, match="RASFX_KERNELS_PATH"):
        fp.use_fused("a", True, fused, unfused)


@gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("op", ["gather", "scatter"])
def test_gpu_ops_take_the_faster_path_per_shape(op, monkeypatch):
    """With RASFX_KERNELS_PATH=auto the op times the kernel and the unfused path at its first
    call per shape (CUDA-graph replays), remembers the faster, and gives the reference's result."""
    monkeypatch.setenv("RASFX_KERNELS_PATH", "auto")
    table = gather_gemm.GATHER_PATH if op == "gather" else scatter_gemm.SCATTER_PATH
    table.choices.clear()
    table.timings.clear()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, REAL_M, 1536, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(1536, 1536, device="cuda", dtype=torch.bfloat16, generator=g) / 40
    idx = torch.randperm(REAL_M, device="cuda", generator=g)[:512]
    if op == "gather":
        got, want = gather_linear(x, idx, w), gather_linear_reference(x, idx, w)
    else:
        got, want = x.clone(), x.clone()
        linear_scatter_(got, x[:, :512], idx, w)
        linear_scatter_reference_(want, x[:, :512], idx, w)
    (key, (fused_ms, unfused_ms)), = table.timings.items()
    assert table.choices[key] == (fused_ms <= unfused_ms) and fused_ms > 0 and unfused_ms > 0
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


@gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("hidden", [1536, 3072])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.125])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_gpu_gather_linear_real_shapes(hidden, ratio, per_row):
    n = int(REAL_M * ratio)
    run_gather_case(2, REAL_M, n, hidden, hidden, torch.bfloat16, per_row=per_row, bias=True, poison_out=True)


@gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("hidden", [1536, 3072])
@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.125])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_gpu_linear_scatter_real_shapes(hidden, ratio, per_row):
    run_scatter_case(2, REAL_M, int(REAL_M * ratio), hidden, hidden, torch.bfloat16, per_row=per_row, bias=True)


@gpu
@requires_cuda
@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gpu_other_dtypes_real_shape(dtype, monkeypatch):
    """fp16, and fp32 with PyTorch's default exact-fp32 matmul (input_precision="ieee")."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    run_gather_case(1, REAL_M, 1000, 1536, 1536, dtype, per_row=False, bias=True, poison_out=True)
    run_scatter_case(1, REAL_M, 1000, 1536, 1536, dtype, per_row=True, bias=True)


@gpu
@requires_cuda
@requires_triton
def test_gpu_torch_compile_inductor():
    """Inductor on CUDA compiles a module that calls both ops and matches eager."""
    torch._dynamo.reset()
    eager, compiled, x, index = _compile_case("cuda")
    with torch.no_grad():
        want_q, want_k = eager(x, index)
        got_q, got_k = torch.compile(compiled, fullgraph=True)(x, index)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    torch.testing.assert_close(compiled.k_cache, eager.k_cache)

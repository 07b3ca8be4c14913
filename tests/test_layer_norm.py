"""fastlm.layer_norm on every backend against the float64 oracle (the tolerance rule in
conftest.py), on awkward shapes and inputs; limits, determinism, NaN/inf, opcheck, double
backward, autocast and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlm
from conftest import (DTYPE_PAIRS, DTYPES, FAST_PAIRS, GPU, KERNEL_PAIRS, PAIRS,
                      compare_with_oracle, interpreted, make_params, opcheck_pair, randn)
from fastlm.backends import BackendUnavailable
from fastlm.ops.layer_norm import MAX_N, reference, triton_ops_ready

AFFINE = {"weight+bias": (True, True), "weight": (True, False), "bias": (False, True),
          "none": (False, False)}


def _dtype_id(pair):
    x, p = pair
    return f"{str(x)[6:]}-p{str(p)[6:]}"


# (input dtype, parameter dtype, affine): the parameter dtype only varies with parameters.
DTYPE_AFFINE = [(x, p, a) for x, p in DTYPE_PAIRS for a in AFFINE if a != "none" or x == p]


# ---------------------------------------------------------------------------------------------
# Every dtype, parameter dtype and affine combination.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype,pdtype,affine", DTYPE_AFFINE,
                         ids=[f"{_dtype_id((x, p))}-{a}" for x, p, a in DTYPE_AFFINE])
def test_forward_backward_dtypes(backend, device, dtype, pdtype, affine):
    has_w, has_b = AFFINE[affine]
    x = randn((3, 5, 97), dtype, device, shift=0.5)
    w, b = make_params((97,), pdtype, device, has_w, has_b)
    compare_with_oracle(backend, x, (97,), w, b)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1e-5, 1e-2, 0.0])
def test_eps(backend, device, dtype, eps):
    x = randn((4, 64), dtype, device, scale=0.01)
    w, b = make_params((64,), dtype, device)
    compare_with_oracle(backend, x, 64, w, b, eps=eps)


def _offset_rows(m, n, shift, step, dtype, device, seed=0):
    """Rows shift + z with z a zero-sum multiple of `step`: every value and every partial sum is
    exact, so the mean is exactly `shift` in any summation order and only the variance can go
    wrong."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(-8, 9, (m, n // 2), generator=g).double() * step
    z = torch.cat([half, -half], dim=1)
    z = z[:, torch.randperm(n, generator=g)]
    return (shift + z).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype,shift,step", [(torch.float32, 1000.0, 1 / 16),
                                              (torch.float16, 100.0, 0.5),
                                              (torch.bfloat16, 100.0, 0.5)],
                         ids=["float32", "float16", "bfloat16"])
def test_large_mean_small_variance(backend, device, dtype, shift, step):
    """Rows far from zero: a one-pass variance (E[x^2] - E[x]^2) would cancel away."""
    x = _offset_rows(6, 80, shift, step, dtype, device)
    assert torch.equal(x.double().mean(-1), torch.full((6,), shift, dtype=torch.float64))
    w, b = make_params((80,), dtype, device)
    compare_with_oracle(backend, x, 80, w, b)


# ---------------------------------------------------------------------------------------------
# Awkward shapes: (input shape, normalized_shape).
SHAPES = [
    ((1, 1), (1,)),  # M = 1, N = 1: the output is the bias
    ((1, 7), (7,)),
    ((13, 13), (13,)),
    ((3, 100), (100,)),
    ((2, 3, 97), (97,)),
    ((2, 1, 3, 10), (10,)),
    ((3, 5, 6), (5, 6)),
    ((2, 4, 5, 3), (4, 5, 3)),
    ((5, 6), (5, 6)),  # one row, every dim normalized
    ((2, 4099), (4099,)),
    ((0, 8), (8,)),  # M = 0
    ((2, 0, 8), (8,)),  # a 0-size leading dim
    ((3, 0, 1, 5), (1, 5)),  # empty, two normalized dims
]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", SHAPES, ids=[f"{s}-{n}" for s, n in SHAPES])
def test_shapes(backend, device, dtype, shape, ns):
    x = randn(shape, dtype, device, shift=1.0)
    w, b = make_params(ns, dtype, device)
    y = compare_with_oracle(backend, x, ns, w, b)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend,device", FAST_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_long_rows(backend, device, dtype):
    """N = 20000: past the Triton kernels' single-block limit (the chunked path)."""
    x = randn((3, 20000), dtype, device)
    w, b = make_params((20000,), dtype, device)
    compare_with_oracle(backend, x, 20000, w, b)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_rows_triton_interpreter(dtype):
    """The Triton chunked path (N > 16384) through the interpreter: one row."""
    if GPU:
        pytest.skip("covered natively by test_long_rows on the GPU")
    x = randn((1, 16411), dtype, "cpu")
    w, b = make_params((16411,), dtype, "cpu")
    compare_with_oracle("triton", x, 16411, w, b)


@pytest.mark.parametrize("backend,device", FAST_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_of_65536(backend, device, dtype):
    x = randn((2, 65536), dtype, device, shift=3.0)
    w, b = make_params((65536,), dtype, device)
    compare_with_oracle(backend, x, 65536, w, b)


@pytest.mark.parametrize("backend,device", FAST_PAIRS)
def test_rows_at_the_limit(backend, device):
    x = randn((1, MAX_N), torch.float32, device)
    w, b = make_params((MAX_N,), torch.float32, device)
    compare_with_oracle(backend, x, MAX_N, w, b)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_rows_beyond_the_limit_run_as_torch(backend, device):
    # Longer rows than the kernels take (issue 14, case 7) run on torch's layer_norm, or on
    # the reference with float32 parameters on 16-bit input: torch's result, no error.
    x = randn((2, MAX_N + 1), torch.float32, device)
    w, b = make_params((MAX_N + 1,), torch.float32, device)
    compare_with_oracle(backend, x, MAX_N + 1, w, b)
    x = randn((1, 1024, 1025), torch.bfloat16, device)
    w, b = make_params((1024, 1025), torch.float32, device)
    compare_with_oracle(backend, x, (1024, 1025), w, b)


def test_raw_op_rejects_rows_beyond_the_limit():
    with pytest.raises(RuntimeError, match="at most 1048576"):
        torch.ops.fastlm.layer_norm_fwd(torch.zeros((1, MAX_N + 1)), None, None, 1e-5)


def test_torch_backend_has_no_row_limit():
    x = randn((1, MAX_N + 1), torch.float32, "cpu")
    compare_with_oracle("torch", x, MAX_N + 1)


# ---------------------------------------------------------------------------------------------
# Non-contiguous and broadcast inputs: the op sees view(leaf); dx is the leaf's gradient.
VIEWS = {
    "transposed": ((12, 6), lambda t: t.t(), (12,)),
    "sliced-cols": ((4, 40), lambda t: t[:, 1::2], (20,)),
    "sliced-rows": ((9, 16), lambda t: t[::3], (16,)),
    "permuted-3d": ((5, 3, 4), lambda t: t.permute(1, 2, 0), (4, 5)),
    "expanded-rows": ((1, 24), lambda t: t.expand(6, 24), (24,)),
    "expanded-3d": ((3, 1, 10), lambda t: t.expand(3, 4, 10), (10,)),
}


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", list(VIEWS), ids=list(VIEWS))
def test_non_contiguous_and_broadcast_input(backend, device, dtype, view):
    shape, fn, ns = VIEWS[view]
    x = randn(shape, dtype, device, shift=0.5)
    assert not fn(x).is_contiguous()
    w, b = make_params(ns, dtype, device)
    compare_with_oracle(backend, x, ns, w, b, view=fn)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_non_contiguous_parameters(backend, device):
    x = randn((4, 16), torch.float32, device)
    wb = randn((16, 2), torch.float32, device, seed=6)
    weight, bias = wb[:, 0], wb[:, 1]
    assert not weight.is_contiguous() and not bias.is_contiguous()
    compare_with_oracle(backend, x, 16, weight, bias)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_broadcast_parameters(backend, device):
    """weight and bias as stride-0 expansions of a scalar."""
    x = randn((5, 33), torch.float32, device)
    weight = torch.full((1,), 1.5, device=device).expand(33)
    bias = torch.full((1,), -0.25, device=device).expand(33)
    compare_with_oracle(backend, x, 33, weight, bias)


# ---------------------------------------------------------------------------------------------
# Gradients only for the inputs that need them.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("needs", ["x", "weight", "bias", "weight+bias", "x+bias"])
def test_grads_only_where_needed(backend, device, needs):
    x = randn((6, 24), torch.float32, device).requires_grad_("x" in needs)
    w, b = make_params((24,), torch.float32, device)
    w.requires_grad_("weight" in needs)
    b.requires_grad_("bias" in needs)
    leaves = [t for t in (x, w, b) if t.requires_grad]
    dy = randn((6, 24), torch.float32, device, seed=7)
    with fastlm.use_backend(backend):
        y = fastlm.layer_norm(x, 24, w, b)
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(F.layer_norm(x, (24,), w, b), leaves, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert x.grad is None and w.grad is None and b.grad is None


@pytest.mark.parametrize("backend,device", PAIRS)
def test_no_grad_and_backward_into_grad_attr(backend, device):
    x = randn((3, 11), torch.float32, device).requires_grad_()
    w, b = make_params((11,), torch.float32, device)
    w.requires_grad_()
    with fastlm.use_backend(backend), torch.no_grad():
        y = fastlm.layer_norm(x, 11, w, b)
    assert not y.requires_grad
    torch.testing.assert_close(y, F.layer_norm(x.detach(), (11,), w.detach(), b))
    dy = randn((3, 11), torch.float32, device, seed=8)
    with fastlm.use_backend(backend):
        fastlm.layer_norm(x, 11, w, b).backward(dy)
    dx, dw = torch.autograd.grad(F.layer_norm(x, (11,), w, b), (x, w), dy)
    torch.testing.assert_close(x.grad, dx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, dw, atol=1e-5, rtol=1e-5)
    assert b.grad is None


# ---------------------------------------------------------------------------------------------
# Hypothesis: shapes for the cpu backend.
# Rows of one element are left to test_cpu_single_element_rows (a known cpu-kernel finding).
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    lead=st.lists(st.integers(0, 5), max_size=3),
    norm=st.lists(st.integers(1, 40), min_size=1, max_size=2).filter(lambda s: math.prod(s) > 1),
    dtypes=st.sampled_from(DTYPE_PAIRS),
    affine=st.sampled_from(list(AFFINE)),
    seed=st.integers(0, 2**16),
)
def test_fuzz_shapes_cpu(lead, norm, dtypes, affine, seed):
    dtype, pdtype = dtypes
    has_w, has_b = AFFINE[affine]
    shape = tuple(lead) + tuple(norm)
    x = randn(shape, dtype, "cpu", seed=seed, shift=seed % 7)
    w, b = make_params(tuple(norm), pdtype, "cpu", has_w, has_b, seed=seed + 1)
    compare_with_oracle("cpu", x, tuple(norm), w, b, seed=seed + 2)


def test_cpu_single_element_rows():
    x = randn((3, 1), torch.float32, "cpu", seed=7)
    w, b = make_params((1,), torch.float32, "cpu", seed=8)
    compare_with_oracle("cpu", x, 1, w, b, seed=9)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_single_element_rows_dx_is_zero_without_weight(backend, device):
    x = randn((5, 1), torch.float32, device, seed=7).requires_grad_()
    with fastlm.use_backend(backend):
        y = fastlm.layer_norm(x, 1)
    dx, = torch.autograd.grad(y, x, randn((5, 1), torch.float32, device, seed=9))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(dx, torch.zeros_like(dx))


# ---------------------------------------------------------------------------------------------
# Determinism: dweight and dbias are bit-reproducible.
def _param_grads(backend, x, w, b, dy):
    xl, wl, bl = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with fastlm.use_backend(backend):
        y = fastlm.layer_norm(xl, x.shape[-1], wl, bl)
    return torch.autograd.grad(y, (xl, wl, bl), dy)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_param_grads(backend, device, dtype):
    m, n = (24, 40) if interpreted(backend, device) else (4096, 512)
    if device == "cuda":
        m, n = 32768, 1024
    x = randn((m, n), dtype, device, shift=2.0)
    w, b = make_params((n,), dtype, device)
    dy = randn((m, n), dtype, device, seed=9)
    first = _param_grads(backend, x, w, b, dy)
    second = _param_grads(backend, x, w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_param_grads_independent_of_thread_count(dtype):
    x = randn((3000, 300), dtype, "cpu", shift=1.0)
    w, b = make_params((300,), dtype, "cpu")
    dy = randn((3000, 300), dtype, "cpu", seed=9)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3, 8):
            torch.set_num_threads(t)
            results.append(_param_grads("cpu", x, w, b, dy))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# NaN and inf propagate as in torch.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_propagate_like_torch(backend, device, dtype):
    x = randn((6, 13), dtype, device)
    x[0, 3] = float("nan")
    x[1, 2] = float("inf")
    x[2, 5] = float("-inf")
    x[3, :] = float("inf")
    w, b = make_params((13,), dtype, device)
    w[4] = float("nan")
    b[7] = float("inf")
    dy = randn((6, 13), dtype, device, seed=4)
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    want = F.layer_norm(xl, (13,), wl, bl)
    want_dx, = torch.autograd.grad(want, xl, dy)
    with fastlm.use_backend(backend):
        got = fastlm.layer_norm(xl, (13,), wl, bl)
    got_dx, = torch.autograd.grad(got, xl, dy)
    for name, g, r in (("y", got, want), ("dx", got_dx, want_dx)):
        assert torch.equal(g.isnan(), r.isnan()), f"{name}: NaN pattern differs from torch's"
        assert torch.equal(g.isinf(), r.isinf()), f"{name}: inf pattern differs from torch's"
        finite = r.isfinite()
        assert torch.equal(g[finite].isfinite(), finite[finite])


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck on every op's sample inputs.
def _fwd_samples(device):
    out = []
    for dtype, pdtype in DTYPE_PAIRS:
        for has_w, has_b in ((True, True), (True, False), (False, True), (False, False)):
            for rg in (False, True):
                x = randn((5, 13), dtype, device).requires_grad_(rg)
                w, b = make_params((13,), pdtype, device, has_w, has_b)
                if w is not None:
                    w.requires_grad_(rg)
                out.append((x, w, b, 1e-5))
    out.append((randn((0, 8), torch.float32, device), None, None, 1e-5))
    return out


def _bwd_samples(device, fwd):
    out = []
    for x, w, b, eps in _fwd_samples(device):
        if x.requires_grad:
            continue
        y, mean, rstd = fwd(x, w, b, eps)
        dy = randn(y.shape, y.dtype, device, seed=2)
        out.append((dy, x, mean, rstd, w, b, w is not None, b is not None))
        out.append((dy, x, mean, rstd, w, b, False, False))
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_cpp_ops(device):
    opcheck_pair(torch.ops.fastlm.layer_norm_fwd, torch.ops.fastlm.layer_norm_bwd, device,
                 _fwd_samples, _bwd_samples)


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_triton_ops(device):
    assert triton_ops_ready()
    opcheck_pair(torch.ops.fastlm.layer_norm_fwd_triton, torch.ops.fastlm.layer_norm_bwd_triton,
                 device, _fwd_samples, _bwd_samples, every=3, triton=True)


@pytest.mark.triton
@pytest.mark.skipif(GPU, reason="the interpreter runs only where no GPU is")
@pytest.mark.xfail(strict=True, reason="Triton-interpreter limitation: wrap_triton returns the "
                   "interpreted kernel, which then runs on FakeTensors")
@pytest.mark.parametrize("check", ["test_faketensor", "test_aot_dispatch_dynamic"])
def test_opcheck_triton_ops_fake_under_interpreter(check):
    assert triton_ops_ready()
    x = randn((5, 13), torch.float32, "cpu")
    w, b = make_params((13,), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastlm.layer_norm_fwd_triton.default, (x, w, b, 1e-5),
                          test_utils=(check,))


# ---------------------------------------------------------------------------------------------
# Double backward is refused with a clear error.
@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_double_backward_raises(backend, device):
    x = randn((4, 16), torch.float32, device).requires_grad_()
    w, b = make_params((16,), torch.float32, device)
    w.requires_grad_()
    with fastlm.use_backend(backend):
        y = fastlm.layer_norm(x, 16, w, b)
    dx, dw = torch.autograd.grad(y, (x, w), torch.randn_like(y), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((dx.square().sum() + dw.sum()), (x, w))


def test_double_backward_on_torch_backend_matches_torch():
    x = randn((4, 16), torch.float64, "cpu").requires_grad_()
    dy = randn((4, 16), torch.float64, "cpu", seed=3)
    with fastlm.use_backend("torch"):
        dx, = torch.autograd.grad(fastlm.layer_norm(x, 16), x, dy, create_graph=True)
    ddx, = torch.autograd.grad(dx.square().sum(), x)
    dx_t, = torch.autograd.grad(F.layer_norm(x, (16,)), x, dy, create_graph=True)
    ddx_t, = torch.autograd.grad(dx_t.square().sum(), x)
    torch.testing.assert_close(ddx, ddx_t)


# ---------------------------------------------------------------------------------------------
# Autocast: the output dtype is torch's.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_output_dtype(backend, device, in_dtype):
    amp = torch.bfloat16 if device == "cpu" else torch.float16
    lin = torch.nn.Linear(16, 16, device=device)
    x = randn((4, 16), in_dtype, device)
    w, b = make_params((16,), torch.float32, device)
    with torch.autocast(device, dtype=amp):
        h = lin(x.float()) if in_dtype == torch.float32 else x
        want = F.layer_norm(h, (16,), w, b)
        with fastlm.use_backend(backend):
            got = fastlm.layer_norm(h, (16,), w, b)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# float64 runs on the torch reference.
def test_float64_runs_reference_automatically():
    x = randn((3, 9), torch.float64, "cpu")
    w, b = make_params((9,), torch.float64, "cpu")
    assert fastlm.backends.forced() is None
    y = fastlm.layer_norm(x, 9, w, b)
    assert y.dtype == torch.float64
    assert torch.equal(y, reference(x, (9,), w, b))
    torch.testing.assert_close(y, F.layer_norm(x, (9,), w, b))


# ---------------------------------------------------------------------------------------------
# Bad input: error type and message.
def _x():
    return torch.randn(4, 8)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_bad_weight_shape(backend, device):
    x = torch.randn(4, 8, device=device)
    # torch's words (and a RuntimeError, as torch's, besides a ValueError)
    for cls in (ValueError, RuntimeError):
        with fastlm.use_backend(backend), pytest.raises(
                cls, match=r"Expected weight to be of same shape as normalized_shape, but got "
                r"weight of shape \[7\] and normalized_shape = \[8\]"):
            fastlm.layer_norm(x, (8,), torch.ones(7, device=device))
        with fastlm.use_backend(backend), pytest.raises(
                cls, match=r"Expected bias to be of same shape as normalized_shape, but got "
                r"bias of shape \[8, 1\] and normalized_shape = \[8\]"):
            fastlm.layer_norm(x, 8, None, torch.ones(8, 1, device=device))


@pytest.mark.parametrize("ns,shape", [((7,), (4, 8)), ((4, 5), (3,)), ((2, 8), (4, 8))])
def test_normalized_shape_mismatch(ns, shape):
    # torch's message, word for word, after "fastlm.layer_norm: "
    x = torch.randn(shape)
    with pytest.raises(RuntimeError) as torch_err:
        torch.nn.functional.layer_norm(x, ns)
    for cls in (ValueError, RuntimeError):
        with pytest.raises(cls) as err:
            fastlm.layer_norm(x, ns)
        assert str(err.value) == "fastlm.layer_norm: " + str(torch_err.value).splitlines()[0]


def test_empty_normalized_shape():
    for cls in (ValueError, RuntimeError):
        with pytest.raises(cls, match="Expected normalized_shape to be at least 1-dimensional"):
            fastlm.layer_norm(_x(), ())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=str)
def test_integer_input(dtype):
    # torch raises NotImplementedError (a RuntimeError); fastlm's error is also a TypeError
    for cls in (TypeError, NotImplementedError, RuntimeError):
        with pytest.raises(cls, match="input must be a floating-point tensor"):
            fastlm.layer_norm(torch.ones(4, 8, dtype=dtype), (8,))


def test_non_tensor_input():
    with pytest.raises(TypeError, match=r"argument 'input' \(position 1\) must be Tensor, not "
                       "list"):
        fastlm.layer_norm([[1.0, 2.0]], (2,))


def test_weight_on_another_device():
    for cls in (ValueError, RuntimeError):
        with pytest.raises(cls, match="weight is on meta but input is on cpu"):
            fastlm.layer_norm(_x(), (8,), torch.ones(8, device="meta"))
        with pytest.raises(cls, match="bias is on meta but input is on cpu"):
            fastlm.layer_norm(_x(), (8,), None, torch.ones(8, device="meta"))


@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.float32, torch.float64),
                                             (torch.float16, torch.bfloat16),
                                             (torch.bfloat16, torch.float16)], ids=str)
def test_parameter_dtype_neither_input_nor_float32(x_dtype, p_dtype):
    x = torch.randn(4, 8, dtype=x_dtype)
    for cls in (TypeError, RuntimeError):  # torch: RuntimeError
        with pytest.raises(cls, match=r"weight must have the input's dtype .* or float32, got"):
            fastlm.layer_norm(x, (8,), torch.ones(8, dtype=p_dtype))
        with pytest.raises(cls, match=r"bias must have the input's dtype .* or float32, got"):
            fastlm.layer_norm(x, (8,), None, torch.ones(8, dtype=p_dtype))


def test_weight_and_bias_dtypes_differ():
    for cls in (TypeError, RuntimeError):  # torch: RuntimeError
        with pytest.raises(cls, match="weight and bias must have the same dtype"):
            fastlm.layer_norm(_x().half(), (8,), torch.ones(8), torch.zeros(8).half())


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"use_backend: unknown fastlm backend 'tpu'; "
                       r"expected one of \('cuda', 'triton', 'cpu', 'torch'\)"):
        with fastlm.use_backend("tpu"):
            pass
    assert fastlm.backends.forced() is None


@pytest.mark.skipif(GPU, reason="the cuda backend is available here")
def test_forcing_cuda_backend_without_gpu():
    with fastlm.use_backend("cuda"), pytest.raises(
            BackendUnavailable, match="'cuda' is not available for cpu tensors: the cuda backend "
                                      "runs on CUDA tensors only"):
        fastlm.layer_norm(_x(), (8,))


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_forcing_kernel_backend_with_float64(backend, device):
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    with fastlm.use_backend(backend), pytest.raises(
            TypeError, match=f"backend '{backend}' supports float32, float16, bfloat16, got "
                             "torch.float64; use the 'torch' backend for it"):
        fastlm.layer_norm(x, (8,))


def test_raw_cpp_op_rejects_3d_input():
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        torch.ops.fastlm.layer_norm_fwd(torch.randn(2, 3, 4), None, None, 1e-5)


def test_raw_cpp_op_argument_checks():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="input must be float32, float16 or bfloat16"):
        torch.ops.fastlm.layer_norm_fwd(x.double(), None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be 1-D with 8 elements"):
        torch.ops.fastlm.layer_norm_fwd(x, torch.ones(7), None, 1e-5)
    y, mean, rstd = torch.ops.fastlm.layer_norm_fwd(x, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out must match input"):
        torch.ops.fastlm.layer_norm_bwd(y[:2], x, mean, rstd, None, None, False, False)
    with pytest.raises(RuntimeError, match=r"the saved statistics \(mean, rstd\) must be float32 of shape"):
        torch.ops.fastlm.layer_norm_bwd(y, x, mean[:3], rstd, None, None, False, False)
    with pytest.raises(RuntimeError, match="weight_grad=True needs a weight"):
        torch.ops.fastlm.layer_norm_bwd(y, x, mean, rstd, None, None, True, False)


@pytest.mark.triton
@pytest.mark.skipif(GPU, reason="the interpreter runs only where no GPU is")
def test_raw_triton_op_rejects_3d_input():
    assert triton_ops_ready()
    with pytest.raises(RuntimeError, match="input must be 2-D"):
        torch.ops.fastlm.layer_norm_fwd_triton(torch.randn(2, 3, 4), None, None, 1e-5)


def test_bad_fastlm_backend_env(monkeypatch, restore_env):
    monkeypatch.setenv("FASTLM_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"FASTLM_BACKEND: unknown fastlm backend 'gpu'"):
        fastlm.backends.reload_env()
    monkeypatch.delenv("FASTLM_BACKEND")
    fastlm.backends.reload_env()
    assert fastlm.backends.forced() is None


# ---------------------------------------------------------------------------------------------
# CUDA: the same checks at moderate sizes (and the oracle on the GPU).
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(4096, 8192), (8, 4099), (2048, 1000), (3, 65536)], ids=str)
def test_cuda_moderate_shapes(backend, dtypes, shape):
    dtype, pdtype = dtypes
    x = randn(shape, dtype, "cuda", shift=1.0)
    w, b = make_params(shape[-1:], pdtype, "cuda")
    compare_with_oracle(backend, x, shape[-1], w, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
def test_cuda_uses_current_stream(backend):
    x = randn((64, 1024), torch.bfloat16, "cuda").requires_grad_()
    w, b = make_params((1024,), torch.bfloat16, "cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), fastlm.use_backend(backend):
        y = fastlm.layer_norm(x, 1024, w, b)
        y.float().sum().backward()
    s.synchronize()
    torch.testing.assert_close(y, F.layer_norm(x.detach(), (1024,), w, b), atol=2e-2, rtol=2e-2)
    assert math.isfinite(x.grad.float().sum().item())

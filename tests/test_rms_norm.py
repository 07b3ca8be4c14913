"""fastlm.rms_norm and fastlm.add_rms_norm on every backend against the float64 oracle (the
tolerance rule in conftest.py: against F.rms_norm and the eager add in the input's dtype), on
awkward shapes; dropout bits as add_layer_norm's; determinism, opcheck, torch.compile, the
fastlm.nn.RMSNorm module and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (DTYPE_PAIRS, DTYPES, FLOOR, GPU, KERNEL_PAIRS, PAIRS, assert_close_2x,
                      assert_close_2x_interpreter, interpreted, make_params, opcheck_pair,
                      param_floor, randn)

import fastlm
from fastlm.ops.add_layer_norm import dropout_keep
from fastlm.ops.attention import _new_rng, dropout_scale
from fastlm.ops.rms_norm import add_reference, reference, triton_ops_ready


def _leaves(ts, dtype=None):
    return [None if t is None else (t.detach().clone() if dtype is None else t.detach().to(dtype))
            .requires_grad_() for t in ts]


def _grads(fn, leaves, grads_out):
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, grads_out) if g is not None]
    wanted = [t for t in leaves if t is not None]
    it = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs]))
    return [o.detach() for o in outs], [None if t is None else next(it) for t in leaves]


def _rng(seed, device):
    torch.manual_seed(seed)
    return _new_rng(torch.device(device))


def _eager_add(x, r, ns, w, eps, p, rng):
    """torch's eager composition in x's dtype (fastlm's keep mask): the add, then F.rms_norm."""
    d = x
    if p > 0.0:
        rows = x.numel() // max(math.prod(ns), 1)
        keep = dropout_keep(rng, rows, math.prod(ns), p).view(x.shape)
        d = (x.float() * keep.float() * dropout_scale(p)).to(x.dtype)
    s = r + d
    return F.rms_norm(s, ns, w, eps), s


def compare(backend, x, ns, w=None, eps=None, r=None, p=0.0, grad_summed=True, seed=5):
    """rms_norm (r None) or add_rms_norm on `backend`, forward and backward, against the
    float64 reference with the tolerance rule against torch in x's dtype."""
    check = assert_close_2x_interpreter if interpreted(backend, x.device.type) else assert_close_2x
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    e64 = torch.finfo(x.dtype).eps if eps is None else eps  # the oracle's eps: x's dtype's
    dy = randn(x.shape, x.dtype, x.device, seed=11)
    if r is None:
        def fast(x_, w_):
            with fastlm.use_backend(backend):
                return fastlm.rms_norm(x_, ns, w_, eps)

        leaves = (x, w)
        outs, gs = _grads(fast, _leaves(leaves), (dy,))
        outs_t, gs_t = _grads(lambda x_, w_: F.rms_norm(x_, ns, w_, eps), _leaves(leaves), (dy,))
        outs_o, gs_o = _grads(lambda x_, w_: reference(x_, ns, w_, e64),
                              _leaves(leaves, torch.float64), (dy,))
        names = ("dx", "dweight")
        out_names = ("y",)
    else:
        ds = randn(x.shape, x.dtype, x.device, seed=12) if grad_summed else None
        rng = _rng(seed, x.device)

        def fast(x_, r_, w_):
            torch.manual_seed(seed)
            with fastlm.use_backend(backend):
                return fastlm.add_rms_norm(x_, r_, ns, w_, eps, p)

        leaves = (x, r, w)
        outs, gs = _grads(fast, _leaves(leaves), (dy, ds))
        outs_t, gs_t = _grads(lambda *a: _eager_add(*a[:2], ns, a[2], eps, p, rng),
                              _leaves(leaves), (dy, ds))
        outs_o, gs_o = _grads(lambda *a: add_reference(*a[:2], ns, a[2], e64, p, rng),
                              _leaves(leaves, torch.float64), (dy, ds))
        names = ("dinput", "dresidual", "dweight")
        out_names = ("out", "summed")
    for name, a, t, o in zip(out_names, outs, outs_t, outs_o):
        check(a, o, t, FLOOR[t.dtype], name)
    rows = x.numel() // max(math.prod(ns), 1)
    for name, a, t, o in zip(names, gs, gs_t, gs_o):
        if t is None:
            assert a is None, name
            continue
        floor = param_floor(t.dtype, rows) if name == "dweight" else FLOOR[t.dtype]
        check(a, o, t, floor, name)
    return outs


def _dtype_id(pair):
    return f"{str(pair[0])[6:]}-p{str(pair[1])[6:]}"


# ---------------------------------------------------------------------------------------------
# rms_norm: dtypes, weights, eps, shapes, long rows.
@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype,pdtype", DTYPE_PAIRS, ids=[_dtype_id(p) for p in DTYPE_PAIRS])
@pytest.mark.parametrize("has_w", [True, False], ids=["weight", "none"])
def test_forward_backward_dtypes(backend, device, dtype, pdtype, has_w):
    if pdtype != dtype and not has_w:
        pytest.skip("no weight: the parameter dtype does not apply")
    x = randn((3, 5, 97), dtype, device, shift=0.5)
    w, _ = make_params((97,), pdtype, device, has_w, False)
    compare(backend, x, 97, w)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("eps", [None, 1e-6, 1e-2, 0.0])
def test_eps(backend, device, eps):
    x = randn((4, 64), torch.float32, device, scale=0.01)
    w, _ = make_params((64,), torch.float32, device, True, False)
    compare(backend, x, 64, w, eps)


SHAPES = [((1, 1), (1,)), ((1, 7), (7,)), ((13, 13), (13,)), ((2, 3, 97), (97,)),
          ((3, 5, 6), (5, 6)), ((2, 4099), (4099,)), ((0, 8), (8,)), ((2, 0, 8), (8,))]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,ns", SHAPES, ids=[f"{s}-{n}" for s, n in SHAPES])
def test_shapes(backend, device, dtype, shape, ns):
    x = randn(shape, dtype, device, shift=1.0)
    w, _ = make_params(ns, dtype, device, True, False)
    (y,) = compare(backend, x, ns, w)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_long_rows_chunked_path(backend, device):
    """N = 16411: past the Triton single-block limit (the chunked path)."""
    x = randn((1 if interpreted(backend, device) else 3, 16411), torch.float32, device)
    w, _ = make_params((16411,), torch.float32, device, True, False)
    compare(backend, x, 16411, w)
    r = randn(x.shape, torch.float32, device, seed=4)
    compare(backend, x, 16411, w, r=r, p=0.2)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_non_contiguous(backend, device):
    x = randn((24, 6), torch.float32, device).t()
    w, _ = make_params((24,), torch.float32, device, True, False)
    assert not x.is_contiguous()
    compare(backend, x, 24, w)


# ---------------------------------------------------------------------------------------------
# add_rms_norm.
ADD_CASES = [(True, 0.0, True), (True, 0.3, True), (False, 0.3, False), (True, 0.0, False)]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype,pdtype", DTYPE_PAIRS, ids=[_dtype_id(p) for p in DTYPE_PAIRS])
@pytest.mark.parametrize("has_w,p,gs", ADD_CASES,
                         ids=[f"w{int(w)}-p{p}-gs{int(g)}" for w, p, g in ADD_CASES])
def test_add_forward_backward(backend, device, dtype, pdtype, has_w, p, gs):
    if pdtype != dtype and not has_w:
        pytest.skip("no weight: the parameter dtype does not apply")
    x = randn((3, 5, 97), dtype, device, shift=0.5)
    r = randn((3, 5, 97), dtype, device, seed=4, scale=2.0)
    w, _ = make_params((97,), pdtype, device, has_w, False)
    compare(backend, x, 97, w, r=r, p=p, grad_summed=gs)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("shape,ns", SHAPES[:6], ids=[f"{s}-{n}" for s, n in SHAPES[:6]])
def test_add_shapes(backend, device, shape, ns):
    x = randn(shape, torch.float32, device)
    r = randn(shape, torch.float32, device, seed=4, shift=1.0)
    w, _ = make_params(ns, torch.float32, device, True, False)
    compare(backend, x, ns, w, r=r, p=0.25)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_p0_equals_rms_norm_of_the_sum(backend, device, dtype):
    x = randn((5, 77), dtype, device)
    r = randn((5, 77), dtype, device, seed=4, shift=1.0)
    w, _ = make_params((77,), dtype, device, True, False)
    with fastlm.use_backend(backend):
        out, s = fastlm.add_rms_norm(x, r, 77, w)
        from_s = fastlm.rms_norm(s, 77, w)
    assert torch.equal(out, from_s)  # normalized from the rounded sum it returns
    if interpreted(backend, device) and dtype == torch.bfloat16:
        torch.testing.assert_close(s, r + x, atol=0, rtol=2 ** -7)
        pytest.xfail("Triton interpreter rounds float32->bfloat16 by truncation")
    assert torch.equal(s, r + x)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_add_dropout_bits_as_add_layer_norm(backend, device):
    """The same elements dropped as fastlm.add_layer_norm's (one contract, docs/layer_norm.md)."""
    x = randn((6, 45), torch.float32, device, seed=2)
    r = torch.zeros((6, 45), device=device)
    torch.manual_seed(17)
    with fastlm.use_backend(backend):
        _, s = fastlm.add_rms_norm(x, r, 45, dropout_p=0.5)
    torch.manual_seed(17)
    with fastlm.use_backend(backend):
        _, s_ln = fastlm.add_layer_norm(x, r, 45, dropout_p=0.5)
    assert torch.equal(s, s_ln)
    assert 0 < int((s == 0).sum()) < s.numel()


# ---------------------------------------------------------------------------------------------
# Determinism, opcheck, torch.compile, double backward.
@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_deterministic_weight_grad(backend, device):
    m, n = (24, 40) if interpreted(backend, device) else (2048, 256)
    x = randn((m, n), torch.float32, device)
    w, _ = make_params((n,), torch.float32, device, True, False)
    dy = randn((m, n), torch.float32, device, seed=9)
    results = []
    for _ in range(2):
        xl, wl = _leaves((x, w))
        with fastlm.use_backend(backend):
            y = fastlm.rms_norm(xl, n, wl)
        results.append(torch.autograd.grad(y, (xl, wl), dy))
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_cpu_weight_grad_independent_of_thread_count():
    x = randn((1000, 96), torch.float32, "cpu")
    w, _ = make_params((96,), torch.float32, "cpu", True, False)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            wl = w.detach().clone().requires_grad_()
            with fastlm.use_backend("cpu"):
                results.append(torch.autograd.grad(fastlm.rms_norm(x, 96, wl).sum(), wl)[0])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], o) for o in results[1:])


def _fwd_samples(device):
    out = []
    for dtype, pdtype in DTYPE_PAIRS:
        for has_w in (True, False):
            w, _ = make_params((13,), pdtype, device, has_w, False)
            out.append((randn((5, 13), dtype, device), w, 1e-6))
    out.append((randn((0, 8), torch.float32, device), None, 1e-6))
    return out


def _bwd_samples(device, fwd):
    out = []
    for x, w, eps in _fwd_samples(device):
        y, rstd = fwd(x, w, eps)
        dy = randn(y.shape, y.dtype, device, seed=2)
        out.append((dy, x, rstd, w, w is not None))
        out.append((dy, x, rstd, w, False))
    return out


def _add_fwd_samples(device):
    out = []
    for dtype, pdtype in DTYPE_PAIRS:
        for has_w, p in ((True, 0.0), (True, 0.3), (False, 0.5)):
            w, _ = make_params((13,), pdtype, device, has_w, False)
            rng = _rng(1, device) if p > 0 else None
            out.append((randn((5, 13), dtype, device), randn((5, 13), dtype, device, seed=3), w,
                        rng, p, 1e-6))
    return out


def _add_bwd_samples(device, fwd):
    out = []
    for x, r, w, rng, p, eps in _add_fwd_samples(device):
        y, s, rstd = fwd(x, r, w, rng, p, eps)
        dy = randn(y.shape, y.dtype, device, seed=2)
        out.append((dy, dy.clone(), s, rstd, w, rng, p, True, w is not None))
        out.append((dy, None, s, rstd, w, rng, p, False, False))
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_cpp_ops(device):
    ops = torch.ops.fastlm
    opcheck_pair(ops.rms_norm_fwd, ops.rms_norm_bwd, device, _fwd_samples, _bwd_samples)
    opcheck_pair(ops.add_rms_norm_fwd, ops.add_rms_norm_bwd, device, _add_fwd_samples,
                 _add_bwd_samples)


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_triton_ops(device):
    assert triton_ops_ready()
    ops = torch.ops.fastlm
    opcheck_pair(ops.rms_norm_fwd_triton, ops.rms_norm_bwd_triton, device, _fwd_samples,
                 _bwd_samples, every=3, triton=True)
    opcheck_pair(ops.add_rms_norm_fwd_triton, ops.add_rms_norm_bwd_triton, device,
                 _add_fwd_samples, _add_bwd_samples, every=4, triton=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    """A pre-norm residual step under torch.compile(fullgraph=True): the values and gradients
    of eager, dropout included (same seed)."""
    torch._dynamo.reset()
    x = randn((4, 6, 32), torch.float32, device)
    r = randn((4, 6, 32), torch.float32, device, seed=4)
    w, _ = make_params((32,), torch.float32, device, True, False)

    def step(x, r, w):
        out, s = fastlm.add_rms_norm(x, r, 32, w, 1e-6, 0.1)
        return fastlm.rms_norm(out, 32, w) + s

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = _leaves((x, r, w))
        torch.manual_seed(3)
        y = fn(*leaves)
        results.append((y.detach(), *torch.autograd.grad(y.sum(), leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_double_backward_refused(backend, device):
    x = randn((3, 8), torch.float32, device).requires_grad_()
    with fastlm.use_backend(backend):
        y = fastlm.rms_norm(x, 8)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_float64_and_long_rows_run_on_the_reference():
    x = randn((2, 9), torch.float64, "cpu")
    torch.testing.assert_close(fastlm.rms_norm(x, 9), F.rms_norm(x, (9,)))
    big = randn((1, (1 << 20) + 1), torch.float32, "cpu")
    y = fastlm.rms_norm(big, big.shape[-1:])
    torch.testing.assert_close(y, F.rms_norm(big, big.shape[-1:]), atol=1e-5, rtol=1e-5)
    assert "fastlm.rms_norm-long-rows" in fastlm._log._said  # said once, at INFO


# ---------------------------------------------------------------------------------------------
# fastlm.nn.RMSNorm.
@pytest.mark.parametrize("backend,device", PAIRS)
def test_module_matches_torch_and_loads_its_state(backend, device):
    ref = torch.nn.RMSNorm((4, 6), eps=1e-5, device=device)
    with torch.no_grad():
        ref.weight.copy_(make_params((4, 6), torch.float32, device, True, False)[0])
    mod = fastlm.nn.RMSNorm((4, 6), eps=1e-5, device=device)
    assert isinstance(mod, torch.nn.RMSNorm)
    mod.load_state_dict(ref.state_dict())
    assert list(mod.state_dict()) == list(ref.state_dict()) == ["weight"]
    x = randn((3, 4, 6), torch.float32, device).requires_grad_()
    with fastlm.use_backend(backend):
        y = mod(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.autograd.grad(y.sum(), (x, mod.weight))
    g_ref = torch.autograd.grad(y_ref.sum(), (x, ref.weight))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    plain = fastlm.nn.RMSNorm(6, elementwise_affine=False, device=device)
    torch.testing.assert_close(plain(x), torch.nn.RMSNorm(6, elementwise_affine=False)(x.cpu())
                               .to(device), atol=1e-5, rtol=1e-5)


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    mod = fastlm.nn.RMSNorm(16)
    x = randn((2, 3, 16), torch.float32, "cpu")
    torch.testing.assert_close(torch.compile(mod, fullgraph=True, backend="aot_eager")(x), mod(x))


# ---------------------------------------------------------------------------------------------
# Bad input.
def test_bad_input():
    x = randn((2, 8), torch.float32, "cpu")
    with pytest.raises(fastlm.ArgumentError, match="normalized_shape"):
        fastlm.rms_norm(x, (7,))
    with pytest.raises(fastlm.ArgumentError, match="weight"):
        fastlm.rms_norm(x, (8,), torch.ones(7))
    with pytest.raises(TypeError, match="floating-point"):
        fastlm.rms_norm(torch.ones(2, 8, dtype=torch.int64), (8,))
    with pytest.raises(fastlm.ArgumentError, match="residual"):
        fastlm.add_rms_norm(x, x[:, :4], (8,))
    with pytest.raises(fastlm.ArgumentError, match="dropout_p"):
        fastlm.add_rms_norm(x, x, (8,), dropout_p=1.5)
    with pytest.raises(RuntimeError, match="fastlm.rms_norm: weight must be 1-D"):
        torch.ops.fastlm.rms_norm_fwd(x, torch.ones(3), 1e-6)
    with pytest.raises(RuntimeError, match="fastlm.add_rms_norm: residual must match"):
        torch.ops.fastlm.add_rms_norm_fwd(x, x[:1], None, None, 0.0, 1e-6)
    if not GPU:
        with fastlm.use_backend("triton"):
            with pytest.raises(TypeError, match="float64"):
                fastlm.rms_norm(x.double(), (8,))

"""fastlm.swiglu and fastlm.geglu (tanh and erf) on every backend against the float64 oracle
(the tolerance rule in conftest.py: against F.silu(gate) * up / F.gelu(gate) * up in the inputs'
dtype); awkward shapes and values, opcheck, torch.compile and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (DTYPES, FLOOR, GPU, KERNEL_PAIRS, PAIRS, assert_close_2x,
                      assert_close_2x_interpreter, interpreted, opcheck_pair, randn)

import fastlm
from fastlm.ops.glu import GELU_ERF, GELU_TANH, SILU, triton_ops_ready

ACTS = {"swiglu": (SILU, lambda g, u: fastlm.swiglu(g, u), lambda g, u: F.silu(g) * u),
        "geglu-tanh": (GELU_TANH, lambda g, u: fastlm.geglu(g, u, approximate="tanh"),
                       lambda g, u: F.gelu(g, approximate="tanh") * u),
        "geglu-erf": (GELU_ERF, lambda g, u: fastlm.geglu(g, u),
                      lambda g, u: F.gelu(g) * u)}


def compare(backend, name, gate, up):
    """Forward and both gradients on `backend` against the float64 composition, with the rule
    against the eager composition in the inputs' dtype."""
    check = (assert_close_2x_interpreter if interpreted(backend, gate.device.type)
             else assert_close_2x)
    _, fast, eager = ACTS[name]
    dy = randn(gate.shape, gate.dtype, gate.device, seed=7)

    def run(fn, dtype=None):
        g, u = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (gate, up))
        y = fn(g, u)
        return (y.detach(), *torch.autograd.grad(y, (g, u), dy.to(y.dtype)))

    with fastlm.use_backend(backend):
        ours = run(fast)
    lowp = run(eager)
    oracle = run(eager, torch.float64)
    for what, a, t, o in zip(("out", "dgate", "dup"), ours, lowp, oracle):
        check(a, o, t, FLOOR[t.dtype], f"{name} {what}")
    return ours[0]


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ACTS))
def test_forward_backward(backend, device, dtype, name):
    shape = (3, 5, 67) if interpreted(backend, device) else (7, 33, 129)
    gate = randn(shape, dtype, device, scale=3.0)
    up = randn(shape, dtype, device, seed=1)
    y = compare(backend, name, gate, up)
    assert y.shape == gate.shape and y.dtype == dtype


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("shape", [(1,), (7,), (0, 5), (2, 0), (3, 1027)], ids=str)
def test_shapes(backend, device, shape):
    for name in ACTS:
        compare(backend, name, randn(shape, torch.float32, device, scale=2.0),
                randn(shape, torch.float32, device, seed=1))


@pytest.mark.parametrize("backend,device", PAIRS)
def test_extreme_gates(backend, device):
    """Saturated activations: large |gate| (exp overflows in a naive form), zeros, tiny ones."""
    g = torch.tensor([-100.0, -30.0, -10.0, -1e-6, 0.0, 1e-6, 10.0, 30.0, 100.0, 88.5, -88.5],
                     device=device)
    for name in ACTS:
        y = compare(backend, name, g, torch.ones_like(g))
        assert torch.isfinite(y).all(), name


@pytest.mark.parametrize("backend,device", PAIRS)
def test_non_contiguous_and_promotion(backend, device):
    gate = randn((16, 12), torch.float32, device, scale=2.0).t()
    up = randn((12, 32), torch.float32, device, seed=1)[:, ::2]
    assert not gate.is_contiguous() and not up.is_contiguous()
    compare(backend, "swiglu", gate, up)
    with fastlm.use_backend(backend):
        y = fastlm.swiglu(gate.to(torch.bfloat16), up)  # eager promotes: float32
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.silu(gate.to(torch.bfloat16).float()) * up)


def _fwd_samples(device):
    out = []
    for dt in DTYPES:
        for act in (SILU, GELU_TANH, GELU_ERF):
            out.append((randn((4, 9), dt, device), randn((4, 9), dt, device, seed=1), act))
    out.append((randn((0, 3), torch.float32, device), randn((0, 3), torch.float32, device), SILU))
    return out


def _bwd_samples(device, fwd):
    return [(randn(g.shape, g.dtype, device, seed=2), g, u, act)
            for g, u, act in _fwd_samples(device)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_cpp_ops(device):
    opcheck_pair(torch.ops.fastlm.glu_fwd, torch.ops.fastlm.glu_bwd, device, _fwd_samples,
                 _bwd_samples)


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_triton_ops(device):
    assert triton_ops_ready()
    opcheck_pair(torch.ops.fastlm.glu_fwd_triton, torch.ops.fastlm.glu_bwd_triton, device,
                 _fwd_samples, _bwd_samples, every=3, triton=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 32, device=device)

    def mlp(x):
        gate, up = lin(x).chunk(2, dim=-1)
        return fastlm.swiglu(gate, up) + fastlm.geglu(gate, up, approximate="tanh")

    x = randn((3, 8), torch.float32, device)
    results = []
    for fn in (mlp, torch.compile(mlp, fullgraph=True, backend="aot_eager")):
        y = fn(x)
        results.append((y.detach(), *torch.autograd.grad(y.sum(), list(lin.parameters()))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_grads_only_where_needed(backend, device):
    gate = randn((5, 6), torch.float32, device).requires_grad_()
    up = randn((5, 6), torch.float32, device, seed=1)
    with fastlm.use_backend(backend):
        y = fastlm.swiglu(gate, up)
    (dg,) = torch.autograd.grad(y.sum(), gate)
    (want,) = torch.autograd.grad((F.silu(gate) * up).sum(), gate)
    torch.testing.assert_close(dg, want)


def test_bad_input():
    g = torch.randn(3, 4)
    with pytest.raises(fastlm.ArgumentError, match="one shape"):
        fastlm.swiglu(g, g[:, :2])
    with pytest.raises(TypeError, match="floating-point"):
        fastlm.swiglu(g, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(fastlm.ArgumentError, match="approximate"):
        fastlm.geglu(g, g, approximate="fast")
    with pytest.raises(RuntimeError, match="fastlm.geglu: up must match gate"):
        torch.ops.fastlm.glu_fwd(g, g[:1], GELU_TANH)
    with pytest.raises(RuntimeError, match="activation must be"):
        torch.ops.fastlm.glu_fwd(g, g, 7)
    if not GPU:
        with fastlm.use_backend("cpu"):
            with pytest.raises(TypeError, match="float64"):
                fastlm.swiglu(g.double(), g.double())

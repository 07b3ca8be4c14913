"""fastlm.nn.LayerNorm is a drop-in torch.nn.LayerNorm: same constructor, parameters and
state_dict; outputs and every gradient within the tolerance rule of torch's module; compiles
with torch.compile(fullgraph=True)."""

import contextlib
import copy
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import (DTYPE_PAIRS, FLOOR, PAIRS, assert_close_2x,
                      assert_close_2x_interpreter, interpreted, param_floor, randn)

CONFIGS = {
    "default": dict(normalized_shape=48),
    "no-affine": dict(normalized_shape=48, elementwise_affine=False),
    "no-bias": dict(normalized_shape=48, bias=False),
    "tuple-shape": dict(normalized_shape=(6, 8)),
    "eps": dict(normalized_shape=[48], eps=1e-3),
}


def _pair(**kw):
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(**kw)
    torch.manual_seed(0)
    mod = fastlm.nn.LayerNorm(**kw)
    return ref, mod


def test_signature_matches_torch():
    assert inspect.signature(fastlm.nn.LayerNorm) == inspect.signature(torch.nn.LayerNorm)
    params = inspect.signature(fastlm.nn.LayerNorm).parameters
    assert params["eps"].default == 1e-5
    assert params["elementwise_affine"].default is True
    assert params["bias"].default is True


def test_is_a_torch_layer_norm():
    mod = fastlm.nn.LayerNorm(8)
    assert isinstance(mod, torch.nn.LayerNorm)
    assert isinstance(mod, torch.nn.Module)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_parameters_and_state_dict_match_torch(config):
    ref, mod = _pair(**CONFIGS[config])
    assert mod.normalized_shape == ref.normalized_shape
    assert mod.eps == ref.eps and mod.elementwise_affine == ref.elementwise_affine
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (_, p), (_, q) in zip(mod.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype and torch.equal(p, q)
    assert list(mod.state_dict()) == list(ref.state_dict())
    assert (mod.weight is None) == (ref.weight is None)
    assert (mod.bias is None) == (ref.bias is None)
    assert all(p.requires_grad for p in mod.parameters())


def test_device_and_dtype_arguments():
    mod = fastlm.nn.LayerNorm(8, device="meta", dtype=torch.bfloat16)
    assert mod.weight.device.type == "meta" and mod.weight.dtype == torch.bfloat16
    assert mod.bias.device.type == "meta" and mod.bias.dtype == torch.bfloat16


@pytest.mark.parametrize("config", ["default", "no-bias", "tuple-shape"])
def test_load_state_dict_both_ways(config):
    kw = CONFIGS[config]
    src = torch.nn.LayerNorm(**kw)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn_like(p))
    mod = fastlm.nn.LayerNorm(**kw)
    assert mod.load_state_dict(src.state_dict()) is not None
    for a, b in zip(mod.state_dict().values(), src.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        for p in mod.parameters():
            p.mul_(2)
    back = torch.nn.LayerNorm(**kw)
    back.load_state_dict(mod.state_dict())
    for a, b in zip(back.state_dict().values(), mod.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_repr_like_torch(config):
    ref, mod = _pair(**CONFIGS[config])
    assert repr(mod) == repr(ref)
    assert repr(mod).startswith(f"LayerNorm({tuple(ref.normalized_shape)}, eps=")


def _randomize(mod):
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS,
                         ids=[f"{str(x)[6:]}-p{str(p)[6:]}" for x, p in DTYPE_PAIRS])
def test_outputs_and_grads_match_torch_module(backend, device, config, dtypes):
    dtype, pdtype = dtypes
    kw = CONFIGS[config]
    ref, mod = _pair(**kw, device=device, dtype=pdtype)
    _randomize(ref)
    mod.load_state_dict(ref.state_dict())
    oracle = copy.deepcopy(ref).double()
    ns = ref.normalized_shape
    shape = (2, 5) + ns
    x = randn(shape, dtype, device, shift=0.5)
    dy = randn(shape, dtype, device, seed=11)  # the same dy for all three
    check = assert_close_2x_interpreter if interpreted(backend, device) else assert_close_2x

    def run(module, inp, ctx):
        inp = inp.detach().clone().requires_grad_()
        with ctx:
            y = module(inp)
        y.backward(dy.to(y.dtype))
        return y.detach(), inp.grad, [p.grad for p in module.parameters()]

    y, dx, grads = run(mod, x, fastlm.use_backend(backend))
    y_t, dx_t, grads_t = run(ref, x, contextlib.nullcontext())
    y_o, dx_o, grads_o = run(oracle, x.double(), contextlib.nullcontext())
    check(y, y_o, y_t, FLOOR[y_t.dtype], "y")
    check(dx, dx_o, dx_t, FLOOR[dx_t.dtype], "dx")
    rows = x.numel() // math.prod(ns)
    names = [n for n, _ in mod.named_parameters()]
    assert len(grads) == len(grads_t) == len(names)
    for name, g, g_t, g_o in zip(names, grads, grads_t, grads_o):
        check(g, g_o, g_t, param_floor(g_t.dtype, rows), name)


def test_bf16_module_under_cpu_autocast_output_dtype():
    ref, mod = _pair(normalized_shape=16)
    x = torch.randn(3, 16)
    lin = torch.nn.Linear(16, 16)
    for inp_fn in (lambda: x, lambda: lin(x), lambda: x.bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inp = inp_fn()
            want, got = ref(inp), mod(inp)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=str)
def test_module_under_cuda_autocast_output_dtype(backend, amp):
    ref, mod = _pair(normalized_shape=64, device="cuda")
    lin = torch.nn.Linear(64, 64, device="cuda")
    x = torch.randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=amp):
        h = lin(x)
        want = ref(h)
        with fastlm.use_backend(backend):
            got = mod(h)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, output and grads as in eager.
class Block(torch.nn.Module):
    def __init__(self, d=32, device=None):
        super().__init__()
        self.fc = torch.nn.Linear(d, d, device=device)
        self.ln = fastlm.nn.LayerNorm(d, device=device)
        self.ln2 = fastlm.nn.LayerNorm(d, bias=False, device=device)

    def forward(self, x):
        return self.ln2(torch.relu(self.ln(self.fc(x))) + x)


def _compiled_matches_eager(backend, compile_backend, device):
    torch.manual_seed(0)
    model = Block(device=device)
    _randomize(model)
    compiled_model = copy.deepcopy(model)
    x = torch.randn(4, 7, 32, device=device)
    dy = torch.randn(4, 7, 32, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=compile_backend, fullgraph=True)
    with fastlm.use_backend(backend):
        xe = x.clone().requires_grad_()
        ye = model(xe)
        ye.backward(dy)
        xc = x.clone().requires_grad_()
        yc = compiled(xc)
        yc.backward(dy)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-5, rtol=1e-5)
    for (n, p), (_, q) in zip(compiled_model.named_parameters(), model.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_compile_fullgraph_aot_eager_cpu():
    _compiled_matches_eager("cpu", "aot_eager", "cpu")


def test_compile_fullgraph_inductor_cpu():
    _compiled_matches_eager("cpu", "inductor", "cpu")


def test_compile_fullgraph_dynamic_shapes_cpu():
    """A second, different batch shape recompiles (or runs dynamic) without a graph break."""
    torch._dynamo.reset()
    mod = fastlm.nn.LayerNorm(16)
    compiled = torch.compile(mod, backend="aot_eager", fullgraph=True, dynamic=True)
    for rows in (3, 5, 0):
        x = torch.randn(rows, 16)
        torch.testing.assert_close(compiled(x), F.layer_norm(x, (16,), mod.weight, mod.bias))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_cuda(backend, compile_backend):
    _compiled_matches_eager(backend, compile_backend, "cuda")

"""fastlm.apply_rotary_emb on every backend against the float64 oracle (the tolerance rule in
conftest.py: against transformers' formula q * cos + rotate_half(q) * sin evaluated in the
inputs' dtype); both layouts (rotate-half, interleaved), unsqueeze_dim 1 and 2, GQA, strided
q/k as transformers makes them, float32 cos/sin, opcheck, torch.compile and bad input."""

import pytest
import torch
from conftest import (DTYPES, FLOOR, GPU, KERNEL_PAIRS, PAIRS, assert_close_2x,
                      assert_close_2x_interpreter, interpreted, opcheck_pair, randn)

import fastlm
from fastlm.ops.rotary import reference, rotate, triton_ops_ready


def _cos_sin(b, s, d, dtype, device, base=10000.0):
    """transformers' default rotary embedding: cos/sin (b, s, d) of positions 0.. (shifted per
    batch row, as with left padding)."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(s, dtype=torch.float64)[None, :] + 3 * torch.arange(b)[:, None]
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device=device, dtype=dtype), emb.sin().to(device=device, dtype=dtype)


def _eager(q, k, cos, sin, unsqueeze_dim, interleaved):
    """transformers' apply_rotary_pos_emb, in the inputs' dtype (rounding after each op); with
    float32 cos/sin on 16-bit q and k it computes in float32, and the result is rounded to q's
    dtype (fastlm's result dtype)."""
    c, s = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return ((q * c + rotate(q, interleaved) * s).to(q.dtype),
            (k * c + rotate(k, interleaved) * s).to(k.dtype))


def compare(backend, q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    check = (assert_close_2x_interpreter if interpreted(backend, q.device.type)
             else assert_close_2x)
    dq = randn(q.shape, q.dtype, q.device, seed=8)
    dk = randn(k.shape, k.dtype, k.device, seed=9)

    def run(fn, dtype=None):
        a, b = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k))
        c, s = (t.to(dtype) if dtype else t for t in (cos, sin))
        qo, ko = fn(a, b, c, s, unsqueeze_dim, interleaved)
        ga, gb = torch.autograd.grad((qo, ko), (a, b), (dq.to(qo.dtype), dk.to(ko.dtype)))
        return qo.detach(), ko.detach(), ga, gb

    with fastlm.use_backend(backend):
        ours = run(lambda *a: fastlm.apply_rotary_emb(*a[:5], interleaved=a[5]))
    lowp = run(_eager)
    oracle = run(reference, torch.float64)
    for what, a, t, o in zip(("q_out", "k_out", "dq", "dk"), ours, lowp, oracle):
        check(a, o, t, FLOOR[t.dtype], what)
    return ours


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_forward_backward(backend, device, dtype, interleaved):
    b, hq, hk, s, d = 2, 4, 2, 7, 16
    q = randn((b, hq, s, d), dtype, device)
    k = randn((b, hk, s, d), dtype, device, seed=1)
    cos, sin = _cos_sin(b, s, d, dtype, device)
    qo, ko, _, _ = compare(backend, q, k, cos, sin, interleaved=interleaved)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype


@pytest.mark.parametrize("backend,device", PAIRS)
def test_transformers_layout_and_float32_cos(backend, device):
    """q, k as transformers makes them: (B, S, H, D) projections viewed as (B, H, S, D); cos
    and sin shared by the batch (1, S, D), float32 with bfloat16 q; the outputs keep the
    layout."""
    b, s, hq, hk, d = 2, 9, 4, 1, 32
    q = randn((b, s, hq * d), torch.bfloat16, device).view(b, s, hq, d).transpose(1, 2)
    k = randn((b, s, hk * d), torch.bfloat16, device, seed=1).view(b, s, hk, d).transpose(1, 2)
    cos, sin = _cos_sin(1, s, d, torch.float32, device)
    qo, ko, dq, _ = compare(backend, q, k, cos, sin)
    if backend != "torch":
        assert qo.stride() == q.stride() and ko.stride() == k.stride()


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_unsqueeze_dim_2(backend, device, interleaved):
    b, s, hq, hk, d = 2, 5, 3, 3, 8
    q = randn((b, s, hq, d), torch.float32, device)
    k = randn((b, s, hk, d), torch.float32, device, seed=1)
    cos, sin = _cos_sin(b, s, d, torch.float32, device)
    qo, _, _, _ = compare(backend, q, k, cos, sin, unsqueeze_dim=2, interleaved=interleaved)
    assert qo.shape == q.shape


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (1, 2, 1, 6), (3, 1, 5, 2), (1, 3, 4, 130),
                                   (2, 2, 0, 8), (0, 2, 3, 4)], ids=str)
def test_shapes(backend, device, shape):
    b, h, s, d = shape
    q = randn(shape, torch.float32, device)
    k = randn((b, max(h - 1, 1), s, d), torch.float32, device, seed=1)
    cos, sin = _cos_sin(b, s, d, torch.float32, device)
    compare(backend, q, k, cos, sin)
    compare(backend, q, k, cos, sin, interleaved=True)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_sliced_non_unit_stride(backend, device):
    """A q whose last dim is strided (every other element) is copied first; cos/sin sliced."""
    q = randn((1, 2, 3, 16), torch.float32, device)[..., ::2]
    k = randn((1, 2, 3, 8), torch.float32, device, seed=1)
    cos, sin = _cos_sin(1, 6, 8, torch.float32, device)
    compare(backend, q, k, cos[:, 1:4], sin[:, 1:4])


def test_cos_requiring_grad_runs_on_the_reference():
    q = randn((1, 2, 3, 8), torch.float32, "cpu")
    cos, sin = _cos_sin(1, 3, 8, torch.float32, "cpu")
    cos.requires_grad_()
    qo, _ = fastlm.apply_rotary_emb(q, q, cos, sin)
    (gc,) = torch.autograd.grad(qo.sum(), cos)
    (want,) = torch.autograd.grad((q * cos.unsqueeze(1) + rotate(q) * sin.unsqueeze(1)).sum(),
                                  cos)
    torch.testing.assert_close(gc, want)


def _fwd_samples(device):
    out = []
    for dt in DTYPES:
        for cdt in {dt, torch.float32}:
            for il in (False, True):
                q = randn((2, 3, 5, 8), dt, device)
                k = randn((2, 1, 5, 8), dt, device, seed=1)
                cos, sin = _cos_sin(2, 5, 8, cdt, device)
                out.append((q, k, cos, sin, il))
    # transformers' layout: a (B, S, H, D) buffer seen as (B, H, S, D).
    qt = randn((1, 6, 4, 8), torch.float32, device).transpose(1, 2)
    out.append((qt, qt[:, :2], *_cos_sin(1, 6, 8, torch.float32, device), False))
    return out


def _bwd_samples(device, fwd):
    return [(randn(q.shape, q.dtype, device, seed=3), randn(k.shape, k.dtype, device, seed=4),
             c, s, il) for q, k, c, s, il in _fwd_samples(device)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_cpp_ops(device):
    opcheck_pair(torch.ops.fastlm.rotary_fwd, torch.ops.fastlm.rotary_bwd, device, _fwd_samples,
                 _bwd_samples)


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck_triton_ops(device):
    assert triton_ops_ready()
    opcheck_pair(torch.ops.fastlm.rotary_fwd_triton, torch.ops.fastlm.rotary_bwd_triton, device,
                 _fwd_samples, _bwd_samples, every=3, triton=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q = randn((2, 9, 32), torch.float32, device)
    cos, sin = _cos_sin(2, 9, 8, torch.float32, device)

    def attn_in(x):
        qh = x.view(2, 9, 4, 8).transpose(1, 2)
        kh = x[..., :16].reshape(2, 9, 2, 8).transpose(1, 2)
        qo, ko = fastlm.apply_rotary_emb(qh, kh, cos, sin)
        return qo.sum() + 2 * ko.sum()

    results = []
    for fn in (attn_in, torch.compile(attn_in, fullgraph=True, backend="aot_eager")):
        x = q.clone().requires_grad_()
        y = fn(x)
        results.append((y.detach(), torch.autograd.grad(y, x)[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_bad_input():
    q = torch.randn(1, 2, 3, 8)
    cos, sin = _cos_sin(1, 3, 8, torch.float32, "cpu")
    with pytest.raises(fastlm.ArgumentError, match="4-D"):
        fastlm.apply_rotary_emb(q[0], q[0], cos, sin)
    with pytest.raises(fastlm.ArgumentError, match="even"):
        fastlm.apply_rotary_emb(q[..., :7], q[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(fastlm.ArgumentError, match="partial rotary"):
        fastlm.apply_rotary_emb(q, q, cos[..., :4], sin[..., :4])
    with pytest.raises(fastlm.ArgumentError, match="unsqueeze_dim"):
        fastlm.apply_rotary_emb(q, q, cos, sin, unsqueeze_dim=3)
    with pytest.raises(fastlm.ArgumentError, match="does not broadcast"):
        fastlm.apply_rotary_emb(q, q, cos[:, :2], sin[:, :2])
    with pytest.raises(TypeError, match="floating-point"):
        fastlm.apply_rotary_emb(q.long(), q, cos, sin)
    with pytest.raises(RuntimeError, match="fastlm.apply_rotary_emb: cos and sin must be"):
        torch.ops.fastlm.rotary_fwd(q, q, cos[:, :2], sin[:, :2], False)
    if not GPU:
        with fastlm.use_backend("cpu"):
            with pytest.raises(TypeError, match="float64"):
                fastlm.apply_rotary_emb(q.double(), q.double(), cos, sin)

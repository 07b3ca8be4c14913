"""fastlm's attention options (docs/attention.md, "Causal, windows, soft-capping"): causal with
the lower-right diagonal, sliding windows (window_size=(left, right)) and logit soft-capping,
on scaled_dot_product_attention and varlen_attention, forward and backward, dropout included,
on every backend.

The oracle is computed here in float64 from its definition, apart from fastlm's reference:
the window as an explicit bool mask (query i may attend key j iff diag(i) - left <= j <=
diag(i) + right, diag(i) = i or i + S - L), soft-capping as softcap * tanh(s / softcap) before
the mask, rows that may attend nothing as zeros; the lower-right causal case also against
torch's own causal_lower_right. The same computation in the inputs' dtype is PyTorch's own
low-precision error for the tolerance rule (conftest.py). Dropout: the raw ops with a fixed
(seed, offset) against fastlm's reference in float64 (the bits are the contract's).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import FLOOR, KERNEL_PAIRS, PAIRS, interpreted, randn
from fastlm.ops import attention
from test_attention import _dt, _ops, check_all, need

SDPA = fastlm.scaled_dot_product_attention
DEVICE_DTYPES = [torch.float32, torch.bfloat16]


def allowed(L, S, causal, window, lower_right, device="cpu"):
    """The (L, S) bool mask of the keys each query may attend, written out from the contract."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(L, device=device).view(L, 1)
    j = torch.arange(S, device=device).view(1, S)
    diag = i + (S - L if lower_right else 0)
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        ok = ok & (j <= diag + right)
    if left >= 0:
        ok = ok & (j >= diag - left)
    return ok


def math_attention(q, k, v, causal, window, lower_right, softcap, scale=None):
    """Attention in q's dtype (float64 for the oracle) from the definition: GQA by repeating
    k and v, soft-capping before the mask, empty rows as zeros."""
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    ok = allowed(q.shape[-2], k.shape[-2], causal, window, lower_right, q.device)
    s = s.masked_fill(~ok, float("-inf"))
    empty = ~ok.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return p @ v


def _compare(backend, device, dtype, L, S, E, causal=False, window=(-1, -1), lower_right=False,
             softcap=0.0, hq=2, hk=2, B=1, seed=0):
    """fastlm SDPA with the options on `backend` against the float64 oracle, forward and the
    grads of q, k, v, with the tolerance rule."""
    need(backend, device)
    leaves = [randn(shape, dtype, device, seed + i) for i, shape in
              enumerate(((B, hq, L, E), (B, hk, S, E), (B, hk, S, E)))]
    dout = randn((B, hq, L, E), dtype, device, seed + 5)
    kw = dict(window_size=window, lower_right=lower_right, softcap=softcap)

    def run(fn, ts, **extra):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*ts, **extra)
        return out.detach(), torch.autograd.grad(out, ts, dout.to(out.dtype))

    with fastlm.use_backend(backend):
        got, g_got = run(SDPA, leaves, is_causal=causal, enable_gqa=hq != hk, **kw)
    ref = lambda *ts: math_attention(*ts, causal, window, lower_right, softcap)  # noqa: E731
    low, g_low = run(ref, leaves)
    ora, g_ora = run(ref, [t.double() for t in leaves])
    copies = [1, hq // hk, hq // hk]
    results = [("out", got, ora, low, FLOOR[dtype])]
    results += [(n, g, go, gl, FLOOR[dtype] * math.sqrt(c)) for n, g, go, gl, c in
                zip(("dq", "dk", "dv"), g_got, g_ora, g_low, copies)]
    check_all(backend, device, results)


# (name, L, S, E, causal, window, lower_right, softcap, Hq, Hk): tiny shapes for the
# interpreter, lengths that are not block multiples, L < S and L > S (rows with no key under
# lower-right causal), GQA.
OPTION_CASES = [
    ("causal-lower-right-L<S", 19, 37, 32, True, (-1, -1), True, 0.0, 2, 1),
    ("causal-lower-right-L>S", 41, 23, 16, True, (-1, -1), True, 0.0, 2, 2),
    ("window-3-5", 33, 33, 32, False, (3, 5), False, 0.0, 2, 2),
    ("window-causal-left-7", 37, 37, 16, True, (7, -1), False, 0.0, 4, 2),
    ("window-lower-right-L<S", 21, 45, 32, False, (4, 2), True, 0.0, 2, 2),
    ("window-left-only", 30, 26, 16, False, (5, -1), False, 0.0, 2, 2),
    ("softcap", 25, 31, 32, False, (-1, -1), False, 2.5, 2, 2),
    ("softcap-causal-window", 35, 35, 16, True, (9, -1), False, 4.0, 2, 1),
]


def _option_params():
    out = []
    for backend, device in (p.values for p in PAIRS):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for case in OPTION_CASES:
            for dt in DEVICE_DTYPES:
                # the interpreter is slow: bfloat16 for every case there, float32 for two
                if interpreted(backend, device) and dt == torch.float32 and case[0] not in (
                        "causal-lower-right-L>S", "softcap-causal-window"):
                    continue
                out.append(pytest.param(backend, device, case, dt, marks=marks,
                                        id=f"{backend}-{device}-{case[0]}-{_dt(dt)}"))
    return out


@pytest.mark.parametrize("backend,device,case,dtype", _option_params())
def test_options_match_oracle(backend, device, case, dtype):
    _, L, S, E, causal, window, lower_right, softcap, hq, hk = case
    _compare(backend, device, dtype, L, S, E, causal, window, lower_right, softcap, hq, hk)


def test_oracle_lower_right_is_torch_causal_lower_right():
    """The lower-right causal of the contract is torch's causal_lower_right (float64), and
    fastlm's reference gives it (backend torch)."""
    from torch.nn.attention.bias import causal_lower_right

    for L, S in ((5, 9), (9, 5), (7, 7)):
        q, k, v = (randn(shape, torch.float64, "cpu", i) for i, shape in
                   enumerate(((1, 2, L, 8), (1, 2, S, 8), (1, 2, S, 8))))
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S))
        rows = allowed(L, S, True, (-1, -1), True).any(-1)  # torch: NaN for rows with no key
        mine = math_attention(q, k, v, True, (-1, -1), True, 0.0)
        assert torch.allclose(mine[..., rows, :], want[..., rows, :], atol=1e-12)
        assert torch.equal(mine[..., ~rows, :], torch.zeros_like(mine[..., ~rows, :]))
        with fastlm.use_backend("torch"):
            got = SDPA(q, k, v, is_causal=True, lower_right=True)
        assert torch.allclose(got, mine, atol=1e-12)


def test_window_is_the_explicit_mask():
    """A window gives what the same keys given as an attn_mask give (backend torch, float64),
    and a CausalBias lower-right runs as lower_right causal."""
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = (randn(shape, torch.float64, "cpu", i) for i, shape in
               enumerate(((1, 2, 13, 8), (1, 2, 17, 8), (1, 2, 17, 8))))
    with fastlm.use_backend("torch"):
        a = SDPA(q, k, v, window_size=(3, 2), lower_right=True)
        b = SDPA(q, k, v, attn_mask=allowed(13, 17, False, (3, 2), True))
        c = SDPA(q, k, v, attn_mask=causal_lower_right(13, 17))
        d = SDPA(q, k, v, is_causal=True, lower_right=True)
    assert torch.equal(a, b)
    assert torch.equal(c, d)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_options_with_dropout_are_the_reference(backend, device):
    """The raw ops with a window, the lower-right diagonal, soft-capping and dropout (fixed
    seed, offset) against fastlm's reference in float64: the same keep bits, the same math.
    (Without a GPU the CUDA C++ kernels run these options on the emulator:
    test_cuda_emu_attention.py.)"""
    need(backend, device)
    fwd, bwd = _ops(backend)
    dt = torch.bfloat16
    q, k, v, dout = (randn(shape, dt, device, i) for i, shape in
                     enumerate(((1, 4, 29, 32), (1, 2, 35, 32), (1, 2, 35, 32), (1, 4, 29, 32))))
    rng = torch.tensor([1234, 5], dtype=torch.int64, device=device)
    opts = (6, -1, True, 3.0)
    args = (None, rng, 0.3, True, 32 ** -0.5, *opts)
    out, lse = fwd(q, k, v, *args)
    grads = bwd(dout, q, k, v, out, lse, *args)
    d64 = [t.double() for t in (q, k, v)]
    o64, l64 = attention.reference_attention_fwd(*d64, *args)
    g64 = attention.reference_attention_bwd(dout.double(), *d64, o64, l64, *args)
    ol, ll = attention.reference_attention_fwd(q, k, v, *args)  # the reference in bf16 / f32
    gl = attention.reference_attention_bwd(dout, q, k, v, ol, ll, *args)
    fin = torch.isfinite(l64)
    assert torch.equal(torch.isinf(lse), ~fin)
    assert (lse[fin] - l64[fin]).abs().max() < 1e-3
    results = [("out", out, o64, ol, FLOOR[dt])]
    results += [(n, g, go, gr, FLOOR[dt] * (1 if n == "dq" else math.sqrt(2)))
                for n, g, go, gr in zip(("dq", "dk", "dv"), grads, g64, gl)]
    check_all(backend, device, results)


def _varlen_params():
    out = []
    for backend, device in (p.values for p in PAIRS):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        out.append(pytest.param(backend, device, marks=marks, id=f"{backend}-{device}"))
    return out


@pytest.mark.parametrize("backend,device", _varlen_params())
def test_varlen_options_are_each_sequence_alone(backend, device):
    """varlen_attention with the options: each sequence gives what scaled_dot_product_attention
    with the options gives on it alone (the diagonal aligned with its own lengths), in float64
    oracle terms with the tolerance rule on the packed result."""
    need(backend, device)
    dt = torch.bfloat16
    lq, lk = [13, 0, 21, 9], [17, 5, 11, 9]
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q = randn((sum(lq), 4, 32), dt, device, 0)
    k = randn((sum(lk), 2, 32), dt, device, 1)
    v = randn((sum(lk), 2, 32), dt, device, 2)
    dout = randn((sum(lq), 4, 32), dt, device, 3)
    opts = dict(window_size=(4, -1), lower_right=True, softcap=5.0)

    def run(fn, ts):
        ts = [t.detach().clone().requires_grad_() for t in ts]
        out = fn(*ts)
        return out.detach(), torch.autograd.grad(out, ts, dout.to(out.dtype))

    def per_sequence(qq, kk, vv):
        outs = []
        for b in range(len(lq)):
            sq, sk = slice(int(cq[b]), int(cq[b + 1])), slice(int(ck[b]), int(ck[b + 1]))
            o = math_attention(qq[sq].transpose(0, 1), kk[sk].transpose(0, 1),
                               vv[sk].transpose(0, 1), True, (4, -1), True, 5.0)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    with fastlm.use_backend(backend):
        got, g_got = run(lambda a, b, c: fastlm.varlen_attention(
            a, b, c, cq.to(device), ck.to(device), max(lq), max(lk), is_causal=True,
            enable_gqa=True, **opts), (q, k, v))
    low, g_low = run(per_sequence, (q, k, v))
    ora, g_ora = run(per_sequence, (q.double(), k.double(), v.double()))
    results = [("out", got, ora, low, FLOOR[dt])]
    results += [(n, g, go, gl, FLOOR[dt] * (1 if n == "dq" else math.sqrt(2)))
                for n, g, go, gl in zip(("dq", "dk", "dv"), g_got, g_ora, g_low)]
    check_all(backend, device, results)


BAD_OPTIONS = {
    "window-not-pair": (dict(window_size=3), ValueError, "window_size must be a pair"),
    "window-below-minus-one": (dict(window_size=(-2, 0)), ValueError, "each >= -1"),
    "window-float": (dict(window_size=(1.5, 0)), ValueError, "window_size must be a pair"),
    "softcap-negative": (dict(softcap=-1.0), ValueError, "softcap must be finite and >= 0"),
    "softcap-inf": (dict(softcap=float("inf")), ValueError, "softcap must be finite"),
    "lower-right-not-bool": (dict(lower_right=1), TypeError, "lower_right must be a bool"),
}


@pytest.mark.parametrize("what", list(BAD_OPTIONS))
def test_bad_options(what):
    kw, cls, msg = BAD_OPTIONS[what]
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(cls, match=msg):
        SDPA(q, q, q, **kw)
    with pytest.raises(cls, match=msg):
        fastlm.varlen_attention(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1),
                                torch.tensor([0, 4]), torch.tensor([0, 4]), 4, 4, **kw)


def test_window_with_attn_mask_is_refused():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="attn_mask and window_size cannot be combined"):
        SDPA(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool), window_size=(1, 1))


def test_defaults_are_torch_sdpa_and_the_plain_ops():
    """The defaults reproduce the plain call: the same result as without the keywords, and the
    raw ops take the old argument list (the new schema arguments have defaults)."""
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    with fastlm.use_backend("torch"):
        a = SDPA(q, k, v, is_causal=True)
        b = SDPA(q, k, v, is_causal=True, window_size=(-1, -1), lower_right=False, softcap=0.0)
    assert torch.equal(a, b)
    if attention._has_kernel("cpu"):
        o1, l1 = torch.ops.fastlm.attention_fwd(q, k, v, None, None, 0.0, True, 0.3)
        o2, l2 = torch.ops.fastlm.attention_fwd(q, k, v, None, None, 0.0, True, 0.3, -1, -1,
                                                False, 0.0)
        assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.skipif(not attention._has_kernel("cpu"), reason="fastlm._C has no CPU kernels")
def test_raw_cpu_op_checks_the_options():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="window_left and window_right must be >= -1"):
        torch.ops.fastlm.attention_fwd(q, q, q, None, None, 0.0, False, 0.3, -3, 0, False, 0.0)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        torch.ops.fastlm.attention_fwd(q, q, q, None, None, 0.0, False, 0.3, -1, -1, False, -2.0)

"""fastlm.varlen_attention (packed sequences of different lengths, one kernel launch) on every
backend against the float64 oracle (per-sequence torch.nn.functional.scaled_dot_product_attention
in float64; the tolerance rule of conftest.py), on odd lengths, empty sequences, L != S, causal,
GQA and several head dims; the dropout bits, which are those of the padded dense problem
(docs/attention.md, "Varlen"), bit for bit; determinism; the raw ops' contract; opcheck;
torch.compile; autocast; and bad input.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, FLOOR, KERNEL_PAIRS, PAIRS, interpreted, opcheck_pair, randn
from test_attention import (
    CUDA_PARAM,
    _dt,
    _fwd_bwd,
    _grad_leaves,
    assert_thread_count_invariant,
    bwd_samples_of,
    check_all,
    need,
)

import fastlm
from fastlm.ops import attention
from fastlm.ops.attention import dropout_keep, dropout_scale

VARLEN = {
    "plain": dict(lq=[5, 13, 1, 9], lk=[7, 13, 3, 17], hq=2, hk=2, causal=False),
    "causal-gqa": dict(lq=[5, 13, 1, 9], lk=[7, 13, 3, 17], hq=4, hk=2, causal=True),
    "zero-length": dict(lq=[4, 0, 6, 3], lk=[5, 2, 0, 3], hq=2, hk=2, causal=True),
    "odd-mqa": dict(lq=[23, 2, 17], lk=[11, 19, 29], hq=3, hk=1, causal=True),
    # Several query and key blocks per sequence on every backend (CPU tiles: 96 / 64 rows).
    "long": dict(lq=[70, 131, 1], lk=[133, 67, 5], hq=2, hk=1, causal=True),
}
# Head dims (E, Ev): E != Ev, then E = Ev across the kernels' padded widths.
HEADS = [(16, 24), (8, 8), (40, 40), (64, 64), (128, 128)]


def _ident(n=3):
    return [lambda t: t] * n


def _cu(lengths, dtype=torch.int32, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()],
                        dtype=dtype, device=device)


def _packed(cfg, dtype, device, cu_dtype=torch.int32, e=16, ev=24):
    q = randn((sum(cfg["lq"]), cfg["hq"], e), dtype, device, seed=1)
    k = randn((sum(cfg["lk"]), cfg["hk"], e), dtype, device, seed=2)
    v = randn((sum(cfg["lk"]), cfg["hk"], ev), dtype, device, seed=3)
    return q, k, v, _cu(cfg["lq"], cu_dtype, device), _cu(cfg["lk"], cu_dtype, device)


def _varlen(cfg, cu_q, cu_k, **kw):
    """fastlm.varlen_attention with the config's lengths and flags, as a function of q, k, v."""
    def fn(q, k, v):
        return fastlm.varlen_attention(q, k, v, cu_q, cu_k, max(cfg["lq"]), max(cfg["lk"]),
                                       is_causal=cfg["causal"],
                                       enable_gqa=cfg["hq"] != cfg["hk"], **kw)
    return fn


def _per_sequence(fn, cfg):
    """The varlen function built from per-sequence calls of an sdpa function `fn`."""
    cq = _cu(cfg["lq"]).tolist()
    ck = _cu(cfg["lk"]).tolist()

    def run(q, k, v):
        outs = []
        for i in range(len(cfg["lq"])):
            qi, ki, vi = (t.transpose(0, 1) for t in (q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]],
                                                      v[ck[i]:ck[i + 1]]))
            outs.append(fn(qi, ki, vi, is_causal=cfg["causal"],
                           enable_gqa=cfg["hq"] != cfg["hk"]).transpose(0, 1))
        return torch.cat(outs, 0)

    return run


def _check_grads(backend, device, cfg, floor, got, ora, low):
    """check_all on (out, dq, dk, dv) against the float64 oracle and the low-precision
    computation; dk and dv sum over the GQA group, so their floor grows by its sqrt."""
    g = math.sqrt(cfg["hq"] // cfg["hk"])
    floors = (floor, floor, floor * g, floor * g)
    check_all(backend, device, list(zip(("out", "dq", "dk", "dv"), got, ora, low, floors)))


def _pairs(names):
    return [p for p in PAIRS if p.values[0] in names]


def _oracle_params():
    """cpu and torch: every config, float32 and bfloat16, every head dim (cpu); the interpreter
    (slow): the short configs in float32 and float16, the head dims on one config in float32;
    CUDA: everything, in every dtype."""
    out = []
    for pair in PAIRS:
        backend, device = pair.values
        for name in VARLEN:
            for dt in DTYPES:
                for heads in HEADS:
                    if interpreted(backend, device):
                        if dt == torch.bfloat16:
                            continue
                        if heads != HEADS[0] and not (name == "causal-gqa"
                                                      and dt == torch.float32):
                            continue
                        if name in ("long", "odd-mqa") and (dt != torch.float32
                                                            or heads != (40, 40)):
                            continue
                    elif device == "cpu":
                        if dt == torch.float16:
                            continue
                        if backend == "torch" and heads != HEADS[0]:
                            continue
                    out.append(pytest.param(backend, device, name, dt, heads, marks=pair.marks,
                                            id=f"{pair.id}-{name}-{_dt(dt)}-e{heads[0]}"
                                               f"-ev{heads[1]}"))
    return out


# ---------------------------------------------------------------------------------------------
# Forward and backward against the float64 oracle.
@pytest.mark.parametrize("backend,device,name,dtype,heads", _oracle_params())
def test_varlen_matches_per_sequence_oracle(backend, device, name, dtype, heads):
    need(backend, device)
    cfg = VARLEN[name]
    q, k, v, cu_q, cu_k = _packed(cfg, dtype, device, e=heads[0], ev=heads[1])
    dout = randn((q.shape[0], cfg["hq"], v.shape[-1]), dtype, device, seed=4)
    with fastlm.use_backend(backend):
        got, g_got = _fwd_bwd(_varlen(cfg, cu_q, cu_k), _grad_leaves((q, k, v)), _ident(), dout)
    per_seq = _per_sequence(F.scaled_dot_product_attention, cfg)
    low, g_low = _fwd_bwd(per_seq, _grad_leaves((q, k, v)), _ident(), dout)
    ora, g_ora = _fwd_bwd(per_seq, _grad_leaves((q, k, v), torch.float64), _ident(), dout)
    _check_grads(backend, device, cfg, FLOOR[dtype], (got, *g_got), (ora, *g_ora), (low, *g_low))
    # A query sequence with no keys gives zeros; keys of an empty query sequence get no grads.
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i, (a, b) in enumerate(zip(cfg["lq"], cfg["lk"])):
        if b == 0:
            assert torch.equal(got[cq[i]:cq[i + 1]], torch.zeros_like(got[cq[i]:cq[i + 1]]))
            assert torch.equal(g_got[0][cq[i]:cq[i + 1]],
                               torch.zeros_like(g_got[0][cq[i]:cq[i + 1]]))
        if a == 0:
            for t in (g_got[1][ck[i]:ck[i + 1]], g_got[2][ck[i]:ck[i + 1]]):
                assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=_dt)
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_in_float64_is_per_sequence_torch_sdpa(name, cu_dtype):
    cfg = VARLEN[name]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float64, "cpu", cu_dtype)
    with fastlm.use_backend("torch"):
        got = _varlen(cfg, cu_q, cu_k)(q, k, v)
    want = _per_sequence(F.scaled_dot_product_attention, cfg)(q, k, v)
    assert got.shape == (q.shape[0], cfg["hq"], v.shape[-1])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=_dt)
def test_varlen_layouts_and_broadcast_heads(backend, device, cu_dtype):
    """Strided packed inputs (heads of a wider projection, rows of stride 2, a head dim of
    stride 2), int64 offsets, and heads that broadcast without enable_gqa (one k/v head; one q
    head) as in sdpa."""
    need(backend, device)
    lq, lk = [6, 11, 3], [9, 4, 12]
    cu_q, cu_k = _cu(lq, cu_dtype, device), _cu(lk, cu_dtype, device)
    base = randn((sum(lq), 3, 2, 16), torch.float32, device, seed=1)
    q = base[:, :, 0]  # head stride 32, row stride 96
    kv = randn((2 * sum(lk), 1, 16), torch.float32, device, seed=2)[::2]  # row stride 32
    vv = randn((sum(lk), 1, 16), torch.float32, device, seed=3)[..., ::2]  # last stride 2
    q1 = randn((sum(lq), 1, 16), torch.float32, device, seed=4)
    kh = randn((sum(lk), 3, 16), torch.float32, device, seed=5)
    vh = randn((sum(lk), 3, 8), torch.float32, device, seed=6)
    cfg = dict(lq=lq, lk=lk, hq=3, hk=3, causal=True)
    for args in ((q, kv, vv), (q1, kh, vh)):
        with fastlm.use_backend(backend):
            got = fastlm.varlen_attention(*args, cu_q, cu_k, 11, 12, is_causal=True)
        want = _per_sequence(F.scaled_dot_product_attention, cfg)(
            *(t.double().expand(t.shape[0], 3, t.shape[2]) for t in args))
        assert got.shape == (sum(lq), 3, args[2].shape[-1])
        torch.testing.assert_close(got.double(), want, atol=2e-6, rtol=2e-6)


# ---------------------------------------------------------------------------------------------
# Dropout: the bits of the padded dense problem.
def _padded(t, lengths, size):
    """(n, H, size, dim) zero-padded batch of the packed (total, H, dim) tensor."""
    cu = _cu(lengths).tolist()
    out = t.new_zeros((len(lengths), t.shape[1], size, t.shape[2]))
    for b, (a, z) in enumerate(zip(cu, cu[1:])):
        out[b, :, :z - a] = t[a:z].transpose(0, 1)
    return out


def _unpadded(t, lengths):
    return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)], 0)


def _padding_mask(cfg, device):
    """(n, 1, max_q, max_k) bool: the key-padding mask, and the causal triangle when causal."""
    lq, lk = cfg["lq"], cfg["lk"]
    L, S = max(lq), max(lk)
    m = torch.arange(S).view(1, 1, 1, S) < torch.tensor(lk).view(-1, 1, 1, 1)
    m = m.expand(len(lk), 1, L, S)
    if cfg["causal"]:
        m = m & torch.ones(L, S, dtype=torch.bool).tril()
    return m.to(device)


def _padded_math(cfg, keep, p, scale):
    """Varlen as the padded dense problem written out with torch ops in the inputs' dtype:
    key-padding (and causal) mask, the given keep bits; rows of no key give 0."""
    mask = None

    def fn(q, k, v):
        nonlocal mask
        L, S = max(cfg["lq"]), max(cfg["lk"])
        qp, kp, vp = _padded(q, cfg["lq"], L), _padded(k, cfg["lk"], S), _padded(v, cfg["lk"], S)
        g = cfg["hq"] // cfg["hk"]
        kp, vp = kp.repeat_interleave(g, 1), vp.repeat_interleave(g, 1)
        m = _padding_mask(cfg, q.device)
        s = ((qp @ kp.transpose(-1, -2)) * scale).masked_fill(~m, -math.inf)
        probs = torch.softmax(s.masked_fill(~m.any(-1, keepdim=True), 0), -1) * m.any(-1, True)
        probs = probs * (keep.to(probs.dtype) * dropout_scale(p))
        return _unpadded(probs @ vp, cfg["lq"])

    return fn


def _dropout_params():
    out = []
    for pair in PAIRS:
        for name, p in (("causal-gqa", 0.3), ("zero-length", 0.5), ("odd-mqa", 0.2)):
            for dt in (torch.float32, torch.bfloat16):
                if interpreted(*pair.values) and dt != torch.float32:
                    continue
                out.append(pytest.param(*pair.values, name, p, dt, marks=pair.marks,
                                        id=f"{pair.id}-{name}-p{p}-{_dt(dt)}"))
    return out


@pytest.mark.parametrize("backend,device,name,p,dtype", _dropout_params())
def test_varlen_dropout_is_the_padded_problems(backend, device, name, p, dtype):
    """With the rng the call draws, the output and gradients are those of the padded dense
    problem with the keep bits dropout_keep(rng, n, Hq, max_q, max_k) (the tolerance rule
    against float64; a single differing bit fails it by far)."""
    need(backend, device)
    cfg = VARLEN[name]
    q, k, v, cu_q, cu_k = _packed(cfg, dtype, device)
    n, L, S = len(cfg["lq"]), max(cfg["lq"]), max(cfg["lk"])
    torch.manual_seed(99)
    rng = attention._new_rng(torch.device(device))  # the draw the public function makes
    keep = dropout_keep(rng, n, cfg["hq"], L, S, p)
    assert 0 < keep.sum() < keep.numel()
    dout = randn((q.shape[0], cfg["hq"], v.shape[-1]), dtype, device, seed=4)
    torch.manual_seed(99)
    with fastlm.use_backend(backend):
        got, g_got = _fwd_bwd(_varlen(cfg, cu_q, cu_k, dropout_p=p), _grad_leaves((q, k, v)),
                              _ident(), dout)
    math_fn = _padded_math(cfg, keep, p, 1 / math.sqrt(q.shape[-1]))
    low, g_low = _fwd_bwd(math_fn, _grad_leaves((q, k, v)), _ident(), dout)
    ora, g_ora = _fwd_bwd(math_fn, _grad_leaves((q, k, v), torch.float64), _ident(), dout)
    _check_grads(backend, device, cfg, FLOOR[dtype], (got, *g_got), (ora, *g_ora), (low, *g_low))


@pytest.mark.parametrize("backend,device", PAIRS)
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_varlen_equals_padded_dense_sdpa(backend, device, p):
    """varlen_attention == fastlm.scaled_dot_product_attention on the padded batch with the
    key-padding mask, on the same backend and with the same rng: forward and backward."""
    need(backend, device)
    if interpreted(backend, device) and p == 0.0:
        pytest.skip("the interpreter (slow) runs the dropout case, which covers this one")
    lq, lk = ([5, 9, 1, 0], [7, 3, 12, 4]) if interpreted(backend, device) else (
        [5, 13, 1, 9, 0, 70], [7, 13, 3, 17, 4, 99])
    cfg = dict(VARLEN["causal-gqa"], lq=lq, lk=lk)
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device)
    dout = randn((q.shape[0], cfg["hq"], v.shape[-1]), torch.float32, device, seed=4)
    L, S = max(cfg["lq"]), max(cfg["lk"])
    mask = _padding_mask(cfg, device)

    def dense(q, k, v):
        qp, kp, vp = _padded(q, cfg["lq"], L), _padded(k, cfg["lk"], S), _padded(v, cfg["lk"], S)
        out = fastlm.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, dropout_p=p,
                                                  enable_gqa=True)
        return _unpadded(out, cfg["lq"])

    results = []
    with fastlm.use_backend(backend):
        for fn in (_varlen(cfg, cu_q, cu_k, dropout_p=p), dense):
            torch.manual_seed(5)
            results.append(_fwd_bwd(fn, _grad_leaves((q, k, v)), _ident(), dout))
    (got, g_got), (want, g_want) = results
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)
    for name, a, b in zip(("dq", "dk", "dv"), g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", PAIRS)
def test_varlen_dropout_keep_pattern_bit_for_bit(backend, device):
    """q = 0 makes every probability 1 / S_b and v = one-hot key positions makes out[t, h, j]
    = keep * r / S_b: the kept entries are exactly dropout_keep(rng, n, Hq, max_q, max_k) at
    (b, h, i, j), i and j positions within sequence b."""
    need(backend, device)
    lq, lk, H, p = [9, 1, 14, 0, 5], [16, 7, 3, 5, 0], 2, 0.4
    L, S = max(lq), max(lk)
    cq = _cu(lq).tolist()
    q = torch.zeros(sum(lq), H, 16, device=device)
    k = randn((sum(lk), H, 16), torch.float32, device, seed=1)
    v = torch.cat([torch.eye(n, S) for n in lk], 0).unsqueeze(1).expand(sum(lk), H, S)
    v = v.contiguous().to(device)
    torch.manual_seed(21)
    rng = attention._new_rng(torch.device(device))
    keep = dropout_keep(rng, len(lq), H, L, S, p)
    torch.manual_seed(21)
    with fastlm.use_backend(backend):
        out = fastlm.varlen_attention(q, k, v, _cu(lq, device=device), _cu(lk, device=device),
                                      L, S, dropout_p=p)
    r = dropout_scale(p)
    for b in range(len(lq)):
        o = out[cq[b]:cq[b + 1]].transpose(0, 1)  # (H, L_b, S)
        want = keep[b, :, :lq[b], :].clone()
        want[..., lk[b]:] = False
        assert torch.equal(o != 0, want), f"sequence {b}: kept entries differ"
        if lk[b]:
            torch.testing.assert_close(o[want] * lk[b], torch.full_like(o[want], r), rtol=2e-6,
                                       atol=0)


@pytest.mark.parametrize("backend,device", PAIRS)
def test_varlen_with_no_sequences_and_dropout(backend, device):
    need(backend, device)
    cfg = VARLEN["plain"]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device)
    with fastlm.use_backend(backend):
        empty = fastlm.varlen_attention(q[:0], k[:0], v[:0], cu_q[:1], cu_k[:1], 0, 0)
        assert empty.shape == (0, cfg["hq"], v.shape[-1])
        runs = []
        for p in (0.3, 0.3, 0.0):
            torch.manual_seed(2)
            runs.append(fastlm.varlen_attention(q, k, v, cu_q, cu_k, 13, 17, dropout_p=p))
    assert torch.equal(runs[0], runs[1]), "not reproducible under torch.manual_seed"
    assert runs[0].isfinite().all()
    assert not torch.equal(runs[0], runs[2]), "dropout_p=0.3 changed nothing"


# ---------------------------------------------------------------------------------------------
# Determinism.
def _det_run(backend, cfg, q, k, v, cu_q, cu_k, dout, p):
    torch.manual_seed(11)
    with fastlm.use_backend(backend):
        out, grads = _fwd_bwd(_varlen(cfg, cu_q, cu_k, dropout_p=p), _grad_leaves((q, k, v)),
                              _ident(), dout)
    return (out, *grads)


def _det_inputs(backend, device, dtype):
    cfg = VARLEN["odd-mqa" if interpreted(backend, device) else "long"]
    q, k, v, cu_q, cu_k = _packed(cfg, dtype, device, e=32, ev=32)
    return cfg, q, k, v, cu_q, cu_k, randn((q.shape[0], cfg["hq"], 32), dtype, device, seed=4)


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_varlen_deterministic(backend, device, dtype, p):
    """Two runs give identical bits: out, dq and dk, dv (summed over the GQA group)."""
    need(backend, device)
    if interpreted(backend, device) and (dtype != torch.float32 or p == 0.0):
        pytest.skip("the interpreter (slow) runs float32 with dropout only; the GPU runs all")
    cfg, *inputs = _det_inputs(backend, device, dtype)
    first = _det_run(backend, cfg, *inputs, p)
    second = _det_run(backend, cfg, *inputs, p)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_varlen_cpu_bitwise_across_thread_counts(dtype):
    need("cpu", "cpu")
    cfg, *inputs = _det_inputs("cpu", "cpu", dtype)
    assert_thread_count_invariant(lambda: _det_run("cpu", cfg, *inputs, 0.1))


# ---------------------------------------------------------------------------------------------
# The raw ops: layout, lse and the padded problem's dense lse.
def _varlen_ops(backend):
    if backend == "triton":
        assert attention.triton_ops_ready()
        return (torch.ops.fastlm.varlen_attention_fwd_triton,
                torch.ops.fastlm.varlen_attention_bwd_triton)
    return torch.ops.fastlm.varlen_attention_fwd, torch.ops.fastlm.varlen_attention_bwd


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_varlen_raw_ops_contract(backend, device):
    """out (total_q, Hq, Ev) contiguous in q's dtype; lse (Hq, total_q) float32 equal to the
    dense lse of the padded problem, +inf for rows of a sequence with no keys; the backward's
    grads contiguous with q, k, v's shapes, zero for keys no query sees."""
    need(backend, device)
    cfg = VARLEN["zero-length"]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device)
    fwd, bwd = _varlen_ops(backend)
    L, S = max(cfg["lq"]), max(cfg["lk"])
    out, lse = fwd(q, k, v, cu_q, cu_k, L, S, None, 0.0, True, 0.3)
    assert out.shape == (q.shape[0], 2, 24) and out.is_contiguous() and out.dtype == q.dtype
    assert lse.shape == (2, q.shape[0]) and lse.dtype == torch.float32 and lse.is_contiguous()
    m = _padding_mask(cfg, device)
    _, lse_d = attention.reference_attention_fwd(
        _padded(q, cfg["lq"], L).double(), _padded(k, cfg["lk"], S).double(),
        _padded(v, cfg["lk"], S).double(), m, None, 0.0, False, 0.3)
    want = _unpadded(lse_d.unsqueeze(-1), cfg["lq"])[..., 0].t()
    torch.testing.assert_close(lse, want.float(), atol=1e-5, rtol=1e-5)
    # Sequence 2 (query rows 4..10) has no keys; sequence 1 (key rows 5..7) has no queries.
    assert torch.isposinf(lse[:, 4:10]).all() and lse[:, :4].isfinite().all()
    assert torch.equal(out[4:10], torch.zeros_like(out[4:10]))
    dout = randn(out.shape, torch.float32, device, seed=5)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_q, cu_k, L, S, None, 0.0, True, 0.3)
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
    for g in (dq[4:10], dk[5:7], dv[5:7]):
        assert torch.equal(g, torch.zeros_like(g))
    want = attention.reference_varlen_attention_bwd(
        dout.double(), q.double(), k.double(), v.double(), out.double(), lse, cu_q, cu_k, L, S,
        None, 0.0, True, 0.3)
    for name, g, w in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cu_q,cu_k,max_q,match", [
    ([0, 5, 19], [0, 5, 25], 15, "cu_seqlens_q must start at 0, be non-decreasing and end at 20"),
    ([0, 12, 5, 20], [0, 5, 10, 25], 15, "cu_seqlens_q must start at 0, be non-decreasing"),
    ([0, 5, 20], [0, 5, 25, 25], 15, "cu_seqlens_q and cu_seqlens_k must have the same length"),
    ([0, 5, 20], [0, 5, 25], 10, r"a sequence is longer than max_seqlen \(10\) given for "
     "cu_seqlens_q"),
])
def test_varlen_cpu_op_checks_offsets(cu_q, cu_k, max_q, match):
    """The C++ op checks what the Python face checks (it reads CPU offsets directly)."""
    need("cpu", "cpu")
    q, k, v = torch.randn(20, 2, 8), torch.randn(25, 2, 8), torch.randn(25, 2, 8)
    with pytest.raises(RuntimeError, match="fastlm.varlen_attention_fwd: " + match):
        torch.ops.fastlm.varlen_attention_fwd(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k),
                                              max_q, 20, None, 0.0, False, 0.5)


# ---------------------------------------------------------------------------------------------
# opcheck on the ops' sample inputs.
def _fwd_samples(device):
    out = []
    rng = torch.tensor([987654321, 3], dtype=torch.int64, device=device)
    cfg = VARLEN["zero-length"]
    for dtype, flags in zip(DTYPES, ((None, 0.0, False), (rng, 0.3, True), (None, 0.0, True))):
        q, k, v, cu_q, cu_k = _packed(cfg, dtype, device, e=8, ev=16)
        cu_q = cu_q.to(torch.int64) if dtype == torch.float16 else cu_q
        out.append((q, k, v, cu_q, cu_k, 6, 5, *flags, 0.35))
    qg, kg, vg, cg_q, cg_k = _packed(VARLEN["causal-gqa"], torch.float32, device, e=8, ev=8)
    out.append((qg, kg, vg, cg_q, cg_k, 13, 17, rng, 0.2, True, 0.3))
    for i in (0, 1):  # float32 plain, float16 dropout (int64 offsets)
        q, k, v, *rest = out[i]
        out.append((*(t.detach().clone().requires_grad_() for t in (q, k, v)), *rest))
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_varlen_opcheck_cpp_ops(device):
    need(device, device)
    opcheck_pair(torch.ops.fastlm.varlen_attention_fwd, torch.ops.fastlm.varlen_attention_bwd,
                 device, _fwd_samples, bwd_samples_of(_fwd_samples))


# The interpreter (slow) runs a few: GQA with dropout, float16 dropout requiring grad; the
# backward of float16 dropout and of GQA with dropout.
def _interpreter_fwd_samples(device):
    return _fwd_samples(device)[3:6:2]


def _interpreter_bwd_samples(device, fwd):
    return bwd_samples_of(_fwd_samples)(device, fwd)[1::2]


@pytest.mark.triton
@pytest.mark.parametrize("device", ["cpu", CUDA_PARAM])
def test_varlen_opcheck_triton_ops(device):
    need("triton", device)
    fwd, bwd = _varlen_ops("triton")
    if device == "cpu":
        opcheck_pair(fwd, bwd, device, _interpreter_fwd_samples, _interpreter_bwd_samples,
                     triton=True)
    else:
        opcheck_pair(fwd, bwd, device, _fwd_samples, bwd_samples_of(_fwd_samples), triton=True)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break (the offsets are checked by device-side
# asserts when compiling); forward and backward as in eager.
def _varlen_block(q, k, v, cu_q, cu_k):
    h = fastlm.varlen_attention(q * 0.5, k, v, cu_q, cu_k, 13, 17, enable_gqa=True)
    return torch.tanh(h) + fastlm.varlen_attention(h, h, h, cu_q, cu_q, 13, 13, is_causal=True)


@pytest.mark.parametrize("backend,device", [
    pytest.param("torch", "cpu", id="torch-cpu"),
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("triton", "cuda", marks=[pytest.mark.cuda, pytest.mark.triton],
                 id="triton-cuda"),
])
def test_varlen_compile_fullgraph(backend, device):
    need(backend, device)
    cfg = VARLEN["causal-gqa"]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device, e=16, ev=16)
    dout = randn(q.shape, torch.float32, device, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(_varlen_block, backend="aot_eager", fullgraph=True)
    with fastlm.use_backend(backend):
        want, g_want = _fwd_bwd(lambda q, k, v: _varlen_block(q, k, v, cu_q, cu_k),
                                _grad_leaves((q, k, v)), _ident(), dout)
        got, g_got = _fwd_bwd(lambda q, k, v: compiled(q, k, v, cu_q, cu_k),
                              _grad_leaves((q, k, v)), _ident(), dout)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv"), g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_varlen_compiled_checks_offsets():
    """Under torch.compile bad offsets still raise (a device-side assert, checked on the CPU
    when the graph runs)."""
    need("cpu", "cpu")
    q, k, v = torch.randn(20, 2, 8), torch.randn(25, 2, 8), torch.randn(25, 2, 8)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v, cq, ck: fastlm.varlen_attention(q, k, v, cq, ck, 15, 20),
                       backend="aot_eager", fullgraph=True)
    good = fn(q, k, v, _cu([5, 15]), _cu([5, 20]))
    assert good.shape == (20, 2, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must start at 0, be non-decreasing"):
        fn(q, k, v, _cu([5, 15]), torch.tensor([0, 5, 24], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Gradients where needed, autocast, double backward, bad input.
@pytest.mark.parametrize("backend,device", PAIRS)
def test_varlen_grads_only_where_needed(backend, device):
    need(backend, device)
    cfg = VARLEN["plain"]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device)
    k.requires_grad_()
    with fastlm.use_backend(backend):
        out = _varlen(cfg, cu_q, cu_k)(q, k, v)
    dk, = torch.autograd.grad(out.sum(), (k,))
    with fastlm.use_backend("torch"):
        want, = torch.autograd.grad(_varlen(cfg, cu_q, cu_k)(q, k, v).sum(), (k,))
    torch.testing.assert_close(dk, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), fastlm.use_backend(backend):
        assert not _varlen(cfg, cu_q, cu_k)(q, k, v).requires_grad


@pytest.mark.parametrize("backend,device", PAIRS)
def test_varlen_autocast(backend, device):
    need(backend, device)
    amp = torch.bfloat16 if device == "cpu" else torch.float16
    cfg = VARLEN["causal-gqa"]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device)
    dout = randn((q.shape[0], cfg["hq"], v.shape[-1]), amp, device, seed=4)
    with torch.autocast(device, dtype=amp):
        with fastlm.use_backend(backend):
            got, g_got = _fwd_bwd(_varlen(cfg, cu_q, cu_k), _grad_leaves((q, k, v)), _ident(),
                                  dout)
        per_seq = _per_sequence(F.scaled_dot_product_attention, cfg)
        want, g_want = _fwd_bwd(per_seq, _grad_leaves((q, k, v)), _ident(), dout)
    leaves64 = [t.to(amp).double().requires_grad_() for t in (q, k, v)]
    ora, g_ora = _fwd_bwd(per_seq, leaves64, _ident(), dout)
    assert got.dtype == want.dtype == amp
    _check_grads(backend, device, cfg, FLOOR[amp], (got, *g_got), (ora, *g_ora), (want, *g_want))


@pytest.mark.parametrize("backend,device", KERNEL_PAIRS)
def test_varlen_double_backward_raises(backend, device):
    need(backend, device)
    cfg = VARLEN["plain"]
    q, k, v, cu_q, cu_k = _packed(cfg, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with fastlm.use_backend(backend):
        out = _varlen(cfg, cu_q, cu_k)(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out), create_graph=True)
    with pytest.raises(RuntimeError, match=r"fastlm.varlen_attention does not support double "
                       r"backward \(higher-order gradients\)"):
        torch.autograd.grad(dq.square().sum() + dk.sum() + dv.sum(), (q, k, v))


@pytest.mark.parametrize("args,err,match", [
    (dict(cu_q=[1, 5, 20]), ValueError, r"cu_seqlens_q must start at 0, be non-decreasing and "
     r"end at 20 \(the packed length\), got \[1, 5, 20\]"),
    (dict(cu_q=[0, 12, 5, 20], cu_k=[0, 5, 10, 25]), ValueError,
     "cu_seqlens_q must start at 0, be non-decreasing"),
    (dict(cu_k=[0, 5, 19]), ValueError, r"cu_seqlens_k must start at 0, .*end at 25"),
    (dict(cu_k=[0, 5, 25, 25]), ValueError, "cu_seqlens_q and cu_seqlens_k must have the same "
     "length, got 3 and 4"),
    (dict(max_q=10), ValueError, r"a sequence is longer than max_seqlen \(10\) given for "
     "cu_seqlens_q"),
    (dict(cu_dtype=torch.float32), ValueError, "cu_seqlens_q must be a 1-D int32/int64 tensor"),
    (dict(q_shape=(20, 2, 1, 8)), ValueError, "q must be a 3-D tensor"),
    (dict(v_total=24), ValueError, "k and v must have the same total length, got 25 and 24"),
    (dict(k_heads=3), ValueError, r"q, k and v heads \(dim 1: 2, 3, 2\) must match or broadcast"),
    (dict(gqa=True, q_heads=3), ValueError, r"with enable_gqa=True the query heads \(3\) must be "
     r"a multiple of the key heads \(2\)"),
    (dict(k_dtype=torch.float64), TypeError, "q, k and v must have one dtype"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\], got 1.5"),
])
def test_varlen_bad_input(args, err, match):
    q = torch.randn(args.get("q_shape", (20, args.get("q_heads", 2), 8)))
    k = torch.randn(25, args.get("k_heads", 2), 8, dtype=args.get("k_dtype", torch.float32))
    v = torch.randn(args.get("v_total", 25), 2, 8)
    cd = args.get("cu_dtype", torch.int32)
    cu_q = torch.tensor(args.get("cu_q", [0, 5, 20]), dtype=cd)
    cu_k = torch.tensor(args.get("cu_k", [0, 5, 25]), dtype=cd)
    with pytest.raises(err, match="fastlm.varlen_attention: " + match):
        fastlm.varlen_attention(q, k, v, cu_q, cu_k, args.get("max_q", 15), 20,
                                dropout_p=args.get("dropout_p", 0.0),
                                enable_gqa=args.get("gqa", False))

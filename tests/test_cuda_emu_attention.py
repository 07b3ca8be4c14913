"""The CUDA C++ attention kernels of csrc/cuda/attention.cu, run on the CPU by the CUDA emulator
(tests/cuda_emu: one fiber per CUDA thread; cp.async, ldmatrix and mma.sync emulated from the
PTX ISA's definitions), against the float64 oracle with the tolerance rule of conftest.py.

This is how the CUDA backend's kernels are checked on a machine without a GPU: the host code
(argument checks, mma_ready copies, grid and shared-memory sizes, dispatch on dtype and head
dim) and every kernel (the bf16/f16 tensor-core kernels for padded head dims 64, 128 and 256,
and the float32 SIMT kernels) run as written; only the PTX instructions and the CUDA runtime
are stand-ins. What it cannot show is in tests/cuda_emu/include/fastlm_emu.h: timing, the
hardware memory model between barriers, and what nvcc does (--use_fast_math's approximate
exp2 among it). On a GPU the same cases run for real in test_attention.py.
"""

import math

import pytest
import torch
from conftest import FLOOR, _check_2x, randn
from cuda_emu.build import load

from fastlm.ops.attention import dropout_keep, dropout_scale


@pytest.fixture(scope="module")
def emu():
    return load()


def _dt(dtype):
    return str(dtype).removeprefix("torch.")


class Case:
    def __init__(self, name, B, Hq, Hk, L, S, E, Ev, *, mask=None, causal=False, p=0.0,
                 view=None, empty_rows=()):
        self.name, self.B, self.Hq, self.Hk = name, B, Hq, Hk
        self.L, self.S, self.E, self.Ev = L, S, E, Ev
        self.mask = mask  # None | "bool" | "float32" | "same" (the input's dtype)
        self.causal, self.p, self.view = causal, p, view
        self.empty_rows = empty_rows  # query rows the bool mask forbids entirely

    def __repr__(self):
        return self.name


CASES = [
    Case("d64", 2, 2, 2, 64, 64, 64, 64),
    Case("odd-gqa-causal-l>s", 1, 4, 2, 70, 45, 40, 24, causal=True),
    Case("causal-l<s-tiles", 1, 2, 2, 37, 130, 64, 64, causal=True),
    Case("mqa-e128-ev136", 1, 4, 1, 33, 150, 128, 136),
    Case("d256-causal", 1, 1, 1, 80, 70, 256, 256, causal=True),
    Case("e8", 1, 2, 2, 20, 19, 8, 8),
    Case("e72-ev48", 1, 2, 2, 66, 67, 72, 48),
    Case("bool-mask-broadcast", 2, 2, 2, 50, 77, 64, 32, mask="bool", empty_rows=(3, 40)),
    Case("float32-mask", 1, 2, 2, 65, 65, 32, 32, mask="float32"),
    Case("same-dtype-mask-mqa", 1, 2, 1, 48, 90, 16, 16, mask="same"),
    Case("dropout", 2, 2, 2, 40, 70, 64, 64, p=0.2),
    Case("dropout-causal-gqa", 1, 4, 2, 70, 70, 32, 32, causal=True, p=0.5),
    Case("dropout-d256-mask", 1, 1, 1, 33, 41, 200, 160, mask="bool", p=0.3, empty_rows=(5,)),
    Case("strided-views", 2, 2, 2, 45, 52, 64, 64, view="strided"),
    Case("many-tiles-causal", 1, 1, 1, 200, 300, 64, 64, causal=True),
]


def _inputs(case, dtype):
    B, Hq, Hk, L, S = case.B, case.Hq, case.Hk, case.L, case.S
    if case.view == "strided":  # q as (B, L, H, E) transposed; k, v with a row stride of 2E
        q = randn((B, L, Hq, case.E), dtype, "cpu", seed=1).transpose(1, 2)
        k = randn((B, Hk, 2 * S, case.E), dtype, "cpu", seed=2)[:, :, ::2]
        v = randn((B, Hk, S, 2 * case.Ev), dtype, "cpu", seed=3)[..., : case.Ev]
    else:
        q = randn((B, Hq, L, case.E), dtype, "cpu", seed=1)
        k = randn((B, Hk, S, case.E), dtype, "cpu", seed=2)
        v = randn((B, Hk, S, case.Ev), dtype, "cpu", seed=3)
    mask = None
    g = torch.Generator().manual_seed(7)
    if case.mask == "bool":  # (L, S) seen as (B, Hq, L, S): stride-0 batch and head dims
        m = torch.rand((L, S), generator=g) < 0.7
        for r in case.empty_rows:
            m[r] = False
        mask = m.expand(B, Hq, L, S)
    elif case.mask is not None:
        m = torch.randn((B, Hq, L, S), generator=g)
        mask = m if case.mask == "float32" else m.to(dtype)
    dout = randn((B, Hq, L, case.Ev), dtype, "cpu", seed=4)
    return q, k, v, mask, dout


def _oracle(q, k, v, mask, case, scale, keep):
    """Attention in q's dtype with docs/attention.md's semantics: empty rows give zeros (and zero
    gradients), dropout multiplies the probabilities by keep / (1 - p). Returns (out, lse)."""
    hq, hk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    L, S = s.shape[-2:]
    if case.causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), -math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    empty = torch.isinf(s).all(-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), -1).masked_fill(empty[..., 0], math.inf)
    probs = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if keep is not None:
        probs = probs * (keep.to(probs.dtype) * dropout_scale(case.p))
    return probs @ v, lse


def _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    m = mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    out, lse = _oracle(*leaves, m, case, scale, keep)
    out.backward(dout.to(dtype))
    return out.detach(), lse.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_backward_against_float64(emu, case, dtype):
    q, k, v, mask, dout = _inputs(case, dtype)
    scale = 1 / math.sqrt(case.E)
    rng, keep = None, None
    if case.p > 0:
        rng = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64)
        keep = dropout_keep(rng, case.B, case.Hq, case.L, case.S, case.p)
        assert 0 < keep.sum() < keep.numel()
    out, lse = emu.attention_fwd(q, k, v, mask, rng, case.p, case.causal, scale)
    dq, dk, dv = emu.attention_bwd(dout, q, k, v, out, lse, mask, rng, case.p, case.causal, scale)
    assert out.shape == (case.B, case.Hq, case.L, case.Ev) and out.dtype == dtype
    assert lse.shape == (case.B, case.Hq, case.L) and lse.dtype == torch.float32
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == t.shape and g.dtype == dtype

    o64, lse64, g64 = _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, torch.float64)
    olo, _, glo = _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, dtype)
    _, lse32, _ = _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, torch.float32)
    live = torch.isfinite(lse64)
    assert torch.equal(torch.isinf(lse), ~live), "lse is +inf exactly on the empty rows"
    f, rep = FLOOR[dtype], math.sqrt(case.Hq // case.Hk)
    results = [("out", out, o64, olo, f), ("lse", lse[live], lse64[live], lse32[live], 1e-5),
               ("dq", dq, g64[0], glo[0], f), ("dk", dk, g64[1], glo[1], f * rep),
               ("dv", dv, g64[2], glo[2], f * rep)]
    failed = [msg for ok, _, _, msg in (_check_2x(*r[1:], r[0]) for r in results) if not ok]
    assert not failed, "\n".join(failed)
    if case.empty_rows:
        rows = list(case.empty_rows)
        assert torch.equal(out[:, :, rows], torch.zeros_like(out[:, :, rows]))
        assert torch.equal(dq[:, :, rows], torch.zeros_like(dq[:, :, rows]))


def _random_cases(n, seed=2026):
    """n random problems (seeded, so the same ones every run): lengths 1..150, head dims
    multiples of 8 up to 256, GQA groups, causal or a mask, dropout, dtypes."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    out = []
    for i in range(n):
        hk = pick([1, 2])
        hq = hk * pick([1, 2, 3])
        L, S = (int(torch.randint(1, 151, (1,), generator=g)) for _ in range(2))
        E, Ev = (8 * int(torch.randint(1, 33, (1,), generator=g)) for _ in range(2))
        kind = pick(["causal", "bool", "float32", None])
        p = pick([0.0, 0.0, 0.3])
        dt = pick([torch.float32, torch.float16, torch.bfloat16])
        case = Case(f"random{i}-b1-h{hq}/{hk}-l{L}-s{S}-e{E}-ev{Ev}-{kind}-p{p}", 1, hq, hk, L, S,
                    E, Ev, mask=kind if kind in ("bool", "float32") else None,
                    causal=kind == "causal", p=p)
        out.append(pytest.param(case, dt, id=f"{case.name}-{_dt(dt)}"))
    return out


@pytest.mark.parametrize("case,dtype", _random_cases(10))
def test_random_problems_against_float64(emu, case, dtype):
    test_forward_backward_against_float64(emu, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_results_do_not_depend_on_the_thread_schedule(emu, dtype):
    """Three fiber schedules (the emulator resumes threads in a seeded random order between
    barriers) give the same bits: no result depends on a race between warps."""
    case = Case("sched", 1, 4, 2, 70, 100, 64, 64, causal=True, p=0.25)
    q, k, v, _, dout = _inputs(case, dtype)
    rng = torch.tensor([5, 6], dtype=torch.int64)
    runs = []
    for seed in (1, 2, 3):
        emu.emu_seed(seed)
        out, lse = emu.attention_fwd(q, k, v, None, rng, case.p, True, 0.125)
        runs.append((out, lse) + tuple(
            emu.attention_bwd(dout, q, k, v, out, lse, None, rng, case.p, True, 0.125)))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_bad_head_dim_is_rejected_by_the_cuda_host_code(emu):
    q = torch.zeros(1, 1, 4, 12, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        emu.attention_fwd(q, q, q, None, None, 0.0, False, 1.0)


# ---------------------------------------------------------------------------------------------
# Varlen (packed sequences): the same kernels with per-sequence rows read from the offsets.
def _varlen_params():
    from test_attention_varlen import VARLEN

    out = []
    for name in VARLEN:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            out.append(pytest.param(name, dt, (16, 24), 0.0, id=f"{name}-{_dt(dt)}-e16-ev24"))
    out += [pytest.param("long", torch.bfloat16, (128, 128), 0.0, id="long-bfloat16-e128"),
            pytest.param("causal-gqa", torch.float16, (200, 256), 0.0, id="causal-gqa-f16-d256"),
            pytest.param("long", torch.float32, (72, 40), 0.0, id="long-float32-e72-ev40")]
    for name, p in (("causal-gqa", 0.3), ("zero-length", 0.5), ("odd-mqa", 0.2)):
        for dt in (torch.float32, torch.bfloat16):
            out.append(pytest.param(name, dt, (16, 24), p, id=f"{name}-p{p}-{_dt(dt)}"))
    return out


@pytest.mark.parametrize("name,dtype,heads,p", _varlen_params())
def test_varlen_against_float64(emu, name, dtype, heads, p):
    """varlen_attention_fwd/bwd on the emulated CUDA kernels: the padded dense problem written
    out in float64 with the contract's keep bits (test_attention_varlen's oracle), the tolerance
    rule; sequences with no keys give zeros, keys of empty query sequences get zero grads."""
    from test_attention_varlen import VARLEN, _packed, _padded_math

    cfg = VARLEN[name]
    q, k, v, cu_q, cu_k = _packed(cfg, dtype, "cpu", e=heads[0], ev=heads[1])
    n, L, S = len(cfg["lq"]), max(cfg["lq"]), max(cfg["lk"])
    scale = 1 / math.sqrt(heads[0])
    rng = torch.tensor([2024, 11], dtype=torch.int64) if p > 0 else None
    keep = (dropout_keep(rng, n, cfg["hq"], L, S, p) if p > 0
            else torch.ones(n, cfg["hq"], L, S, dtype=torch.bool))
    dout = randn((q.shape[0], cfg["hq"], heads[1]), dtype, "cpu", seed=4)
    out, lse = emu.varlen_attention_fwd(q, k, v, cu_q, cu_k, L, S, rng, p, cfg["causal"], scale)
    dq, dk, dv = emu.varlen_attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, L, S, rng, p,
                                          cfg["causal"], scale)
    assert out.shape == (q.shape[0], cfg["hq"], heads[1]) and lse.shape == (cfg["hq"], q.shape[0])

    def oracle(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = _padded_math(cfg, keep, p, scale)(*leaves)
        o.backward(dout.to(dt))
        return [o.detach()] + [t.grad for t in leaves]

    ora, low = oracle(torch.float64), oracle(dtype)
    f, rep = FLOOR[dtype], math.sqrt(cfg["hq"] // cfg["hk"])
    floors = (f, f, f * rep, f * rep)
    failed = [msg for name_, got, o, lo, fl in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                                                   ora, low, floors)
              for ok, _, _, msg in [_check_2x(got, o, lo, fl, name_)] if not ok]
    assert not failed, "\n".join(failed)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i, (a, b) in enumerate(zip(cfg["lq"], cfg["lk"])):
        if b == 0:
            rows = slice(cq[i], cq[i + 1])
            assert torch.equal(out[rows], torch.zeros_like(out[rows]))
            assert torch.isinf(lse[:, rows]).all()
        if a == 0:
            for t in (dk[ck[i]:ck[i + 1]], dv[ck[i]:ck[i + 1]]):
                assert torch.equal(t, torch.zeros_like(t))


def test_varlen_equals_dense_on_one_sequence(emu):
    """One sequence: varlen's kernels give the dense kernels' bits (same tiles, same order)."""
    q = randn((1, 2, 77, 64), torch.bfloat16, "cpu", seed=1)
    k = randn((1, 2, 90, 64), torch.bfloat16, "cpu", seed=2)
    v = randn((1, 2, 90, 64), torch.bfloat16, "cpu", seed=3)
    dout = randn((1, 2, 77, 64), torch.bfloat16, "cpu", seed=4)
    rng = torch.tensor([3, 4], dtype=torch.int64)
    out, lse = emu.attention_fwd(q, k, v, None, rng, 0.1, True, 0.125)
    grads = emu.attention_bwd(dout, q, k, v, out, lse, None, rng, 0.1, True, 0.125)
    packed = [t[0].transpose(0, 1) for t in (q, k, v, dout)]
    cu_q, cu_k = torch.tensor([0, 77], dtype=torch.int32), torch.tensor([0, 90], dtype=torch.int32)
    vout, vlse = emu.varlen_attention_fwd(*packed[:3], cu_q, cu_k, 77, 90, rng, 0.1, True, 0.125)
    vgrads = emu.varlen_attention_bwd(packed[3], *packed[:3], vout, vlse, cu_q, cu_k, 77, 90, rng,
                                      0.1, True, 0.125)
    assert torch.equal(vout, out[0].transpose(0, 1))
    assert torch.equal(vlse, lse[0])
    for g, vg in zip(grads, vgrads):
        assert torch.equal(vg, g[0].transpose(0, 1))


def test_varlen_inconsistent_offsets_stay_in_bounds(emu):
    """Offsets past the packed length (which the Python face rejects) are clamped by the
    kernels: the call completes and every row it computes is finite."""
    q = randn((10, 2, 16), torch.float16, "cpu", seed=1)
    k = randn((12, 2, 16), torch.float16, "cpu", seed=2)
    cu_q = torch.tensor([0, 4, 50], dtype=torch.int32)   # ends past 10
    cu_k = torch.tensor([0, 30, 12], dtype=torch.int32)  # decreasing, past 12
    out, _ = emu.varlen_attention_fwd(q, k, k, cu_q, cu_k, 64, 64, None, 0.0, False, 0.25)
    assert torch.isfinite(out[:4]).all()


def test_varlen_cuda_host_checks_name_the_argument(emu):
    """The CUDA varlen ops' own checks (the shared ones are tested on the CPU op)."""
    q = torch.zeros(6, 2, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"max_seqlen_q and max_seqlen_k must be in \[0, 2"):
        emu.varlen_attention_fwd(q, q, q, cu, cu, -1, 6, None, 0.0, False, 0.25)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        q12 = torch.zeros(6, 2, 12, dtype=torch.bfloat16)
        emu.varlen_attention_fwd(q12, q12, q12, cu, cu, 6, 6, None, 0.0, False, 0.25)
    out, lse = emu.varlen_attention_fwd(q, q, q, cu, cu, 6, 6, None, 0.0, False, 0.25)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(2, 6\)"):
        emu.varlen_attention_bwd(out, q, q, q, out, lse.t(), cu, cu, 6, 6, None, 0.0, False, 0.25)


# ---------------------------------------------------------------------------------------------
# The options (docs/attention.md, "Causal, windows, soft-capping"): the band of keys (causal
# with the lower-right diagonal, sliding windows) and soft-capping, on every kernel (bf16/f16
# tensor-core kernels at padded head dims 64, 128, 256 and the float32 SIMT kernels), against
# fastlm's reference in float64 (the same keep bits) with the tolerance rule.
class Opt:
    def __init__(self, name, B, Hq, Hk, L, S, E, Ev, causal=False, window=(-1, -1),
                 lower_right=False, softcap=0.0, p=0.0, mask=None, dtypes=None):
        self.name, self.B, self.Hq, self.Hk, self.L, self.S = name, B, Hq, Hk, L, S
        self.E, self.Ev, self.causal, self.window = E, Ev, causal, window
        self.lower_right, self.softcap, self.p, self.mask = lower_right, softcap, p, mask
        self.dtypes = dtypes or (torch.float32, torch.bfloat16)

    def opts(self):
        return (*self.window, self.lower_right, self.softcap)


OPT_CASES = [
    # lower-right causal, L < S: the diagonal starts at key S - L (GQA)
    Opt("causal-lower-right-l<s-gqa", 1, 4, 2, 37, 130, 64, 64, causal=True, lower_right=True),
    # L > S: the first L - S rows attend nothing (whole query blocks with no key tile)
    Opt("causal-lower-right-l>s", 1, 2, 2, 150, 40, 64, 64, causal=True, lower_right=True,
        dtypes=(torch.float32, torch.float16)),
    # a narrow window over many tiles: key tiles skipped on both sides of every block
    Opt("window-20-10-long", 1, 2, 1, 200, 220, 64, 64, window=(20, 10)),
    Opt("window-causal-left-30-d128", 1, 2, 2, 150, 150, 128, 128, causal=True,
        window=(30, -1), dtypes=(torch.bfloat16,)),
    Opt("window-lower-right-l<s", 1, 2, 2, 70, 200, 32, 48, window=(5, 70), lower_right=True),
    Opt("window-right-only-l>s", 1, 2, 2, 90, 33, 16, 16, window=(-1, 3)),
    Opt("window-0-0", 1, 1, 1, 40, 40, 8, 8, window=(0, 0)),
    Opt("window-beyond-any-length", 1, 1, 1, 30, 50, 16, 16, causal=True,
        window=(2 ** 40, 2 ** 40), lower_right=True),
    Opt("softcap-strong", 2, 2, 2, 65, 77, 64, 64, softcap=1.5),
    Opt("softcap-float-mask-d256", 1, 1, 1, 33, 41, 200, 160, softcap=4.0, mask="float32",
        dtypes=(torch.bfloat16, torch.float32)),
    Opt("softcap-bool-mask", 1, 2, 2, 50, 45, 32, 32, softcap=2.0, mask="bool"),
    Opt("everything-dropout-gqa", 1, 4, 2, 70, 90, 40, 24, causal=True, window=(12, -1),
        lower_right=True, softcap=3.0, p=0.3, dtypes=(torch.float32, torch.bfloat16,
                                                      torch.float16)),
]


def _opt_params():
    return [pytest.param(c, dt, id=f"{c.name}-{_dt(dt)}") for c in OPT_CASES for dt in c.dtypes]


@pytest.mark.parametrize("case,dtype", _opt_params())
def test_options_against_float64(emu, case, dtype):
    from fastlm.ops.attention import reference_attention_bwd, reference_attention_fwd

    q, k, v, _, dout = _inputs(Case(case.name, case.B, case.Hq, case.Hk, case.L, case.S, case.E,
                                    case.Ev), dtype)
    mask = None
    g = torch.Generator().manual_seed(11)
    if case.mask == "bool":
        mask = (torch.rand((case.L, case.S), generator=g) < 0.7).expand(case.B, case.Hq, case.L,
                                                                         case.S)
    elif case.mask == "float32":
        mask = torch.randn((case.B, case.Hq, case.L, case.S), generator=g)
    rng = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64) if case.p > 0 else None
    args = (mask, rng, case.p, case.causal, 1 / math.sqrt(case.E), *case.opts())
    out, lse = emu.attention_fwd(q, k, v, *args)
    grads = emu.attention_bwd(dout, q, k, v, out, lse, *args)

    d64 = [t.double() for t in (q, k, v)]
    o64, l64 = reference_attention_fwd(*d64, *args)
    g64 = reference_attention_bwd(dout.double(), *d64, o64, l64, *args)
    olo, llo = reference_attention_fwd(q, k, v, *args)  # the reference in the inputs' dtype
    glo = reference_attention_bwd(dout, q, k, v, olo, llo, *args)
    live = torch.isfinite(l64)
    assert torch.equal(torch.isinf(lse), ~live), "lse is +inf exactly on the rows with no key"
    f, rep = FLOOR[dtype], math.sqrt(case.Hq // case.Hk)
    results = [("out", out, o64, olo, f), ("lse", lse[live], l64[live], llo[live], 1e-5)]
    results += [(n, gr, go, gl, f * (1 if n == "dq" else rep))
                for n, gr, go, gl in zip(("dq", "dk", "dv"), grads, g64, glo)]
    failed = [msg for ok, _, _, msg in (_check_2x(*r[1:], r[0]) for r in results) if not ok]
    assert not failed, "\n".join(failed)
    dead = ~live  # rows that attend no key: zeros, and zero query grads
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))
    assert torch.equal(grads[0][dead], torch.zeros_like(grads[0][dead]))


def test_options_at_their_defaults_are_the_plain_kernels(emu):
    """Options that change nothing give the plain op's bits: lower_right without causal or a
    window, lower_right with L == S, windows at least as wide as the problem, causal with a
    window whose right bound is positive (causal caps it at 0)."""
    q = randn((1, 2, 70, 64), torch.bfloat16, "cpu", seed=1)
    k = randn((1, 2, 70, 64), torch.bfloat16, "cpu", seed=2)
    dout = randn((1, 2, 70, 64), torch.bfloat16, "cpu", seed=4)

    def run(causal, *opts):
        out, lse = emu.attention_fwd(q, k, k, None, None, 0.0, causal, 0.125, *opts)
        return (out, lse, *emu.attention_bwd(dout, q, k, k, out, lse, None, None, 0.0, causal,
                                             0.125, *opts))

    for causal, plain, same in ((False, (), (-1, -1, True, 0.0)),
                                (True, (), (-1, -1, True, 0.0)),
                                (False, (), (70, 69, False, 0.0)),
                                (True, (), (-1, 5, False, 0.0))):
        for a, b in zip(run(causal, *plain), run(causal, *same)):
            assert torch.equal(a, b)


def test_options_bad_values_are_rejected_by_the_cuda_host_code(emu):
    q = torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="window_left and window_right must be >= -1"):
        emu.attention_fwd(q, q, q, None, None, 0.0, False, 1.0, -2, -1, False, 0.0)
    with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
        emu.attention_fwd(q, q, q, None, None, 0.0, False, 1.0, -1, -1, False, math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dt)
def test_varlen_options_against_float64(emu, dtype):
    """varlen with a window, the lower-right diagonal (each sequence's own S - L), soft-capping
    and dropout, against fastlm's varlen reference in float64."""
    from fastlm.ops.attention import reference_varlen_attention_bwd, reference_varlen_attention_fwd

    lq, lk = [30, 0, 75, 9], [50, 12, 40, 0]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q = randn((sum(lq), 4, 32), dtype, "cpu", seed=1)
    k = randn((sum(lk), 2, 32), dtype, "cpu", seed=2)
    v = randn((sum(lk), 2, 40), dtype, "cpu", seed=3)
    dout = randn((sum(lq), 4, 40), dtype, "cpu", seed=4)
    rng = torch.tensor([99, 3], dtype=torch.int64)
    args = (cu_q, cu_k, max(lq), max(lk), rng, 0.2, True, 32 ** -0.5, 9, -1, True, 2.5)
    out, lse = emu.varlen_attention_fwd(q, k, v, *args)
    grads = emu.varlen_attention_bwd(dout, q, k, v, out, lse, *args)
    d64 = [t.double() for t in (q, k, v)]
    o64, l64 = reference_varlen_attention_fwd(*d64, *args)
    g64 = reference_varlen_attention_bwd(dout.double(), *d64, o64, l64, *args)
    olo, llo = reference_varlen_attention_fwd(q, k, v, *args)
    glo = reference_varlen_attention_bwd(dout, q, k, v, olo, llo, *args)
    live = torch.isfinite(l64)
    assert torch.equal(torch.isinf(lse), ~live)
    f = FLOOR[dtype]
    results = [("out", out, o64, olo, f), ("lse", lse[live], l64[live], llo[live], 1e-5)]
    results += [(n, gr, go, gl, f * (1 if n == "dq" else math.sqrt(2)))
                for n, gr, go, gl in zip(("dq", "dk", "dv"), grads, g64, glo)]
    failed = [msg for ok, _, _, msg in (_check_2x(*r[1:], r[0]) for r in results) if not ok]
    assert not failed, "\n".join(failed)

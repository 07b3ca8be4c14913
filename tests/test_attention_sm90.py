"""The Hopper Triton attention kernels (fastlm/kernels/attention_sm90.py: TMA tiles; the fused 5-matmul
backward with its ordered dQ hand-off; the split backward's dK/dV and dQ kernels) and the
per-arch table that chooses them.

1. Correctness, through Triton's interpreter (or natively on a GPU): the kernels forced on,
   with their table widened to every feature they implement (masks, causal, dropout, varlen,
   GQA, head dims 64 and 128 in every kernel) and to small tiles, so that short sequences span
   several query tiles and key blocks and the dQ hand-off runs between many key blocks. The
   interpreter asserts, at every hand-off, that the earlier contributors have all arrived
   (device_assert in _wait_count): a wrong order, or a contributor that never arrives, fails.
   The split backward runs with dK/dV in one launch and in two (dV, then dK). Checked against
   the float64 oracle with the tolerance rule, dropout bits included.
2. The table: which inputs take which kernels on sm_90 and which fall back to the
   FlashAttention-2 kernels (float32, head dims above 128, untileable strides, sm_80).
3. The SASS for sm_90 (triton here, no GPU needed) of every kernel that ships for sm_90, the
   FlashAttention-2 ones included: no spills but the few the tables list (and none of those
   inside a tile loop), the expected warps, no wgmma whose warp layout covers more rows or
   columns than its product (duplicated warpgroup work, from the TTGIR); the TMA kernels
   also: TMA loads (UTMALDG), wgmma (HGMMA) with N >= 64 only. A representative subset runs
   in CI; every table entry, both 16-bit dtypes, runs on demand (FASTLM_ONDEMAND=1).
"""

import os
import re
import subprocess

import pytest
import torch

import test_attention as ta
import test_attention_varlen as tv
from conftest import GPU, randn
from fastlm.kernels import attention as tk
from fastlm.kernels import attention_sm90 as sm90

DEVICE = "cuda" if GPU else "cpu"
BACKEND = ("triton", DEVICE)
pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _available():
    ta.need(*BACKEND)
    if GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA kernels need sm_90 (TMA, wgmma)")


def _every_variant(monkeypatch, fwd_tile, bwd_tile, dkdv_tile, dq_tile):
    """Widen attention_sm90's table to every (causal, dropout), masks and varlen, at head dims
    64 and 128, with the given (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles."""
    every = sm90._every
    for kind, tile in (("fwd", fwd_tile), ("bwd", bwd_tile), ("dkdv", dkdv_tile),
                       ("dq", dq_tile)):
        monkeypatch.setitem(sm90.CONFIGS, kind, {64: every(tile), 128: every(tile)})
    monkeypatch.setattr(sm90, "MASKS", dict.fromkeys(sm90.MASKS, True))
    monkeypatch.setattr(sm90, "VARLEN", dict.fromkeys(sm90.VARLEN, True))
    monkeypatch.setattr(sm90, "EXCLUDED", set())
    monkeypatch.setattr(sm90, "EXCLUDED_OPTIONS", {})


# Small tiles (interpreter) with BLOCK_M != BLOCK_N both ways in the backward, so that the
# contributors of a query tile (key blocks n with n * BLOCK_N < (j + 1) * BLOCK_M) are not the
# diagonal alone; and the shipped GPU tiles. Per tiling: the forward, fused backward, dK/dV and
# dQ tiles.
TILES = {
    "bm16-bn32": ((32, 32, 4, 2), (16, 32, 4, 1), (16, 32, 4, 2), (32, 16, 4, 2)),
    "bm32-bn16": ((16, 32, 4, 2), (32, 16, 4, 1), (32, 16, 4, 2), (16, 32, 4, 2)),
}
if GPU:
    TILES["shipped"] = ((128, 128, 8, 2), (64, 64, 4, 1), (64, 64, 4, 2), (128, 64, 8, 2))
# The backward variants: the fused kernel; the split one with dK/dV in one launch ("split")
# and in two ("split2").
BWD = {"fused": ("fused", None), "split": ("split", (0,)), "split2": ("split", (1, 2))}
RUNS = [("bm16-bn32", "fused"), ("bm32-bn16", "fused"), ("bm16-bn32", "split"),
        ("bm32-bn16", "split2")]
if GPU:
    RUNS += [("shipped", "fused"), ("shipped", "split"), ("shipped", "split2")]


def _forced(monkeypatch, tiles, bwd):
    """Force the TMA kernels (the backward variant `bwd` of BWD) with the table widened;
    yields the list of (kind, variant) that ran."""
    _every_variant(monkeypatch, *TILES[tiles])
    name, parts = BWD[bwd]
    if parts is not None:
        monkeypatch.setattr(sm90, "dkdv_parts", lambda *a, **k: parts)
    ran = []
    real = tk.variant

    def spy(kind, *args, **kw):
        got = real(kind, *args, **kw)
        ran.append((kind, got))
        return got

    monkeypatch.setattr(tk, "variant", spy)
    with tk.force_variant(fwd="tma", bwd=name):
        yield ran


@pytest.fixture(params=RUNS, ids=[f"{t}-{b}" for t, b in RUNS])
def tma(request, monkeypatch):
    """The TMA kernels forced, for each (tiling, backward variant) of RUNS."""
    yield from _forced(monkeypatch, *request.param)


@pytest.fixture(params=["fused", "split"])
def tma_one(request, monkeypatch):
    """The TMA kernels forced, one tiling (for the checks that do not depend on it), with
    each backward kernel."""
    yield from _forced(monkeypatch, "bm16-bn32", request.param)


@pytest.fixture
def tma_fwd(monkeypatch):
    """The TMA kernels forced, one tiling and backward (for forward-only checks)."""
    yield from _forced(monkeypatch, "bm16-bn32", "fused")


def _ran_tma(ran, kinds=("fwd", "bwd")):
    for kind in kinds:
        assert {(kind, "tma"), (kind, "fused"), (kind, "split")} & set(ran), \
            f"the {kind} TMA kernel did not run: {ran}"


# ---------------------------------------------------------------------------------------------
# 1. Correctness.
CASES = [
    ta.Case("plain", (2, 3, 37, 32), (2, 3, 45, 32)),
    ta.Case("causal-L<S", (1, 2, 29, 64), (1, 2, 71, 64), causal=True),
    ta.Case("causal-L>S", (1, 2, 70, 16), (1, 2, 33, 16), causal=True),
    ta.Case("gqa-4-causal", (1, 8, 40, 64), (1, 2, 40, 64), gqa=True, causal=True),
    ta.Case("bool-mask", (2, 2, 23, 32), (2, 2, 50, 32), mask=((2, 1, 23, 50), "bool")),
    ta.Case("float-mask-inf", (1, 2, 33, 16), (1, 2, 40, 16), mask=((33, 40), "float-inf")),
    ta.Case("head-dim-128", (1, 2, 20, 128), (1, 2, 36, 128)),
    ta.Case("head-dim-40-Ev-24", (1, 2, 21, 40), (1, 2, 35, 40), (1, 2, 35, 24)),
    ta.Case("blhe-causal", (2, 3, 33, 32), (2, 3, 33, 32), view="blhe", causal=True),
]


# bfloat16 for every case, float16 for two (the interpreter is slow).
CASE_DTYPES = ([pytest.param(c, torch.bfloat16, id=f"{c.name}-bfloat16") for c in CASES]
               + [pytest.param(c, torch.float16, id=f"{c.name}-float16") for c in CASES[:2]])


@pytest.mark.parametrize("case,dtype", CASE_DTYPES)
def test_tma_kernels_match_oracle(tma, case, dtype):
    ta.compare_sdpa(*BACKEND, case, dtype)
    _ran_tma(tma)


# The attention options (docs/attention.md, "Causal, windows, soft-capping") on the TMA
# forward and the split backward (the fused backward has none: such calls take the split one):
# test_attention_options' float64 oracle and cases.
OPTION_CASES = ["causal-lower-right-L>S", "window-lower-right-L<S", "softcap-causal-window",
                "softcap", "window-causal-left-7"]


@pytest.fixture
def split_spy(monkeypatch):
    """The kernels each split backward chose ({"dkdv": ..., "dq": ...} per call)."""
    chosen = []
    real = tk.split_kernels

    def spy(*args, **kw):
        got = real(*args, **kw)
        chosen.append(got)
        return got

    monkeypatch.setattr(tk, "split_kernels", spy)
    return chosen


@pytest.mark.parametrize("name", OPTION_CASES)
def test_tma_kernels_take_the_options(tma, split_spy, name):
    import test_attention_options as tao

    case = next(c for c in tao.OPTION_CASES if c[0] == name)
    _, L, S, E, causal, window, lower_right, softcap, hq, hk = case
    tao._compare(*BACKEND, torch.bfloat16, L, S, E, causal, window, lower_right, softcap, hq,
                 hk)
    assert ("fwd", "tma") in tma, tma
    assert ("bwd", "split") in tma, f"options run the split backward: {tma}"
    assert split_spy and all(k == {"dkdv": "tma", "dq": "tma"} for k in split_spy), split_spy


def test_tma_options_with_dropout_are_the_reference(tma_one, split_spy):
    import test_attention_options as tao

    tao.test_options_with_dropout_are_the_reference(*BACKEND)
    assert ("fwd", "tma") in tma_one and ("bwd", "split") in tma_one, tma_one
    assert all(k == {"dkdv": "tma", "dq": "tma"} for k in split_spy), split_spy


def test_tma_varlen_options_are_each_sequence_alone(tma_one, split_spy):
    import test_attention_options as tao

    tao.test_varlen_options_are_each_sequence_alone(*BACKEND)
    assert ("fwd", "tma") in tma_one and ("bwd", "split") in tma_one, tma_one
    assert all(k == {"dkdv": "tma", "dq": "tma"} for k in split_spy), split_spy


def test_tma_option_table():
    """Soft-capping with a mask runs the FlashAttention-2 kernels (the TMA dK/dV kernel
    recovers tanh from p, which an additive mask would shift); the fused backward takes no
    option; without a mask the forward and split kernels take them (where EXCLUDED_OPTIONS
    does not list the variant)."""
    bf = torch.bfloat16
    for kind in ("fwd", "bwd", "dkdv", "dq"):
        assert not sm90.supports(kind, bf, 64, 64, True, False, False, False, False, True)
    assert not sm90.supports("bwd", bf, 64, 64, False, False, False, False, True)
    for kind in ("fwd", "dkdv", "dq"):
        assert sm90.supports(kind, bf, 64, 64, False, False, False, True, True, False)
    assert not sm90.supports("dkdv", bf, 128, 128, False, False, True, False, False, True)
    assert sm90.supports("fwd", bf, 64, 64, False, False, True, True, False, True)
    assert not sm90.supports("fwd", torch.float16, 64, 64, False, False, True, True, False,
                             True)
    for v in sm90.option_variants():
        kind, part, d, causal, dropout, _, varlen, window, softcap = v
        assert "bfloat16" not in sm90.EXCLUDED_OPTIONS.get(
            (kind, d, causal, dropout, varlen, window, softcap), ())
        if kind == "dkdv":
            two = (d, causal, dropout, varlen, window, softcap) in sm90.DKDV_TWO_PASS_OPTIONS
            assert (part in (1, 2)) == two


def test_tma_kernels_fully_masked_rows(tma):
    """Rows that may attend no key: out 0, lse +inf, zero gradients (docs/attention.md)."""
    dt = torch.bfloat16
    q, k, v = (randn((1, 2, 19, 32), dt, DEVICE, seed=i) for i in range(3))
    mask = torch.rand(1, 2, 19, 19, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[:, :, 3] = False
    mask[:, 1, 10:14] = False
    mask = mask.to(DEVICE)
    out, lse = tk.forward(q, k, v, mask, None, 0.0, False, 32 ** -0.5)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isinf(lse[:, :, 3]).all() and (lse[:, :, 3] > 0).all()
    dq, dk, dv = tk.backward(torch.ones_like(out), q, k, v, out, lse, mask, None, 0.0, False,
                             32 ** -0.5)
    assert torch.equal(dq[:, 1, 10:14], torch.zeros_like(dq[:, 1, 10:14]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    _ran_tma(tma)


@pytest.mark.parametrize("case,p", [(ta.DROPOUT_CASES[0][0], 0.2), (ta.DROPOUT_CASES[1][0], 0.5),
                                    (ta.DROPOUT_CASES[2][0], 0.1)], ids=["plain", "causal-gqa",
                                                                        "bool-mask"])
def test_tma_dropout_bits_are_the_contract(tma, case, p):
    """The keep bits of dropout_keep (every backend's): a single differing bit fails the
    tolerance rule by far."""
    ta.test_dropout_matches_reference_bits(*BACKEND, case, p, torch.bfloat16)
    _ran_tma(tma)


@pytest.mark.parametrize("name", ["causal-gqa", "zero-length", "long"])
def test_tma_varlen_matches_per_sequence_oracle(tma, name):
    tv.test_varlen_matches_per_sequence_oracle(*BACKEND, name, torch.float16, (40, 40))
    _ran_tma(tma)


def test_tma_varlen_dropout_is_the_padded_problems(tma):
    tv.test_varlen_dropout_is_the_padded_problems(*BACKEND, "odd-mqa", 0.2, torch.bfloat16)
    _ran_tma(tma)


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_tma_backward_is_deterministic(tma_one, p):
    """The fused backward's dQ sums arrive in a fixed order: two runs, the same bits."""
    dt = torch.bfloat16
    q, k, v, dout = (randn((1, 4, 45, 32), dt, DEVICE, seed=i) for i in range(4))
    k, v = k[:, :2], v[:, :2]
    rng = torch.tensor([123, 4], dtype=torch.int64, device=DEVICE) if p else None
    out, lse = tk.forward(q, k, v, None, rng, p, True, 0.2)
    first = tk.backward(dout, q, k, v, out, lse, None, rng, p, True, 0.2)
    second = tk.backward(dout, q, k, v, out, lse, None, rng, p, True, 0.2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _ran_tma(tma_one)


def test_tma_persistent_forward(tma_fwd, monkeypatch):
    """The persistent grid (programs looping over query tiles; on the CPU 2 programs) gives
    the same result as one tile per program."""
    monkeypatch.setattr(sm90, "PERSISTENT_FWD", True)
    ta.compare_sdpa(*BACKEND, ta.Case("p", (1, 2, 40, 16), (1, 2, 40, 16), causal=True),
                    torch.bfloat16)  # 2 heads x 2 query tiles on 2 programs
    _ran_tma(tma_fwd, ("fwd",))


# ---------------------------------------------------------------------------------------------
# 2. The table.
def _qkv(dtype=torch.bfloat16, e=64, ev=None, L=40, S=50):
    ev = e if ev is None else ev
    q = torch.randn(2, 4, L, e).to(dtype)
    k = torch.randn(2, 2, S, e).to(dtype)
    v = torch.randn(2, 2, S, ev).to(dtype)
    return q, k, v, torch.empty(2, 4, L, ev, dtype=dtype)


@pytest.mark.parametrize("kind,e,masked,causal,dropout,varlen,want", [
    ("fwd", 64, False, False, False, False, "tma"),
    ("fwd", 128, False, True, True, False, "tma"),
    ("fwd", 40, False, True, False, True, "tma"),
    ("fwd", 64, True, False, False, False, "fa2"),   # masks spill in the TMA forward
    ("fwd", 256, False, False, False, False, "fa2"),  # no tile above head dim 128
    ("bwd", 64, False, False, False, False, "fused"),
    ("bwd", 64, False, True, False, False, "split"),  # the fused backward spills when causal,
    ("bwd", 64, False, False, True, False, "split"),  # with dropout,
    ("bwd", 128, False, False, False, False, "split"),  # at head dim 128,
    ("bwd", 64, False, False, False, True, "split"),  # with packed sequences,
    ("bwd", 128, True, False, True, False, "split"),  # and with masks
    ("bwd", 256, False, False, False, False, "fa2"),  # no tile above head dim 128
])
def test_table_on_sm90(kind, e, masked, causal, dropout, varlen, want):
    t = _qkv(e=e)
    assert tk.variant(kind, t, e, e, masked, causal, dropout, 90, varlen) == want


def test_split_backward_table():
    """Which kernels the split backward runs, and when dK/dV takes two launches."""
    bf = torch.bfloat16
    tma = {"dkdv": "tma", "dq": "tma"}
    assert tk.split_kernels(bf, 128, 128, False, True, True) == tma
    assert tk.split_kernels(bf, 128, 128, True, False, False, True) == tma
    # dQ with a mask and dropout at head dim 128 spills: its FlashAttention-2 kernel runs
    assert tk.split_kernels(bf, 128, 128, True, False, True) == {"dkdv": "tma", "dq": "fa2"}
    assert tk.split_kernels(bf, 64, 64, True, False, True) == tma
    assert tk.split_kernels(torch.float32, 64, 64, False, False, False) == {"dkdv": "fa2",
                                                                           "dq": "fa2"}
    assert sm90.dkdv_parts(128, 128, 0, False, False) == (0,)
    assert sm90.dkdv_parts(128, 128, 0, True, False) == (0,)   # 8 bytes spilled, accepted
    assert sm90.dkdv_parts(128, 128, 0, True, True) == (1, 2)
    assert sm90.dkdv_parts(128, 128, 1, False, False) == (1, 2)
    assert sm90.dkdv_parts(128, 128, 0, True, False, True) == (1, 2)
    assert sm90.dkdv_parts(64, 64, 0, True, True) == (0,)
    assert sm90.dkdv_parts(64, 64, 2, False, True) == (1, 2)
    # options: one launch, two, or the FlashAttention-2 dK/dV kernel (EXCLUDED_OPTIONS)
    assert sm90.dkdv_parts(128, 128, 0, False, False, False, True, False) == (0,)
    assert sm90.dkdv_parts(128, 128, 0, False, False, False, False, True) == (1, 2)
    assert tk.split_kernels(bf, 128, 128, False, False, True, False, (False, True, ())) == {
        "dkdv": "fa2", "dq": "tma"}
    # every accepted spill names a variant the table ships (options: a 9-tuple)
    shipped = set(sm90.variants()) | set(sm90.option_variants())
    for key in sm90.SPILLS:
        assert key in shipped, key


def test_table_falls_back_where_tma_cannot_go():
    q, k, v, o = _qkv()
    assert tk.variant("fwd", (q, k, v, o), 64, 64, False, False, False, 80) == "fa2"
    f32 = _qkv(torch.float32)
    assert tk.variant("fwd", f32, 64, 64, False, False, False, 90) == "fa2"
    # A head dim whose rows are not 16-byte multiples (E = 20: 40 bytes), a row stride likewise
    # (the first 32 columns of a 36-wide tensor: 72 bytes), a broadcast (stride 0) head.
    q20, k20, v20, o20 = _qkv(e=20)
    assert tk.variant("fwd", (q20, k20, v20, o20), 20, 20, False, False, False, 90) == "fa2"
    odd = torch.randn(2, 4, 40, 36).to(torch.bfloat16)[..., :32]
    assert not sm90.tma_ready(odd)
    assert tk.variant("fwd", (odd, k[..., :32], v[..., :32], o[..., :32]), 32, 32, False,
                      False, False, 90) == "fa2"
    assert not sm90.tma_ready(k.expand(2, 2, 50, 64)[:, :1].expand(2, 2, 50, 64))
    # size-1 dims may have any stride (never stepped along): the view fixes them.
    one = torch.randn(1, 1, 40, 64).to(torch.bfloat16).as_strided((1, 1, 40, 64), (3, 5, 64, 1))
    assert sm90.tma_ready(one)
    assert sm90._tma_view(one).stride() == (8, 8, 64, 1)
    with tk.force_variant(fwd="fa2"):
        assert tk.variant("fwd", (q, k, v, o), 64, 64, False, False, False, 90) == "fa2"
    with pytest.raises(ValueError, match="force_variant"):
        tk.force_variant(fwd="fast")
    with pytest.raises(ValueError, match="force_variant"):
        tk.force_variant(fwd="split")


def test_tma_forward_runs_for_the_shipped_table(monkeypatch):
    """With the shipped table (no widening), a 16-bit causal forward takes the TMA kernel and
    its backward (causal) the split TMA kernels; both match the oracle."""
    ran = []
    real = tk.variant

    def spy(kind, *args, **kw):
        ran.append((kind, real(kind, *args, **kw)))
        return ran[-1][1]

    monkeypatch.setattr(tk, "variant", spy)
    ta.compare_sdpa(*BACKEND, ta.Case("c", (1, 2, 30, 64), (1, 2, 30, 64), causal=True),
                    torch.bfloat16)
    assert ran == [("fwd", "tma"), ("bwd", "split")], ran


# ---------------------------------------------------------------------------------------------
# 3. SASS and TTGIR for sm_90 (compiled here; a representative subset: ~1 min on 2 cores).
def _tool(name):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def duplicated_wgmma(ttgir):
    """The warp_group_dots of a TTGIR whose mma layout tile (warpsPerCTA x instrShape) is
    larger than the product, i.e. whose warpgroups compute the same elements: a list of
    (M, N, warpsPerCTA, instrShape)."""
    layouts = {}
    for name, wm, wn, im, i_n in re.findall(
            r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = 3.*?warpsPerCTA = \[(\d+), (\d+)\]"
            r".*?instrShape = \[(\d+), (\d+), \d+\]", ttgir, re.M):
        layouts[name] = (int(wm), int(wn), int(im), int(i_n))
    bad = []
    for m, n, lay in re.findall(r"ttng\.warp_group_dot .*?-> tensor<(\d+)x(\d+)xf32, #(\w+)>",
                                ttgir):
        wm, wn, im, i_n = layouts[lay]
        if wm * im > int(m) or wn * i_n > int(n):
            bad.append((int(m), int(n), (wm, wn), (im, i_n)))
    return bad


def loop_spills(sass):
    """Local-memory loads and stores (LDL/STL) inside the innermost loops that hold a wgmma
    (HGMMA; loops: backward branches) of a SASS listing: the spills a tile loop pays per
    step."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), a) for a, t in ins
             for m in [re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)] if m and int(m.group(1), 16) < a]
    mma = [(lo, hi) for lo, hi in loops if any("HGMMA" in t for a, t in ins if lo <= a <= hi)]
    inner = [(lo, hi) for lo, hi in mma
             if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in mma)]
    return sum(1 for lo, hi in inner for a, t in ins
               if lo <= a <= hi and re.match(r"(@!?U?P\w+\s+)?(LDL|STL)\b", t))


# Compiles specs for sm_90 in a fresh process (the interpreter, on in this one, compiles
# nothing), two at a time, and writes each kernel's cubin, TTGIR and metadata to OUT. A spec
# is ["tma", dtype, *attention_sm90.variants() entry] or ["fa2", dtype,
# *attention.fa2_variants() entry].
_COMPILE = """
import json, os, sys
from multiprocessing import Pool
import torch
from triton.backends.compiler import GPUTarget
from fastlm.compile import _compiling_for
from fastlm.kernels import attention as tk
from fastlm.kernels import attention_sm90 as sm90
out = sys.argv[1]
specs = json.load(open(os.path.join(out, "specs.json")))

def build(i):
    impl, dt, *v = specs[i]
    dt = getattr(torch, dt)
    kernel, args, meta = (sm90.aot_spec(dt, *v) if impl == "tma"
                          else tk.fa2_spec(dt, *v, arch=90))
    with _compiling_for(GPUTarget("cuda", 90, 32), os.path.join(out, f"cache{i}")):
        ck = kernel.warmup(*args, grid=(1,), **meta)
    open(os.path.join(out, f"{i}.cubin"), "wb").write(ck.asm["cubin"])
    open(os.path.join(out, f"{i}.ttgir"), "w").write(ck.asm["ttgir"])
    return dict(name=kernel.__name__, warps=ck.metadata.num_warps, num_warps=meta["num_warps"])

with Pool(2) as pool:
    metas = pool.map(build, range(len(specs)))
json.dump(metas, open(os.path.join(out, "metas.json"), "w"))
"""


def _compile(tmp_path, specs):
    """(metadata, SASS, resource usage, TTGIR) per spec, compiled for sm_90."""
    import json
    import sys

    (tmp_path / "specs.json").write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=3600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = []
    for i, m in enumerate(json.loads((tmp_path / "metas.json").read_text())):
        cubin = str(tmp_path / f"{i}.cubin")
        sass, res = (subprocess.run([_tool("cuobjdump"), flag, cubin], capture_output=True,
                                    text=True, check=True).stdout
                     for flag in ("-sass", "-res-usage"))
        out.append((m, sass, res, (tmp_path / f"{i}.ttgir").read_text()))
    return out


def _check(spec, m, sass, res, ttgir):
    """The promises of one compiled kernel (module docstring, part 3); a list of failures."""
    impl, dt, kind, *v = spec
    bad = []
    if impl == "tma":
        part, d, causal, dropout, mask, varlen, *opts = v  # opts: (window, softcap) if set
        allowed = sm90.SPILLS.get((kind, part, d, causal, dropout, mask, varlen, *opts), (0, 0))
        hgmma = sorted({int(n) for n in re.findall(r"HGMMA\.64x(\d+)x16", sass)})
        if "UTMALDG" not in sass:
            bad.append("no TMA load (UTMALDG)")
        if not hgmma or hgmma[0] < 64:
            bad.append(f"wgmma N {hgmma}")
        if kind == "fwd" and not varlen and "UTMASTG" not in sass:
            bad.append("out is not stored by TMA")
    else:
        d, causal, dropout, mask, varlen = v
        allowed = (tk.SPILLS_90.get((kind, d, causal, dropout, mask), 0), 0)
    spills = max([int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", res)] or [-1])
    in_loop = loop_spills(sass)
    if spills < 0 or spills > allowed[0] or in_loop > allowed[1]:
        bad.append(f"spills {spills} bytes, {in_loop} loads/stores in tile loops (accepted: "
                   f"{allowed}; {res.strip()})")
    if m["warps"] != m["num_warps"] or f'"ttg.num-warps" = {m["num_warps"]}' not in ttgir:
        bad.append(f"warps {m['warps']} (launch: {m['num_warps']})")
    if duplicated_wgmma(ttgir):
        bad.append(f"duplicated warpgroup work {duplicated_wgmma(ttgir)}")
    return [f"{spec} {m['name']}: {b}" for b in bad]


def _sass_check(tmp_path, specs):
    failures = []
    for spec, got in zip(specs, _compile(tmp_path, specs)):
        failures += _check(spec, *got)
    assert not failures, "\n".join(failures)


# The CI subset: every kernel function that ships for sm_90, in its headline variants and in
# those that carry an accepted spill (~2 min on 2 cores).
SASS_SUBSET = [
    ["tma", "bfloat16", "fwd", None, 64, False, False, 0, False],
    ["tma", "bfloat16", "fwd", None, 128, True, True, 0, False],
    ["tma", "bfloat16", "fwd", None, 64, True, False, 0, True],
    ["tma", "bfloat16", "bwd", None, 64, False, False, 0, False],
    ["tma", "bfloat16", "dkdv", 0, 128, False, False, 0, False],
    ["tma", "float16", "dkdv", 0, 128, True, False, 0, False],
    ["tma", "bfloat16", "dkdv", 0, 128, False, True, 0, False],
    ["tma", "bfloat16", "dkdv", 2, 128, True, False, 0, True],
    ["tma", "bfloat16", "dkdv", 1, 128, False, False, 1, False],
    ["tma", "bfloat16", "dq", None, 128, False, False, 0, False],
    ["tma", "bfloat16", "dq", None, 128, True, True, 0, False],
    ["tma", "bfloat16", "fwd", None, 128, False, False, 0, False, True, True],
    ["tma", "bfloat16", "dkdv", 0, 128, False, False, 0, False, True, False],
    ["tma", "bfloat16", "dkdv", 2, 128, False, True, 0, True, True, True],
    ["tma", "float16", "dq", None, 128, True, True, 0, False, False, True],
    ["fa2", "bfloat16", "fwd", 128, False, False, 2, False],
    ["fa2", "bfloat16", "fwd", 128, False, True, 1, False],
    ["fa2", "bfloat16", "dkdv", 128, True, False, 0, False],
    ["fa2", "bfloat16", "dq", 128, False, True, 1, False],
    ["fa2", "bfloat16", "fwd", 256, False, False, 0, False],
]


@pytest.mark.skipif(_tool("cuobjdump") is None, reason="triton ships no cuobjdump here")
def test_sm90_sass_facts(tmp_path):
    """Every kernel function that ships for sm_90 (the TMA forward, fused backward, split
    dK/dV (one launch and two) and dQ kernels, and the FlashAttention-2 forward, dK/dV and dQ
    that the table still runs there: masks, head dim 256, the dQ of a mask with dropout at
    head dim 128, tensors TMA cannot address), in representative variants and in those
    carrying an accepted spill: module docstring, part 3."""
    _sass_check(tmp_path, SASS_SUBSET)


@pytest.mark.ondemand
@pytest.mark.skipif(_tool("cuobjdump") is None, reason="triton ships no cuobjdump here")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_sass_facts_option_variants(tmp_path, dtype):
    """The same for every launch with the attention options that the table ships
    (attention_sm90.option_variants: windows, soft-capping, with causal, dropout, varlen; head
    dims 64 and 128)."""
    _sass_check(tmp_path, [["tma", dtype, *v]
                           for v in sm90.option_variants(dtype=getattr(torch, dtype))])


@pytest.mark.ondemand
@pytest.mark.skipif(_tool("cuobjdump") is None, reason="triton ships no cuobjdump here")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sm90_sass_facts_every_variant(tmp_path, dtype):
    """The same for every entry of the tables: every launch attention_sm90.variants() lists
    and every FlashAttention-2 kernel variant (masks, causal, dropout, varlen; head dims 64, 128
    and 256) with its sm_90 tile (~15 min on 2 cores per dtype)."""
    specs = ([["tma", dtype, *v] for v in sm90.variants()]
             + [["fa2", dtype, *v] for v in tk.fa2_variants()])
    _sass_check(tmp_path, specs)


def test_duplicated_wgmma_detector():
    """The TTGIR check flags a 64-row product on an 8-warp ([8, 1]) layout, the dk/dv kernel's
    defect this issue removes, and passes the layouts the new kernels use."""
    head = ("#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], "
            "instrShape = [16, 16, 16]}>\n"
            "#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], "
            "instrShape = [16, 64, 16]}>\n")
    dup = head + "%0 = ttng.warp_group_dot %a, %b, %c : x -> tensor<64x16xf32, #mma>\n"
    ok = head + "%0 = ttng.warp_group_dot %a, %b, %c : x -> tensor<64x128xf32, #mma1>\n"
    assert duplicated_wgmma(dup) == [(64, 16, (8, 1), (16, 16))]
    assert duplicated_wgmma(ok) == []


def test_loop_spills_detector():
    """loop_spills counts the LDL/STL inside the innermost loop holding a wgmma, not those
    outside it, in an enclosing loop, or in a loop without a wgmma."""
    sass = "\n".join(f"        /*{a:04x}*/    {t} ;    /* 0x0000 */" for a, t in [
        (0x10, "STL [R1], R2"),  # before the tile loop, inside the outer one
        (0x20, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT"),
        (0x30, "@P3 LDL.LU R3, [R1+0x4]"),
        (0x40, "@P0 BRA 0x20"),  # the tile loop: one spill
        (0x50, "STL.64 [R1+0x8], R4"),
        (0x60, "@!P1 BRA 0x10"),  # the outer loop
        (0x70, "LDL R5, [R1]"),
        (0x80, "@P2 BRA 0x70"),  # a loop without a wgmma
    ])
    assert loop_spills(sass) == 1

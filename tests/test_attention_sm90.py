"""The Hopper Triton attention kernels (kernels/attention_sm90.py: TMA tiles, the fused
5-matmul backward with its ordered dQ hand-off) and the per-arch table that chooses them.

1. Correctness, through Triton's interpreter (or natively on a GPU): the kernels forced on,
   with their table widened to every feature they implement (masks, causal, dropout, varlen,
   GQA, head dims 64 and 128 in both kernels) and to small tiles, so that short sequences span
   several query tiles and key blocks and the dQ hand-off runs between many key blocks. The
   interpreter asserts, at every hand-off, that the earlier contributors have all arrived
   (device_assert in _wait_count): a wrong order, or a contributor that never arrives, fails.
   Checked against the float64 oracle with the tolerance rule, dropout bits included.
2. The table: which inputs take the TMA kernels on sm_90 and which fall back to the
   FlashAttention-2 kernels (float32, masks, head dims above 128, untileable strides, sm_80).
3. The SASS for sm_90 (triton here, no GPU needed): TMA loads (UTMALDG) in every kernel, wgmma
   (HGMMA) with N >= 64 only, no spills, the expected warps, and from the TTGIR: no wgmma
   whose warp layout covers more rows or columns than the product has (duplicated warpgroup
   work).
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


def _every_variant(monkeypatch, fwd_tile, bwd_tile):
    """Widen attention_sm90's table to every (causal, dropout), masks and varlen, at head dims
    64 and 128, with the given (BLOCK_M, BLOCK_N, num_warps, num_stages) tiles."""
    every = lambda tile: {(c, d): tile for c in (False, True) for d in (False, True)}  # noqa
    monkeypatch.setitem(sm90.CONFIGS, "fwd", {64: every(fwd_tile), 128: every(fwd_tile)})
    monkeypatch.setitem(sm90.CONFIGS, "bwd", {64: every(bwd_tile), 128: every(bwd_tile)})
    monkeypatch.setattr(sm90, "MASKS", {"fwd": True, "bwd": True})
    monkeypatch.setattr(sm90, "VARLEN", {"fwd": True, "bwd": True})


# Small tiles (interpreter) with BLOCK_M != BLOCK_N both ways in the backward, so that the
# contributors of a query tile (key blocks n with n * BLOCK_N < (j + 1) * BLOCK_M) are not the
# diagonal alone; and the shipped GPU tiles.
TILES = {
    "bm16-bn32": ((32, 32, 4, 2), (16, 32, 4, 1)),
    "bm32-bn16": ((16, 32, 4, 2), (32, 16, 4, 1)),
}
if GPU:
    TILES["shipped"] = ((128, 128, 8, 2), (64, 64, 4, 1))


def _forced(monkeypatch, tiles):
    """Force the TMA kernels with the table widened; yields the list of variants that ran."""
    _every_variant(monkeypatch, *TILES[tiles])
    ran = []
    real = tk.variant

    def spy(kind, *args, **kw):
        name = real(kind, *args, **kw)
        ran.append((kind, name))
        return name

    monkeypatch.setattr(tk, "variant", spy)
    with tk.force_variant(fwd="tma", bwd="tma"):
        yield ran


@pytest.fixture(params=list(TILES))
def tma(request, monkeypatch):
    """The TMA kernels forced, for each tiling of TILES."""
    yield from _forced(monkeypatch, request.param)


@pytest.fixture
def tma_one(monkeypatch):
    """The TMA kernels forced, one tiling (for the checks that do not depend on it)."""
    yield from _forced(monkeypatch, "bm16-bn32")


def _ran_tma(ran, kinds=("fwd", "bwd")):
    for kind in kinds:
        assert (kind, "tma") in ran, f"the {kind} TMA kernel did not run: {ran}"


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


def test_tma_persistent_forward(tma_one, monkeypatch):
    """The persistent grid (programs looping over query tiles; on the CPU 2 programs) gives
    the same result as one tile per program."""
    monkeypatch.setattr(sm90, "PERSISTENT_FWD", True)
    ta.compare_sdpa(*BACKEND, ta.Case("p", (1, 2, 40, 16), (1, 2, 40, 16), causal=True),
                    torch.bfloat16)  # 2 heads x 2 query tiles on 2 programs
    _ran_tma(tma_one, ("fwd",))


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
    ("bwd", 64, False, False, False, False, "tma"),
    ("bwd", 64, False, True, False, False, "fa2"),    # the fused backward spills when causal,
    ("bwd", 64, False, False, True, False, "fa2"),    # with dropout,
    ("bwd", 128, False, False, False, False, "fa2"),  # at head dim 128,
    ("bwd", 64, False, False, False, True, "fa2"),    # and with packed sequences
])
def test_table_on_sm90(kind, e, masked, causal, dropout, varlen, want):
    t = _qkv(e=e)
    assert tk.variant(kind, t, e, e, masked, causal, dropout, 90, varlen) == want


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


def test_tma_forward_runs_for_the_shipped_table(monkeypatch):
    """With the shipped table (no widening), a 16-bit causal forward takes the TMA kernel and
    its backward (causal) the three FlashAttention-2 kernels; both match the oracle."""
    ran = []
    real = tk.variant

    def spy(kind, *args, **kw):
        ran.append((kind, real(kind, *args, **kw)))
        return ran[-1][1]

    monkeypatch.setattr(tk, "variant", spy)
    ta.compare_sdpa(*BACKEND, ta.Case("c", (1, 2, 30, 64), (1, 2, 30, 64), causal=True),
                    torch.bfloat16)
    assert ran == [("fwd", "tma"), ("bwd", "fa2")], ran


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


# Compiles the subset for sm_90 in a fresh process (the interpreter, on in this one, compiles
# nothing) and writes each kernel's cubin, TTGIR and meta-parameters to OUT.
_COMPILE = """
import json, os, sys
import torch
from triton.backends.compiler import GPUTarget
from fastlm.compile import _compiling_for
from fastlm.kernels import attention_sm90 as sm90
out = sys.argv[1]
bf = [torch.bfloat16]
specs = (sm90.aot_specs(bf, (64,), causals=(False,))
         + sm90.aot_specs(bf, (128,), dropouts=(False, True), causals=(True,))
         + sm90.aot_specs(bf, (64,), causals=(True,), varlen=True))
metas = []
with _compiling_for(GPUTarget("cuda", 90, 32), os.path.join(out, "cache")):
    for i, (kernel, args, meta) in enumerate(specs):
        ck = kernel.warmup(*args, grid=(1,), **meta)
        open(os.path.join(out, f"{i}.cubin"), "wb").write(ck.asm["cubin"])
        open(os.path.join(out, f"{i}.ttgir"), "w").write(ck.asm["ttgir"])
        metas.append(dict(name=kernel.__name__, warps=ck.metadata.num_warps,
                          **{k: v for k, v in meta.items() if isinstance(v, (int, bool))}))
json.dump(metas, open(os.path.join(out, "metas.json"), "w"))
"""


@pytest.mark.skipif(_tool("cuobjdump") is None, reason="triton ships no cuobjdump here")
def test_sm90_sass_facts(tmp_path):
    """Every kernel of the subset (the dense head-dim-64 forward and fused backward, the
    head-dim-128 forward causal and causal with dropout, a varlen forward): TMA loads, wgmma N
    >= 64 only, no spills, the launch's warps, no duplicated warpgroup work; the dense forward
    stores out by TMA."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _COMPILE, str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    metas = json.load(open(tmp_path / "metas.json"))
    names = [(m["name"], m["IS_CAUSAL"], m["DROPOUT"], m["VARLEN"], m["BLOCK_E"]) for m in metas]
    assert names == [("_attn_fwd_tma", False, False, False, 64),
                     ("_attn_bwd_tma", False, False, False, 64),
                     ("_attn_fwd_tma", True, False, False, 128),
                     ("_attn_fwd_tma", True, True, False, 128),
                     ("_attn_fwd_tma", True, False, True, 64)], names
    for i, (m, name) in enumerate(zip(metas, names)):
        cubin = str(tmp_path / f"{i}.cubin")
        sass, res = (subprocess.run([_tool("cuobjdump"), flag, cubin], capture_output=True,
                                    text=True, check=True).stdout for flag in ("-sass",
                                                                                "-res-usage"))
        ttgir = (tmp_path / f"{i}.ttgir").read_text()
        hgmma = sorted({int(n) for n in re.findall(r"HGMMA\.64x(\d+)x16", sass)})
        assert "UTMALDG" in sass, f"{name}: no TMA load"
        assert hgmma and hgmma[0] >= 64, f"{name}: wgmma N {hgmma}"
        spills = [int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", res)]
        assert spills and max(spills) == 0, f"{name}: spills ({res.strip()})"
        assert m["warps"] == m["num_warps"] and f'"ttg.num-warps" = {m["num_warps"]}' in ttgir
        assert not duplicated_wgmma(ttgir), f"{name}: {duplicated_wgmma(ttgir)}"
        if name[0] == "_attn_fwd_tma" and not name[3]:
            assert "UTMASTG" in sass, f"{name}: out is not stored by TMA"


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

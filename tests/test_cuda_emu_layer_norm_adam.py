"""The CUDA C++ LayerNorm, fused add+dropout+LayerNorm, Adam/AdamW and sum-of-squares kernels
(csrc/cuda/layer_norm.cu, csrc/cuda/adam.cu), run on the CPU by the CUDA emulator (tests/cuda_emu:
one fiber per CUDA thread, the host code as written), checked as follows:

  * layer_norm / add_layer_norm: out, mean, rstd, dinput, dresidual, dweight and dbias against
    the float64 oracle with the tolerance rule of conftest.py (2x torch's own low-precision error
    + FLOOR; param_floor for dweight/dbias); mean and rstd against float64 statistics with torch's
    float32 statistics (native_layer_norm) as the comparison. `summed` is bit for bit the
    reference's (fastlm.ops.add_layer_norm.reference: the float32 sum rounded once), and with
    residual = 0 and grad_out = 0 the dropout bits of docs/layer_norm.md are checked exactly.
  * adam_step_: bit for bit the CPU op's (torch.ops.fastlm.adam_step_) on identical copies, after
    each of several steps. adam.cu and csrc/cpu/adam.cpp are written to give the same float32
    bits (the same IEEE-rounded float operations in the same order, no contraction; the double
    bias corrections and decay formed identically; the emulator's f_* are plain IEEE float ops
    and its pow/sqrt are the host's, as the CPU kernel's). One case also against torch's
    float32 math (fastlm.ops.adam.reference_adam_step_) with test_optim's tolerances.
  * sum_of_squares: exact on integer-valued data (every partial sum is an integer < 2^24, so any
    order gives the float64 result), within a derived rounding bound on random data, and
    bit-reproducible across calls.
  * Thread schedule: LayerNorm forward+backward (register and loop kernels, dropout on) and an
    Adam step give the same bits for emu_seed(1), (2), (3).

Dispatch paths (the host code's planner is mirrored in `_plan` below, and
test_cases_cover_every_dispatch_path checks that the cases reach every path it names):

LayerNorm forward (plan_rows, up to 8 vectors of 16 bytes per thread, <= 512 threads):
  ln_fwd_reg<ITEMS 1>   LN "f32-n64" (32 threads/row, 8 rows/block, 13 rows: dead rows),
                        "bf16-n384-pf32-w" (2 warps/row, 4 rows/block), "f32-n80-large-mean",
                        ADD "f32-n64-p0.3", "bf16-n384-pf32-p0.5", "f32-n64-p1"
  ln_fwd_reg<ITEMS 2>   "f32-n1536-b", "f16-n4096", ADD "f32-n1536-p0", "bf16-n4096-p0.2"
  ln_fwd_reg<ITEMS 4>   "f32-n2176" (160 threads, last vectors empty), "bf16-n8192-pf32",
                        ADD "f32-n2176-p0.1-b", "f16-n8192-p0.25"
  ln_fwd_reg<ITEMS 8>   "f32-n4100", "f16-n8200" (<= 256 threads), "f32-n12000" and
                        "bf16-n20000" (384 / 320 threads: the planner's second pass),
                        ADD "f32-n4100-p0.3", "bf16-n8200-p0.3" (64 keep bits: uint64 word)
  ln_fwd_loop<VEC 16/size>  "f32-n16388", "bf16-n32776", ADD "f32-n16388-p0.1",
                        "f16-n32776-p0.1"
  ln_fwd_loop<VEC 1>    N not a multiple of the vector: "f32-n97", "bf16-n100-pf32-b",
                        "f32-n82-large-mean", ADD "f32-n97-p0.25", "bf16-n100-pf32-p0.25";
                        unaligned data: "f32-n64-x-unaligned", "f16-n256-w-unaligned"
LayerNorm backward (up to 4 vectors per thread, persistent grid of 132 SMs x resident blocks):
  ln_bwd_reg<ITEMS 1, 2, 4>  the cases above with N/VEC <= 256, 512, 1024; grid-stride over
                        row groups (a block owns 2 groups, the second one mostly dead rows):
                        "f32-n32-grid-stride" (8449 rows)
  ln_bwd_loop<VEC 16/size>   N/VEC > 1024: "f32-n4100" (with dweight/dbias), "f16-n8200", ...
  ln_bwd_loop<VEC 1>    "f32-n97", "bf16-n100-pf32-b", the unaligned cases; grid-stride (a block
                        owns 2 rows: the partial row read-modify-written): "f32-n33-grid-stride"
  column_sum            float32, float16 and bfloat16 outputs; N % 32 != 0; >= 64 partial rows
                        (the 4-way unrolled loop) and fewer; only dweight or only dbias wanted
                        ("f32-n1536-b": bias only; "f16-n96-db-only": weight given, dbias only)
  ADD variants of each kernel: with/without dropout, grad_summed given or not, grad_input not
  wanted ("f32-n97-p0.25-no-dinput"), dropout_p = 1 (everything dropped).
Adam (multi-tensor apply, chunks of 65536, 512 blocks and 49 / 42 / 37 tensors per launch for 4 /
5 / 6 lists):
  param / moment dtypes f32/f32, f16/f16, f16/f32, bf16/bf16, bf16/f32; amsgrad; master weights
  (also with float32 params); AdamW (decoupled), Adam with L2 decay, no decay; maximize;
  lr_tensor; grad_scale, clip_coef, found_inf = 0 and = 1 (skip); per-tensor steps; the
  AdamW decay rounded from double ("adamw-f32-decay-in-double"); sizes
  0, 1, 7, 33, 129, 4099 and 65613 (two chunks, n % VEC tail); the vector path and the
  one-element path (all pointers of a tensor, or only its grad, not 16-byte aligned); "many"
  tensors (60 / 45: the launch splits on tensor slots); "big": 3 tensors of 1 + 512 + 2 chunks
  (the launch splits on block slots, mid-tensor: the second launch's slot starts 511 chunks in).
sum_of_squares: float32/float16/bfloat16, vector and one-element paths, tails, 0-size and
  all-empty lists, 200 tensors (> 96 slots: first_block numbering), the 2-launch "big" list.

Not covered: rows >= 2^32 (the high counter word of the dropout bits), the loop backward's
"block without a row" branch (grid <= rows there, so it cannot run), sumsq_final with more than
1024 partials (> 67M elements), and everything the emulator cannot show (fastlm_emu.h: timing,
the hardware memory model between barriers, nvcc's --use_fast_math: rsqrtf, division and, in
the LayerNorm kernels, contraction into FMAs; and the device's double pow in Adam's bias
corrections, here the host's, as the CPU kernel's: on a GPU an ulp there may change a bit).

"""

import math

import pytest
import torch
from conftest import (
    FLOOR,
    _check_2x,
    _forward_backward,
    _leaves,
    _torch_layer_norm,
    make_params,
    param_floor,
    randn,
)
from cuda_emu.build import load
from test_add_layer_norm import _eager, _grads
from test_add_layer_norm import _leaves as _aln_leaves
from test_layer_norm import _offset_rows
from test_optim import (
    ATOL,
    RTOL,
    _clone_lists,
    _exact_tensors,
    _f64_sum,
    _op_lists,
    assert_within_ulps,
)

from fastlm.ops.adam import reference_adam_step_
from fastlm.ops.add_layer_norm import dropout_keep
from fastlm.ops.add_layer_norm import reference as aln_reference
from fastlm.ops.attention import dropout_scale
from fastlm.ops.layer_norm import reference as ln_reference


@pytest.fixture(scope="module")
def emu():
    return load()


def _dt(dtype):
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]


# ---------------------------------------------------------------------------------------------
# The LayerNorm planner of layer_norm.cu (plan_rows, launch_fwd, launch_bwd), for the case table.
SMS = 132  # the emulated device's SM count (fastlm_emu.h: an H100 SXM)
FWD_CAP = 512  # kFwdRegMaxThreads


def _bwd_cap(items):
    return 256 if items >= 4 else 512  # bwd_reg_max_threads


def _plan(n, esize, aligned, max_items, cap):
    """(kind, items or vec, tx, ty) as plan_rows: kind "reg" (items) or "loop" (vec)."""
    full = 16 // esize
    vec = full if aligned and n % full == 0 else 1
    if vec == full:
        nv = n // vec
        for second in (False, True):
            items = 1
            while items <= max_items:
                tx = (-(-nv // items) + 31) // 32 * 32
                if tx <= (cap(items) if second else min(256, cap(items))):
                    return "reg", items, tx, max(1, min(256, cap(items)) // tx)
                items *= 2
    return "loop", vec, min(1024, max(32, (n // vec + 31) // 32 * 32)), 1


# ---------------------------------------------------------------------------------------------
# LayerNorm cases.
RNG = torch.tensor([-0x0123456789ABCDEF, 2**33 + 77], dtype=torch.int64)  # high seed/offset bits


class LnCase:
    """One LayerNorm problem: (M, N) input of `dtype`, parameters of `pdtype`; affine: "wb", "w",
    "b" or "none"; grads: which of dweight/dbias the backward computes (default: those given).
    add: the fused residual add (p: dropout_p; gs: grad_summed given; din: input_grad).
    unaligned: "x" or "w" starts 4/2 bytes past a 16-byte boundary. fwd=False: the backward
    only, on the CPU op's mean and rstd (the grid-stride cases, whose forward adds no path)."""

    def __init__(self, name, M, N, dtype, pdtype=None, affine="wb", *, grads=None, add=False,
                 p=0.0, gs=True, din=True, unaligned=None, offset_rows=None, fwd=True):
        self.name, self.M, self.N, self.dtype = name, M, N, dtype
        self.pdtype = pdtype or dtype
        self.affine = affine
        self.has_w, self.has_b = "w" in affine, "b" in affine
        self.wg, self.bg = (self.has_w, self.has_b) if grads is None else grads
        self.add, self.p, self.gs, self.din = add, p, gs, din
        self.unaligned, self.offset_rows = unaligned, offset_rows
        self.fwd = fwd

    def __repr__(self):
        return ("add-" if self.add else "ln-") + self.name

    @property
    def esize(self):
        return torch.tensor([], dtype=self.dtype).element_size()

    def fwd_plan(self):
        return _plan(self.N, self.esize, self.unaligned is None, 8, lambda i: FWD_CAP)

    def bwd_plan(self):
        """(kind, items or vec, tx, ty, grid) of the backward's persistent grid."""
        kind, iv, tx, ty = _plan(self.N, self.esize, self.unaligned is None, 4, _bwd_cap)
        groups = -(-self.M // ty)
        return kind, iv, tx, ty, min(groups, SMS * max(1, 2048 // (tx * ty)))

    def kernel(self, plan):
        kind, iv = plan[:2]
        if kind == "reg":
            return f"reg{iv}"
        return "loop-vec" if iv == 16 // self.esize else "loop-1"


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

LN_CASES = [
    LnCase("f32-n64", 13, 64, F32),
    LnCase("bf16-n384-pf32-w", 5, 384, BF16, F32, "w"),
    LnCase("f32-n80-large-mean", 6, 80, F32, offset_rows=(1000.0, 1 / 16)),
    LnCase("bf16-n80-large-mean", 6, 80, BF16, offset_rows=(100.0, 0.5)),
    LnCase("f32-n82-large-mean", 6, 82, F32, offset_rows=(1000.0, 1 / 16)),
    LnCase("f32-n1536-b", 3, 1536, F32, affine="b"),
    LnCase("f16-n4096", 2, 4096, F16),
    LnCase("f16-n96-db-only", 70, 96, F16, grads=(False, True)),
    LnCase("f32-n2176", 3, 2176, F32),
    LnCase("bf16-n8192-pf32", 2, 8192, BF16, F32),
    LnCase("f32-n4100", 3, 4100, F32),
    LnCase("f16-n8200", 2, 8200, F16, affine="none"),
    LnCase("f32-n12000", 2, 12000, F32, affine="none"),
    LnCase("bf16-n20000", 1, 20000, BF16, affine="none"),
    LnCase("f32-n16388", 2, 16388, F32, affine="none"),
    LnCase("bf16-n32776", 1, 32776, BF16, affine="none"),
    LnCase("f32-n97", 6, 97, F32),
    LnCase("bf16-n100-pf32-b", 4, 100, BF16, F32, "b"),
    LnCase("f32-n64-x-unaligned", 5, 64, F32, unaligned="x"),
    LnCase("f16-n256-w-unaligned", 3, 256, F16, affine="w", unaligned="w"),
    LnCase("f32-n32-grid-stride", 8449, 32, F32, fwd=False),
    LnCase("f32-n33-grid-stride", 4225, 33, F32, fwd=False),
]

ADD_CASES = [
    LnCase("f32-n64-p0.3", 13, 64, F32, add=True, p=0.3),
    LnCase("bf16-n384-pf32-p0.5", 5, 384, BF16, F32, "w", add=True, p=0.5, gs=False),
    LnCase("f32-n64-p1", 13, 64, F32, add=True, p=1.0),
    LnCase("f32-n1536-p0", 3, 1536, F32, add=True, p=0.0),
    LnCase("bf16-n4096-p0.2", 2, 4096, BF16, affine="none", add=True, p=0.2),
    LnCase("f32-n2176-p0.1-b", 3, 2176, F32, affine="b", add=True, p=0.1, gs=False),
    LnCase("f16-n8192-p0.25", 2, 8192, F16, affine="none", add=True, p=0.25),
    LnCase("f32-n4100-p0.3", 3, 4100, F32, add=True, p=0.3),
    LnCase("bf16-n8200-p0.3", 2, 8200, BF16, affine="none", add=True, p=0.3),
    LnCase("f32-n16388-p0.1", 1, 16388, F32, affine="none", add=True, p=0.1),
    LnCase("f16-n32776-p0.1", 1, 32776, F16, affine="none", add=True, p=0.1, gs=False),
    LnCase("f32-n97-p0.25", 6, 97, F32, add=True, p=0.25),
    LnCase("f32-n97-p0.25-no-dinput", 6, 97, F32, add=True, p=0.25, din=False),
    LnCase("bf16-n100-pf32-p0.25", 4, 100, BF16, F32, add=True, p=0.25),
    LnCase("f16-n100-p0", 4, 100, F16, add=True, p=0.0, gs=False),
]


def _misaligned(t):
    """A contiguous copy of `t` whose data starts one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)[1:]
    out = flat.view(t.shape).copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def _ln_inputs(case):
    M, N = case.M, case.N
    if case.offset_rows:
        x = _offset_rows(M, N, *case.offset_rows, case.dtype, "cpu")
    else:
        x = randn((M, N), case.dtype, "cpu", seed=1, shift=0.5)
    w, b = make_params((N,), case.pdtype, "cpu", case.has_w, case.has_b, seed=2)
    if case.unaligned == "x":
        x = _misaligned(x)
    if case.unaligned == "w":
        w = _misaligned(w)
    return x, w, b


def _stats(x, eps):
    """(mean, rstd) of the rows of x: the float64 oracle and torch's float32 result."""
    x64 = x.double()
    mean = x64.mean(-1)
    rstd = torch.rsqrt((x64 - mean[:, None]).square().mean(-1) + eps)
    _, m32, r32 = torch.native_layer_norm(x.float(), (x.shape[1],), None, None, eps)
    return (mean, m32.view(-1)), (rstd, r32.view(-1))


def _failures(results):
    return [msg for ok, _, _, msg in (_check_2x(*r[1:], r[0]) for r in results) if not ok]


def _param_grad_results(case, dw, db, g_o, g_t):
    """dweight/dbias against the oracle where wanted; an empty float32 tensor where not."""
    out = []
    for name, got, wanted, o, t in (("dweight", dw, case.wg, g_o[0], g_t[0]),
                                    ("dbias", db, case.bg, g_o[1], g_t[1])):
        if wanted:
            out.append((name, got, o, t, param_floor(t.dtype, case.M)))
        else:
            assert got.numel() == 0 and got.dtype == torch.float32, name
    return out


def _run_ln(emu, case, eps=1e-5):
    x, w, b = _ln_inputs(case)
    dy = randn(x.shape, case.dtype, "cpu", seed=3)
    ns = (case.N,)
    fwd = emu.layer_norm_fwd if case.fwd else torch.ops.fastlm.layer_norm_fwd
    y, mean, rstd = fwd(x, w, b, eps)
    dx, dw, db = emu.layer_norm_bwd(dy, x, mean, rstd, w, b, case.wg, case.bg)
    assert y.shape == x.shape and y.dtype == x.dtype and dx.shape == x.shape
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (case.M,)

    y_t, g_t = _forward_backward(_torch_layer_norm, _leaves((x, w, b)), lambda t: t, ns, eps, dy)
    y_o, g_o = _forward_backward(ln_reference, _leaves((x, w, b), torch.float64), lambda t: t,
                                 ns, eps, dy)
    results = [("dx", dx, g_o[0], g_t[0], FLOOR[case.dtype])]
    results += _param_grad_results(case, dw, db, g_o[1:], g_t[1:])
    if case.fwd:
        (m64, m32), (r64, r32) = _stats(x, eps)
        results += [("y", y, y_o, y_t, FLOOR[case.dtype]), ("mean", mean, m64, m32, 1e-5),
                    ("rstd", rstd, r64, r32, 1e-5)]
    return results


@pytest.mark.parametrize("case", LN_CASES, ids=repr)
def test_layer_norm_against_float64(emu, case):
    failed = _failures(_run_ln(emu, case))
    assert not failed, "\n".join(failed)


def _run_add(emu, case, eps=1e-5):
    M, N, dtype = case.M, case.N, case.dtype
    x = randn((M, N), dtype, "cpu", seed=1)
    r = randn((M, N), dtype, "cpu", seed=4, scale=2.0, shift=0.5)
    w, b = make_params((N,), case.pdtype, "cpu", case.has_w, case.has_b, seed=2)
    rng = RNG if case.p > 0 else None
    dy = randn((M, N), dtype, "cpu", seed=11)
    ds = randn((M, N), dtype, "cpu", seed=12) if case.gs else None
    ns = (N,)
    out, summed, mean, rstd = emu.add_layer_norm_fwd(x, r, w, b, rng, case.p, eps)
    dres, din, dw, db = emu.add_layer_norm_bwd(dy, ds, summed, mean, rstd, w, b, rng, case.p,
                                               case.din, case.wg, case.bg)
    # summed is the float32 sum rounded once, with the documented keep bits: the reference's.
    _, s_ref = aln_reference(x, r, ns, None, None, eps, case.p, rng)
    assert torch.equal(summed, s_ref), "summed differs from the reference's bits"

    y_t, _, g_t = _grads(lambda *a: _eager(*a[:2], ns, *a[2:], eps, case.p, rng),
                         _aln_leaves((x, r, w, b)), dy, ds)
    y_o, _, g_o = _grads(lambda *a: aln_reference(*a[:2], ns, *a[2:], eps, case.p, rng),
                         _aln_leaves((x, r, w, b), torch.float64), dy, ds)
    (m64, m32), (r64, r32) = _stats(s_ref, eps)  # the kernel normalizes the rounded sum
    f = FLOOR[dtype]
    results = [("out", out, y_o, y_t, f), ("mean", mean, m64, m32, 1e-5),
               ("rstd", rstd, r64, r32, 1e-5), ("dresidual", dres, g_o[1], g_t[1], f)]
    if case.p > 0 and case.din:
        results.append(("dinput", din, g_o[0], g_t[0], f))
    else:  # no dropout: grad_input is grad_residual; not wanted: not computed
        assert din.numel() == 0 and din.dtype == dtype
        if case.p == 0:
            results.append(("dinput (= dresidual)", dres, g_o[0], g_t[0], f))
    results += _param_grad_results(case, dw, db, g_o[2:], g_t[2:])
    return results


@pytest.mark.parametrize("case", ADD_CASES, ids=repr)
def test_add_layer_norm_against_float64(emu, case):
    failed = _failures(_run_add(emu, case))
    assert not failed, "\n".join(failed)


EXACT_BITS = [(13, 64, F32), (5, 384, F16), (2, 8200, BF16), (3, 97, F16), (1, 16388, F32),
              (4, 100, BF16)]


@pytest.mark.parametrize("M,N,dtype", EXACT_BITS, ids=[f"{m}x{n}-{_dt(d)}" for m, n, d in
                                                       EXACT_BITS])
def test_dropout_bits_exact(emu, M, N, dtype):
    """residual = 0 and grad_out = 0: summed = round(input * m), grad_residual = grad_summed and
    grad_input = round(grad_summed * m) bit for bit, m = keep * scale with the keep bits of
    docs/layer_norm.md (fastlm.ops.add_layer_norm.dropout_keep), in the forward's register
    kernels (4 and 8 columns per Philox call, 64 keep bits in one word) and loop kernels, and
    in the backward's."""
    p = 0.4
    x = randn((M, N), dtype, "cpu", seed=2)
    r = torch.zeros((M, N), dtype=dtype)
    gs = randn((M, N), dtype, "cpu", seed=3)
    out, s, mean, rstd = emu.add_layer_norm_fwd(x, r, None, None, RNG, p, 1e-5)
    dres, din, _, _ = emu.add_layer_norm_bwd(torch.zeros_like(out), gs, s, mean, rstd, None, None,
                                             RNG, p, True, False, False)
    keep = dropout_keep(RNG, M, N, p)
    assert 0 < keep.sum() < keep.numel()
    m = keep.float() * torch.tensor(dropout_scale(p), dtype=torch.float32)
    assert torch.equal(s, (x.float() * m).to(dtype))
    assert torch.equal(dres, gs)
    assert torch.equal(din, (gs.float() * m).to(dtype))


def test_layer_norm_empty_inputs(emu):
    """M = 0: empty outputs, zero dweight/dbias; N = 0: NaN statistics (no kernel runs)."""
    x = torch.zeros((0, 8))
    w, b = make_params((8,), torch.float32, "cpu")
    y, mean, rstd = emu.layer_norm_fwd(x, w, b, 1e-5)
    assert y.shape == (0, 8) and mean.shape == (0,)
    dx, dw, db = emu.layer_norm_bwd(y, x, mean, rstd, w, b, True, True)
    assert dx.shape == (0, 8)
    assert torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))
    y, mean, rstd = emu.layer_norm_fwd(torch.zeros((3, 0)), None, None, 1e-5)
    assert y.shape == (3, 0) and mean.isnan().all() and rstd.isnan().all()


@pytest.mark.parametrize("which", ["reg", "loop"])
def test_layer_norm_results_do_not_depend_on_the_thread_schedule(emu, which):
    """add_layer_norm forward + backward (dropout, grad_summed, dweight/dbias: every reduction
    and the column sum) under three fiber schedules: the same bits. reg: 2 warps per row and 4
    rows per block with a dead row; loop: 4 warps per row."""
    M, N, dtype = (5, 384, BF16) if which == "reg" else (6, 97, F32)
    x = randn((M, N), dtype, "cpu", seed=1)
    r = randn((M, N), dtype, "cpu", seed=4)
    w, b = make_params((N,), dtype, "cpu")
    dy = randn((M, N), dtype, "cpu", seed=11)
    runs = []
    for seed in (1, 2, 3):
        emu.emu_seed(seed)
        out, s, mean, rstd = emu.add_layer_norm_fwd(x, r, w, b, RNG, 0.2, 1e-5)
        grads = emu.add_layer_norm_bwd(dy, dy, s, mean, rstd, w, b, RNG, 0.2, True, True, True)
        y, mu, rs = emu.layer_norm_fwd(x, w, b, 1e-5)
        runs.append((out, s, mean, rstd, y, mu, rs) + tuple(grads) +
                    tuple(emu.layer_norm_bwd(dy, x, mu, rs, w, b, True, True)))
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)


def test_cases_cover_every_dispatch_path():
    """Every kernel variant of the LayerNorm dispatch runs in some case, for float32 and for a
    16-bit type, plain and ADD; and the features the docstring names occur."""
    seen = set()
    for c in LN_CASES + ADD_CASES:
        t = "f32" if c.dtype == F32 else "16bit"
        fp = c.fwd_plan()
        if c.fwd:
            seen.add(("fwd", c.kernel(fp), c.add, t))
            if fp[0] == "reg" and fp[2] > 256:
                seen.add("fwd reg tx > 256")
            if fp[0] == "reg" and c.M % fp[3]:
                seen.add("fwd dead rows")
            if c.add and c.p > 0 and fp[0] == "reg" and fp[1] * 16 // c.esize > 32:
                seen.add("64 keep bits")
        bp = c.bwd_plan()
        seen.add(("bwd", c.kernel(bp), c.add, t))
        groups = -(-c.M // bp[3])
        if groups > bp[4]:
            seen.add(f"bwd grid-stride {bp[0]}")
        if bp[0] == "reg" and c.M % bp[3]:
            seen.add("bwd dead rows")
        if bp[0] == "reg" and bp[3] > 1 and bp[2] > 32:
            seen.add("bwd multi-warp rows, several rows per block")
        if c.wg or c.bg:
            seen.add(("column_sum", c.pdtype))
            seen.add("column_sum R >= 64" if bp[4] * bp[3] >= 64 else "column_sum R < 64")
            if c.N % 32:
                seen.add("column_sum N % 32")
            if c.wg != c.bg:
                seen.add("column_sum one output")
        if c.pdtype != c.dtype:
            seen.add(f"pf32 {fp[0]}")
        seen.add(f"affine {c.affine}")
        if c.unaligned:
            seen.add(f"unaligned {c.unaligned}")
    need = {(d, k, add, t) for d, ks in (("fwd", ("reg1", "reg2", "reg4", "reg8", "loop-vec",
                                                  "loop-1")),
                                         ("bwd", ("reg1", "reg2", "reg4", "loop-vec", "loop-1")))
            for k in ks for add in (False, True) for t in ("f32", "16bit")}
    need |= {"fwd reg tx > 256", "fwd dead rows", "64 keep bits", "bwd grid-stride reg",
             "bwd grid-stride loop", "bwd dead rows", "bwd multi-warp rows, several rows per block",
             ("column_sum", F32), ("column_sum", F16), ("column_sum", BF16), "column_sum R >= 64",
             "column_sum R < 64", "column_sum N % 32", "column_sum one output", "pf32 reg",
             "pf32 loop", "affine wb", "affine w", "affine b", "affine none", "unaligned x",
             "unaligned w"}
    missing = need - seen
    assert not missing, f"paths no case reaches: {sorted(map(str, missing))}"


# ---------------------------------------------------------------------------------------------
# Adam and sum_of_squares (cuda_emu.build lets adam.cu's device checks accept CPU tensors).
@pytest.fixture(scope="module")
def mta(emu):
    """The ops namespace whose adam_step_ and sum_of_squares run adam.cu emulated."""
    return emu


MTA_BLOCKS, MTA_CHUNK = 512, 65536


def mta_tensors(lists):
    """TensorListMeta<lists>::kTensors (common.cuh)."""
    return (4096 - 128 - 8 - 3 * MTA_BLOCKS) // (8 * lists + 8 + 8 + 1)


SIZES = (1, 7, 0, 129, 4099, 65536 + 77, 33)
# Per tensor index: which lists start off a 16-byte boundary (the one-element path).
MISALIGN = {3: ("grads",), 6: ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs",
                               "masters")}
LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters")


class AdamCase:
    def __init__(self, name, pdtype, sdtype=None, *, amsgrad=False, master=False, lr=1e-2,
                 lr_tensor=False, wd=0.0, decoupled=True, maximize=False, grad_scale=None,
                 clip=None, found_inf=None, sizes=SIZES, misalign=MISALIGN, steps=2):
        self.name, self.pdtype, self.sdtype = name, pdtype, sdtype or pdtype
        self.amsgrad, self.master = amsgrad, master
        self.lr, self.lr_tensor, self.wd, self.decoupled = lr, lr_tensor, wd, decoupled
        self.maximize, self.grad_scale, self.clip, self.found_inf = (maximize, grad_scale, clip,
                                                                     found_inf)
        self.sizes, self.misalign, self.steps = sizes, misalign, steps

    def __repr__(self):
        return self.name

    @property
    def lists(self):
        return 4 + self.amsgrad + self.master


def _many_sizes(n, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(int(k) for k in torch.randint(0, 50, (n,), generator=g))


ADAM_CASES = [
    AdamCase("adam-f32", F32),
    AdamCase("adamw-f32-amsgrad-lr_tensor", F32, amsgrad=True, lr_tensor=True, wd=0.1),
    AdamCase("adam-l2-f32-maximize", F32, wd=0.05, decoupled=False, maximize=True),
    AdamCase("adamw-f32-master", F32, master=True, wd=0.1),
    # decay = float(1 - lr * wd) formed in double: 0.79f; in float arithmetic it is 0.78999996f.
    AdamCase("adamw-f32-decay-in-double", F32, lr=0.7, wd=0.3),
    AdamCase("adamw-f16", F16, wd=0.1),
    AdamCase("adam-l2-f16-f32moments-master-amsgrad", F16, F32, amsgrad=True, master=True,
             wd=0.02, decoupled=False),
    AdamCase("adamw-bf16-amsgrad-scale-clip", BF16, amsgrad=True, wd=0.1, grad_scale=3072.0,
             clip=0.37, found_inf=0.0),
    AdamCase("adamw-bf16-f32moments-master-lr_tensor-maximize", BF16, F32, master=True,
             lr_tensor=True, wd=0.1, maximize=True),
    AdamCase("adam-bf16-f32moments-l2", BF16, F32, wd=0.01, decoupled=False, grad_scale=0.5),
    AdamCase("skip-found_inf-f32-amsgrad", F32, amsgrad=True, wd=0.1, found_inf=1.0),
    AdamCase("skip-found_inf-bf16-master", BF16, F32, master=True, amsgrad=True, wd=0.1,
             grad_scale=8.0, found_inf=1.0, steps=1),
    AdamCase("many-f32", F32, wd=0.1, sizes=_many_sizes(60, 3), misalign={}),
    AdamCase("many-bf16-f32moments-amsgrad-master", BF16, F32, amsgrad=True, master=True,
             wd=0.1, sizes=_many_sizes(45, 4), misalign={}),
]
BIG_SIZES = (1000, MTA_BLOCKS * MTA_CHUNK - 4999, 70001)  # 1 + 512 + 2 chunks


def _adam_state(case, seed=0):
    """The lists of adam_step_ (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters,
    steps), misaligned where case.misalign says; moments of every sign and size, vmax above and
    below v, masters with more bits than the params."""
    g = torch.Generator().manual_seed(seed)
    lists = {name: [] for name in LISTS}
    for i, n in enumerate(case.sizes):
        def rnd(scale=1.0, n=n):
            return scale * torch.randn(n, generator=g)

        master = rnd()
        v = rnd(0.1).square()
        vals = {"params": master.to(case.pdtype), "grads": rnd(0.5).to(case.pdtype),
                "exp_avgs": rnd(0.05).to(case.sdtype), "exp_avg_sqs": v.to(case.sdtype),
                "max_exp_avg_sqs": (v * (0.5 + torch.rand(n, generator=g))).to(case.sdtype),
                "masters": master}
        for name in LISTS:
            if name == "max_exp_avg_sqs" and not case.amsgrad:
                continue
            if name == "masters" and not case.master:
                continue
            t = vals[name]
            lists[name].append(_misaligned(t) if name in case.misalign.get(i, ()) else t)
    steps = [torch.tensor(float(1 + 3 * i % 7)) for i in range(len(case.sizes))]
    return [lists[name] for name in LISTS] + [steps]


def _adam_args(case):
    def scalar(v):
        return None if v is None else torch.tensor(v, dtype=torch.float32)

    lr_t = scalar(case.lr) if case.lr_tensor else None
    return (0.0 if case.lr_tensor else case.lr, lr_t, 0.9, 0.999, 1e-8, case.wd, case.decoupled,
            case.amsgrad, case.maximize, scalar(case.grad_scale), scalar(case.found_inf),
            scalar(case.clip))


def _check_adam_steps(mta, case):
    """case.steps steps of the emulated CUDA op and of the CPU op on copies of the same state;
    every list equal bit for bit after each step (and changed by it, unless skipped)."""
    emu_lists = _adam_state(case)
    cpu_lists = _clone_lists(emu_lists)
    args = _adam_args(case)
    g = torch.Generator().manual_seed(99)
    for s in range(case.steps):
        if s:  # a new gradient and the next step count for both
            for i, (ge, gc) in enumerate(zip(emu_lists[1], cpu_lists[1])):
                new = (0.5 * torch.randn(ge.numel(), generator=g)).to(ge.dtype)
                ge.copy_(new)
                gc.copy_(new)
        for lst in (emu_lists, cpu_lists):
            for t in lst[6]:
                t.add_(1.0)
        before = _clone_lists(emu_lists)
        mta.adam_step_(*emu_lists, *args)
        torch.ops.fastlm.adam_step_(*cpu_lists, *args)
        skipped = bool(case.found_inf)
        for j, name in enumerate(LISTS):
            changed = False
            for i, (a, c, old) in enumerate(zip(emu_lists[j], cpu_lists[j], before[j])):
                where = f"step {s} {name}[{i}] ({a.numel()} elements)"
                assert a.dtype == c.dtype, where
                if not torch.equal(a, c):
                    diff = (a.double() - c.double()).abs()
                    pytest.fail(f"{where}: {int((a != c).sum())} elements differ from the CPU "
                                f"op's, first at {int((a != c).nonzero()[0])}, max "
                                f"|diff| {diff.max().item():.3e}")
                if name == "grads" or skipped:
                    assert torch.equal(a, old), f"{where}: modified"
                changed = changed or not torch.equal(a, old)
            if emu_lists[j] and name not in ("grads", "max_exp_avg_sqs") and not skipped:
                assert changed, f"step {s}: no tensor of {name} was updated"


@pytest.mark.parametrize("case", ADAM_CASES, ids=repr)
def test_adam_step_bitwise_equals_cpu_op(mta, case):
    if case.name.startswith("many"):  # the launch splits on tensor slots
        assert sum(n > 0 for n in case.sizes) > mta_tensors(case.lists)
    _check_adam_steps(mta, case)


def test_adam_step_bitwise_big(mta):
    """More chunks than one launch's 512 block slots: the middle tensor's chunks 0..510 go in the
    first launch, its chunk 511 (pointers advanced by 511 chunks in all six lists, a partial
    chunk with a tail) and the last tensor's 2 chunks in the second."""
    case = AdamCase("big", BF16, F32, amsgrad=True, master=True, wd=0.1, sizes=BIG_SIZES,
                    misalign={}, steps=1)
    assert sum(math.ceil(n / MTA_CHUNK) for n in BIG_SIZES) > MTA_BLOCKS
    _check_adam_steps(mta, case)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=_dt)
def test_adam_step_against_torch_math(mta, dtype):
    """Against fastlm.ops.adam.reference_adam_step_ (torch float32 ops) with test_optim's
    tolerances for one step: rtol 1e-5 / atol 1e-6 in float32, one ulp of the stored dtype for
    bfloat16 (test_optim.test_adam_step_op_grad_scale_and_clip's rule)."""
    master = dtype != F32
    sizes = (1, 3, 0, 37, 4099)
    got = _op_lists(dtype, "cpu", True, master=master, sizes=sizes)
    ref = _clone_lists(got)
    kw = (1e-2, None, 0.9, 0.999, 1e-8, 0.1, True, True, False, None, None, None)
    mta.adam_step_(*got, *kw)
    reference_adam_step_(*ref, *kw)
    for lst, other in zip(got[:5] + got[5:6], ref[:5] + ref[5:6]):
        for t, u in zip(lst, other):
            if t.dtype == torch.float32:
                torch.testing.assert_close(t, u, rtol=RTOL, atol=ATOL)
            else:
                assert_within_ulps(t, u, 1, "low-precision op result")


def test_adam_step_does_not_depend_on_the_thread_schedule(mta):
    case = AdamCase("sched", BF16, F32, amsgrad=True, master=True, wd=0.1, lr_tensor=True)
    runs = []
    for seed in (1, 2, 3):
        mta.emu_seed(seed)
        lists = _adam_state(case)
        mta.adam_step_(*lists, *_adam_args(case))
        runs.append(lists)
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            for t, u in zip(a, c):
                assert torch.equal(t, u)


# sum_of_squares: a float32 sum per thread over its share of a 65536-element chunk (at most
# 256 + 1 terms), a 5-level warp tree, 8 warps added in order, then the chunk partials in double
# and one rounding to float32. Every term (a square: rounded once for float32 input, exact for
# 16-bit input) passes through at most D = 1 + 257 + 5 + 8 float32 roundings, so for these
# nonnegative terms |result - exact| <= gamma(D) * exact + (partials) * 2^-53 * exact + 2^-24 *
# exact, gamma(D) = D u / (1 - D u), u = 2^-24.
def _sumsq_bound(exact, partials):
    u = 2.0 ** -24
    d = 1 + 257 + 5 + 8
    return (d * u / (1 - d * u) + partials * 2.0 ** -53 + u) * exact


def _with_misaligned(ts, every=3):
    return [_misaligned(t) if i % every == 1 and t.numel() else t for i, t in enumerate(ts)]


def test_sum_of_squares_exact(mta):
    """Integer-valued tensors of every dtype, sizes 0 .. 65541 (two chunks, tails), some not
    16-byte aligned: the float64 result exactly."""
    ts = _exact_tensors("cpu")
    ts = ts + _with_misaligned([t.clone() for t in ts])
    got = mta.sum_of_squares(ts)
    assert got.dtype == torch.float32 and got.shape == torch.Size([])
    assert got.item() == _f64_sum(ts)
    assert mta.sum_of_squares([torch.zeros(0), torch.zeros((0, 3))]).item() == 0.0


def test_sum_of_squares_many_tensors_exact(mta):
    """200 tensors: more than one launch's 96 tensor slots (partials numbered across launches)."""
    g = torch.Generator().manual_seed(1)
    ts = [torch.randint(-3, 4, (int(k),), generator=g).to(dt)
          for k, dt in zip(torch.randint(0, 90, (200,), generator=g), [F32, BF16, F16] * 70)]
    assert sum(t.numel() > 0 for t in ts) > mta_tensors(1)
    assert mta.sum_of_squares(ts).item() == _f64_sum(ts)


def test_sum_of_squares_big_exact(mta):
    """1 + 512 + 2 chunks: the second launch starts mid-tensor. Sparse small integers (every
    chunk's first and last element, the tails, up to 100000 random positions per tensor) keep
    every partial sum exact."""
    ts = []
    g = torch.Generator().manual_seed(5)
    for n in BIG_SIZES:
        t = torch.zeros(n, dtype=torch.bfloat16)
        idx = torch.cat([torch.randint(0, n, (min(n, 100000),), generator=g),
                         torch.arange(0, n, MTA_CHUNK),
                         torch.arange(MTA_CHUNK - 1, max(n, MTA_CHUNK - 1), MTA_CHUNK),
                         torch.arange(max(0, n - 9), n)])
        t[idx] = torch.randint(1, 4, (idx.numel(),), generator=g).to(torch.bfloat16)
        ts.append(t)
    exact = _f64_sum(ts)
    assert exact < 2 ** 24
    assert mta.sum_of_squares(ts).item() == exact


def test_sum_of_squares_random_within_bound_and_reproducible(mta):
    ts = ([randn((n,), F32, "cpu", seed=n) for n in (5, 4097, 0, 70001)] +
          [randn((n,), F16, "cpu", seed=n + 1, scale=3.0) for n in (129, 65536)] +
          [randn((n,), BF16, "cpu", seed=n + 2, shift=1.0) for n in (7, 20000)])
    ts = _with_misaligned(ts)
    exact = _f64_sum(ts)
    partials = sum(math.ceil(t.numel() / MTA_CHUNK) for t in ts)
    first = mta.sum_of_squares(ts)
    err = abs(first.item() - exact)
    assert err <= _sumsq_bound(exact, partials), (err, _sumsq_bound(exact, partials))
    mta.emu_seed(7)  # another fiber schedule: the same bits
    again = mta.sum_of_squares(ts)
    assert torch.equal(first, again)


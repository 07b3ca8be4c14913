"""The Hopper attention kernels of csrc/cuda/attention_sm90.cu (TMA, mbarriers, warp-specialized
warpgroups with setmaxnreg, wgmma, named-barrier ping-pong, TMA store; the backward's five
matmuls and its ordered dQ accumulation) run on the CPU by the CUDA emulator with the emulated
device reporting compute capability 9.0, against the float64 oracle with the tolerance rule of
conftest.py. The emulator runs the sm_90a instructions from the PTX ISA's definitions
(tests/cuda_emu/include/fastlm_emu_sm90.h): asynchronous copies and wgmmas complete at random
points before their waits, ordinary stores reach the TMA and wgmma only through
fence.proxy.async, so a missing wait, arrive or fence fails these tests.

Each problem is small (a few 128 x 128 tiles); more shapes run in the ondemand profile
(FASTLM_ONDEMAND=1). What the emulator cannot show (timing, the real register allocation, what
the hardware does on races it does not model) is for the GPU check; the SASS-level promises
are tests/test_sass_sm90.py's.
"""

import math

import pytest
import torch
from conftest import FLOOR, _check_2x, randn
from cuda_emu.build import load
from test_cuda_emu_attention import Case, _dt, _inputs, _oracle_fwd_bwd

from fastlm.ops.attention import dropout_keep


@pytest.fixture(scope="module")
def emu():
    """The emulator as an sm_90 device: launches must fit sm_90's limits (227 KB of shared
    memory per block) rather than those of every arch the build targets."""
    ops = load()
    archs = ops.emu_archs()
    ops.emu_set_device_arch(90)
    ops.emu_set_archs([90])
    yield ops
    ops.emu_set_device_arch(80)
    ops.emu_set_archs(archs)


CASES = [
    Case("d64-one-tile", 1, 1, 1, 128, 128, 64, 64),
    Case("d128-partial-tiles", 1, 2, 2, 130, 300, 128, 128),
    Case("d64-causal-gqa", 1, 4, 2, 256, 256, 64, 64, causal=True),
    Case("d128-causal-l<s", 1, 1, 1, 100, 260, 128, 128, causal=True),
    Case("d64-causal-l>s-mqa", 2, 2, 1, 200, 90, 64, 64, causal=True),
    Case("d128-dropout-causal", 1, 2, 2, 150, 150, 128, 128, causal=True, p=0.3),
    Case("d64-strided-views", 2, 2, 2, 45, 140, 64, 64, view="strided"),
]
ONDEMAND = [
    Case("d128-many-tiles-causal", 2, 3, 1, 400, 520, 128, 128, causal=True),
    Case("d64-dropout-gqa", 1, 6, 2, 260, 300, 64, 64, p=0.5),
    Case("d128-long-keys", 1, 1, 1, 64, 1100, 128, 128),
]


def _run(emu, case, dtype, backward=True):
    """Forward (and backward) on the Hopper kernels against the float64 oracle; returns the
    results."""
    q, k, v, mask, dout = _inputs(case, dtype)
    scale = 1 / math.sqrt(case.E)
    rng, keep = None, None
    if case.p > 0:
        rng = torch.tensor([0x1234_5678_9ABC, 77], dtype=torch.int64)
        keep = dropout_keep(rng, case.B, case.Hq, case.L, case.S, case.p)
    out, lse = emu.attention_fwd(q, k, v, mask, rng, case.p, case.causal, scale)
    assert "attn_fwd_sm90" in emu.emu_last_kernel(), emu.emu_last_kernel()
    assert out.shape == (case.B, case.Hq, case.L, case.Ev) and out.dtype == dtype
    results = (out, lse)
    if backward:
        dq, dk, dv = emu.attention_bwd(dout, q, k, v, out, lse, mask, rng, case.p, case.causal,
                                       scale)
        assert "attn_bwd_dq_convert" in emu.emu_last_kernel(), emu.emu_last_kernel()
        results += (dq, dk, dv)
    o64, lse64, g64 = _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, torch.float64)
    olo, _, glo = _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, dtype)
    _, lse32, _ = _oracle_fwd_bwd(q, k, v, mask, dout, case, scale, keep, torch.float32)
    live = torch.isfinite(lse64)
    assert torch.equal(torch.isinf(lse), ~live), "lse is +inf exactly on the empty rows"
    f, rep = FLOOR[dtype], math.sqrt(case.Hq // case.Hk)
    checks = [("out", out, o64, olo, f), ("lse", lse[live], lse64[live], lse32[live], 1e-5)]
    if backward:
        checks += [("dq", dq, g64[0], glo[0], f), ("dk", dk, g64[1], glo[1], f * rep),
                   ("dv", dv, g64[2], glo[2], f * rep)]
    failed = [msg for ok, _, _, msg in (_check_2x(*c[1:], c[0]) for c in checks) if not ok]
    assert not failed, "\n".join(failed)
    return results


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_forward_backward_against_float64(emu, case):
    dtype = torch.bfloat16 if case.E == 64 else torch.float16
    _run(emu, case, dtype)


@pytest.mark.ondemand
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dt)
@pytest.mark.parametrize("case", CASES + ONDEMAND, ids=repr)
def test_forward_backward_against_float64_ondemand(emu, case, dtype):
    _run(emu, case, dtype)


def test_schedules_give_the_same_bits(emu):
    """Other fiber schedules (and so other completion points of the asynchronous copies and
    wgmmas, and other orders in which the backward's blocks reach the dQ semaphores) give the
    same bits: the dQ accumulation is ordered."""
    case = Case("sched", 1, 2, 1, 140, 400, 64, 64, p=0.25)  # 4 key blocks add to each dQ tile
    runs = []
    for seed in (11, 12):
        emu.emu_seed(seed)
        runs.append(_run(emu, case, torch.bfloat16))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dispatch_table(emu):
    """Problems outside the table run on the portable kernels, and arch 8.0 never gets the
    Hopper ones."""
    q = torch.randn(1, 1, 64, 64, dtype=torch.bfloat16)
    emu.attention_fwd(q, q, q, None, None, 0.0, False, 0.125)
    assert "attn_fwd_sm90" in emu.emu_last_kernel()
    e96 = torch.randn(1, 1, 64, 96, dtype=torch.bfloat16)
    emu.attention_fwd(e96, e96, e96, None, None, 0.0, False, 0.125)
    assert "attn_fwd_mma" in emu.emu_last_kernel()
    mask = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    emu.attention_fwd(q, q, q, mask, None, 0.0, False, 0.125)
    assert "attn_fwd_mma" in emu.emu_last_kernel()
    emu.emu_set_device_arch(80)
    try:
        emu.attention_fwd(q, q, q, None, None, 0.0, False, 0.125)
        assert "attn_fwd_mma" in emu.emu_last_kernel()
    finally:
        emu.emu_set_device_arch(90)


def test_options_leave_the_table(emu):
    """The options the sm_90a table does not have (a window, the lower-right diagonal when it
    differs from the top-left one, a soft-cap) run on the portable kernels, correctly; causal
    with lower_right at L == S (the same diagonal) and a window that only restates causal stay
    on the Hopper kernels, with their bits."""
    from fastlm.ops.attention import reference_attention_fwd

    q = randn((1, 2, 128, 64), torch.bfloat16, "cpu", seed=1)
    k = randn((1, 2, 200, 64), torch.bfloat16, "cpu", seed=2)
    for causal, opts in ((False, (16, 8, False, 0.0)), (True, (-1, -1, True, 0.0)),
                         (False, (-1, -1, False, 5.0))):
        out, _ = emu.attention_fwd(q, k, k, None, None, 0.0, causal, 0.125, *opts)
        assert "attn_fwd_mma" in emu.emu_last_kernel(), (opts, emu.emu_last_kernel())
        args = (None, None, 0.0, causal, 0.125, *opts)
        o64, _ = reference_attention_fwd(q.double(), k.double(), k.double(), *args)
        olo, _ = reference_attention_fwd(q, k, k, *args)
        ok, _, _, msg = _check_2x(out, o64, olo, FLOOR[torch.bfloat16], "out")
        assert ok, msg
    qs = q[:, :, :100]
    ks = k[:, :, :100]
    plain = emu.attention_fwd(qs, ks, ks, None, None, 0.0, True, 0.125)
    for opts in ((-1, -1, True, 0.0), (-1, 4, False, 0.0)):
        got = emu.attention_fwd(qs, ks, ks, None, None, 0.0, True, 0.125, *opts)
        assert "attn_fwd_sm90" in emu.emu_last_kernel(), (opts, emu.emu_last_kernel())
        assert all(torch.equal(a, b) for a, b in zip(plain, got))

"""Tensors of more than 2**31 elements: LayerNorm, attention (B·H·S·D) and Adam (one tensor, and
the sum over tensors), where a 32-bit element index would wrap.

GPU tests are marked `cuda` and `slow` (8-36 GB each on an H200); scripts/gpu_run.sh runs them in
its late `large` stage (`pytest -m "cuda and slow" tests/test_large_tensors.py`). The checked
elements are those on both sides of element 2**31 and at the ends, against the float64 oracle
with the tolerance rule of DESIGN.md (torch's own low-precision result on the same rows sets
the bound); reductions over every row (dweight, dbias, the gradient norm) are checked whole.

The CPU tests (marked `ondemand`: FASTLM_ONDEMAND=1, ~9 GB of RAM each) run the same index
arithmetic through the C++ CPU kernels where this machine's memory allows: LayerNorm forward,
and attention forward with a broadcast (stride-0) batch so that only the output is large. Adam's
CPU kernel is not run at this size (four 8.6 GB tensors); csrc/cpu/adam.cpp indexes with int64
(tasks of (tensor, int64 first element)).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from conftest import FLOOR, assert_close_2x, param_floor

BIG = 2**31
GPU_BACKENDS = ["cuda", pytest.param("triton", marks=pytest.mark.triton)]
gpu = [pytest.mark.cuda, pytest.mark.slow]


def _free():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rows_around(n_rows, row_len):
    """Row indices at the ends and on both sides of the row holding element 2**31."""
    b = BIG // row_len
    return sorted({0, 1, b - 1, b, min(b + 1, n_rows - 1), n_rows - 1})


def _mem_available_gib():
    try:
        with open("/proc/meminfo") as f:
            return int(next(ln.split()[1] for ln in f if ln.startswith("MemAvailable"))) / 2**20
    except (OSError, StopIteration, ValueError):
        return 0.0


def _needs_ram(gib):
    have = _mem_available_gib()
    if have < gib:
        pytest.skip(f"needs {gib} GiB of free RAM, {have:.1f} GiB available")


# ---------------------------------------------------------------------------------------------
# LayerNorm
def _ln_rows_check(y, x, w, b, rows, n, dy=None, dx=None):
    """y (and dx) on `rows` against the float64 oracle; torch in x's dtype sets the bound."""
    idx = torch.tensor(rows, device=x.device)
    xs = x.detach()[idx]
    leaves = [t.detach().double().requires_grad_() for t in (xs, w, b)]
    y_o = F.layer_norm(leaves[0], (n,), leaves[1], leaves[2])
    lowp = [t.detach().clone().requires_grad_() for t in (xs, w, b)]
    y_t = F.layer_norm(lowp[0], (n,), lowp[1], lowp[2])
    assert_close_2x(y[idx], y_o.to(y.dtype), y_t, FLOOR[y.dtype], "y on rows around 2**31")
    if dy is not None:
        dys = dy[idx]
        (dx_o,) = torch.autograd.grad(y_o, leaves[0], dys.double())
        (dx_t,) = torch.autograd.grad(y_t, lowp[0], dys)
        assert_close_2x(dx[idx], dx_o, dx_t, FLOOR[dx.dtype], "dx on rows around 2**31")


def _ln_param_grads_oracle(x, dy, n, weight, chunk=8192):
    """dweight, dbias over every row, in float64, a chunk of rows at a time."""
    dw = torch.zeros(n, dtype=torch.float64, device=x.device)
    db = torch.zeros(n, dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], chunk):
        xc = x[r0:r0 + chunk].double()
        xhat = (xc - xc.mean(1, keepdim=True)) / torch.sqrt(xc.var(1, unbiased=False,
                                                                     keepdim=True) + 1e-5)
        dyc = dy[r0:r0 + chunk].double()
        dw += (dyc * xhat).sum(0)
        db += dyc.sum(0)
    return dw, db


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.cuda
@pytest.mark.slow
def test_layer_norm_over_2_31_elements_cuda(backend):
    n = 8192
    m = BIG // n + 3  # 2**31 + 24576 elements, 4.3 GB in bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = (1 + 0.5 * torch.randn(n, device="cuda", generator=g)).bfloat16().requires_grad_()
    b = (0.5 * torch.randn(n, device="cuda", generator=g)).bfloat16().requires_grad_()
    dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, generator=g)
    with fastlm.use_backend(backend):
        y = fastlm.layer_norm(x, (n,), w, b)
        dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    rows = _rows_around(m, n)
    _ln_rows_check(y, x, w, b, rows, n, dy, dx)
    del dx
    _free()
    dw_o, db_o = _ln_param_grads_oracle(x.detach(), dy, n, w)
    x_t, w_t, b_t = (t.detach().clone().requires_grad_() for t in (x, w, b))
    _, dw_t, db_t = torch.autograd.grad(F.layer_norm(x_t, (n,), w_t, b_t), (x_t, w_t, b_t), dy)
    assert_close_2x(dw, dw_o, dw_t, param_floor(torch.bfloat16, m), "dweight over all rows")
    assert_close_2x(db, db_o, db_t, param_floor(torch.bfloat16, m), "dbias over all rows")
    del x, y, dy, x_t, dw_t, db_t
    _free()


@pytest.mark.ondemand
def test_layer_norm_over_2_31_elements_cpu():
    _needs_ram(12)
    n = 4096
    m = BIG // n + 3
    x = torch.empty(m, n, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    for r0 in range(0, m, 65536):  # fill in pieces: no float32 copy of the whole
        x[r0:r0 + 65536] = torch.randn(min(65536, m - r0), n, generator=g)
    w = (1 + 0.5 * torch.randn(n, generator=g)).bfloat16()
    b = (0.5 * torch.randn(n, generator=g)).bfloat16()
    with fastlm.use_backend("cpu"), torch.no_grad():
        y = fastlm.layer_norm(x, (n,), w, b)
    _ln_rows_check(y, x, w, b, _rows_around(m, n), n)


# ---------------------------------------------------------------------------------------------
# Attention
def _attn_slice_check(out, q, k, v, do, grads, bs, causal):
    """Output and gradients of batch elements `bs` against float32 SDPA (the CUDA oracle for
    large shapes); torch's SDPA in the inputs' dtype sets the bound."""
    for bi in bs:
        leaves32 = [t.detach()[bi:bi + 1].float().requires_grad_() for t in (q, k, v)]
        o32 = F.scaled_dot_product_attention(*leaves32, is_causal=causal)
        g32 = torch.autograd.grad(o32, leaves32, do[bi:bi + 1].float())
        lowp = [t.detach()[bi:bi + 1].clone().requires_grad_() for t in (q, k, v)]
        ot = F.scaled_dot_product_attention(*lowp, is_causal=causal)
        gt = torch.autograd.grad(ot, lowp, do[bi:bi + 1])
        fl = FLOOR[q.dtype]
        assert_close_2x(out[bi:bi + 1], o32.to(out.dtype), ot, fl, f"out of batch {bi}")
        for name, got, o, t in zip(("dq", "dk", "dv"), grads, g32, gt):
            assert_close_2x(got[bi:bi + 1], o.to(got.dtype), t, fl, f"{name} of batch {bi}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.cuda
@pytest.mark.slow
def test_attention_over_2_31_elements_cuda(backend):
    B, H, S, D = 257, 16, 4096, 128  # B·H·S·D = 2**31 + 2**23 per tensor (4.3 GB in bf16)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, do = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
                   for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with fastlm.use_backend(backend):
        out = fastlm.scaled_dot_product_attention(*leaves, is_causal=True)
        grads = torch.autograd.grad(out, leaves, do)
    # batch 256 starts at element 2**31 exactly; 255 ends just below it
    _attn_slice_check(out.detach(), q, k, v, do, grads, (0, 255, 256), causal=True)
    del q, k, v, do, out, grads, leaves
    _free()


@pytest.mark.ondemand
def test_attention_output_over_2_31_elements_cpu():
    """Broadcast (stride-0) batch inputs, so only the output and its row statistics are large:
    out (B, H, L, D) bfloat16 with B·H·L·D = 2**31 + 2**17 (4.3 GB)."""
    _needs_ram(8)
    B, H, L, S, D = 16385, 16, 1024, 16, 8
    g = torch.Generator().manual_seed(2)
    q1, k1, v1 = (torch.randn(1, H, n, D, generator=g).bfloat16() for n in (L, S, S))
    q, k, v = (t.expand(B, -1, -1, -1) for t in (q1, k1, v1))
    with fastlm.use_backend("cpu"), torch.no_grad():
        out = fastlm.scaled_dot_product_attention(q, k, v)
    assert out.shape == (B, H, L, D)
    o64 = F.scaled_dot_product_attention(q1.double(), k1.double(), v1.double())
    ot = F.scaled_dot_product_attention(q1, k1, v1)
    last = (BIG // (H * L * D))  # batch element holding element 2**31
    for bi in sorted({0, last - 1, last, B - 1}):
        assert_close_2x(out[bi:bi + 1], o64.to(out.dtype), ot, FLOOR[torch.bfloat16],
                        f"out of batch {bi}")


# ---------------------------------------------------------------------------------------------
# Adam
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.1


def _expected_first_step(p0, g, coef=1.0):
    """AdamW's first step from zero moments, in float64: (param, exp_avg, exp_avg_sq)."""
    g = g.double() * coef
    m = (1 - BETAS[0]) * g
    v = (1 - BETAS[1]) * g * g
    upd = (m / (1 - BETAS[0])) / ((v / (1 - BETAS[1])).sqrt() + EPS)
    return p0.double() * (1 - LR * WD) - LR * upd, m, v


def _check_sampled(p, opt, p0s, gs, idxs, coef=1.0):
    state = opt.state[p]
    want_p, want_m, want_v = _expected_first_step(p0s, gs, coef)
    got_p, got_m, got_v = p.detach()[idxs], state["exp_avg"][idxs], state["exp_avg_sq"][idxs]
    # float32 arithmetic of a few operations: a few ulps of each value
    for name, got, want in (("param", got_p, want_p), ("exp_avg", got_m, want_m),
                            ("exp_avg_sq", got_v, want_v)):
        err = (got.double() - want).abs()
        tol = 4 * 2.0**-23 * want.abs() + 1e-12
        bad = (err > tol).nonzero().flatten()
        assert bad.numel() == 0, (f"{name} at element {idxs[bad[0]].item()}: {got[bad[0]].item()} "
                                  f"vs {want[bad[0]].item()}")


def _sample_indices(n, device):
    g = torch.Generator(device="cpu").manual_seed(3)
    fixed = torch.tensor(sorted({0, 1, BIG - 2, BIG - 1, BIG, BIG + 1, n - 2, n - 1} & set(
        range(n)) if n > BIG else {0, 1, n // 2, n - 1}))
    return torch.cat([fixed, torch.randint(0, n, (4096,), generator=g)]).to(device)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.cuda
@pytest.mark.slow
def test_adamw_one_tensor_over_2_31_elements_cuda(backend):
    n = BIG + 2**20 + 3  # 8.6 GB per float32 tensor: param, grad, two moments
    g = torch.Generator(device="cuda").manual_seed(4)
    p = torch.randn(n, device="cuda", generator=g).requires_grad_()
    p.grad = torch.randn(n, device="cuda", generator=g)
    idx = _sample_indices(n, "cuda")
    p0s, gs = p.detach()[idx].clone(), p.grad[idx].clone()
    with fastlm.use_backend(backend):
        opt = fastlm.optim.AdamW([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        opt.step()
    _check_sampled(p, opt, p0s, gs, idx)
    del p, opt
    _free()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.cuda
@pytest.mark.slow
def test_adamw_clipped_sum_over_tensors_over_2_31_cuda(backend):
    """Three tensors of 0.75 * 2**30 + 1 elements (2.25 * 2**30 in all) under max_grad_norm: the
    norm sums over more than 2**31 elements; each tensor's moments carry the clip
    coefficient linearly."""
    sizes = [3 * 2**28 + 1] * 3
    g = torch.Generator(device="cuda").manual_seed(5)
    params = [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in sizes]
    for t in params:
        t.grad = torch.randn(t.shape, device="cuda", generator=g)
    total = math.sqrt(sum(sum((t.grad[i:i + 2**28].double() ** 2).sum().item()
                              for i in range(0, t.numel(), 2**28)) for t in params))
    coef = min(1.0, 1.0 / (total + 1e-6))
    idxs = [_sample_indices(s, "cuda") for s in sizes]
    saved = [(t.detach()[i].clone(), t.grad[i].clone()) for t, i in zip(params, idxs)]
    with fastlm.use_backend(backend):
        opt = fastlm.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD,
                                 max_grad_norm=1.0)
        opt.step()
    for t, i, (p0s, gs) in zip(params, idxs, saved):
        state = opt.state[t]
        want_m = (1 - BETAS[0]) * gs.double() * coef
        err = (state["exp_avg"][i].double() - want_m).abs().max().item()
        # the coefficient comes from a float32 sum of squares: relative 1e-5 is generous
        assert err <= 1e-5 * want_m.abs().max().item(), (
            f"exp_avg off by {err:.3e}: the clip coefficient over 2.25 * 2**30 elements "
            f"differs from the float64 norm's {coef:.6e}")
    del params, opt
    _free()

"""Fused Adam/AdamW step and sum of squares in Triton (shipped as fastlm.kernels.adam).

The math is fastlm/ops/adam.py's. v1 launches once per tensor (grid over BLOCK-element
chunks); the CUDA backend is the multi-tensor one. Scalars that may live on the device (lr,
grad scale, found_inf, clip coefficient, the step count) are read inside the kernel, so a step
never synchronizes with the host.
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK = 4096


@triton.jit(do_not_specialize=["n", "lr", "beta1", "beta2", "eps", "wd", "one_m_b1",
                               "one_m_b2", "log_b1", "log_b2", "decay"])
def _adam_kernel(
    P,  # params (n,), float32/float16/bfloat16
    G,  # grads (n,), params' dtype
    M,  # exp_avg (n,), params' dtype or float32
    V,  # exp_avg_sq (n,), as M
    VMAX,  # max_exp_avg_sq (n,), as M; unused unless AMSGRAD
    MASTER,  # float32 master params (n,); unused unless HAS_MASTER
    STEP,  # float32 scalar: the step count, already incremented
    LR,  # float32 scalar lr; unused unless LR_TENSOR
    SCALE,  # float32 scalar grad scale; unused unless HAS_SCALE
    FOUND_INF,  # float32 scalar; unused unless HAS_INF
    CLIP,  # float32 scalar clip coefficient; unused unless HAS_CLIP
    n,  # elements
    lr,  # float lr when not LR_TENSOR
    beta1, beta2, eps, wd,
    one_m_b1, one_m_b2,  # 1 - beta1, 1 - beta2 computed in double on the host
    log_b1, log_b2,  # log(beta1), log(beta2) from the host
    decay,  # AdamW with a float lr: 1 - lr * wd computed in double on the host
    DECOUPLED: tl.constexpr,  # AdamW (True) or Adam
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_INF:
        if tl.load(FOUND_INF) != 0:
            return
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if LR_TENSOR:
        lr = tl.load(LR)
    step = tl.load(STEP).to(tl.float64)
    bc1 = 1.0 - tl.exp(step * log_b1)  # 1 - beta1^step, in float64
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_b2)).to(tl.float32)
    step_size = (lr / bc1).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g / tl.load(SCALE)
    if HAS_CLIP:
        g = g * tl.load(CLIP)
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        p = tl.load(MASTER + offs, mask=mask, other=0.0)
    else:
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    if wd != 0:
        if DECOUPLED:
            if LR_TENSOR:
                p = p * (1.0 - lr * wd)
            else:
                p = p * decay
        else:
            g = g + wd * p
    m = beta1 * tl.load(M + offs, mask=mask, other=0.0).to(tl.float32) + one_m_b1 * g
    v = beta2 * tl.load(V + offs, mask=mask, other=0.0).to(tl.float32) + one_m_b2 * g * g
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
    vd = v
    if AMSGRAD:
        vd = tl.maximum(tl.load(VMAX + offs, mask=mask, other=0.0).to(tl.float32), v)
        tl.store(VMAX + offs, vd.to(VMAX.dtype.element_ty), mask=mask)
    p = p - step_size * m / (tl.sqrt_rn(vd) / bc2_sqrt + eps)
    if HAS_MASTER:
        tl.store(MASTER + offs, p, mask=mask)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n"])
def _sumsq_kernel(X, OUT, n, BLOCK: tl.constexpr):
    # OUT[pid] = sum of x^2 over this program's BLOCK elements (float32).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(x * x, axis=0))


def _log(beta):
    return math.log(beta) if beta > 0 else -math.inf


def _launch_meta(decoupled, amsgrad, maximize, master, lr_tensor, scale, inf, clip):
    return dict(DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_MASTER=master,
                LR_TENSOR=lr_tensor, HAS_SCALE=scale, HAS_INF=inf, HAS_CLIP=clip, BLOCK=BLOCK,
                num_warps=8)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr,
               lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
               grad_scale, found_inf, clip_coef):
    """The step over each tensor of the lists (one launch per tensor)."""
    meta = _launch_meta(decoupled, amsgrad, maximize, bool(masters), lr_tensor is not None,
                        grad_scale is not None, found_inf is not None, clip_coef is not None)
    for i, p in enumerate(params):
        n = p.numel()
        if n == 0:
            continue
        dummy = steps[i]
        wrap_triton(_adam_kernel)[(triton.cdiv(n, BLOCK),)](
            p, grads[i], exp_avgs[i], exp_avg_sqs[i],
            max_exp_avg_sqs[i] if amsgrad else exp_avg_sqs[i],
            masters[i] if masters else dummy, steps[i],
            dummy if lr_tensor is None else lr_tensor,
            dummy if grad_scale is None else grad_scale,
            dummy if found_inf is None else found_inf,
            dummy if clip_coef is None else clip_coef,
            n, lr, beta1, beta2, eps, weight_decay, 1.0 - beta1, 1.0 - beta2,
            _log(beta1), _log(beta2), 1.0 - lr * weight_decay, **meta)


def sum_of_squares(tensors):
    """Per-block partial sums for every tensor into one buffer, then one fixed-order sum."""
    sizes = [triton.cdiv(t.numel(), BLOCK) for t in tensors]
    part = torch.zeros((max(1, sum(sizes)),), dtype=torch.float32, device=tensors[0].device)
    start = 0
    for t, k in zip(tensors, sizes):
        if k:
            wrap_triton(_sumsq_kernel)[(k,)](t, part[start:start + k], t.numel(), BLOCK=BLOCK,
                                             num_warps=8)
        start += k
    return part.sum(dtype=torch.float32)


def aot_specs(dtypes, sizes):
    """(kernel, args, meta) for `fastlm compile`: the AdamW steps fastlm.optim.AdamW launches
    for params of each dtype (float32 master weights for 16-bit params), plain, with fused
    clipping, and under a GradScaler; and the sum of squares. `sizes` do not matter here (the
    element count is not specialized)."""
    f32 = torch.float32
    specs = []
    for dt in dtypes:
        master = dt != f32
        for scale, clip in ((False, False), (False, True), (True, False), (True, True)):
            args = (dt, dt, f32 if master else dt, f32 if master else dt, f32 if master else dt,
                    f32, f32, f32, f32, f32, f32, 4096, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.1, 0.001,
                    -0.1, -0.001, 0.99999)
            specs.append((_adam_kernel, args,
                          _launch_meta(True, False, False, master, False, scale, scale, clip)))
        specs.append((_sumsq_kernel, (dt, f32, 4096), dict(BLOCK=BLOCK, num_warps=8)))
    return specs

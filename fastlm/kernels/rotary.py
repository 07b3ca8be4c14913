"""Rotary position embeddings in Triton: q and k in one launch, forward and backward
(docs/rotary.md).

Shipped as fastlm.kernels.rotary. No autograd here: fastlm/ops/rotary.py wraps `forward` and
`backward` in torch.library.triton_op and ties them together.

A row is the D elements of q or k at one (batch, head, position); its pairs (p, q) are
(j, j + D/2) (rotate-half) or (2j, 2j + 1) (interleaved, GPT-J), j < D/2. With c, s the cos and
sin row of the row's (batch, position):
    forward:   o_p = x_p c_p - x_q s_p,   o_q = x_q c_q + x_p s_q
    backward:  o_p = x_p c_p + x_q s_q,   o_q = x_q c_q - x_p s_p   (the transposed rotation)
Programs 0 .. Pq-1 take ROWS rows of q each, the others ROWS rows of k.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton


@triton.jit
def _rotate_rows(X, O, C, Sn, r0, H, S, sxb, sxh, sxs, sob, soh, sos, n_rows, c_bstride,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr,
                 INTERLEAVED: tl.constexpr, BWD: tl.constexpr):
    rows = r0 + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_H)
    rmask = rows < n_rows
    mask = rmask[:, None] & (j[None, :] < HALF)
    s = rows % S
    h = (rows // S) % H
    b = rows // (S * H)
    xrow = b * sxb + h * sxh + s * sxs
    orow = b * sob + h * soh + s * sos
    crow = b * c_bstride + s * (2 * HALF)
    if INTERLEAVED:
        p = 2 * j
        q = p + 1
    else:
        p = j
        q = j + HALF
    xp = tl.load(X + xrow[:, None] + p[None, :], mask=mask, other=0.0).to(tl.float32)
    xq = tl.load(X + xrow[:, None] + q[None, :], mask=mask, other=0.0).to(tl.float32)
    cp = tl.load(C + crow[:, None] + p[None, :], mask=mask, other=0.0).to(tl.float32)
    cq = tl.load(C + crow[:, None] + q[None, :], mask=mask, other=0.0).to(tl.float32)
    sp = tl.load(Sn + crow[:, None] + p[None, :], mask=mask, other=0.0).to(tl.float32)
    sq = tl.load(Sn + crow[:, None] + q[None, :], mask=mask, other=0.0).to(tl.float32)
    if BWD:
        op = xp * cp + xq * sq
        oq = xq * cq - xp * sp
    else:
        op = xp * cp - xq * sp
        oq = xq * cq + xp * sq
    tl.store(O + orow[:, None] + p[None, :], op.to(O.dtype.element_ty), mask=mask)
    tl.store(O + orow[:, None] + q[None, :], oq.to(O.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["q_progs"])
def _rotary(
    Q, QO, K, KO,  # q, k (4-D, unit last stride) and their outputs
    C, Sn,  # cos, sin: (1 or B, S, D) contiguous
    S, Hq, Hk,  # positions, q heads, k heads
    sqb, sqh, sqs, soqb, soqh, soqs,  # strides (elements) of q and q_out: batch, head, seq
    skb, skh, sks, sokb, sokh, soks,  # of k and k_out
    q_rows, k_rows,  # B * Hq * S, B * Hk * S
    q_progs,  # programs for q's rows
    c_bstride,  # cos/sin batch stride (0 when shared by the batch)
    HALF: tl.constexpr,  # D / 2
    BLOCK_H: tl.constexpr,  # next power of two >= HALF
    ROWS: tl.constexpr,  # rows per program
    INTERLEAVED: tl.constexpr,
    BWD: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < q_progs:
        _rotate_rows(Q, QO, C, Sn, pid.to(tl.int64) * ROWS, Hq, S, sqb, sqh, sqs, soqb, soqh,
                     soqs, q_rows, c_bstride, HALF, BLOCK_H, ROWS, INTERLEAVED, BWD)
    else:
        _rotate_rows(K, KO, C, Sn, (pid - q_progs).to(tl.int64) * ROWS, Hk, S, skb, skh, sks,
                     sokb, sokh, soks, k_rows, c_bstride, HALF, BLOCK_H, ROWS, INTERLEAVED, BWD)


def _io(x):
    x = x if x.stride(3) == 1 else x.contiguous()
    return x, torch.empty_like(x)


def _launch(q, k, cos, sin, interleaved, bwd):
    (q, qo), (k, ko) = _io(q), _io(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    B, Hq, S, D = q.shape
    Hk = k.shape[1]
    q_rows, k_rows = B * Hq * S, B * Hk * S
    if D == 0 or q_rows + k_rows == 0:
        return qo, ko
    half = D // 2
    block_h = triton.next_power_of_2(max(half, 1))
    rows = max(1, min(64, 2048 // block_h))
    q_progs, k_progs = triton.cdiv(q_rows, rows), triton.cdiv(k_rows, rows)
    c_bstride = S * D if cos.shape[0] > 1 else 0
    wrap_triton(_rotary)[(q_progs + k_progs,)](
        q, qo, k, ko, cos, sin, S, Hq, Hk, *q.stride()[:3], *qo.stride()[:3], *k.stride()[:3],
        *ko.stride()[:3], q_rows, k_rows, q_progs, c_bstride, HALF=half, BLOCK_H=block_h,
        ROWS=rows, INTERLEAVED=interleaved, BWD=bwd, num_warps=4)
    return qo, ko


def forward(q, k, cos, sin, interleaved):
    """(q_out, k_out) = (q, k) rotated: q (B,Hq,S,D), k (B,Hk,S,D), cos/sin (1 or B, S, D)."""
    return _launch(q, k, cos, sin, interleaved, False)


def backward(grad_q, grad_k, cos, sin, interleaved):
    """(grad of q, grad of k): the transposed rotation of (grad_q, grad_k)."""
    return _launch(grad_q, grad_k, cos, sin, interleaved, True)

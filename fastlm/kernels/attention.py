"""Fused scaled-dot-product attention in Triton: forward and backward (FlashAttention-2).

Shipped as fastlm.kernels.attention. No autograd here: fastlm/ops/attention.py wraps `forward`
and `backward` in torch.library.triton_op. The semantics, including the dropout bits, are the
contract of docs/attention.md; the canonical arguments are q (B, Hq, L, E), k (B, Hk, S, E),
v (B, Hk, S, Ev) with unit last-dim stride, an optional (B, Hq, L, S) mask view (any strides,
bool or float) and an optional int64 (seed, offset) tensor on the device.

Structure (1-D grids, so no grid dimension limits B * H; the blocks of one head are adjacent):
  _attn_fwd      cdiv(L, BLOCK_M) * B * Hq programs. One query block per program, key blocks
                 streamed through an online softmax in base 2 (log2(e) folded into the scale);
                 out and the natural-log lse (float32) written once. Causal programs stop at
                 the diagonal (and run longest-first); only the blocks that need it (the
                 diagonal and the ragged key tail) pay for the causal/bounds select.
  _attn_bwd_pre  D = rowsum(dO * O) per query row (float32).
  _attn_bwd_dkdv cdiv(S, BLOCK_N) * B * Hk programs. One key block per program; for GQA the
                 program walks the Hq / Hk query heads of its group, so dk and dv are summed in
                 registers in a fixed order: no atomics, the same bits every run.
  _attn_bwd_dq   cdiv(L, BLOCK_M) * B * Hq programs. One query block per program over its keys.
Tiles per kernel, head dim, dtype and arch come from a small table (_CONFIGS) checked with
ptxas for spills; short sequences shrink the tiles to the sequence.

Dropout: Philox4x32-10 in uint32 arithmetic (tl.umulhi for the high half), one call per query
row and group of 8 keys, evaluated on a [BLOCK_M, BLOCK_N // 8] grid; the four output words
are split in 16-bit halves and spread to [BLOCK_M, BLOCK_N] with tl.join + reshape (key
8g + lane takes half lane & 1 of word lane >> 1). The dk/dv kernel, which works on transposed
tiles, transposes the keep mask.

Empty rows (every score -inf) give out 0 and lse +inf in the forward, hence p = 0 and zero
gradients in the backward; the running max is replaced by 0 while it is -inf so that no
exp2(-inf - -inf) appears.
"""

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastlm.ops.attention import dropout_scale, dropout_threshold

LOG2E = 1.4426950408889634  # scores go to base 2; the kernels spell it out as a literal

_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Shared device helpers.
@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # acc + a @ b. IEEE = 1: float32 inputs in true float32 (no TF32). IEEE = 2: bfloat16
    # inputs widened to float32 first (exact products, as on tensor cores), used only under the
    # Triton interpreter, whose tl.dot multiplies bfloat16 bit patterns as integers
    # (triton-lang/triton#11584). 0: the dtype's tensor-core dot.
    if IEEE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE == 1:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _philox_key(Rng):
    # (key word 0, key word 1, counter word 3) from the device's int64 (seed, offset).
    seed = tl.load(Rng)
    offset = tl.load(Rng + 1)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return k0, k1, (offset & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _philox_keep(
    key,  # (k0, k1, offset) from _philox_key
    bh,  # b * Hq + h: the query head (counter word 2)
    offs_m,  # [BLOCK_M] query rows (counter word 1)
    n0,  # first key of the block, a multiple of 8 (counter word 0 = key >> 3)
    thresh,  # keep iff the key's 16 random bits >= thresh
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # The [BLOCK_M, BLOCK_N] keep mask of docs/attention.md: Philox4x32-10 with counter
    # (key >> 3, row, bh, offset) and key (seed lo, seed hi), evaluated once per group of 8 keys.
    G: tl.constexpr = BLOCK_N // 8
    k0, k1, offset = key
    zero = tl.zeros([BLOCK_M, G], dtype=tl.uint32)
    c0 = zero + ((n0 // 8) + tl.arange(0, G)).to(tl.uint32)[None, :]
    c1 = zero + offs_m.to(tl.uint32)[:, None]
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + offset
    m0 = tl.full([BLOCK_M, G], 0xD2511F53, tl.uint32)
    m1 = tl.full([BLOCK_M, G], 0xCD9E8D57, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    # w[..., a, b] = x[2a + b] (word lane >> 1); then the 16-bit half lane & 1 goes last.
    w = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    r16 = tl.join(w & 0xFFFF, w >> 16)
    r16 = tl.reshape(r16, [BLOCK_M, BLOCK_N])
    return r16 >= thresh.to(tl.uint32)


@triton.jit
def _scores(
    s,  # [BLOCK_M, BLOCK_N] float32 q.k, unscaled
    Mask_blk,  # the mask at (b, h, first row, first key) of the tile; unused unless MASK
    stride_mm, stride_mn,  # mask strides along rows and keys
    offs_m,  # [BLOCK_M] query rows
    offs_n,  # [BLOCK_N] keys
    L, S,
    qk_scale,  # scale * log2(e)
    MASK: tl.constexpr,  # _MASK_NONE / _MASK_BOOL / _MASK_FLOAT
    CAUSAL: tl.constexpr,  # apply j <= i here
    BOUNDS: tl.constexpr,  # apply j < S here
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    win,  # WINDOW: (left, right, diagonal offset) of _window
    WINDOW: tl.constexpr,  # apply the window (in place of CAUSAL) here
):
    # Scores in base 2: (scale * q.k + m) * log2(e), -inf where the key may not be attended.
    s = s * qk_scale
    if MASK != 0:
        mvalid = (offs_m < L)[:, None] & (offs_n < S)[None, :]
        tile = (tl.arange(0, BLOCK_M)[:, None] * stride_mm
                + tl.arange(0, BLOCK_N)[None, :] * stride_mn)
        mk = tl.load(Mask_blk + tile, mask=mvalid, other=0)
        if MASK == 1:
            s = tl.where(mk != 0, s, float("-inf"))
        else:
            s = s + mk.to(tl.float32) * 1.4426950408889634
    if WINDOW:
        ok = _in_window(offs_m[:, None], offs_n[None, :], win)
        if BOUNDS:
            ok = ok & (offs_n < S)[None, :]
        s = tl.where(ok, s, float("-inf"))
    elif CAUSAL:
        if BOUNDS:
            s = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n < S)[None, :], s,
                         float("-inf"))
        else:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    elif BOUNDS:
        s = tl.where((offs_n < S)[None, :], s, float("-inf"))
    return s


# Causal with the lower-right diagonal and sliding windows (docs/attention.md): key j may be
# attended by query i iff d = j - i - off has d <= right (unless right < 0) and d >= -left
# (unless left < 0); off = S - L (the sequence's) for the lower-right diagonal, else 0. The
# kernels take it as the constexpr WINDOW with runtime (left, right, lower_right); plain
# top-left causal keeps its own IS_CAUSAL path. The visited blocks are those the window
# reaches, each with the select.
@triton.jit
def _window(wl, wr, lower_right, L, S):
    # (left, right, off) of a sequence of lengths L, S.
    return wl, wr, tl.where(lower_right != 0, S - L, 0)


@triton.jit
def _in_window(i, j, win):
    wl, wr, off = win
    d = j - i - off
    return ((wr < 0) | (d <= wr)) & ((wl < 0) | (d >= -wl))


@triton.jit
def _window_keys(m0, S, win, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # (lo, hi): the keys the query rows [m0, m0 + BLOCK_M) may attend, lo a multiple of BLOCK_N.
    wl, wr, off = win
    lo = tl.where(wl >= 0, tl.maximum(m0 + off - wl, 0), 0)
    hi = tl.where(wr >= 0, tl.minimum(m0 + BLOCK_M + off + wr, S), S)
    return (lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _window_queries(n0, L, win, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # (lo, hi): the query rows that may attend keys [n0, n0 + BLOCK_N), lo a multiple of
    # BLOCK_M.
    wl, wr, off = win
    lo = tl.where(wr >= 0, tl.maximum(n0 - off - wr, 0), 0)
    hi = tl.where(wl >= 0, tl.minimum(n0 + BLOCK_N - off + wl, L), L)
    return (lo // BLOCK_M) * BLOCK_M, hi


@triton.jit
def _tanh(x):
    # tanh in float32 (Cephes tanhf): an odd polynomial below |x| = 0.625, 1 - 2 / (e^2|x| + 1)
    # above (libdevice's tanh does not run under the interpreter).
    a = tl.abs(x)
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    big = 1.0 - 2.0 / (tl.math.exp2(a * 2.8853900817779268) + 1.0)
    return tl.where(a < 0.625, small, tl.where(x < 0, -big, big))


@triton.jit
def _softcap(s, qk_scale, cap2):
    # (s', t): soft-capping of raw scores q.k: t = tanh(scale q.k / softcap), and s' such that
    # s' * qk_scale = cap2 * t (cap2 = softcap * log2(e)), the capped score in base 2, which
    # _scores then masks as any score.
    t = _tanh(s * (qk_scale / cap2))
    return t * (cap2 / qk_scale), t


@triton.jit
def _seq(
    Q, K, V, DO,  # the kernel's q, k, v and grad_out (the forward passes Q for DO)
    CuQ, CuK,  # varlen: the sequences' query and key row offsets
    b,  # int64 batch index (varlen: the sequence)
    stride_qb, stride_qm, stride_kb, stride_kn, stride_vb, stride_vn, stride_dob, stride_dom,
    L, S,  # the launch's lengths (varlen: the longest sequence's)
    VARLEN: tl.constexpr,
):
    # (Q_b, K_b, V_b, DO_b, q0, k0, L, S): batch b's q, k, v and grad_out. Varlen: sequence b's
    # own rows of q, grad_out (from row q0) and of k, v (from row k0), both int64, and its own
    # lengths; dense: q0 = k0 = 0 (unused) and the launch's lengths.
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        L = tl.load(CuQ + b + 1) - q0
        S = tl.load(CuK + b + 1) - k0
        q0 = q0.to(tl.int64)
        k0 = k0.to(tl.int64)
        Q_b = Q + q0 * stride_qm
        DO_b = DO + q0 * stride_dom
        K_b = K + k0 * stride_kn
        V_b = V + k0 * stride_vn
    else:
        q0 = 0
        k0 = 0
        Q_b = Q + b * stride_qb
        DO_b = DO + b * stride_dob
        K_b = K + b * stride_kb
        V_b = V + b * stride_vb
    return Q_b, K_b, V_b, DO_b, q0, k0, L, S


# ---------------------------------------------------------------------------------------------
# Forward.
@triton.jit
def _key_ranges(S, m0, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # (full_hi, hi): the query tile at row m0 visits keys [0, full_hi) without a causal or
    # bounds select, then [full_hi, hi) with them (the diagonal and the ragged key tail).
    full_hi = (S // BLOCK_N) * BLOCK_N
    hi = S
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(S, m0 + BLOCK_M)
    return full_hi, hi


@triton.jit
def _fwd_finish(acc, l_i, m_i, drop_scale, DROPOUT: tl.constexpr):
    # (out float32, lse): out = acc / l (times the keep scale); lse = ln 2 * (m + log2 l);
    # empty rows (l = 0): out 0, lse +inf.
    empty = l_i == 0.0
    inv = 1.0 / tl.where(empty, 1.0, l_i)
    if DROPOUT:
        inv = inv * drop_scale
    lse = (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
    return acc * inv[:, None], tl.where(empty, float("inf"), lse)


@triton.jit
def _online_softmax(s, acc, l_i, m_i, key, bh, offs_m, n0, drop_thresh, DROPOUT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One key block of the online softmax: (p with the dropped keys zeroed, acc and l rescaled
    # to the new row max, the new max). The max is replaced by 0 while it is -inf (empty rows
    # so far), so that no exp2(-inf - -inf) appears.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if DROPOUT:
        keep = _philox_keep(key, bh, offs_m, n0, drop_thresh, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p, 0.0)
    return p, acc, l_i, m_new


@triton.jit
def _fwd_blocks(
    acc, l_i, m_i,  # running output, row sum, row max (base 2)
    q,  # [BLOCK_M, BLOCK_E] query tile
    K_head, V_head,  # this head's k and v
    stride_kn, stride_vn,
    Mask_m,  # the mask at (b, h, first row, 0); unused unless MASK
    stride_mm, stride_mn, key, bh,
    offs_m, L, S, qk_scale, drop_thresh,
    lo, hi,  # keys [lo, hi), lo a multiple of BLOCK_N
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    win, cap2,  # _window's (left, right, off); softcap * log2(e)
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    rows = tl.arange(0, BLOCK_N)
    k_tile = rows[:, None] * stride_kn + offs_e[None, :]
    v_tile = rows[:, None] * stride_vn + offs_ev[None, :]
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + rows
        kv_rows = offs_n < S
        n64 = tl.cast(n0, tl.int64)
        k = tl.load(K_head + n64 * stride_kn + k_tile,
                    mask=kv_rows[:, None] & (offs_e < HEAD_E)[None, :], other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        if SOFTCAP:
            s, _ = _softcap(s, qk_scale, cap2)
        s = _scores(s, Mask_m + n64 * stride_mn, stride_mm, stride_mn, offs_m, offs_n, L, S,
                    qk_scale, MASK, CAUSAL, BOUNDS, BLOCK_M, BLOCK_N, win, WINDOW)
        p, acc, l_i, m_new = _online_softmax(s, acc, l_i, m_i, key, bh, offs_m, n0,
                                             drop_thresh, DROPOUT, BLOCK_M, BLOCK_N)
        v = tl.load(V_head + n64 * stride_vn + v_tile,
                    mask=kv_rows[:, None] & (offs_ev < HEAD_EV)[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["Hq", "group", "L", "S", "Tq", "drop_thresh", "win_left",
                               "win_right", "lower_right"])
def _attn_fwd(
    Q,  # (B, Hq, L, E), last stride 1
    K,  # (B, Hk, S, E), last stride 1
    V,  # (B, Hk, S, Ev), last stride 1
    Mask,  # (B, Hq, L, S) bool or float view, any strides; unused unless MASK
    Rng,  # int64 (seed, offset); unused unless DROPOUT
    CuQ,  # varlen: int32 (B + 1) offsets of the sequences' query rows; unused unless VARLEN
    CuK,  # varlen: int32 (B + 1) offsets of their key rows; unused unless VARLEN
    Out,  # (B, Hq, L, Ev) contiguous, q's dtype (varlen: (total_q, Hq, Ev))
    Lse,  # (B, Hq, L) contiguous float32, natural log (varlen: (Hq, total_q))
    stride_qb, stride_qh, stride_qm,  # (varlen: b stride 0, m the packed row stride)
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask strides (0 for broadcast dims)
    Hq,  # query heads
    group,  # Hq // Hk: query heads per key/value head
    L,  # query length (varlen: the longest sequence's)
    S,  # key length (varlen: the longest sequence's)
    Tq,  # varlen: total_q, lse's row stride per head; unused unless VARLEN
    qk_scale,  # scale * log2(e)
    drop_thresh,  # dropout_threshold(dropout_p)
    drop_scale,  # dropout_scale(dropout_p), float32
    win_left, win_right, lower_right,  # WINDOW: the bounds (-1: none) and the diagonal
    cap2,  # SOFTCAP: softcap * log2(e)
    HEAD_E: tl.constexpr,  # E
    HEAD_EV: tl.constexpr,  # Ev
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_E: tl.constexpr,  # E padded to a power of two >= 16
    BLOCK_EV: tl.constexpr,  # Ev padded likewise
    MASK: tl.constexpr,  # _MASK_NONE / _MASK_BOOL / _MASK_FLOAT
    IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: exact float32 dots
    VARLEN: tl.constexpr,  # packed sequences: b is a sequence of CuQ, CuK (no mask)
    WINDOW: tl.constexpr,  # a window or the lower-right diagonal (then not IS_CAUSAL)
    SOFTCAP: tl.constexpr,
):
    # One program per (query block, b * Hq + h); the query blocks of a head are adjacent so
    # they share its k and v in L2. Causal: the longest rows first (fewer stragglers).
    num_m = tl.cdiv(L, BLOCK_M)
    bh = tl.program_id(0) // num_m
    pid_m = tl.program_id(0) % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    Q_b, K_b, V_b, _, q0, _, L, S = _seq(
        Q, K, V, Q, CuQ, CuK, b, stride_qb, stride_qm, stride_kb, stride_kn, stride_vb,
        stride_vn, stride_qb, stride_qm, L, S, VARLEN)
    if VARLEN and m0 >= L:  # a block past the end of a shorter sequence has nothing to do
        return
    key = (0, 0, 0)
    if DROPOUT:
        key = _philox_key(Rng)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L

    q_ptrs = (Q_b + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
              + offs_e[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_e < HEAD_E)[None, :], other=0.0)
    K_head = K_b + hk * stride_kh
    V_head = V_b + hk * stride_vh
    Mask_m = Mask
    if MASK != 0:
        Mask_m = Mask + b * stride_mb + h * stride_mh + tl.cast(m0, tl.int64) * stride_mm

    acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if WINDOW:
        win = _window(win_left, win_right, lower_right, L, S)
        lo, hi = _window_keys(m0, S, win, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_vn, Mask_m, stride_mm,
            stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh, lo, hi, HEAD_E, HEAD_EV,
            BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, False, True, DROPOUT, IEEE, win, cap2,
            True, SOFTCAP)
    else:
        full_hi, hi = _key_ranges(S, m0, IS_CAUSAL, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_vn, Mask_m, stride_mm,
            stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh, 0, full_hi, HEAD_E,
            HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, False, False, DROPOUT, IEEE,
            (-1, -1, 0), cap2, False, SOFTCAP)
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K_head, V_head, stride_kn, stride_vn, Mask_m, stride_mm,
            stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh, full_hi, hi, HEAD_E,
            HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, IS_CAUSAL, True, DROPOUT, IEEE,
            (-1, -1, 0), cap2, False, SOFTCAP)

    out, lse = _fwd_finish(acc, l_i, m_i, drop_scale, DROPOUT)
    if VARLEN:
        rows = q0 + offs_m
        o_ptrs = Out + (rows * Hq + h)[:, None] * HEAD_EV + offs_ev[None, :]
        l_ptrs = Lse + h * Tq + rows
    else:
        row64 = bh.to(tl.int64) * L + offs_m
        o_ptrs = Out + row64[:, None] * HEAD_EV + offs_ev[None, :]
        l_ptrs = Lse + row64
    tl.store(o_ptrs, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_ev < HEAD_EV)[None, :])
    tl.store(l_ptrs, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward.
#
# With p_ij = exp(s_ij - lse_i) recomputed from the saved lse (base 2 in the kernels:
# p = exp2(s2 - lse * log2(e))), z_ij the keep bit and r the keep scale:
#   D_i    = sum_e dO_ie * O_ie                                  (_attn_bwd_pre)
#   dV_j  += sum_i p_ij z_ij r dO_i                              (_attn_bwd_dkdv)
#   dP_ij  = <dO_i, V_j> z_ij r
#   dS_ij  = p_ij (dP_ij - D_i)
#   dK_j  += scale * sum_i dS_ij Q_i                             (_attn_bwd_dkdv)
#   dQ_i   = scale * sum_j dS_ij K_j                             (_attn_bwd_dq)
# (D_i = sum_j p_ij z_ij r dP'_ij with dP' = <dO_i, V_j>, which is why dS needs no row sum.)
# The dk/dv kernel holds K_j, V_j and their gradients in registers and streams query blocks,
# computing the transposed tiles s^T = K Q^T, p^T, dP^T = V dO^T so that every accumulation is
# a plain [BLOCK_N, *] dot; for GQA it streams the query blocks of each head of its group in
# turn. The dq kernel holds Q_i, dO_i and streams key blocks. Both recompute the same p bits.
# Every sum runs in a fixed order (float32), so the gradients are bit-reproducible. Empty rows
# have lse = +inf, so p = 0 and they contribute nothing; rows past L load lse = +inf too. In
# the dk/dv kernel the padded keys past S (zero k, v) are not masked: whatever p^T they get
# stays in their own rows of dk and dv, which are never stored.


@triton.jit(do_not_specialize=["L"])
def _attn_bwd_pre(
    Out,  # (B, Hq, L, Ev) contiguous
    DO,  # (B, Hq, L, Ev) grad of out, last stride 1
    Delta,  # (B, Hq, L) float32: D
    stride_dob, stride_doh, stride_dom,
    Hq,  # query heads
    L,  # query length
    HEAD_EV: tl.constexpr,  # Ev
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_EV: tl.constexpr,  # Ev padded to a power of two
    VARLEN: tl.constexpr,  # B = 1, L = total_q: Out is (total_q, Hq, Ev), D (Hq, total_q)
):
    # D_i = sum_e dO_ie * O_ie in float32.
    num_m = tl.cdiv(L, BLOCK_M)
    bh = tl.program_id(0) // num_m
    pid_m = tl.program_id(0) % num_m
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ev = tl.arange(0, BLOCK_EV)
    msk = (offs_m < L)[:, None] & (offs_ev < HEAD_EV)[None, :]
    row64 = bh.to(tl.int64) * L + offs_m
    if VARLEN:
        o_rows = offs_m.to(tl.int64) * Hq + h
    else:
        o_rows = row64
    o = tl.load(Out + o_rows[:, None] * HEAD_EV + offs_ev[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_ev[None, :], mask=msk,
                 other=0.0)
    d = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + row64, d, mask=offs_m < L)


@triton.jit
def _query_ranges(n0, L, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    # (lo, mid): the key block at n0 visits query rows [lo, mid) with the causal select (the
    # diagonal tiles), then [mid, L) without; causal rows below lo see none of its keys.
    lo = 0
    mid = 0
    if IS_CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M), tl.cdiv(L, BLOCK_M)) * BLOCK_M
        mid = tl.maximum(mid, lo)
    return lo, mid


@triton.jit
def _dkdv_blocks(
    dk, dv,  # [BLOCK_N, BLOCK_E], [BLOCK_N, BLOCK_EV] float32 accumulators
    k, v,  # this program's key and value tiles
    Q_head, DO_head,  # the query head's q and grad_out
    stride_qm, stride_dom,
    Lse_head, Delta_head,  # the query head's lse and D (contiguous rows)
    Mask_n,  # the mask at (b, h, 0, first key); unused unless MASK
    stride_mm, stride_mn, key, bh,
    n0, offs_n,  # this program's first key and its keys
    L, S, qk_scale, drop_thresh, drop_scale,
    lo, hi,  # query rows [lo, hi), lo a multiple of BLOCK_M
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    win, cap2,  # as _fwd_blocks'
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    rows = tl.arange(0, BLOCK_M)
    q_tile = rows[:, None] * stride_qm + offs_e[None, :]
    do_tile = rows[:, None] * stride_dom + offs_ev[None, :]
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + rows
        row_ok = offs_m < L
        m64 = tl.cast(m0, tl.int64)
        q = tl.load(Q_head + m64 * stride_qm + q_tile,
                    mask=row_ok[:, None] & (offs_e < HEAD_E)[None, :], other=0.0)
        lse2 = tl.load(Lse_head + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        # s^T = K Q^T in base 2, then the mask, read transposed.
        sT = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
        if SOFTCAP:
            sT, tT = _softcap(sT, qk_scale, cap2)
        sT = sT * qk_scale
        if MASK != 0:
            tile = (tl.arange(0, BLOCK_N)[:, None] * stride_mn
                    + tl.arange(0, BLOCK_M)[None, :] * stride_mm)
            mk = tl.load(Mask_n + m64 * stride_mm + tile,
                         mask=row_ok[None, :] & (offs_n < S)[:, None], other=0)
            if MASK == 1:
                sT = tl.where(mk != 0, sT, float("-inf"))
            else:
                sT = sT + mk.to(tl.float32) * 1.4426950408889634
        if WINDOW:
            sT = tl.where(_in_window(offs_m[None, :], offs_n[:, None], win), sT, float("-inf"))
        elif CAUSAL:
            sT = tl.where(offs_m[None, :] >= offs_n[:, None], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        do = tl.load(DO_head + m64 * stride_dom + do_tile,
                     mask=row_ok[:, None] & (offs_ev < HEAD_EV)[None, :], other=0.0)
        Di = tl.load(Delta_head + offs_m, mask=row_ok, other=0.0)
        # dV += (p z r)^T dO ; dP^T = (V dO^T) z r
        dpT = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
        if DROPOUT:
            keepT = tl.trans(_philox_keep(key, bh, offs_m, n0, drop_thresh, BLOCK_M,
                                          BLOCK_N))
            pdT = tl.where(keepT, pT * drop_scale, 0.0)
            dpT = tl.where(keepT, dpT * drop_scale, 0.0)
        else:
            pdT = pT
        dv = _dot(pdT.to(do.dtype), do, dv, IEEE)
        # dS^T = p^T (dP^T - D) ; dK += dS^T Q (scale applied once at the end); soft-capping:
        # times 1 - tanh^2, the capped scores' derivative
        dsT = pT * (dpT - Di[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = _dot(dsT.to(q.dtype), q, dk, IEEE)
    return dk, dv


@triton.jit(do_not_specialize=["Hq", "Hk", "group", "L", "S", "Tq", "drop_thresh", "win_left",
                               "win_right", "lower_right"])
def _attn_bwd_dkdv(
    Q,  # (B, Hq, L, E), last stride 1
    K,  # (B, Hk, S, E), last stride 1
    V,  # (B, Hk, S, Ev), last stride 1
    DO,  # (B, Hq, L, Ev) grad of out, last stride 1
    Lse,  # (B, Hq, L) float32 from the forward (varlen: (Hq, total_q))
    Delta,  # (B, Hq, L) float32 from _attn_bwd_pre (varlen: (Hq, total_q))
    Mask,  # (B, Hq, L, S) view; unused unless MASK
    Rng,  # int64 (seed, offset); unused unless DROPOUT
    CuQ,  # varlen: int32 (B + 1) query row offsets; unused unless VARLEN
    CuK,  # varlen: int32 (B + 1) key row offsets; unused unless VARLEN
    DK,  # (B, Hk, S, E) contiguous, k's dtype (varlen: (total_k, Hk, E))
    DV,  # (B, Hk, S, Ev) contiguous, v's dtype (varlen: (total_k, Hk, Ev))
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq,  # query heads
    Hk,  # key/value heads
    group,  # Hq // Hk
    L,  # query length (varlen: the longest sequence's)
    S,  # key length (varlen: the longest sequence's)
    Tq,  # varlen: total_q, lse's row stride per head; unused unless VARLEN
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (dK = scale * dS^T Q)
    drop_thresh,  # dropout_threshold(dropout_p)
    drop_scale,  # dropout_scale(dropout_p)
    win_left, win_right, lower_right, cap2,  # as _attn_fwd's
    HEAD_E: tl.constexpr,
    HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    VARLEN: tl.constexpr,  # packed sequences: b is a sequence of CuQ, CuK (no mask)
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # One program per (key block, b * Hk + hk); causal work shrinks with the key index, so the
    # natural order already starts the longest programs first.
    num_n = tl.cdiv(S, BLOCK_N)
    bhk = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    b = bhk // Hk
    hk = bhk % Hk
    b64 = b.to(tl.int64)
    n0 = pid_n * BLOCK_N
    Q_b, K_b, V_b, DO_b, q0, k0, L, S = _seq(
        Q, K, V, DO, CuQ, CuK, b64, stride_qb, stride_qm, stride_kb, stride_kn, stride_vb,
        stride_vn, stride_dob, stride_dom, L, S, VARLEN)
    if VARLEN and n0 >= S:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    n_ok = offs_n < S
    n64 = offs_n[:, None].to(tl.int64)
    k = tl.load(K_b + hk.to(tl.int64) * stride_kh + n64 * stride_kn
                + offs_e[None, :], mask=n_ok[:, None] & (offs_e < HEAD_E)[None, :], other=0.0)
    v = tl.load(V_b + hk.to(tl.int64) * stride_vh + n64 * stride_vn
                + offs_ev[None, :], mask=n_ok[:, None] & (offs_ev < HEAD_EV)[None, :],
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
    key = (0, 0, 0)
    if DROPOUT:
        key = _philox_key(Rng)

    lo, mid = _query_ranges(n0, L, IS_CAUSAL, BLOCK_M, BLOCK_N)
    for g in range(group):
        h = hk * group + g
        bh = b * Hq + h
        h64 = h.to(tl.int64)
        Q_head = Q_b + h64 * stride_qh
        DO_head = DO_b + h64 * stride_doh
        if VARLEN:
            Lse_head = Lse + h64 * Tq + q0
            Delta_head = Delta + h64 * Tq + q0
        else:
            Lse_head = Lse + bh.to(tl.int64) * L
            Delta_head = Delta + bh.to(tl.int64) * L
        Mask_n = Mask
        if MASK != 0:
            Mask_n = (Mask + b64 * stride_mb + h64 * stride_mh
                      + tl.cast(n0, tl.int64) * stride_mn)
        if WINDOW:
            win = _window(win_left, win_right, lower_right, L, S)
            wlo, whi = _window_queries(n0, L, win, BLOCK_M, BLOCK_N)
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, Q_head, DO_head, stride_qm, stride_dom, Lse_head, Delta_head,
                Mask_n, stride_mm, stride_mn, key, bh, n0, offs_n, L, S, qk_scale, drop_thresh,
                drop_scale, wlo, whi, HEAD_E, HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK,
                False, DROPOUT, IEEE, win, cap2, True, SOFTCAP)
        else:
            if IS_CAUSAL:
                dk, dv = _dkdv_blocks(
                    dk, dv, k, v, Q_head, DO_head, stride_qm, stride_dom, Lse_head, Delta_head,
                    Mask_n, stride_mm, stride_mn, key, bh, n0, offs_n, L, S, qk_scale,
                    drop_thresh, drop_scale, lo, mid, HEAD_E, HEAD_EV, BLOCK_M, BLOCK_N,
                    BLOCK_E, BLOCK_EV, MASK, True, DROPOUT, IEEE, (-1, -1, 0), cap2, False,
                    SOFTCAP)
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, Q_head, DO_head, stride_qm, stride_dom, Lse_head, Delta_head,
                Mask_n, stride_mm, stride_mn, key, bh, n0, offs_n, L, S, qk_scale, drop_thresh,
                drop_scale, mid, L, HEAD_E, HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK,
                False, DROPOUT, IEEE, (-1, -1, 0), cap2, False, SOFTCAP)

    dk = dk * scale
    if VARLEN:
        row64 = (k0 + offs_n) * Hk + hk
    else:
        row64 = bhk.to(tl.int64) * S + offs_n
    tl.store(DK + row64[:, None] * HEAD_E + offs_e[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_e < HEAD_E)[None, :])
    tl.store(DV + row64[:, None] * HEAD_EV + offs_ev[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & (offs_ev < HEAD_EV)[None, :])


@triton.jit
def _dq_blocks(
    dq,  # [BLOCK_M, BLOCK_E] float32 accumulator
    q, do,  # this program's query and grad_out tiles
    lse2, Di,  # [BLOCK_M] lse * log2(e) and D
    K_head, V_head, stride_kn, stride_vn,
    Mask_m,  # the mask at (b, h, first row, 0); unused unless MASK
    stride_mm, stride_mn, key, bh,
    offs_m, L, S, qk_scale, drop_thresh, drop_scale,
    lo, hi,  # keys [lo, hi), lo a multiple of BLOCK_N
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    win, cap2,  # as _fwd_blocks'
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    rows = tl.arange(0, BLOCK_N)
    k_tile = rows[:, None] * stride_kn + offs_e[None, :]
    v_tile = rows[:, None] * stride_vn + offs_ev[None, :]
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + rows
        kv_rows = offs_n < S
        n64 = tl.cast(n0, tl.int64)
        k = tl.load(K_head + n64 * stride_kn + k_tile,
                    mask=kv_rows[:, None] & (offs_e < HEAD_E)[None, :], other=0.0)
        v = tl.load(V_head + n64 * stride_vn + v_tile,
                    mask=kv_rows[:, None] & (offs_ev < HEAD_EV)[None, :], other=0.0)
        dq = _dq_step(dq, q, do, k, v, lse2, Di, Mask_m + n64 * stride_mn, stride_mm,
                      stride_mn, key, bh, offs_m, n0, offs_n, L, S, qk_scale, drop_thresh,
                      drop_scale, BLOCK_M, BLOCK_N, MASK, CAUSAL, BOUNDS, DROPOUT, IEEE, win,
                      cap2, WINDOW, SOFTCAP)
    return dq


@triton.jit
def _dq_step(dq, q, do, k, v, lse2, Di, Mask_blk, stride_mm, stride_mn, key, bh, offs_m, n0,
             offs_n, L, S, qk_scale, drop_thresh, drop_scale, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
             BOUNDS: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, win, cap2,
             WINDOW: tl.constexpr, SOFTCAP: tl.constexpr):
    # dq + dS K of one key block (k, v; keys offs_n from n0; the mask at its first key):
    # S = Q K^T, P from the saved lse, dP = dO V^T (z r), dS = P (dP - D) (soft-capping: times
    # 1 - tanh^2).
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
    if SOFTCAP:
        s, t = _softcap(s, qk_scale, cap2)
    s = _scores(s, Mask_blk, stride_mm, stride_mn, offs_m, offs_n, L, S, qk_scale, MASK, CAUSAL,
                BOUNDS, BLOCK_M, BLOCK_N, win, WINDOW)
    p = tl.math.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
    if DROPOUT:
        keep = _philox_keep(key, bh, offs_m, n0, drop_thresh, BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - Di[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return _dot(ds.to(k.dtype), k, dq, IEEE)


@triton.jit(do_not_specialize=["Hq", "group", "L", "S", "Tq", "drop_thresh", "win_left",
                               "win_right", "lower_right"])
def _attn_bwd_dq(
    Q,  # (B, Hq, L, E), last stride 1
    K,  # (B, Hk, S, E), last stride 1
    V,  # (B, Hk, S, Ev), last stride 1
    DO,  # (B, Hq, L, Ev) grad of out, last stride 1
    Lse,  # (B, Hq, L) float32 from the forward (varlen: (Hq, total_q))
    Delta,  # (B, Hq, L) float32 from _attn_bwd_pre (varlen: (Hq, total_q))
    Mask,  # (B, Hq, L, S) view; unused unless MASK
    Rng,  # int64 (seed, offset); unused unless DROPOUT
    CuQ,  # varlen: int32 (B + 1) query row offsets; unused unless VARLEN
    CuK,  # varlen: int32 (B + 1) key row offsets; unused unless VARLEN
    DQ,  # (B, Hq, L, E) contiguous, q's dtype (varlen: (total_q, Hq, E))
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq,  # query heads
    group,  # Hq // Hk
    L,  # query length (varlen: the longest sequence's)
    S,  # key length (varlen: the longest sequence's)
    Tq,  # varlen: total_q, lse's row stride per head; unused unless VARLEN
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (dQ = scale * dS K)
    drop_thresh,  # dropout_threshold(dropout_p)
    drop_scale,  # dropout_scale(dropout_p)
    win_left, win_right, lower_right, cap2,  # as _attn_fwd's
    HEAD_E: tl.constexpr,
    HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    VARLEN: tl.constexpr,  # packed sequences: b is a sequence of CuQ, CuK (no mask)
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    # One program per (query block, b * Hq + h); the query blocks of a head are adjacent so
    # they share its k and v in L2. Causal: the longest rows first (fewer stragglers).
    num_m = tl.cdiv(L, BLOCK_M)
    bh = tl.program_id(0) // num_m
    pid_m = tl.program_id(0) % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    Q_b, K_b, V_b, DO_b, q0, _, L, S = _seq(
        Q, K, V, DO, CuQ, CuK, b, stride_qb, stride_qm, stride_kb, stride_kn, stride_vb,
        stride_vn, stride_dob, stride_dom, L, S, VARLEN)
    if VARLEN and m0 >= L:
        return
    key = (0, 0, 0)
    if DROPOUT:
        key = _philox_key(Rng)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_e = tl.arange(0, BLOCK_E)
    offs_ev = tl.arange(0, BLOCK_EV)
    row_ok = offs_m < L
    m64 = offs_m[:, None].to(tl.int64)
    q = tl.load(Q_b + h * stride_qh + m64 * stride_qm + offs_e[None, :],
                mask=row_ok[:, None] & (offs_e < HEAD_E)[None, :], other=0.0)
    do = tl.load(DO_b + h * stride_doh + m64 * stride_dom + offs_ev[None, :],
                 mask=row_ok[:, None] & (offs_ev < HEAD_EV)[None, :], other=0.0)
    if VARLEN:
        row64 = h * Tq + q0 + offs_m  # lse and D
        dq_rows = (q0 + offs_m) * Hq + h
    else:
        row64 = bh.to(tl.int64) * L + offs_m
        dq_rows = row64
    lse2 = tl.load(Lse + row64, mask=row_ok, other=float("inf")) * 1.4426950408889634
    Di = tl.load(Delta + row64, mask=row_ok, other=0.0)
    K_head = K_b + hk * stride_kh
    V_head = V_b + hk * stride_vh
    Mask_m = Mask
    if MASK != 0:
        Mask_m = Mask + b * stride_mb + h * stride_mh + tl.cast(m0, tl.int64) * stride_mm

    dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    if WINDOW:
        win = _window(win_left, win_right, lower_right, L, S)
        lo, hi = _window_keys(m0, S, win, BLOCK_M, BLOCK_N)
        dq = _dq_blocks(dq, q, do, lse2, Di, K_head, V_head, stride_kn, stride_vn, Mask_m,
                        stride_mm, stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh,
                        drop_scale, lo, hi, HEAD_E, HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E,
                        BLOCK_EV, MASK, False, True, DROPOUT, IEEE, win, cap2, True, SOFTCAP)
    else:
        full_hi, hi = _key_ranges(S, m0, IS_CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_blocks(dq, q, do, lse2, Di, K_head, V_head, stride_kn, stride_vn, Mask_m,
                        stride_mm, stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh,
                        drop_scale, 0, full_hi, HEAD_E, HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E,
                        BLOCK_EV, MASK, False, False, DROPOUT, IEEE, (-1, -1, 0), cap2, False,
                        SOFTCAP)
        dq = _dq_blocks(dq, q, do, lse2, Di, K_head, V_head, stride_kn, stride_vn, Mask_m,
                        stride_mm, stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh,
                        drop_scale, full_hi, hi, HEAD_E, HEAD_EV, BLOCK_M, BLOCK_N, BLOCK_E,
                        BLOCK_EV, MASK, IS_CAUSAL, True, DROPOUT, IEEE, (-1, -1, 0), cap2,
                        False, SOFTCAP)
    dq = dq * scale
    tl.store(DQ + dq_rows[:, None] * HEAD_E + offs_e[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_e < HEAD_E)[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration and launchers.
def _pad(d):
    """Head dim padded for the tiles: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim (<= 64, 128, 256)
# for 16-bit inputs, as a triple: plain, with a mask or dropout, with both (each adds a
# [BLOCK_M, BLOCK_N] tile of mask values or random bits to the registers). Chosen so that no
# kernel spills registers at head dim <= 128 (ptxas -v on sm_90a and sm_80: plain, causal,
# causal + dropout, bool/float mask, mask + dropout; causal and mask never come together) and
# shared memory stays well inside the 227 KB of H100 and the 163 KB of A100. Hopper gets wider
# key tiles in the forward (wgmma likes N >= 64); Ampere keeps the forward at D = 128 on 32-key
# steps, where 64 spills.
# On sm_90 a product whose result feeds another dot gets all warps stacked along its rows
# (Triton's wgmma layout for chained dots, warpsPerCTA [num_warps, 1]): with 8 warps such a
# product needs at least 128 rows, else both warpgroups compute the same 64 (tests/
# test_attention_sm90.py duplicated_wgmma). So the sm_90 tiles keep 128 rows there: query
# tiles of 128 in the forward and dQ, key tiles of 128 in dK/dV (or fall to mma.sync below
# 64 rows, as the D = 256 backward does). Accepted spills, none inside a tile loop (SPILLS_90).
_CONFIGS = {
    90: {
        "fwd": {64: ((128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 3)),
                128: ((128, 64, 8, 3), (128, 64, 8, 3), (128, 32, 8, 3)),
                256: ((128, 32, 8, 2), (128, 32, 8, 2), (32, 32, 8, 2))},
        "dkdv": {64: ((32, 128, 8, 3), (16, 128, 8, 3), (16, 128, 8, 3)),
                 128: ((16, 128, 8, 3), (16, 128, 8, 3), (16, 32, 8, 3)),
                 256: ((32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2))},
        "dq": {64: ((128, 32, 4, 3), (128, 32, 8, 3), (128, 32, 8, 3)),
               128: ((128, 32, 8, 3), (128, 32, 8, 3), (128, 32, 8, 3)),
               256: ((128, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2))},
    },
    80: {
        "fwd": {64: ((128, 64, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3)),
                128: ((128, 32, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3)),
                256: ((64, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2))},
        "dkdv": {64: ((32, 128, 8, 3), (16, 128, 8, 3), (16, 64, 8, 3)),
                 128: ((32, 64, 8, 3), (16, 64, 8, 3), (16, 32, 8, 3)),
                 256: ((32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2))},
        "dq": {64: ((128, 32, 4, 3), (64, 32, 4, 3), (32, 32, 4, 3)),
               128: ((128, 32, 8, 3), (64, 32, 8, 3), (32, 32, 8, 3)),
               256: ((64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2))},
    },
}
# The spills the sm_90 table accepts (ptxas of triton 3.8; the most bytes of local memory over
# bf16, fp16, dense and varlen; none loaded or stored inside a tile loop): (kernel, head dim,
# causal, dropout, mask kind) -> bytes. The dK/dV tile of 128 keys with causal and dropout is
# new (what the duplicated 64-key tile did not hold); the others were there before: the bool
# mask forward in fp16 at head dims 128 and 256, the dQ with dropout at head dim 256.
SPILLS_90 = {("dkdv", 128, True, True, 0): 96, ("fwd", 128, False, False, 1): 24,
             ("fwd", 256, False, False, 1): 8, ("dq", 256, False, True, 0): 24}
# float32 runs exact float32 dots (FMA, no tensor cores; register-hungry): small tiles, any
# arch, checked the same way (left: dk/dv at D = 128 with causal + dropout spills 12-16 bytes
# in every tile tried).
_CONFIGS_F32 = {
    "fwd": {64: ((32, 16, 4, 2),) * 3,
            128: ((32, 16, 4, 2), (16, 16, 8, 2), (16, 16, 8, 2)),
            256: ((16, 16, 8, 2),) * 3},
    "dkdv": {64: ((16, 32, 4, 2), (16, 32, 8, 2), (16, 32, 8, 2)),
             128: ((16, 16, 4, 2), (16, 16, 8, 2), (16, 16, 8, 2)),
             256: ((16, 16, 8, 2),) * 3},
    "dq": {64: ((32, 16, 4, 2),) * 3,
           128: ((32, 16, 8, 2),) * 3,
           256: ((16, 16, 8, 1), (16, 16, 8, 2), (16, 16, 8, 2))},
}
# Varlen launches where _CONFIGS_F32's tile spills: their kernels hold the sequence's start
# rows and lengths in registers (dense: kernel arguments). dk/dv at D = 64 spilled 8-16 bytes
# plain or causal and 36-44 with dropout on (16, 32, 4 or 8 warps); this tile spills in none of
# plain, causal, dropout, causal + dropout (ptxas -v, sm_90a, ptxas 12.9 and 13.0).
_CONFIGS_F32_VARLEN = {
    "dkdv": {64: ((32, 32, 4, 2),) * 3},
}


def _config(kind, dtype, e, ev, arch, extras, varlen=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel `kind` ("fwd", "dkdv", "dq") for
    inputs of `dtype`, head dims e, ev, on compute capability `arch` (e.g. 90); `extras` is
    how many of (mask, dropout) are applied; `varlen`: a varlen launch."""
    d = max(64, _pad(e), _pad(ev))
    if dtype == torch.float32:
        if varlen and d in _CONFIGS_F32_VARLEN.get(kind, {}):
            return _CONFIGS_F32_VARLEN[kind][d][extras]
        return _CONFIGS_F32[kind][d][extras]
    return _CONFIGS[90 if arch >= 90 else 80][kind][d][extras]


# Which kernels run, per arch: "tma" is fastlm/kernels/attention_sm90.py (TMA tiles, 128 x 128
# forward tiles; the backward fused into one 5-matmul kernel with its ordered dQ where its
# table has a tile, else split into a dK/dV and a dQ kernel on TMA tiles), "fa2" is this
# file's FlashAttention-2 kernels (cp.async loads, three backward kernels with dQ computed
# apart). The concrete backward variants are "fused", "split" and "fa2"; "tma" asks for fused,
# then split. Each falls back, per call, to the next one (fused -> split -> fa2) for what its
# table (attention_sm90.CONFIGS, MASKS, VARLEN, EXCLUDED) has no tile for: float32, head dims
# above 128, the fused kernel's spilling variants, and for tensors TMA cannot address (a base
# or stride that is not a multiple of 16 bytes, a broadcast (stride 0) dim);
# attention_sm90.supports and tma_ready decide. Within the split backward each of its two
# kernels falls back to its FlashAttention-2 twin alone (split_kernels).
_VARIANTS = {
    90: {"fwd": "tma", "bwd": "tma"},
    80: {"fwd": "fa2", "bwd": "fa2"},
}
_NAMES = {"fwd": ("fa2", "tma"), "bwd": ("fa2", "tma", "fused", "split")}
_FORCED = {}  # kind -> variant, set by force_variant (tests, benchmarks)


class force_variant:
    """Context manager: run the given variants (fwd="fa2" | "tma", bwd="fa2" | "tma" |
    "fused" | "split") whatever the arch's table says; each still falls back where it cannot
    run (see _VARIANTS)."""

    def __init__(self, **kinds):
        bad = {k: v for k, v in kinds.items() if v not in _NAMES.get(k, ())}
        if bad:
            raise ValueError(f"force_variant: expected fwd= 'fa2' or 'tma' and/or bwd= 'fa2', "
                             f"'tma', 'fused' or 'split', got {bad}")
        self.kinds = kinds

    def __enter__(self):
        self.saved = dict(_FORCED)
        _FORCED.update(self.kinds)
        return self

    def __exit__(self, *exc):
        _FORCED.clear()
        _FORCED.update(self.saved)


def variant(kind, tensors, e, ev, masked, causal, dropout, arch, varlen=False, opts=None):
    """The kernels that run `kind` for these tensors (q, k, v and out or grad_out) with head
    dims e, ev, a mask or not, causal or not, dropout or not, packed sequences or not, the
    options `opts` (_options' second value; None: none), on compute capability `arch`: "tma"
    or "fa2" for kind "fwd"; "fused", "split" or "fa2" for kind "bwd"."""
    from . import attention_sm90 as sm90

    name = _FORCED.get(kind) or _VARIANTS[90 if arch >= 90 else 80][kind]
    if name == "fa2" or not sm90.tma_ready(*tensors):
        return "fa2"
    window, softcap, _ = opts or _PLAIN
    args = (tensors[0].dtype, e, ev, masked, causal, dropout, varlen, window, softcap)
    if kind == "fwd":
        return "tma" if sm90.supports("fwd", *args) else "fa2"
    if name in ("tma", "fused") and sm90.supports("bwd", *args):
        return "fused"
    if sm90.supports("dkdv", *args) or sm90.supports("dq", *args):
        return "split"
    return "fa2"


def split_kernels(dtype, e, ev, masked, causal, dropout, varlen=False, opts=None):
    """{"dkdv": "tma" | "fa2", "dq": ...}: the kernels of a "split" backward."""
    from . import attention_sm90 as sm90

    window, softcap, _ = opts or _PLAIN
    args = (dtype, e, ev, masked, causal, dropout, varlen, window, softcap)
    return {kind: "tma" if sm90.supports(kind, *args) else "fa2" for kind in ("dkdv", "dq")}


def _arch(device):
    """Compute capability as an int (90 for 9.0); CPU tensors (the interpreter) use 90."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _dot_mode(dtype):
    """_dot's IEEE switch for this dtype (2 only when the interpreter runs bfloat16)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 2
    return 0


def _fit(block, n):
    """A block no larger than the power of two covering n (short sequences), at least 16."""
    return min(block, max(16, triton.next_power_of_2(max(n, 1))))


def _meta(kind, dtype, e, ev, m_len, n_len, mask_kind, causal, dropout, arch, varlen=False,
          opts=None):
    """Meta-parameters of one launch: m_len rows along BLOCK_M, n_len along BLOCK_N; opts:
    _options' (WINDOW, SOFTCAP, args) or None. A window or soft-capping counts as one more
    tile of values in registers when the tiles are chosen (_CONFIGS)."""
    window, softcap, _ = opts or _PLAIN
    extras = min(2, int(mask_kind != 0) + int(dropout) + int(window or softcap))
    bm, bn, warps, stages = _config(kind, dtype, e, ev, arch, extras, varlen)
    return dict(HEAD_E=e, HEAD_EV=ev, BLOCK_M=_fit(bm, m_len), BLOCK_N=_fit(bn, n_len),
                BLOCK_E=_pad(e), BLOCK_EV=_pad(ev), MASK=mask_kind, IS_CAUSAL=causal,
                DROPOUT=dropout, IEEE=_dot_mode(dtype), VARLEN=varlen, WINDOW=window,
                SOFTCAP=softcap, num_warps=warps, num_stages=stages)


# The plain launch's options: no window, no soft-capping (kernel defaults).
_PLAIN = (False, False, (-1, -1, 0, 0.0))


def _options(is_causal, window_left=-1, window_right=-1, lower_right=False, softcap=0.0):
    """(IS_CAUSAL, (WINDOW, SOFTCAP, (win_left, win_right, lower_right, softcap * log2(e))))
    of the kernels for the ops' options (docs/attention.md): plain top-left causal keeps its
    own IS_CAUSAL path; a window or the lower-right diagonal (with causal) runs the window
    select (which holds causal as the bound right = 0)."""
    left, right = int(window_left), int(window_right)
    if is_causal:  # causal caps the right bound at 0 (fastlm.ops.attention.window_bounds)
        right = 0 if right < 0 else min(right, 0)
    window = (left >= 0 or right >= 0) and (left >= 0 or right != 0 or bool(lower_right)
                                            or not is_causal)
    causal = bool(is_causal) and not window
    if not window:  # no bound: the diagonal does not matter
        left, right, lower_right = -1, -1, False
    return causal, (window, softcap > 0.0,
                    (left, right, int(bool(lower_right)), float(softcap) * LOG2E))


def _mask_kind(mask):
    if mask is None:
        return _MASK_NONE
    return _MASK_BOOL if mask.dtype == torch.bool else _MASK_FLOAT


def _last_unit(t):
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _mask_arg(mask, q):
    """(pointer argument, its 4 strides); a bool mask is read as bytes."""
    if mask is None:
        return q, (0, 0, 0, 0)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, tuple(m.stride())


def _dropout_args(rng, dropout_p, q):
    """(Rng pointer, threshold, keep scale, DROPOUT)."""
    thresh = dropout_threshold(dropout_p) if rng is not None else 0
    if thresh == 0:  # nothing can be dropped: the exact rate is 0 and the scale 1
        return q, 0, 1.0, False
    return rng, thresh, dropout_scale(dropout_p), True


# Each _*_call returns (grid, args, meta) of one launch; `forward`/`backward`, their varlen
# twins and `aot_specs` share them, so the ahead-of-time variants are the ones the launches ask
# for. Shapes are (B, Hq, Hk, L, S, E, Ev); strides are 3-tuples (b, h, row) and the mask's
# 4-tuple. `vl` is None (dense) or (cu_q, cu_k, total_q) of a varlen launch: then B is the
# number of sequences, L and S the max_seqlens, and the b strides 0.
def _vl_args(vl, q):
    """(CuQ, CuK, Tq, VARLEN): q stands in for the unused pointers of a dense launch."""
    return (q, q, 0, False) if vl is None else (*vl, True)


def _fwd_call(q, k, v, mask, rng, out, lse, shape, qs, ks, vs, ms, dtype, scale, thresh,
              rscale, mask_kind, causal, dropout, arch, vl=None, opts=None):
    B, Hq, Hk, L, S, E, Ev = shape
    cu_q, cu_k, tq, varlen = _vl_args(vl, q)
    meta = _meta("fwd", dtype, E, Ev, L, S, mask_kind, causal, dropout, arch, varlen, opts)
    grid = (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,)
    args = (q, k, v, mask, rng, cu_q, cu_k, out, lse, *qs, *ks, *vs, *ms, Hq, Hq // Hk, L, S,
            tq, scale * LOG2E, thresh, rscale, *(opts or _PLAIN)[2])
    return grid, args, meta


def _pre_call(out, do, delta, shape, dos, varlen=False):
    B, Hq, _, L, _, _, Ev = shape
    block_ev = _pad(Ev)
    meta = dict(HEAD_EV=Ev, BLOCK_M=max(16, 4096 // block_ev), BLOCK_EV=block_ev,
                VARLEN=varlen, num_warps=4)
    return (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,), (out, do, delta, *dos, Hq, L), meta


def _dkdv_call(q, k, v, do, lse, delta, mask, rng, dk, dv, shape, qs, ks, vs, dos, ms, dtype,
               scale, thresh, rscale, mask_kind, causal, dropout, arch, vl=None, opts=None):
    B, Hq, Hk, L, S, E, Ev = shape
    cu_q, cu_k, tq, varlen = _vl_args(vl, q)
    meta = _meta("dkdv", dtype, E, Ev, L, S, mask_kind, causal, dropout, arch, varlen, opts)
    grid = (triton.cdiv(S, meta["BLOCK_N"]) * B * Hk,)
    args = (q, k, v, do, lse, delta, mask, rng, cu_q, cu_k, dk, dv, *qs, *ks, *vs, *dos, *ms,
            Hq, Hk, Hq // Hk, L, S, tq, scale * LOG2E, scale, thresh, rscale,
            *(opts or _PLAIN)[2])
    return grid, args, meta


def _dq_call(q, k, v, do, lse, delta, mask, rng, dq, shape, qs, ks, vs, dos, ms, dtype, scale,
             thresh, rscale, mask_kind, causal, dropout, arch, vl=None, opts=None):
    B, Hq, Hk, L, S, E, Ev = shape
    cu_q, cu_k, tq, varlen = _vl_args(vl, q)
    meta = _meta("dq", dtype, E, Ev, L, S, mask_kind, causal, dropout, arch, varlen, opts)
    grid = (triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,)
    args = (q, k, v, do, lse, delta, mask, rng, cu_q, cu_k, dq, *qs, *ks, *vs, *dos, *ms, Hq,
            Hq // Hk, L, S, tq, scale * LOG2E, scale, thresh, rscale, *(opts or _PLAIN)[2])
    return grid, args, meta


def _tma_fwd_call(q, k, v, mask, rng, out, lse, shape, ms, dtype, scale, thresh, rscale,
                  mask_kind, causal, dropout, vl=None, opts=None):
    """(grid, args, meta) of attention_sm90._attn_fwd_tma; q, k, v, out are tensors (their
    TMA descriptors are built here)."""
    from . import attention_sm90 as sm90

    B, Hq, Hk, L, S, E, Ev = shape
    cu_q, cu_k, tq, varlen = _vl_args(vl, q)
    window, softcap, opt_args = opts or _PLAIN
    mt = sm90.meta("fwd", E, Ev, L, S, mask_kind, causal, dropout, _dot_mode(dtype), varlen,
                   _fit, window, softcap)
    tiles = triton.cdiv(L, mt["BLOCK_M"]) * B * Hq
    grid = (sm90._programs(q.device, tiles, 1) if sm90.PERSISTENT_FWD else tiles,)
    args = (*sm90.fwd_descs(q, k, v, out, mt, varlen), mask, rng, cu_q, cu_k, out, lse, *ms, B,
            Hq, Hq // Hk, L, S, tq, scale * LOG2E, thresh, rscale, *opt_args)
    return grid, args, mt


def _tma_bwd(grad_out, q, k, v, lse, delta, mask, rng, dq, dk, dv, shape, ms, dtype, scale,
             thresh, rscale, mask_kind, causal, dropout, vl=None):
    """Launch attention_sm90._attn_bwd_tma: dk, dv and dq in one pass."""
    from . import attention_sm90 as sm90

    B, Hq, Hk, L, S, E, Ev = shape
    cu_q, cu_k, tq, varlen = _vl_args(vl, q)
    mt = sm90.meta("bwd", E, Ev, L, S, mask_kind, causal, dropout, _dot_mode(dtype), varlen,
                   _fit)
    tiles = triton.cdiv(S, mt["BLOCK_N"]) * B * Hk
    # [0]: the ticket counter; then one semaphore per (b, h, query tile).
    counter = torch.zeros(1 + B * Hq * triton.cdiv(L, mt["BLOCK_M"]), dtype=torch.int32,
                          device=q.device)
    dq_acc = torch.empty(dq.shape, dtype=torch.float32, device=q.device)
    grid = (sm90._programs(q.device, tiles, sm90.BWD_PROGRAMS_PER_SM),)
    args = (*sm90.bwd_descs(q, k, v, grad_out, mt, varlen), lse, delta, mask, rng, cu_q, cu_k,
            dk, dv, dq, dq_acc, counter, *ms, B, Hq, Hk, Hq // Hk, L, S, tq, scale * LOG2E,
            scale, thresh, rscale)
    wrap_triton(sm90._attn_bwd_tma)[grid](*args, **mt)


def _split_bwd(grad_out, q, k, v, lse, delta, mask, rng, dq, dk, dv, shape, strides, dtype,
               scale, thresh, rscale, mask_kind, causal, dropout, arch, kernels, vl=None,
               opts=None):
    """The backward's dK/dV and dQ kernels after _attn_bwd_pre: each on its TMA kernel
    (attention_sm90, `kernels[kind] == "tma"`) or its FlashAttention-2 one. strides: those of
    q, k, v, grad_out and the mask, for the FlashAttention-2 kernels."""
    from . import attention_sm90 as sm90

    B, Hq, Hk, L, S, E, Ev = shape
    cu_q, cu_k, tq, varlen = _vl_args(vl, q)
    flags = (dtype, scale, thresh, rscale, mask_kind, causal, dropout, arch)
    for kind, outs in (("dkdv", (dk, dv)), ("dq", (dq,))):
        if kind == "dkdv" and (S == 0 or vl is not None and k.shape[0] == 0):
            continue
        if kernels[kind] == "fa2":
            if kind == "dkdv":
                grid, args, meta = _dkdv_call(q, k, v, grad_out, lse, delta, mask, rng, dk, dv,
                                              shape, *strides, *flags, vl, opts)
                wrap_triton(_attn_bwd_dkdv)[grid](*args, **meta)
            else:
                grid, args, meta = _dq_call(q, k, v, grad_out, lse, delta, mask, rng, dq, shape,
                                            *strides, *flags, vl, opts)
                wrap_triton(_attn_bwd_dq)[grid](*args, **meta)
            continue
        window, softcap, opt_args = opts or _PLAIN
        mt = sm90.meta(kind, E, Ev, L, S, mask_kind, causal, dropout, _dot_mode(dtype), varlen,
                       _fit, window, softcap)
        parts = (sm90.dkdv_parts(E, Ev, mask_kind, causal, dropout, varlen, window, softcap)
                 if kind == "dkdv" else (None,))
        for part in parts:
            if part is not None:
                mt["PART"] = part
            kernel, grid, args = sm90.split_call(kind, q, k, v, grad_out, lse, delta, mask, rng,
                                                 cu_q, cu_k, outs, strides[-1], shape, tq,
                                                 scale, thresh, rscale, mt, opt_args)
            wrap_triton(kernel)[grid](*args, **mt)


def _shape(q, k, v):
    B, Hq, L, E = q.shape
    return B, Hq, k.shape[1], L, k.shape[2], E, v.shape[3]


def _st(t):
    return tuple(t.stride()[:3])


def forward(q, k, v, mask, rng, dropout_p, is_causal, scale, window_left=-1, window_right=-1,
            lower_right=False, softcap=0.0):
    """(out, lse) of docs/attention.md: out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L)
    float32 natural log (+inf for rows that may attend no key). The options after scale (a
    window, the lower-right diagonal, soft-capping) run on the TMA kernels where their table
    has them (attention_sm90.OPTIONS), else on the FlashAttention-2 kernels."""
    is_causal, opts = _options(is_causal, window_left, window_right, lower_right, softcap)
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    shape = B, Hq, _, L, _, _, Ev = _shape(q, k, v)
    out = torch.empty((B, Hq, L, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    if B * Hq * L == 0:
        return out, lse
    mask_ptr, ms = _mask_arg(mask, q)
    rng_ptr, thresh, rscale, dropout = _dropout_args(rng, dropout_p, q)
    arch = _arch(q.device)
    if variant("fwd", (q, k, v, out), shape[5], Ev, mask is not None, is_causal, dropout,
               arch, False, opts) == "tma":
        from . import attention_sm90 as sm90

        grid, args, meta = _tma_fwd_call(q, k, v, mask_ptr, rng_ptr, out, lse, shape, ms,
                                         q.dtype, scale, thresh, rscale, _mask_kind(mask),
                                         bool(is_causal), dropout, None, opts)
        wrap_triton(sm90._attn_fwd_tma)[grid](*args, **meta)
        return out, lse
    grid, args, meta = _fwd_call(q, k, v, mask_ptr, rng_ptr, out, lse, shape, _st(q), _st(k),
                                 _st(v), ms, q.dtype, scale, thresh, rscale, _mask_kind(mask),
                                 bool(is_causal), dropout, arch, None, opts)
    wrap_triton(_attn_fwd)[grid](*args, **meta)
    return out, lse


def backward(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale,
             window_left=-1, window_right=-1, lower_right=False, softcap=0.0):
    """(grad_q, grad_k, grad_v) of docs/attention.md, contiguous, with q, k, v's shapes and
    dtypes; deterministic (no atomics)."""
    is_causal, opts = _options(is_causal, window_left, window_right, lower_right, softcap)
    q, k, v, grad_out = _last_unit(q), _last_unit(k), _last_unit(v), _last_unit(grad_out)
    out, lse = out.contiguous(), lse.contiguous()
    shape = B, Hq, Hk, L, S, E, Ev = _shape(q, k, v)
    dq = torch.empty((B, Hq, L, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hk, S, E), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hk, S, Ev), dtype=v.dtype, device=v.device)
    if B * Hq == 0:
        return dq, dk, dv
    if L == 0:
        return dq, dk.zero_(), dv.zero_()
    mask_ptr, ms = _mask_arg(mask, q)
    rng_ptr, thresh, rscale, dropout = _dropout_args(rng, dropout_p, q)
    flags = (q.dtype, scale, thresh, rscale, _mask_kind(mask), bool(is_causal), dropout,
             _arch(q.device))
    strides = (_st(q), _st(k), _st(v), _st(grad_out), ms)

    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    grid, args, meta = _pre_call(out, grad_out, delta, shape, _st(grad_out))
    wrap_triton(_attn_bwd_pre)[grid](*args, **meta)
    bwd = variant("bwd", (q, k, v, grad_out), E, Ev, mask is not None, is_causal, dropout,
                  flags[-1], False, opts)
    if bwd == "fused":
        _tma_bwd(grad_out, q, k, v, lse, delta, mask_ptr, rng_ptr, dq, dk, dv, shape, ms,
                 *flags[:-1])
        return dq, dk, dv
    kernels = (split_kernels(q.dtype, E, Ev, mask is not None, is_causal, dropout, False, opts)
               if bwd == "split" else {"dkdv": "fa2", "dq": "fa2"})
    _split_bwd(grad_out, q, k, v, lse, delta, mask_ptr, rng_ptr, dq, dk, dv, shape, strides,
               *flags, kernels, None, opts)
    return dq, dk, dv


def _vl_strides(t):
    """(b, h, row) strides of a packed (total, H, dim) tensor seen as (B, H, len, dim)."""
    return (0, t.stride(1), t.stride(0))


def _cu(cu):
    return cu if cu.dtype == torch.int32 and cu.is_contiguous() else cu.to(torch.int32).contiguous()


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng,
                   dropout_p, is_causal, scale, window_left=-1, window_right=-1,
                   lower_right=False, softcap=0.0):
    """(out, lse) of the varlen op (docs/attention.md, "Varlen"): q (total_q, Hq, E), k
    (total_k, Hk, E), v (total_k, Hk, Ev) packed; out (total_q, Hq, Ev) in q's dtype, lse
    (Hq, total_q) float32. One launch of the dense kernels over all the sequences: the grid
    covers max_seqlen_q (which must bound every length), and blocks past a shorter sequence's
    end return at once."""
    is_causal, opts = _options(is_causal, window_left, window_right, lower_right, softcap)
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    (tq, Hq, E), (_, Hk, _), Ev = q.shape, k.shape, v.shape[2]
    n = cu_seqlens_q.shape[0] - 1
    out = torch.empty((tq, Hq, Ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, tq), dtype=torch.float32, device=q.device)
    if n <= 0 or tq * Hq == 0:
        return out, lse
    shape = (n, Hq, Hk, max_seqlen_q, max_seqlen_k, E, Ev)
    rng_ptr, thresh, rscale, dropout = _dropout_args(rng, dropout_p, q)
    vl = (_cu(cu_seqlens_q), _cu(cu_seqlens_k), tq)
    arch = _arch(q.device)
    if variant("fwd", (q, k, v, out), E, Ev, False, is_causal, dropout, arch, True,
               opts) == "tma":
        from . import attention_sm90 as sm90

        grid, args, meta = _tma_fwd_call(q, k, v, q, rng_ptr, out, lse, shape, (0, 0, 0, 0),
                                         q.dtype, scale, thresh, rscale, _MASK_NONE,
                                         bool(is_causal), dropout, vl, opts)
        wrap_triton(sm90._attn_fwd_tma)[grid](*args, **meta)
        return out, lse
    grid, args, meta = _fwd_call(q, k, v, q, rng_ptr, out, lse, shape, _vl_strides(q),
                                 _vl_strides(k), _vl_strides(v), (0, 0, 0, 0), q.dtype, scale,
                                 thresh, rscale, _MASK_NONE, bool(is_causal), dropout, arch,
                                 vl, opts)
    wrap_triton(_attn_fwd)[grid](*args, **meta)
    return out, lse


def varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, rng, dropout_p, is_causal, scale, window_left=-1,
                    window_right=-1, lower_right=False, softcap=0.0):
    """(grad_q, grad_k, grad_v) of the varlen op, contiguous packed tensors with q, k, v's
    shapes and dtypes; deterministic (no atomics)."""
    is_causal, opts = _options(is_causal, window_left, window_right, lower_right, softcap)
    q, k, v, grad_out = _last_unit(q), _last_unit(k), _last_unit(v), _last_unit(grad_out)
    out, lse = out.contiguous(), lse.contiguous()
    (tq, Hq, E), (tk, Hk, _), Ev = q.shape, k.shape, v.shape[2]
    n = cu_seqlens_q.shape[0] - 1
    dq = torch.empty((tq, Hq, E), dtype=q.dtype, device=q.device)
    dk = torch.empty((tk, Hk, E), dtype=k.dtype, device=k.device)
    dv = torch.empty((tk, Hk, Ev), dtype=v.dtype, device=v.device)
    if n <= 0 or Hq == 0:
        return dq, dk, dv
    if tq == 0:
        return dq, dk.zero_(), dv.zero_()
    rng_ptr, thresh, rscale, dropout = _dropout_args(rng, dropout_p, q)
    flags = (q.dtype, scale, thresh, rscale, _MASK_NONE, bool(is_causal), dropout,
             _arch(q.device))
    strides = (_vl_strides(q), _vl_strides(k), _vl_strides(v), _vl_strides(grad_out),
               (0, 0, 0, 0))
    shape = (n, Hq, Hk, max_seqlen_q, max_seqlen_k, E, Ev)
    vl = (_cu(cu_seqlens_q), _cu(cu_seqlens_k), tq)

    delta = torch.empty((Hq, tq), dtype=torch.float32, device=q.device)
    grid, args, meta = _pre_call(out, grad_out, delta, (1, Hq, Hk, tq, tk, E, Ev),
                                 _vl_strides(grad_out), varlen=True)
    wrap_triton(_attn_bwd_pre)[grid](*args, **meta)
    bwd = variant("bwd", (q, k, v, grad_out), E, Ev, False, is_causal, dropout, flags[-1], True,
                  opts)
    if bwd == "fused":
        dq.zero_()  # the rows of a sequence without keys get no dS K from any key block
        _tma_bwd(grad_out, q, k, v, lse, delta, q, rng_ptr, dq, dk, dv, shape, (0, 0, 0, 0),
                 *flags[:-1], vl)
        return dq, dk, dv
    kernels = (split_kernels(q.dtype, E, Ev, False, is_causal, dropout, True, opts)
               if bwd == "split" else {"dkdv": "fa2", "dq": "fa2"})
    _split_bwd(grad_out, q, k, v, lse, delta, q, rng_ptr, dq, dk, dv, shape, strides, *flags,
               kernels, vl, opts)
    return dq, dk, dv


AOT_HEAD_DIMS = (64, 128)


def fa2_spec(dt, kind, d, causal=False, dropout=False, mask=_MASK_NONE, varlen=False, arch=90):
    """(kernel, args, meta) of one FlashAttention-2 launch of kind "fwd", "dkdv", "dq" or
    "pre" for inputs of dtype dt and head dim d (E = Ev) with the tiles of compute capability
    `arch`, for ahead-of-time compilation and the SASS checks: contiguous (B, H, L, E) inputs
    with B = 4, H = 16, L = S = 1024, or 4 packed sequences of 4096 rows (varlen), a
    contiguous (B, H, L, S) mask of kind `mask`. Tensors are given as dtypes, the unused
    pointers as the launches pass them (q's dtype), so that the compiled kernels are the ones
    a launch looks up."""
    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    shape = (4, 16, 16, 1024, 1024, d, d)
    st = (0, d, 16 * d) if varlen else (16 * 1024 * d, 1024 * d, d)
    vl = (i32, i32, 4096) if varlen else None
    ms = (1 << 24, 1 << 20, 1024, 1) if mask else (0, 0, 0, 0)
    mp = (torch.uint8 if mask == _MASK_BOOL else dt) if mask else dt
    rp = i64 if dropout else dt
    flags = (dt, d ** -0.5, 6554 if dropout else 0, 1.25 if dropout else 1.0, mask, causal,
             dropout, arch)
    if kind == "fwd":
        _, args, meta = _fwd_call(dt, dt, dt, mp, rp, dt, f32, shape, st, st, st, ms, *flags,
                                  vl)
        return _attn_fwd, args, meta
    if kind == "dkdv":
        _, args, meta = _dkdv_call(dt, dt, dt, dt, f32, f32, mp, rp, dt, dt, shape, st, st, st,
                                   st, ms, *flags, vl)
        return _attn_bwd_dkdv, args, meta
    if kind == "dq":
        _, args, meta = _dq_call(dt, dt, dt, dt, f32, f32, mp, rp, dt, shape, st, st, st, st,
                                 ms, *flags, vl)
        return _attn_bwd_dq, args, meta
    pre_shape = (1, 16, 16, 4096, 4096, d, d) if varlen else shape
    _, args, meta = _pre_call(dt, dt, f32, pre_shape, st, varlen)
    return _attn_bwd_pre, args, meta


def fa2_variants(head_dims=(64, 128, 256)):
    """The FlashAttention-2 launches of one 16-bit dtype, as (kind, head dim, causal, dropout,
    mask kind, varlen): every kind and variant (masks never with causal or packed
    sequences), and the D pass per head dim."""
    out = []
    for d in head_dims:
        for kind in ("fwd", "dkdv", "dq"):
            for varlen in (False, True):
                for mask in (0,) if varlen else (0, 1, 2):
                    for causal in (False,) if mask else (False, True):
                        out += [(kind, d, causal, dropout, mask, varlen)
                                for dropout in (False, True)]
        out += [("pre", d, False, False, 0, False), ("pre", d, False, False, 0, True)]
    return out


def aot_specs(dtypes, sizes, arch=90):
    """(kernel, args, meta) for ahead-of-time compilation by `fastlm compile`: the launches of
    forward/backward for inputs of each dtype, head dims AOT_HEAD_DIMS (E = Ev), causal and
    not, without mask or dropout, for contiguous (B, H, L, E) inputs with H = 16, L = S = 1024
    (strides multiples of 16, as the JIT specializes them; head counts and lengths are not
    specialized), with the tiles chosen for compute capability `arch` (90 for sm_90): the
    FlashAttention-2 kernels, and from sm_90 on also the TMA kernels (attention_sm90) that the
    table runs there for 16-bit inputs. `sizes` do not matter here. Tensors are given as
    dtypes."""
    specs = []
    if arch >= 90:
        from . import attention_sm90 as sm90

        specs += sm90.aot_specs(dtypes, AOT_HEAD_DIMS)
    for dt in dtypes:
        for d in AOT_HEAD_DIMS:
            for causal in (False, True):
                specs += [fa2_spec(dt, kind, d, causal, arch=arch)
                          for kind in ("fwd", "dkdv", "dq")]
            specs.append(fa2_spec(dt, "pre", d, arch=arch))
    return specs

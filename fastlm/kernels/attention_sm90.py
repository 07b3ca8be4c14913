"""Attention for Hopper (sm_90) in Triton: TMA tiles, 128 x 128 forward tiles, a fused backward.

Shipped as fastlm.kernels.attention_sm90; fastlm/kernels/attention.py chooses between these kernels
and its FlashAttention-2 ones with one table per arch (`_VARIANTS` there). Same contract
(docs/attention.md), same arguments, same dropout bits; only 16-bit inputs whose q, k, v (and
grad_out) are TMA-addressable (16-byte aligned base and strides) come here.

  _attn_fwd_tma  Q, K, V tiles arrive by TMA (host tensor descriptors: 4-D (B, H, len, dim)
                 boxes [1, 1, rows, dim] for dense inputs, 3-D (total, H, dim) boxes
                 [rows, 1, dim] for packed sequences); the out tile leaves by TMA (dense).
                 TMA zero-fills what lies outside the tensor, so the ragged key tail and the
                 head-dim padding need no masked loads. Programs loop over query tiles (a
                 persistent grid of one program per SM when the table says so, else one tile
                 per program); causal tiles are numbered longest first. 128 x 128 tiles at head
                 dim <= 128 (wgmma 64xNx16 with N = 128, two warpgroups of 64 rows each).
  _attn_bwd_tma  One pass computes dK, dV and dQ (5 matmuls: S = Q K^T, dP = dO V^T,
                 dV += P^T dO, dK += dS^T Q, dQ_part = dS K) for a key block against steps of
                 query rows; the shipped tile (CONFIGS) is 64 keys x 64 queries on one
                 warpgroup (every wgmma 64x64x16 at head dim 64). dQ partial sums meet in a
                 float32 buffer in a fixed order, handed from key block to key block by a
                 semaphore per query tile (see "Deterministic dQ" below): the backward stays
                 bitwise deterministic without floating atomics.

Deterministic dQ, and why it cannot deadlock
--------------------------------------------
Query tile j of head (b, h) receives dS K from every key block n <= last(j) (all key blocks
without causal; with causal the key blocks that reach row j's tile: n * BLOCK_N < (j + 1) *
BLOCK_M). They add in DESCENDING n: key block last(j) stores its part, each next one waits
until the semaphore of (b, h, j) counts its rank (last(j) - n arrivals), loads the sum, adds,
stores and arrives; key block 0 (always a contributor) adds last and writes dq itself (scaled,
in q's dtype). Descending order suits causal: key block n starts at its diagonal, where it is
the first contributor, and key block n + 1 passed every later query tile before n gets there.

Tiles are not tied to program ids. Every program takes tile numbers from a ticket counter
(an atomic add on a zeroed int32, fresh per launch) and keeps taking until none are left;
tickets count key blocks from the last one down, all heads of one key block together. So a
tile waits only on tiles with LOWER tickets (key block n + 1 of the same head), and every
ticket has been taken by a program that is running (a CTA that is running stays resident
until it exits). Induction on tickets: the unfinished tile with the lowest ticket waits on
nothing unfinished, so it completes; hence all do, whatever the grid size, the number of CTAs
that fit on the GPU, or the order in which the hardware starts them. Under Triton's
interpreter programs run one after another: program 0 takes every ticket in order and never
waits. A skipped tile never owes an arrival: a key block past its sequence's end is no query
tile's contributor (last(j) is computed from the sequence's own key length).

Memory order of the hand-off: the program's threads store their rows of the partial sum, a
CTA barrier (tl.debug_barrier) orders them before one thread's release add on the semaphore
(GPU scope); the next contributor's acquire load (GPU scope) is followed by a CTA barrier
before its threads load the sum, with .cg loads (L2, not the SM's L1, which is not coherent).
"""

import os

import torch
import triton
import triton.language as tl

from .attention import (_dot, _dq_step, _fwd_finish, _in_window, _key_ranges,
                        _online_softmax, _philox_keep, _philox_key, _query_ranges, _scores,
                        _softcap, _window, _window_keys, _window_queries)


# ---------------------------------------------------------------------------------------------
# Device helpers.
@triton.jit
def _tile(desc, b, h, row, ROWS: tl.constexpr, COLS: tl.constexpr, VARLEN: tl.constexpr):
    # A [ROWS, COLS] tile by TMA from row `row` of head h: dense (B, H, len, dim) descriptors
    # take (b, h, row, 0); packed (total, H, dim) ones take the packed row (b unused).
    if VARLEN:
        t = desc.load([row, h, 0])
    else:
        t = desc.load([b, h, row, 0])
    return t.reshape(ROWS, COLS)


@triton.jit
def _seq_rows(CuQ, CuK, b, L, S, VARLEN: tl.constexpr):
    # (q0, k0, L, S): sequence b's first query and key rows (packed) and lengths; dense: 0, 0
    # and the launch's lengths.
    if VARLEN:
        q0 = tl.load(CuQ + b)
        k0 = tl.load(CuK + b)
        return q0, k0, tl.load(CuQ + b + 1) - q0, tl.load(CuK + b + 1) - k0
    else:
        return 0, 0, L, S


@triton.jit
def _query_tile(t, CuQ, CuK, Hq, group, L, S, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                VARLEN: tl.constexpr):
    # Query tile t (tiles of one head adjacent; causal: numbered longest first) as (bh, b, h,
    # kv head, first row m0, and _seq_rows' q0, k0, L, S of its sequence).
    num_m = tl.cdiv(L, BLOCK_M)
    bh = t // num_m
    pid_m = t % num_m
    if IS_CAUSAL:
        pid_m = num_m - 1 - pid_m
    b = bh // Hq
    h = bh % Hq
    q0, k0, L, S = _seq_rows(CuQ, CuK, b, L, S, VARLEN)
    return bh, b, h, h // group, pid_m * BLOCK_M, q0, k0, L, S


# ---------------------------------------------------------------------------------------------
# Forward.
@triton.jit
def _fwd_blocks_tma(
    acc, l_i, m_i,  # running output, row sum, row max (base 2)
    q,  # [BLOCK_M, BLOCK_E] query tile
    DescK, DescV, b, hk, k0,  # key/value descriptors, batch, kv head, first packed key row
    Mask_m, stride_mm, stride_mn, key, bh,
    offs_m, L, S, qk_scale, drop_thresh,
    lo, hi,  # keys [lo, hi), lo a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BOUNDS: tl.constexpr, DROPOUT: tl.constexpr,
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
    win, cap2,  # the window's (left, right, off) (fastlm/kernels/attention.py _window); the
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  # soft-cap times log2(e)
):
    rows = tl.arange(0, BLOCK_N)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs_n = n0 + rows
        k = _tile(DescK, b, hk, k0 + n0, BLOCK_N, BLOCK_E, VARLEN)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        if SOFTCAP:
            s, _ = _softcap(s, qk_scale, cap2)
        s = _scores(s, Mask_m + tl.cast(n0, tl.int64) * stride_mn, stride_mm, stride_mn, offs_m,
                    offs_n, L, S, qk_scale, MASK, CAUSAL, BOUNDS, BLOCK_M, BLOCK_N, win, WINDOW)
        p, acc, l_i, m_new = _online_softmax(s, acc, l_i, m_i, key, bh, offs_m, n0,
                                             drop_thresh, DROPOUT, BLOCK_M, BLOCK_N)
        v = _tile(DescV, b, hk, k0 + n0, BLOCK_N, BLOCK_EV, VARLEN)
        if VARLEN and BOUNDS:  # rows past the sequence are the next sequence's (TMA fills
            v = tl.where((offs_n < S)[:, None], v, 0.0)  # only past the tensor): p = 0 there
        acc = _dot(p.to(v.dtype), v, acc, IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(
    t,  # tile number: causal tiles are numbered longest first
    DescQ, DescK, DescV, DescO, Mask, Rng, CuQ, CuK, Out, Lse,
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, group, L, S, Tq, qk_scale, drop_thresh, drop_scale, win_left, win_right, lower_right,
    cap2,
    HEAD_EV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    bh, b, h, hk, m0, q0, k0, L, S = _query_tile(t, CuQ, CuK, Hq, group, L, S, IS_CAUSAL,
                                                  BLOCK_M, VARLEN)
    if m0 < L:  # varlen: a tile past a shorter sequence's end has nothing to do
        key = (0, 0, 0)
        if DROPOUT:
            key = _philox_key(Rng)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _tile(DescQ, b, h, q0 + m0, BLOCK_M, BLOCK_E, VARLEN)
        Mask_m = Mask
        if MASK != 0:
            Mask_m = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                      + tl.cast(m0, tl.int64) * stride_mm)
        acc = tl.zeros([BLOCK_M, BLOCK_EV], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if WINDOW:  # the keys the window reaches, each block with the window's select
            win = _window(win_left, win_right, lower_right, L, S)
            lo, hi = _window_keys(m0, S, win, BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _fwd_blocks_tma(
                acc, l_i, m_i, q, DescK, DescV, b, hk, k0, Mask_m, stride_mm, stride_mn, key,
                bh, offs_m, L, S, qk_scale, drop_thresh, lo, hi, BLOCK_M, BLOCK_N, BLOCK_E,
                BLOCK_EV, MASK, False, True, DROPOUT, IEEE, VARLEN, win, cap2, True, SOFTCAP)
        else:
            full_hi, hi = _key_ranges(S, m0, IS_CAUSAL, BLOCK_M, BLOCK_N)
            acc, l_i, m_i = _fwd_blocks_tma(
                acc, l_i, m_i, q, DescK, DescV, b, hk, k0, Mask_m, stride_mm, stride_mn, key,
                bh, offs_m, L, S, qk_scale, drop_thresh, 0, full_hi, BLOCK_M, BLOCK_N, BLOCK_E,
                BLOCK_EV, MASK, False, False, DROPOUT, IEEE, VARLEN, (-1, -1, 0), cap2, False,
                SOFTCAP)
            acc, l_i, m_i = _fwd_blocks_tma(
                acc, l_i, m_i, q, DescK, DescV, b, hk, k0, Mask_m, stride_mm, stride_mn, key,
                bh, offs_m, L, S, qk_scale, drop_thresh, full_hi, hi, BLOCK_M, BLOCK_N, BLOCK_E,
                BLOCK_EV, MASK, IS_CAUSAL, True, DROPOUT, IEEE, VARLEN, (-1, -1, 0), cap2,
                False, SOFTCAP)

        out, lse = _fwd_finish(acc, l_i, m_i, drop_scale, DROPOUT)
        out = out.to(Out.dtype.element_ty)
        row_ok = offs_m < L
        if VARLEN:  # rows past the sequence belong to the next one: a masked store
            offs_ev = tl.arange(0, BLOCK_EV)
            rows = (q0 + offs_m).to(tl.int64)
            tl.store(Out + (rows * Hq + h)[:, None] * HEAD_EV + offs_ev[None, :], out,
                     mask=row_ok[:, None] & (offs_ev < HEAD_EV)[None, :])
            tl.store(Lse + h.to(tl.int64) * Tq + rows, lse, mask=row_ok)
        else:  # TMA clips the rows past L and the padded head dims
            DescO.store([b, h, m0, 0], out.reshape(1, 1, BLOCK_M, BLOCK_EV))
            tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


@triton.jit(do_not_specialize=["B", "Hq", "group", "L", "S", "Tq", "drop_thresh", "win_left",
                               "win_right", "lower_right"])
def _attn_fwd_tma(
    DescQ,  # q (B, Hq, L, E) [dense] or (total_q, Hq, E) [varlen]: TMA descriptor
    DescK,  # k (B, Hk, S, E) or (total_k, Hk, E)
    DescV,  # v (B, Hk, S, Ev) or (total_k, Hk, Ev)
    DescO,  # out (B, Hq, L, Ev) contiguous [dense]; unused with VARLEN (q's descriptor)
    Mask,  # (B, Hq, L, S) bool (as bytes) or float view, any strides; unused unless MASK
    Rng,  # int64 (seed, offset); unused unless DROPOUT
    CuQ, CuK,  # varlen: int32 (B + 1) query and key row offsets; unused unless VARLEN
    Out,  # varlen: (total_q, Hq, Ev) contiguous, q's dtype; dense: unused (DescO)
    Lse,  # (B, Hq, L) contiguous float32, natural log (varlen: (Hq, total_q))
    stride_mb, stride_mh, stride_mm, stride_mn,  # mask strides (0 for broadcast dims)
    B,  # batch (varlen: sequences)
    Hq,  # query heads
    group,  # Hq // Hk
    L, S,  # query and key lengths (varlen: the longest sequence's)
    Tq,  # varlen: total_q, lse's row stride per head; unused unless VARLEN
    qk_scale,  # scale * log2(e)
    drop_thresh,  # dropout_threshold(dropout_p)
    drop_scale,  # dropout_scale(dropout_p), float32
    win_left, win_right, lower_right,  # WINDOW: the bounds (-1: none) and the diagonal
    cap2,  # SOFTCAP: softcap * log2(e)
    HEAD_EV: tl.constexpr,  # Ev
    BLOCK_M: tl.constexpr,  # query rows per tile
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_E: tl.constexpr,  # E padded to a power of two >= 16 (the descriptors' box)
    BLOCK_EV: tl.constexpr,  # Ev padded likewise
    MASK: tl.constexpr,  # _MASK_NONE / _MASK_BOOL / _MASK_FLOAT
    IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,  # 2: the interpreter's bfloat16 (see fastlm/kernels/attention.py _dot)
    VARLEN: tl.constexpr,  # packed sequences: b is a sequence of CuQ, CuK (no mask)
    WINDOW: tl.constexpr,  # a window or the lower-right diagonal (then not IS_CAUSAL)
    SOFTCAP: tl.constexpr,
):
    # Tiles t = pid, pid + programs, ...: one per program, or a persistent grid of one
    # program per SM (the table's choice); causal tiles are numbered longest first.
    tiles = tl.cdiv(L, BLOCK_M) * B * Hq
    for t in range(tl.program_id(0), tiles, tl.num_programs(0)):
        _fwd_tile(t, DescQ, DescK, DescV, DescO, Mask, Rng, CuQ, CuK, Out, Lse, stride_mb,
                  stride_mh, stride_mm, stride_mn, Hq, group, L, S, Tq, qk_scale, drop_thresh,
                  drop_scale, win_left, win_right, lower_right, cap2, HEAD_EV, BLOCK_M,
                  BLOCK_N, BLOCK_E, BLOCK_EV, MASK, IS_CAUSAL, DROPOUT, IEEE, VARLEN, WINDOW,
                  SOFTCAP)


# ---------------------------------------------------------------------------------------------
# Backward: dK, dV and dQ in one pass.
#
# With p_ij = exp2(s2_ij - lse_i * log2(e)) recomputed from the saved lse, z the keep bit,
# r the keep scale and D_i = rowsum(dO * O) (fastlm/kernels/attention.py _attn_bwd_pre), for a key
# block (K, V, dK, dV held by the program) and a step of query rows (Q, dO from TMA):
#   S    = Q K^T                       [BLOCK_M, BLOCK_N]   matmul 1
#   dP   = (dO V^T) z r                [BLOCK_M, BLOCK_N]   matmul 2
#   dV  += (p z r)^T dO                [BLOCK_N, Ev]        matmul 3
#   dS   = p (dP - D)
#   dK  += dS^T Q                      [BLOCK_N, E]         matmul 4 (scale applied at the end)
#   dQ_j += dS K                       [BLOCK_M, E]         matmul 5, added in key-block order
# Queries run along the rows of S so that lse and D are per-row values (2 registers a thread
# where S^T would hold 16 columns of each); P^T and dS^T reach their wgmmas through shared
# memory.
@triton.jit
def _wait_count(Sem, target, INTERP: tl.constexpr):
    # Spin until *Sem == target, every thread with a GPU-scope acquire load. The loop is PTX
    # so that the query loop around it stays one basic block that Triton's pipeliner accepts
    # (an scf.while or a CTA barrier in the body stops the TMA prefetch of the next tiles).
    # The interpreter runs programs in order: the count is there at the first look.
    if INTERP:
        seen = tl.atomic_add(Sem, 0, sem="acquire", scope="gpu")
        tl.device_assert(seen == target, "dQ hand-off out of order")
        return seen
    else:
        return tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            WAIT:
            ld.acquire.gpu.global.b32 $0, [$1];
            setp.ne.s32 p, $0, $2;
            @p bra WAIT;
            }""", "=r,l,r", [Sem, target], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _arrive(Sem, NT: tl.constexpr, INTERP: tl.constexpr):
    # Count this program's hand-off: every one of its NT threads adds 1 with a GPU-scope
    # release, which orders that thread's own stores before it; so the count reaches NT only
    # after every thread's stores (no CTA barrier needed, which would stop the pipeliner).
    if INTERP:
        tl.atomic_add(Sem, NT, sem="release", scope="gpu")
    else:
        tl.inline_asm_elementwise("red.release.gpu.global.add.s32 [$1], 1;\n mov.b32 $0, 0;",
                                  "=r,l", [Sem], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _dq_add(
    dq_part,  # [BLOCK_M, BLOCK_E] float32: this key block's dS K for the query tile
    DQacc, DQ, Sem,  # float32 partial sums, the result (q's dtype), this tile's semaphore
    dq_rows,  # [BLOCK_M] int64 rows of dq / DQacc
    row_ok,  # [BLOCK_M] rows < L
    rank,  # contributors before this key block (last(j) - n)
    n,  # this key block (0 adds last and writes dq)
    scale,
    HEAD_E: tl.constexpr, BLOCK_E: tl.constexpr,
    NT: tl.constexpr,  # threads per program (32 * num_warps): arrivals per contributor
    INTERP: tl.constexpr,
):
    # Wait for the rank earlier contributors (their NT arrivals each), add their sum (.cg: from
    # L2, not this SM's L1), then store: key block 0 writes dq, the others the partial sum,
    # and arrive. Branch-free (masks, not ifs) for the pipeliner; the load's mask depends on
    # the count read, so nothing can hoist it above the wait.
    offs_e = tl.arange(0, BLOCK_E)
    ptr = dq_rows[:, None] * HEAD_E + offs_e[None, :]
    msk = row_ok[:, None] & (offs_e < HEAD_E)[None, :]
    seen = _wait_count(Sem, rank * NT, INTERP)
    acc = dq_part + tl.load(DQacc + ptr, mask=msk & (rank > 0) & (seen == rank * NT),
                            other=0.0, cache_modifier=".cg")
    tl.store(DQ + ptr, (acc * scale).to(DQ.dtype.element_ty), mask=msk & (n == 0))
    tl.store(DQacc + ptr, acc, mask=msk & (n != 0), cache_modifier=".cg")
    _arrive(Sem, NT, INTERP)


@triton.jit
def _bwd_blocks_tma(
    dk, dv,  # [BLOCK_N, BLOCK_E], [BLOCK_N, BLOCK_EV] float32 accumulators
    k, v,  # this tile's key and value tiles
    DescQ, DescDO, b, h, q0,  # query-side descriptors, batch, query head, first packed row
    Lse_h, Delta_h,  # the head's lse and D at its first row
    DQacc, DQ, Sem_h,  # dq partial sums and result, the head's semaphores
    dq_row0,  # int64: dq row of the head's first query row (dense: bh * L; varlen: q0)
    dq_row_step,  # dq rows per query row (dense: 1; varlen: Hq)
    Mask_n, stride_mm, stride_mn, key, bh,
    n, n0, offs_n, num_n,  # key block, its first key, its keys, key blocks of the sequence
    L, S, qk_scale, scale, drop_thresh, drop_scale,
    lo, hi,  # query rows [lo, hi), lo a multiple of BLOCK_M
    HEAD_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr, NT: tl.constexpr,
    INTERP: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    for m0 in tl.range(lo, hi, BLOCK_M):
        offs_m = m0 + rows
        row_ok = offs_m < L
        q = _tile(DescQ, b, h, q0 + m0, BLOCK_M, BLOCK_E, VARLEN)
        do = _tile(DescDO, b, h, q0 + m0, BLOCK_M, BLOCK_EV, VARLEN)
        lse2 = tl.load(Lse_h + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        Di = tl.load(Delta_h + offs_m, mask=row_ok, other=0.0)
        # S = Q K^T in base 2 (queries along rows: lse and D are per-row, 2 registers per
        # thread, where S^T would hold 16 columns of each), then the mask; rows past L have
        # lse = +inf: p = 0.
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        if VARLEN:  # keys past the sequence (the next one's rows) must not reach dQ
            s = _scores(s, Mask_n + tl.cast(m0, tl.int64) * stride_mm, stride_mm, stride_mn,
                        offs_m, offs_n, L, S, qk_scale, MASK, CAUSAL, True, BLOCK_M, BLOCK_N,
                        (-1, -1, 0), False)
        else:  # dense keys past S are TMA's zeros: k = v = 0 adds nothing to dQ, dK, dV
            s = _scores(s, Mask_n + tl.cast(m0, tl.int64) * stride_mm, stride_mm, stride_mn,
                        offs_m, offs_n, L, S, qk_scale, MASK, CAUSAL, False, BLOCK_M, BLOCK_N,
                        (-1, -1, 0), False)
        p = tl.math.exp2(s - lse2[:, None])
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        if DROPOUT:
            keep = _philox_keep(key, bh, offs_m, n0, drop_thresh, BLOCK_M, BLOCK_N)
            pd = tl.where(keep, p * drop_scale, 0.0)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            pd = p
        dv = _dot(tl.trans(pd.to(do.dtype)), do, dv, IEEE)
        ds = (p * (dp - Di[:, None])).to(q.dtype)
        dk = _dot(tl.trans(ds), q, dk, IEEE)
        dq_part = _dot(ds, k, tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32), IEEE)
        # This query tile's contributors are key blocks 0 .. last; they add from last down.
        last = num_n - 1
        if IS_CAUSAL:
            last = tl.minimum(last, (m0 + BLOCK_M - 1) // BLOCK_N)
        _dq_add(dq_part, DQacc, DQ, Sem_h + m0 // BLOCK_M,
                dq_row0 + offs_m.to(tl.int64) * dq_row_step, row_ok, last - n, n, scale,
                HEAD_E, BLOCK_E, NT, INTERP)
    return dk, dv


@triton.jit
def _bwd_tile(
    t,  # ticket: key blocks from the last down, the heads of one key block together
    DescQ, DescK, DescV, DescDO, Lse, Delta, Mask, Rng, CuQ, CuK, DK, DV, DQ, DQacc, Sem,
    stride_mb, stride_mh, stride_mm, stride_mn,
    B, Hq, Hk, group, L, S, Tq, qk_scale, scale, drop_thresh, drop_scale,
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr, MASK: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, VARLEN: tl.constexpr,
    NT: tl.constexpr, INTERP: tl.constexpr,
):
    num_m = tl.cdiv(L, BLOCK_M)  # the launch's query tiles per head (semaphore stride)
    n = tl.cdiv(S, BLOCK_N) - 1 - t // (B * Hk)
    bhk = t % (B * Hk)
    b = bhk // Hk
    hk = bhk % Hk
    n0 = n * BLOCK_N
    q0, k0, L, S = _seq_rows(CuQ, CuK, b, L, S, VARLEN)
    if n0 < S:  # varlen: a key block past a shorter sequence's end has nothing to do
        key = (0, 0, 0)
        if DROPOUT:
            key = _philox_key(Rng)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        num_n = tl.cdiv(S, BLOCK_N)
        k = _tile(DescK, b, hk, k0 + n0, BLOCK_N, BLOCK_E, VARLEN)
        v = _tile(DescV, b, hk, k0 + n0, BLOCK_N, BLOCK_EV, VARLEN)
        dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
        lo, mid = _query_ranges(n0, L, IS_CAUSAL, BLOCK_M, BLOCK_N)
        for g in range(group):
            h = hk * group + g
            bh = b * Hq + h
            Lse_h, Delta_h, Mask_n = _head_rows(Lse, Delta, Mask, b, h, bh, q0, n0, L, Tq,
                                                stride_mb, stride_mh, stride_mn, MASK, VARLEN)
            if VARLEN:
                dq_row0 = q0.to(tl.int64) * Hq + h
                dq_step = Hq
            else:
                dq_row0 = bh.to(tl.int64) * L
                dq_step = 1
            Sem_h = Sem + bh.to(tl.int64) * num_m
            if IS_CAUSAL:
                dk, dv = _bwd_blocks_tma(
                    dk, dv, k, v, DescQ, DescDO, b, h, q0, Lse_h, Delta_h, DQacc, DQ, Sem_h,
                    dq_row0, dq_step, Mask_n, stride_mm, stride_mn, key, bh, n, n0, offs_n,
                    num_n, L, S, qk_scale, scale, drop_thresh, drop_scale, lo, mid, HEAD_E,
                    BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, True, IS_CAUSAL, DROPOUT, IEEE,
                    VARLEN, NT, INTERP)
            dk, dv = _bwd_blocks_tma(
                dk, dv, k, v, DescQ, DescDO, b, h, q0, Lse_h, Delta_h, DQacc, DQ, Sem_h,
                dq_row0, dq_step, Mask_n, stride_mm, stride_mn, key, bh, n, n0, offs_n, num_n,
                L, S, qk_scale, scale, drop_thresh, drop_scale, mid, L, HEAD_E, BLOCK_M,
                BLOCK_N, BLOCK_E, BLOCK_EV, MASK, False, IS_CAUSAL, DROPOUT, IEEE, VARLEN, NT,
                INTERP)
        _store_rows(DK, dk * scale, offs_n, S, k0, bhk, Hk, HEAD_E, BLOCK_E, VARLEN)
        _store_rows(DV, dv, offs_n, S, k0, bhk, Hk, HEAD_EV, BLOCK_EV, VARLEN)


@triton.jit(do_not_specialize=["B", "Hq", "Hk", "group", "L", "S", "Tq", "drop_thresh"])
def _attn_bwd_tma(
    DescQ,  # q (B, Hq, L, E) or (total_q, Hq, E): TMA descriptor, box [1, 1, BLOCK_M, *]
    DescK,  # k (B, Hk, S, E) or (total_k, Hk, E): box [1, 1, BLOCK_N, *]
    DescV,  # v (B, Hk, S, Ev) or (total_k, Hk, Ev)
    DescDO,  # grad_out, q's layout with Ev
    Lse,  # (B, Hq, L) float32 from the forward (varlen: (Hq, total_q))
    Delta,  # (B, Hq, L) float32 D = rowsum(dO * O) (varlen: (Hq, total_q))
    Mask,  # (B, Hq, L, S) view; unused unless MASK
    Rng,  # int64 (seed, offset); unused unless DROPOUT
    CuQ, CuK,  # varlen: int32 (B + 1) offsets; unused unless VARLEN
    DK,  # (B, Hk, S, E) contiguous, k's dtype (varlen: (total_k, Hk, E))
    DV,  # (B, Hk, S, Ev) contiguous, v's dtype (varlen: (total_k, Hk, Ev))
    DQ,  # (B, Hq, L, E) contiguous, q's dtype (varlen: (total_q, Hq, E))
    DQacc,  # float32, DQ's shape: partial sums (need no initial value)
    Counter,  # int32 zeros: [0] the ticket counter, [1:] a semaphore per (b, h, query tile)
    stride_mb, stride_mh, stride_mm, stride_mn,
    B, Hq, Hk, group, L, S, Tq,
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale
    drop_thresh, drop_scale,
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
    NT: tl.constexpr,  # threads per program, 32 * num_warps (arrivals per dQ hand-off)
    INTERP: tl.constexpr,  # Triton's interpreter: atomics instead of PTX for the hand-off
):
    # Every program takes tickets until none are left (see the module docstring: why the
    # ordered dQ hand-off cannot deadlock); the grid size only sets how many run at once.
    tiles = tl.cdiv(S, BLOCK_N) * B * Hk
    t = tl.atomic_add(Counter, 1)
    while t < tiles:
        _bwd_tile(t, DescQ, DescK, DescV, DescDO, Lse, Delta, Mask, Rng, CuQ, CuK, DK, DV, DQ,
                  DQacc, Counter + 1, stride_mb, stride_mh, stride_mm, stride_mn, B, Hq, Hk,
                  group, L, S, Tq, qk_scale, scale, drop_thresh, drop_scale, HEAD_E, HEAD_EV,
                  BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, IS_CAUSAL, DROPOUT, IEEE, VARLEN,
                  NT, INTERP)
        t = tl.atomic_add(Counter, 1)


# ---------------------------------------------------------------------------------------------
# Backward, split: dK/dV in one kernel, dQ in another (7 matmuls), both on TMA tiles.
#
# The fused kernel above keeps dK, dV and a dQ tile in registers at once; from head dim 128 on
# that cannot be done without spills. These two kernels hold one side each:
#   _attn_bwd_dkdv_tma  one program per (key block, b * Hk + hk): K, V, dK, dV held; query
#                       tiles (Q, dO by TMA) stream by; S = Q K^T, dP = dO V^T, dV += P^T dO,
#                       dK += dS^T Q (S with queries along its rows, as the fused kernel: lse
#                       and D are 2 registers a thread, and a key past S needs no select: its
#                       dK, dV rows are never stored). For GQA it walks the group's query
#                       heads, so dK, dV are summed in registers in a fixed order.
#   _attn_bwd_dq_tma    one program per (query block, b * Hq + h): Q, dO, dQ held; key tiles
#                       (K, V by TMA) stream by; S, dP, dQ += dS K.
# Tiles (CONFIGS "dkdv" / "dq"): 64 keys x 64 queries on one warpgroup for dK/dV (every wgmma
# N >= 64; 128 keys on two warpgroups costs the same registers a thread), 128 queries x 64
# keys on two warpgroups for dQ (each owns 64 query rows).
#
# Registers, dK/dV at head dim 128: dK and dV take 128 a thread, S/dP's wgmma 32, P 32, so
# the rest must fit in ~60. Two habits keep it there: every dK/dV wgmma is waited at once
# (_settled: an async one keeps its 16-register P^T / dS^T operand alive through the next
# products), and with dropout the keep bit rides in P's sign bit (one tile, not two, lives
# across the dP product).
@triton.jit
def _settled(x, INTERP: tl.constexpr):
    # x once every wgmma writing it has completed: a use by inline PTX makes Triton wait for
    # the wgmma right here (a plain move; ptxas folds it).
    if INTERP:
        return x
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _dkdv_blocks_tma(
    dk, dv,  # [BLOCK_N, BLOCK_E], [BLOCK_N, BLOCK_EV] float32 accumulators
    k, v,  # this program's key and value tiles
    DescQ, DescDO, b, h, q0,  # query-side descriptors, batch, query head, first packed row
    Lse_h, Delta_h,  # the head's lse and D at its first row
    Mask_n,  # the mask at (b, h, 0, first key); unused unless MASK
    stride_mm, stride_mn, key, bh,
    n0, offs_n,  # this program's first key and its keys
    L, S, qk_scale, drop_thresh, drop_scale,
    lo, hi,  # query rows [lo, hi), lo a multiple of BLOCK_M
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr, INTERP: tl.constexpr,
    PART: tl.constexpr,  # 0: dK and dV; 1: dV only; 2: dK only (dk, dv: the other unused)
    win, cap2, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  # as _fwd_blocks_tma's
):
    rows = tl.arange(0, BLOCK_M)
    for m0 in tl.range(lo, hi, BLOCK_M):
        offs_m = m0 + rows
        row_ok = offs_m < L
        q = _tile(DescQ, b, h, q0 + m0, BLOCK_M, BLOCK_E, VARLEN)
        # Rows past L (TMA's zeros, or the next sequence's rows) have lse = +inf: p = 0.
        lse2 = tl.load(Lse_h + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        if SOFTCAP:  # (tanh is not kept: dS recovers it from p, below)
            s, _ = _softcap(s, qk_scale, cap2)
        s = s * qk_scale
        if MASK != 0:
            tile = rows[:, None] * stride_mm + tl.arange(0, BLOCK_N)[None, :] * stride_mn
            mk = tl.load(Mask_n + tl.cast(m0, tl.int64) * stride_mm + tile,
                         mask=row_ok[:, None] & (offs_n < S)[None, :], other=0)
            if MASK == 1:
                s = tl.where(mk != 0, s, float("-inf"))
            else:
                s = s + mk.to(tl.float32) * 1.4426950408889634
        if CAUSAL:  # key n0 + c <= query m0 + r, spelled so that no key index is hoisted
            s = tl.where((offs_m - n0)[:, None] - tl.arange(0, BLOCK_N)[None, :] >= 0, s,
                         float("-inf"))
        if WINDOW:
            s = tl.where(_in_window(offs_m[:, None], offs_n[None, :], win), s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        do = _tile(DescDO, b, h, q0 + m0, BLOCK_M, BLOCK_EV, VARLEN)
        if DROPOUT:
            # The keep bit in p's sign (dropped: -p; a p of 0 adds nothing either way).
            keep = _philox_keep(key, bh, offs_m, n0, drop_thresh, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, -p)
        if PART != 2:
            pd = p
            if DROPOUT:
                pd = tl.maximum(p, 0.0) * drop_scale
            dv = _settled(_dot(tl.trans(pd.to(do.dtype)), do, dv, IEEE), INTERP)
        if PART != 1:
            Di = tl.load(Delta_h + offs_m, mask=row_ok, other=0.0)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
            if DROPOUT:
                dp = tl.where(p >= 0.0, dp * drop_scale, 0.0)
                p = tl.abs(p)
            ds = p * (dp - Di[:, None])
            if SOFTCAP:
                # cap' = 1 - tanh^2, tanh = s2 / cap2 with s2 = log2(p) + lse2 the capped score
                # of every p > 0 (no additive mask here: the table leaves float masks out), so
                # no tanh tile lives across the dP product; p = 0 gives dS = 0.
                live = p > 0.0  # (then lse2 is finite)
                th = (tl.math.log2(tl.where(live, p, 1.0))
                      + tl.where(live, lse2[:, None], 0.0)) / cap2
                ds = tl.where(live, ds * (1.0 - th * th), 0.0)
            dk = _settled(_dot(tl.trans(ds.to(q.dtype)), q, dk, IEEE), INTERP)
    return dk, dv


@triton.jit(do_not_specialize=["Hq", "Hk", "group", "L", "S", "Tq", "drop_thresh", "win_left",
                               "win_right", "lower_right"])
def _attn_bwd_dkdv_tma(
    DescQ, DescK, DescV, DescDO, Lse, Delta, Mask, Rng, CuQ, CuK, DK, DV,  # as _attn_bwd_tma's
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, Hk, group, L, S, Tq,
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (dK = scale * dS^T Q)
    drop_thresh, drop_scale,
    win_left, win_right, lower_right, cap2,  # as _attn_fwd_tma's
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
    INTERP: tl.constexpr,  # Triton's interpreter (no inline PTX)
    PART: tl.constexpr,  # 0: dK and dV; 1: dV only; 2: dK only (two launches, one product
    # fewer registers: the variants that would spill otherwise, CONFIGS)
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  # as _attn_fwd_tma's
):
    num_n = tl.cdiv(S, BLOCK_N)
    bhk = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    b = bhk // Hk
    hk = bhk % Hk
    n0 = pid_n * BLOCK_N
    q0, k0, L, S = _seq_rows(CuQ, CuK, b, L, S, VARLEN)
    if n0 < S:  # varlen: a key block past a shorter sequence's end has nothing to do
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _tile(DescK, b, hk, k0 + n0, BLOCK_N, BLOCK_E, VARLEN)
        v = _tile(DescV, b, hk, k0 + n0, BLOCK_N, BLOCK_EV, VARLEN)
        dk = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_EV], dtype=tl.float32)
        key = (0, 0, 0)
        if DROPOUT:
            key = _philox_key(Rng)
        lo, mid = _query_ranges(n0, L, IS_CAUSAL, BLOCK_M, BLOCK_N)
        win = (-1, -1, 0)
        hi = L
        if WINDOW:  # the query rows the window reaches, each step with the window's select
            win = _window(win_left, win_right, lower_right, L, S)
            mid, hi = _window_queries(n0, L, win, BLOCK_M, BLOCK_N)
        for g in range(group):
            h = hk * group + g
            bh = b * Hq + h
            Lse_h, Delta_h, Mask_n = _head_rows(Lse, Delta, Mask, b, h, bh, q0, n0, L, Tq,
                                                stride_mb, stride_mh, stride_mn, MASK, VARLEN)
            if IS_CAUSAL:
                dk, dv = _dkdv_blocks_tma(
                    dk, dv, k, v, DescQ, DescDO, b, h, q0, Lse_h, Delta_h, Mask_n, stride_mm,
                    stride_mn, key, bh, n0, offs_n, L, S, qk_scale, drop_thresh, drop_scale,
                    lo, mid, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, True, DROPOUT, IEEE,
                    VARLEN, INTERP, PART, win, cap2, False, SOFTCAP)
            dk, dv = _dkdv_blocks_tma(
                dk, dv, k, v, DescQ, DescDO, b, h, q0, Lse_h, Delta_h, Mask_n, stride_mm,
                stride_mn, key, bh, n0, offs_n, L, S, qk_scale, drop_thresh, drop_scale, mid,
                hi, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK, False, DROPOUT, IEEE, VARLEN,
                INTERP, PART, win, cap2, WINDOW, SOFTCAP)
        if PART != 1:
            _store_rows(DK, dk * scale, offs_n, S, k0, bhk, Hk, HEAD_E, BLOCK_E, VARLEN)
        if PART != 2:
            _store_rows(DV, dv, offs_n, S, k0, bhk, Hk, HEAD_EV, BLOCK_EV, VARLEN)


@triton.jit
def _head_rows(Lse, Delta, Mask, b, h, bh, q0, n0, L, Tq, stride_mb, stride_mh, stride_mn,
               MASK: tl.constexpr, VARLEN: tl.constexpr):
    # (lse, D, mask) of query head h (bh = b * Hq + h): lse and D at its sequence's first row,
    # the mask at (b, h, 0, key n0).
    if VARLEN:
        row0 = h.to(tl.int64) * Tq + q0
    else:
        row0 = bh.to(tl.int64) * L
    Mask_n = Mask
    if MASK != 0:
        Mask_n = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                  + tl.cast(n0, tl.int64) * stride_mn)
    return Lse + row0, Delta + row0, Mask_n


@triton.jit
def _store_rows(Out, x, offs, n, r0, bh, H, HEAD: tl.constexpr, BLOCK: tl.constexpr,
                VARLEN: tl.constexpr):
    # Rows offs (< n) of head bh's (dense) or of packed rows r0 + offs of head bh % H
    # (varlen) of a contiguous (.., HEAD) output, in Out's dtype.
    cols = tl.arange(0, BLOCK)
    if VARLEN:
        rows = (r0 + offs).to(tl.int64) * H + bh % H
    else:
        rows = bh.to(tl.int64) * n + offs
    tl.store(Out + rows[:, None] * HEAD + cols[None, :], x.to(Out.dtype.element_ty),
             mask=(offs < n)[:, None] & (cols < HEAD)[None, :])


@triton.jit
def _dq_blocks_tma(
    dq,  # [BLOCK_M, BLOCK_E] float32 accumulator
    q, do,  # this program's query and grad_out tiles
    lse2, Di,  # [BLOCK_M] lse * log2(e) and D
    DescK, DescV, b, hk, k0,  # key/value descriptors, batch, kv head, first packed key row
    Mask_m,  # the mask at (b, h, first row, 0); unused unless MASK
    stride_mm, stride_mn, key, bh,
    offs_m, L, S, qk_scale, drop_thresh, drop_scale,
    lo, hi,  # keys [lo, hi), lo a multiple of BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr,
    BOUNDS: tl.constexpr,  # mask keys past S: packed ones are the next sequence's rows (dense
    DROPOUT: tl.constexpr,  # ones are TMA's zeros, and k = 0 adds nothing to dQ)
    IEEE: tl.constexpr, VARLEN: tl.constexpr,
    win, cap2, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  # as _fwd_blocks_tma's
):
    rows = tl.arange(0, BLOCK_N)
    for n0 in tl.range(lo, hi, BLOCK_N):
        offs_n = n0 + rows
        k = _tile(DescK, b, hk, k0 + n0, BLOCK_N, BLOCK_E, VARLEN)
        v = _tile(DescV, b, hk, k0 + n0, BLOCK_N, BLOCK_EV, VARLEN)
        dq = _dq_step(dq, q, do, k, v, lse2, Di, Mask_m + tl.cast(n0, tl.int64) * stride_mn,
                      stride_mm, stride_mn, key, bh, offs_m, n0, offs_n, L, S, qk_scale,
                      drop_thresh, drop_scale, BLOCK_M, BLOCK_N, MASK, CAUSAL, BOUNDS, DROPOUT,
                      IEEE, win, cap2, WINDOW, SOFTCAP)
    return dq


@triton.jit(do_not_specialize=["Hq", "group", "L", "S", "Tq", "drop_thresh", "win_left",
                               "win_right", "lower_right"])
def _attn_bwd_dq_tma(
    DescQ, DescK, DescV, DescDO,  # as _attn_bwd_dkdv_tma's
    Lse, Delta, Mask, Rng, CuQ, CuK,
    DQ,  # (B, Hq, L, E) contiguous, q's dtype (varlen: (total_q, Hq, E))
    stride_mb, stride_mh, stride_mm, stride_mn,
    Hq, group, L, S, Tq,
    qk_scale,  # scale * log2(e)
    scale,  # the softmax scale (dQ = scale * dS K)
    drop_thresh, drop_scale,
    win_left, win_right, lower_right, cap2,  # as _attn_fwd_tma's
    HEAD_E: tl.constexpr, HEAD_EV: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_E: tl.constexpr, BLOCK_EV: tl.constexpr,
    MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,  # as _attn_fwd_tma's
):
    # One program per (query block, b * Hq + h); causal: the longest rows first.
    bh, b, h, hk, m0, q0, k0, L, S = _query_tile(tl.program_id(0), CuQ, CuK, Hq, group, L, S,
                                                  IS_CAUSAL, BLOCK_M, VARLEN)
    if m0 < L:  # varlen: a block past a shorter sequence's end has nothing to do
        key = (0, 0, 0)
        if DROPOUT:
            key = _philox_key(Rng)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q = _tile(DescQ, b, h, q0 + m0, BLOCK_M, BLOCK_E, VARLEN)
        do = _tile(DescDO, b, h, q0 + m0, BLOCK_M, BLOCK_EV, VARLEN)
        if VARLEN:
            row64 = h.to(tl.int64) * Tq + q0 + offs_m
        else:
            row64 = bh.to(tl.int64) * L + offs_m
        lse2 = tl.load(Lse + row64, mask=row_ok, other=float("inf")) * 1.4426950408889634
        Di = tl.load(Delta + row64, mask=row_ok, other=0.0)
        Mask_m = Mask
        if MASK != 0:
            Mask_m = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                      + tl.cast(m0, tl.int64) * stride_mm)
        dq = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        if WINDOW:  # the keys the window reaches, each step with the window's select
            win = _window(win_left, win_right, lower_right, L, S)
            lo, hi = _window_keys(m0, S, win, BLOCK_M, BLOCK_N)
            dq = _dq_blocks_tma(dq, q, do, lse2, Di, DescK, DescV, b, hk, k0, Mask_m, stride_mm,
                                stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh,
                                drop_scale, lo, hi, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV, MASK,
                                False, VARLEN, DROPOUT, IEEE, VARLEN, win, cap2, True, SOFTCAP)
        else:
            full_hi, hi = _key_ranges(S, m0, IS_CAUSAL, BLOCK_M, BLOCK_N)
            dq = _dq_blocks_tma(dq, q, do, lse2, Di, DescK, DescV, b, hk, k0, Mask_m, stride_mm,
                                stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh,
                                drop_scale, 0, full_hi, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
                                MASK, False, False, DROPOUT, IEEE, VARLEN, (-1, -1, 0), cap2,
                                False, SOFTCAP)
            dq = _dq_blocks_tma(dq, q, do, lse2, Di, DescK, DescV, b, hk, k0, Mask_m, stride_mm,
                                stride_mn, key, bh, offs_m, L, S, qk_scale, drop_thresh,
                                drop_scale, full_hi, hi, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_EV,
                                MASK, IS_CAUSAL, VARLEN, DROPOUT, IEEE, VARLEN, (-1, -1, 0),
                                cap2, False, SOFTCAP)
        _store_rows(DQ, dq * scale, offs_m, L, q0, bh, Hq, HEAD_E, BLOCK_E, VARLEN)


# ---------------------------------------------------------------------------------------------
# Launch configuration and launchers (fastlm/kernels/attention.py decides when these run).
#
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, padded head dim and (causal, dropout):
# the table of what these kernels cover; fastlm/kernels/attention.py runs its FlashAttention-2
# kernels for everything else (head dims above 128, float32, and what is left out below).
# Each entry was compiled for sm_90a (ptxas of triton 3.6 and 3.8, bf16 and fp16) and
# checked: no duplicated warpgroup work, every wgmma N >= 64, and no spills except the few
# listed in SPILLS (tests/test_attention_sm90.py asserts all of it; benchmarks/NOTES.md has
# the numbers).
#   fwd   BLOCK_M = 128 query rows on two warpgroups (64 rows each): wgmma 64x128x16 for
#         S = Q K^T with 128-key tiles, 64xEvx16 for P V; with dropout at head dim 128 the
#         128-key tile spills, so 64 keys.
#   bwd   the fused 5-matmul backward: dK and dV (64 keys x E, float32) and S, dP, dV, dK, dQ
#         for 64 query rows per step on one warpgroup (wgmma 64x64x16 at head dim 64); every
#         larger tile, its causal and dropout variants and head dim 128 spill (64 .. 600
#         bytes), so those take the split backward.
#   dkdv  the split backward's dK/dV kernel: 64 keys x 64 query rows per step on one
#         warpgroup (two warpgroups need 128 keys: the same registers a thread).
#   dq    the split backward's dQ kernel: 128 query rows (two warpgroups) x 64-key steps.
def _every(tile):
    return {(c, d): tile for c in (False, True) for d in (False, True)}


CONFIGS = {
    "fwd": {
        64: _every((128, 128, 8, 3)),
        128: {(False, False): (128, 128, 8, 2), (True, False): (128, 128, 8, 2),
              (False, True): (128, 64, 8, 2), (True, True): (128, 64, 8, 2)},
    },
    "bwd": {
        64: {(False, False): (64, 64, 4, 1)},
    },
    "dkdv": {64: _every((64, 64, 4, 2)), 128: _every((64, 64, 4, 2))},
    "dq": {64: _every((128, 64, 8, 2)), 128: _every((128, 64, 8, 2))},
}
# Masks (bool or float, any strides): the mask tile and its addresses spill in every forward
# tile tried (56 .. 640 bytes) and in the fused backward; the split backward takes them.
MASKS = {"fwd": False, "bwd": False, "dkdv": True, "dq": True}
# Packed sequences (varlen) keep their offsets and lengths in registers as well: the fused
# backward spills 40 bytes there (triton 3.6 and 3.8); the others take them.
VARLEN = {"fwd": True, "bwd": False, "dkdv": True, "dq": True}
# How the table chooses where a tile spills (ptxas of triton 3.8, bf16 and fp16 alike): a
# spill whose loads and stores inside the tile loop are few (<= 8 a thread per step; local
# memory is L1-cached) costs less than the alternatives, which are recomputing a product (the
# two-launch dK/dV below: +1 matmul of 7, and Q, dO read twice) or the FlashAttention-2
# kernels (at head dim 128 their dK/dV tiles put both warpgroups on the same 64 keys, so half
# the S^T and dP^T work is done twice, on wgmmas of N = 16 .. 32). SPILLS lists every spill
# accepted, as (local bytes, loads + stores inside the loops), which the SASS test checks.
#
# (kind, head dim, causal, dropout, masked, varlen) left to the FlashAttention-2 kernels
# although CONFIGS lists the tile: dQ with a mask and dropout at head dim 128 spills 120 .. 208
# bytes (26 .. 71 loads and stores a step) at 128 x 64 and 96 .. 184 bytes at 64 x 64.
EXCLUDED = {("dq", 128, False, True, True, False)}
# dK/dV variants (head dim, causal, dropout, mask kind (0 none, 1 bool, 2 float), varlen)
# computed in two launches, dV then dK (PART 1 and 2 of _attn_bwd_dkdv_tma: S recomputed, 8
# matmuls instead of 7): in one launch they spill 32 .. 440 bytes with 10 .. 448 loads and
# stores a step, in two at most 56 bytes with at most 8 (SPILLS).
DKDV_TWO_PASS = {
    (128, True, True, 0, False), (128, False, False, 1, False), (128, False, False, 2, False),
    (128, False, True, 1, False), (128, False, True, 2, False), (128, True, False, 0, True),
    (128, False, True, 0, True), (128, True, True, 0, True), (64, False, True, 2, False),
    (64, True, True, 0, True),
}
# Accepted spills: (kernel, PART, head dim, causal, dropout, mask kind, varlen) -> (bytes,
# loads + stores inside the tile loops).
SPILLS = {
    ("fwd", None, 64, False, True, 0, True): (8, 3),  # fp16 only
    ("fwd", None, 64, True, True, 0, True): (8, 3),  # fp16 only
    ("dkdv", 0, 128, True, False, 0, False): (8, 2),
    ("dkdv", 0, 128, False, True, 0, False): (16, 5),
    ("dkdv", 2, 128, True, True, 0, False): (16, 2),
    ("dkdv", 2, 128, False, True, 2, False): (16, 2),
    ("dkdv", 2, 128, True, False, 0, True): (16, 8),
    ("dkdv", 2, 128, True, True, 0, True): (56, 4),
    ("dkdv", 2, 64, False, True, 2, False): (8, 6),
    ("dq", None, 128, True, True, 0, False): (32, 4),
    ("dq", None, 64, False, True, 1, False): (8, 0),
    # with the options: (..., varlen, window, softcap)
    ("dkdv", 0, 64, False, False, 0, False, True, True): (96, 6),  # fp16 only
    ("dkdv", 0, 64, True, False, 0, False, False, True): (16, 6),
    ("dkdv", 2, 64, False, False, 0, True, True, True): (56, 8),
    ("dkdv", 0, 64, False, False, 0, True, False, True): (8, 6),
    ("dkdv", 0, 64, True, False, 0, True, False, True): (24, 4),
    ("dkdv", 0, 128, False, False, 0, False, True, False): (128, 2),
    ("dkdv", 2, 128, True, False, 0, False, False, True): (8, 2),
    ("dkdv", 0, 128, False, True, 0, False, True, False): (16, 6),
    ("dkdv", 2, 128, False, False, 0, True, True, True): (136, 6),
    ("dkdv", 2, 128, False, False, 0, True, False, True): (8, 2),
    ("dkdv", 2, 128, True, False, 0, True, False, True): (56, 6),
    ("dkdv", 2, 128, False, True, 0, True, True, False): (16, 0),
    ("dkdv", 2, 128, False, True, 0, True, True, True): (24, 6),
    ("dkdv", 2, 128, False, True, 0, True, False, True): (8, 0),
    ("dq", None, 128, False, True, 0, False, True, False): (24, 6),
    ("dq", None, 128, True, True, 0, False, False, True): (8, 1),
}
# The attention options (a window or the lower-right diagonal: WINDOW; soft-capping: SOFTCAP;
# docs/attention.md) on the same tiles: the forward and the split backward take them without
# a mask (a window never comes with one; soft-capping with one runs the FlashAttention-2
# kernels: the dK/dV kernel recovers tanh from p, which an additive mask would shift), the
# fused backward not at all (its calls take the split one). Chosen by the rule above from the
# SASS of every option variant (ptxas of triton 3.8, bf16 and fp16; attention_sm90 of
# 2026-12-04): one launch where its loops spill at most 8 loads and stores a step, else the
# two-pass dK/dV where both passes do, else the FlashAttention-2 kernels.
#   EXCLUDED_OPTIONS: (kind, head dim, causal, dropout, varlen, window, softcap) -> the dtypes
#     left to the FlashAttention-2 kernels (soft-capping with dropout in the dense dK/dV
#     kernel spills 32 .. 656 bytes with 14 .. 920 loop loads and stores in one pass or two).
#   DKDV_TWO_PASS_OPTIONS: (head dim, causal, dropout, varlen, window, softcap) of the dK/dV
#     launches made in two passes (as DKDV_TWO_PASS).
OPTIONS = {"fwd": True, "bwd": False, "dkdv": True, "dq": True}
_BOTH = ("float16", "bfloat16")
EXCLUDED_OPTIONS = {
    ("dkdv", 64, False, True, False, True, True): _BOTH,
    ("dkdv", 64, False, True, False, False, True): _BOTH,
    ("dkdv", 64, True, True, False, False, True): _BOTH,
    ("dkdv", 64, False, True, True, True, True): _BOTH,
    ("dkdv", 64, False, True, True, False, True): _BOTH,
    ("dkdv", 64, True, True, True, False, True): _BOTH,
    ("dkdv", 128, False, False, False, True, True): _BOTH,
    ("dkdv", 128, False, True, False, True, True): _BOTH,
    ("dkdv", 128, False, True, False, False, True): _BOTH,
    ("dkdv", 128, True, True, False, False, True): _BOTH,
    ("dkdv", 128, True, True, True, False, True): _BOTH,
    ("dq", 128, False, True, True, True, True): _BOTH,
    ("fwd", 64, False, True, True, False, True): ("float16",),
    ("fwd", 64, True, True, True, False, True): ("float16",),
}
DKDV_TWO_PASS_OPTIONS = {
    (64, False, False, True, True, True), (128, False, False, False, False, True),
    (128, True, False, False, False, True), (128, False, False, True, True, False),
    (128, False, False, True, True, True), (128, False, False, True, False, True),
    (128, True, False, True, False, True), (128, False, True, True, True, False),
    (128, False, True, True, True, True), (128, False, True, True, False, True),
}
# Forward: a persistent grid (one program per SM looping over tiles) or one tile per program.
PERSISTENT_FWD = False
# Programs of the backward per SM (its tiles are handed out by tickets; see the docstring).
BWD_PROGRAMS_PER_SM = 2


def _d(e, ev):
    return max(64, triton.next_power_of_2(max(e, ev)))


def supports(kind, dtype, e, ev, masked, causal, dropout, varlen=False, window=False,
             softcap=False):
    """Whether kernel `kind` ("fwd", "bwd" (fused), "dkdv", "dq") has a tile (CONFIGS) for
    these inputs; window / softcap: the WINDOW and SOFTCAP options of the launch (OPTIONS)."""
    d = _d(e, ev)
    if (window or softcap) and (masked or not OPTIONS[kind]):
        return False
    if (window or softcap) and str(dtype).removeprefix("torch.") in EXCLUDED_OPTIONS.get(
            (kind, d, bool(causal), bool(dropout), bool(varlen), bool(window), bool(softcap)),
            ()):
        return False
    return (dtype in (torch.float16, torch.bfloat16)
            and (MASKS[kind] or not masked) and (VARLEN[kind] or not varlen)
            and (bool(causal), bool(dropout)) in CONFIGS[kind].get(d, {})
            and (kind, d, bool(causal), bool(dropout), bool(masked), bool(varlen))
            not in EXCLUDED)


def dkdv_parts(e, ev, mask_kind, causal, dropout, varlen=False, window=False, softcap=False):
    """The PART of each _attn_bwd_dkdv_tma launch: (0,) one launch for dK and dV, or (1, 2)."""
    if window or softcap:
        key = (_d(e, ev), bool(causal), bool(dropout), bool(varlen), bool(window), bool(softcap))
        return (1, 2) if key in DKDV_TWO_PASS_OPTIONS else (0,)
    key = (_d(e, ev), bool(causal), bool(dropout), int(mask_kind), bool(varlen))
    return (1, 2) if key in DKDV_TWO_PASS else (0,)


def tma_ready(*tensors):
    """Whether TMA can address every tensor: not empty, 16-byte aligned base, unit last
    stride, every other stride a positive multiple of 16 bytes (dims of size 1 excepted:
    _tma_view fixes their strides)."""
    for t in tensors:
        es = t.element_size()
        if t.numel() == 0 or t.data_ptr() % 16 or t.stride(-1) != 1:
            return False
        for size, st in zip(t.shape[:-1], t.stride()[:-1]):
            if size != 1 and (st <= 0 or (st * es) % 16):
                return False
    return True


def _tma_view(t):
    """t, with the strides of its size-1 dims (never stepped along) made 16-byte multiples so
    that TensorDescriptor.from_tensor accepts it."""
    step = 16 // t.element_size()
    st = [s if n != 1 or (s * t.element_size()) % 16 == 0 and s > 0 else step
          for n, s in zip(t.shape, t.stride())]
    return t if st == list(t.stride()) else t.as_strided(t.shape, st)


def _desc(t, box):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(_tma_view(t), list(box))


_SMS = {}


def _programs(device, tiles, per_sm):
    """Grid size of a persistent launch: per_sm programs per SM (CPU, the interpreter: 2, so
    that a program finds the tiles taken and leaves)."""
    if device.type != "cuda":
        return max(1, min(tiles, 2))
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(tiles, _SMS[idx] * per_sm))


# The kernels' option arguments of a launch without options.
PLAIN_ARGS = (-1, -1, 0, 0.0)


def meta(kind, e, ev, m_len, n_len, mask_kind, causal, dropout, ieee, varlen, fit,
         window=False, softcap=False):
    """Meta-parameters of one launch; m_len / n_len: rows along BLOCK_M / BLOCK_N; `fit`
    shrinks a block to a short sequence (fastlm/kernels/attention.py _fit); window, softcap:
    the WINDOW and SOFTCAP options (not for the fused backward)."""
    bm, bn, warps, stages = CONFIGS[kind][_d(e, ev)][(bool(causal), bool(dropout))]
    pad = lambda x: max(16, triton.next_power_of_2(x))  # noqa: E731
    m = dict(HEAD_EV=ev, BLOCK_M=fit(bm, m_len), BLOCK_N=fit(bn, n_len), BLOCK_E=pad(e),
             BLOCK_EV=pad(ev), MASK=mask_kind, IS_CAUSAL=causal, DROPOUT=dropout, IEEE=ieee,
             VARLEN=varlen, num_warps=warps, num_stages=stages)
    if kind != "bwd":
        m.update(WINDOW=bool(window), SOFTCAP=bool(softcap))
    if kind == "bwd":
        m.update(HEAD_E=e, NT=32 * warps, INTERP=interpreting())
    elif kind == "dkdv":
        m.update(HEAD_E=e, INTERP=interpreting(), PART=0)
    elif kind == "dq":
        m["HEAD_E"] = e
    return m


def split_call(kind, q, k, v, do, lse, delta, mask, rng, cu_q, cu_k, outs, ms, shape, tq,
               scale, thresh, rscale, mt, opt_args=PLAIN_ARGS):
    """(kernel, grid, args) of one launch of the split backward with meta `mt`: kind "dkdv"
    (outs = (dk, dv)) or "dq" (outs = (dq,)). q, k, v, do are tensors (their descriptors are
    built here); shape is (B, Hq, Hk, L, S, E, Ev) (varlen: B sequences, L, S the longest);
    opt_args: (win_left, win_right, lower_right, softcap * log2(e)) of the options."""
    B, Hq, Hk, L, S, _, _ = shape
    descs = bwd_descs(q, k, v, do, mt, mt["VARLEN"])
    rest = (Hq // Hk, L, S, tq, scale * 1.4426950408889634, scale, thresh, rscale, *opt_args)
    if kind == "dkdv":
        grid = (triton.cdiv(S, mt["BLOCK_N"]) * B * Hk,)
        return _attn_bwd_dkdv_tma, grid, (*descs, lse, delta, mask, rng, cu_q, cu_k, *outs,
                                          *ms, Hq, Hk, *rest)
    grid = (triton.cdiv(L, mt["BLOCK_M"]) * B * Hq,)
    return _attn_bwd_dq_tma, grid, (*descs, lse, delta, mask, rng, cu_q, cu_k, *outs, *ms, Hq,
                                    *rest)


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def fwd_descs(q, k, v, out, mt, varlen):
    """(DescQ, DescK, DescV, DescO) of a forward launch with meta `mt`."""
    bm, bn, be, bev = mt["BLOCK_M"], mt["BLOCK_N"], mt["BLOCK_E"], mt["BLOCK_EV"]
    if varlen:
        dq = _desc(q, (bm, 1, be))
        return dq, _desc(k, (bn, 1, be)), _desc(v, (bn, 1, bev)), dq
    return (_desc(q, (1, 1, bm, be)), _desc(k, (1, 1, bn, be)), _desc(v, (1, 1, bn, bev)),
            _desc(out, (1, 1, bm, bev)))


def bwd_descs(q, k, v, do, mt, varlen):
    """(DescQ, DescK, DescV, DescDO) of a backward launch with meta `mt`."""
    bm, bn, be, bev = mt["BLOCK_M"], mt["BLOCK_N"], mt["BLOCK_E"], mt["BLOCK_EV"]
    if varlen:
        return (_desc(q, (bm, 1, be)), _desc(k, (bn, 1, be)), _desc(v, (bn, 1, bev)),
                _desc(do, (bm, 1, bev)))
    return (_desc(q, (1, 1, bm, be)), _desc(k, (1, 1, bn, be)), _desc(v, (1, 1, bn, bev)),
            _desc(do, (1, 1, bm, bev)))


def variants(kinds=("fwd", "bwd", "dkdv", "dq"), head_dims=(64, 128)):
    """Every launch the table ships, as (kind, part, head dim, causal, dropout, mask kind,
    varlen) tuples (part: the PART of a dK/dV launch, else None); masks never with causal."""
    out = []
    for kind in kinds:
        for d in head_dims:
            for varlen in (False, True):
                for mask in (0,) if varlen else (0, 1, 2):
                    for causal in (False,) if mask else (False, True):
                        for dropout in (False, True):
                            if not supports(kind, torch.bfloat16, d, d, mask != 0, causal,
                                            dropout, varlen):
                                continue
                            parts = ((None,) if kind != "dkdv" else
                                     dkdv_parts(d, d, mask, causal, dropout, varlen))
                            out += [(kind, part, d, causal, dropout, mask, varlen)
                                    for part in parts]
    return out


def option_variants(kinds=("fwd", "dkdv", "dq"), head_dims=(64, 128), dtype=torch.bfloat16):
    """The launches with the attention options that the table ships for `dtype`, as variants()
    entries with (window, softcap) appended: a window (with or without soft-capping),
    soft-capping alone and with causal; no mask; dense and packed; with and without
    dropout."""
    out = []
    for kind in kinds:
        for d in head_dims:
            for varlen in (False, True):
                for dropout in (False, True):
                    for window, softcap, causal in ((True, False, False), (True, True, False),
                                                    (False, True, False), (False, True, True)):
                        if not supports(kind, dtype, d, d, False, causal, dropout, varlen,
                                        window, softcap):
                            continue
                        parts = ((None,) if kind != "dkdv" else
                                 dkdv_parts(d, d, 0, causal, dropout, varlen, window, softcap))
                        out += [(kind, part, d, causal, dropout, 0, varlen, window, softcap)
                                for part in parts]
    return out


def aot_spec(dt, kind, part, d, causal, dropout, mask, varlen, window=False, softcap=False):
    """(kernel, args, meta) of one launch of `variants` for ahead-of-time compilation (`fastlm
    compile`, the SASS checks) with inputs of dtype dt: B = 4, Hq = Hk = 16, L = S = 1024
    (dense, contiguous; lengths are not specialized) or 4 packed sequences (total 4096), a
    contiguous (B, H, L, S) mask. Tensors are given as dtypes; the descriptors are built on
    small CPU tensors (only their boxes and dtype reach the compiled kernel)."""
    from .attention import _fit

    f32, i32 = torch.float32, torch.int32
    mt = meta(kind, d, d, 1024, 1024, mask, causal, dropout, 0, varlen, _fit, window, softcap)
    x = torch.empty((16, 1, d) if varlen else (1, 1, 16, d), dtype=dt)
    # unused pointers are q's dtype, as the launches pass q for them
    mp = (torch.uint8 if mask == 1 else dt) if mask else dt
    rp = torch.int64 if dropout else dt
    cu = (i32, i32) if varlen else (dt, dt)
    ms = (1 << 24, 1 << 20, 1024, 1) if mask else (0, 0, 0, 0)
    drop = (6554, 1.25) if dropout else (0, 1.0)
    qk = 0.125 * 1.4426950408889634
    if kind == "fwd":
        args = (*fwd_descs(x, x, x, x, mt, varlen), mp, rp, *cu, dt, f32, *ms, 4, 16, 1, 1024,
                1024, 4096, qk, *drop, *PLAIN_ARGS)
        return _attn_fwd_tma, args, mt
    if kind == "bwd":
        mt["INTERP"] = False
        args = (*bwd_descs(x, x, x, x, mt, varlen), f32, f32, mp, rp, *cu, dt, dt, dt, f32,
                i32, *ms, 4, 16, 16, 1, 1024, 1024, 4096, qk, 0.125, *drop)
        return _attn_bwd_tma, args, mt
    if kind == "dkdv":
        mt.update(INTERP=False, PART=part)
    kernel, _, args = split_call(kind, x, x, x, x, f32, f32, mp, rp, *cu,
                                 (dt, dt) if kind == "dkdv" else (dt,), ms,
                                 (4, 16, 16, 1024, 1024, d, d), 4096, 0.125, *drop, mt)
    return kernel, args, mt


def aot_specs(dtypes, head_dims=(64, 128)):
    """aot_spec of the launches `fastlm compile` prepares: per 16-bit dtype and head dim, the
    dense ones without mask or dropout (causal and not)."""
    return [aot_spec(dt, *v) for dt in dtypes if dt in (torch.float16, torch.bfloat16)
            for v in variants(head_dims=head_dims) if not (v[4] or v[5] or v[6])]

"""LayerNorm in Triton: forward, backward, and the deterministic dweight/dbias column sum.

Shipped as fastlm.kernels.layer_norm. No autograd here: fastlm/ops/layer_norm.py wraps
`forward` and `backward` in torch.library.triton_op and ties them together.

Rows up to SINGLE_MAX elements are held whole in one program (one load, two reductions from
registers); longer rows are walked in CHUNK-element pieces, re-reading the row from L2.

RMSNorm (fastlm.rms_norm, add_rms_norm) runs on the same kernels with RMS=True: no centring
(mean 0, not stored), no bias, and no mean(g) term in the backward.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastlm.ops.attention import dropout_scale, dropout_threshold

from .attention import _philox_keep, _philox_key  # the dropout bits, shared with attention

SINGLE_MAX = 16384  # longest row held whole in one program
CHUNK = 4096  # piece size for longer rows


@triton.jit
def _row_keep(Rng, row, start, thresh, BLOCK_N: tl.constexpr):
    # Dropout factor (0 or 1) for columns start .. start + BLOCK_N of `row`: the bits of
    # docs/layer_norm.md, i.e. attention's Philox keep mask with counter
    # (col >> 3, row & 0xffffffff, row >> 32, offset) for a one-row block.
    r = tl.full([1], 0, tl.int64) + row  # a tensor also where `row` is a plain int (interpreter)
    keep = _philox_keep(_philox_key(Rng), r >> 32, r, start, thresh, 1, BLOCK_N)
    return tl.reshape(keep, [BLOCK_N])


@triton.jit
def _add_row(X, R, S, Rng, row, off, start, N, thresh, scale, DROPOUT: tl.constexpr,
             BLOCK_N: tl.constexpr):
    # Columns start .. start + BLOCK_N of s = residual + input * m (m = scale where kept, else
    # 0; m = 1 without dropout), rounded to the input dtype and stored to S; returns the
    # rounded s in float32 (0 past N).
    cols = start + tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        x = x * tl.where(_row_keep(Rng, row, start, thresh, BLOCK_N), scale, 0.0)
    s = tl.load(R + off + cols, mask=mask, other=0.0).to(tl.float32) + x
    s = s.to(S.dtype.element_ty)
    tl.store(S + off + cols, s, mask=mask)
    return tl.where(mask, s.to(tl.float32), 0.0)


@triton.jit(do_not_specialize=["thresh"])
def _ln_fwd(
    X,  # input, (M, N) contiguous
    R,  # residual, (M, N), input dtype; unused unless HAS_RESIDUAL
    W,  # weight (N,), input dtype or float32; unused unless HAS_W
    B,  # bias (N,), as W; unused unless HAS_B
    Y,  # output, (M, N), input dtype
    S,  # summed = R + dropout(X), (M, N), input dtype; unused unless HAS_RESIDUAL
    Mean,  # (M,) float32
    Rstd,  # (M,) float32
    Rng,  # int64 (seed, offset) of the dropout bits; unused unless DROPOUT
    N,  # row length
    eps,  # added to the variance
    thresh,  # dropout: keep where the element's 16 random bits >= thresh
    scale,  # dropout: kept elements are multiplied by this (1 / (1 - rate))
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # normalize s = R + dropout(X) (stored to S), not X
    DROPOUT: tl.constexpr,  # only with HAS_RESIDUAL
    BLOCK_N: tl.constexpr,  # next power of two >= N when SINGLE, else the chunk size
    SINGLE: tl.constexpr,  # the whole row fits in one block
    RMS: tl.constexpr = False,  # RMSNorm: mean 0 (Mean unused), rstd from mean(x^2)
):
    # One program per row: mean, then the variance of the centred row (two-pass, so a large
    # mean does not cancel away the variance), then y = (x - mean) * rstd * w + b. With
    # HAS_RESIDUAL the row is s = round(r + x * m) instead of x (the rounded values, as eager).
    row = tl.program_id(0).to(tl.int64)
    off = row * N
    yr = Y + off
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_RESIDUAL:
            x = _add_row(X, R, S, Rng, row, off, 0, N, thresh, scale, DROPOUT, BLOCK_N)
        else:
            x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
        if RMS:
            mean = 0.0
        else:
            mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(yr + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # The first pass makes s (stored to S); the later passes re-read the rounded s.
        xr = S + off if HAS_RESIDUAL else X + off
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            if HAS_RESIDUAL:
                acc += _add_row(X, R, S, Rng, row, off, start, N, thresh, scale, DROPOUT,
                                BLOCK_N)
            elif not RMS:
                cols = start + tl.arange(0, BLOCK_N)
                acc += tl.load(xr + cols, mask=cols < N, other=0.0).to(tl.float32)
        if RMS:
            mean = 0.0
        else:
            mean = tl.sum(acc, axis=0) / N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            xc = tl.where(mask, tl.load(xr + cols, mask=mask, other=0.0).to(tl.float32) - mean,
                          0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = cols < N
            y = (tl.load(xr + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(yr + cols, y.to(Y.dtype.element_ty), mask=mask)
    if not RMS:
        tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _bwd_store(DX, GS, DIN, Rng, row, off, start, dx, mask, thresh, scale, HAS_GS: tl.constexpr,
               DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    # Store dx (+ grad_summed) to DX, and with dropout (dx + grad_summed) * m to DIN.
    if HAS_GS:
        dx += tl.load(GS + off + start + tl.arange(0, BLOCK_N), mask=mask, other=0.0).to(
            tl.float32)
    tl.store(DX + off + start + tl.arange(0, BLOCK_N), dx.to(DX.dtype.element_ty), mask=mask)
    if DROPOUT:
        m = tl.where(_row_keep(Rng, row, start, thresh, BLOCK_N), scale, 0.0)
        tl.store(DIN + off + start + tl.arange(0, BLOCK_N), (dx * m).to(DIN.dtype.element_ty),
                 mask=mask)


@triton.jit(do_not_specialize=["M", "rows_per_prog", "thresh"])  # one binary for every batch size
def _ln_bwd(
    DY,  # grad of the output, (M, N) contiguous
    X,  # input, (M, N) contiguous (fused add: summed)
    W,  # weight (N,); unused unless HAS_W
    Mean,  # (M,) float32 from the forward
    Rstd,  # (M,) float32 from the forward
    DX,  # grad of the input, (M, N) (fused add: grad of summed and of the residual)
    GS,  # fused add: grad of the summed output, (M, N); unused unless HAS_GS
    DIN,  # fused add: grad of the dropout input, (M, N); unused unless DROPOUT
    Rng,  # int64 (seed, offset) of the dropout bits; unused unless DROPOUT
    PW,  # (programs, N) float32 partial dweight; zeroed by the caller unless SINGLE
    PB,  # (programs, N) float32 partial dbias; as PW
    M,  # rows
    N,  # row length
    rows_per_prog,  # each program owns rows [pid * rows_per_prog, (pid + 1) * rows_per_prog)
    thresh,  # dropout: keep where the element's 16 random bits >= thresh
    scale,  # dropout: 1 / (1 - rate)
    HAS_W: tl.constexpr,
    PARTIALS: tl.constexpr,  # accumulate dweight/dbias partials
    HAS_GS: tl.constexpr,  # add GS to dx
    DROPOUT: tl.constexpr,  # also store DIN = dx * m
    BLOCK_N: tl.constexpr,
    SINGLE: tl.constexpr,
    RMS: tl.constexpr = False,  # RMSNorm: mean 0 (Mean unused), no mean(g) term
):
    # Per row, with xhat = (x - mean) * rstd and g = dy * w (RMSNorm: mean = 0 and c = 0):
    #   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    #   dw += dy * xhat,  db += dy  (summed over this program's rows; the column sum over
    #   programs happens in _col_sum, in program order, so the result is bit-reproducible)
    # Fused add (x = summed = residual + input * m): dx += grad_summed is the gradient of the
    # residual, and dx * m that of the input (m regenerated from Rng, never stored).
    pid = tl.program_id(0)
    r0 = pid.to(tl.int64) * rows_per_prog  # int64 rows: row * N may pass 2**31
    r1 = tl.minimum(r0 + rows_per_prog, M)
    if SINGLE:
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(r0, r1):
            off = row * N
            x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
            mean = 0.0 if RMS else tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy
            if HAS_W:
                g = dy * w
            a = tl.sum(g * xhat, axis=0) / N
            c = 0.0 if RMS else tl.sum(g, axis=0) / N
            dx = rstd * (g - c - xhat * a)
            _bwd_store(DX, GS, DIN, Rng, row, off, 0, dx, mask, thresh, scale, HAS_GS, DROPOUT,
                       BLOCK_N)
            if PARTIALS:
                dw += dy * xhat
                db += dy
        if PARTIALS:
            tl.store(PW + pid * N + cols, dw, mask=mask)
            tl.store(PB + pid * N + cols, db, mask=mask)
    else:
        for row in range(r0, r1):
            off = row * N
            mean = 0.0 if RMS else tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            acc_a = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_c = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                acc_a += g * tl.where(mask, (x - mean) * rstd, 0.0)
                acc_c += g
            a = tl.sum(acc_a, axis=0) / N
            c = 0.0 if RMS else tl.sum(acc_c, axis=0) / N
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                mask = cols < N
                x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + off + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy
                if HAS_W:
                    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dx = rstd * (g - c - xhat * a)
                _bwd_store(DX, GS, DIN, Rng, row, off, start, dx, mask, thresh, scale, HAS_GS,
                           DROPOUT, BLOCK_N)
                if PARTIALS:
                    pw = PW + pid * N + cols
                    pb = PB + pid * N + cols
                    tl.store(pw, tl.load(pw, mask=mask, other=0.0) + dy * xhat, mask=mask)
                    tl.store(pb, tl.load(pb, mask=mask, other=0.0) + dy, mask=mask)


@triton.jit(do_not_specialize=["R"])
def _col_sum(
    P,  # (R, N) float32 partials
    Out,  # (N,) the parameter's dtype
    R,  # partial rows
    N,  # columns
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Out[j] = sum_r P[r, j]: a fixed tile walk and a fixed tree, so the same bits every run.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        m = (rows[:, None] < R) & (cols[None, :] < N)
        acc += tl.load(P + rows[:, None].to(tl.int64) * N + cols[None, :], mask=m, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=cols < N)


def _config(n):
    """(BLOCK_N, SINGLE, num_warps) for rows of n elements."""
    if n <= SINGLE_MAX:
        block = max(16, triton.next_power_of_2(n))
        single = True
    else:
        block, single = CHUNK, False
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, single, warps


def _programs(m, device):
    """Backward programs: a device constant (so dw/db bits repeat), at most one per row."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(m, 4 * sms))
    return max(1, min(m, 8))


def _fwd_launch(x, w, b, y, mean, rstd, n, eps, has_w, has_b, fused=None, rms=False):
    """Arguments and meta-parameters of one _ln_fwd launch (also used by `aot_specs`).
    fused: None for LayerNorm, else (residual, summed, rng, thresh, scale, dropout).
    rms: RMSNorm (mean unused)."""
    block, single, warps = _config(n)
    r, s, rng, thresh, scale, dropout = fused or (x, y, x, 0, 1.0, False)
    meta = dict(HAS_W=has_w, HAS_B=has_b, HAS_RESIDUAL=fused is not None, DROPOUT=dropout,
                BLOCK_N=block, SINGLE=single, RMS=rms, num_warps=warps)
    return (x, r, w, b, y, s, mean, rstd, rng, n, eps, thresh, scale), meta


def _bwd_launch(dy, x, w, mean, rstd, dx, pw, pb, m, n, rows_per_prog, has_w, partials,
                fused=None, rms=False):
    """Arguments and meta-parameters of one _ln_bwd launch (also used by `aot_specs`).
    fused: None for LayerNorm, else (grad_summed or None, grad_input or None, rng, thresh,
    scale); a grad_input turns the dropout epilogue on. rms: RMSNorm (mean unused)."""
    block, single, warps = _config(n)
    gs, din, rng, thresh, scale = fused or (None, None, x, 0, 1.0)
    meta = dict(HAS_W=has_w, PARTIALS=partials, HAS_GS=gs is not None, DROPOUT=din is not None,
                BLOCK_N=block, SINGLE=single, RMS=rms, num_warps=warps)
    gs = dx if gs is None else gs
    din = dx if din is None else din
    return (dy, x, w, mean, rstd, dx, gs, din, rng, pw, pb, m, n, rows_per_prog, thresh,
            scale), meta


_COL_META = dict(BLOCK_R=32, BLOCK_C=64, num_warps=4)


def forward(x, weight, bias, eps):
    """(y, mean, rstd) for a 2-D x; weight and bias are (N,) or None."""
    y, _, mean, rstd = _forward(x, None, weight, bias, None, 0.0, eps)
    return y, mean, rstd


def add_forward(x, residual, weight, bias, rng, dropout_p, eps):
    """(y, summed, mean, rstd): summed = residual + dropout(x) in x's dtype, y its LayerNorm.
    Dropout (docs/layer_norm.md) is on when dropout_p > 0; rng is then int64 (seed, offset)."""
    return _forward(x, residual, weight, bias, rng, dropout_p, eps)


def rms_forward(x, weight, eps):
    """(y, rstd) of RMSNorm for a 2-D x; weight is (N,) or None."""
    y, _, _, rstd = _forward(x, None, weight, None, None, 0.0, eps, rms=True)
    return y, rstd


def add_rms_forward(x, residual, weight, rng, dropout_p, eps):
    """(y, summed, rstd): summed = residual + dropout(x) in x's dtype, y its RMSNorm."""
    y, s, _, rstd = _forward(x, residual, weight, None, rng, dropout_p, eps, rms=True)
    return y, s, rstd


def _forward(x, residual, weight, bias, rng, dropout_p, eps, rms=False):
    x = x.contiguous()
    m, n = x.shape
    y = torch.empty_like(x)
    s = None if residual is None else torch.empty_like(x)
    mean = torch.empty((0 if rms else m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y, s, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    w = x if weight is None else weight.contiguous()
    b = x if bias is None else bias.contiguous()
    fused = None
    if residual is not None:
        drop = dropout_p > 0.0
        fused = (residual.contiguous(), s, rng if drop else x,
                 dropout_threshold(dropout_p) if drop else 0,
                 dropout_scale(dropout_p) if drop else 1.0, drop)
    args, meta = _fwd_launch(x, w, b, y, rstd if rms else mean, rstd, n, eps, weight is not None,
                             bias is not None, fused, rms)
    wrap_triton(_ln_fwd)[(m,)](*args, **meta)
    return y, s, mean, rstd


def _param_grad(p, wanted, x):
    if wanted:
        return torch.empty_like(p)
    return torch.empty((0,), dtype=torch.float32, device=x.device)


def backward(dy, x, mean, rstd, weight, bias, weight_grad, bias_grad):
    """(dx, dweight, dbias); dweight (dbias) is empty float32 unless weight_grad (bias_grad)."""
    dx, _, dw, db = _backward(dy, x, mean, rstd, weight, bias, weight_grad, bias_grad)
    return dx, dw, db


def add_backward(dy, grad_summed, summed, mean, rstd, weight, bias, rng, dropout_p, input_grad,
                 weight_grad, bias_grad):
    """(grad_residual, grad_input, dweight, dbias) of add_forward; grad_input is empty unless
    input_grad and dropout_p > 0 (it equals grad_residual without dropout)."""
    return _backward(dy, summed, mean, rstd, weight, bias, weight_grad, bias_grad,
                     fused=(grad_summed, rng, dropout_p, input_grad))


def rms_backward(dy, x, rstd, weight, weight_grad):
    """(dx, dweight) of rms_forward; dweight is empty float32 unless weight_grad."""
    dx, _, dw, _ = _backward(dy, x, rstd, rstd, weight, None, weight_grad, False, rms=True)
    return dx, dw


def add_rms_backward(dy, grad_summed, summed, rstd, weight, rng, dropout_p, input_grad,
                     weight_grad):
    """(grad_residual, grad_input, dweight) of add_rms_forward (grad_input as add_backward's)."""
    dres, din, dw, _ = _backward(dy, summed, rstd, rstd, weight, None, weight_grad, False,
                                 fused=(grad_summed, rng, dropout_p, input_grad), rms=True)
    return dres, din, dw


def _backward(dy, x, mean, rstd, weight, bias, weight_grad, bias_grad, fused=None, rms=False):
    x = x.contiguous()
    dy = dy.contiguous()
    m, n = x.shape
    dx = torch.empty_like(x)
    dw = _param_grad(weight, weight_grad, x)
    db = _param_grad(bias, bias_grad, x)
    din = None
    launch_fused = None
    if fused is not None:
        gs, rng, dropout_p, input_grad = fused
        drop = input_grad and dropout_p > 0.0
        din = torch.empty_like(x) if drop else x.new_empty((0,))
        launch_fused = (None if gs is None else gs.contiguous(), din if drop else None,
                        rng if drop else x, dropout_threshold(dropout_p) if drop else 0,
                        dropout_scale(dropout_p) if drop else 1.0)
    partials = weight_grad or bias_grad
    if n == 0:
        return dx, din, dw, db
    if m == 0:
        return dx, din, dw.zero_(), db.zero_()
    progs = _programs(m, x.device)
    single = _config(n)[1]
    alloc = torch.empty if single else torch.zeros
    part = alloc((2, progs if partials else 1, n), dtype=torch.float32, device=x.device)
    w = x if weight is None else weight.contiguous()
    args, meta = _bwd_launch(dy, x, w, mean.contiguous(), rstd.contiguous(), dx, part[0], part[1],
                             m, n, triton.cdiv(m, progs), weight is not None, partials,
                             launch_fused, rms)
    wrap_triton(_ln_bwd)[(progs,)](*args, **meta)
    for out, p, wanted in ((dw, part[0], weight_grad), (db, part[1], bias_grad)):
        if wanted:
            wrap_triton(_col_sum)[(triton.cdiv(n, _COL_META["BLOCK_C"]),)](
                p, out, progs, n, **_COL_META)
    return dx, din, dw, db


def aot_specs(dtypes, sizes):
    """(kernel, args, meta) for ahead-of-time compilation by `fastlm compile`: the launches
    forward/backward make for inputs of each dtype (weight and bias of the same dtype) and each
    row length in `sizes`. Tensors are given as dtypes; the JIT specializes each pointer on
    16-byte alignment and N on divisibility by 16, as it does for real tensors."""
    f32 = torch.float32
    specs = []
    for dt in dtypes:
        for n in sizes:
            args, meta = _fwd_launch(dt, dt, dt, dt, f32, f32, n, 1e-5, True, True)
            specs.append((_ln_fwd, args, meta))
            args, meta = _bwd_launch(dt, dt, dt, f32, f32, dt, f32, f32, 4096, n, 7, True, True)
            specs.append((_ln_bwd, args, meta))
            # fastlm.add_layer_norm with dropout (forward; backward with grad_summed).
            i64 = torch.int64
            args, meta = _fwd_launch(dt, dt, dt, dt, f32, f32, n, 1e-5, True, True,
                                     (dt, dt, i64, 6554, 1.1, True))
            specs.append((_ln_fwd, args, meta))
            args, meta = _bwd_launch(dt, dt, dt, f32, f32, dt, f32, f32, 4096, n, 7, True, True,
                                     (dt, dt, i64, 6554, 1.1))
            specs.append((_ln_bwd, args, meta))
        specs.append((_col_sum, (f32, dt, 33, 1024), dict(_COL_META)))
    return specs

"""Attention: the reference that defines the semantics (docs/attention.md), the dropout bits,
fake kernels and autograd for the C++ ops, the Triton custom ops, and the public functions
`scaled_dot_product_attention` and `varlen_attention`.

Semantics are those of torch.nn.functional.scaled_dot_product_attention, with one deliberate
difference: a query row that may attend to no key gives zeros (and zero gradients) on every
backend, where torch gives NaN on some of its paths (its math path, several CUDA kernels).
Dropout uses fastlm's own counter-based bits (Philox4x32-10, docs/attention.md), identical on
every backend and regenerated in the backward; the seed is drawn from torch's generator for
the tensors' device, so results are reproducible under torch.manual_seed.
"""

import math
import sys
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._errors import ArgumentError, ArgumentTypeError
from .._log import log_once
from ._common import lazy_triton_ops, register_autograd

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256

# ---------------------------------------------------------------------------------------------
# Dropout bits: Philox4x32-10 in int64 torch ops (the executable definition of the contract).
_M32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant a and uint32 values b.
    Split b in 16-bit halves so no int64 product overflows."""
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo                     # < 2**48
    p_hi = a * b_hi                     # < 2**48
    lo_sum = p_lo + ((p_hi & 0xFFFF) << 16)
    lo = lo_sum & _M32
    hi = ((p_hi >> 16) + (lo_sum >> 32)) & _M32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32 with ten rounds on int64 tensors holding uint32 counters; keys are ints."""
    k0 &= _M32
    k1 &= _M32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0), lo1, (hi0 ^ c3 ^ k1), lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return c0, c1, c2, c3


def dropout_threshold(dropout_p: float) -> int:
    """Keys whose 16 random bits fall below this are dropped; the exact rate is thresh/65536."""
    return min(65536, int(math.floor(dropout_p * 65536.0 + 0.5)))


def dropout_scale(dropout_p: float) -> float:
    t = dropout_threshold(dropout_p)
    return 65536.0 / (65536 - t) if t < 65536 else 0.0


def dropout_keep(rng: Tensor, B: int, H: int, L: int, S: int, dropout_p: float) -> Tensor:
    """The (B, H, L, S) bool keep mask of the contract, on rng's device."""
    seed, offset = (int(x) for x in rng.tolist())
    dev = rng.device
    i64 = torch.int64
    j = torch.arange(S, device=dev, dtype=i64).view(1, 1, S)
    i = torch.arange(L, device=dev, dtype=i64).view(1, L, 1)
    bh = torch.arange(B * H, device=dev, dtype=i64).view(B * H, 1, 1)
    shape = (B * H, L, S)
    c0 = (j >> 3).expand(shape)
    c1 = i.expand(shape)
    c2 = bh.expand(shape)
    c3 = torch.full(shape, offset & _M32, device=dev, dtype=i64)
    x = philox4x32_10(c0, c1, c2, c3, seed & _M32, (seed >> 32) & _M32)
    lane = (j & 7).expand(shape)
    word = torch.where(lane < 2, x[0], torch.where(lane < 4, x[1], torch.where(lane < 6, x[2],
                                                                               x[3])))
    r16 = (word >> (16 * (lane & 1))) & 0xFFFF
    return (r16 >= dropout_threshold(dropout_p)).view(B, H, L, S)


# ---------------------------------------------------------------------------------------------
# The diagonal options (docs/attention.md, "Causal, windows, soft-capping").
def window_bounds(is_causal, window_size):
    """(left, right) key bounds around the diagonal, -1 = unbounded: window_size, with causal
    capping right at 0 (as flash-attn)."""
    left, right = (int(w) for w in window_size)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def allowed_keys(L, S, left, right, lower_right, device):
    """The (L, S) bool mask of the keys query i may attend under the bounds (left, right) of
    window_bounds, the diagonal at key i (upper left) or i + S - L (lower_right); None when
    both bounds are unbounded."""
    if left < 0 and right < 0:
        return None
    d = (torch.arange(S, device=device).view(1, S) - torch.arange(L, device=device).view(L, 1)
         - ((S - L) if lower_right else 0))
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if right >= 0:
        ok &= d <= right
    if left >= 0:
        ok &= -d <= left
    return ok


# ---------------------------------------------------------------------------------------------
# Reference: the canonical ops in plain PyTorch (float32, or float64 for float64 input).
def _scores(q, k, mask, is_causal, scale, ct, window=(-1, -1), lower_right=False, softcap=0.0,
            dcap=False):
    """Masked scaled scores (B, Hq, L, S) in ct; k already expanded to Hq heads. softcap > 0:
    softcap * tanh(scores / softcap) before the masks. With dcap, also the derivative of the
    capped scores by the uncapped ones (1 - tanh^2; 1 without soft-capping)."""
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    L, S = s.shape[-2], s.shape[-1]
    grad = 1.0
    if softcap > 0.0:
        t = torch.tanh(s / softcap)
        s = softcap * t
        grad = 1.0 - t * t
    allowed = allowed_keys(L, S, *window_bounds(is_causal, window), lower_right, s.device)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(ct)
    return (s, grad) if dcap else s


def _expand_kv(t, hq):
    hk = t.shape[1]
    return t if hk == hq else t.repeat_interleave(hq // hk, dim=1)


def _probs(q, k, mask, is_causal, scale, ct, opts=()):
    s = _scores(q, _expand_kv(k, q.shape[1]), mask, is_causal, scale, ct, *opts)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    lse = torch.where(empty, torch.full_like(lse, float("inf")), lse)
    # softmax (max-subtracted) rather than exp(s - lse): as precise as torch's own when the
    # scores are large; empty rows (all -inf, softmax NaN) become zeros.
    # (an empty row is softmaxed as zeros first, so no NaN reaches autograd either)
    e = empty.unsqueeze(-1)
    p = torch.softmax(torch.where(e, torch.zeros_like(s), s), dim=-1)
    return torch.where(e, torch.zeros_like(p), p), lse


def _dropped(p, q, S, rng, dropout_p, ct):
    if dropout_p == 0.0 or rng is None:
        return p
    B, H, L = q.shape[0], q.shape[1], q.shape[2]
    keep = dropout_keep(rng, B, H, L, S, dropout_p)
    return p * keep.to(ct) * dropout_scale(dropout_p)


def _ct(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _opts(window_left, window_right, lower_right, softcap):
    return ((window_left, window_right), bool(lower_right), float(softcap))


def reference_attention_fwd(q, k, v, mask, rng, dropout_p, is_causal, scale, window_left=-1,
                            window_right=-1, lower_right=False, softcap=0.0):
    """attention_fwd of docs/attention.md: (out in q's dtype, lse float32)."""
    ct = _ct(q)
    p, lse = _probs(q, k, mask, is_causal, scale, ct,
                    _opts(window_left, window_right, lower_right, softcap))
    pd = _dropped(p, q, k.shape[2], rng, dropout_p, ct)
    out = torch.matmul(pd, _expand_kv(v, q.shape[1]).to(ct))
    return out.to(q.dtype), lse.to(torch.float32)


def _fold_heads(g, hk):
    """Sum a (B, Hq, ...) gradient over each group of Hq/Hk query heads -> (B, Hk, ...)."""
    b, hq = g.shape[0], g.shape[1]
    if hq == hk:
        return g
    return g.view(b, hk, hq // hk, *g.shape[2:]).sum(2)


def reference_attention_bwd(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale,
                            window_left=-1, window_right=-1, lower_right=False, softcap=0.0):
    """attention_bwd of docs/attention.md: (grad_q, grad_k, grad_v) with q, k, v's dtypes."""
    ct = _ct(q)
    hq, hk = q.shape[1], k.shape[1]
    ke, ve = _expand_kv(k, hq).to(ct), _expand_kv(v, hq).to(ct)
    s, dcap = _scores(q, ke, mask, is_causal, scale, ct,
                      *_opts(window_left, window_right, lower_right, softcap), dcap=True)
    p = torch.exp(s - lse.to(ct).unsqueeze(-1))
    do = grad_out.to(ct)
    z = 1.0
    if dropout_p != 0.0 and rng is not None:
        z = dropout_keep(rng, q.shape[0], hq, q.shape[2], k.shape[2], dropout_p).to(ct)
        z = z * dropout_scale(dropout_p)
    dv = torch.matmul((p * z).transpose(-1, -2), do)
    dp = torch.matmul(do, ve.transpose(-1, -2)) * z
    d = (do * out.to(ct)).sum(-1, keepdim=True)
    ds = p * (dp - d) * dcap
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)) * scale
    return (dq.to(q.dtype), _fold_heads(dk, hk).to(k.dtype), _fold_heads(dv, hk).to(v.dtype))


# Varlen reference: the packed sequences as the padded dense problem (docs/attention.md,
# "Varlen"), in tensor ops only (no host reads of the offsets, so torch.compile traces it).
def _varlen_index(cu, size):
    """(rows, valid), both (n, size): the packed row of position i of sequence b, and whether
    sequence b has a position i (rows of missing positions point at row 0)."""
    cu = cu.to(torch.int64)
    i = torch.arange(size, device=cu.device)
    valid = i < (cu[1:] - cu[:-1]).unsqueeze(1)
    return torch.where(valid, cu[:-1].unsqueeze(1) + i, 0), valid


def _pad(t, rows, valid, fill=0.0):
    """(n, H, size, *) from the packed (total, H, *) t; missing positions hold `fill`."""
    n, size = rows.shape
    if t.shape[0] == 0:
        return t.new_full((n, t.shape[1], size, *t.shape[2:]), fill)
    p = t[rows].transpose(1, 2)
    v = valid.view(n, 1, size, *(1,) * (t.dim() - 2))
    return torch.where(v, p, torch.full_like(p, fill))


def _unpad(t, cu, total):
    """The packed (total, H, *) rows of the padded (n, H, size, *) t."""
    cu = cu.to(torch.int64)
    r = torch.arange(total, device=cu.device)
    b = torch.searchsorted(cu[1:], r, right=True)
    return t[b, :, r - cu[b]]


def _varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                   window=(-1, -1), lower_right=False):
    """q, k, v padded to (n, H, max_seqlen, *), the index of q's rows, and the (n, 1, max_q,
    max_k) mask of the keys each query may attend (the sequence's, causal and within the
    window inside it, the diagonal aligned with each sequence's own lengths)."""
    rq, vq = _varlen_index(cu_seqlens_q, max_seqlen_q)
    rk, vk = _varlen_index(cu_seqlens_k, max_seqlen_k)
    mask = vk.view(vk.shape[0], 1, 1, max_seqlen_k).expand(-1, 1, max_seqlen_q, -1)
    left, right = window_bounds(is_causal, window)
    if left >= 0 or right >= 0:
        dev = q.device
        off = torch.zeros(vq.shape[0], dtype=torch.int64, device=dev)
        if lower_right:  # each sequence's own S - L
            off = vk.sum(1) - vq.sum(1)
        d = (torch.arange(max_seqlen_k, device=dev).view(1, 1, -1)
             - torch.arange(max_seqlen_q, device=dev).view(1, -1, 1) - off.view(-1, 1, 1))
        ok = torch.ones_like(d, dtype=torch.bool)
        if right >= 0:
            ok &= d <= right
        if left >= 0:
            ok &= -d <= left
        mask = mask & ok.unsqueeze(1)
    return _pad(q, rq, vq), _pad(k, rk, vk), _pad(v, rk, vk), (rq, vq), (rk, vk), mask


def reference_varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                   max_seqlen_k, rng, dropout_p, is_causal, scale, window_left=-1,
                                   window_right=-1, lower_right=False, softcap=0.0):
    """varlen_attention_fwd of docs/attention.md: (out (total_q, Hq, Ev) in q's dtype, lse
    (Hq, total_q) float32): reference_attention_fwd on the padded problem with the key-padding
    (and causal, window) mask, hence its dropout bits (bh = b * Hq + h, positions within
    sequence b)."""
    qp, kp, vp, _, _, mask = _varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, is_causal,
                                            (window_left, window_right), lower_right)
    out, lse = reference_attention_fwd(qp, kp, vp, mask, rng, dropout_p, False, scale,
                                       softcap=softcap)
    total = q.shape[0]
    return (_unpad(out, cu_seqlens_q, total),
            _unpad(lse.unsqueeze(-1), cu_seqlens_q, total).squeeze(-1).t().contiguous())


def reference_varlen_attention_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, rng, dropout_p, is_causal, scale,
                                   window_left=-1, window_right=-1, lower_right=False,
                                   softcap=0.0):
    """varlen_attention_bwd of docs/attention.md: (grad_q, grad_k, grad_v), packed like q, k, v:
    reference_attention_bwd on the padded problem (padded rows: no gradient, lse +inf)."""
    qp, kp, vp, (rq, vq), _, mask = _varlen_padded(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                   max_seqlen_q, max_seqlen_k, is_causal,
                                                   (window_left, window_right), lower_right)
    dop, op = _pad(grad_out, rq, vq), _pad(out, rq, vq)
    lp = _pad(lse.t().unsqueeze(-1), rq, vq, float("inf")).squeeze(-1)
    dq, dk, dv = reference_attention_bwd(dop, qp, kp, vp, op, lp, mask, rng, dropout_p, False,
                                         scale, softcap=softcap)
    return (_unpad(dq, cu_seqlens_q, q.shape[0]), _unpad(dk, cu_seqlens_k, k.shape[0]),
            _unpad(dv, cu_seqlens_k, k.shape[0]))


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), shared by the C++ and the Triton ops.
def _fake_fwd(q, k, v, mask, rng, dropout_p, is_causal, scale, window_left=-1, window_right=-1,
              lower_right=False, softcap=0.0):
    b, h, l = q.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((b, h, l, v.shape[3]))
    return out, q.new_empty((b, h, l), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale,
              window_left=-1, window_right=-1, lower_right=False, softcap=0.0):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _fake_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, rng,
                     dropout_p, is_causal, scale, window_left=-1, window_right=-1,
                     lower_right=False, softcap=0.0):
    t, h = q.shape[0], q.shape[1]
    return q.new_empty((t, h, v.shape[2])), q.new_empty((h, t), dtype=torch.float32)


def _fake_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, rng, dropout_p, is_causal, scale, window_left=-1,
                     window_right=-1, lower_right=False, softcap=0.0):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


# ---------------------------------------------------------------------------------------------
# Autograd, shared by the C++ and the Triton forward ops, dense and varlen: a forward op
# (q, k, v, *rest) -> (out, lse) whose backward op takes (grad_out, q, k, v, out, lse, *rest).
def _setup_context(ctx, inputs, output):
    # The tensors of rest (and absent optional ones) are saved for backward, the others kept.
    rest = inputs[3:]
    ctx.is_tensor = [a is None or isinstance(a, Tensor) for a in rest]
    ctx.save_for_backward(*inputs[:3], *output,
                          *(a for a, t in zip(rest, ctx.is_tensor) if t))
    ctx.consts = [a for a, t in zip(rest, ctx.is_tensor) if not t]


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, *saved = ctx.saved_tensors
        saved, consts = iter(saved), iter(ctx.consts)
        rest = [next(saved) if t else next(consts) for t in ctx.is_tensor]
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, *rest)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                *(None,) * len(rest))

    return backward


def _register(fwd_name, bwd_name, bwd_op, who="fastlm.scaled_dot_product_attention"):
    register_autograd(who, fwd_name, bwd_name, _make_backward(bwd_op), _setup_context)


_C_OPS = False
if hasattr(torch.ops.fastlm, "attention_fwd"):
    torch.library.register_fake("fastlm::attention_fwd")(_fake_fwd)
    torch.library.register_fake("fastlm::attention_bwd")(_fake_bwd)
    _register("fastlm::attention_fwd", "fastlm::attention_bwd", torch.ops.fastlm.attention_bwd)
    _C_OPS = True


# Whether fastlm._C registered attention kernels per device type (csrc/{cpu,cuda}); looked up
# once here so that torch.compile traces a dict lookup, not a dispatcher query.
_KERNELS = {t: _C_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlm::attention_fwd", t.upper()) for t in ("cpu", "cuda")}


def _has_kernel(device_type):
    return _KERNELS.get(device_type, False)


# Varlen: the C++ op runs on the CPU (csrc/cpu/attention.cpp) and on CUDA tensors
# (csrc/cuda/attention.cu); on CUDA tensors the Triton kernels are preferred (CUDA_ORDER).
def _register_varlen(fwd_name, bwd_name, bwd_op):
    _register(fwd_name, bwd_name, bwd_op, "fastlm.varlen_attention")


_C_VARLEN = hasattr(torch.ops.fastlm, "varlen_attention_fwd")
if _C_VARLEN:
    torch.library.register_fake("fastlm::varlen_attention_fwd")(_fake_varlen_fwd)
    torch.library.register_fake("fastlm::varlen_attention_bwd")(_fake_varlen_bwd)
    _register_varlen("fastlm::varlen_attention_fwd", "fastlm::varlen_attention_bwd",
                     torch.ops.fastlm.varlen_attention_bwd)
_VARLEN_KERNELS = {t: _C_VARLEN and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlm::varlen_attention_fwd", t.upper()) for t in ("cpu", "cuda")}


def _has_varlen_kernel(device_type):
    return _VARLEN_KERNELS.get(device_type, False)


def _register_triton_ops():
    """Define the Triton custom ops (on first use: see ops/_common.py)."""
    from torch.library import triton_op

    from ..kernels import attention as tk

    @triton_op("fastlm::attention_fwd_triton", mutates_args=())
    def attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                             rng: Optional[Tensor], dropout_p: float, is_causal: bool,
                             scale: float, window_left: int = -1, window_right: int = -1,
                             lower_right: bool = False,
                             softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        return tk.forward(q, k, v, mask, rng, dropout_p, is_causal, scale, window_left,
                          window_right, lower_right, softcap)

    @triton_op("fastlm::attention_bwd_triton", mutates_args=())
    def attention_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, mask: Optional[Tensor], rng: Optional[Tensor],
                             dropout_p: float, is_causal: bool, scale: float,
                             window_left: int = -1, window_right: int = -1,
                             lower_right: bool = False,
                             softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        return tk.backward(grad_out, q, k, v, out, lse, mask, rng, dropout_p, is_causal, scale,
                           window_left, window_right, lower_right, softcap)

    _register("fastlm::attention_fwd_triton", "fastlm::attention_bwd_triton",
              torch.ops.fastlm.attention_bwd_triton)
    _register_triton_varlen_ops(tk)


def _register_triton_varlen_ops(tk):
    from torch.library import triton_op

    @triton_op("fastlm::varlen_attention_fwd_triton", mutates_args=())
    def varlen_attention_fwd_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    rng: Optional[Tensor], dropout_p: float, is_causal: bool,
                                    scale: float, window_left: int = -1, window_right: int = -1,
                                    lower_right: bool = False,
                                    softcap: float = 0.0) -> tuple[Tensor, Tensor]:
        return tk.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, rng, dropout_p, is_causal, scale, window_left,
                                 window_right, lower_right, softcap)

    @triton_op("fastlm::varlen_attention_bwd_triton", mutates_args=())
    def varlen_attention_bwd_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                    out: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
                                    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    rng: Optional[Tensor], dropout_p: float, is_causal: bool,
                                    scale: float, window_left: int = -1, window_right: int = -1,
                                    lower_right: bool = False,
                                    softcap: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
        return tk.varlen_backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, rng, dropout_p, is_causal, scale,
                                  window_left, window_right, lower_right, softcap)

    _register_varlen("fastlm::varlen_attention_fwd_triton", "fastlm::varlen_attention_bwd_triton",
                     torch.ops.fastlm.varlen_attention_bwd_triton)


triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# The public functions.
_WHO = "fastlm.scaled_dot_product_attention"  # its default order on a GPU: backends.CUDA_ORDER


def _err(cls, msg, who=_WHO):
    """The error to raise for a bad argument of `who`: ValueError and TypeError become
    fastlm.ArgumentError and ArgumentTypeError (also RuntimeErrors, as torch's)."""
    return {ValueError: ArgumentError, TypeError: ArgumentTypeError}.get(cls, cls)(
        f"{who}: {msg}")


def _check_qkv(who, names, tensors, ndim=None):
    """The checks on query, key and value that both public functions make: tensors (of `ndim`
    dims, or at least 2 (length, head dim) where ndim is None), floating point, one dtype, one
    device, the same head dim for query and key. `names` are the arguments' names in `who`."""
    for name, t in zip(names, tensors):
        if not isinstance(t, Tensor):
            raise _err(TypeError, f"{name} must be a Tensor, got {type(t).__name__}", who)
        if ndim is None and t.dim() < 2:
            raise _err(ValueError, f"{name} must have at least 2 dims (length, head dim), got "
                                   f"shape {list(t.shape)}", who)
        if ndim is not None and t.dim() != ndim:
            raise _err(ValueError, f"{name} must be a {ndim}-D tensor (total, heads, head dim), "
                                   f"got {t.shape}", who)
        if not t.is_floating_point():
            raise _err(TypeError, f"{name} must be floating point, got {t.dtype}", who)
    (qn, kn, vn), (q, k, v) = names, tensors
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise _err(TypeError, f"{qn}, {kn} and {vn} must have one dtype, got {q.dtype}, "
                              f"{k.dtype} and {v.dtype}", who)
    if k.device != q.device or v.device != q.device:
        raise _err(ValueError, f"{qn}, {kn} and {vn} must be on one device, got {q.device}, "
                               f"{k.device} and {v.device}", who)
    if k.shape[-1] != q.shape[-1]:
        raise _err(ValueError, f"{kn}'s head dim ({k.shape[-1]}) must equal {qn}'s "
                               f"({q.shape[-1]})", who)


def _check_dropout(who, dropout_p):
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise _err(ValueError, f"dropout_p must be in [0, 1], got {dropout_p}", who)


def _check_options(who, window_size, lower_right, softcap):
    """(window_left, window_right, lower_right, softcap) of the keyword options, checked."""
    try:
        left, right = window_size
        ok = all(isinstance(w, int) and not isinstance(w, bool) or (
            isinstance(w, Tensor) and w.dim() == 0 and not w.is_floating_point())
            for w in (left, right))
        left, right = int(left), int(right)
    except (TypeError, ValueError):
        ok = False
    if not ok or left < -1 or right < -1:
        raise _err(ValueError, f"window_size must be a pair of ints (left, right), each >= -1 "
                               f"(-1: unbounded), got {window_size!r}", who)
    if not isinstance(lower_right, bool):
        raise _err(TypeError, f"lower_right must be a bool, got {type(lower_right).__name__}",
                   who)
    try:
        softcap = float(softcap)
    except (TypeError, ValueError):
        raise _err(TypeError, f"softcap must be a float, got {type(softcap).__name__}",
                   who) from None
    if not 0.0 <= softcap < math.inf:  # (NaN fails too)
        raise _err(ValueError, f"softcap must be finite and >= 0 (0: off), got {softcap}", who)
    return left, right, lower_right, softcap


def _plain(opts):
    return opts == (-1, -1, False, 0.0)


def _check_inputs(query, key, value, attn_mask, dropout_p):
    _check_qkv(_WHO, ("query", "key", "value"), (query, key, value))
    if key.shape[-2] != value.shape[-2]:
        raise _err(ValueError, f"key and value must have the same length (dim -2), got "
                               f"{key.shape[-2]} and {value.shape[-2]}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise _err(TypeError, f"attn_mask must be a Tensor or None, got "
                                  f"{type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise _err(TypeError, f"attn_mask must be bool (True = attend) or floating "
                                  f"(added to the scores), got {attn_mask.dtype}")
        if (attn_mask.is_floating_point() and attn_mask.dtype not in (torch.float32, query.dtype)
                and not torch.is_autocast_enabled(query.device.type)):
            # torch's rule and words (under autocast torch casts the mask with the inputs)
            raise _err(TypeError, f"Expected attn_mask dtype to be bool or float or to match "
                                  f"query dtype, got attn_mask {attn_mask.dtype} and query "
                                  f"{query.dtype}")
        if attn_mask.device != query.device:
            raise _err(ValueError, f"attn_mask is on {attn_mask.device} but query is on "
                                   f"{query.device}")
    _check_dropout(_WHO, dropout_p)


def _canonical(query, key, value, attn_mask, enable_gqa):
    """Views of the arguments in the kernels' (B, H, len, dim) layout, and the output shape."""
    nd = max(query.dim(), key.dim(), value.dim(), 3)
    q, k, v = (t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) for t in (query, key, value))
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if enable_gqa:
        if hk != hv or hq % hk != 0:
            raise _err(ValueError, f"with enable_gqa=True the query heads ({hq}) must be a "
                                   f"multiple of the key heads ({hk}), and key and value must "
                                   f"have the same number of heads ({hv})")
    elif not (hk == hv == hq or (hk == hv == 1)):
        # Heads broadcast as torch's matmuls broadcast them (one of q, k, v may have 1 head).
        try:
            h = torch.broadcast_shapes((hq,), (hk,), (hv,))[0]
        except RuntimeError:
            raise _err(ValueError, f"query, key and value heads (dim -3: {hq}, {hk}, {hv}) must "
                                   "match or broadcast (set enable_gqa=True for grouped-query "
                                   "attention)") from None
        q, k, v = (t.expand(*t.shape[:-3], h, *t.shape[-2:]) for t in (q, k, v))
        hq = hk = hv = h
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise _err(ValueError, f"the batch dims of query {list(query.shape)}, key "
                               f"{list(key.shape)} and value {list(value.shape)} do not "
                               "broadcast") from None
    b = math.prod(batch)
    L, E, S, Ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]

    def canon(t, h):
        t = t.expand(*batch, h, *t.shape[-2:]).reshape(b, h, *t.shape[-2:])
        if t.stride(-1) == 1:
            return t
        if t.shape[-1] == 1:  # a head dim of 1 (stride 0, say): any stride addresses it
            return t.as_strided(t.shape, (*t.stride()[:-1], 1))
        return t.contiguous()

    qc, kc, vc = canon(q, hq), canon(k, hk), canon(v, hk)
    mask = None
    if attn_mask is not None:
        try:
            m = attn_mask.expand(*batch, hq, L, S)
        except RuntimeError:
            raise _err(ValueError, f"attn_mask of shape {list(attn_mask.shape)} does not "
                                   f"broadcast to the scores' shape {[*batch, hq, L, S]}") from None
        mask = m.reshape(b, hq, L, S)
    lead = (*batch, hq)
    nd0 = max(query.dim(), key.dim(), value.dim())
    out_shape = (tuple(lead[len(lead) - (nd0 - 2):]) if nd0 > 2 else ()) + (L, Ev)
    return qc, kc, vc, mask, out_shape


def _new_rng(device):
    """(seed, offset) for the dropout bits, drawn from torch's generator for `device`."""
    return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64, device=device)


def _default_scale(E):
    """1/sqrt(E); with E = 0 the scores are all 0 whatever the scale (torch: uniform
    weights), so any finite one."""
    return 1.0 / math.sqrt(E) if E > 0 else 1.0


def _beyond_head_dim(who):
    """The backend for head dims the kernels do not take (over MAX_HEAD_DIM) when none is
    forced: the reference, as torch runs any head dim (said once)."""
    log_once(f"{who}-head-dim", f"{who}: head dims over {MAX_HEAD_DIM} run on the reference "
             "(torch ops); the kernels take up to 256")
    return "torch"


def _is_causal_bias(attn_mask):
    """Whether attn_mask is a torch.nn.attention.bias.CausalBias (a Tensor subclass that holds
    no values: torch's sdpa dispatches on it). Its module is not imported here: a user who made
    one has imported it."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(attn_mask, bias.CausalBias)


def _from_causal_bias(bias, is_causal, query, key, value):
    """(attn_mask, is_causal) for a CausalBias, by torch's rules (CausalBias._dispatch): the
    upper-left variant, or equal lengths, is is_causal=True (fastlm's causal is upper-left, as
    torch's); lower-right is is_causal "lower_right": the kernels' causal with the diagonal
    that ends in the bottom-right corner (rows above the first key attend to nothing: zeros,
    see above)."""
    from torch.nn.attention.bias import CausalVariant

    if is_causal:
        raise _err(ValueError, "CausalBias should not be used with causal=True")
    L, S = bias.seq_len_q, bias.seq_len_kv
    if L == S or bias.variant == CausalVariant.UPPER_LEFT:
        return None, True
    if bias.variant != CausalVariant.LOWER_RIGHT:
        raise _err(ValueError, f"CausalBias.variant must be a CausalVariant type, but found: "
                               f"{bias.variant}")
    # torch validates this path in Python first, raising ValueError (its words)
    ts = (query, key, value)
    if all(isinstance(t, Tensor) for t in ts):
        if key.dtype != query.dtype or value.dtype != query.dtype:
            raise _err(ValueError, f"Expected query, key, and value to have the same dtype, but "
                                   f"got query.dtype: {query.dtype}, key.dtype: {key.dtype}, and "
                                   f"value.dtype: {value.dtype} instead.")
        if key.device != query.device or value.device != query.device:
            raise _err(ValueError, f"Expected query, key, and value to have the same device "
                                   f"type, but got query.device: {query.device}, key.device: "
                                   f"{key.device}, and value.device: {value.device} instead.")
        if min(t.dim() for t in ts) < 2:
            raise _err(ValueError, f"Expected query, key, and value to all be  at least 2 "
                                   f"dimensional, but got query.dim: {query.dim()}, key.dim: "
                                   f"{key.dim()} and value.dim: {value.dim()} instead.")
    return None, "lower_right"


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *,
                                 window_size=(-1, -1), lower_right=False, softcap=0.0):
    """torch.nn.functional.scaled_dot_product_attention on fastlm's fused kernels.

    Same arguments, broadcasting and result, except that a query row that may attend to no key
    gives zeros (and zero gradients) on every backend (torch gives NaN on some of its paths).
    Dropout bits come from fastlm's Philox stream (docs/attention.md), seeded from torch's
    generator. float64 runs on the reference; a floating attn_mask that requires grad runs on
    the reference (the kernels do not compute the mask's gradient). Head dims up to 256.
    attn_mask may be a torch.nn.attention.bias CausalBias (causal_upper_left /
    causal_lower_right), as in torch.

    fastlm's keyword-only options (docs/attention.md, "Causal, windows, soft-capping"; the
    defaults are torch's function):
      window_size=(left, right): query i attends only keys within `left` below and `right`
        above its diagonal (-1: unbounded), as flash-attn's; with is_causal, right is at most 0.
        Not together with attn_mask (fold the window into the mask).
      lower_right: the diagonal of is_causal and of the window ends in the bottom-right corner
        (query i faces key i + S - L; torch's causal_lower_right, flash-attn's convention)
        instead of starting in the top-left one (torch's is_causal).
      softcap > 0: the scaled scores s become softcap * tanh(s / softcap) before any mask
        (Gemma-2's logit soft-capping).
    """
    if _is_causal_bias(attn_mask):
        attn_mask, is_causal = _from_causal_bias(attn_mask, is_causal, query, key, value)
        if is_causal == "lower_right":
            is_causal, lower_right = True, True
    _check_inputs(query, key, value, attn_mask, dropout_p)
    opts = _check_options(_WHO, window_size, lower_right, softcap)
    if attn_mask is not None and is_causal:
        # torch's words (users match on them); a RuntimeError, as torch's, and a ValueError
        raise _err(ValueError, "Explicit attn_mask should not be set when is_causal=True")
    if attn_mask is not None and (opts[0] >= 0 or opts[1] >= 0):
        raise _err(ValueError, "attn_mask and window_size cannot be combined: fold the window "
                               "into the mask")
    dev = query.device
    if torch.is_autocast_enabled(dev.type) and query.dtype != torch.float64:
        dt = torch.get_autocast_dtype(dev.type)  # sdpa is on autocast's lower-precision list
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    q, k, v, mask, out_shape = _canonical(query, key, value, attn_mask, enable_gqa)
    E, Ev = q.shape[-1], v.shape[-1]
    scale = _default_scale(E) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    if mask is not None and mask.is_floating_point() and mask.dtype not in (torch.float32,
                                                                            q.dtype):
        mask = mask.float()
    name = backends.select(_WHO, dev, q.dtype, KERNEL_DTYPES, has_kernel=_has_kernel)
    if name != "torch" and (E > MAX_HEAD_DIM or Ev > MAX_HEAD_DIM):
        if backends.forced() is not None:
            raise _err(ValueError, f"head dims must be at most {MAX_HEAD_DIM} on the {name} "
                                   f"backend, got query/key {E} and value {Ev} (the torch "
                                   "backend has no limit)")
        name = _beyond_head_dim(_WHO)
    if name == "cuda" and (E % 8 or Ev % 8):
        if backends.forced() == "cuda":
            raise _err(ValueError, f"the cuda backend supports head dims that are multiples of "
                                   f"8 up to {MAX_HEAD_DIM}, got query/key {E} and value {Ev}")
        name = "triton" if backends.available()["triton"]["cuda"][0] else "torch"
    if mask is not None and mask.requires_grad:
        name = "torch"
    if q.numel() == 0 or k.shape[2] == 0 or v.shape[-1] == 0:
        name = "torch"
    rng = _new_rng(dev) if dropout_p > 0.0 else None
    # the options ride after scale only when set: the default call is unchanged (opcheck,
    # torch.compile graphs, older ops)
    extra = () if _plain(opts) else opts
    if name == "torch":
        out, _ = reference_attention_fwd(q, k, v, mask, rng, dropout_p, is_causal, scale, *extra)
    else:
        if name == "triton":
            triton_ops_ready()
            op = torch.ops.fastlm.attention_fwd_triton
        else:
            op = torch.ops.fastlm.attention_fwd
        out, _ = op(q, k, v, mask, rng, dropout_p, is_causal, scale, *extra)
    return out.reshape(out_shape)


def _varlen_check_offsets(who, cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q,
                          max_seqlen_k):
    """The offsets start at 0, do not decrease, end at the packed lengths, and no sequence is
    longer than its max_seqlen (the Triton kernels' grids cover max_seqlen only). Eager: read
    on the host once (one device-to-host copy for both). Under torch.compile: the same checks
    as device-side asserts (torch._assert_async), so the graph needs no host values."""
    if torch.compiler.is_compiling():
        for name, c, total, mx in (("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q),
                                   ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k)):
            d = c[1:] - c[:-1]
            ok = (c[0] == 0) & (c[-1] == total) & (d >= 0).all() & (d <= mx).all()
            torch._assert_async(ok, f"{who}: {name} must start at 0, be non-decreasing, end at "
                                    f"{total} (the packed length) and hold no sequence longer "
                                    f"than max_seqlen ({mx})")
        return
    cq, ck = torch.stack([cu_seqlens_q.to(torch.int64), cu_seqlens_k.to(torch.int64)]).tolist()
    for name, c, total, mx in (("cu_seqlens_q", cq, total_q, max_seqlen_q),
                               ("cu_seqlens_k", ck, total_k, max_seqlen_k)):
        if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
            raise _err(ValueError, f"{name} must start at 0, be non-decreasing and end at "
                                   f"{total} (the packed length), got {c}", who)
        if any(b - a > mx for a, b in zip(c, c[1:])):
            raise _err(ValueError, f"a sequence is longer than max_seqlen ({mx}) given for "
                                   f"{name}", who)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
                     window_size=(-1, -1), lower_right=False, softcap=0.0):
    """Attention over packed sequences of different lengths, with no padding computed.

    q: (total_q, Hq, E), k: (total_k, Hk, E), v: (total_k, Hk, Ev); cu_seqlens_q/_k: int32 or
    int64 (n + 1,) cumulative lengths starting at 0; sequence i is q[cu_q[i]:cu_q[i+1]]
    attending to k[cu_k[i]:cu_k[i+1]]; max_seqlen_q/_k bound the sequences' lengths. Returns
    (total_q, Hq, Ev). is_causal is top-left within each sequence, and heads broadcast or group
    (enable_gqa) as in scaled_dot_product_attention.

    One launch of the fused kernels covers every sequence (docs/attention.md, "Varlen"); the
    result, dropout bits included, equals scaled_dot_product_attention on the sequences padded
    to (n, Hq, max_seqlen_q, *) with the padded keys masked out. The offsets are checked on the
    host, reading cu_seqlens once (one device-to-host copy; under torch.compile the same checks
    run as device-side asserts instead).

    window_size, lower_right and softcap are scaled_dot_product_attention's options, the
    diagonal aligned with each sequence's own lengths.
    """
    who = "fastlm.varlen_attention"
    _check_qkv(who, ("q", "k", "v"), (q, k, v), ndim=3)
    opts = _check_options(who, window_size, lower_right, softcap)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if (not isinstance(t, Tensor) or t.dim() != 1 or t.numel() < 1
                or t.dtype not in (torch.int32, torch.int64)):
            raise _err(ValueError, f"{name} must be a 1-D int32/int64 tensor of n + 1 offsets",
                       who)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise _err(ValueError, f"cu_seqlens_q and cu_seqlens_k must have the same length, got "
                               f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}", who)
    _check_dropout(who, dropout_p)
    dev = q.device
    # The offsets on q's device as int32, converted once; the kernels read them there.
    cu_q = cu_seqlens_q.to(device=dev, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=dev, dtype=torch.int32)
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    _varlen_check_offsets(who, cu_q, cu_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    if v.shape[0] != k.shape[0]:
        raise _err(ValueError, f"k and v must have the same total length, got {k.shape[0]} "
                               f"and {v.shape[0]}", who)
    hq, hk, hv = q.shape[1], k.shape[1], v.shape[1]
    if enable_gqa:
        if hk != hv or hk == 0 or hq % hk != 0:
            raise _err(ValueError, f"with enable_gqa=True the query heads ({hq}) must be a "
                                   f"multiple of the key heads ({hk}), and k and v must have "
                                   f"the same number of heads ({hv})", who)
    elif not (hk == hv == hq or hk == hv == 1):
        if hq == 1 and hk == hv:
            q = q.expand(q.shape[0], hk, q.shape[2])
        else:
            raise _err(ValueError, f"q, k and v heads (dim 1: {hq}, {hk}, {hv}) must match or "
                                   "broadcast (set enable_gqa=True for grouped-query attention)",
                       who)
    if torch.is_autocast_enabled(dev.type) and q.dtype != torch.float64:
        dt = torch.get_autocast_dtype(dev.type)  # as scaled_dot_product_attention
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    # The kernels take any strides but a unit one on the head dim (as _canonical).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    E, Ev = q.shape[2], v.shape[2]
    scale = _default_scale(E) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    name = backends.select(who, dev, q.dtype, KERNEL_DTYPES, has_kernel=_has_varlen_kernel)
    if name != "torch" and (E > MAX_HEAD_DIM or Ev > MAX_HEAD_DIM):
        if backends.forced() is not None:
            raise _err(ValueError, f"head dims must be at most {MAX_HEAD_DIM} on the {name} "
                                   f"backend, got q/k {E} and v {Ev} (the torch backend has no "
                                   "limit)", who)
        name = _beyond_head_dim(who)
    if q.numel() == 0 or k.shape[0] == 0 or Ev == 0:
        name = "torch"
    rng = _new_rng(dev) if dropout_p > 0.0 else None
    args = (cu_q, cu_k, max_seqlen_q, max_seqlen_k, rng, dropout_p, bool(is_causal), scale,
            *(() if _plain(opts) else opts))
    if name == "torch":
        out, _ = reference_varlen_attention_fwd(q, k, v, *args)
    else:
        if name == "triton":
            triton_ops_ready()
            op = torch.ops.fastlm.varlen_attention_fwd_triton
        else:
            op = torch.ops.fastlm.varlen_attention_fwd
        out, _ = op(q, k, v, *args)
    return out


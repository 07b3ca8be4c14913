"""Rotary position embeddings: transformers' apply_rotary_pos_emb on one fused kernel.

    q, k = fastlm.apply_rotary_emb(q, k, cos, sin)       # q (B,Hq,S,D), k (B,Hk,S,D)
    q, k = fastlm.apply_rotary_emb(q, k, cos, sin, unsqueeze_dim=2)   # q (B,S,Hq,D)
    q, k = fastlm.apply_rotary_emb(q, k, cos, sin, interleaved=True)  # GPT-J pairs

    out = x * cos + rotate(x) * sin  for x in (q, k), computed in float32, rounded once

rotate is transformers' rotate_half (x1, x2 = halves of the last dim; rotate = cat(-x2, x1)) or,
interleaved, the GPT-J pair rotation (pairs (x0, x1), (x2, x3), ...; rotate = (-x1, x0, -x3,
x2, ...)). cos and sin are (B, S, D) (or (1, S, D), (S, D)) as transformers' rotary embedding
makes them, unsqueezed at `unsqueeze_dim` to broadcast over the heads (docs/rotary.md). One
launch handles q and k, forward and backward; the backward applies the transposed rotation
(no saved activations beyond cos and sin). cos and sin get no gradient: when one of them
requires grad the call runs on the torch reference.
"""

from typing import Optional  # noqa: F401  (triton_op signatures)

import torch
from torch import Tensor

from .. import backends
from .._errors import ArgumentError, ArgumentTypeError
from .._log import log_once
from ._common import lazy_triton_ops, register_autograd

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WHO = "fastlm.apply_rotary_emb"


# ---------------------------------------------------------------------------------------------
# Reference: the pure-PyTorch definition, also the `torch` backend.
def rotate(x, interleaved=False):
    """transformers' rotate_half, or the interleaved (GPT-J) pair rotation."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def reference(q, k, cos, sin, unsqueeze_dim=1, interleaved=False):
    """(q_out, k_out) in float32 (float64 for float64), rounded once to each input's dtype."""
    def one(x):
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        c = cos.unsqueeze(unsqueeze_dim).to(ct)
        s = sin.unsqueeze(unsqueeze_dim).to(ct)
        xc = x.to(ct)
        return (xc * c + rotate(xc, interleaved) * s).to(x.dtype)

    return one(q), one(k)


# ---------------------------------------------------------------------------------------------
# Fake kernels (outputs keep a dense input's layout, as the kernels' empty_like), autograd.
def _out_like(x):
    return torch.empty_like(x if x.stride(3) == 1 else x.contiguous())


def _fake(q, k, cos, sin, interleaved):
    return _out_like(q), _out_like(k)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, interleaved = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved = interleaved


def _make_backward(bwd_op):
    def backward(ctx, grad_q, grad_k):  # grads are materialized (zeros for an unused output)
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dq, dk = bwd_op(grad_q, grad_k, cos, sin, ctx.interleaved)
        return (dq if need_q else None), (dk if need_k else None), None, None, None

    return backward


def _register(fwd_name, bwd_name, bwd_op):
    register_autograd(WHO, fwd_name, bwd_name, _make_backward(bwd_op), _setup_context)


_C_OPS = hasattr(torch.ops.fastlm, "rotary_fwd")
if _C_OPS:
    torch.library.register_fake("fastlm::rotary_fwd")(_fake)
    torch.library.register_fake("fastlm::rotary_bwd")(_fake)
    _register("fastlm::rotary_fwd", "fastlm::rotary_bwd", torch.ops.fastlm.rotary_bwd)

_KERNELS = {t: _C_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlm::rotary_fwd", t.upper()) for t in ("cpu", "cuda")}


def _has_kernel(device_type):
    return _KERNELS.get(device_type, False)


def _check(q, k, cos, sin):
    """The checks of the C++ kernels (csrc/rotary.h), for the Triton ops."""
    torch._check(q.dtype in KERNEL_DTYPES, lambda: f"{WHO}: q must be float32, float16 or "
                 f"bfloat16, got {q.dtype}")
    torch._check(q.dim() == 4 and k.dim() == 4 and k.dtype == q.dtype, lambda: (
        f"{WHO}: q and k must be 4-D (batch, heads, seq, head_dim) of one dtype"))
    torch._check(k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:], lambda: (
        f"{WHO}: k must have q's batch, seq and head_dim"))
    torch._check(q.shape[3] % 2 == 0, lambda: f"{WHO}: head_dim must be even")
    for c in (cos, sin):
        torch._check(c.dim() == 3 and c.shape[0] in (1, q.shape[0]) and c.shape[1:] == q.shape[2:]
                     and c.dtype in (q.dtype, torch.float32), lambda: (
                         f"{WHO}: cos and sin must be (1 or B, S, D) of q's dtype or float32"))


def _register_triton_ops():
    from torch.library import triton_op

    from ..kernels import rotary as tk

    @triton_op("fastlm::rotary_fwd_triton", mutates_args=())
    def rotary_fwd_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          interleaved: bool) -> tuple[Tensor, Tensor]:
        _check(q, k, cos, sin)
        return tk.forward(q, k, cos, sin, interleaved)

    @triton_op("fastlm::rotary_bwd_triton", mutates_args=())
    def rotary_bwd_triton(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor,
                          interleaved: bool) -> tuple[Tensor, Tensor]:
        _check(grad_q, grad_k, cos, sin)
        return tk.backward(grad_q, grad_k, cos, sin, interleaved)

    _register("fastlm::rotary_fwd_triton", "fastlm::rotary_bwd_triton",
              torch.ops.fastlm.rotary_bwd_triton)


triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# The public function.
def _validate(q, k, cos, sin, unsqueeze_dim):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{WHO}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ArgumentTypeError(f"{WHO}: {name} must be a floating-point tensor, got "
                                    f"{t.dtype}")
        if t.device != q.device:
            raise ArgumentError(f"{WHO}: {name} is on {t.device} but q is on {q.device}; "
                                "expected all on the same device")
    if q.dim() != 4 or k.dim() != 4:
        raise ArgumentError(f"{WHO}: q and k must be 4-D, (batch, heads, seq, head_dim) or with "
                            f"unsqueeze_dim=2 (batch, seq, heads, head_dim), got shapes "
                            f"{list(q.shape)} and {list(k.shape)}")
    if unsqueeze_dim not in (1, 2, -2, -3):
        raise ArgumentError(f"{WHO}: unsqueeze_dim must be 1 (q of (batch, heads, seq, "
                            f"head_dim)) or 2 (batch, seq, heads, head_dim), got {unsqueeze_dim}")
    if cos.shape != sin.shape:
        raise ArgumentError(f"{WHO}: cos and sin must have one shape, got {list(cos.shape)} "
                            f"and {list(sin.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d or d % 2:
        raise ArgumentError(f"{WHO}: q and k must have one even head_dim, got {d} and "
                            f"{k.shape[-1]}")
    if cos.shape[-1] != d:
        raise ArgumentError(f"{WHO}: cos and sin must span the head_dim ({d}) in their last "
                            f"dim, got shape {list(cos.shape)} (partial rotary is not supported)")
    for name, x in (("q", q), ("k", k)):
        try:
            torch.broadcast_shapes(cos.unsqueeze(unsqueeze_dim).shape, x.shape)
        except RuntimeError:
            raise ArgumentError(f"{WHO}: cos of shape {list(cos.shape)} unsqueezed at dim "
                                f"{unsqueeze_dim} does not broadcast to {name} of shape "
                                f"{list(x.shape)}") from None


def apply_rotary_emb(q, k, cos, sin, unsqueeze_dim=1, *, interleaved=False):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) on one fused kernel:
    returns (q * cos + rotate(q) * sin, k * cos + rotate(k) * sin).

    q: (B, Hq, S, D) (unsqueeze_dim=1) or (B, S, Hq, D) (unsqueeze_dim=2), any strides; k the
    same with Hk heads; cos, sin: (B, S, D), (1, S, D) or (S, D), q's dtype or float32.
    interleaved: GPT-J pairs instead of rotate-half. The results have q's and k's dtypes (q and
    k of two dtypes, and other broadcasts of cos, run on the torch reference).
    """
    _validate(q, k, cos, sin, unsqueeze_dim)
    c, s = (cos, sin) if cos.dim() == 3 else (cos.reshape(-1, *cos.shape[-2:]),
                                              sin.reshape(-1, *sin.shape[-2:]))
    transposed = unsqueeze_dim in (2, -2)
    qc, kc = (q.transpose(1, 2), k.transpose(1, 2)) if transposed else (q, k)
    b, _, seq, d = qc.shape
    reason = None
    if c.dim() != 3 or c.shape[0] not in (1, b) or tuple(c.shape[1:]) != (seq, d) \
            or kc.shape[0] != b or tuple(kc.shape[2:]) != (seq, d):
        reason = "cos/sin that broadcast other than (1 or B, S, D)"
    elif q.dtype != k.dtype:
        reason = "q and k of two dtypes"
    elif cos.requires_grad or sin.requires_grad:
        reason = "cos or sin requiring grad (the kernels give them none)"
    elif c.dtype not in (q.dtype, torch.float32):
        c, s = c.to(q.dtype), s.to(q.dtype)
    name = "torch"
    if reason is None:
        name = backends.select(WHO, q.device, q.dtype, KERNEL_DTYPES, has_kernel=_has_kernel)
    elif backends.forced() not in (None, "torch"):
        raise ArgumentError(f"{WHO}: backend {backends.forced()!r} does not take {reason}; "
                            "use the 'torch' backend")
    else:
        log_once(f"rotary-{reason}", f"{WHO}: {reason} run on the torch reference")
    if name == "torch":
        return reference(q, k, cos, sin, unsqueeze_dim, interleaved)
    if name == "triton":
        triton_ops_ready()
        op = torch.ops.fastlm.rotary_fwd_triton
    else:
        op = torch.ops.fastlm.rotary_fwd
    qo, ko = op(qc, kc, c, s, bool(interleaved))
    if transposed:
        qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    return qo, ko

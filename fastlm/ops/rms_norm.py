"""RMSNorm and the fused residual add + RMSNorm: the reference that defines the semantics, fake
kernels and autograd for the C++ ops, the Triton custom ops, and the public functions.

    y = fastlm.rms_norm(x, normalized_shape, weight, eps)        # like F.rms_norm
    out, summed = fastlm.add_rms_norm(x, residual, normalized_shape, weight, eps, dropout_p)

Semantics are those of torch.nn.functional.rms_norm: ``x / sqrt(mean(x^2) + eps) * weight``
over the trailing ``normalized_shape`` dims, eps None meaning torch.finfo(x.dtype).eps,
computed in float32 for float16/bfloat16/float32 input and returned in the input's dtype (as
torch does, also with a float32 weight). add_rms_norm is add_layer_norm with RMSNorm:
``summed = residual + dropout(x)`` rounded once to the input dtype, ``out = rms_norm(summed)``.

The kernels are the LayerNorm kernels (csrc/cpu/layer_norm.cpp, csrc/cuda/layer_norm.cu,
fastlm/kernels/layer_norm.py) run without centring and bias; rstd is saved per row in float32.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._log import log_once
from ._common import lazy_triton_ops, register_autograd
from .add_layer_norm import _check_pair, _promoted_pair, _rows, dropout_keep
from .add_layer_norm import _check_2d as _aln_check_2d
from .attention import _new_rng, dropout_scale
from .layer_norm import KERNEL_DTYPES, MAX_N, _canonical_shape, _validate
from .layer_norm import _check_2d as _ln_check_2d

WHO = "fastlm.rms_norm"
WHO_ADD = "fastlm.add_rms_norm"


# ---------------------------------------------------------------------------------------------
# Reference: the pure-PyTorch definition, also the `torch` backend.
def reference(input, normalized_shape, weight=None, eps=None):
    """RMSNorm in plain PyTorch ops, in float32 (float64 for float64 input), rounded once."""
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    ct = torch.float64 if input.dtype == torch.float64 else torch.float32
    # A copy, for the reason given in layer_norm.reference (add_rms_norm adds a second gradient).
    x = input.to(ct, copy=True)
    y = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    return y.to(input.dtype)


def add_reference(input, residual, normalized_shape, weight=None, eps=None, dropout_p=0.0,
                  rng=None):
    """(out, summed): the sum in float32 (float64 for float64), rounded to input's dtype,
    dropout bits as add_layer_norm's, then `reference` of the rounded sum."""
    ns = _canonical_shape(normalized_shape)
    ct = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(ct)
    if dropout_p > 0.0:
        keep = dropout_keep(rng, _rows(input.shape, ns), math.prod(ns), dropout_p)
        x = x * keep.view(input.shape).to(ct) * dropout_scale(dropout_p)
    summed = (residual.to(ct) + x).to(input.dtype)
    return reference(summed, ns, weight, eps), summed


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), shared by the C++ and the Triton ops.
def _stat(x):
    return x.new_empty((x.shape[0],), dtype=torch.float32)


def _param_grad(weight, wanted, x):
    return weight.new_empty(weight.shape) if wanted else x.new_empty((0,), dtype=torch.float32)


def _fake_fwd(input, weight, eps):
    torch._check(input.dim() == 2, lambda: f"{WHO}: input must be 2-D")
    return input.new_empty(input.shape), _stat(input)


def _fake_bwd(grad_out, input, rstd, weight, weight_grad):
    return input.new_empty(input.shape), _param_grad(weight, weight_grad, input)


def _fake_add_fwd(input, residual, weight, rng, dropout_p, eps):
    torch._check(input.dim() == 2, lambda: f"{WHO_ADD}: input must be 2-D")
    return input.new_empty(input.shape), input.new_empty(input.shape), _stat(input)


def _fake_add_bwd(grad_out, grad_summed, summed, rstd, weight, rng, dropout_p, input_grad,
                  weight_grad):
    din = (summed.new_empty(summed.shape) if input_grad and dropout_p > 0.0
           else summed.new_empty((0,)))
    return summed.new_empty(summed.shape), din, _param_grad(weight, weight_grad, summed)


# ---------------------------------------------------------------------------------------------
# Autograd: backward calls the matching backward op.
def _setup_context(ctx, inputs, output):
    input, weight, _ = inputs
    ctx.save_for_backward(input, output[1], weight)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_rstd):
        input, rstd, weight = ctx.saved_tensors
        need_x, need_w, _ = ctx.needs_input_grad
        wg = bool(need_w and weight is not None)
        if grad_out is None:
            grad_out = torch.zeros_like(input)
        dx, dw = bwd_op(grad_out, input, rstd, weight, wg)
        return (dx if need_x else None), (dw if wg else None), None

    return backward


def _setup_add_context(ctx, inputs, output):
    _, _, weight, rng, dropout_p, _ = inputs
    _, summed, rstd = output
    ctx.save_for_backward(summed, rstd, weight, rng)
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # an unused output (summed, say) reads no zeros


def _make_add_backward(bwd_op):
    def backward(ctx, grad_out, grad_summed, _grad_rstd):
        summed, rstd, weight, rng = ctx.saved_tensors
        need_in, need_res, need_w = ctx.needs_input_grad[:3]
        wg = bool(need_w and weight is not None)
        if grad_out is None:
            grad_out = torch.zeros_like(summed)
        drop = ctx.dropout_p > 0.0
        dres, din, dw = bwd_op(grad_out, grad_summed, summed, rstd, weight, rng, ctx.dropout_p,
                               bool(need_in and drop), wg)
        d_input = (din if drop else dres) if need_in else None
        return d_input, dres if need_res else None, dw if wg else None, None, None, None

    return backward


def _register(fwd, bwd, add_fwd, add_bwd, ops):
    register_autograd(WHO, fwd, bwd, _make_backward(getattr(ops, bwd.split("::")[1])),
                      _setup_context)
    register_autograd(WHO_ADD, add_fwd, add_bwd,
                      _make_add_backward(getattr(ops, add_bwd.split("::")[1])),
                      _setup_add_context)


# C++ ops (fastlm._C): fake kernels and autograd. The schemas live in csrc/fastlm.cpp.
_C_OPS = hasattr(torch.ops.fastlm, "rms_norm_fwd")
if _C_OPS:
    for _name, _fake in (("rms_norm_fwd", _fake_fwd), ("rms_norm_bwd", _fake_bwd),
                         ("add_rms_norm_fwd", _fake_add_fwd),
                         ("add_rms_norm_bwd", _fake_add_bwd)):
        torch.library.register_fake(f"fastlm::{_name}")(_fake)
    _register("fastlm::rms_norm_fwd", "fastlm::rms_norm_bwd", "fastlm::add_rms_norm_fwd",
              "fastlm::add_rms_norm_bwd", torch.ops.fastlm)

# Whether fastlm._C registered kernels per device type (a build may predate this op); looked
# up once so that torch.compile traces a dict lookup, not a dispatcher query.
_KERNELS = {t: _C_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlm::rms_norm_fwd", t.upper()) for t in ("cpu", "cuda")}


def _has_kernel(device_type):
    return _KERNELS.get(device_type, False)


# Triton ops: torch.library.triton_op so torch.compile sees through to the kernels.
def _register_triton_ops():
    """Define the Triton custom ops (on first use: see ops/_common.py)."""
    from torch.library import triton_op

    from ..kernels import layer_norm as tk

    @triton_op("fastlm::rms_norm_fwd_triton", mutates_args=())
    def rms_norm_fwd_triton(input: Tensor, weight: Optional[Tensor],
                            eps: float) -> tuple[Tensor, Tensor]:
        _ln_check_2d(input, weight, None, WHO)
        return tk.rms_forward(input, weight, eps)

    @triton_op("fastlm::rms_norm_bwd_triton", mutates_args=())
    def rms_norm_bwd_triton(grad_out: Tensor, input: Tensor, rstd: Tensor,
                            weight: Optional[Tensor],
                            weight_grad: bool) -> tuple[Tensor, Tensor]:
        _ln_check_2d(input, weight, None, WHO)
        return tk.rms_backward(grad_out, input, rstd, weight, weight_grad)

    @triton_op("fastlm::add_rms_norm_fwd_triton", mutates_args=())
    def add_rms_norm_fwd_triton(input: Tensor, residual: Tensor, weight: Optional[Tensor],
                                rng: Optional[Tensor], dropout_p: float,
                                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        _aln_check_2d(input, residual, weight, None, rng, dropout_p)
        return tk.add_rms_forward(input, residual, weight, rng, dropout_p, eps)

    @triton_op("fastlm::add_rms_norm_bwd_triton", mutates_args=())
    def add_rms_norm_bwd_triton(grad_out: Tensor, grad_summed: Optional[Tensor], summed: Tensor,
                                rstd: Tensor, weight: Optional[Tensor], rng: Optional[Tensor],
                                dropout_p: float, input_grad: bool,
                                weight_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        _aln_check_2d(summed, summed, weight, None, rng, dropout_p)
        return tk.add_rms_backward(grad_out, grad_summed, summed, rstd, weight, rng, dropout_p,
                                   input_grad, weight_grad)

    _register("fastlm::rms_norm_fwd_triton", "fastlm::rms_norm_bwd_triton",
              "fastlm::add_rms_norm_fwd_triton", "fastlm::add_rms_norm_bwd_triton",
              torch.ops.fastlm)


triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# The public functions.
def _prepare(input, ns, weight, eps, who):
    """Checks; under CUDA autocast the float32 input and weight (rms_norm is on autocast's
    float32 list, as layer_norm); the eps; the backend; whether the rows fit the kernels."""
    _validate(input, ns, weight, None, who=who)
    eps = torch.finfo(input.dtype).eps if eps is None else float(eps)
    name = backends.select(who, input.device, input.dtype, KERNEL_DTYPES,
                           has_kernel=_has_kernel)
    n = math.prod(ns)
    if name != "torch" and n > MAX_N:
        log_once(f"{who}-long-rows", f"{who}: rows of more than {MAX_N} elements run on the "
                 "reference (torch ops); the kernels take rows of up to 2**20 elements")
        name = "torch"
    return eps, name, n


def _autocast_f32(input, weight):
    if (input.device.type == "cuda" and torch.is_autocast_enabled("cuda")
            and input.dtype != torch.float64):
        input = input.float()
        weight = None if weight is None else weight.float()
    return input, weight


def rms_norm(input, normalized_shape, weight=None, eps=None):
    """torch.nn.functional.rms_norm on fastlm's fused kernels (same arguments and result).

    weight: normalized_shape, the input's dtype or float32 (the result has the input's dtype,
    as torch's). Backend: the fastest available for input's device (see fastlm.backends);
    float64, and rows of more than 2**20 elements, run on the torch reference.
    """
    ns = _canonical_shape(normalized_shape)
    input, weight = _autocast_f32(input, weight)
    eps, name, n = _prepare(input, ns, weight, eps, WHO)
    if name == "torch":
        return reference(input, ns, weight, eps)
    x2 = input.reshape(-1, n)
    w = None if weight is None else weight.reshape(n)
    if name == "triton":
        triton_ops_ready()
        op = torch.ops.fastlm.rms_norm_fwd_triton
    else:
        op = torch.ops.fastlm.rms_norm_fwd
    y, _ = op(x2, w, eps)
    return y.view(input.shape)


def add_rms_norm(input, residual, normalized_shape, weight=None, eps=None, dropout_p=0.0):
    """(out, summed) with summed = residual + dropout(input, dropout_p) and
    out = rms_norm(summed, normalized_shape, weight, eps), in one fused kernel.

    input and residual: same shape, device and dtype (float32, float16, bfloat16; float64 runs
    on the torch reference); weight as for fastlm.rms_norm. Both outputs are differentiable.
    Dropout bits and autocast as fastlm.add_layer_norm's.
    """
    ns = _canonical_shape(normalized_shape)
    _validate(input, ns, weight, None, who=WHO_ADD)
    _check_pair(input, residual, dropout_p)
    dropout_p = float(dropout_p)
    dev = input.device
    input, residual = _promoted_pair(input, residual, WHO_ADD)
    if dev.type == "cuda" and torch.is_autocast_enabled("cuda") and input.dtype != torch.float64:
        if input.dtype != torch.float32:
            # Eager keeps the 16-bit sum and normalizes it in float32.
            with torch.autocast("cuda", enabled=False):
                _, summed = add_rms_norm(input, residual, ns, None, eps, dropout_p)
            return rms_norm(summed, ns, weight, eps), summed
        weight = None if weight is None else weight.float()
    eps, name, n = _prepare(input, ns, weight, eps, WHO_ADD)
    rng = _new_rng(dev) if dropout_p > 0.0 else None
    if name == "torch":
        return add_reference(input, residual, ns, weight, eps, dropout_p, rng)
    rows = _rows(input.shape, ns)
    w = None if weight is None else weight.reshape(n)
    if name == "triton":
        triton_ops_ready()
        op = torch.ops.fastlm.add_rms_norm_fwd_triton
    else:
        op = torch.ops.fastlm.add_rms_norm_fwd
    out, summed, _ = op(input.reshape(rows, n), residual.reshape(rows, n), w, rng, dropout_p,
                        eps)
    return out.view(input.shape), summed.view(input.shape)

"""Fused residual add + dropout + LayerNorm: the reference that defines the semantics, fake
kernels and autograd for the C++ ops, the Triton custom ops, and the public function.

    out, summed = fastlm.add_layer_norm(input, residual, normalized_shape, weight, bias, eps,
                                        dropout_p)
    summed = residual + dropout(input, p=dropout_p)      (in input's dtype: rounded once)
    out    = layer_norm(summed, normalized_shape, weight, bias, eps)   (of the rounded summed)

Post-norm layers (torch.nn.TransformerEncoderLayer's default) use `out`; pre-norm / GPT
blocks keep `summed` as the next residual. Dropout is inverted (kept elements scaled by
1 / (1 - rate)) with fastlm's counter-based bits (docs/layer_norm.md): Philox4x32-10 keyed by
an int64 (seed, offset) drawn from torch's generator for the device, the same bits on every
backend, regenerated in the backward (never stored). dropout_p = 0 draws nothing.

The kernels take 2-D (rows, N) views; mean and rstd are saved per row in float32.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._errors import ArgumentError, ArgumentTypeError
from .._log import log_once
from ._common import lazy_triton_ops, register_autograd
from .attention import _new_rng, dropout_scale, dropout_threshold, philox4x32_10
from .layer_norm import KERNEL_DTYPES, MAX_N, _canonical_shape, _validate, layer_norm
from .layer_norm import _check_2d as _ln_check_2d
from .layer_norm import reference as _ln_reference

WHO = "fastlm.add_layer_norm"  # its default order on a GPU: backends.CUDA_ORDER
_M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Dropout bits (docs/layer_norm.md) and the reference.
def dropout_keep(rng: Tensor, rows: int, n: int, dropout_p: float) -> Tensor:
    """The (rows, n) bool keep mask of element (r, c) of the (rows, N) view: Philox4x32-10 with
    counter (c >> 3, r & 0xffffffff, r >> 32, offset) and key (seed lo, seed hi); the 16 bits
    (x[lane >> 1] >> 16 * (lane & 1)) & 0xffff, lane = c & 7, are kept when >= the threshold."""
    seed, offset = (int(v) for v in rng.tolist())
    dev = rng.device
    groups = (n + 7) // 8
    shape = (rows, groups)
    g = torch.arange(groups, device=dev, dtype=torch.int64).view(1, groups).expand(shape)
    r = torch.arange(rows, device=dev, dtype=torch.int64).view(rows, 1)
    x = philox4x32_10(g, (r & _M32).expand(shape), (r >> 32).expand(shape),
                      torch.full(shape, offset & _M32, device=dev, dtype=torch.int64),
                      seed & _M32, (seed >> 32) & _M32)
    words = torch.stack(x, dim=-1)  # (rows, groups, 4)
    r16 = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(rows, groups * 8)
    return r16[:, :n] >= dropout_threshold(dropout_p)


def _rows(shape, ns):
    return math.prod(shape[:len(shape) - len(ns)])


def reference(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5,
              dropout_p=0.0, rng=None):
    """(out, summed) in plain PyTorch ops: the sum in float32 (float64 for float64 input),
    rounded to input's dtype, then fastlm.ops.layer_norm.reference of the rounded sum."""
    ns = _canonical_shape(normalized_shape)
    ct = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(ct)
    if dropout_p > 0.0:
        keep = dropout_keep(rng, _rows(input.shape, ns), math.prod(ns), dropout_p)
        x = x * keep.view(input.shape).to(ct) * dropout_scale(dropout_p)
    summed = (residual.to(ct) + x).to(input.dtype)
    return _ln_reference(summed, ns, weight, bias, eps), summed


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), shared by the C++ and the Triton ops.
def _fake_fwd(input, residual, weight, bias, rng, dropout_p, eps):
    torch._check(input.dim() == 2, lambda: f"{WHO}: input must be 2-D")
    m = input.shape[0]
    stat = input.new_empty((m,), dtype=torch.float32)
    return (input.new_empty(input.shape), input.new_empty(input.shape), stat,
            stat.new_empty((m,)))


def _fake_bwd(grad_out, grad_summed, summed, mean, rstd, weight, bias, rng, dropout_p,
              input_grad, weight_grad, bias_grad):
    def grad(p, wanted):
        if wanted:
            return p.new_empty(p.shape)
        return summed.new_empty((0,), dtype=torch.float32)

    din = (summed.new_empty(summed.shape) if input_grad and dropout_p > 0.0
           else summed.new_empty((0,)))
    return (summed.new_empty(summed.shape), din, grad(weight, weight_grad),
            grad(bias, bias_grad))


# ---------------------------------------------------------------------------------------------
# Autograd, shared by both forward ops: backward calls the matching backward op.
def _setup_context(ctx, inputs, output):
    _, _, weight, bias, rng, dropout_p, _ = inputs
    _, summed, mean, rstd = output
    ctx.save_for_backward(summed, mean, rstd, weight, bias, rng)
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # an unused output (post-norm: summed) reads no zeros


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_summed, _grad_mean, _grad_rstd):
        summed, mean, rstd, weight, bias, rng = ctx.saved_tensors
        need_in, need_res, need_w, need_b = ctx.needs_input_grad[:4]
        wg = bool(need_w and weight is not None)
        bg = bool(need_b and bias is not None)
        if grad_out is None:
            grad_out = torch.zeros_like(summed)
        drop = ctx.dropout_p > 0.0
        dres, din, dw, db = bwd_op(grad_out, grad_summed, summed, mean, rstd, weight, bias, rng,
                                   ctx.dropout_p, bool(need_in and drop), wg, bg)
        d_input = (din if drop else dres) if need_in else None
        return (d_input, dres if need_res else None, dw if wg else None, db if bg else None,
                None, None, None)

    return backward


def _register(fwd_name, bwd_name, bwd_op):
    register_autograd(WHO, fwd_name, bwd_name, _make_backward(bwd_op), _setup_context)


# C++ ops (fastlm._C): fake kernels and autograd. The schemas live in csrc/fastlm.cpp.
_C_OPS = False
if hasattr(torch.ops.fastlm, "add_layer_norm_fwd"):
    torch.library.register_fake("fastlm::add_layer_norm_fwd")(_fake_fwd)
    torch.library.register_fake("fastlm::add_layer_norm_bwd")(_fake_bwd)
    _register("fastlm::add_layer_norm_fwd", "fastlm::add_layer_norm_bwd",
              torch.ops.fastlm.add_layer_norm_bwd)
    _C_OPS = True

# Whether fastlm._C registered kernels per device type (a build may predate this op); looked
# up once so that torch.compile traces a dict lookup, not a dispatcher query.
_KERNELS = {t: _C_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlm::add_layer_norm_fwd", t.upper()) for t in ("cpu", "cuda")}


def _has_kernel(device_type):
    return _KERNELS.get(device_type, False)


# Triton ops: torch.library.triton_op so torch.compile sees through to the kernels.
def _check_2d(input, residual, weight, bias, rng, dropout_p):
    """The argument checks of the C++ kernels (csrc/layer_norm.h), for the Triton ops."""
    _ln_check_2d(input, weight, bias, WHO)
    torch._check(residual.shape == input.shape and residual.dtype == input.dtype
                 and residual.device == input.device, lambda: (
                     f"{WHO}: residual must match input (shape {list(input.shape)}, "
                     f"{input.dtype}, {input.device}), got shape {list(residual.shape)}, "
                     f"{residual.dtype}, {residual.device}"))
    torch._check(0.0 <= dropout_p <= 1.0, lambda: f"{WHO}: dropout_p must be in [0, 1]")
    if dropout_p > 0.0:
        torch._check(rng is not None and rng.dtype == torch.int64 and rng.numel() == 2
                     and rng.device == input.device, lambda: (
                         f"{WHO}: dropout needs rng, an int64 tensor (seed, offset) on "
                         f"{input.device}"))


def _register_triton_ops():
    """Define the Triton custom ops (on first use: see ops/_common.py)."""
    from torch.library import triton_op

    from ..kernels import layer_norm as tk

    @triton_op("fastlm::add_layer_norm_fwd_triton", mutates_args=())
    def add_layer_norm_fwd_triton(input: Tensor, residual: Tensor, weight: Optional[Tensor],
                                  bias: Optional[Tensor], rng: Optional[Tensor],
                                  dropout_p: float,
                                  eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_2d(input, residual, weight, bias, rng, dropout_p)
        return tk.add_forward(input, residual, weight, bias, rng, dropout_p, eps)

    @triton_op("fastlm::add_layer_norm_bwd_triton", mutates_args=())
    def add_layer_norm_bwd_triton(grad_out: Tensor, grad_summed: Optional[Tensor],
                                  summed: Tensor, mean: Tensor, rstd: Tensor,
                                  weight: Optional[Tensor], bias: Optional[Tensor],
                                  rng: Optional[Tensor], dropout_p: float, input_grad: bool,
                                  weight_grad: bool,
                                  bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check_2d(summed, summed, weight, bias, rng, dropout_p)
        return tk.add_backward(grad_out, grad_summed, summed, mean, rstd, weight, bias, rng,
                               dropout_p, input_grad, weight_grad, bias_grad)

    _register("fastlm::add_layer_norm_fwd_triton", "fastlm::add_layer_norm_bwd_triton",
              torch.ops.fastlm.add_layer_norm_bwd_triton)


triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# The public function.
def _check_pair(input, residual, dropout_p):
    if not isinstance(residual, Tensor):
        raise ArgumentTypeError(f"{WHO}: residual must be a Tensor, got "
                                f"{type(residual).__name__}")
    if not residual.is_floating_point():
        raise ArgumentTypeError(f"{WHO}: residual must be a floating-point tensor, got "
                                f"{residual.dtype}")
    if residual.shape != input.shape:
        raise ArgumentError(f"{WHO}: residual must have input's shape {list(input.shape)}, got "
                            f"{list(residual.shape)}")
    if residual.device != input.device:
        raise ArgumentError(f"{WHO}: residual is on {residual.device} but input is on "
                            f"{input.device}; expected both on the same device")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ArgumentTypeError(f"{WHO}: dropout_p must be a float, got "
                                f"{type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ArgumentError(f"{WHO}: dropout_p must be in [0, 1], got {dropout_p}")


def _promoted_pair(input, residual, who=WHO):
    """input and residual in one dtype: promoted under autocast (as eager torch), else an
    error (also fastlm.add_rms_norm's)."""
    if residual.dtype == input.dtype:
        return input, residual
    if not torch.is_autocast_enabled(input.device.type):
        raise ArgumentTypeError(f"{who}: input and residual must have the same dtype, got "
                                f"{input.dtype} and {residual.dtype} (eager torch would "
                                "promote; cast one of them)")
    dt = torch.promote_types(input.dtype, residual.dtype)
    return input.to(dt), residual.to(dt)


def add_layer_norm(input, residual, normalized_shape, weight=None, bias=None, eps=1e-5,
                   dropout_p=0.0):
    """(out, summed) with summed = residual + dropout(input, dropout_p) and
    out = layer_norm(summed, normalized_shape, weight, bias, eps), in one fused kernel.

    input and residual: same shape, device and dtype (float32, float16, bfloat16; float64 runs
    on the torch reference); weight and bias as for fastlm.layer_norm. Both outputs are
    differentiable. Pass dropout_p = 0 outside training (no dropout, no random draw).

    Autocast behaves as torch's eager composition: input and residual of different dtypes are
    promoted (only under autocast; elsewhere that is an error), and under CUDA autocast `out`
    is float32 (layer_norm is on autocast's float32 list) while `summed` keeps the promoted
    dtype. With both 16-bit under CUDA autocast that is two kernels (the sum, then
    fastlm.layer_norm in float32), not one.
    """
    ns = _canonical_shape(normalized_shape)
    _validate(input, ns, weight, bias, who=WHO)
    _check_pair(input, residual, dropout_p)
    dropout_p = float(dropout_p)
    dev = input.device
    input, residual = _promoted_pair(input, residual)
    if dev.type == "cuda" and torch.is_autocast_enabled("cuda") and input.dtype != torch.float64:
        if input.dtype != torch.float32:
            # Eager keeps the 16-bit sum and normalizes it in float32.
            with torch.autocast("cuda", enabled=False):
                _, summed = add_layer_norm(input, residual, ns, None, None, eps, dropout_p)
            return layer_norm(summed, ns, weight, bias, eps), summed
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    name = backends.select(WHO, dev, input.dtype, KERNEL_DTYPES, has_kernel=_has_kernel)
    rng = _new_rng(dev) if dropout_p > 0.0 else None
    if name == "torch":
        return reference(input, residual, ns, weight, bias, eps, dropout_p, rng)
    n = math.prod(ns)
    if n > MAX_N:  # longer rows than the kernels take: the reference (torch's ops)
        log_once("add_layer_norm-long-rows", f"{WHO}: rows of more than {MAX_N} elements run "
                 "on the reference (torch ops); the kernels take rows of up to 2**20 elements")
        return reference(input, residual, ns, weight, bias, eps, dropout_p, rng)
    rows = _rows(input.shape, ns)
    x2 = input.reshape(rows, n)
    r2 = residual.reshape(rows, n)
    w = None if weight is None else weight.reshape(n)
    b = None if bias is None else bias.reshape(n)
    if name == "triton":
        triton_ops_ready()
        op = torch.ops.fastlm.add_layer_norm_fwd_triton
    else:
        op = torch.ops.fastlm.add_layer_norm_fwd
    out, summed, _, _ = op(x2, r2, w, b, rng, dropout_p, float(eps))
    return out.view(input.shape), summed.view(input.shape)

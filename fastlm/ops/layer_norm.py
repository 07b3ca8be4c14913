"""LayerNorm: the reference that defines the semantics, fake kernels and autograd for the C++
ops, the Triton custom ops, and the public function that picks a backend.

Semantics are those of torch.nn.functional.layer_norm: statistics over the trailing
``normalized_shape`` dims, biased variance, ``(x - mean) / sqrt(var + eps) * weight + bias``,
computed in float32 for float16/bfloat16/float32 input and returned in the input's dtype.
Weight and bias have the input's dtype or float32. Under CUDA autocast the input is cast to
float32 first, as torch does (layer_norm is on autocast's float32 list); CPU autocast leaves it.

The kernels take a 2-D (rows, N) view; mean and rstd are saved per row in float32.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._errors import ArgumentError, ArgumentTypeError, UnsupportedDtypeError
from .._log import log_once
from ._common import lazy_triton_ops, register_autograd

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_N = 1 << 20  # the kernels' row-length limit (csrc/layer_norm.h kLayerNormMaxN)


# ---------------------------------------------------------------------------------------------
# Reference: the pure-PyTorch definition, also the `torch` backend.
def reference(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """LayerNorm in plain PyTorch ops, in float32 (float64 for float64 input)."""
    dims = tuple(range(-len(normalized_shape), 0))
    ct = torch.float64 if input.dtype == torch.float64 else torch.float32
    # A copy, even in ct already: autograd then sums LayerNorm's own gradient terms (the direct
    # one and the mean's, which cancel exactly on a one-element row while each is ~rstd * dy)
    # before adding them to any other gradient of `input` (add_layer_norm's grad of summed),
    # whose low bits would otherwise be rounded away at that magnitude.
    x = input.to(ct, copy=True)
    mean = x.mean(dims, keepdim=True)
    xc = x - mean
    y = xc * torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(input.dtype)


# ---------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), shared by the C++ and the Triton ops.
def _fake_fwd(input, weight, bias, eps):
    torch._check(input.dim() == 2, lambda: "fastlm.layer_norm: input must be 2-D")
    m = input.shape[0]
    stat = input.new_empty((m,), dtype=torch.float32)
    return input.new_empty(input.shape), stat, stat.new_empty((m,))


def _fake_bwd(grad_out, input, mean, rstd, weight, bias, weight_grad, bias_grad):
    def grad(p, wanted):
        if wanted:
            return p.new_empty(p.shape)
        return input.new_empty((0,), dtype=torch.float32)

    return input.new_empty(input.shape), grad(weight, weight_grad), grad(bias, bias_grad)


# ---------------------------------------------------------------------------------------------
# Autograd, shared by both forward ops: backward calls the matching backward op.
def _setup_context(ctx, inputs, output):
    input, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, mean, rstd, weight, bias)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, _grad_mean, _grad_rstd):
        input, mean, rstd, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        wg = bool(need_w and weight is not None)
        bg = bool(need_b and bias is not None)
        if grad_out is None:
            grad_out = torch.zeros_like(input)
        dx, dw, db = bwd_op(grad_out, input, mean, rstd, weight, bias, wg, bg)
        return (dx if need_x else None), (dw if wg else None), (db if bg else None), None

    return backward


def _register(fwd_name, bwd_name, bwd_op):
    register_autograd("fastlm.layer_norm", fwd_name, bwd_name, _make_backward(bwd_op),
                      _setup_context)


# C++ ops (fastlm._C): fake kernels and autograd. The schemas live in csrc/fastlm.cpp.
_C_OPS = False
if hasattr(torch.ops.fastlm, "layer_norm_fwd"):
    torch.library.register_fake("fastlm::layer_norm_fwd")(_fake_fwd)
    torch.library.register_fake("fastlm::layer_norm_bwd")(_fake_bwd)
    _register("fastlm::layer_norm_fwd", "fastlm::layer_norm_bwd", torch.ops.fastlm.layer_norm_bwd)
    _C_OPS = True


# Triton ops: torch.library.triton_op so torch.compile sees through to the kernels.
def _check_2d(input, weight, bias, who="fastlm.layer_norm"):
    """The argument checks of the C++ kernels (csrc/layer_norm.h), for the Triton ops (also
    fastlm.add_layer_norm's: `who` names the op)."""
    torch._check(input.dim() == 2, lambda: f"{who}: input must be 2-D (rows, N)")
    torch._check(input.dtype in KERNEL_DTYPES, lambda: (
        f"{who}: input must be float32, float16 or bfloat16, got {input.dtype}"))
    torch._check(input.shape[1] <= MAX_N, lambda: (
        f"{who}: the normalized size is {input.shape[1]} elements but at most {MAX_N} are "
        "supported"))
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            torch._check(p.shape == (input.shape[1],), lambda: (
                f"{who}: {name} must be 1-D with {input.shape[1]} elements"))
            torch._check(p.dtype in (input.dtype, torch.float32), lambda: (
                f"{who}: {name} must have the input's dtype or float32"))


def _register_triton_ops():
    """Define the Triton custom ops (on first use: see ops/_common.py)."""
    from torch.library import triton_op

    from ..kernels import layer_norm as tk

    @triton_op("fastlm::layer_norm_fwd_triton", mutates_args=())
    def layer_norm_fwd_triton(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              eps: float) -> tuple[Tensor, Tensor, Tensor]:
        _check_2d(input, weight, bias)
        return tk.forward(input, weight, bias, eps)

    @triton_op("fastlm::layer_norm_bwd_triton", mutates_args=())
    def layer_norm_bwd_triton(grad_out: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                              weight: Optional[Tensor], bias: Optional[Tensor], weight_grad: bool,
                              bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
        _check_2d(input, weight, bias)
        return tk.backward(grad_out, input, mean, rstd, weight, bias, weight_grad, bias_grad)

    _register("fastlm::layer_norm_fwd_triton", "fastlm::layer_norm_bwd_triton",
              torch.ops.fastlm.layer_norm_bwd_triton)


# Registers the Triton ops once; then torch.ops.fastlm.layer_norm_{fwd,bwd}_triton exist.
triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# The public function.
def _canonical_shape(normalized_shape):
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(int(s) for s in normalized_shape)


def _validate(input, ns, weight, bias, who="fastlm.layer_norm"):
    """torch's checks, with torch's words after `who`: the errors are torch's classes (bad
    shapes and devices: fastlm.ArgumentError, a ValueError and a RuntimeError; bad dtypes:
    fastlm.ArgumentTypeError, a TypeError and a RuntimeError; an integer input:
    fastlm.UnsupportedDtypeError, also a NotImplementedError, as torch's)."""
    if not isinstance(input, Tensor):
        raise ArgumentTypeError(f"{who}: argument 'input' (position 1) must be Tensor, not "
                                f"{type(input).__name__}")
    if not input.is_floating_point():
        raise UnsupportedDtypeError(f"{who}: input must be a floating-point tensor (float32, "
                                    f"float16, bfloat16 or float64), got {input.dtype}")
    if len(ns) == 0:
        raise ArgumentError(f"{who}: Expected normalized_shape to be at least 1-dimensional, "
                            "i.e., containing at least one element, but got normalized_shape "
                            "= []")
    if input.dim() < len(ns) or tuple(input.shape[input.dim() - len(ns):]) != ns:
        raise ArgumentError(
            f"{who}: Given normalized_shape={list(ns)}, expected input with shape "
            f"[*, {', '.join(map(str, ns))}], but got input of size{list(input.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != ns:
            raise ArgumentError(f"{who}: Expected {name} to be of same shape as "
                                f"normalized_shape, but got {name} of shape {list(p.shape)} "
                                f"and normalized_shape = {list(ns)}")
        if p.device != input.device:
            raise ArgumentError(f"{who}: {name} is on {p.device} but input is on "
                                f"{input.device}; expected both on the same device")
        if p.dtype not in (input.dtype, torch.float32):
            raise ArgumentTypeError(f"{who}: {name} must have the input's dtype "
                                    f"({input.dtype}) or float32, got {p.dtype}")
        if p.dtype != input.dtype and input.dtype == torch.float64:  # as torch: no mix
            raise ArgumentTypeError(f"{who}: {name} must have the input's dtype "
                                    f"({input.dtype}), got {p.dtype}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise ArgumentTypeError(f"{who}: weight and bias must have the same dtype, got "
                                f"{weight.dtype} and {bias.dtype}")


def _long_rows(input, ns, weight, bias, eps):
    """LayerNorm over rows longer than the kernels take (MAX_N elements; vision models have
    them): torch's own kernel when weight and bias have the input's dtype, else the
    reference (float32 arithmetic). Same result as torch, at torch's speed."""
    log_once("layer_norm-long-rows", f"fastlm.layer_norm: rows of more than {MAX_N} elements "
             "run on torch's layer_norm (or the reference with float32 weight/bias on 16-bit "
             "input); the kernels take rows of up to 2**20 elements")
    if all(p is None or p.dtype == input.dtype for p in (weight, bias)):
        return torch.nn.functional.layer_norm(input, ns, weight, bias, eps)
    return reference(input, ns, weight, bias, eps)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """torch.nn.functional.layer_norm on fastlm's fused kernels (same arguments and result).

    Backend: the fastest available for input's device (see fastlm.backends); float64 runs on
    the torch reference. Rows longer than 2**20 elements (the kernels' limit) run on torch's
    own layer_norm (see _long_rows).
    """
    ns = _canonical_shape(normalized_shape)
    _validate(input, ns, weight, bias)
    name = backends.select("fastlm.layer_norm", input.device, input.dtype, KERNEL_DTYPES)
    if name == "torch":
        return reference(input, ns, weight, bias, eps)
    if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        input = input.float()
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    n = math.prod(ns)
    if n > MAX_N:
        return _long_rows(input, ns, weight, bias, eps)
    x2 = input.reshape(-1, n)
    w = None if weight is None else weight.reshape(n)
    b = None if bias is None else bias.reshape(n)
    if name == "triton":
        triton_ops_ready()
        op = torch.ops.fastlm.layer_norm_fwd_triton
    else:
        op = torch.ops.fastlm.layer_norm_fwd
    y, _, _ = op(x2, w, b, float(eps))
    return y.view(input.shape)

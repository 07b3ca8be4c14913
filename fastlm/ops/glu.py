"""Gated linear units: SwiGLU and GeGLU, the gated MLP activations of Llama-class models.

    h = fastlm.swiglu(gate, up)                     # F.silu(gate) * up
    h = fastlm.geglu(gate, up, approximate="tanh")  # F.gelu(gate, approximate="tanh") * up

One fused kernel per direction (docs/glu.md): the forward reads gate and up once and writes the
product, computed in float32 and rounded once to the dtype (eager torch rounds act(gate) first);
the backward recomputes act(gate) instead of storing it. Here: the reference that defines the
semantics, fake kernels and autograd for the C++ ops, the Triton custom ops, and the public
functions.
"""

from typing import Optional  # noqa: F401  (triton_op signatures)

import torch
from torch import Tensor

from .. import backends
from .._errors import ArgumentError, ArgumentTypeError
from ._common import lazy_triton_ops, register_autograd

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SILU, GELU_TANH, GELU_ERF = 0, 1, 2  # csrc/glu.h GluAct
_WHO = {SILU: "fastlm.swiglu", GELU_TANH: "fastlm.geglu", GELU_ERF: "fastlm.geglu"}
_GELU = {"none": GELU_ERF, "tanh": GELU_TANH}


# ---------------------------------------------------------------------------------------------
# Reference: the pure-PyTorch definition, also the `torch` backend.
def reference(gate, up, activation):
    """act(gate) * up in float32 (float64 for float64), rounded once to the inputs' dtype."""
    ct = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g = gate.to(ct)
    if activation == SILU:
        a = torch.nn.functional.silu(g)
    else:
        a = torch.nn.functional.gelu(g, approximate="tanh" if activation == GELU_TANH else "none")
    return (a * up.to(ct)).to(gate.dtype)


# ---------------------------------------------------------------------------------------------
# Fake kernels, autograd.
def _fake_fwd(gate, up, activation):
    return gate.new_empty(gate.shape)


def _fake_bwd(grad_out, gate, up, activation):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _make_backward(bwd_op):
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        need_g, need_u, _ = ctx.needs_input_grad
        dg, du = bwd_op(grad_out, gate, up, ctx.activation)
        return (dg if need_g else None), (du if need_u else None), None

    return backward


def _register(fwd_name, bwd_name, bwd_op):
    register_autograd("fastlm.swiglu / fastlm.geglu", fwd_name, bwd_name,
                      _make_backward(bwd_op), _setup_context)


_C_OPS = hasattr(torch.ops.fastlm, "glu_fwd")
if _C_OPS:
    torch.library.register_fake("fastlm::glu_fwd")(_fake_fwd)
    torch.library.register_fake("fastlm::glu_bwd")(_fake_bwd)
    _register("fastlm::glu_fwd", "fastlm::glu_bwd", torch.ops.fastlm.glu_bwd)

_KERNELS = {t: _C_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fastlm::glu_fwd", t.upper()) for t in ("cpu", "cuda")}


def _has_kernel(device_type):
    return _KERNELS.get(device_type, False)


def _check(gate, up, activation):
    """The checks of the C++ kernels (csrc/glu.h), for the Triton ops."""
    who = _WHO.get(activation, "fastlm glu")
    torch._check(activation in _WHO, lambda: "fastlm glu: activation must be 0, 1 or 2")
    torch._check(gate.dtype in KERNEL_DTYPES, lambda: (
        f"{who}: gate must be float32, float16 or bfloat16, got {gate.dtype}"))
    torch._check(up.shape == gate.shape and up.dtype == gate.dtype
                 and up.device == gate.device, lambda: f"{who}: up must match gate")


def _register_triton_ops():
    from torch.library import triton_op

    from ..kernels import glu as tk

    @triton_op("fastlm::glu_fwd_triton", mutates_args=())
    def glu_fwd_triton(gate: Tensor, up: Tensor, activation: int) -> Tensor:
        _check(gate, up, activation)
        return tk.forward(gate, up, activation)

    @triton_op("fastlm::glu_bwd_triton", mutates_args=())
    def glu_bwd_triton(grad_out: Tensor, gate: Tensor, up: Tensor,
                       activation: int) -> tuple[Tensor, Tensor]:
        _check(gate, up, activation)
        return tk.backward(grad_out, gate, up, activation)

    _register("fastlm::glu_fwd_triton", "fastlm::glu_bwd_triton",
              torch.ops.fastlm.glu_bwd_triton)


triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# The public functions.
def _glu(gate, up, activation):
    who = _WHO[activation]
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ArgumentTypeError(f"{who}: {name} must be a floating-point tensor, got "
                                    f"{t.dtype}")
    if gate.shape != up.shape:
        raise ArgumentError(f"{who}: gate and up must have one shape, got {list(gate.shape)} "
                            f"and {list(up.shape)}")
    if gate.device != up.device:
        raise ArgumentError(f"{who}: gate is on {gate.device} but up is on {up.device}; "
                            "expected both on the same device")
    if gate.dtype != up.dtype:  # as eager torch: act(gate) * up promotes
        dt = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dt), up.to(dt)
    name = backends.select(who, gate.device, gate.dtype, KERNEL_DTYPES, has_kernel=_has_kernel)
    if name == "torch":
        return reference(gate, up, activation)
    if name == "triton":
        triton_ops_ready()
        return torch.ops.fastlm.glu_fwd_triton(gate, up, activation)
    return torch.ops.fastlm.glu_fwd(gate, up, activation)


def swiglu(gate, up):
    """F.silu(gate) * up in one fused kernel (forward and backward).

    gate and up: one shape and device, float32, float16 or bfloat16 (float64 runs on the torch
    reference; two dtypes are promoted, as eager torch does). The product is computed in
    float32 and rounded once to the dtype.
    """
    return _glu(gate, up, SILU)


def geglu(gate, up, approximate="none"):
    """F.gelu(gate, approximate=approximate) * up in one fused kernel; approximate "none" (erf,
    torch's default) or "tanh" (Gemma's gelu_pytorch_tanh). Otherwise as fastlm.swiglu."""
    if approximate not in _GELU:
        raise ArgumentError(f"fastlm.geglu: approximate must be 'none' or 'tanh', got "
                            f"{approximate!r}")
    return _glu(gate, up, _GELU[approximate])

"""The fused Adam/AdamW step: the reference that defines it, fake kernels for the C++ ops, the
Triton op, and the public functions that pick a backend.

One call updates lists of tensors on one device, all params of one dtype. Per element, in
float32 (torch's fused Adam formula):

    g = grad / grad_scale * clip_coef, negated if maximize
    AdamW: p *= 1 - lr * wd              Adam: g += wd * p          (neither when wd == 0)
    m = beta1 * m + (1 - beta1) * g;     v = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v) (amsgrad);       denom = sqrt(v or vmax) / sqrt(1 - beta2^step) + eps
    p -= lr / (1 - beta1^step) * m / denom

`steps` are float32 scalar tensors on the device, already incremented. A found_inf != 0 skips
the whole step (device-side: no host synchronization). With `masters` (float32, one per
param) the master is updated and the param becomes its rounding.
"""

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ._common import lazy_triton_ops

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Reference: also the `torch` backend.
def reference_adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps,
                         lr, lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad,
                         maximize, grad_scale, found_inf, clip_coef):
    """The step in plain PyTorch ops, float32 arithmetic (float64 for float64 params, as
    torch.optim); skipped on the device when found_inf is set (torch.where, no host
    synchronization)."""
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        dev = p.device
        f32 = torch.float64 if p.dtype == torch.float64 else torch.float32  # the compute type
        lr_d = (lr_tensor.to(f32) if lr_tensor is not None else torch.tensor(lr, dtype=f32))
        lr_d = lr_d.to(dev)
        g = grads[i].to(f32)
        if grad_scale is not None:
            g = g / grad_scale
        if clip_coef is not None:
            g = g * clip_coef
        if maximize:
            g = -g
        pv = masters[i].clone() if masters else p.to(f32)
        if weight_decay != 0:
            if decoupled:
                pv = pv * (1 - lr_d.to(torch.float64) * weight_decay).to(f32)
            else:
                g = g + weight_decay * pv
        step = steps[i].to(torch.float64)
        bc1 = 1 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=dev), step)
        bc2_sqrt = torch.sqrt(1 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=dev),
                                            step)).to(f32)
        step_size = (lr_d.to(torch.float64) / bc1).to(f32)
        m = beta1 * exp_avgs[i].to(f32) + (1 - beta1) * g
        v = beta2 * exp_avg_sqs[i].to(f32) + (1 - beta2) * g * g
        vd = v
        if amsgrad:
            vd = torch.maximum(max_exp_avg_sqs[i].to(f32), v)
        pv = pv - step_size * m / (torch.sqrt(vd) / bc2_sqrt + eps)
        skip = None if found_inf is None else found_inf.to(dev) != 0

        def put(dst, val):
            val = val.to(dst.dtype)
            dst.copy_(val if skip is None else torch.where(skip, dst, val))

        put(exp_avgs[i], m)
        put(exp_avg_sqs[i], v)
        if amsgrad:
            put(max_exp_avg_sqs[i], vd)
        if masters:
            put(masters[i], pv)
        put(p, pv)


def reference_sum_of_squares(tensors):
    """Sum of squares of every element, float32 (accumulated in float64)."""
    dev = tensors[0].device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for t in tensors:
        total = total + t.to(torch.float64).square().sum()
    return total.to(torch.float32)


# ---------------------------------------------------------------------------------------------
# Fake kernels for the C++ ops (csrc/fastlm.cpp).
if hasattr(torch.ops.fastlm, "adam_step_"):

    @torch.library.register_fake("fastlm::adam_step_")
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr, lr_tensor,
          beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf,
          clip_coef):
        return None

    @torch.library.register_fake("fastlm::sum_of_squares")
    def _(tensors):
        return tensors[0].new_empty((), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Triton op, defined on first use (see ops/_common.py).
def _register_triton_ops():
    from torch.library import triton_op

    from ..kernels import adam as tk

    @triton_op("fastlm::adam_step_triton_",
               mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "masters"))
    def adam_step_triton_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          exp_avg_sqs: list[Tensor], max_exp_avg_sqs: list[Tensor],
                          masters: list[Tensor], steps: list[Tensor], lr: float,
                          lr_tensor: Optional[Tensor], beta1: float, beta2: float, eps: float,
                          weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                          grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
                          clip_coef: Optional[Tensor]) -> None:
        tk.adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, lr,
                      lr_tensor, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                      grad_scale, found_inf, clip_coef)

    @triton_op("fastlm::sum_of_squares_triton", mutates_args=())
    def sum_of_squares_triton(tensors: list[Tensor]) -> Tensor:
        return tk.sum_of_squares(tensors)


triton_ops_ready = lazy_triton_ops(_register_triton_ops)


# ---------------------------------------------------------------------------------------------
# Public functions.
def _scalar(t, name, device):
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.numel() != 1:
        raise ValueError(f"fastlm.adam_step_: {name} must be a one-element tensor or None")
    return t.to(device=device, dtype=torch.float32, non_blocking=True).reshape(())


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, *, lr,
               beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None,
               found_inf=None, clip_coef=None):
    """One fused Adam (decoupled=False) or AdamW (decoupled=True) step, in place, over lists of
    tensors on one device with params of one dtype. `lr` is a float or a one-element tensor."""
    if not params:
        return
    dev = params[0].device
    name = backends.select("fastlm.adam_step_", dev, params[0].dtype, KERNEL_DTYPES)
    lr_tensor = _scalar(lr, "lr", dev) if isinstance(lr, Tensor) else None
    lr_f = 0.0 if lr_tensor is not None else float(lr)
    args = (list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(masters), list(steps), lr_f, lr_tensor, float(beta1), float(beta2), float(eps),
            float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
            _scalar(grad_scale, "grad_scale", dev), _scalar(found_inf, "found_inf", dev),
            _scalar(clip_coef, "clip_coef", dev))
    if name == "torch":
        reference_adam_step_(*args)
    elif name == "triton":
        triton_ops_ready()
        torch.ops.fastlm.adam_step_triton_(*args)
    else:
        torch.ops.fastlm.adam_step_(*args)


def sum_of_squares(tensors):
    """Sum of the squares of all elements of `tensors` (one device), a float32 scalar tensor."""
    if not tensors:
        raise ValueError("fastlm.sum_of_squares: tensors must not be empty")
    t0 = tensors[0]
    name = backends.select("fastlm.sum_of_squares", t0.device, t0.dtype, KERNEL_DTYPES)
    if name == "torch":
        return reference_sum_of_squares(tensors)
    tensors = [t.contiguous() for t in tensors]
    if name == "triton":
        triton_ops_ready()
        return torch.ops.fastlm.sum_of_squares_triton(tensors)
    return torch.ops.fastlm.sum_of_squares(tensors)

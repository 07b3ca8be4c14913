"""Fused linear + cross-entropy benchmark: fastlm.linear_cross_entropy (chunked, gradients made
in the forward), torch eager (F.linear then F.cross_entropy on the float32 logits, as
transformers' loss does), torch.compile of that, and Liger-Kernel's fused linear cross-entropy.

Shapes (N tokens, C hidden, V vocabulary): a Llama-3 8B head on the GPU (V = 128256). One in
eight targets is ignore_index. Directions: forward (the loss) and forward+backward (loss and the
gradients of input and weight); fastlm's backward alone is two scalings, so it is not a row.
FLOPs: 2·N·C·V forward, 6·N·C·V forward+backward. Peak memory is the case's point: torch holds
the (N, V) logits in the compute dtype and in float32.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled


def make_inputs(shape, device):
    n, c, v = shape["N"], shape["C"], shape["V"]
    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, c, generator=g, device=device).to(dtype)
    w = (torch.randn(v, c, generator=g, device=device) / c ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    t[::8] = -100
    return {"h": h, "w": w, "t": t, "dl": torch.ones((), device=device)}


def _torch_loss(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


def _fastlm_loss(h, w, t):
    from ..ops.cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, t)


def oracle(inputs, direction):
    """Float64 (CPU) or float32 (GPU) loss and gradients, a chunk of rows at a time."""
    h, w, t = inputs["h"], inputs["w"], inputs["t"]
    ct = torch.float64 if h.device.type == "cpu" else torch.float32
    h, w = h.to(ct).requires_grad_(), w.to(ct).requires_grad_()
    loss = _fastlm_loss(h, w, t)
    if direction == "forward":
        return (loss.detach(),)
    return torch.autograd.grad(loss, (h, w))


def _impl(fn):
    def prepare(inputs, direction):
        args = (inputs["h"], inputs["w"], inputs["t"])
        return autograd_prepare(fn(), args, (0, 1), (inputs["dl"],), direction)

    return prepare


def _liger_fn():
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction,
    )

    return lambda h, w, t: LigerFusedLinearCrossEntropyFunction.apply(h, w, t)


def _flops(shape, direction):
    mm = 2 * shape["N"] * shape["C"] * shape["V"]
    return mm if direction == "forward" else 3 * mm


def _s(n, c, v, dtype):
    return {"N": n, "C": c, "V": v, "dtype": dtype}


SHAPES = {
    "cuda": {"full": [_s(8192, 4096, 128256, "bfloat16"), _s(16384, 2048, 32000, "bfloat16")],
             "quick": [_s(4096, 2048, 32000, "bfloat16")],
             "headline": [_s(8192, 4096, 128256, "bfloat16")],
             "tiny": [_s(32, 16, 64, "bfloat16")]},
    "cpu": {"full": [_s(1024, 256, 8192, "float32"), _s(2048, 512, 32000, "float32")],
            "quick": [_s(1024, 256, 8192, "float32")],
            "headline": [_s(32, 16, 64, "float32")],
            "tiny": [_s(32, 16, 64, "float32")]},
}

CASE = register(Case(
    op="linear_cross_entropy",
    shapes=SHAPES,
    make_inputs=make_inputs,
    impls=(
        Impl("fastlm", "fastlm", _impl(lambda: _fastlm_loss)),
        Impl("torch", "torch", _impl(lambda: _torch_loss)),
        Impl("torch-compile", "peer", _impl(lambda: compiled(_torch_loss)), module="torch",
             install="torch", quick_devices=("cuda",)),
        Impl("liger", "peer", _impl(_liger_fn), module="liger_kernel", install="liger-kernel",
             devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("loss",), "backward": ("dinput", "dweight")},
    flops=_flops,
    directions=("forward", "forward+backward"),
    x_axis="V",
))

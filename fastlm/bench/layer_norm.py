"""LayerNorm benchmark: fastlm's kernels (timed through the raw ops), torch eager, torch.compile
of F.layer_norm, and Liger-Kernel.

Forward, backward and the two together are timed; a backward runs the backward op alone on the
statistics saved by an untimed forward. Bytes: forward 2·M·N·size (read x, write y), backward
3·M·N·size (read x and dy, write dx); weight, bias and the statistics are small.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled, matrix_bytes, row_shapes, seeded_randn

EPS = 1e-5


def make_inputs(shape, device):
    """x, weight, bias and the upstream gradient dy, seeded, in the shape's dtype."""
    m, n = shape["M"], shape["N"]
    randn = seeded_randn(shape, device)
    return {"x": randn(m, n), "w": randn(n, scale=0.1, shift=1.0), "b": randn(n, scale=0.1),
            "dy": randn(m, n), "eps": EPS}


def oracle(inputs, direction):
    """F.layer_norm (and its autograd backward) in float32, or in float64 when the inputs are
    already float32, so the reference is always more precise than what it checks."""
    x = inputs["x"]
    ct = torch.float64 if x.dtype == torch.float32 else torch.float32
    x, w, b, dy = (inputs[k].to(ct) for k in ("x", "w", "b", "dy"))
    if direction == "forward":
        return (F.layer_norm(x, x.shape[-1:], w, b, inputs["eps"]),)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    y = F.layer_norm(x, x.shape[-1:], w, b, inputs["eps"])
    return torch.autograd.grad(y, (x, w, b), dy)


def _raw_ops(backend):
    if backend == "triton":
        from ..ops.layer_norm import triton_ops_ready

        triton_ops_ready()
        return torch.ops.fastlm.layer_norm_fwd_triton, torch.ops.fastlm.layer_norm_bwd_triton
    return torch.ops.fastlm.layer_norm_fwd, torch.ops.fastlm.layer_norm_bwd


def _fastlm(backend):
    def prepare(inputs, direction):
        fwd, bwd = _raw_ops(backend)
        x, w, b, dy, eps = (inputs[k] for k in ("x", "w", "b", "dy", "eps"))
        if direction == "forward":
            return lambda: fwd(x, w, b, eps)[:1]
        if direction == "forward+backward":
            def both():
                y, mean, rstd = fwd(x, w, b, eps)
                return (y, *bwd(dy, x, mean, rstd, w, b, True, True))
            return both
        _, mean, rstd = fwd(x, w, b, eps)
        return lambda: bwd(dy, x, mean, rstd, w, b, True, True)

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend)


def _torch(inputs, direction):
    x, w, b, dy, eps = (inputs[k] for k in ("x", "w", "b", "dy", "eps"))
    ns = [x.shape[-1]]
    if direction == "forward":
        return lambda: (F.layer_norm(x, ns, w, b, eps),)
    mask = [True, True, True]
    if direction == "forward+backward":
        def both():
            y, mean, rstd = torch.ops.aten.native_layer_norm(x, ns, w, b, eps)
            return (y, *torch.ops.aten.native_layer_norm_backward(dy, x, ns, mean, rstd, w, b,
                                                                  mask))
        return both
    _, mean, rstd = torch.ops.aten.native_layer_norm(x, ns, w, b, eps)
    return lambda: torch.ops.aten.native_layer_norm_backward(dy, x, ns, mean, rstd, w, b, mask)


def _layer_norm(x, w, b, eps):
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def _torch_compile(inputs, direction):
    x, w, b, dy, eps = (inputs[k] for k in ("x", "w", "b", "dy", "eps"))
    return autograd_prepare(compiled(_layer_norm), (x, w, b, eps), (0, 1, 2), (dy,), direction)


def _liger(inputs, direction):
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    x, w, b, dy, eps = (inputs[k] for k in ("x", "w", "b", "dy", "eps"))
    return autograd_prepare(LigerLayerNormFunction.apply, (x, w, b, eps), (0, 1, 2), (dy,),
                            direction)


def _bytes(shape, direction):
    return (2 if direction == "forward" else 3) * matrix_bytes(shape)


CASE = register(Case(
    op="layer_norm",
    shapes=row_shapes(),
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _torch),
        Impl("torch-compile", "peer", _torch_compile, module="torch", install="torch",
             quick_devices=("cuda",)),
        Impl("liger", "peer", _liger, module="liger_kernel", install="liger-kernel",
             devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("y",), "backward": ("dx", "dw", "db")},
    bytes=_bytes,
    notes={"bytes": "forward 2*M*N*size, backward 3*M*N*size, forward+backward their sum"},
))

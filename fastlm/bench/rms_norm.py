"""RMSNorm benchmark: fastlm's kernels (timed through the raw ops, as layer_norm's), torch
eager (F.rms_norm and its autograd backward), torch.compile of it, and Liger-Kernel's RMSNorm.

Bytes: forward 2·M·N·size (read x, write y), backward 3·M·N·size (read x and dy, write dx);
the weight and rstd are small.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled, matrix_bytes, row_shapes, seeded_randn

EPS = 1e-6


def make_inputs(shape, device):
    m, n = shape["M"], shape["N"]
    randn = seeded_randn(shape, device)
    return {"x": randn(m, n), "w": randn(n, scale=0.1, shift=1.0), "dy": randn(m, n),
            "eps": EPS}


def _rms_norm(x, w, eps):
    return F.rms_norm(x, x.shape[-1:], w, eps)


def oracle(inputs, direction):
    """F.rms_norm in float64 (float32 for 16-bit inputs) and its autograd backward."""
    x = inputs["x"]
    ct = torch.float64 if x.dtype == torch.float32 else torch.float32
    x, w, dy = (inputs[k].to(ct) for k in ("x", "w", "dy"))
    if direction == "forward":
        return (_rms_norm(x, w, inputs["eps"]),)
    x, w = x.requires_grad_(), w.requires_grad_()
    return torch.autograd.grad(_rms_norm(x, w, inputs["eps"]), (x, w), dy)


def _raw_ops(backend):
    if backend == "triton":
        from ..ops.rms_norm import triton_ops_ready

        triton_ops_ready()
        return torch.ops.fastlm.rms_norm_fwd_triton, torch.ops.fastlm.rms_norm_bwd_triton
    return torch.ops.fastlm.rms_norm_fwd, torch.ops.fastlm.rms_norm_bwd


def _fastlm(backend):
    def prepare(inputs, direction):
        fwd, bwd = _raw_ops(backend)
        x, w, dy, eps = (inputs[k] for k in ("x", "w", "dy", "eps"))
        if direction == "forward":
            return lambda: fwd(x, w, eps)[:1]
        if direction == "forward+backward":
            def both():
                y, rstd = fwd(x, w, eps)
                return (y, *bwd(dy, x, rstd, w, True))
            return both
        _, rstd = fwd(x, w, eps)
        return lambda: bwd(dy, x, rstd, w, True)

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend,
                cpp_op=None if backend == "triton" else "fastlm::rms_norm_fwd")


def _autograd(fn):
    def prepare(inputs, direction):
        x, w, dy, eps = (inputs[k] for k in ("x", "w", "dy", "eps"))
        return autograd_prepare(fn(), (x, w, eps), (0, 1), (dy,), direction)

    return prepare


def _liger_fn():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)


def _bytes(shape, direction):
    return (2 if direction == "forward" else 3) * matrix_bytes(shape)


CASE = register(Case(
    op="rms_norm",
    shapes=row_shapes(),
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _autograd(lambda: _rms_norm)),
        Impl("torch-compile", "peer", _autograd(lambda: compiled(_rms_norm)), module="torch",
             install="torch", quick_devices=("cuda",)),
        Impl("liger", "peer", _autograd(_liger_fn), module="liger_kernel",
             install="liger-kernel", devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("y",), "backward": ("dx", "dw")},
    bytes=_bytes,
    notes={"bytes": "forward 2*M*N*size, backward 3*M*N*size, forward+backward their sum"},
))

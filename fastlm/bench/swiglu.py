"""SwiGLU benchmark: fastlm.swiglu's kernels (timed through the raw ops), torch eager
(F.silu(gate) * up and its autograd backward), torch.compile of it, and Liger-Kernel's SwiGLU.

Shapes (M tokens, N intermediate features): Llama-3 8B's MLP (N = 14336) on the GPU. Bytes:
forward 3·M·N·size (read gate and up, write out), backward 5·M·N·size (read dy, gate, up; write
both gradients).
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled, matrix_bytes, row_profiles, seeded_randn

SILU = 0  # csrc/glu.h


def make_inputs(shape, device):
    m, n = shape["M"], shape["N"]
    randn = seeded_randn(shape, device)
    return {"gate": randn(m, n, scale=2.0), "up": randn(m, n), "dy": randn(m, n)}


def _swiglu(gate, up):
    return F.silu(gate) * up


def oracle(inputs, direction):
    ct = torch.float64 if inputs["gate"].dtype == torch.float32 else torch.float32
    g, u, dy = (inputs[k].to(ct) for k in ("gate", "up", "dy"))
    if direction == "forward":
        return (_swiglu(g, u),)
    g, u = g.requires_grad_(), u.requires_grad_()
    return torch.autograd.grad(_swiglu(g, u), (g, u), dy)


def _fastlm(backend):
    def prepare(inputs, direction):
        if backend == "triton":
            from ..ops.glu import triton_ops_ready

            triton_ops_ready()
            fwd, bwd = torch.ops.fastlm.glu_fwd_triton, torch.ops.fastlm.glu_bwd_triton
        else:
            fwd, bwd = torch.ops.fastlm.glu_fwd, torch.ops.fastlm.glu_bwd
        g, u, dy = inputs["gate"], inputs["up"], inputs["dy"]
        if direction == "forward":
            return lambda: (fwd(g, u, SILU),)
        if direction == "forward+backward":
            return lambda: (fwd(g, u, SILU), *bwd(dy, g, u, SILU))
        return lambda: bwd(dy, g, u, SILU)

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend,
                cpp_op=None if backend == "triton" else "fastlm::glu_fwd")


def _autograd(fn):
    def prepare(inputs, direction):
        return autograd_prepare(fn(), (inputs["gate"], inputs["up"]), (0, 1), (inputs["dy"],),
                                direction)

    return prepare


def _liger_fn():
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply


def _bytes(shape, direction):
    return (3 if direction == "forward" else 5) * matrix_bytes(shape)


def _s(m, ns, dtype):
    return [{"M": m, "N": n, "dtype": dtype} for n in ns]


CASE = register(Case(
    op="swiglu",
    shapes=row_profiles(_s(8192, (4096, 8192, 14336), "bfloat16"), _s(2048, (1024, 2816), "float32"),
                        _s(8192, (14336,), "bfloat16"), _s(2048, (2816,), "float32")),
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _autograd(lambda: _swiglu)),
        Impl("torch-compile", "peer", _autograd(lambda: compiled(_swiglu)), module="torch",
             install="torch", quick_devices=("cuda",)),
        Impl("liger", "peer", _autograd(_liger_fn), module="liger_kernel",
             install="liger-kernel", devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("out",), "backward": ("dgate", "dup")},
    bytes=_bytes,
    notes={"bytes": "forward 3*M*N*size, backward 5*M*N*size"},
))

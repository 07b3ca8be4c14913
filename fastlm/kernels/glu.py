"""Gated linear units in Triton: out = act(gate) * up and its backward (docs/glu.md).

Shipped as fastlm.kernels.glu. No autograd here: fastlm/ops/glu.py wraps `forward` and
`backward` in torch.library.triton_op and ties them together.

One program per BLOCK elements of the flattened (contiguous) tensors. Activations, in float32:
    silu:       a = g * s,  s = sigmoid(g);        a' = s * (1 + g * (1 - s))
    gelu tanh:  a = g/2 * (1 + t),  t = tanh(k0 * (g + k1 g^3));
                a' = (1 + t)/2 + g/2 * (1 - t^2) * k0 * (1 + 3 k1 g^2)
    gelu erf:   a = g/2 * (1 + erf(g / sqrt 2));   a' = (1 + erf(g / sqrt 2))/2 + g * phi(g)
Backward (recomputing a, never stored):  grad_gate = dy * up * a',  grad_up = dy * a.
"""

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK = 1024
SILU, GELU_TANH, GELU_ERF = 0, 1, 2  # the activation codes of csrc/glu.h


@triton.jit
def _act(g, ACT: tl.constexpr):
    # (a, a') for float32 g.
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        k0 = 0.7978845608028654  # sqrt(2 / pi)
        g2 = g * g
        t = 1.0 - 2.0 / (1.0 + tl.exp(2.0 * k0 * g * (1.0 + 0.044715 * g2)))  # tanh
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k0 * (1.0 + 3.0 * 0.044715 * g2)
    else:
        e = tl.math.erf(g * 0.7071067811865476)
        a = 0.5 * g * (1.0 + e)
        da = 0.5 * (1.0 + e) + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return a, da


@triton.jit
def _glu_fwd(
    G,  # gate, n elements, contiguous
    U,  # up, as G
    O,  # out = act(gate) * up, as G
    n,  # elements
    ACT: tl.constexpr,  # 0 silu, 1 gelu tanh, 2 gelu erf
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(G + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=m, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    tl.store(O + i, (a * u).to(O.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd(
    DY,  # grad of out
    G,  # gate
    U,  # up
    DG,  # grad of gate = dy * up * act'(gate)
    DU,  # grad of up = dy * act(gate)
    n,  # elements
    ACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    dy = tl.load(DY + i, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + i, mask=m, other=0.0).to(tl.float32)
    a, da = _act(g, ACT)
    tl.store(DG + i, (dy * u * da).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + i, (dy * a).to(DU.dtype.element_ty), mask=m)


def forward(gate, up, act):
    """act(gate) * up for same-shaped gate and up (act: SILU, GELU_TANH or GELU_ERF)."""
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n:
        wrap_triton(_glu_fwd)[(triton.cdiv(n, BLOCK),)](g, u, out, n, ACT=act, BLOCK=BLOCK,
                                                        num_warps=4)
    return out


def backward(grad_out, gate, up, act):
    """(grad_gate, grad_up) of `forward`."""
    dy, g, u = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    dg, du = torch.empty_like(g), torch.empty_like(g)
    n = g.numel()
    if n:
        wrap_triton(_glu_bwd)[(triton.cdiv(n, BLOCK),)](dy, g, u, dg, du, n, ACT=act,
                                                        BLOCK=BLOCK, num_warps=4)
    return dg, du

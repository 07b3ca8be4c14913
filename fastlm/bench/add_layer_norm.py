"""Fused residual add + dropout + LayerNorm benchmark: fastlm's kernels (timed through the raw
ops), torch eager (`r + F.dropout(x)` then F.layer_norm) and the same under torch.compile.

Dropout p = 0.1 (as torch.nn.TransformerEncoderLayer's default). Forward returns (out, summed);
a backward runs the backward op alone (grad_out and grad_summed given, as in a pre-norm block)
on the statistics of an untimed forward. Bytes: forward 4·M·N·size (read x and r, write out
and summed), backward 4·M·N·size (read dy, grad_summed and summed, write one gradient: the
input's and the residual's are one tensor without dropout; with dropout the second write,
grad_input, adds M·N·size, not counted); weight, bias and the statistics are small.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import matrix_bytes, row_shapes, seeded_randn

EPS = 1e-5
P = 0.1


def make_inputs(shape, device):
    m, n = shape["M"], shape["N"]
    randn = seeded_randn(shape, device)
    return {"x": randn(m, n), "r": randn(m, n), "w": randn(n, scale=0.1, shift=1.0),
            "b": randn(n, scale=0.1), "dy": randn(m, n), "ds": randn(m, n), "eps": EPS,
            "p": P}


def oracle(inputs, direction):
    """The outputs' magnitudes only: dropout masks differ between fastlm and torch, so the
    error column compares against the p = 0 composition in float64 (forward: out of the
    sum without dropout is not comparable; we return the layer_norm of r + x and the sum)."""
    x, r, w, b = (inputs[k].double() for k in ("x", "r", "w", "b"))
    s = r + x
    if direction == "forward":
        return F.layer_norm(s, s.shape[-1:], w, b, inputs["eps"]), s
    s = s.requires_grad_()
    w = w.requires_grad_()
    b = b.requires_grad_()
    y = F.layer_norm(s, s.shape[-1:], w, b, inputs["eps"])
    ds, dw, db = torch.autograd.grad(y, (s, w, b), inputs["dy"].double())
    return ds + inputs["ds"].double(), dw, db


def _raw_ops(backend):
    if backend == "triton":
        from ..ops.add_layer_norm import triton_ops_ready

        triton_ops_ready()
        return (torch.ops.fastlm.add_layer_norm_fwd_triton,
                torch.ops.fastlm.add_layer_norm_bwd_triton)
    return torch.ops.fastlm.add_layer_norm_fwd, torch.ops.fastlm.add_layer_norm_bwd


def _fastlm(backend):
    def prepare(inputs, direction):
        from ..ops.attention import _new_rng

        fwd, bwd = _raw_ops(backend)
        x, r, w, b, dy, ds, eps, p = (inputs[k] for k in ("x", "r", "w", "b", "dy", "ds", "eps",
                                                           "p"))
        rng = _new_rng(x.device)
        if direction == "forward":
            return lambda: fwd(x, r, w, b, rng, p, eps)[:2]
        _, s, mean, rstd = fwd(x, r, w, b, rng, p, eps)
        return lambda: _pick(bwd(dy, ds, s, mean, rstd, w, b, rng, p, True, True, True))

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend,
                cpp_op=None if backend == "triton" else "fastlm::add_layer_norm_fwd")


def _pick(grads):
    dres, _din, dw, db = grads
    return dres, dw, db


def _composition(x, r, w, b, eps, p):
    s = r + F.dropout(x, p=p, training=True)
    return F.layer_norm(s, s.shape[-1:], w, b, eps), s


_compiled = {}


def _torch_impl(compiled):
    def prepare(inputs, direction):
        fn = _composition
        if compiled:
            fn = _compiled.setdefault("fn", torch.compile(_composition))
        x, r, w, b, dy, ds, eps, p = (inputs[k] for k in ("x", "r", "w", "b", "dy", "ds", "eps",
                                                           "p"))
        if direction == "forward":
            return lambda: fn(x, r, w, b, eps, p)
        leaves = [t.detach().requires_grad_() for t in (x, r, w, b)]
        out, s = fn(*leaves, eps, p)
        return lambda: _pick_t(torch.autograd.grad((out, s), leaves, (dy, ds),
                                                    retain_graph=True))

    return prepare


def _pick_t(grads):
    _dx, dr, dw, db = grads
    return dr, dw, db


def _bytes(shape, direction):
    return 4 * matrix_bytes(shape)


CASE = register(Case(
    op="add_layer_norm",
    shapes=row_shapes(),
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _torch_impl(False)),
        Impl("torch-compile", "peer", _torch_impl(True), module="torch", install="torch"),
    ),
    oracle=oracle,
    outputs={"forward": ("out", "summed"), "backward": ("dresidual", "dw", "db")},
    bytes=_bytes,
    notes={"bytes": "forward 4*M*N*size (x, r in; out, summed out), backward 4*M*N*size "
                    "(dy, grad_summed, summed in; grad_residual out; grad_input not counted)",
           "dropout_p": P,
           "error": "vs the p = 0 composition: with dropout the outputs differ by design"},
))

"""Fused residual add + dropout + LayerNorm benchmark: fastlm's kernels (timed through the raw
ops), torch eager (`r + F.dropout(x)` then F.layer_norm) and the same under torch.compile.

Dropout p = 0.1 (as torch.nn.TransformerEncoderLayer's default). Forward returns (out, summed);
a backward runs the backward op alone (grad_out and grad_summed given, as in a pre-norm block)
on the statistics of an untimed forward. Bytes: forward 4·M·N·size (read x and r, write out
and summed), backward 5·M·N·size with dropout (read dy, grad_summed and summed, write the
residual's gradient and the input's, which differs from it by the dropout mask; 4·M·N·size
without dropout, where they are one tensor); weight, bias and the statistics are small.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled, matrix_bytes, row_shapes, seeded_randn

EPS = 1e-5
P = 0.1


def make_inputs(shape, device):
    m, n = shape["M"], shape["N"]
    randn = seeded_randn(shape, device)
    # One fixed (seed, offset) for the dropout bits: fastlm's rows and the oracle drop the same
    # elements, so the error column compares like with like.
    rng = torch.tensor([0x5EED_0F_FA57, 0], dtype=torch.int64, device=device)
    return {"x": randn(m, n), "r": randn(m, n), "w": randn(n, scale=0.1, shift=1.0),
            "b": randn(n, scale=0.1), "dy": randn(m, n), "ds": randn(m, n), "eps": EPS,
            "p": P, "rng": rng}


def oracle(inputs, direction):
    """fastlm's reference (the op's definition, docs/layer_norm.md) in float64 with the same
    dropout bits as fastlm's rows: forward (out, summed); backward the gradients of the
    residual (= of summed), the weight and the bias for the upstream (dy, ds)."""
    from ..ops.add_layer_norm import reference

    x, r, w, b = (inputs[k].double() for k in ("x", "r", "w", "b"))
    eps, p, rng = inputs["eps"], inputs["p"], inputs["rng"]
    if direction == "forward":
        return reference(x, r, x.shape[-1:], w, b, eps, p, rng)
    r, w, b = (t.requires_grad_() for t in (r, w, b))
    out, s = reference(x, r, x.shape[-1:], w, b, eps, p, rng)
    return torch.autograd.grad((out, s), (r, w, b), (inputs["dy"].double(),
                                                     inputs["ds"].double()))


def _raw_ops(backend):
    if backend == "triton":
        from ..ops.add_layer_norm import triton_ops_ready

        triton_ops_ready()
        return (torch.ops.fastlm.add_layer_norm_fwd_triton,
                torch.ops.fastlm.add_layer_norm_bwd_triton)
    return torch.ops.fastlm.add_layer_norm_fwd, torch.ops.fastlm.add_layer_norm_bwd


def _fastlm(backend):
    def prepare(inputs, direction):
        fwd, bwd = _raw_ops(backend)
        x, r, w, b, dy, ds, eps, p, rng = (inputs[k] for k in ("x", "r", "w", "b", "dy", "ds",
                                                                "eps", "p", "rng"))
        if direction == "forward":
            return lambda: fwd(x, r, w, b, rng, p, eps)[:2]
        if direction == "forward+backward":
            def both():
                out, s, mean, rstd = fwd(x, r, w, b, rng, p, eps)
                return (out, s, *_pick(bwd(dy, ds, s, mean, rstd, w, b, rng, p, True, True,
                                           True)))
            return both
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


def _torch_impl(compile_it):
    def prepare(inputs, direction):
        fn = compiled(_composition) if compile_it else _composition
        x, r, w, b, dy, ds, eps, p = (inputs[k] for k in ("x", "r", "w", "b", "dy", "ds", "eps",
                                                           "p"))
        return autograd_prepare(fn, (x, r, w, b, eps, p), (0, 1, 2, 3), (dy, ds), direction,
                                pick=_pick_t)

    return prepare


def _pick_t(grads):
    _dx, dr, dw, db = grads
    return dr, dw, db


# torch's dropout draws its own mask: its outputs differ from the oracle's by design.
_NA = "n/a (dropout): torch draws its own random mask, so its outputs cannot be compared " \
      "elementwise with the oracle (fastlm's rows use the oracle's Philox bits)"


def _bytes(shape, direction):
    return (4 if direction == "forward" or P == 0 else 5) * matrix_bytes(shape)


CASE = register(Case(
    op="add_layer_norm",
    shapes=row_shapes(),
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _torch_impl(False), error_na=_NA),
        Impl("torch-compile", "peer", _torch_impl(True), module="torch", install="torch",
             error_na=_NA, quick_devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("out", "summed"), "backward": ("dresidual", "dw", "db")},
    bytes=_bytes,
    notes={"bytes": "forward 4*M*N*size (x, r in; out, summed out), backward 5*M*N*size "
                    "(dy, grad_summed, summed in; grad_residual, grad_input out)",
           "dropout_p": P,
           "error": "vs fastlm's float64 reference with the same dropout bits; torch's rows: "
                    "n/a (own dropout mask)"},
))

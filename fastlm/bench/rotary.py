"""Rotary-embedding benchmark: fastlm.apply_rotary_emb's kernels (raw ops; q and k in one
launch), torch eager (transformers' apply_rotary_pos_emb formula and its autograd backward),
torch.compile of it, and Liger-Kernel's rope.

q and k are laid out as transformers makes them: (B, S, H, D) projections seen as (B, H, S, D);
cos and sin (B, S, D) in the inputs' dtype. Bytes per direction: read q and k, write them
(2·(Hq + Hk)·B·S·D·size); cos and sin are counted once (2·B·S·D·size).
"""

import torch

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled, seeded_randn


def make_inputs(shape, device):
    b, s, hq, hk, d = (shape[k] for k in ("B", "S", "Hq", "Hk", "D"))
    randn = seeded_randn(shape, device)
    q = randn(b, s, hq, d).transpose(1, 2)
    k = randn(b, s, hk, d).transpose(1, 2)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    freqs = torch.arange(s, device=device, dtype=torch.float32)[:, None] * inv
    emb = torch.cat((freqs, freqs), dim=-1).expand(b, s, d)
    dt = q.dtype
    return {"q": q, "k": k, "cos": emb.cos().to(dt).contiguous(),
            "sin": emb.sin().to(dt).contiguous(), "dq": randn(b, hq, s, d),
            "dk": randn(b, hk, s, d)}


def _rope(q, k, cos, sin):
    from ..ops.rotary import rotate

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * c + rotate(q) * s, k * c + rotate(k) * s


def oracle(inputs, direction):
    ct = torch.float64 if inputs["q"].dtype == torch.float32 else torch.float32
    q, k, c, s, dq, dk = (inputs[n].to(ct) for n in ("q", "k", "cos", "sin", "dq", "dk"))
    if direction == "forward":
        return _rope(q, k, c, s)
    q, k = q.requires_grad_(), k.requires_grad_()
    return torch.autograd.grad(_rope(q, k, c, s), (q, k), (dq, dk))


def _fastlm(backend):
    def prepare(inputs, direction):
        if backend == "triton":
            from ..ops.rotary import triton_ops_ready

            triton_ops_ready()
            fwd, bwd = torch.ops.fastlm.rotary_fwd_triton, torch.ops.fastlm.rotary_bwd_triton
        else:
            fwd, bwd = torch.ops.fastlm.rotary_fwd, torch.ops.fastlm.rotary_bwd
        q, k, c, s, dq, dk = (inputs[n] for n in ("q", "k", "cos", "sin", "dq", "dk"))
        if direction == "forward":
            return lambda: fwd(q, k, c, s, False)
        if direction == "forward+backward":
            return lambda: (*fwd(q, k, c, s, False), *bwd(dq, dk, c, s, False))
        return lambda: bwd(dq, dk, c, s, False)

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend,
                cpp_op=None if backend == "triton" else "fastlm::rotary_fwd")


def _autograd(fn):
    def prepare(inputs, direction):
        args = tuple(inputs[n] for n in ("q", "k", "cos", "sin"))
        return autograd_prepare(fn(), args, (0, 1), (inputs["dq"], inputs["dk"]), direction)

    return prepare


def _liger_fn():
    from liger_kernel.ops.rope import LigerRopeFunction

    return lambda q, k, c, s: LigerRopeFunction.apply(q, k, c, s)


def _bytes(shape, direction):
    b, s, hq, hk, d = (shape[k] for k in ("B", "S", "Hq", "Hk", "D"))
    size = torch.empty((), dtype=getattr(torch, shape["dtype"])).element_size()
    return (2 * (hq + hk) + 2) * b * s * d * size


def _s(b, s, hq, hk, d, dtype):
    return {"B": b, "S": s, "Hq": hq, "Hk": hk, "D": d, "dtype": dtype}


SHAPES = {
    "cuda": {"full": [_s(4, 4096, 32, 8, 128, "bfloat16"), _s(8, 2048, 16, 16, 64, "bfloat16")],
             "quick": [_s(4, 4096, 32, 8, 128, "bfloat16")],
             "headline": [_s(4, 4096, 32, 8, 128, "bfloat16")],
             "tiny": [_s(1, 16, 2, 1, 8, "bfloat16")]},
    "cpu": {"full": [_s(2, 1024, 8, 2, 64, "float32"), _s(1, 2048, 16, 4, 128, "float32")],
            "quick": [_s(2, 1024, 8, 2, 64, "float32")],
            "headline": [_s(1, 16, 2, 1, 8, "float32")],
            "tiny": [_s(1, 16, 2, 1, 8, "float32")]},
}

CASE = register(Case(
    op="rotary",
    shapes=SHAPES,
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _autograd(lambda: _rope)),
        Impl("torch-compile", "peer", _autograd(lambda: compiled(_rope)), module="torch",
             install="torch", quick_devices=("cuda",)),
        Impl("liger", "peer", _autograd(_liger_fn), module="liger_kernel",
             install="liger-kernel", devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("q_out", "k_out"), "backward": ("dq", "dk")},
    bytes=_bytes,
    x_axis="S",
    notes={"bytes": "2*(Hq+Hk)*B*S*D*size (q, k in and out) + 2*B*S*D*size (cos, sin)"},
))

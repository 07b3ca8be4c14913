"""Attention benchmark: fastlm's kernels (timed through the raw forward and backward ops)
against torch's scaled_dot_product_attention -- its default choice (the reference row) and
each of its backends (flash = FlashAttention-2, cuDNN, memory-efficient) -- and flash-attn
when installed.

GPU shapes are the FlashAttention-3 paper grid: B·S = 16384 tokens, H·D = 2048, S from 512
to 16384, D 64 and 128, causal and not, bfloat16. CPU: B4 H8 S1024 D64 float32, the issue's
CPU goal. FLOPs (../shared/ANCHORS.md): forward 4·B·H·S²·D, halved when causal; backward 2.5x
the forward. A backward row times the backward alone, after an untimed forward.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register


def _gpu_grid(ds, ss):
    return [{"B": 16384 // s, "H": 2048 // d, "S": s, "D": d, "causal": c, "dtype": "bfloat16"}
            for d in ds for c in (False, True) for s in ss]


def make_inputs(shape, device):
    """q, k, v (B, H, S, D) and the upstream gradient, seeded, in the shape's dtype."""
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)

    def randn():
        return torch.randn(b, h, s, d, generator=g, device=device).to(dtype)

    return {"q": randn(), "k": randn(), "v": randn(), "do": randn(), "causal": shape["causal"]}


def oracle(inputs, direction):
    """torch SDPA in a higher precision than the inputs: float64 math on the CPU, float32 on a
    GPU (its memory-efficient kernel; a float64 S x S matrix would not fit at S = 16384)."""
    q = inputs["q"]
    ct = torch.float64 if q.device.type == "cpu" else torch.float32
    q, k, v, do = (inputs[n].to(ct).requires_grad_(n != "do") for n in ("q", "k", "v", "do"))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=inputs["causal"])
    if direction == "forward":
        return (out.detach(),)
    return torch.autograd.grad(out, (q, k, v), do)


def _raw_ops(backend):
    if backend == "triton":
        from ..ops.attention import triton_ops_ready

        triton_ops_ready()
        return torch.ops.fastlm.attention_fwd_triton, torch.ops.fastlm.attention_bwd_triton
    return torch.ops.fastlm.attention_fwd, torch.ops.fastlm.attention_bwd


def _fastlm(backend):
    def prepare(inputs, direction):
        fwd, bwd = _raw_ops(backend)
        q, k, v, do, causal = (inputs[n] for n in ("q", "k", "v", "do", "causal"))
        scale = q.shape[-1] ** -0.5
        if direction == "forward":
            return lambda: fwd(q, k, v, None, None, 0.0, causal, scale)[:1]
        out, lse = fwd(q, k, v, None, None, 0.0, causal, scale)
        return lambda: bwd(do, q, k, v, out, lse, None, None, 0.0, causal, scale)

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend,
                cpp_op="fastlm::attention_fwd")


def _sdpa(sdpa_backend=None):
    """torch SDPA, on one of its backends (a SDPBackend name) or on its own choice."""

    def prepare(inputs, direction):
        import contextlib

        from torch.nn.attention import SDPBackend, sdpa_kernel

        def ctx():
            if sdpa_backend:
                return sdpa_kernel(getattr(SDPBackend, sdpa_backend))
            return contextlib.nullcontext()

        q, k, v, do, causal = (inputs[n] for n in ("q", "k", "v", "do", "causal"))
        if direction == "forward":
            def run():
                with ctx(), torch.no_grad():
                    return (F.scaled_dot_product_attention(q, k, v, is_causal=causal),)
            return run
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        with ctx():
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        return lambda: torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)

    return prepare


def _flash_attn(inputs, direction):
    from flash_attn import flash_attn_func  # (B, S, H, D) layout

    q, k, v, do = (inputs[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "do"))
    causal = inputs["causal"]

    def back(t):
        return t.transpose(1, 2)

    if direction == "forward":
        return lambda: (back(flash_attn_func(q, k, v, causal=causal)),)
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qg, kg, vg, causal=causal)
    return lambda: tuple(back(g) for g in torch.autograd.grad(out, (qg, kg, vg), do,
                                                             retain_graph=True))


def _flops(shape, direction):
    f = 4 * shape["B"] * shape["H"] * shape["S"] ** 2 * shape["D"]
    if shape["causal"]:
        f //= 2
    return int(f * (2.5 if direction == "backward" else 1))


CASE = register(Case(
    op="attention",
    shapes={
        "cuda": {"full": _gpu_grid((64, 128), (512, 1024, 2048, 4096, 8192, 16384)),
                 "quick": [{"B": 4, "H": 16, "S": 4096, "D": 128, "causal": c,
                            "dtype": "bfloat16"} for c in (False, True)]},
        "cpu": {"full": [{"B": 4, "H": 8, "S": 1024, "D": 64, "causal": c, "dtype": "float32"}
                         for c in (False, True)],
                "quick": [{"B": 2, "H": 4, "S": 512, "D": 64, "causal": True,
                           "dtype": "float32"}]},
    },
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _sdpa()),
        Impl("sdpa-flash", "peer", _sdpa("FLASH_ATTENTION"), module="torch", install="torch",
             devices=("cuda",)),
        Impl("sdpa-cudnn", "peer", _sdpa("CUDNN_ATTENTION"), module="torch", install="torch",
             devices=("cuda",)),
        Impl("sdpa-efficient", "peer", _sdpa("EFFICIENT_ATTENTION"), module="torch",
             install="torch", devices=("cuda",)),
        Impl("flash-attn", "peer", _flash_attn, module="flash_attn", install="flash-attn",
             devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"forward": ("out",), "backward": ("dq", "dk", "dv")},
    flops=_flops,
    x_axis="S",
    series=("D", "causal"),
    notes={"flops": "forward 4*B*H*S^2*D (halved when causal); backward 2.5x forward"},
))

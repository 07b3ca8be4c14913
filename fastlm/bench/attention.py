"""Attention benchmark: fastlm's kernels (timed through the raw forward and backward ops)
against torch's scaled_dot_product_attention -- its default choice (the reference row) and
each of its backends (flash = FlashAttention-2, cuDNN, memory-efficient) -- and flash-attn
when installed.

GPU shapes are the FlashAttention-3 paper grid: B·S = 16384 tokens, H·D = 2048, S from 512
to 16384, D 64 and 128, causal and not, bfloat16; plus the attention of real models (GPT-2
124M, and Llama-3 8B with grouped-query heads: HKV key/value heads). CPU: B4 H8 S1024 D64
float32 and the same models at S 1024. FLOPs (../shared/ANCHORS.md): forward 4·B·H·S²·D,
halved when causal; backward 2.5x the forward. A backward row times the backward alone, after
an untimed forward; forward+backward times both.
"""

import torch
import torch.nn.functional as F

from .registry import Case, Impl, register
from .rows import autograd_prepare, compiled


def _gpu_grid(ds, ss, causal=(False, True)):
    return [{"B": 16384 // s, "H": 2048 // d, "S": s, "D": d, "causal": c, "dtype": "bfloat16"}
            for d in ds for c in causal for s in ss]


def _model_shapes(dtype, b_gpt2, b_llama, s_llama):
    return [{"model": "gpt2-124M", "B": b_gpt2, "H": 12, "S": 1024, "D": 64, "causal": True,
             "dtype": dtype},
            {"model": "llama3-8B", "B": b_llama, "H": 32, "HKV": 8, "S": s_llama, "D": 128,
             "causal": True, "dtype": dtype}]


def make_inputs(shape, device):
    """q (B, H, S, D), k and v (B, HKV, S, D) (HKV defaults to H) and the upstream gradient,
    seeded, in the shape's dtype."""
    b, h, s, d = shape["B"], shape["H"], shape["S"], shape["D"]
    hkv = shape.get("HKV", h)
    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)

    def randn(heads):
        return torch.randn(b, heads, s, d, generator=g, device=device).to(dtype)

    return {"q": randn(h), "k": randn(hkv), "v": randn(hkv), "do": randn(h),
            "causal": shape["causal"], "gqa": hkv != h}


def oracle(inputs, direction):
    """torch SDPA in a higher precision than the inputs: float64 math on the CPU, float32 on a
    GPU (its memory-efficient kernel; a float64 S x S matrix would not fit at S = 16384)."""
    q = inputs["q"]
    ct = torch.float64 if q.device.type == "cpu" else torch.float32
    q, k, v, do = (inputs[n].to(ct).requires_grad_(n != "do") for n in ("q", "k", "v", "do"))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=inputs["causal"],
                                         enable_gqa=inputs["gqa"])
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
        if direction == "forward+backward":
            def both():
                out, lse = fwd(q, k, v, None, None, 0.0, causal, scale)
                return (out, *bwd(do, q, k, v, out, lse, None, None, 0.0, causal, scale))
            return both
        out, lse = fwd(q, k, v, None, None, 0.0, causal, scale)
        return lambda: bwd(do, q, k, v, out, lse, None, None, 0.0, causal, scale)

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend,
                cpp_op="fastlm::attention_fwd")


def _sdpa_call(q, k, v, causal, gqa):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)


def _sdpa(sdpa_backend=None, compile_it=False):
    """torch SDPA, on one of its backends (a SDPBackend name) or on its own choice; or its
    call under torch.compile."""

    def prepare(inputs, direction):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v, do, causal, gqa = (inputs[n] for n in ("q", "k", "v", "do", "causal", "gqa"))
        fn = compiled(_sdpa_call) if compile_it else _sdpa_call
        if sdpa_backend:
            def call(*args):
                with sdpa_kernel(getattr(SDPBackend, sdpa_backend)):
                    return fn(*args)
        else:
            call = fn
        return autograd_prepare(call, (q, k, v, causal, gqa), (0, 1, 2), (do,), direction)

    return prepare


def _flash_attn(inputs, direction):
    from flash_attn import flash_attn_func  # (B, S, H, D) layout

    q, k, v, do = (inputs[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "do"))
    causal = inputs["causal"]

    def fn(q, k, v):  # the (B, H, S, D) layout of the other rows
        return flash_attn_func(q, k, v, causal=causal).transpose(1, 2)

    return autograd_prepare(fn, (q, k, v), (0, 1, 2), (do.transpose(1, 2),), direction,
                            pick=lambda g: tuple(t.transpose(1, 2) for t in g))


# A few tiny problems (odd lengths, grouped-query heads) for the CI check of the full path.
_TINY = {dt: [{"B": 1, "H": 2, "S": 40, "D": 16, "causal": True, "dtype": dt},
              {"B": 2, "H": 4, "HKV": 2, "S": 33, "D": 32, "causal": False, "dtype": dt}]
         for dt in ("float32", "bfloat16")}


def _flops(shape, direction):
    f = 4 * shape["B"] * shape["H"] * shape["S"] ** 2 * shape["D"]
    if shape["causal"]:
        f //= 2
    return int(f * (2.5 if direction == "backward" else 1))


CASE = register(Case(
    op="attention",
    shapes={
        "cuda": {"full": (_gpu_grid((64, 128), (512, 1024, 2048, 4096, 8192, 16384))
                          + _model_shapes("bfloat16", 32, 2, 8192)),
                 "quick": [{"B": 4, "H": 16, "S": 4096, "D": 128, "causal": c,
                            "dtype": "bfloat16"} for c in (False, True)],
                 "headline": _gpu_grid((64, 128), (4096, 16384)),
                 "tiny": _TINY["bfloat16"]},
        "cpu": {"full": ([{"B": 4, "H": 8, "S": 1024, "D": 64, "causal": c, "dtype": "float32"}
                          for c in (False, True)] + _model_shapes("float32", 1, 1, 1024)),
                "quick": [{"B": 2, "H": 4, "S": 512, "D": 64, "causal": True,
                           "dtype": "float32"}],
                "headline": _TINY["float32"][:1],
                "tiny": _TINY["float32"]},
    },
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _sdpa()),
        Impl("torch-compile", "peer", _sdpa(compile_it=True), module="torch", install="torch",
             quick_devices=("cuda",)),
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
    notes={"flops": "forward 4*B*H*S^2*D (halved when causal); backward 2.5x forward; "
                    "forward+backward 3.5x"},
))

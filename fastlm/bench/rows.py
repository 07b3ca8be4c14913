"""What the row-wise cases (layer_norm, add_layer_norm) share: their (M rows, N) shapes, seeded
inputs and the size of one (M, N) tensor."""

import torch


def _shapes(m, ns, dtype):
    return [{"M": m, "N": n, "dtype": dtype} for n in ns]


# Rows of real models' norm layers (M = tokens per step): GPT-2 124M at B=8 T=1024 (N=768),
# Llama-3 8B at one 8192-token sequence (N=4096); on the CPU 2048 and 1024 tokens.
MODEL_ROWS = {"cuda": [{"model": "gpt2-124M", "M": 8192, "N": 768, "dtype": "bfloat16"},
                       {"model": "llama3-8B", "M": 8192, "N": 4096, "dtype": "bfloat16"}],
              "cpu": [{"model": "gpt2-124M", "M": 2048, "N": 768, "dtype": "float32"},
                      {"model": "llama3-8B", "M": 1024, "N": 4096, "dtype": "float32"}]}


def row_shapes():
    """The shapes per device and profile (registry.PROFILES)."""
    return row_profiles(_shapes(32768, (768, 1024, 2048, 4096, 8192), "bfloat16"),
                        _shapes(4096, (768, 1024, 2048, 4096), "float32"),
                        _shapes(8192, (1024, 4096), "bfloat16"),
                        _shapes(4096, (1024,), "float32"),
                        MODEL_ROWS["cuda"], MODEL_ROWS["cpu"])


def seeded_randn(shape, device):
    """randn(*size, scale=1, shift=0): normals drawn in float32 from a generator seeded with 0,
    returned in the shape's dtype (successive calls draw successive values)."""
    dtype = getattr(torch, shape["dtype"])
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size, scale=1.0, shift=0.0):
        t = torch.randn(*size, generator=g, device=device, dtype=torch.float32)
        return (t * scale + shift).to(dtype)

    return randn


def matrix_bytes(shape):
    """Bytes of one (M, N) tensor of the shape's dtype."""
    size = torch.empty((), dtype=getattr(torch, shape["dtype"])).element_size()
    return shape["M"] * shape["N"] * size


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def autograd_prepare(fn, args, diff, grads, direction, pick=None):
    """The timed call of a differentiable implementation `fn(*args)` in `direction`:
    "forward" runs it without autograd; "backward" runs torch.autograd.grad of its outputs
    (with `grads`) over one untimed forward, retaining the graph; "forward+backward" runs both
    and returns the forward's outputs then the gradients. `diff`: the indices of `args` whose
    gradients are wanted; `pick(grads) -> grads` selects and orders what is compared."""
    pick = pick or (lambda g: tuple(g))
    if direction == "forward":
        def forward():
            with torch.no_grad():
                return _as_tuple(fn(*args))
        return forward
    leaves = list(args)
    for i in diff:
        leaves[i] = args[i].detach().requires_grad_()
    wrt = [leaves[i] for i in diff]
    if direction == "backward":
        outs = _as_tuple(fn(*leaves))
        return lambda: pick(torch.autograd.grad(outs, wrt, grads, retain_graph=True))

    def both():
        outs = _as_tuple(fn(*leaves))
        return tuple(o.detach() for o in outs) + pick(torch.autograd.grad(outs, wrt, grads))

    return both


_COMPILED = {}


def compiled(fn):
    """torch.compile(fn), memoized. (The runner turns donated buffers off while it runs: a
    compiled backward with donated buffers refuses retain_graph=True, which timing a backward
    repeatedly needs.)"""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def row_profiles(cuda_full, cpu_full, cuda_quick, cpu_quick, models_cuda=(), models_cpu=()):
    """Shapes per device and profile for the row-wise ops: the sweeps, plus the layer shapes
    of real models in "full"; "headline" is the GPU check's rows on a GPU and the tiny shapes
    on the CPU (its dry run); "tiny" a few rows for the CI check of the full path."""
    tiny = [{"M": 64, "N": 96, "dtype": "float32"}, {"M": 17, "N": 1000, "dtype": "float32"}]
    return {
        "cuda": {"full": cuda_full + list(models_cuda), "quick": cuda_quick,
                 "headline": _shapes(32768, (1024, 4096, 8192), "bfloat16"),
                 "tiny": [dict(s, dtype="bfloat16") for s in tiny]},
        "cpu": {"full": cpu_full + list(models_cpu), "quick": cpu_quick, "headline": tiny[:1],
                "tiny": tiny},
    }

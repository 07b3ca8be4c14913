"""AdamW step benchmark on a GPT-2 parameter set: fastlm's fused step per backend against
torch.optim.AdamW(fused=True) (the reference row), foreach=True, and the foreach step under
torch.compile; and the step with gradient clipping (fastlm's max_grad_norm against
clip_grad_norm_(foreach=True) + fused AdamW).

Bytes per parameter (each tensor read once, each output written once): float32 28 (read p, g,
m, v; write p, m, v); clipping adds a read of g (32). bfloat16 params with float32 master
weights and moments: 30 (p 2+2, g 2, m and v 8+8, master 4+4), 32 with clipping.
"""

import torch

from .registry import Case, Impl, register

LR, WD, MAX_NORM = 1e-3, 0.1, 1.0


def gpt2_shapes(vocab=50257, block=1024, d=768, layers=12):
    """Parameter shapes of a GPT-2 with tied embeddings (124,439,808 parameters by default)."""
    shapes = [(vocab, d), (block, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d),
                   (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


MODELS = {  # name -> gpt2_shapes arguments
    "gpt2-124M": {},
    "gpt2-12.6M": {"vocab": 4096, "block": 1024, "d": 384, "layers": 6},
    "gpt2-small-test": {"vocab": 1024, "block": 256, "d": 128, "layers": 2},
}


def _views(flat, shapes):
    out, i = [], 0
    for s in shapes:
        n = 1
        for k in s:
            n *= k
        out.append(flat[i:i + n].view(s))
        i += n
    return out


def make_inputs(shape, device):
    """Flat float32 params and grads for the model's parameter set (seeded); params and grads
    of each run are views into copies of these, so a step's result is one flat tensor."""
    shapes = gpt2_shapes(**MODELS[shape["model"]])
    n = sum(torch.Size(s).numel() for s in shapes)
    g = torch.Generator(device=device).manual_seed(0)
    p = torch.randn(n, generator=g, device=device) * 0.02
    grad = torch.randn(n, generator=g, device=device) * 0.01
    return {"shapes": shapes, "p": p, "g": grad, "dtype": getattr(torch, shape["dtype"])}


def _setup(inputs, optimizer, clip_with_torch=False, compile_it=False):
    """Fresh params (views of one flat buffer) with grads, and the timed step (under
    torch.compile when `compile_it`)."""
    dt = inputs["dtype"]
    flat = inputs["p"].to(dt).clone()
    gflat = inputs["g"].to(dt).clone()
    params = [t.requires_grad_() for t in _views(flat, inputs["shapes"])]
    for p, g in zip(params, _views(gflat, inputs["shapes"])):
        p.grad = g
    opt = optimizer(params)

    def update():
        if clip_with_torch:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        opt.step()

    if compile_it:
        update = torch.compile(update)

    def step():
        update()
        return (flat,)

    return step


def _fastlm(backend):
    def prepare(inputs, direction):
        from .. import optim, use_backend

        master = inputs["dtype"] != torch.float32
        clip = MAX_NORM if direction == "step+clip" else None
        step = _setup(inputs, lambda ps: optim.AdamW(ps, lr=LR, weight_decay=WD,
                                                     master_weights=master, max_grad_norm=clip))

        def run():
            with use_backend(backend):
                return step()

        return run

    return Impl(f"fastlm-{backend}", "fastlm", prepare, backend=backend)


def _torch(fused, compile_it=False):
    def prepare(inputs, direction):
        kw = {"fused": True} if fused else {"foreach": True}
        return _setup(inputs, lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, **kw),
                      clip_with_torch=direction == "step+clip", compile_it=compile_it)

    return prepare


def oracle(inputs, direction):
    """The first step in float64 on the flat buffers (every param is at step 1)."""
    p = inputs["p"].to(inputs["dtype"]).double()
    g = inputs["g"].to(inputs["dtype"]).double()
    if direction == "step+clip":
        g = g * min(1.0, MAX_NORM / (g.norm().item() + 1e-6))
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = (1 - b1) * g, (1 - b2) * g * g
    p = p * (1 - LR * WD) - LR / (1 - b1) * m / (v.sqrt() / (1 - b2) ** 0.5 + eps)
    return (p,)


def _bytes(shape, direction):
    n = sum(torch.Size(s).numel() for s in gpt2_shapes(**MODELS[shape["model"]]))
    per = 28 if shape["dtype"] == "float32" else 30
    return n * (per + (4 if shape["dtype"] == "float32" else 2) * (direction == "step+clip"))


CASE = register(Case(
    op="adamw",
    shapes={
        "cuda": {"full": [{"model": "gpt2-124M", "dtype": "float32"},
                          {"model": "gpt2-124M", "dtype": "bfloat16"}],
                 "quick": [{"model": "gpt2-124M", "dtype": "float32"}],
                 "headline": [{"model": "gpt2-124M", "dtype": "float32"}],
                 "tiny": [{"model": "gpt2-small-test", "dtype": "float32"},
                          {"model": "gpt2-small-test", "dtype": "bfloat16"}]},
        "cpu": {"full": [{"model": "gpt2-12.6M", "dtype": "float32"}],
                "quick": [{"model": "gpt2-12.6M", "dtype": "float32"}],
                "headline": [{"model": "gpt2-small-test", "dtype": "float32"}],
                "tiny": [{"model": "gpt2-small-test", "dtype": "float32"}]},
    },
    make_inputs=make_inputs,
    impls=(
        _fastlm("cuda"),
        _fastlm("triton"),
        _fastlm("cpu"),
        Impl("torch", "torch", _torch(fused=True)),
        Impl("torch-foreach", "peer", _torch(fused=False), module="torch", install="torch"),
        Impl("torch-compile", "peer", _torch(fused=False, compile_it=True), module="torch",
             install="torch", quick_devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"step": ("params",), "step+clip": ("params",)},
    bytes=_bytes,
    x_axis="model",
    directions=("step", "step+clip"),
    notes={"bytes": "per parameter: float32 28 (+4 with clipping); bfloat16 with float32 "
                    "master weights 30 (+2)"},
))

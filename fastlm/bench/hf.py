"""Llama-shaped Hugging Face training step (`fastlm bench hf`): one step (zero_grad, forward with
the labels' loss, backward, AdamW step) of transformers' LlamaForCausalLM built from a config
(random weights, no download):

  fastlm                 the model after fastlm.patch (RMSNorm, SwiGLU, rotary, attention,
                         fused linear cross-entropy)
  transformers-sdpa      unpatched, attn_implementation="sdpa"; the reference row
  torch-compile          unpatched, under torch.compile
  liger                  Liger-Kernel's patch of the same model (when installed)
each with torch.optim.AdamW (fused on CUDA). Every model gets the same initial weights (seed
0) and batch; warm-up steps run at lr 0, so the compared output, the first timed step's loss,
is the loss of the initial weights (the oracle: float64 on the CPU, float32 on the GPU).

GPU: a 1B-class Llama (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocabulary
128256) at B=4, T=2048, bf16 weights. CPU: hidden 256, 4 layers, vocabulary 8192, B=4, T=256,
float32. FLOPs per step: 6·params·tokens + attention 6·layers·B·T²·hidden (causal). Tokens/s
and peak memory (everything allocated during the step) are the columns that matter.
"""

import gc
import importlib.util

import torch

from .registry import Case, Impl, register

LR = 1e-4
WARMUP_STEPS = {"eager": 1, "compile": 3}

MODELS = {
    "llama-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=8192),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}


def _config(shape, attn="sdpa"):
    import transformers

    return transformers.LlamaConfig(**MODELS[shape["model"]], max_position_embeddings=4096,
                                    attn_implementation=attn)


def _params(shape):
    m = MODELS[shape["model"]]
    c, f, layers, v = (m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"],
                       m["vocab_size"])
    kv = c * m["num_key_value_heads"] // m["num_attention_heads"]
    return 2 * v * c + layers * (2 * c * c + 2 * c * kv + 3 * c * f)


def _flops(shape, direction):
    m = MODELS[shape["model"]]
    tokens = shape["B"] * shape["T"]
    return (6 * _params(shape) * tokens
            + 6 * m["num_hidden_layers"] * shape["B"] * shape["T"] ** 2 * m["hidden_size"])


def _tokens(shape):
    return shape["B"] * shape["T"]


def make_inputs(shape, device):
    import transformers

    torch.manual_seed(0)
    state = transformers.LlamaForCausalLM(_config(shape)).state_dict()
    g = torch.Generator().manual_seed(1)
    v = MODELS[shape["model"]]["vocab_size"]
    ids = torch.randint(0, v, (shape["B"], shape["T"]), generator=g)
    return {"shape": shape, "state": state, "ids": ids.to(device),
            "dtype": getattr(torch, shape["dtype"])}


def _build(kind, inputs, device):
    import transformers

    model = transformers.LlamaForCausalLM(_config(inputs["shape"]))
    model.load_state_dict(inputs["state"])
    model = model.to(device=device, dtype=inputs["dtype"])
    if kind == "fastlm":
        from ..patch import patch

        patch(model)
    elif kind == "liger":
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    return model.train()


def _impl(kind, compiled=False):
    def prepare(inputs, direction):
        ids = inputs["ids"]
        device = ids.device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = _build(kind, inputs, device)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=device.type == "cuda")
        run = torch.compile(model) if compiled else model

        def step():
            opt.zero_grad(set_to_none=True)
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            return (loss.detach().float(),)

        for group in opt.param_groups:
            group["lr"] = 0.0
        for _ in range(WARMUP_STEPS["compile" if compiled else "eager"]):
            step()
        for group in opt.param_groups:
            group["lr"] = LR
        return step

    return prepare


@torch.no_grad()
def oracle(inputs, direction):
    """The initial weights' loss on the batch, float64 (CPU) or float32 (GPU)."""
    import transformers

    ids = inputs["ids"]
    ct = torch.float64 if ids.device.type == "cpu" else torch.float32
    model = transformers.LlamaForCausalLM(_config(inputs["shape"], "eager"))
    model.load_state_dict(inputs["state"])
    model = model.to(device=ids.device, dtype=ct).eval()
    return (model(input_ids=ids, labels=ids).loss.float(),)


def _s(model, b, t, dtype):
    return {"model": model, "B": b, "T": t, "dtype": dtype}


SHAPES = {
    "cuda": {"full": [_s("llama-1B", 4, 2048, "bfloat16")],
             "quick": [_s("llama-1B", 4, 2048, "bfloat16")],
             "headline": [_s("llama-1B", 4, 2048, "bfloat16")],
             "tiny": [_s("llama-tiny", 2, 32, "bfloat16")]},
    "cpu": {"full": [_s("llama-cpu", 4, 256, "float32")],
            "quick": [_s("llama-cpu", 4, 256, "float32")],
            "headline": [_s("llama-tiny", 2, 32, "float32")],
            "tiny": [_s("llama-tiny", 2, 32, "float32")]},
}

# Registered only where transformers is installed (pip install fastlm[hf]): every row needs it.
CASE = None if importlib.util.find_spec("transformers") is None else register(Case(
    op="hf",
    shapes=SHAPES,
    make_inputs=make_inputs,
    impls=(
        Impl("fastlm", "fastlm", _impl("fastlm"), module="transformers",
             install="transformers"),
        Impl("transformers-sdpa", "torch", _impl("sdpa"), module="transformers",
             install="transformers"),
        Impl("torch-compile", "peer", _impl("sdpa", compiled=True), module="transformers",
             install="transformers", quick_devices=("cuda",)),
        Impl("liger", "peer", _impl("liger"), module="liger_kernel", install="liger-kernel",
             devices=("cuda",)),
    ),
    oracle=oracle,
    outputs={"step": ("loss",)},
    flops=_flops,
    tokens=_tokens,
    total_peak=True,
    x_axis="B",
    directions=("step",),
    notes={"flops": "6*params*B*T + attention 6*layers*B*T^2*hidden (causal)",
           "step": "zero_grad, forward + labels' loss, backward, AdamW step"},
))

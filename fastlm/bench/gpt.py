"""GPT training-step benchmark: one step (zero_grad, forward with the loss, backward, AdamW
step) of fastlm.models.GPT with fastlm.optim.AdamW, eager and under torch.compile, against the
same GPT-2 written in plain torch:

  torch                  hand-written blocks (torch.nn.LayerNorm, F.scaled_dot_product_attention,
                         full logits + F.cross_entropy: fastlm.models.TorchGPT), eager; the
                         reference row
  torch-compile          the same under torch.compile
  torch-encoder-layer    a stack of torch.nn.TransformerEncoderLayer (norm_first=True, causal
                         mask, tanh GELU) between the same embeddings and tied head, eager
each with torch.optim.AdamW(fused=True). Every model gets the same initial weights (GPT-2
init, seed 0) and the same batch; the output compared with the oracle is the loss of the first
timed step (warm-up steps run with lr 0, so the weights are still the initial ones), the
oracle the float64 (CPU) or float32 (GPU) loss of those weights.

GPU: GPT-2 124M (vocab 50257), B=32, T=1024, bf16 autocast (set FASTLM_BENCH_GPT_BATCH=8,16
for other batch sizes). CPU: a 4-layer, 256-wide GPT with a vocabulary of 8192, B=4, T=256,
float32; the compiled rows
run on the CPU only without --quick (inductor takes minutes to build a training step there).

FLOPs per step: 6·N·B·T for the matmuls (N: parameters without the position embedding; the
tied embedding counts once, as the head) plus attention: 2·B·T²·C per layer forward (causal
half of 4·B·T²·C), backward 2.5x the forward, so 7·n_layer·B·T²·C in all. Peak memory (CUDA)
is everything allocated during the step: weights, gradients, optimizer state, activations.
"""

import contextlib
import functools
import gc
import os

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Case, Impl, register

LR = 6e-4
WARMUP_STEPS = {"eager": 1, "compile": 3}

MODELS = {  # name -> GPTConfig arguments
    "gpt2-124M": {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12,
                  "n_embd": 768},
    # A small GPT for a 2-core CPU: with GPT-2's vocabulary the head alone would be 80% of the
    # step and --quick would take minutes.
    "gpt-cpu": {"vocab_size": 8192, "block_size": 256, "n_layer": 4, "n_head": 4, "n_embd": 256},
    # The "tiny" profile's model: the full path (every row, compiled ones included) in seconds.
    "gpt-tiny": {"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64},
}


def _config(shape):
    from ..models import GPTConfig

    return GPTConfig(**MODELS[shape["model"]])


def n_params(config):
    """Parameters without the position embedding (the tied embedding once)."""
    c, layers = config.n_embd, config.n_layer
    return config.vocab_size * c + layers * (12 * c * c + 13 * c) + 2 * c


def _flops(shape, direction):
    cfg = _config(shape)
    tokens = shape["B"] * shape["T"]
    return (6 * n_params(cfg) * tokens
            + 7 * cfg.n_layer * shape["B"] * shape["T"] ** 2 * cfg.n_embd)


def _tokens(shape):
    return shape["B"] * shape["T"]


def make_inputs(shape, device):
    """The initial weights (GPT-2 init under seed 0, kept on the CPU until a model is built)
    and one batch of tokens and targets on `device`."""
    from ..models import GPT

    cfg = _config(shape)
    torch.manual_seed(0)
    state = GPT(cfg).state_dict()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (shape["B"], shape["T"]), generator=g)
    y = torch.randint(0, cfg.vocab_size, (shape["B"], shape["T"]), generator=g)
    return {"config": cfg, "state": state, "x": x.to(device), "y": y.to(device),
            "dtype": getattr(torch, shape["dtype"])}


class EncoderLayerGPT(nn.Module):
    """GPT-2 as a stack of torch.nn.TransformerEncoderLayer (norm_first, causal mask, tanh
    GELU) between the learned embeddings and a final LayerNorm with the tied head."""

    def __init__(self, config):
        super().__init__()
        c = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, c)
        self.wpe = nn.Embedding(config.block_size, c)
        layer = nn.TransformerEncoderLayer(c, config.n_head, dim_feedforward=4 * c, dropout=0.0,
                                           activation=functools.partial(F.gelu,
                                                                        approximate="tanh"),
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_layer, norm=nn.LayerNorm(c),
                                             enable_nested_tensor=False)
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def load_gpt_state_dict(self, sd):
        """Copy a fastlm.models.GPT state dict (same layouts: in_proj_weight is c_attn's
        q, k, v rows)."""
        names = {"wte.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
                 "encoder.norm.weight": "transformer.ln_f.weight",
                 "encoder.norm.bias": "transformer.ln_f.bias"}
        per_layer = {"self_attn.in_proj_weight": "attn.c_attn.weight",
                     "self_attn.in_proj_bias": "attn.c_attn.bias",
                     "self_attn.out_proj.weight": "attn.c_proj.weight",
                     "self_attn.out_proj.bias": "attn.c_proj.bias",
                     "linear1.weight": "mlp.c_fc.weight", "linear1.bias": "mlp.c_fc.bias",
                     "linear2.weight": "mlp.c_proj.weight", "linear2.bias": "mlp.c_proj.bias",
                     "norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias",
                     "norm2.weight": "ln_2.weight", "norm2.bias": "ln_2.bias"}
        for i in range(len(self.encoder.layers)):
            for ours, theirs in per_layer.items():
                names[f"encoder.layers.{i}.{ours}"] = f"transformer.h.{i}.{theirs}"
        own = self.state_dict()
        with torch.no_grad():
            for ours, theirs in names.items():
                own[ours].copy_(sd[theirs])

    def forward(self, idx, targets):
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device,
                                                              dtype=x.dtype)
        x = self.encoder(x, mask=mask, is_causal=True)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1),
                                       ignore_index=-1)


def _build(kind, inputs, device):
    from ..models import GPT, TorchGPT

    cfg = inputs["config"]
    if kind == "encoder":
        model = EncoderLayerGPT(cfg)
        model.load_gpt_state_dict(inputs["state"])
    else:
        model = (GPT if kind == "fastlm" else TorchGPT)(cfg)
        model.load_state_dict(inputs["state"])
    return model.to(device)


def _optimizer(kind, model, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "fastlm":
        from ..optim import AdamW

        return AdamW(groups, lr=LR, betas=(0.9, 0.95))
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), fused=True)


def _impl(kind, compiled):
    """prepare(inputs, direction) for one model kind ("fastlm", "torch", "encoder")."""

    def prepare(inputs, direction):
        x, y = inputs["x"], inputs["y"]
        device = x.device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = _build(kind, inputs, device)
        opt = _optimizer(kind, model, device)
        run = torch.compile(model) if compiled else model
        low = inputs["dtype"] != torch.float32

        def autocast():
            if low:
                return torch.autocast(device.type, dtype=inputs["dtype"])
            return contextlib.nullcontext()

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = run(x, y)[1]
            loss.backward()
            opt.step()
            return (loss.detach(),)

        # Warm-up (and compilation) at lr 0: the weights stay the initial ones, so the first
        # timed step's loss is the oracle's.
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
    """The loss of the initial weights on the batch, in float64 (CPU) or float32 (GPU), with
    the head and cross-entropy taken a chunk of rows at a time."""
    from ..models import TorchGPT

    x, y = inputs["x"], inputs["y"]
    ct = torch.float64 if x.device.type == "cpu" else torch.float32
    model = TorchGPT(inputs["config"])
    model.load_state_dict(inputs["state"])
    model = model.to(device=x.device, dtype=ct)
    h = model.hidden_states(x).reshape(-1, model.config.n_embd)
    t = y.reshape(-1)
    total = torch.zeros((), dtype=ct, device=x.device)
    for s in range(0, h.shape[0], 1024):
        total += F.cross_entropy(h[s:s + 1024] @ model.lm_head.weight.t(), t[s:s + 1024],
                                 reduction="sum")
    return ((total / h.shape[0]),)


def _shapes():
    """GPU batch sizes from FASTLM_BENCH_GPT_BATCH (comma-separated; default 32)."""
    text = os.environ.get("FASTLM_BENCH_GPT_BATCH", "32")
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"FASTLM_BENCH_GPT_BATCH must be comma-separated integers, got "
                         f"{text!r}") from None
    gpu = [{"model": "gpt2-124M", "B": b, "T": 1024, "dtype": "bfloat16"} for b in batches]
    cpu = [{"model": "gpt-cpu", "B": 4, "T": 256, "dtype": "float32"}]
    tiny = {"model": "gpt-tiny", "B": 2, "T": 32}
    return {"cuda": {"full": gpu, "quick": gpu[:1], "headline": gpu[:1],
                     "tiny": [dict(tiny, dtype="bfloat16")]},
            "cpu": {"full": cpu, "quick": cpu, "headline": [dict(tiny, dtype="float32")],
                    "tiny": [dict(tiny, dtype="float32")]}}


CASE = register(Case(
    op="gpt",
    shapes=_shapes(),
    make_inputs=make_inputs,
    impls=(
        Impl("fastlm", "fastlm", _impl("fastlm", False)),
        Impl("fastlm-compile", "fastlm", _impl("fastlm", True), quick_devices=("cuda",)),
        Impl("torch", "torch", _impl("torch", False)),
        Impl("torch-compile", "peer", _impl("torch", True), module="torch", install="torch",
             quick_devices=("cuda",)),
        Impl("torch-encoder-layer", "peer", _impl("encoder", False), module="torch",
             install="torch"),
    ),
    oracle=oracle,
    outputs={"step": ("loss",)},
    flops=_flops,
    tokens=_tokens,
    total_peak=True,
    x_axis="B",
    directions=("step",),
    notes={"flops": "6*N*B*T (N: parameters without the position embedding) + attention "
                    "7*n_layer*B*T^2*C (causal forward 2*B*T^2*C, backward 2.5x)",
           "step": "zero_grad, forward + loss, backward, AdamW step; bf16 autocast on GPU"},
))

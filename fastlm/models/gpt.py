"""GPT-2 on fastlm's kernels.

    from fastlm.models import GPT, GPTConfig
    model = GPT(GPTConfig())                       # GPT-2 124M, randomly initialised
    model = GPT.from_pretrained("path/to/gpt2")    # a local Hugging Face checkpoint directory
    _, loss = model(idx, targets)                  # training: fused, chunked head + loss
    logits, _ = model(idx)                         # inference: the last position's logits
    out = model.generate(idx, 100, top_k=50)       # sampling with a KV cache

The architecture is GPT-2's: learned position embeddings; pre-norm blocks (LayerNorm ->
causal self-attention with one fused qkv Linear -> residual; LayerNorm -> 4x MLP with the tanh
GELU -> residual); a final LayerNorm; the lm head tied to the token embedding. Initialisation
is GPT-2's: N(0, 0.02) weights, zero biases, and the residual projections (attn.c_proj,
mlp.c_proj) at N(0, 0.02 / sqrt(2 * n_layer)). Module and parameter names are nanoGPT's
(transformer.wte, transformer.h.0.attn.c_attn, ..., lm_head), so its checkpoints load.

LayerNorm is fastlm.nn.LayerNorm, attention fastlm.scaled_dot_product_attention
(is_causal=True, dropout in training), and with targets the head and the cross-entropy are
fastlm.ops.cross_entropy.linear_cross_entropy: chunked over tokens, so the (B*T, vocab) float32
logits are never materialised. :class:`TorchGPT` is the same model written with torch.nn
modules only (torch.nn.LayerNorm, F.scaled_dot_product_attention, full logits and
F.cross_entropy): same parameter names and init, so either loads the other's state_dict. It is
the reference for tests, `fastlm train --compare torch` and the benchmarks.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import LayerNorm
from ..nn.transformer import add_norm, no_hooks
from ..ops.attention import scaled_dot_product_attention
from ..ops.cross_entropy import linear_cross_entropy


@dataclass
class GPTConfig:
    """GPT-2 124M by default.

    vocab_size is GPT-2's 50257 (what its tokenizer produces and its checkpoints hold);
    nanoGPT pads to 50304, a multiple of 64, for faster matmuls: pass that explicitly if you
    train from scratch and want it.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in the Linears and LayerNorms (GPT-2: True)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive integer, got "
                                 f"{getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be a multiple of n_head "
                             f"({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config, sdpa):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self._sdpa = sdpa

    def branch(self, x, cache=None, pos=0):
        """The attention branch before its residual dropout.

        x: (B, T, C). With a cache (this layer's (k, v) buffers of shape (B, H, block_size,
        D)), the new keys and values are written at positions pos..pos+T-1 and the queries
        attend to positions 0..pos+T-1."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        shape = (B, T, self.n_head, C // self.n_head)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        if cache is None or pos == 0:
            if cache is not None:  # prefill
                cache[0][:, :, :T] = k
                cache[1][:, :, :T] = v
            y = self._sdpa(q, k, v, dropout_p=p, is_causal=True)
        else:
            kc, vc = cache
            kc[:, :, pos:pos + T] = k
            vc[:, :, pos:pos + T] = v
            k, v = kc[:, :, :pos + T], vc[:, :, :pos + T]
            if T == 1:  # the new token attends to everything cached
                y = self._sdpa(q, k, v, dropout_p=p)
            else:  # causal, aligned bottom-right: query i sits at position pos + i
                mask = (torch.arange(pos + T, device=x.device)[None, :]
                        <= torch.arange(pos, pos + T, device=x.device)[:, None])
                y = self._sdpa(q, k, v, attn_mask=mask, dropout_p=p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x, cache=None, pos=0):
        return self.resid_dropout(self.branch(x, cache, pos))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def branch(self, x):
        """The MLP before its dropout."""
        return self.c_proj(self.gelu(self.c_fc(x)))

    def forward(self, x):
        return self.dropout(self.branch(x))


class Block(nn.Module):
    def __init__(self, config, norm, sdpa):
        super().__init__()
        self.ln_1 = norm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, sdpa)
        self.ln_2 = norm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


# Conv1D weights in Hugging Face GPT-2 checkpoints are stored (in, out): transposed from Linear.
_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _read_safetensors(path):
    """{name: tensor} from a .safetensors file (the format: a little-endian u64 header length,
    a JSON header of dtype, shape and byte offsets, then the raw little-endian data)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    base = 8 + n
    buf = bytearray(data[base:])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        count = math.prod(info["shape"])
        if end - begin != count * torch.empty((), dtype=dtype).element_size():
            raise ValueError(f"{path}: tensor {name}: byte range does not match its shape")
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


class GPT(nn.Module):
    """GPT-2 built from fastlm's LayerNorm, attention and fused head + cross-entropy."""

    def _norm(self, n, bias):
        return LayerNorm(n, bias=bias)

    def _sdpa(self):
        return scaled_dot_product_attention

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"{type(self).__name__}: config must be a GPTConfig, got "
                            f"{type(config).__name__}")
        self.config = config
        sdpa = self._sdpa()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "wpe": nn.Embedding(config.block_size, config.n_embd),
            "drop": nn.Dropout(config.dropout),
            "h": nn.ModuleList([Block(config, self._norm, sdpa) for _ in range(config.n_layer)]),
            "ln_f": self._norm(config.n_embd, config.bias),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=False):
        """Parameters (the tied embedding counted once); without the position embedding with
        non_embedding=True (nanoGPT's convention for FLOP counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx, cache=None, pos=0):
        """The final LayerNorm's output (B, T, n_embd) for tokens idx (B, T) at positions
        pos..pos+T-1."""
        if idx.dim() != 2:
            raise ValueError(f"{type(self).__name__}: idx must be (batch, time), got shape "
                             f"{list(idx.shape)}")
        T = idx.shape[1]
        if pos + T > self.config.block_size:
            raise ValueError(f"{type(self).__name__}: cannot run a sequence of length "
                             f"{pos + T}: block_size is {self.config.block_size}")
        positions = torch.arange(pos, pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        blocks = self.transformer.h
        if self._fusable():
            # Each residual add + dropout + the next LayerNorm is one fused kernel
            # (fastlm.add_layer_norm): ln_1 of block i+1 (or ln_f) follows block i's MLP add.
            norms = [n for b in blocks for n in (b.ln_1, b.ln_2)] + [self.transformer.ln_f]
            h = norms[0](x)
            for i, b in enumerate(blocks):
                a = b.attn.branch(h, None if cache is None else cache[i], pos)
                h, x = add_norm(a, x, b.ln_2, b.attn.resid_dropout)
                h, x = add_norm(b.mlp.branch(h), x, norms[2 * i + 2], b.mlp.dropout)
            return h
        for i, block in enumerate(blocks):
            x = block(x, None if cache is None else cache[i], pos)
        return self.transformer.ln_f(x)

    def _fusable(self):
        """fastlm's LayerNorms throughout, the blocks as defined here, and no hook that the
        fused path would skip."""
        blocks = self.transformer.h
        norms, drops, mods = [self.transformer.ln_f], [], [blocks]
        for b in blocks:
            if (type(b) is not Block or type(b.attn) is not CausalSelfAttention
                    or type(b.mlp) is not MLP):
                return False
            norms += [b.ln_1, b.ln_2]
            drops += [b.attn.resid_dropout, b.mlp.dropout]
            mods += [b, b.attn, b.mlp]
        return (all(type(n) is LayerNorm for n in norms)
                and all(type(d) is nn.Dropout for d in drops)
                and no_hooks(*norms, *drops, *mods))

    def _loss(self, h, targets):
        """(logits, loss) of the head on hidden states h with targets (ignore_index -1)."""
        loss = linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-1)
        return None, loss

    def forward(self, idx, targets=None):
        """(logits, loss).

        With targets (B, T) (-1 = ignored): logits is None and loss is the mean cross-entropy,
        equal to F.cross_entropy(full logits, targets, ignore_index=-1), computed by the fused
        chunked head (the full logits are never materialised).
        Without targets: logits of the last position only, (B, 1, vocab_size), as nanoGPT at
        inference (what generation needs), and loss None. For every position's logits, use
        ``model.lm_head(model.hidden_states(idx))``.
        """
        h = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(h[:, -1:, :]), None
        return self._loss(h, targets)

    # -------------------------------------------------------------------------------------
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type=None,
                             **kwargs):
        """fastlm.optim.AdamW with weight decay on the parameters with dim >= 2 (matmul
        weights and embeddings) and none on biases and LayerNorm weights. device_type is
        accepted for nanoGPT compatibility (the step is always fused); other keyword arguments
        (eps, master_weights, max_grad_norm, ...) go to AdamW."""
        from ..optim import AdamW

        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return AdamW(groups, lr=learning_rate, betas=betas, **kwargs)

    # -------------------------------------------------------------------------------------
    def _new_cache(self, batch, device, dtype):
        c = self.config
        shape = (batch, c.n_head, c.block_size, c.n_embd // c.n_head)
        return [(torch.empty(shape, device=device, dtype=dtype),
                 torch.empty(shape, device=device, dtype=dtype)) for _ in range(c.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it (B, T + new).

        Each token is drawn from softmax(logits / temperature), restricted to the top_k most
        likely when top_k is given; temperature 0 takes the argmax. With use_cache (the
        default), the prompt is run once (prefill, is_causal=True) and each new token attends
        to the cached keys and values; once the sequence would exceed block_size, each step
        recomputes from the last block_size tokens (the positions shift, so the cache no longer
        applies). use_cache=False always recomputes; both draw the same tokens under the same
        seed. Dropout follows the module's mode: call model.eval() first.
        """
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
        block = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            T = idx.shape[1]
            if use_cache and T <= block:
                if cache is None:
                    dtype = self.lm_head.weight.dtype
                    if torch.is_autocast_enabled(idx.device.type):
                        dtype = torch.get_autocast_dtype(idx.device.type)
                    cache = self._new_cache(idx.shape[0], idx.device, dtype)
                    h = self.hidden_states(idx, cache, 0)
                else:
                    h = self.hidden_states(idx[:, -1:], cache, T - 1)
            else:
                h = self.hidden_states(idx[:, -block:])
            logits = self.lm_head(h[:, -1, :]).float()
            idx = torch.cat((idx, self._sample(logits, temperature, top_k)), dim=1)
        return idx

    @staticmethod
    def _sample(logits, temperature, top_k):
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)

    # -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dropout=0.0):
        """GPT-2 weights from a local Hugging Face checkpoint directory: config.json and
        model.safetensors (or pytorch_model.bin). Nothing is downloaded. Conv1D weights are
        transposed into Linear layout; the lm head is the (tied) token embedding."""
        who = f"{cls.__name__}.from_pretrained"
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{who}: {path!r} is not a directory; expected a local "
                                    "Hugging Face GPT-2 checkpoint directory (config.json and "
                                    "model.safetensors or pytorch_model.bin). fastlm never "
                                    "downloads weights.")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{who}: {cfg_path} is missing (the checkpoint's "
                                    "config.json, with n_layer, n_head, n_embd, n_positions "
                                    "and vocab_size)")
        with open(cfg_path) as f:
            hf = json.load(f)
        missing = [k for k in ("n_layer", "n_head", "n_embd", "vocab_size") if k not in hf]
        if missing:
            raise ValueError(f"{who}: {cfg_path} lacks {', '.join(missing)}")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{who}: activation_function {act!r} is not GPT-2's tanh GELU")
        eps = hf.get("layer_norm_epsilon", 1e-5)
        config = GPTConfig(vocab_size=hf["vocab_size"],
                           block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                           dropout=dropout, bias=True)
        st = os.path.join(path, "model.safetensors")
        pt = os.path.join(path, "pytorch_model.bin")
        if os.path.isfile(st):
            sd = _read_safetensors(st)
        elif os.path.isfile(pt):
            sd = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{who}: no weights in {path}: expected model.safetensors "
                                    "or pytorch_model.bin")
        model = cls(config)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
        model.load_hf_state_dict(sd)
        return model

    def load_hf_state_dict(self, sd):
        """Copy a Hugging Face GPT-2 state dict (keys with or without the "transformer."
        prefix; Conv1D weights stored transposed) into this model."""
        ours = self.state_dict()
        seen = set()
        with torch.no_grad():
            for key, value in sd.items():
                name = key if key.startswith("transformer.") or key == "lm_head.weight" \
                    else "transformer." + key
                if name.endswith((".attn.bias", ".attn.masked_bias")):
                    continue  # the causal-mask buffers of older transformers versions
                if name == "lm_head.weight":
                    continue  # tied to transformer.wte.weight
                if name not in ours:
                    raise KeyError(f"from_pretrained: unexpected key {key!r} in the checkpoint")
                transposed = name.endswith(_HF_TRANSPOSED)
                want = tuple(ours[name].shape)
                want = want[::-1] if transposed else want
                if tuple(value.shape) != want:
                    raise ValueError(f"from_pretrained: {key!r} has shape {list(value.shape)}, "
                                     f"expected {list(want)}"
                                     + (" (Conv1D layout: in, out)" if transposed else ""))
                if transposed:
                    value = value.t()
                ours[name].copy_(value)
                seen.add(name)
        absent = sorted(set(ours) - seen - {"lm_head.weight"})
        if absent:
            raise KeyError(f"from_pretrained: the checkpoint lacks {', '.join(absent[:5])}"
                           + (f" and {len(absent) - 5} more" if len(absent) > 5 else ""))


class TorchGPT(GPT):
    """The same GPT written with torch.nn only: torch.nn.LayerNorm,
    F.scaled_dot_product_attention, and with targets the full logits and F.cross_entropy
    (returned as in nanoGPT: (logits (B, T, vocab), loss)). Same names, init and state_dict
    as GPT; the baseline of tests, `fastlm train --compare torch` and `fastlm bench gpt`."""

    def _norm(self, n, bias):
        return nn.LayerNorm(n, bias=bias)

    def _sdpa(self):
        return F.scaled_dot_product_attention

    def _loss(self, h, targets):
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss


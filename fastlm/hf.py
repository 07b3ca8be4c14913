"""fastlm for Hugging Face transformers models: Llama, Mistral, Qwen2, Qwen3, Gemma and GPT-2.

    import fastlm
    model = transformers.AutoModelForCausalLM.from_config(config)   # or from_pretrained
    replaced = fastlm.patch(model)      # in place, weights kept; returns what it replaced

or only the attention, through transformers' attention-interface registry:

    import fastlm.hf                    # registers attn_implementation="fastlm"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastlm")

What fastlm.patch swaps in a model of a family it knows (by class, never by name):
- RMSNorm modules (LlamaRMSNorm, ..., GemmaRMSNorm with its 1 + weight) -> fastlm.rms_norm;
  GPT-2's torch.nn.LayerNorm -> fastlm.nn.LayerNorm (fastlm.patch's torch.nn table).
- gated MLPs (gate_proj, up_proj, down_proj with SiLU or a GELU) -> fastlm.swiglu / geglu.
- the rotary application inside the attention modules -> fastlm.apply_rotary_emb. The module's
  own forward (transformers' code of the installed version) runs unchanged except that its
  global name apply_rotary_pos_emb resolves to fastlm's.
- the attention kernel -> fastlm.scaled_dot_product_attention, by setting the model's
  attn_implementation to "fastlm" (registered with transformers' AttentionInterface and
  AttentionMaskInterface, the mask being sdpa's).
- the causal-LM loss -> fastlm.linear_cross_entropy on the final hidden states (never the full
  logits): in training mode with labels, the forward returns the loss and empty logits
  (shape (B, S, 0)); in eval mode, or without labels, logits and loss are transformers' own.
  Not for models with final-logit soft-capping (Gemma 2/3), which keep transformers' loss.

Every module is re-classed in place (module.__class__ = a subclass of its class that only
overrides forward), so parameters, buffers, hooks, state_dict keys, device and dtype stay.
Patched models pickle by state_dict (the subclasses are made at run time).
"""

import functools
import importlib
import inspect
import logging
import types

import torch
import torch.nn.functional as F

logger = logging.getLogger("fastlm")


# The modeling code the patches hook into (imported here so a missing transformers fails at
# import with transformers' own message).
importlib.import_module("transformers.modeling_utils")
importlib.import_module("transformers.masking_utils")

ATTN_NAME = "fastlm"
# family -> (transformers module, {role: class name}); roles: norm, gemma_norm, mlp, attn, lm.
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama",
              {"norm": "LlamaRMSNorm", "mlp": "LlamaMLP", "attn": "LlamaAttention",
               "lm": "LlamaForCausalLM"}),
    "mistral": ("transformers.models.mistral.modeling_mistral",
                {"norm": "MistralRMSNorm", "mlp": "MistralMLP", "attn": "MistralAttention",
                 "lm": "MistralForCausalLM"}),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2",
              {"norm": "Qwen2RMSNorm", "mlp": "Qwen2MLP", "attn": "Qwen2Attention",
               "lm": "Qwen2ForCausalLM"}),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3",
              {"norm": "Qwen3RMSNorm", "mlp": "Qwen3MLP", "attn": "Qwen3Attention",
               "lm": "Qwen3ForCausalLM"}),
    "gemma": ("transformers.models.gemma.modeling_gemma",
              {"gemma_norm": "GemmaRMSNorm", "mlp": "GemmaMLP", "attn": "GemmaAttention",
               "lm": "GemmaForCausalLM"}),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2",
             {"attn": "GPT2Attention", "lm": "GPT2LMHeadModel"}),
}


# ---------------------------------------------------------------------------------------------
# The attention function registered as attn_implementation="fastlm".
def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' sdpa_attention_forward with fastlm.scaled_dot_product_attention: q (B, Hq,
    L, D), k and v (B, Hk, S, D) (grouped-query heads natively), the mask transformers built
    (boolean, True = attend, or additive) or None with the causal flag. Returns (out (B, L, Hq,
    D) contiguous, None)."""
    from .ops.attention import scaled_dot_product_attention

    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"fastlm attention does not support `{unsupported}`; use "
                             "attn_implementation='eager' for this model")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and is_causal
    if is_causal and kv_len > q_len:  # a prefill into an empty static cache (as sdpa's)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                       dropout_p=dropout, is_causal=is_causal, scale=scaling,
                                       enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register attn_implementation="fastlm" with transformers (attention and mask
    interfaces); idempotent. Runs on `import fastlm.hf`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


register()


# ---------------------------------------------------------------------------------------------
# Replacement forwards.
def _norm_forward(self, hidden_states):
    """LlamaRMSNorm (and twins): weight * rms_normalized(x) in x's dtype (a float32 weight on a
    16-bit x promotes, as transformers' does). Autocast does not upcast it (nor transformers')."""
    from .ops.rms_norm import rms_norm

    x, w = hidden_states, self.weight
    if w.dtype != x.dtype:
        x = x.to(torch.promote_types(w.dtype, x.dtype))
    with torch.autocast(x.device.type, enabled=False):
        return rms_norm(x, w.shape, w.to(x.dtype) if w.dtype != x.dtype else w,
                        self.variance_epsilon)


def _gemma_norm_forward(self, x):
    """GemmaRMSNorm: rms_normalized(x) * (1 + weight), in float32, returned in x's dtype."""
    from .ops.rms_norm import rms_norm

    with torch.autocast(x.device.type, enabled=False):
        return rms_norm(x, self.weight.shape, self.weight.float() + 1.0, self.eps)


def _mlp_kind(act):
    """'swiglu', ('geglu', approximate) or None for a transformers activation module."""
    from transformers import activations as A

    def classes(*names):  # the names differ between transformers versions
        return tuple(c for c in (getattr(A, n, None) for n in names) if c is not None)

    if type(act) in (torch.nn.SiLU, *classes("SiLUActivation")):
        return "swiglu"
    if type(act) in classes("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"):
        return "geglu", "tanh"  # gelu's tanh form, each of them
    if type(act) in classes("GELUActivation") or (type(act) is torch.nn.GELU
                                                  and act.approximate == "none"):
        return "geglu", "none"
    return None


def _mlp_forward(self, x):
    from .ops.glu import geglu, swiglu

    gate, up = self.gate_proj(x), self.up_proj(x)
    kind = _mlp_kind(self.act_fn)
    h = swiglu(gate, up) if kind == "swiglu" else geglu(gate, up, approximate=kind[1])
    return self.down_proj(h)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **_):
    """transformers' apply_rotary_pos_emb on fastlm.apply_rotary_emb."""
    from .ops.rotary import apply_rotary_emb

    return apply_rotary_emb(q, k, cos, sin, unsqueeze_dim)


def _rebind(fn, overrides):
    """`fn` with the global names in `overrides` resolved to other objects: the innermost
    function (under decorators that set __wrapped__) rebuilt on a copy of its globals, each
    wrapper rebuilt on a closure that holds the rebuilt inner one. None when a wrapper does not
    hold its inner function in a closure cell."""
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        new = types.FunctionType(fn.__code__, {**fn.__globals__, **overrides}, fn.__name__,
                                 fn.__defaults__, fn.__closure__)
    else:
        new_inner = _rebind(inner, overrides)
        cells = fn.__closure__ or ()

        def holds(c):
            try:
                return c.cell_contents is inner
            except ValueError:  # an empty cell
                return False

        if new_inner is None or not any(holds(c) for c in cells):
            return None
        new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                 tuple(types.CellType(new_inner) if holds(c) else c
                                       for c in cells))
        new.__wrapped__ = new_inner
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update({k: v for k, v in fn.__dict__.items() if k != "__wrapped__"})
    new.__qualname__ = fn.__qualname__
    return new


def _calls_rotary(fn):
    return "apply_rotary_pos_emb" in inspect.unwrap(fn).__code__.co_names


class _Head(torch.nn.Linear):
    """An lm_head (torch.nn.Linear) that, while its model computes a fused loss, records its
    input and returns empty logits (B, S, 0) instead of the (B, S, vocab) ones."""

    def forward(self, input):
        if getattr(self, "_fastlm_defer", False):
            self._fastlm_hidden = input
            return input.new_empty((*input.shape[:-1], 0))
        return F.linear(input, self.weight, self.bias)


def _causal_lm_forward(base_forward):
    @functools.wraps(base_forward)
    def forward(self, *args, **kwargs):
        head = self.get_output_embeddings()
        fused = (self.training and isinstance(head, _Head) and "labels" in kwargs
                 and kwargs["labels"] is not None
                 and isinstance(kwargs.get("logits_to_keep", 0), int)
                 and kwargs.get("logits_to_keep", 0) == 0)
        if not fused:
            return base_forward(self, *args, **kwargs)
        head._fastlm_defer = True
        try:
            return base_forward(self, *args, **kwargs)
        finally:
            head._fastlm_defer = False
            head.__dict__.pop("_fastlm_hidden", None)

    return forward


def _fused_loss(head, original):
    """The model's loss_function: fastlm.linear_cross_entropy on the hidden states the head
    recorded (transformers' ForCausalLMLoss semantics: labels shifted left with ignore_index
    padding, or shift_labels; mean, or sum / num_items_in_batch); transformers' own loss when
    the head recorded nothing (eval mode, logits_to_keep)."""
    from .ops.cross_entropy import linear_cross_entropy

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None,
                      ignore_index=-100, shift_labels=None, **kwargs):
        hidden = head.__dict__.pop("_fastlm_hidden", None)
        if hidden is None:
            return original(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                            ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = linear_cross_entropy(hidden, head.weight, shift_labels.to(hidden.device),
                                    head.bias, ignore_index=ignore_index, reduction=reduction)
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    loss_function._fastlm_fused = True
    return loss_function


# ---------------------------------------------------------------------------------------------
# Re-classing.
_SUBCLASSES = {}


def _subclass(cls, attrs):
    """The fastlm subclass of `cls` overriding `attrs` (made once per class)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {**attrs, "__module__": __name__,
                                          "__qualname__": cls.__name__, "_fastlm_patched": True})
        _SUBCLASSES[cls] = sub
    return sub


def _known_classes():
    """{class: (family, role)} for the families this transformers provides."""
    out = {}
    for family, (module, roles) in FAMILIES.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for role, name in roles.items():
            cls = getattr(mod, name, None)
            if cls is not None:
                out[cls] = (family, role)
    return out


def _is_transformers_model(model):
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _names(cls, new):
    return f"transformers.{cls.__name__}", f"{__name__}.{new.__name__}"


def patch(model, *, rms_norm=True, mlp=True, rotary=True, attention=True, loss=True):
    """Swap the transformers modules of `model` that fastlm knows (see the module docstring);
    returns [(qualified name, old, new)] of what it replaced. A transformers model with none
    of the known classes is left alone and said so (logger "fastlm", WARNING)."""
    known = _known_classes()
    replaced = []
    families = set()
    for name, module in model.named_modules():
        cls = type(module)
        if getattr(cls, "_fastlm_patched", False) or cls not in known:
            continue
        family, role = known[cls]
        families.add(family)
        new = None
        if role in ("norm", "gemma_norm") and rms_norm:
            new = _subclass(cls, {"forward": _norm_forward if role == "norm"
                                  else _gemma_norm_forward})
        elif role == "mlp" and mlp and _mlp_kind(getattr(module, "act_fn", None)) is not None:
            new = _subclass(cls, {"forward": _mlp_forward})
        elif role == "attn" and rotary and _calls_rotary(cls.forward):
            fwd = _rebind(cls.forward, {"apply_rotary_pos_emb": apply_rotary_pos_emb})
            if fwd is not None:
                new = _subclass(cls, {"forward": fwd})
        elif role == "lm" and loss:
            new = _patch_loss(module, cls, replaced, name)
        if new is not None:
            module.__class__ = new
            replaced.append((name, *_names(cls, new)))
    if attention and families and hasattr(model, "set_attn_implementation"):
        old = getattr(model.config, "_attn_implementation", None)
        if old != ATTN_NAME:
            model.set_attn_implementation(ATTN_NAME)
            replaced.append(("", f"attn_implementation={old!r}", f"attn_implementation="
                             f"{ATTN_NAME!r}"))
    if not families and _is_transformers_model(model):
        logger.warning("fastlm.patch: %s is a transformers model of a family fastlm does not "
                       "know (it knows %s); left alone apart from its torch.nn modules",
                       type(model).__name__, ", ".join(FAMILIES))
    return replaced


def _patch_loss(lm, cls, replaced, name):
    """The causal-LM subclass with the fused loss, and the lm_head re-classed (recorded in
    `replaced`); None where the loss is not fused (soft-capped logits, an unusual head)."""
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        logger.info("fastlm.patch: %s soft-caps its logits; its loss stays transformers'",
                    cls.__name__)
        return None
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return None
    head.__class__ = _Head
    head_name = next(n for n, m in lm.named_modules() if m is head)
    replaced.append((f"{name}.{head_name}" if name else head_name, "torch.nn.Linear",
                     f"{__name__}._Head"))
    lm.loss_function = _fused_loss(head, lm.loss_function)
    return _subclass(cls, {"forward": _causal_lm_forward(cls.forward)})

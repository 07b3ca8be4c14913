"""fastlm.patch: run an existing model's torch.nn LayerNorm, RMSNorm, MultiheadAttention and
Transformer modules, and the Hugging Face transformers Llama, Mistral, Qwen2, Qwen3, Gemma and
GPT-2 models (fastlm/hf.py), on fastlm's kernels, in place, weights kept.

    model = MyModel()                      # written against torch.nn
    replaced = fastlm.patch(model)
    # [("encoder.norm", "torch.nn.LayerNorm", "fastlm.nn.LayerNorm"), ...]

Each fastlm module is a subclass of its torch twin that adds no state, so patching re-classes
the module object in place (``module.__class__ = fastlm_twin``): the module stays the same
object, in the same place of the model, with the very same Parameter and buffer objects (an
optimizer built before patching keeps working), on the same device and dtype, in the same
training mode, with its hooks and state_dict keys. Only modules whose type is exactly the
torch.nn class are patched: fastlm modules (already patched) and user subclasses of the torch
classes (whose forward may differ) are left alone, which makes patching idempotent.

A transformers model (transformers already imported) is also handed to fastlm.hf.patch, which
recognizes the families above by class. What was replaced is logged (logger "fastlm", INFO).
"""

import logging
import sys

import torch

# kind -> the torch.nn class names that it covers, each with a same-named fastlm.nn twin.
KINDS = {
    "layer_norm": ("LayerNorm",),
    "rms_norm": ("RMSNorm",),
    "attention": ("MultiheadAttention",),
    "transformer": ("TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder",
                    "TransformerDecoder", "Transformer"),
}


def _table(layer_norm, rms_norm, attention, transformer):
    """{torch.nn class: fastlm.nn class} for the kinds switched on."""
    from . import nn as fnn  # deferred: fastlm.nn's Transformer modules call patch()

    wanted = {"layer_norm": layer_norm, "rms_norm": rms_norm, "attention": attention,
              "transformer": transformer}
    # vars(): fastlm.nn's own classes, never the torch.nn fallback of its module __getattr__.
    return {getattr(torch.nn, name): vars(fnn)[name]
            for kind, names in KINDS.items() if wanted[kind] for name in names}


def _reclass(module, cls):
    module.__class__ = cls
    if hasattr(module, "use_nested_tensor"):
        # fastlm.nn.TransformerEncoder never converts to nested tensors.
        module.use_nested_tensor = False


def patch(model, *, layer_norm=True, rms_norm=True, attention=True, transformer=True, mlp=True,
          rotary=True, loss=True):
    """Replace, in place, the torch.nn modules of `model` (itself included) that fastlm has
    twins for, and the parts of a transformers model fastlm knows; returns [(qualified name,
    old type name, new type name)] of what it replaced, the torch.nn modules first, in
    model.named_modules() order ("" names the model itself).

    layer_norm: torch.nn.LayerNorm -> fastlm.nn.LayerNorm.
    rms_norm: torch.nn.RMSNorm -> fastlm.nn.RMSNorm; transformers' RMSNorm modules.
    attention: torch.nn.MultiheadAttention -> fastlm.nn.MultiheadAttention.
    transformer: torch.nn.TransformerEncoderLayer, TransformerDecoderLayer, TransformerEncoder,
        TransformerDecoder and Transformer -> fastlm.nn's (their forward without torch's
        inference fast path; their LayerNorm and attention submodules follow the two options
        above).
    attention (transformers): attn_implementation "fastlm" (fastlm.scaled_dot_product_attention).
    mlp, rotary, loss (transformers): the gated MLP activations, the rotary application, the
        causal-LM loss (fused linear cross-entropy) -- see fastlm.hf.
    Weights are kept as the same Parameter objects (nothing is copied), so device, dtype,
    requires_grad, optimizer state and training mode are unchanged. Modules shared at several
    names are patched once, under their first name.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fastlm.patch: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    table = _table(layer_norm, rms_norm, attention, transformer)
    replaced = []
    for name, module in model.named_modules():
        new = table.get(type(module))
        if new is None:
            continue
        old = type(module)
        _reclass(module, new)
        replaced.append((name, f"torch.nn.{old.__name__}", f"fastlm.nn.{new.__name__}"))
    if "transformers" in sys.modules:
        from . import hf

        replaced += hf.patch(model, rms_norm=rms_norm, mlp=mlp, rotary=rotary,
                             attention=attention, loss=loss)
    if replaced:
        kinds = sorted({f"{old} -> {new}" for _, old, new in replaced})
        logging.getLogger("fastlm").info("fastlm.patch: replaced %d in %s: %s", len(replaced),
                                         type(model).__name__, "; ".join(kinds))
    return replaced

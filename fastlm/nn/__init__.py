"""Drop-in replacements for torch.nn modules, running on fastlm's kernels.

Names that fastlm.nn does not define resolve to torch.nn's (Module, Linear, Embedding, ...), so
a model's source can switch with its import alone: `import fastlm.nn as nn`.
"""

import torch.nn as _torch_nn

from .layer_norm import LayerNorm
from .multihead_attention import MultiheadAttention
from .linear_cross_entropy import LinearCrossEntropyLoss
from .rms_norm import RMSNorm
from .transformer import (Transformer, TransformerDecoder, TransformerDecoderLayer,
                          TransformerEncoder, TransformerEncoderLayer)

__all__ = ["LayerNorm", "RMSNorm", "LinearCrossEntropyLoss", "MultiheadAttention",
           "TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer",
           "TransformerDecoder", "Transformer"]


def __getattr__(name):
    """torch.nn's attribute for a name fastlm.nn does not define (PEP 562)."""
    try:
        return getattr(_torch_nn, name)
    except AttributeError:
        raise AttributeError(f"module 'fastlm.nn' has no attribute {name!r} (nor has "
                             "torch.nn)") from None


def __dir__():
    return sorted(set(globals()) | set(dir(_torch_nn)))

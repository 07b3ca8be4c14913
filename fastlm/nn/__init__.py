"""Drop-in replacements for torch.nn modules, running on fastlm's kernels."""

from .layer_norm import LayerNorm

__all__ = ["LayerNorm"]

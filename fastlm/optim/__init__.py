"""Drop-in replacements for torch.optim optimizers, running fastlm's fused step."""

from .adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]

"""Models built from fastlm's ops: GPT-2 (GPT, GPTConfig) and its plain-torch twin TorchGPT."""

from .gpt import GPT, GPTConfig, TorchGPT

__all__ = ["GPT", "GPTConfig", "TorchGPT"]

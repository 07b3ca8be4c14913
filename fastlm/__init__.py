"""fastlm: fused Transformer-training kernels for PyTorch.

    import fastlm
    y = fastlm.layer_norm(x, (1024,), weight, bias)      # like torch.nn.functional.layer_norm
    o = fastlm.scaled_dot_product_attention(q, k, v, is_causal=True)  # like F.sdpa
    ln = fastlm.nn.LayerNorm(1024)                       # like torch.nn.LayerNorm
    opt = fastlm.optim.AdamW(model.parameters())         # like torch.optim.AdamW
    with fastlm.use_backend("triton"): ...               # force a backend

Importing fastlm loads fastlm._C (the C++/CUDA kernels, registered as torch.ops.fastlm.*);
if it cannot be loaded, the torch and triton backends still work and
fastlm.backends.available() says why.
"""

__version__ = "0.1.0"

from . import _ext, backends  # noqa: E402, F401  (_ext loads fastlm._C: its op registrations)
from .backends import use_backend  # noqa: E402
from .ops.layer_norm import layer_norm  # noqa: E402
from .ops.attention import scaled_dot_product_attention, varlen_attention  # noqa: E402
from . import nn, optim  # noqa: E402

__all__ = ["layer_norm", "scaled_dot_product_attention", "varlen_attention", "use_backend", "backends", "nn", "optim", "__version__"]

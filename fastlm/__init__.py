"""fastlm: fused Transformer-training kernels for PyTorch.

    import fastlm
    y = fastlm.layer_norm(x, (1024,), weight, bias)      # like torch.nn.functional.layer_norm
    o = fastlm.scaled_dot_product_attention(q, k, v, is_causal=True)  # like F.sdpa
    ln = fastlm.nn.LayerNorm(1024)                       # like torch.nn.LayerNorm
    opt = fastlm.optim.AdamW(model.parameters())         # like torch.optim.AdamW
    fastlm.patch(model)                                  # torch.nn modules -> fastlm.nn, in place
    with fastlm.use_backend("triton"): ...               # force a backend
    model = fastlm.models.GPT(fastlm.models.GPTConfig()) # GPT-2 (imported on first use)

Importing fastlm loads fastlm._C (the C++/CUDA kernels, registered as torch.ops.fastlm.*);
if it cannot be loaded, the torch and triton backends still work and
fastlm.backends.available() says why.
"""

__version__ = "0.1.0"

from . import _ext, backends  # noqa: E402, F401  (_ext loads fastlm._C: its op registrations)
from .backends import use_backend  # noqa: E402
from ._errors import ArgumentError, ArgumentTypeError  # noqa: E402
from .ops.layer_norm import layer_norm  # noqa: E402
from .ops.add_layer_norm import add_layer_norm  # noqa: E402
from .ops.attention import scaled_dot_product_attention, varlen_attention  # noqa: E402
from .ops.rms_norm import rms_norm, add_rms_norm  # noqa: E402
from .ops.glu import swiglu, geglu  # noqa: E402
from .ops.rotary import apply_rotary_emb  # noqa: E402
from .ops.cross_entropy import linear_cross_entropy  # noqa: E402
from . import nn, optim  # noqa: E402
from .patch import patch  # noqa: E402  (the function; the module is fastlm.patch in sys.modules)

__all__ = ["ArgumentError", "ArgumentTypeError", "layer_norm", "add_layer_norm", "scaled_dot_product_attention", "varlen_attention", "rms_norm", "add_rms_norm", "swiglu", "geglu", "apply_rotary_emb", "linear_cross_entropy", "use_backend", "backends", "nn", "optim", "patch", "__version__"]


def __getattr__(name):
    """fastlm.models is imported on first use, so that `import fastlm` stays light."""
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

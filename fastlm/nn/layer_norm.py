import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.layer_norm import layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on fastlm's fused kernel.

    Same constructor (normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device,
    dtype), parameters, initialisation and state_dict keys as torch.nn.LayerNorm, of which it
    is a subclass: either module loads the other's state_dict. ``torch.jit.script`` compiles
    it (as torch's); the scripted module runs torch's F.layer_norm (TorchScript cannot compile
    fastlm's backend dispatch).
    """

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # TorchScript compiles this branch only
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

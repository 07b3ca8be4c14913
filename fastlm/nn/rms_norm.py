import torch

from ..ops.rms_norm import rms_norm


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on fastlm's fused kernel.

    Same constructor (normalized_shape, eps=None, elementwise_affine=True, device, dtype),
    parameters, initialisation and state_dict keys as torch.nn.RMSNorm, of which it is a
    subclass: either module loads the other's state_dict.
    """

    def forward(self, x):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)

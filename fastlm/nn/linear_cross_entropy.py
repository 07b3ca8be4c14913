import torch

from ..ops.cross_entropy import linear_cross_entropy


class LinearCrossEntropyLoss(torch.nn.Module):
    """The loss of a linear classifier (a language-model head) without its logits:
    ``loss(input, weight, target, bias=None)`` equals
    ``torch.nn.CrossEntropyLoss(ignore_index, reduction, label_smoothing)(F.linear(input,
    weight, bias), target)``, computed by fastlm.linear_cross_entropy in chunks of rows so the
    (rows, classes) logits never exist whole.

    reduction: "mean" or "sum" ("sum" for gradient accumulation: divide by the total count of
    non-ignored targets yourself). chunk_size: rows per chunk (default: about 2**26 logits).
    """

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                 chunk_size=None):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.chunk_size = chunk_size

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, self.ignore_index,
                                    self.reduction, self.label_smoothing, self.chunk_size)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}")

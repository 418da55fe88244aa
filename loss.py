"""Focal loss on the discriminator's two-column output ``[1 - s, s]``."""
from __future__ import annotations

import torch


class FocalLoss(torch.nn.Module):
    """Binary focal loss with label smoothing, as in the reference (gamma 2, smooth 1e-5).

    The one-hot target is clamped to ``[smooth, 1 - smooth]``; ``pt = onehot . input + smooth``;
    the loss is ``-(1 - pt)^gamma * ln(pt)``, averaged over samples.
    """

    def __init__(self, gamma: float = 2.0, smooth: float = 1e-5):
        super().__init__()
        self.gamma = gamma
        self.smooth = smooth

    def forward(self, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Args: probabilities (N, C) rows summing to 1; target (N,) or (N, 1) class indices."""
        num_classes = probabilities.shape[1]
        index = target.reshape(-1, 1).long()
        one_hot = torch.zeros(index.shape[0], num_classes, device=probabilities.device, dtype=probabilities.dtype)
        one_hot.scatter_(1, index, 1)
        one_hot = torch.clamp(one_hot, self.smooth / (num_classes - 1), 1.0 - self.smooth)
        pt = (one_hot * probabilities).sum(1) + self.smooth
        return (-torch.pow(1 - pt, self.gamma) * pt.log()).mean()

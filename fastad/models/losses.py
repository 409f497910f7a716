"""Training losses of the CLIP-based reference models, as the authors define them.

* ``binary_focal_loss``: InCTRL's ``BinaryFocalLoss`` (alpha 1, gamma 2, mean).
  With ``logits=True`` it applies ``binary_cross_entropy_with_logits`` to its input,
  which InCTRL v1 feeds with sigmoid *probabilities* (a quirk of the released code,
  kept where a config asks for it).
* ``focal_loss``: the multi-class focal loss of the AnomalyCLIP / FAPrompt code
  base (``loss.py FocalLoss``: probabilities in, one-hot clamped to
  [smooth/(C-1), 1-smooth], pt = sum(onehot * p) + smooth, -(1-pt)^gamma log pt, mean).
* ``dice_loss``: the same code base's ``BinaryDiceLoss`` (smooth 1, mean over images).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["binary_focal_loss", "focal_loss", "dice_loss"]


def binary_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
                      logits: bool = True) -> torch.Tensor:
    """Mean of alpha * (1 - pt)^gamma * BCE, pt = exp(-BCE)."""
    targets = targets.to(inputs.dtype)
    if logits:
        bce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    else:
        bce = F.binary_cross_entropy(inputs.clamp(0.0, 1.0), targets, reduction="none")
    pt = torch.exp(-bce)
    return (alpha * (1 - pt) ** gamma * bce).mean()


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """probs [B, K, ...] class probabilities, target [B, ...] integer class map."""
    k = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, k)
    onehot = F.one_hot(target.reshape(-1).long(), k).to(p.dtype)
    if smooth:
        onehot = onehot.clamp(smooth / (k - 1), 1.0 - smooth)
    pt = (onehot * p).sum(-1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over images of (2 |x*y| + 1) / (|x| + |y| + 1)."""
    n = targets.shape[0]
    x = inputs.reshape(n, -1)
    y = targets.reshape(n, -1).to(x.dtype)
    dice = (2 * (x * y).sum(1) + smooth) / (x.sum(1) + y.sum(1) + smooth)
    return 1 - dice.sum() / n

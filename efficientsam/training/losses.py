"""SAM's training loss: 20 x sigmoid focal + dice on the mask logits, MSE on predicted IoU.

Shapes: logits (N, K, h, w) for N prompts with K candidate masks each, targets (N, h, w) bool or
{0, 1} float, predicted IoU (N, K). Per-pixel terms are averaged over the pixels of a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al.) averaged over the last two axes: (..., h, w) -> (...).

    Per pixel: -a_t (1 - p_t)^gamma log p_t, with p_t the probability of the true class and
    a_t = alpha for object pixels, 1 - alpha for background (alpha < 0: no weighting)."""
    targets = targets.to(logits.dtype)
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probability * targets + (1 - probability) * (1 - targets)
    loss = cross_entropy * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(dim=(-2, -1))


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - (2 |P n T| + s) / (|P| + |T| + s) on sigmoid probabilities: (..., h, w) -> (...)."""
    targets = targets.to(logits.dtype)
    probability = torch.sigmoid(logits).flatten(-2)
    targets = targets.flatten(-2)
    intersection = (probability * targets).sum(-1)
    return 1 - (2 * intersection + smooth) / (probability.sum(-1) + targets.sum(-1) + smooth)


def logits_iou(logits: torch.Tensor, targets: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """IoU of the thresholded logits (>= threshold, as served) with the targets, no gradient:
    (..., h, w) -> (...); 1.0 where both are empty."""
    with torch.no_grad():
        predicted = logits >= threshold
        targets = targets.bool()
        intersection = (predicted & targets).flatten(-2).sum(-1).float()
        union = (predicted | targets).flatten(-2).sum(-1).float()
        return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


@dataclass
class LossOutput:
    """total: scalar to back-propagate (mean over prompts); the rest are per prompt, detached:
    chosen (N,) index of the candidate trained; focal, dice, iou_mse (N,) of it; iou (N,) the
    actual IoU of the chosen candidate and served_iou (N,) of the one with the highest
    predicted IoU (the candidate the backend would serve)."""

    total: torch.Tensor
    chosen: torch.Tensor
    focal: torch.Tensor
    dice: torch.Tensor
    iou_mse: torch.Tensor
    iou: torch.Tensor
    served_iou: torch.Tensor


def segmentation_loss(
    logits: torch.Tensor,
    iou_predictions: torch.Tensor,
    targets: torch.Tensor,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
    iou_on_all_candidates: bool = True,
    focal_alpha: float = 0.25,
) -> LossOutput:
    """SAM's loss for logits (N, K, h, w), predicted IoU (N, K), targets (N, h, w).

    The mask loss focal_weight x focal + dice_weight x dice is back-propagated only for each
    prompt's lowest-loss candidate (SAM: the ambiguity of one click). The IoU head regresses
    the actual IoU of the thresholded candidates (MSE): of all K candidates when
    ``iou_on_all_candidates`` (so that the candidate served by predicted IoU is the good one)
    or only of the chosen one (SAM's paper)."""
    if logits.dim() != 4 or iou_predictions.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (N, K, h, w) and IoU (N, K), got {tuple(logits.shape)} and "
            f"{tuple(iou_predictions.shape)}"
        )
    expanded = targets.unsqueeze(1).expand_as(logits)
    focal = sigmoid_focal_loss(logits, expanded, alpha=focal_alpha)  # (N, K)
    dice = dice_loss(logits, expanded)
    mask_loss = focal_weight * focal + dice_weight * dice
    chosen = mask_loss.detach().argmin(dim=1)  # (N,)
    actual_iou = logits_iou(logits, expanded)  # (N, K)
    squared = (iou_predictions - actual_iou) ** 2
    rows = torch.arange(logits.shape[0], device=logits.device)
    iou_mse = squared.mean(dim=1) if iou_on_all_candidates else squared[rows, chosen]
    total = (mask_loss[rows, chosen] + iou_weight * iou_mse).mean()
    served = iou_predictions.detach().argmax(dim=1)
    return LossOutput(
        total=total,
        chosen=chosen,
        focal=focal.detach()[rows, chosen],
        dice=dice.detach()[rows, chosen],
        iou_mse=iou_mse.detach(),
        iou=actual_iou[rows, chosen],
        served_iou=actual_iou[rows, served],
    )

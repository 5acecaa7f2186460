"""SAM's loss terms on hand-made logits and targets."""

from __future__ import annotations

import math

import pytest
import torch

from efficientsam.training.losses import (
    dice_loss,
    logits_iou,
    segmentation_loss,
    sigmoid_focal_loss,
)


def test_focal_loss_at_zero_logits_matches_the_formula():
    logits = torch.zeros(1, 2, 2)
    targets = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # p = 0.5 everywhere: CE = log 2, (1 - p_t)^2 = 1/4; alpha 0.25 on objects, 0.75 on background
    expected = (2 * 0.25 + 2 * 0.75) * 0.25 * math.log(2) / 4
    assert float(sigmoid_focal_loss(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_focal_loss_down_weights_easy_pixels():
    targets = torch.ones(1, 4, 4)
    easy = sigmoid_focal_loss(torch.full((1, 4, 4), 3.0), targets)
    hard = sigmoid_focal_loss(torch.full((1, 4, 4), -3.0), targets)
    p = torch.sigmoid(torch.tensor(3.0))
    assert float(easy) == pytest.approx(float(0.25 * (1 - p) ** 2 * -torch.log(p)), rel=1e-5)
    assert float(hard) > 100 * float(easy)


def test_dice_loss_values():
    targets = torch.zeros(1, 4, 4)
    targets[0, :2, :2] = 1  # 4 object pixels
    confident_all = torch.full((1, 4, 4), 50.0)  # P = 16 pixels
    assert float(dice_loss(confident_all, targets)) == pytest.approx(1 - 9 / 21, rel=1e-5)
    perfect = torch.where(targets.bool(), 50.0, -50.0)
    assert float(dice_loss(perfect, targets)) == pytest.approx(0.0, abs=1e-6)
    assert float(sigmoid_focal_loss(perfect, targets)) == pytest.approx(0.0, abs=1e-12)


def test_logits_iou_thresholds_at_zero_inclusive():
    targets = torch.tensor([[1, 1], [0, 0]]).bool()
    logits = torch.tensor([[0.0, -1.0], [0.0, -1.0]])  # predicts column 0 (0 counts)
    assert float(logits_iou(logits, targets)) == pytest.approx(1 / 3)
    assert float(logits_iou(torch.full((2, 2), -1.0), torch.zeros(2, 2))) == 1.0


def _candidates(targets: torch.Tensor) -> torch.Tensor:
    """3 candidates: all background, the target, all foreground (N=1)."""
    good = torch.where(targets.bool(), 20.0, -20.0)
    return torch.stack([torch.full_like(good, -20.0), good, torch.full_like(good, 20.0)])[None]


def test_lowest_loss_candidate_is_chosen_and_only_it_gets_mask_gradient():
    targets = torch.zeros(1, 8, 8)
    targets[0, 2:6, 2:6] = 1
    logits = _candidates(targets[0]).requires_grad_(True)
    iou = torch.zeros(1, 3, requires_grad=True)
    out = segmentation_loss(logits, iou, targets, iou_weight=0.0)
    assert out.chosen.tolist() == [1]
    assert float(out.iou[0]) == 1.0
    out.total.backward()
    grad = logits.grad.abs().flatten(2).sum(-1)[0]
    assert grad[0] == 0 and grad[2] == 0 and grad[1] > 0
    assert torch.all(iou.grad == 0)


def test_choice_moves_with_the_target():
    targets = torch.ones(1, 8, 8)  # the all-foreground candidate is now right
    logits = _candidates(torch.zeros(8, 8))
    logits[0, 1] = -20.0
    out = segmentation_loss(logits, torch.zeros(1, 3), targets)
    assert out.chosen.tolist() == [2]


@pytest.mark.parametrize("on_all", [True, False])
def test_iou_regression_targets_the_actual_iou(on_all):
    targets = torch.zeros(1, 8, 8)
    targets[0, :4] = 1  # half the image
    logits = _candidates(targets[0])  # actual IoUs: 0, 1, 0.5
    iou = torch.tensor([[0.3, 0.6, 0.9]], requires_grad=True)
    # the chosen (perfect) candidate's focal and dice are ~0, so the total is the IoU term
    out = segmentation_loss(logits, iou, targets, iou_on_all_candidates=on_all)
    assert out.chosen.tolist() == [1]
    squared = torch.tensor([0.3**2, 0.4**2, 0.4**2])
    expected = squared.mean() if on_all else squared[1]
    assert float(out.total.detach()) == pytest.approx(float(expected), rel=1e-5)
    out.total.backward()
    assert (iou.grad[0] != 0).tolist() == ([True, True, True] if on_all else [False, True, False])
    # served: the highest predicted IoU (0.9, the all-foreground mask, IoU 0.5)
    assert float(out.served_iou[0]) == pytest.approx(0.5)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError):
        segmentation_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1), torch.zeros(2, 4, 4))

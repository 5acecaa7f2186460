"""evaluate: deterministic, exact on a model whose answer is known; the box-fill reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from efficientsam.training import TrainingImage, box_fill_baseline, embed_image, evaluate

from .conftest import disc


def _all_foreground(model):
    """A copy whose mask logits are exactly 0 everywhere (>= 0: every pixel is object)."""
    rigged = copy.deepcopy(model)
    with torch.no_grad():
        for mlp in rigged.mask_decoder.output_hypernetworks_mlps:
            mlp.fc.weight.zero_()
            mlp.fc.bias.zero_()
    return rigged


def test_evaluate_is_deterministic(ti_model, random_images):
    first = evaluate(ti_model, random_images)
    second = evaluate(ti_model, random_images)
    assert first == second
    assert first["count"] == 3 and len(first["masks"]) == 3
    assert [(m["image_id"], m["mask_index"]) for m in first["masks"]] == [
        ("first", 0),
        ("first", 1),
        ("second", 0),
    ]
    for key in ("one_click_miou", "box_miou", "three_click_miou"):
        assert 0.0 <= first[key] <= 1.0


def test_evaluate_scores_a_known_answer_exactly(ti_model):
    rigged = _all_foreground(ti_model)
    full = np.ones((50, 70), bool)
    half = np.zeros((50, 70), bool)
    half[:, :35] = True
    images = [TrainingImage("full", torch.randn(1, 256, 64, 64), [full, half])]
    result = evaluate(rigged, images)
    full_scores, half_scores = result["masks"]
    for key in ("one_click_iou", "box_iou", "three_click_iou"):
        assert full_scores[key] == 1.0
        assert half_scores[key] == 0.5  # everything predicted; corrective clicks cannot help
    assert result["one_click_miou"] == pytest.approx(0.75)


def test_evaluate_can_run_the_encoder(ti_model):
    image = np.random.default_rng(3).integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    stored = TrainingImage("e", embed_image(ti_model, image), [disc(40, 60, 30, 20, 12)], image)
    assert evaluate(ti_model, [stored], encode_images=True) == evaluate(ti_model, [stored])
    with pytest.raises(ValueError, match="needs TrainingImage.image"):
        evaluate(ti_model, [TrainingImage("x", stored.embedding, stored.masks)], encode_images=True)


def test_box_fill_baseline():
    rectangle = np.zeros((40, 40), bool)
    rectangle[5:20, 10:30] = True
    round_one = disc(200, 200, 100, 100, 80)
    zeros = torch.zeros(1, 256, 64, 64)
    assert box_fill_baseline([TrainingImage("r", zeros, [rectangle])]) == 1.0
    assert box_fill_baseline([TrainingImage("d", zeros, [round_one])]) == pytest.approx(
        np.pi / 4, abs=0.01
    )
    empty = TrainingImage("e", zeros, [np.zeros((5, 5), bool)])
    assert np.isnan(box_fill_baseline([empty]))

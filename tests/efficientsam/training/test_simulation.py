"""Prompt simulation: where clicks land, box noise, corrective click signs, the 6-token cap."""

from __future__ import annotations

import numpy as np
import pytest

from efficientsam.prompts import MAX_PROMPT_TOKENS, Prompt
from efficientsam.training.simulation import (
    add_click,
    corrective_click,
    distance_to_boundary,
    initial_prompt,
    interior_point,
    is_multimask,
    largest_error_region,
    noisy_box,
    prompt_tokens,
    room_for_clicks,
    sample_interior_points,
    tight_box,
)


def _rectangle(height=60, width=80, y0=10, y1=31, x0=20, x1=61) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _pixel(point: tuple[float, float] | np.ndarray) -> tuple[int, int]:
    """(row, column) of the pixel a continuous (x, y) point falls in."""
    return int(np.floor(point[1])), int(np.floor(point[0]))


def test_interior_point_is_the_centre_and_avoids_the_image_border():
    assert interior_point(_rectangle()) == (40.5, 20.5)
    touching = np.zeros((40, 40), bool)
    touching[:, :10] = True  # a strip along the left border
    x, _ = interior_point(touching)
    assert 4 <= x <= 6
    assert interior_point(np.zeros((5, 5), bool)) is None
    ties = [interior_point(_rectangle(y1=30), np.random.default_rng(s)) for s in range(8)]
    assert len(set(ties)) > 1  # a 2-pixel-high ridge of maxima: rng breaks the tie


def test_sampled_clicks_are_distinct_and_inside():
    mask = _rectangle()
    rng = np.random.default_rng(0)
    for _ in range(50):
        points = sample_interior_points(mask, 3, rng)
        pixels = {_pixel(p) for p in points}
        assert len(pixels) == 3 and all(mask[p] for p in pixels)
    depth = distance_to_boundary(mask)
    points = sample_interior_points(mask, 200, rng)
    assert np.mean([depth[_pixel(p)] for p in points]) > np.mean(depth[mask])  # interior bias


def test_tight_box_has_exclusive_far_edges():
    assert tight_box(_rectangle()) == (20.0, 10.0, 61.0, 31.0)
    assert tight_box(np.zeros((4, 4), bool)) is None


def test_box_noise_is_bounded_and_stays_in_the_image():
    rng = np.random.default_rng(1)
    big = _rectangle(600, 800, 50, 550, 40, 760)  # 720 x 500: 10 % would be 72 / 50 px
    tight = np.array(tight_box(big))
    shifts = []
    for _ in range(300):
        box = np.array(noisy_box(big, rng))
        shifts.append(box - tight)
        assert np.all(np.abs(box - tight) <= 20.0 + 1e-6)
        assert box[0] < box[2] and box[1] < box[3]
    assert np.abs(shifts).max() > 15  # the cap is reached, the noise is not tiny
    small = _rectangle(60, 80, 0, 10, 0, 20)  # 20 x 10 at the corner
    for _ in range(300):
        x0, y0, x1, y1 = noisy_box(small, rng)
        assert min(x0, y0) >= 0 and x1 <= 80 and y1 <= 60
        assert x1 - x0 >= 1 and y1 - y0 >= 1
        assert abs(x1 - 20) <= 20 * 0.1 * 5 and abs(y1 - 10) <= 10 * 0.1 * 5  # ~5 sigma


def test_corrective_click_is_positive_in_missed_object():
    target = _rectangle()
    predicted = target.copy()
    predicted[:, 40:] = False  # right part of the object missed
    for rng in (None, np.random.default_rng(0)):
        (point, label) = corrective_click(target, predicted, rng)
        assert label == 1 and target[_pixel(point)] and not predicted[_pixel(point)]


def test_corrective_click_is_negative_in_spill_and_picks_the_largest_error():
    target = _rectangle()
    predicted = target.copy()
    predicted[40:60, 0:80] = True  # 1,600 px of spill
    predicted[10:14, 20:30] = False  # 40 px missed
    region, label = largest_error_region(target, predicted)
    assert label == 0 and region.sum() == 1600
    for rng in (None, np.random.default_rng(0)):
        point, label = corrective_click(target, predicted, rng)
        assert label == 0 and predicted[_pixel(point)] and not target[_pixel(point)]
    assert corrective_click(target, target.copy()) is None


def test_first_prompts_are_boxes_or_positive_clicks_inside_the_mask():
    mask = _rectangle()
    rng = np.random.default_rng(2)
    kinds = set()
    for _ in range(200):
        prompt = initial_prompt(mask, rng, box_probability=0.4, max_clicks=3)
        assert prompt.num_tokens <= MAX_PROMPT_TOKENS
        if prompt.box is not None:
            kinds.add("box")
            assert len(prompt.points) == 0
        else:
            kinds.add(len(prompt.points))
            assert np.all(prompt.labels == 1)
            assert all(mask[_pixel(p)] for p in prompt.points)
    assert kinds == {"box", 1, 2, 3}
    assert initial_prompt(np.zeros((4, 4), bool), rng) is None


def test_room_for_clicks_and_serving_mode():
    box = Prompt.create(box=(1, 2, 30, 40))
    assert room_for_clicks(box) == 4 and not is_multimask(box)
    one = Prompt.create([[3, 4]])
    assert room_for_clicks(one) == 5 and is_multimask(one)
    two = add_click(one, (5.0, 6.0), 0)
    assert two.labels.tolist() == [1, 0] and not is_multimask(two)
    with pytest.raises(ValueError):
        add_click(one, (1.0, 1.0), 2)


def test_prompt_tokens_scale_to_the_model_frame_box_first():
    prompt = add_click(Prompt.create(box=(0, 0, 200, 100)), (100.0, 50.0), 1)
    points, labels = prompt_tokens([prompt, Prompt.create([[500, -5]])], [(100, 200), (50, 400)])
    assert points.shape == (2, 1, 3, 2) and labels.shape == (2, 1, 3)
    np.testing.assert_allclose(points[0, 0], [[0, 0], [1024, 1024], [512, 512]])
    assert labels[0, 0].tolist() == [2, 3, 1]
    np.testing.assert_allclose(points[1, 0, 0], [1024, 0])  # clamped to the image, as served
    assert labels[1, 0].tolist() == [1, -1, -1]

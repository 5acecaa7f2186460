"""LS context.result -> prompt: keypoints, rectangles (rotated), brush strokes, errors."""

from __future__ import annotations

import numpy as np
import pytest

from serving.labelstudio.context import PromptError, parse_context, stroke_prompt
from tests.http_fixtures import brush, keypoint, rectangle


def test_keypoints_percent_to_pixels_and_both_negative_fields():
    prompt = parse_context(
        [
            keypoint(50, 25),
            keypoint(10, 10, positive=False),
            keypoint(20, 80, positive=False, field="value.positive"),
            keypoint(30, 30, positive=None),  # absent: positive
        ]
    )
    np.testing.assert_allclose(prompt.prompt.points, [[320, 120], [64, 48], [128, 384], [192, 144]])
    assert prompt.prompt.labels.tolist() == [1, 0, 0, 1]
    assert prompt.size == (640, 480) and prompt.label == "Object" and prompt.prompt.box is None


def test_rectangle_and_rotation_gives_the_surrounding_box():
    plain = parse_context([rectangle(10, 20, 50, 25)])
    assert plain.prompt.box == pytest.approx((64, 96, 384, 216))
    rotated = parse_context([rectangle(25, 25, 20, 20, rotation=90)])
    # 128 x 96 px rectangle at (160, 120) turned 90 degrees clockwise about its top-left corner
    assert rotated.prompt.box == pytest.approx((160 - 96, 120, 160, 120 + 128))


def test_newest_rectangle_wins_and_the_others_are_reported():
    prompt = parse_context([rectangle(0, 0, 10, 10), rectangle(50, 50, 20, 20, label="Truck")])
    assert prompt.prompt.box == pytest.approx((320, 240, 448, 336))
    assert prompt.dropped_items == 1 and prompt.label == "Truck"


def test_brush_stroke_becomes_box_and_points_inside():
    mask = np.zeros((480, 640), bool)
    mask[100:120, 50:400] = True  # a long horizontal stroke
    prompt = parse_context([brush(mask)])
    assert prompt.prompt.box == pytest.approx((50, 100, 400, 120))
    points = prompt.prompt.points
    assert 2 <= len(points) <= 4 and (prompt.prompt.labels == 1).all()
    for x, y in points:
        assert mask[int(y), int(x)]
    assert points[:, 0].max() - points[:, 0].min() > 250  # spread along the stroke


def test_small_stroke_gives_points_only():
    mask = np.zeros((100, 100), bool)
    mask[40:44, 60:63] = True
    box, points = stroke_prompt(mask)
    assert box is None and len(points) >= 1
    assert all(mask[int(y), int(x)] for x, y in points)


def test_curved_stroke_points_stay_on_the_stroke():
    mask = np.zeros((200, 200), bool)
    yy, xx = np.mgrid[:200, :200]
    ring = np.abs(np.hypot(xx - 100, yy - 100) - 70) < 4  # a ring: its box centre is off-stroke
    mask |= ring
    _, points = stroke_prompt(mask)
    assert all(mask[int(y), int(x)] for x, y in points)


def test_no_prompt_items():
    assert parse_context([]) is None
    assert parse_context([{"type": "choices", "value": {}}]) is None


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([rectangle(10, 10, 0, 20)], "zero"),
        ([keypoint(150, 10)], "outside the image"),
        ([keypoint("x", 10)], "finite number"),
        ([{**keypoint(1, 1), "original_width": 0}], "original_width"),
        ([keypoint(1, 1), keypoint(2, 2, width=100)], "disagree"),
        ([{**brush(np.ones((4, 4), bool)), "original_width": 5}], "brush RLE claims"),
        ([{"type": "keypointlabels", "original_width": 4, "original_height": 4}], "value"),
    ],
)
def test_bad_contexts_are_clear_errors(items, message):
    with pytest.raises(PromptError, match=message):
        parse_context(items)

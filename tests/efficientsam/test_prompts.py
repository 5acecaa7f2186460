"""Prompt validation and the more-than-6-tokens policy."""

from __future__ import annotations

import numpy as np
import pytest

from efficientsam.prompts import MAX_PROMPT_TOKENS, Prompt, fit_prompt


def test_points_only_within_budget_are_kept_in_order():
    prompt = Prompt.create([[1, 2], [3, 4]], [1, 0])
    fitted = fit_prompt(prompt)
    np.testing.assert_array_equal(fitted.points, [[1, 2], [3, 4]])
    np.testing.assert_array_equal(fitted.labels, [1, 0])
    assert fitted.dropped_points == 0


def test_box_corners_come_first_and_are_sorted():
    fitted = fit_prompt(Prompt.create([[5, 5]], [0], box=(30, 40, 10, 20)))
    np.testing.assert_array_equal(fitted.points, [[10, 20], [30, 40], [5, 5]])
    np.testing.assert_array_equal(fitted.labels, [2, 3, 0])


def test_more_than_six_clicks_keeps_the_most_recent():
    points = [[i, i] for i in range(9)]
    fitted = fit_prompt(Prompt.create(points, [1, 0] * 4 + [1]))
    assert len(fitted.labels) == MAX_PROMPT_TOKENS
    np.testing.assert_array_equal(fitted.points[:, 0], [3, 4, 5, 6, 7, 8])
    assert fitted.kept_point_indices == (3, 4, 5, 6, 7, 8)
    assert fitted.dropped_points == 3


def test_box_plus_clicks_keeps_box_and_four_latest_clicks():
    points = [[i, 2 * i] for i in range(7)]
    fitted = fit_prompt(Prompt.create(points, box=(0, 0, 100, 100)))
    np.testing.assert_array_equal(fitted.labels, [2, 3, 1, 1, 1, 1])
    np.testing.assert_array_equal(fitted.points[2:, 0], [3, 4, 5, 6])
    assert fitted.dropped_points == 3


def test_box_only_and_default_positive_labels():
    assert fit_prompt(Prompt.create(box=[1, 2, 3, 4])).labels.tolist() == [2, 3]
    assert Prompt.create([[1.5, 2.25]]).labels.tolist() == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "at least one point or a box"),
        ({"points": [[1, 2]], "labels": [1, 1]}, "1 points but 2 labels"),
        ({"points": [[1, 2]], "labels": [2]}, "1 \\(positive\\) or 0"),
        ({"points": [[1, 2, 3]]}, "\\(N, 2\\)"),
        ({"points": [[np.nan, 2]]}, "finite"),
        ({"box": [1, 2, 3]}, "4 finite numbers"),
    ],
)
def test_bad_prompts_are_rejected_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Prompt.create(**kwargs)

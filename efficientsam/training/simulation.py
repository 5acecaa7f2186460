"""Prompt simulation: the clicks and boxes Label Studio users give, derived from a mask.

Coordinates are continuous pixels of the mask's frame (see :mod:`efficientsam.training.data`):
a click on pixel (r, c) is (c + 0.5, r + 0.5). Boxes are (x0, y0, x1, y1) with x1, y1
exclusive edges. Every prompt built here fits the decoder's 6 tokens (a box takes 2).
"""

from __future__ import annotations

import cv2
import numpy as np

from ..arrays import mask_to_box
from ..prompts import (
    LABEL_NEGATIVE,
    LABEL_PADDING,
    LABEL_POSITIVE,
    MAX_PROMPT_TOKENS,
    Prompt,
    fit_prompt,
    prompt_token_arrays,
)


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) float32: Euclidean distance of each mask pixel to the nearest pixel outside the
    mask, the image border counting as outside; 0 outside the mask."""
    padded = np.pad(np.asarray(mask, np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def interior_point(
    mask: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[float, float] | None:
    """The mask's most interior pixel (farthest from its boundary) as (x, y) pixel centre.
    Ties (a ridge, e.g. in a rectangle) are broken by ``rng``, or without one by taking the tied
    pixel nearest to the ties' centroid (the rectangle's centre). None for an empty mask."""
    distance = distance_to_boundary(mask)
    best = float(distance.max())
    if best <= 0:
        return None
    rows, cols = np.nonzero(distance >= best)
    if rng is not None:
        index = int(rng.integers(len(rows)))
    else:
        index = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return float(cols[index]) + 0.5, float(rows[index]) + 0.5


def sample_interior_points(mask: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct clicks inside the mask, drawn with probability proportional to the
    distance to the boundary (people click inside an object, rarely on its edge).
    Returns (count, 2) float32 (x, y) pixel centres (fewer if the mask has fewer pixels)."""
    distance = distance_to_boundary(mask)
    flat = distance.ravel()
    candidates = np.flatnonzero(flat > 0)
    if candidates.size == 0:
        return np.zeros((0, 2), np.float32)
    weights = flat[candidates].astype(np.float64)
    chosen = rng.choice(
        candidates, size=min(count, candidates.size), replace=False, p=weights / weights.sum()
    )
    rows, cols = np.divmod(chosen, mask.shape[1])
    return np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float32)


def tight_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) around the mask's pixels, exclusive far edges; None if empty."""
    box = mask_to_box(mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box  # inclusive pixel indices
    return float(x0), float(y0), float(x1 + 1), float(y1 + 1)


def noisy_box(
    mask: np.ndarray,
    rng: np.random.Generator,
    noise_fraction: float = 0.1,
    max_noise: float = 20.0,
) -> tuple[float, float, float, float] | None:
    """The tight box with each coordinate moved by Gaussian noise of std ``noise_fraction`` x
    the box side (SAM: 10 %), each shift clipped to +-``max_noise`` pixels (SAM: 20), then
    clipped to the image; keeps at least 1 pixel per side. None if the mask is empty."""
    box = tight_box(mask)
    if box is None:
        return None
    height, width = mask.shape
    x0, y0, x1, y1 = box
    std = noise_fraction * np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    shift = np.clip(rng.normal(0.0, 1.0, size=4) * std, -max_noise, max_noise)
    x0, y0, x1, y1 = (np.array(box) + shift).tolist()
    x0, x1 = sorted((float(np.clip(x0, 0, width)), float(np.clip(x1, 0, width))))
    y0, y1 = sorted((float(np.clip(y0, 0, height)), float(np.clip(y1, 0, height))))
    if x1 - x0 < 1:
        x0, x1 = (x0, x0 + 1) if x0 + 1 <= width else (x1 - 1, x1)
    if y1 - y0 < 1:
        y0, y1 = (y0, y0 + 1) if y0 + 1 <= height else (y1 - 1, y1)
    return x0, y0, x1, y1


def largest_error_region(
    target: np.ndarray, prediction: np.ndarray
) -> tuple[np.ndarray, int] | None:
    """The largest connected (8-neighbour) region of false negatives (target & ~prediction,
    label 1: needs a positive click) or false positives (prediction & ~target, label 0).
    Returns (region (H, W) bool, label), or None when the prediction is exact."""
    target = np.asarray(target, bool)
    prediction = np.asarray(prediction, bool)
    best: tuple[int, np.ndarray, int] | None = None
    for error, label in ((target & ~prediction, LABEL_POSITIVE), (prediction & ~target, 0)):
        if not error.any():
            continue
        count, regions, stats, _ = cv2.connectedComponentsWithStats(
            error.astype(np.uint8), connectivity=8
        )
        index = 1 + int(np.argmax(stats[1:count, cv2.CC_STAT_AREA]))
        area = int(stats[index, cv2.CC_STAT_AREA])
        if best is None or area > best[0]:
            best = (area, regions == index, label)
    if best is None:
        return None
    return best[1], best[2]


def corrective_click(
    target: np.ndarray, prediction: np.ndarray, rng: np.random.Generator | None = None
) -> tuple[tuple[float, float], int] | None:
    """The click a user adds to fix ``prediction``: inside the largest error region, positive
    (1) in missed object, negative (0) in spill. Without ``rng``: the region's most interior
    pixel (evaluation); with it: a pixel drawn with probability proportional to the distance to
    the region's boundary (training). Returns ((x, y), label), or None when nothing is wrong."""
    found = largest_error_region(target, prediction)
    if found is None:
        return None
    region, label = found
    if rng is None:
        point = interior_point(region)
    else:
        points = sample_interior_points(region, 1, rng)
        point = (float(points[0, 0]), float(points[0, 1])) if len(points) else None
    if point is None:
        return None
    return point, label


def initial_prompt(
    mask: np.ndarray,
    rng: np.random.Generator,
    box_probability: float = 0.5,
    max_clicks: int = 3,
    single_click_probability: float = 0.5,
    box_noise_fraction: float = 0.1,
    box_max_noise: float = 20.0,
) -> Prompt | None:
    """A first prompt as a user gives it: a noisy box (probability ``box_probability``) or
    positive clicks inside the mask: exactly one with probability ``single_click_probability``,
    else 2..``max_clicks``. None for an empty mask."""
    if not mask.any():
        return None
    if rng.random() < box_probability:
        return Prompt.create(box=noisy_box(mask, rng, box_noise_fraction, box_max_noise))
    count = 1
    if max_clicks > 1 and rng.random() >= single_click_probability:
        count = int(rng.integers(2, max_clicks + 1))
    points = sample_interior_points(mask, count, rng)
    return Prompt.create(points, np.full(len(points), LABEL_POSITIVE, np.int64))


def add_click(prompt: Prompt, point: tuple[float, float], label: int) -> Prompt:
    """The prompt with one more click (latest last); the box is kept."""
    if label not in (LABEL_POSITIVE, LABEL_NEGATIVE):
        raise ValueError(f"click label must be 1 or 0, got {label}")
    points = np.concatenate([prompt.points, np.asarray([point], np.float32)], axis=0)
    labels = np.concatenate([prompt.labels, np.asarray([label], np.int64)])
    return Prompt(points.astype(np.float32), labels, prompt.box)


def room_for_clicks(prompt: Prompt) -> int:
    """How many clicks can still be added without dropping any token."""
    return max(0, MAX_PROMPT_TOKENS - prompt.num_tokens)


def is_multimask(prompt: Prompt) -> bool:
    """Served as best-of-3 candidates (one click, no box), as the backend and workers do."""
    return prompt.box is None and len(prompt.points) == 1


def prompt_tokens(
    prompts: list[Prompt], sizes: list[tuple[int, int]], frame: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of images of the given (H, W) sizes -> the model's tokens in the ``frame`` x
    ``frame`` input frame: points (B, 1, T, 2) float32, labels (B, 1, T) int64, T the longest
    prompt, padded with (-1, -1) / -1. Order and 6-token policy as served (``fit_prompt``);
    points are clamped to the image first, as the predictor does (``prompt_token_arrays``)."""
    points, labels = prompt_token_arrays([fit_prompt(prompt) for prompt in prompts], sizes)
    image_sizes = np.array([(width, height) for height, width in sizes], np.float32)  # (B, 2)
    scaled = points * frame / image_sizes[:, None, :]
    points = np.where(labels[..., None] == LABEL_PADDING, points, scaled)
    return points[:, None], labels[:, None]

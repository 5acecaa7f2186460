"""Prompts for one image and the rule that fits them into the decoder's 6 prompt tokens.

Policy when a prompt has more than 6 tokens (EfficientSAM silently keeps only the first 6):
the box, if any, always keeps its two corner tokens; the remaining tokens go to the most recent
clicks (the last ones in the list), kept in their original order; older clicks are dropped and
the number dropped is reported. The rationale: the box states the object, the latest clicks are
the user's latest corrections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# Point label values of the EfficientSAM prompt format (this module needs no torch, so that
# the web tier can build prompts without it).
LABEL_PADDING = -1
LABEL_NEGATIVE = 0
LABEL_POSITIVE = 1
LABEL_BOX_TOP_LEFT = 2
LABEL_BOX_BOTTOM_RIGHT = 3

MAX_PROMPT_TOKENS = 6


@dataclass(frozen=True)
class Prompt:
    """Clicks and an optional box on one image, in pixels of the original image.

    points: (N, 2) float (x, y); labels: (N,) int, 1 positive / 0 negative, in click order
    (oldest first); box: (x0, y0, x1, y1) or None.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def create(
        cls,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
    ) -> Prompt:
        """Validate and normalise; labels default to all positive; box corners are sorted."""
        point_array = np.asarray([] if points is None else points, dtype=np.float32)
        if point_array.size == 0:
            point_array = np.zeros((0, 2), np.float32)
        elif point_array.ndim != 2 or point_array.shape[1] != 2:
            raise ValueError(f"points must be (N, 2) as (x, y), got shape {point_array.shape}")
        if labels is None:
            label_array = np.full(len(point_array), LABEL_POSITIVE, np.int64)
        else:
            label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(label_array) != len(point_array):
            raise ValueError(f"{len(point_array)} points but {len(label_array)} labels")
        if not np.isfinite(point_array).all():
            raise ValueError("point coordinates must be finite numbers")
        bad = set(label_array.tolist()) - {LABEL_POSITIVE, LABEL_NEGATIVE}
        if bad:
            raise ValueError(
                f"point labels must be 1 (positive) or 0 (negative), got {sorted(bad)}"
            )
        box_tuple = None
        if box is not None:
            box_array = np.asarray(box, dtype=np.float64).reshape(-1)
            if box_array.shape != (4,) or not np.isfinite(box_array).all():
                raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
            x0, y0, x1, y1 = box_array.tolist()
            box_tuple = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if box_tuple is None and len(point_array) == 0:
            raise ValueError("a prompt needs at least one point or a box")
        return cls(point_array, label_array, box_tuple)

    @property
    def num_tokens(self) -> int:
        return len(self.points) + (2 if self.box is not None else 0)


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt in the model's format, at most ``MAX_PROMPT_TOKENS`` tokens.

    points (M, 2) float32 (x, y) pixels; labels (M,) int64 with 2/3 for the box corners;
    dropped_points: how many clicks did not fit; kept_point_indices: which clicks did.
    """

    points: np.ndarray
    labels: np.ndarray
    dropped_points: int
    kept_point_indices: tuple[int, ...]


def fit_prompt(prompt: Prompt, max_tokens: int = MAX_PROMPT_TOKENS) -> FittedPrompt:
    """Box corners first, then as many of the most recent clicks as fit (see module docstring)."""
    points: list[np.ndarray] = []
    labels: list[int] = []
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        points += [np.array([x0, y0], np.float32), np.array([x1, y1], np.float32)]
        labels += [LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT]
    room = max(0, max_tokens - len(points))
    num_clicks = len(prompt.points)
    kept = tuple(range(max(0, num_clicks - room), num_clicks))
    points += [prompt.points[i] for i in kept]
    labels += [int(prompt.labels[i]) for i in kept]
    return FittedPrompt(
        points=np.asarray(points, np.float32).reshape(-1, 2),
        labels=np.asarray(labels, np.int64),
        dropped_points=num_clicks - len(kept),
        kept_point_indices=kept,
    )


def prompt_token_arrays(
    prompts: Sequence[FittedPrompt], sizes: Sequence[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Fitted prompts on images of the given (H, W) pixel sizes -> the model's token arrays:
    points (Q, T, 2) float32 (x, y) pixels clamped to each prompt's image, labels (Q, T) int64;
    T is the longest prompt, the rest padded with (-1, -1) / ``LABEL_PADDING``. (Clamping
    matters: the model turns negative coordinates into padding tokens.)"""
    num_tokens = max(len(prompt.labels) for prompt in prompts)
    points = np.full((len(prompts), num_tokens, 2), -1.0, np.float32)
    labels = np.full((len(prompts), num_tokens), LABEL_PADDING, np.int64)
    for index, (prompt, (height, width)) in enumerate(zip(prompts, sizes, strict=True)):
        count = len(prompt.labels)
        points[index, :count, 0] = np.clip(prompt.points[:, 0], 0, width)
        points[index, :count, 1] = np.clip(prompt.points[:, 1], 0, height)
        labels[index, :count] = prompt.labels
    return points, labels

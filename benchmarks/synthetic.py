"""A seeded synthetic segmentation domain, for tests and benchmarks of fine-tuning.

Each image holds exactly one object of the domain's "class": a blob of random shape, size and
position in a distinct colour (a saturated red-magenta, jittered and shaded), on textured
clutter (smooth colour noise, rectangles, ellipses and lines in other hues, pixel noise). The
target is well posed even for an encoder with random weights: the object is what has that
colour, whichever click or box points at it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

OBJECT_HUE = 170  # OpenCV hue (0..179): red-magenta
CLUTTER_HUES = (25, 45, 65, 85, 105, 125)  # yellow .. blue: at least 40 hue steps away
HSV_NOISE = ((25, 125), (20, 200), (70, 230))  # smooth background noise: hue, saturation, value


@dataclass(frozen=True)
class SyntheticSample:
    """image HxWx3 uint8 RGB; masks: one (H, W) bool mask per object (here exactly one)."""

    image_id: str
    image: np.ndarray
    masks: list[np.ndarray]


def blob_mask(
    rng: np.random.Generator, height: int, width: int, min_radius: float, max_radius: float
) -> np.ndarray:
    """A random star-shaped blob: radius R (1 + sum_k a_k cos(k theta + phi_k)), k = 2..4,
    anisotropically scaled and rotated, fully inside the image. Returns (H, W) bool."""
    radius = rng.uniform(min_radius, max_radius)
    amplitudes = rng.uniform(0.0, 0.22, size=3)
    phases = rng.uniform(0.0, 2 * np.pi, size=3)
    stretch = rng.uniform(0.65, 1.0)
    angle = rng.uniform(0.0, np.pi)
    margin = radius * 1.7 + 2
    cx = rng.uniform(margin, max(margin + 1, width - margin))
    cy = rng.uniform(margin, max(margin + 1, height - margin))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / stretch
    v = -dx * sin + dy * cos
    theta = np.arctan2(v, u)
    boundary = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(zip(amplitudes, phases, strict=True), start=2):
        boundary += amplitude * np.cos(k * theta + phase)
    return np.hypot(u, v) <= radius * boundary


def _hsv_colour(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    pixel = np.array([[[hue % 180, saturation, value]]], np.uint8)
    r, g, b = cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def clutter_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured clutter in hues away from the object's: HxWx3 uint8 RGB."""
    grids = [rng.uniform(*bounds, size=(6, 6)).astype(np.float32) for bounds in HSV_NOISE]
    hsv = np.stack(
        [cv2.resize(g, (width, height), interpolation=cv2.INTER_CUBIC) for g in grids], -1
    )
    hsv = np.clip(hsv, [CLUTTER_HUES[0], 0, 0], [CLUTTER_HUES[-1], 255, 255]).astype(np.uint8)
    image = np.ascontiguousarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    for _ in range(int(rng.integers(6, 14))):
        colour = _hsv_colour(
            rng.uniform(CLUTTER_HUES[0], CLUTTER_HUES[-1]),
            rng.uniform(60, 255),
            rng.uniform(60, 255),
        )
        kind = rng.integers(0, 3)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(max(4, min(height, width) // 16), max(5, min(height, width) // 4)))
        if kind == 0:
            cv2.rectangle(
                image, (x, y), (x + size, y + int(size * rng.uniform(0.4, 1.5))), colour, -1
            )
        elif kind == 1:
            axes = (size, max(2, int(size * rng.uniform(0.3, 1.0))))
            cv2.ellipse(image, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
        else:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, (x, y), end, colour, int(rng.integers(1, 5)))
    return image


def make_sample(
    rng: np.random.Generator,
    image_id: str,
    size_range: tuple[int, int] = (192, 320),
    radius_fraction: tuple[float, float] = (0.08, 0.22),
    objects: tuple[int, int] = (1, 1),
) -> SyntheticSample:
    """One image (random H, W in ``size_range`` pixels) with ``objects`` (min, max) shaded
    object blobs that do not touch each other (fewer if they do not fit)."""
    height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    image = clutter_background(rng, height, width).astype(np.float32)
    short = min(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    taken = np.zeros((height, width), bool)
    masks = []
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        for _attempt in range(20):
            mask = blob_mask(
                rng, height, width, radius_fraction[0] * short, radius_fraction[1] * short
            )
            if not (cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)) & taken).any():
                break
        else:
            continue
        colour = _hsv_colour(
            OBJECT_HUE + rng.uniform(-6, 6), rng.uniform(190, 255), rng.uniform(170, 255)
        )
        shade = 1.0 + 0.15 * np.sin(xs / rng.uniform(8, 30) + ys / rng.uniform(8, 30))
        image[mask] = np.asarray(colour, np.float32) * shade[mask, None]
        taken |= mask
        masks.append(mask)
    image += rng.normal(0.0, 6.0, size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return SyntheticSample(image_id, image, masks)


def make_dataset(
    count: int, seed: int = 0, prefix: str = "synthetic", objects: tuple[int, int] = (1, 1)
) -> list[SyntheticSample]:
    """``count`` samples, reproducible from ``seed`` (sample i depends only on seed and i);
    ``objects``: (min, max) objects per image (1, 1: the well-posed single-object domain)."""
    return [
        make_sample(
            np.random.default_rng([seed, index]), f"{prefix}-{seed}-{index}", objects=objects
        )
        for index in range(count)
    ]

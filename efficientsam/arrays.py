"""Torch-free helpers on numpy arrays: image checks and hashing, mask IoU and boxes.

Processes without torch (the HTTP server in Redis mode) use these too.
"""

from __future__ import annotations

import hashlib

import numpy as np


def validate_rgb_image(image: np.ndarray) -> np.ndarray:
    """Check an HxWx3 uint8 RGB array (C-contiguous copy if needed)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return np.ascontiguousarray(image)


def image_content_hash(image: np.ndarray) -> str:
    """Hex digest of an image's shape, dtype and pixels (what the model sees, not the file)."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.shape}|{image.dtype}|".encode())
    digest.update(memoryview(image).cast("B"))
    return digest.hexdigest()


def mask_iou(first: np.ndarray, second: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 if both empty);
    tensors are accepted too (copied to the CPU)."""
    a = _as_bool_array(first)
    b = _as_bool_array(second)
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


def _as_bool_array(mask: np.ndarray) -> np.ndarray:
    if hasattr(mask, "detach"):  # a tensor
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) pixel box of a boolean HxW mask (inclusive), None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])

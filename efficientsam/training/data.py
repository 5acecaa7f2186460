"""Training data: one image (a Label Studio task) with its instance masks, and the held-out split.

Coordinates used across ``efficientsam.training``: continuous pixel coordinates of the image, as
Label Studio sends them (pixel (row r, column c) spans [c, c + 1) x [r, r + 1)), so a click on a
pixel is at its centre (c + 0.5, r + 0.5) and a tight box around pixels c0..c1 is [c0, c1 + 1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ..modeling import EfficientSam
from ..utils import image_to_tensor

LOW_RES_SIZE = 256  # side of the decoder's mask logits (the model's 1024 frame / 4)
EMBEDDING_SHAPE = (1, 256, 64, 64)


@dataclass
class TrainingImage:
    """One image and its instance masks.

    embedding: (1, 256, 64, 64) float32 from the frozen encoder (e.g. ``Predictor.embed``; an
    inference-mode tensor is fine); masks: (H, W) bool each at the image's size; image: HxWx3
    uint8 RGB, only needed when the encoder is trained (LoRA) or re-run for evaluation.
    """

    image_id: str
    embedding: torch.Tensor
    masks: list[np.ndarray]
    image: np.ndarray | None = None

    def __post_init__(self) -> None:
        if tuple(self.embedding.shape) != EMBEDDING_SHAPE:
            raise ValueError(
                f"{self.image_id}: embedding must be {EMBEDDING_SHAPE}, "
                f"got {tuple(self.embedding.shape)}"
            )
        self.masks = [np.asarray(mask, dtype=bool) for mask in self.masks]
        shapes = {mask.shape for mask in self.masks}
        if any(len(shape) != 2 for shape in shapes) or len(shapes) > 1:
            raise ValueError(f"{self.image_id}: masks must all be (H, W), got {sorted(shapes)}")
        if self.image is not None:
            if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
                raise ValueError(f"{self.image_id}: image must be HxWx3 uint8")
            if shapes and shapes != {self.image.shape[:2]}:
                raise ValueError(
                    f"{self.image_id}: masks {sorted(shapes)} do not match the image "
                    f"{self.image.shape[:2]}"
                )

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) pixels, from the masks or the image."""
        if self.masks:
            return self.masks[0].shape
        if self.image is not None:
            return self.image.shape[:2]
        raise ValueError(f"{self.image_id}: no masks and no image: size unknown")


def embed_image(model: EfficientSam, image: np.ndarray) -> torch.Tensor:
    """The model's embedding of an HxWx3 uint8 RGB image, (1, 256, 64, 64) float32 on the CPU
    (a normal tensor, usable for training). Servers use ``Predictor.embed`` (cached) instead."""
    with torch.inference_mode():
        embedding = model.get_image_embeddings(image_to_tensor(image, model.device))
    return embedding.float().cpu().clone()


def low_res_target(mask: np.ndarray, size: int = LOW_RES_SIZE) -> np.ndarray:
    """(H, W) bool -> (size, size) bool, stretched like the model stretches the image (no
    padding): area average when shrinking, bilinear when enlarging, then >= 0.5."""
    height, width = mask.shape
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=interpolation)
    return resized >= 0.5


def _unit_hash(image_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, id): where the id falls, independent of the others."""
    digest = hashlib.blake2b(f"{seed}\x00{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_by_task(
    ids: Sequence[str], held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split image (task) ids into (train, held_out), both in input order.

    An id is held out when the hash of (seed, id) falls below ``held_out_fraction``, so the
    choice does not depend on the order of ``ids`` or on the other ids: when a project gains
    tasks, an id never moves between the two sets (held-out numbers stay comparable between
    versions). Whole tasks are split, never their masks. At least one id is held out and at
    least one trains when there are two or more distinct ids (the lowest / highest hash moves).
    """
    if not 0.0 <= held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1], got {held_out_fraction}")
    distinct = list(dict.fromkeys(ids))
    hashes = {image_id: _unit_hash(image_id, seed) for image_id in distinct}
    held = {image_id for image_id in distinct if hashes[image_id] < held_out_fraction}
    if len(distinct) >= 2:
        if not held:
            held.add(min(distinct, key=hashes.__getitem__))
        if len(held) == len(distinct):
            held.discard(max(distinct, key=hashes.__getitem__))
    train = [image_id for image_id in ids if image_id not in held]
    held_out = [image_id for image_id in ids if image_id in held]
    return train, held_out

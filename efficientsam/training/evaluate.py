"""Held-out evaluation with deterministic prompts, masks predicted the way they are served.

Per mask: one click at its most interior pixel (best of 3 candidates by predicted IoU), its
tight box (single mask), and three clicks: the first click, then two corrective clicks at the
most interior pixel of the largest error region of the model's own previous mask (positive in
missed object, negative in spill; single mask). Masks come from ``Predictor.decode``, the
served path (best candidate, bicubic upscale to the image size, threshold at 0).
"""

from __future__ import annotations

import numpy as np
import torch

from ..arrays import mask_iou
from ..cache import EmbeddingKey
from ..modeling import EfficientSam
from ..predictor import ImageEmbedding, Predictor
from ..prompts import Prompt
from ..utils import image_to_tensor
from .data import TrainingImage
from .simulation import add_click, corrective_click, interior_point, tight_box

CORRECTIVE_CLICKS = 2


def _served_masks(
    predictor: Predictor, embedding: ImageEmbedding, prompts: list[Prompt], multimask: bool
) -> np.ndarray:
    """Masks (Q, H, W) bool for Q prompts on one image, exactly as the predictor serves them
    (best candidate by predicted IoU, bicubic upscale to the image size, threshold)."""
    predictions = predictor.decode(embedding, prompts, multimask, return_best_only=True)
    return np.stack([prediction.best_mask for prediction in predictions])


def _image_embedding(model: EfficientSam, image: TrainingImage, encode: bool) -> torch.Tensor:
    if not encode:
        return image.embedding.to(model.device, torch.float32)
    if image.image is None:
        raise ValueError(f"{image.image_id}: encode_images needs TrainingImage.image")
    return model.get_image_embeddings(image_to_tensor(image.image, model.device))


def evaluate(
    model: EfficientSam,
    images: list[TrainingImage],
    seed: int = 0,
    encode_images: bool = False,
) -> dict:
    """mIoU (mean over all non-empty masks) with 1 click, the tight box and 3 clicks.

    ``seed`` only breaks ties between equally interior pixels, so a model is scored on the
    same prompts whatever its weights (the corrective clicks follow its own masks).
    ``encode_images``: run the model's encoder on ``TrainingImage.image`` instead of using the
    stored embeddings (needed for a model whose encoder was fine-tuned).
    Returns {"one_click_miou", "box_miou", "three_click_miou", "count", "masks": [per mask
    {"image_id", "mask_index", "one_click_iou", "box_iou", "three_click_iou"}]}.
    """
    was_training = model.training
    predictor = Predictor(model, prepared_images=1)  # puts the model in eval mode
    records: list[dict] = []
    try:
        with torch.inference_mode():
            for image_index, image in enumerate(images):
                indices = [i for i, mask in enumerate(image.masks) if mask.any()]
                if not indices:
                    continue
                embedding = ImageEmbedding(
                    _image_embedding(model, image, encode_images),
                    image.size,
                    # names the image for the predictor's per-image decoder cache (one entry)
                    EmbeddingKey("held-out", f"image-{image_index}", image.image_id),
                    from_cache=False,
                    encoder_seconds=0.0,
                )
                masks = [image.masks[i] for i in indices]
                rngs = [np.random.default_rng([seed, image_index, i]) for i in indices]
                clicks = [
                    Prompt.create([interior_point(mask, rng)], [1])
                    for mask, rng in zip(masks, rngs, strict=True)
                ]
                boxes = [Prompt.create(box=tight_box(mask)) for mask in masks]
                one_click = _served_masks(predictor, embedding, clicks, multimask=True)
                box = _served_masks(predictor, embedding, boxes, multimask=False)
                current, prompts = list(one_click), list(clicks)
                for _ in range(CORRECTIVE_CLICKS):
                    active = []
                    for row, mask in enumerate(masks):
                        click = corrective_click(mask, current[row])
                        if click is not None:
                            prompts[row] = add_click(prompts[row], *click)
                            active.append(row)
                    if not active:
                        break
                    decoded = _served_masks(
                        predictor, embedding, [prompts[r] for r in active], multimask=False
                    )
                    for row, predicted in zip(active, decoded, strict=True):
                        current[row] = predicted
                for row, mask in enumerate(masks):
                    records.append(
                        {
                            "image_id": image.image_id,
                            "mask_index": indices[row],
                            "one_click_iou": mask_iou(one_click[row], mask),
                            "box_iou": mask_iou(box[row], mask),
                            "three_click_iou": mask_iou(current[row], mask),
                        }
                    )
    finally:
        model.train(was_training)

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in records])) if records else float("nan")

    return {
        "one_click_miou": mean("one_click_iou"),
        "box_miou": mean("box_iou"),
        "three_click_miou": mean("three_click_iou"),
        "count": len(records),
        "masks": records,
    }


def box_fill_baseline(images: list[TrainingImage]) -> float:
    """mIoU of predicting each mask as its tight box filled (a reference line: what a box
    prompt gives with no model at all)."""
    scores = []
    for image in images:
        for mask in image.masks:
            box = tight_box(mask)
            if box is None:
                continue
            x0, y0, x1, y1 = (int(v) for v in box)
            filled = np.zeros_like(mask, dtype=bool)
            filled[y0:y1, x0:x1] = True
            scores.append(mask_iou(filled, mask))
    return float(np.mean(scores)) if scores else float("nan")

"""Fine-tuning EfficientSAM on a project's own masks (library only: no Label Studio, HTTP or
Redis code). See README, "Fine-tuning".

    images = [TrainingImage(task_id, predictor.embed(image).embeddings, masks) for ...]
    train_ids, held_out_ids = split_by_task([image.image_id for image in images])
    tuner = FineTuner(model, TrainingConfig())
    report = tuner.fit(train_images, progress=print)
    scores = evaluate(tuner.model, held_out_images)  # vs evaluate(model, held_out_images)
    changed = tuner.changed_tensors()  # the tensors a fine-tuned version has to store
"""

from .data import TrainingImage, embed_image, low_res_target, split_by_task
from .evaluate import box_fill_baseline, evaluate
from .losses import LossOutput, dice_loss, segmentation_loss, sigmoid_focal_loss
from .trainer import FineTuner, TrainingConfig, TrainingReport

__all__ = [
    "FineTuner",
    "LossOutput",
    "TrainingConfig",
    "TrainingImage",
    "TrainingReport",
    "box_fill_baseline",
    "dice_loss",
    "embed_image",
    "evaluate",
    "low_res_target",
    "segmentation_loss",
    "sigmoid_focal_loss",
    "split_by_task",
]

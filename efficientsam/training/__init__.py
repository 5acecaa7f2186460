"""Fine-tuning EfficientSAM on a project's own masks (library only: no Label Studio, HTTP or
Redis code): data and split, prompt simulation, losses, :class:`FineTuner`, held-out
:func:`evaluate`; SAMI encoder distillation (:mod:`.sami`). Usage: :class:`FineTuner`; README,
"Fine-tuning on a project's annotations".
"""

from .data import TrainingImage, embed_image, low_res_target, split_by_task
from .evaluate import box_fill_baseline, evaluate
from .losses import LossOutput, dice_loss, segmentation_loss, sigmoid_focal_loss
from .sami import SamiConfig, SamiDistiller, SamiReport, SamiResult, distil, teacher_embeddings
from .trainer import FineTuner, TrainingConfig, TrainingReport

__all__ = [
    "FineTuner",
    "LossOutput",
    "SamiConfig",
    "SamiDistiller",
    "SamiReport",
    "SamiResult",
    "TrainingConfig",
    "TrainingImage",
    "TrainingReport",
    "box_fill_baseline",
    "dice_loss",
    "distil",
    "embed_image",
    "evaluate",
    "low_res_target",
    "segmentation_loss",
    "sigmoid_focal_loss",
    "split_by_task",
    "teacher_embeddings",
]

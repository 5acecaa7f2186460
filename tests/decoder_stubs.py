"""Stand-in decoders for the "segment everything" pipeline: a function shaped like
``EfficientSam.predict_masks`` that makes up the logits, installed on a model so that both ways
the package decodes go through it (``predict_masks``, and ``decode_tokens`` followed by
``mask_decoder.candidate_masks``, which the automatic mask generator uses to compute only the
candidates that pass its IoU filter)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from efficientsam.modeling import EfficientSam

PredictMasks = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StubTokens:
    """What the stub ``decode_tokens`` gives: iou_predictions (1, Q, K), the stub's logits
    (Q, K, h, w) for ``candidate_masks``."""

    iou_predictions: torch.Tensor
    logits: torch.Tensor


def install_stub_decoder(
    model: EfficientSam, predict_masks: PredictMasks, monkeypatch: pytest.MonkeyPatch | None = None
) -> None:
    """Make ``model`` decode with ``predict_masks(prepared, points, labels, multimask_output,
    input_h, input_w)`` -> (logits (1, Q, K, h, w), iou (1, Q, K)): ``decode_tokens`` keeps the
    stub's logits and ``mask_decoder.candidate_masks`` picks the chosen ones, so every candidate
    comes out exactly as the stub made it. With ``monkeypatch`` the model is restored after the
    test."""

    def decode_tokens(prepared, points, labels, multimask_output, input_h, input_w):
        logits, iou = predict_masks(prepared, points, labels, multimask_output, input_h, input_w)
        return StubTokens(iou, logits[0])

    def candidate_masks(decoded, queries, candidates):
        return decoded.logits[queries[:, None], candidates]

    patches = [
        (model, "predict_masks", predict_masks),
        (model, "decode_tokens", decode_tokens),
        (model.mask_decoder, "candidate_masks", candidate_masks),
    ]
    for target, name, value in patches:
        if monkeypatch is not None:
            monkeypatch.setattr(target, name, value)
        else:
            setattr(target, name, value)

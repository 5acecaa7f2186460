"""Stand-in decoders for the "segment everything" pipeline: a function shaped like
``EfficientSam.predict_masks`` that makes up the logits, installed on a model so that both ways
the package decodes go through it (``predict_masks``, and ``decode_tokens`` followed by
``mask_decoder.upscale_and_predict_masks``, which the automatic mask generator uses to upscale
only the candidates that pass its IoU filter)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from efficientsam.modeling import EfficientSam
from efficientsam.modeling.mask_decoder import DecodedTokens

PredictMasks = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def install_stub_decoder(
    model: EfficientSam, predict_masks: PredictMasks, monkeypatch: pytest.MonkeyPatch | None = None
) -> None:
    """Make ``model`` decode with ``predict_masks(prepared, points, labels, multimask_output,
    input_h, input_w)`` -> (logits (1, Q, K, h, w), iou (1, Q, K)). ``decode_tokens`` carries the
    stub's logits as the "image states" (Q, K, h, w) with one-hot hypernetwork vectors (Q, K, K),
    and the stub upscaling combines them, so every candidate comes out exactly as the stub made
    it. With ``monkeypatch`` the model is restored after the test."""

    def decode_tokens(prepared, points, labels, multimask_output, input_h, input_w):
        logits, iou = predict_masks(prepared, points, labels, multimask_output, input_h, input_w)
        num_queries, num_masks, height, width = logits.shape[1:]
        one_hot = torch.eye(num_masks, dtype=logits.dtype).expand(num_queries, -1, -1)
        return DecodedTokens(logits[0], one_hot, iou, (height // 4, width // 4))

    def upscale_and_predict_masks(image_states, hyper_in, height, width):
        return torch.einsum("nkj,njyx->nkyx", hyper_in, image_states)

    patches = [
        (model, "predict_masks", predict_masks),
        (model, "decode_tokens", decode_tokens),
        (model.mask_decoder, "upscale_and_predict_masks", upscale_and_predict_masks),
    ]
    for target, name, value in patches:
        if monkeypatch is not None:
            monkeypatch.setattr(target, name, value)
        else:
            setattr(target, name, value)

"""The public reference cases of ../shared/fixtures with the README's tolerances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from efficientsam.arrays import mask_iou
from efficientsam.utils import image_to_tensor
from tests.conftest import REFERENCE_DIR

EMBEDDING_TOLERANCE = 1e-4
LOGIT_TOLERANCE = 1e-3
IOU_TOLERANCE = 1e-4
MIN_MASK_IOU = 0.999


def _cases() -> list[dict]:
    manifest = REFERENCE_DIR / "manifest.json"
    if not manifest.exists():
        return [{"name": "missing-manifest", "file": "missing"}]
    return json.loads(manifest.read_text())["cases"]


CASES = _cases()


def _assert_masks_match(logits: np.ndarray, reference: np.ndarray) -> None:
    for candidate in np.ndindex(*logits.shape[:3]):
        iou = mask_iou(logits[candidate] >= 0, reference[candidate] >= 0)
        assert iou >= MIN_MASK_IOU, f"candidate {candidate}: mask IoU {iou:.5f}"


def test_image_embeddings_match_reference(reference_embeddings):
    reference = np.load(REFERENCE_DIR / "ti_image_embeddings.npz")["image_embeddings"]
    assert reference_embeddings.shape == (1, 256, 64, 64)
    assert np.abs(reference_embeddings.numpy() - reference).max() <= EMBEDDING_TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
class TestReferenceCase:
    def _load(self, case):
        data = np.load(REFERENCE_DIR / case["file"])
        points = torch.from_numpy(data["points"].astype(np.float32))
        labels = torch.from_numpy(data["labels"].astype(np.int64))
        return data, points, labels

    def test_end_to_end_forward(self, case, ti_model, reference_image):
        data, points, labels = self._load(case)
        with torch.inference_mode():
            logits, iou = ti_model(image_to_tensor(reference_image), points, labels)
        expected = data["predicted_logits"]
        assert logits.shape == expected.shape
        assert np.abs(logits.numpy() - expected).max() <= LOGIT_TOLERANCE
        assert np.abs(iou.numpy() - data["iou_predictions"]).max() <= IOU_TOLERANCE
        _assert_masks_match(logits.numpy(), expected)
        np.testing.assert_array_equal(iou.argmax(-1).numpy(), data["best_mask_index"])

    def test_decoder_only_multimask(self, case, ti_model, reference_embeddings):
        data, points, labels = self._load(case)
        with torch.inference_mode():
            logits, iou = ti_model.predict_masks(
                reference_embeddings, points, labels, True, 480, 640
            )
        assert logits.shape == data["low_res_logits"].shape
        assert np.abs(logits.numpy() - data["low_res_logits"]).max() <= LOGIT_TOLERANCE
        assert np.abs(iou.numpy() - data["low_res_iou_predictions"]).max() <= IOU_TOLERANCE
        _assert_masks_match(logits.numpy(), data["low_res_logits"])

    def test_decoder_only_single_mask(self, case, ti_model, reference_embeddings):
        data, points, labels = self._load(case)
        with torch.inference_mode():
            logits, iou = ti_model.predict_masks(
                reference_embeddings, points, labels, False, 480, 640
            )
        expected = data["single_mask_low_res_logits"]
        assert logits.shape == expected.shape
        assert np.abs(logits.numpy() - expected).max() <= LOGIT_TOLERANCE
        assert np.abs(iou.numpy() - data["single_mask_iou_predictions"]).max() <= IOU_TOLERANCE
        _assert_masks_match(logits.numpy(), expected)


def test_checkpoint_is_the_documented_file(ti_checkpoint):
    import hashlib

    manifest = json.loads((REFERENCE_DIR / "manifest.json").read_text())
    digest = hashlib.sha256(ti_checkpoint.read_bytes()).hexdigest()
    assert digest == manifest["checkpoint_sha256"]

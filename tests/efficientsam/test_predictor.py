"""Predictor: stateful and stateless use, cache keys, batching, sizes, precision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientsam import load_model
from efficientsam.arrays import mask_iou
from efficientsam.cache import InMemoryEmbeddingCache
from efficientsam.predictor import Predictor
from efficientsam.prompts import Prompt
from tests.conftest import REFERENCE_DIR


@pytest.fixture(scope="module")
def predictor(ti_model):
    return Predictor(ti_model)


@pytest.fixture(scope="module")
def image_set(predictor, reference_image):
    return predictor.set_image(reference_image)


def test_predict_without_image_is_a_clear_error(ti_model):
    with pytest.raises(RuntimeError, match="set_image"):
        Predictor(ti_model).predict([[10, 10]])


def test_masks_match_the_reference_best_mask(predictor, image_set):
    data = np.load(REFERENCE_DIR / "ti_multi_point.npz")
    points = data["points"][0, 0]
    labels = data["labels"][0, 0]
    prediction = predictor.predict(points, labels)
    assert prediction.masks.shape == (3, 480, 640) and prediction.masks.dtype == bool
    assert prediction.low_res_logits.shape == (3, 256, 256)
    order = np.argsort(-data["iou_predictions"][0, 0])
    np.testing.assert_allclose(prediction.scores, data["iou_predictions"][0, 0][order], atol=1e-4)
    expected = data["predicted_logits"][0, 0][order] >= 0
    for ours, reference in zip(prediction.masks, expected, strict=True):
        assert mask_iou(ours, reference) >= 0.999
    best = predictor.predict(points, labels, return_best_only=True)
    assert best.masks.shape == (1, 480, 640)
    np.testing.assert_array_equal(best.best_mask, prediction.best_mask)


def test_box_prompt_matches_the_reference(predictor, image_set):
    data = np.load(REFERENCE_DIR / "ti_box.npz")
    (x0, y0), (x1, y1) = data["points"][0, 0]
    prediction = predictor.predict(box=(x0, y0, x1, y1), multimask_output=False)
    assert prediction.masks.shape == (1, 480, 640)
    np.testing.assert_allclose(
        prediction.scores, data["single_mask_iou_predictions"][0, 0], atol=1e-4
    )


def test_several_prompts_in_one_call_equal_single_calls(predictor, image_set):
    prompts = [
        Prompt.create([[210, 180]]),
        Prompt.create([[100, 100], [300, 200]], [1, 0], box=(50, 40, 400, 300)),
        Prompt.create(box=(400, 200, 600, 450)),
    ]
    batched = predictor.predict_prompts(prompts)
    for prompt, together in zip(prompts, batched, strict=True):
        alone = predictor.predict(prompt.points, prompt.labels, prompt.box)
        np.testing.assert_allclose(together.scores, alone.scores, atol=1e-5)
        assert mask_iou(together.best_mask, alone.best_mask) >= 0.999


def test_dropped_points_are_reported(predictor, image_set):
    points = [[20 + 40 * i, 30 + 30 * i] for i in range(8)]
    assert predictor.predict(points).dropped_points == 2
    assert predictor.predict(points, box=(0, 0, 300, 300)).dropped_points == 4
    assert predictor.predict(points[:3]).dropped_points == 0


def test_points_outside_the_image_are_clamped(predictor, image_set):
    outside = predictor.predict([[-30, 500]])
    border = predictor.predict([[0, 480]])
    np.testing.assert_allclose(outside.scores, border.scores, atol=1e-6)


def test_second_set_image_is_a_cache_hit(ti_model, reference_image):
    cache = InMemoryEmbeddingCache()
    predictor = Predictor(ti_model, cache=cache)
    first = predictor.set_image(reference_image)
    second = predictor.set_image(reference_image.copy())
    assert not first.from_cache and second.from_cache and second.encoder_seconds == 0
    assert torch.equal(first.embeddings, second.embeddings)
    assert (cache.stats().hits, cache.stats().misses) == (1, 1)
    # A different image (one pixel changed) is a different key.
    changed = reference_image.copy()
    changed[0, 0, 0] ^= 1
    assert not predictor.set_image(changed).from_cache


def test_changed_encoder_weights_never_reuse_old_embeddings(ti_checkpoint, reference_image):
    model = load_model(ti_checkpoint)
    cache = InMemoryEmbeddingCache()
    predictor = Predictor(model, cache=cache)
    before = predictor.set_image(reference_image)
    with torch.no_grad():
        model.image_encoder.neck[3].bias.add_(1.0)  # e.g. a fine-tune updated the encoder
    after = predictor.set_image(reference_image)
    assert not after.from_cache
    assert after.key.model_fingerprint != before.key.model_fingerprint
    assert not torch.allclose(after.embeddings, before.embeddings)
    # A predictor of another model sharing the cache does not see these entries either.
    other = Predictor(load_model(ti_checkpoint), cache=cache)
    assert other.set_image(reference_image).key == before.key  # same weights: same key


def test_changed_decoder_weights_refresh_prepared_images(ti_checkpoint, reference_image):
    model = load_model(ti_checkpoint)
    predictor = Predictor(model)
    predictor.set_image(reference_image)
    before = predictor.predict([[210, 180]])
    with torch.no_grad():
        model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.v_proj.bias.add_(0.5)
    after = predictor.predict([[210, 180]])
    with torch.inference_mode():
        embeddings = predictor.image_embedding.embeddings
        expected, expected_iou = model.predict_masks(
            embeddings, torch.tensor([[[[210.0, 180.0]]]]), torch.tensor([[[1]]]), True, 480, 640
        )
    order = torch.argsort(expected_iou[0, 0], descending=True)
    assert not np.allclose(before.low_res_logits, after.low_res_logits, atol=1e-3)
    np.testing.assert_allclose(after.scores, expected_iou[0, 0, order].numpy(), atol=1e-5)
    np.testing.assert_allclose(after.low_res_logits, expected[0, 0, order].numpy(), atol=1e-4)


def test_bad_images_are_rejected(predictor):
    with pytest.raises(ValueError, match="H x W x 3"):
        predictor.set_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((10, 10, 3), np.float32))


def test_unknown_precision_is_rejected(ti_model):
    with pytest.raises(ValueError, match="precision"):
        Predictor(ti_model, precision="int8")

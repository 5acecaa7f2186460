"""The fast decoder against the literal reference formulation (benchmarks/reference_model.py)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.random_weights import random_state_dict
from benchmarks.reference_model import reference_predict_masks
from efficientsam import build_efficient_sam_ti


@pytest.fixture(scope="module")
def random_model():
    model = build_efficient_sam_ti()
    model.load_state_dict(random_state_dict(model, seed=99))
    return model.eval()


def _prompts(batch: int, queries: int, points: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.rand(batch, queries, points, 2, generator=generator) * torch.tensor(
        [517.0, 333.0]
    )
    labels = torch.randint(0, 4, (batch, queries, points), generator=generator)
    labels[:, :, -1] = -1  # a caller's padding slot
    coordinates[:, :, -1] = -1
    return coordinates, labels


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize(("batch", "queries", "points"), [(1, 1, 1), (2, 3, 4), (1, 5, 8)])
def test_fast_decoder_matches_reference(random_model, multimask, batch, queries, points):
    embeddings = torch.randn(batch, 256, 64, 64, generator=torch.Generator().manual_seed(batch))
    coordinates, labels = _prompts(batch, queries, points, seed=queries)
    with torch.inference_mode():
        fast = random_model.predict_masks(
            embeddings, coordinates, labels, multimask, 333, 517, 120, 90
        )
        prepared = random_model.predict_masks(
            random_model.prepare_image_embeddings(embeddings),
            coordinates,
            labels,
            multimask,
            333,
            517,
            120,
            90,
        )
        reference = reference_predict_masks(
            random_model, embeddings, coordinates, labels, multimask, 333, 517, 120, 90
        )
    for ours in (fast, prepared):
        assert (
            ours[0].shape == reference[0].shape == (batch, queries, 3 if multimask else 1, 120, 90)
        )
        torch.testing.assert_close(ours[0], reference[0], atol=2e-4, rtol=0)
        torch.testing.assert_close(ours[1], reference[1], atol=2e-5, rtol=0)


def test_fast_decoder_gradients_match_reference(random_model):
    embeddings = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    coordinates, labels = _prompts(1, 2, 3, seed=4)
    target = torch.rand(1, 2, 3, 256, 256, generator=torch.Generator().manual_seed(5))

    def gradients(predict):
        random_model.zero_grad()
        logits, iou = predict(random_model, embeddings, coordinates, labels, True, 333, 517)
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            + iou.square().mean()
        )
        loss.backward()
        return {
            name: p.grad.clone()
            for name, p in random_model.mask_decoder.named_parameters()
            if p.grad is not None
        }

    fast = gradients(lambda model, *args: model.predict_masks(*args))
    reference = gradients(reference_predict_masks)
    # The reference also runs hypernetwork 0 (single-mask output), whose gradient is then zero.
    for name in reference.keys() - fast.keys():
        assert name.startswith("output_hypernetworks_mlps.0.") and not reference[name].any(), name
    assert fast.keys() <= reference.keys()
    largest = max(grad.abs().max() for grad in reference.values())
    for name in fast:
        # Relative 1e-3, with a floor for gradients that are zero in exact arithmetic (e.g. the
        # self-attention key bias, to which softmax is invariant).
        tolerance = 1e-3 * reference[name].abs().max() + 1e-6 * largest
        assert (fast[name] - reference[name]).abs().max() <= tolerance, name
    random_model.zero_grad()


@pytest.mark.parametrize("multimask", [True, False])
def test_decode_tokens_then_candidate_masks_match_predict_masks(random_model, multimask):
    """The generator's path (IoU first, masks only for chosen candidates) gives the values of
    the full decoder call, for any subset of queries and candidates in any order."""
    embeddings = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(7))
    coordinates, labels = _prompts(1, 5, 2, seed=3)
    with torch.inference_mode():
        prepared = random_model.prepare_image_embeddings(embeddings)
        logits, iou = random_model.predict_masks(prepared, coordinates, labels, multimask, 333, 517)
        decoded = random_model.decode_tokens(prepared, coordinates, labels, multimask, 333, 517)
        torch.testing.assert_close(decoded.iou_predictions, iou, atol=1e-6, rtol=0)
        num_masks = iou.shape[2]
        everything = random_model.mask_decoder.candidate_masks(
            decoded, torch.arange(5), torch.arange(num_masks).expand(5, -1)
        )
        torch.testing.assert_close(everything, logits[0], atol=1e-5, rtol=0)
        queries = torch.tensor([3, 0])
        candidates = torch.tensor([[num_masks - 1, 0], [0, num_masks - 1]])[:, :num_masks]
        chosen = random_model.mask_decoder.candidate_masks(decoded, queries, candidates)
        expected = logits[0][queries[:, None], candidates]
        torch.testing.assert_close(chosen, expected, atol=1e-5, rtol=0)

"""Model behaviour beyond the public fixtures: batching, padding, truncation, sizes, variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.random_weights import random_state_dict
from efficientsam import build_efficient_sam_s, load_model, save_checkpoint
from efficientsam.modeling.efficient_sam import PIXEL_MEAN, PIXEL_STD
from efficientsam.utils import image_to_tensor

LOGIT_TOLERANCE = 1e-4


def _decode(model, embeddings, points, labels, height=480, width=640, multimask=True):
    with torch.inference_mode():
        return model.predict_masks(
            embeddings,
            torch.tensor(points, dtype=torch.float32),
            torch.tensor(labels, dtype=torch.int64),
            multimask,
            height,
            width,
        )


def _close(first, second, tolerance=LOGIT_TOLERANCE):
    return (first - second).abs().max().item() <= tolerance


def test_caller_padding_equals_model_padding(ti_model, reference_embeddings):
    plain = _decode(ti_model, reference_embeddings, [[[[210, 180]]]], [[[1]]])
    padded = _decode(
        ti_model, reference_embeddings, [[[[210, 180], [-1, -1], [-1, -1]]]], [[[1, -1, -1]]]
    )
    assert _close(plain[0], padded[0]) and _close(plain[1], padded[1])


def test_several_queries_with_caller_padding_equal_separate_calls(ti_model, reference_embeddings):
    point_query = ([[210.5, 180.25], [-1, -1], [-1, -1]], [1, -1, -1])
    mixed_query = ([[100, 90], [400, 300], [260.75, 150]], [2, 3, 0])
    batched_logits, batched_iou = _decode(
        ti_model,
        reference_embeddings,
        [[point_query[0], mixed_query[0]]],
        [[point_query[1], mixed_query[1]]],
    )
    for index, (points, labels) in enumerate((point_query, mixed_query)):
        logits, iou = _decode(ti_model, reference_embeddings, [[points]], [[labels]])
        assert _close(batched_logits[:, index], logits[:, 0])
        assert _close(batched_iou[:, index], iou[:, 0])


def test_more_than_six_points_keeps_the_first_six(ti_model, reference_embeddings):
    points = [[20 + 70 * i, 30 + 50 * i] for i in range(8)]
    labels = [1, 0, 1, 1, 0, 1, 1, 0]
    eight = _decode(ti_model, reference_embeddings, [[points]], [[labels]])
    six = _decode(ti_model, reference_embeddings, [[points[:6]]], [[labels[:6]]])
    assert _close(eight[0], six[0]) and _close(eight[1], six[1])
    # ... and the 7th/8th point really were not seen: dropping the 6th changes the output.
    five = _decode(ti_model, reference_embeddings, [[points[:5]]], [[labels[:5]]])
    assert not _close(five[0], six[0], 1e-2)


def test_negative_coordinates_become_minus_one_per_axis(ti_model):
    points = torch.tensor([[[[-5.0, 240.0], [320.0, -0.5], [639.5, 479.25]]]])
    rescaled = ti_model.rescale_points(points, 480, 640)
    expected = torch.tensor(
        [[[[-1.0, 240 * 1024 / 480], [320 * 1024 / 640, -1.0], [639.5 * 1.6, 479.25 * 1024 / 480]]]]
    )
    torch.testing.assert_close(rescaled, expected)
    # Portrait: x scales with the width, y with the height.
    portrait = ti_model.rescale_points(torch.tensor([[[[100.0, 100.0]]]]), 700, 350)
    torch.testing.assert_close(portrait, torch.tensor([[[[100 * 1024 / 350, 100 * 1024 / 700]]]]))


def test_fractional_coordinates_change_the_prompt(ti_model, reference_embeddings):
    whole = _decode(ti_model, reference_embeddings, [[[[210, 180]]]], [[[1]]])
    fractional = _decode(ti_model, reference_embeddings, [[[[210.4, 180.0]]]], [[[1]]])
    assert not torch.equal(whole[0], fractional[0])
    assert _close(whole[0], fractional[0], 0.5)  # a sub-pixel move is a small change


def test_preprocess_stretches_without_antialias_and_keeps_1024():
    model = build_efficient_sam_s()  # preprocessing has no weights: any variant will do
    wide = torch.rand(1, 3, 720, 1280, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    expected = (
        F.interpolate(wide, (1024, 1024), mode="bilinear", align_corners=False) - mean
    ) / std
    torch.testing.assert_close(model.preprocess(wide), expected)
    antialiased = F.interpolate(wide, (1024, 1024), mode="bilinear", antialias=True)
    assert (model.preprocess(wide) - (antialiased - mean) / std).abs().max() > 0.05
    square = torch.rand(1, 3, 1024, 1024)
    torch.testing.assert_close(model.preprocess(square), (square - mean) / std)


@pytest.mark.slow
def test_two_images_in_a_batch_equal_single_calls(ti_model, reference_image):
    portrait = np.ascontiguousarray(np.rot90(reference_image))  # 640 high x 480 wide
    odd = np.ascontiguousarray(portrait[:637, :471])
    first, second = image_to_tensor(odd), image_to_tensor(odd[::-1].copy())
    points = torch.tensor([[[[100.0, 500.0], [300.5, 20.25]]], [[[50.0, 60.0], [400.0, 600.0]]]])
    labels = torch.tensor([[[1, 0]], [[2, 3]]])
    with torch.inference_mode():
        batched = ti_model(torch.cat([first, second]), points, labels)
        singles = [
            ti_model(image, points[i : i + 1], labels[i : i + 1])
            for i, image in enumerate((first, second))
        ]
    assert batched[0].shape == (2, 1, 3, 637, 471)
    for index, (logits, iou) in enumerate(singles):
        assert _close(batched[0][index], logits[0], 1e-3)
        assert _close(batched[1][index], iou[0])


def test_decoder_upscale_is_bicubic_to_the_requested_size(ti_model, reference_embeddings):
    points = torch.tensor([[[[300.0, 200.0]]]])
    labels = torch.tensor([[[1]]])
    with torch.inference_mode():
        low_res, _ = ti_model.predict_masks(reference_embeddings, points, labels, True, 480, 640)
        full, _ = ti_model.predict_masks(
            reference_embeddings, points, labels, True, 480, 640, 333, 517
        )
    expected = F.interpolate(low_res[0], (333, 517), mode="bicubic", align_corners=False)
    assert full.shape == (1, 1, 3, 333, 517)
    torch.testing.assert_close(full[0], expected)


class _LargestTensorMode(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.slow
def test_encoder_never_materialises_the_attention_matrix(ti_model):
    image = torch.rand(1, 3, 1024, 1024)
    attention_matrix = 4096 * 4096  # one head's scores
    with torch.inference_mode(), _LargestTensorMode() as recorder:
        ti_model.get_image_embeddings(image)
    assert recorder.largest < attention_matrix
    ti_model.image_encoder.set_attention_implementation("explicit")
    try:
        with torch.inference_mode(), _LargestTensorMode() as recorder:
            explicit = ti_model.get_image_embeddings(image)
    finally:
        ti_model.image_encoder.set_attention_implementation("sdpa")
    assert recorder.largest >= attention_matrix  # the baseline does; the recorder can tell
    with torch.inference_mode():
        assert _close(ti_model.get_image_embeddings(image), explicit, 1e-4)


def test_attention_implementation_name_is_checked(ti_model):
    with pytest.raises(ValueError, match="sdpa"):
        ti_model.image_encoder.set_attention_implementation("flash")


def test_resized_pos_embed_is_cached_until_the_weights_change(ti_checkpoint):
    model = load_model(ti_checkpoint)
    encoder = model.image_encoder
    with torch.inference_mode():
        first = encoder.resized_pos_embed()
        assert encoder.resized_pos_embed() is first
    assert first.shape == (1, 64, 64, 192)
    with torch.no_grad():
        encoder.pos_embed.mul_(2.0)
    with torch.inference_mode():
        changed = encoder.resized_pos_embed()
    assert changed is not first
    torch.testing.assert_close(changed, first * 2.0)
    model.load_state_dict(load_model(ti_checkpoint).state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(encoder.resized_pos_embed(), first)


def test_forward_supports_training_gradients(ti_checkpoint):
    model = load_model(ti_checkpoint)
    # Inference first fills the position-embedding and dense-PE caches; training must still work.
    with torch.inference_mode():
        model(torch.rand(1, 3, 64, 64), torch.tensor([[[[10.0, 20.0]]]]), torch.tensor([[[1]]]))
    model.image_encoder.requires_grad_(False)
    embeddings = torch.randn(1, 256, 64, 64)
    logits, iou = model.predict_masks(
        embeddings, torch.tensor([[[[10.0, 20.0]]]]), torch.tensor([[[1]]]), True, 64, 64
    )
    (logits.mean() + iou.mean()).backward()
    for name, param in model.mask_decoder.named_parameters():
        # Mask token 0 / hypernetwork 0 produce the single-mask output, unused in multimask mode.
        unused = name.startswith("output_hypernetworks_mlps.0.")
        assert (param.grad is None) == unused, name
    assert model.prompt_encoder.point_embeddings.weight.grad.abs().sum() > 0
    # The encoder's cached position embedding must not cut gradients when it is trained.
    model.image_encoder.pos_embed.requires_grad_(True)
    model.image_encoder(torch.zeros(1, 3, 1024, 1024)).sum().backward()
    assert model.image_encoder.pos_embed.grad.abs().sum() > 0


@pytest.mark.slow
def test_s_variant_from_random_state_dict(tmp_path, reference_image):
    reference = build_efficient_sam_s()
    state = random_state_dict(reference, seed=5678)
    reference.load_state_dict(state)
    path = tmp_path / "efficient_sam_vits.pt"
    torch.save({"model": state}, path)
    model = load_model(path)
    assert model.variant == "s"
    assert sum(p.numel() for p in model.parameters()) == 26_413_028
    image = image_to_tensor(reference_image[:300, :500].copy())
    points = torch.tensor([[[[120.0, 80.0], [30.0, 20.0], [400.0, 250.0]]]])
    labels = torch.tensor([[[1, 2, 3]]])
    with torch.inference_mode():
        logits, iou = model(image, points, labels)
        embeddings = model.get_image_embeddings(image)
        decoded, decoded_iou = model.predict_masks(
            embeddings, points, labels, True, 300, 500, 300, 500
        )
        reference_logits, _ = reference.eval()(image, points, labels)
    assert embeddings.shape == (1, 256, 64, 64)
    assert logits.shape == (1, 1, 3, 300, 500) and iou.shape == (1, 1, 3)
    torch.testing.assert_close(logits, decoded)
    torch.testing.assert_close(iou, decoded_iou)
    torch.testing.assert_close(logits, reference_logits)
    assert 0.05 < (logits >= 0).float().mean() < 0.95  # random but not degenerate


def test_saved_checkpoint_round_trips(tmp_path, ti_model):
    path = save_checkpoint(ti_model, tmp_path / "copy.safetensors", {"parent": "base"})
    reloaded = load_model(path)
    for key, value in ti_model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[key]), key

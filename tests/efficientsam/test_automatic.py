"""Automatic mask generation: helpers on hand-made inputs, the pipeline on a stub decoder with
known blobs, and invariants on the random-weight Ti model (its masks have no meaning)."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as coco_mask

from benchmarks.efficientsam_bench import run_everything_probe
from efficientsam import load_model
from efficientsam.arrays import mask_to_box
from efficientsam.automatic import (
    AutomaticMaskGenerator,
    box_iou,
    build_point_grid,
    masks_to_boxes,
    nms,
    remove_small_regions,
    stability_score,
)
from efficientsam.predictor import Predictor
from efficientsam.prompts import Prompt
from tests.decoder_stubs import install_stub_decoder

# The random-weight Ti model predicts IoU in ~[-0.5, 0.5] and weak logits (|x| ~ 0.5), so the
# notebook's thresholds keep nothing; these let a good share of its masks through.
LOOSE = {
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "stability_score_offset": 0.1,
    "box_nms_thresh": 1.0,
    "min_mask_region_area": 0,
}


@pytest.fixture(scope="module")
def predictor(ti_model):
    return Predictor(ti_model)


@pytest.fixture(scope="module")
def embedding(predictor, reference_image):
    return predictor.embed(reference_image)


def _pairwise_box_iou(boxes: np.ndarray) -> np.ndarray:
    """Independent numpy IoU of (x0, y0, x1, y1) edge boxes, for checking the module's."""
    boxes = boxes.astype(np.float64)
    top_left = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(axis=1)
    return intersection / (areas[:, None] + areas[None, :] - intersection)


def _check_masks(masks, size: tuple[int, int]) -> None:
    for mask in masks:
        assert mask.segmentation.shape == size and mask.segmentation.dtype == bool
        assert mask.area == np.count_nonzero(mask.segmentation) > 0
        x0, y0, x1, y1 = mask_to_box(mask.segmentation)
        assert mask.bbox == (x0, y0, x1 + 1, y1 + 1)
    scores = [mask.predicted_iou for mask in masks]
    assert scores == sorted(scores, reverse=True)


# -- helpers ---------------------------------------------------------------------------------
def test_point_grid_is_cell_centres_in_xy_row_by_row():
    grid = build_point_grid(2, (100, 200))
    np.testing.assert_array_equal(grid, [[50, 25], [150, 25], [50, 75], [150, 75]])
    assert grid.dtype == np.float32
    grid = build_point_grid(32, (480, 640))
    assert grid.shape == (1024, 2)
    assert grid[:, 0].min() == 10 and grid[:, 0].max() == 630
    assert grid[:, 1].min() == 7.5 and grid[:, 1].max() == 472.5


def test_stability_score_counts_pixels_above_the_shifted_thresholds():
    logits = torch.full((2, 3, 4, 4), -5.0)
    logits[0, 0].view(-1)[:3] = 2.0  # > +1
    logits[0, 0].view(-1)[3:6] = 0.5  # only > -1
    logits[0, 1].view(-1)[:4] = 0.5  # nothing above +1
    logits[0, 2] = 3.0  # everything stable
    logits[1, 0].view(-1)[:2] = 1.0  # not > 1 (strict), but > -1
    logits[1, 0].view(-1)[2:4] = 1.5
    scores = stability_score(logits, 0.0, 1.0)
    assert scores.shape == (2, 3) and scores.dtype == torch.float32
    expected = torch.tensor([[3 / 6, 0.0, 1.0], [2 / 4, 0.0, 0.0]])
    torch.testing.assert_close(scores, expected)
    # A threshold of 1 with offset 0.5 moves both cut-offs.
    assert stability_score(logits[0, 0], 1.0, 0.5).item() == pytest.approx(1.0)
    assert stability_score(logits[0, 0], 0.5, 1.0).item() == pytest.approx(3 / 6)


def test_masks_to_boxes_gives_pixel_edges():
    masks = torch.zeros(3, 6, 8, dtype=torch.bool)
    masks[0, 2, 3] = True  # a single pixel: one pixel wide and high
    masks[1, 1:4, 2:7] = True
    masks[1, 5, 0] = True
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.int64
    assert boxes.tolist() == [[3, 2, 4, 3], [0, 1, 7, 6], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, 6, 8, dtype=torch.bool)).shape == (0, 4)


def test_box_iou_on_hand_made_boxes():
    first = torch.tensor([[0.0, 0, 10, 10], [0, 0, 0, 0]])
    second = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    expected = torch.tensor([[1.0, 50 / 150, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(box_iou(first, second), expected)


def test_nms_keeps_the_best_of_each_overlapping_group_greedily():
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],  # 0: duplicate of 2, lower score
            [1.0, 1, 11, 11],  # 1: IoU 81/119 = 0.68 with 0 and 2
            [0.0, 0, 10, 10],  # 2: best
            [20.0, 20, 30, 30],  # 3: alone
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1])
    assert nms(boxes, scores, 0.7).tolist() == [2, 1, 3]
    assert nms(boxes, scores, 0.6).tolist() == [2, 3]
    assert nms(boxes, scores, 1.0).tolist() == [2, 0, 1, 3]
    # Greedy, not transitive: a suppressed box suppresses nothing.
    chain = torch.tensor([[0.0, 0, 10, 10], [3.0, 0, 13, 10], [6.0, 0, 16, 10]])
    assert nms(chain, torch.tensor([3.0, 2.0, 1.0]), 0.5).tolist() == [0, 2]
    # Ties keep the lower index first.
    assert nms(chain, torch.ones(3), 1.0).tolist() == [0, 1, 2]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.7).tolist() == []


def test_remove_small_regions_on_a_synthetic_mask():
    mask = np.zeros((40, 40), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[10:12, 10:12] = False  # a 4 px hole
    mask[30:33, 30:33] = True  # a 9 px island
    filled, changed = remove_small_regions(mask, 10, "holes")
    assert changed and filled[10:12, 10:12].all()
    assert np.array_equal(filled[30:, 30:], mask[30:, 30:])  # islands untouched
    assert np.count_nonzero(filled != mask) == 4
    cleaned, changed = remove_small_regions(mask, 10, "islands")
    assert changed and not cleaned[30:33, 30:33].any()
    assert np.count_nonzero(cleaned != mask) == 9  # the hole stays
    same, changed = remove_small_regions(mask, 4, "islands")
    assert not changed and np.array_equal(same, mask)
    same, changed = remove_small_regions(mask, 4, "holes")
    assert not changed and np.array_equal(same, mask)
    # When every island is small the largest is kept: a mask never becomes empty.
    specks = np.zeros((20, 20), bool)
    specks[1:3, 1:3] = True
    specks[10:13, 10:13] = True
    kept, changed = remove_small_regions(specks, 100, "islands")
    assert changed and np.count_nonzero(kept) == 9 and kept[10:13, 10:13].all()
    with pytest.raises(ValueError, match="mode"):
        remove_small_regions(mask, 10, "both")


def test_upscale_logits_is_bicubic_interpolation(predictor):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 256, 256, generator=generator) * 8
    expected = F.interpolate(
        logits.flatten(0, 1)[:, None], size=(300, 500), mode="bicubic", align_corners=False
    ).reshape(2, 3, 300, 500)
    upscaled = predictor.upscale_logits(logits, (300, 500))
    assert upscaled.shape == (2, 3, 300, 500)
    assert torch.allclose(upscaled, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "settings",
    [
        {"points_per_side": 0},
        {"points_per_batch": 0},
        {"pred_iou_thresh": 1.5},
        {"pred_iou_thresh": -0.1},
        {"stability_score_thresh": 1.01},
        {"stability_score_offset": -1.0},
        {"box_nms_thresh": -0.5},
        {"box_nms_thresh": 2.0},
        {"min_mask_region_area": -1},
        {"masks_per_point": 4},
        {"output_mode": "polygons"},
    ],
)
def test_settings_out_of_range_are_rejected(predictor, settings):
    name = next(iter(settings))
    with pytest.raises(ValueError, match=name):
        AutomaticMaskGenerator(predictor, **settings)


def test_bad_images_are_rejected(predictor):
    generator = AutomaticMaskGenerator(predictor)
    with pytest.raises(ValueError, match="uint8"):
        generator.generate(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        generator.generate("image.png")


# -- the pipeline on a stub decoder ----------------------------------------------------------
BLOB_RADII = (12.0, 20.0, 28.0)  # low-res pixels, candidates 0, 1, 2


def _blob_decoder(prepared, points, labels, multimask_output, input_h, input_w, *args):
    """Stand-in for ``predict_masks``: candidate k of a point is a steep cone (stability > 0.9)
    of radius BLOB_RADII[k] low-res pixels, centred on the point snapped to a 64-pixel low-res
    grid, so neighbouring grid points give identical masks; each has a 2x2 hole at its centre
    and a 2x2 island 8 pixels outside the disc. Predicted IoU 0.6 + 0.1 k + 0.05 x / W (the
    right-most point of a blob wins)."""
    assert multimask_output and labels.eq(1).all() and points.shape[2] == 1
    xy = points[0, :, 0].float()  # (Q, 2)
    scale = torch.tensor([256.0 / input_w, 256.0 / input_h])
    centres = torch.round(xy * scale / 64) * 64  # (Q, 2) low-res pixels
    grid = torch.arange(256, dtype=torch.float32) + 0.5
    distance = torch.hypot(
        grid[None, None, :] - centres[:, 0, None, None],
        grid[None, :, None] - centres[:, 1, None, None],
    )  # (Q, 256, 256)
    radii = torch.tensor(BLOB_RADII)
    logits = 4 * (radii[None, :, None, None] - distance[:, None])  # (Q, 3, 256, 256)
    for query, (cx, cy) in enumerate(centres.long().tolist()):
        logits[query, :, max(cy - 1, 0) : cy + 1, max(cx - 1, 0) : cx + 1] = -20.0
        for k, radius in enumerate(BLOB_RADII):
            iy = cy + int(radius) + 8
            if iy < 255:
                logits[query, k, iy : iy + 2, max(cx - 1, 0) : cx + 1] = 20.0
    iou = 0.6 + 0.1 * torch.arange(3.0)[None, :] + 0.05 * xy[:, :1] / input_w
    return logits[None], iou[None]


@pytest.fixture(scope="module")
def stub_model(ti_checkpoint):
    """A model of its own (the session's ``ti_model`` stays untouched) with a stub decoder."""
    model = load_model(ti_checkpoint)
    install_stub_decoder(model, _blob_decoder)
    return model


@pytest.fixture(scope="module")
def stub_predictor(stub_model):
    return Predictor(stub_model)


def test_stub_blobs_are_deduplicated_by_nms_keeping_the_best_point(stub_predictor, embedding):
    # A 6x6 grid on 640x480 snaps to 5x5 distinct blob centres.
    settings = {"points_per_side": 6, "min_mask_region_area": 0}
    all_masks = AutomaticMaskGenerator(stub_predictor, box_nms_thresh=1.0, **settings).run(
        embedding
    )
    assert all_masks.num_points == all_masks.num_candidates == len(all_masks.masks) == 36
    result = AutomaticMaskGenerator(stub_predictor, **settings).run(embedding)
    masks = result.masks
    assert result.num_candidates == 36 and result.num_after_nms == len(masks) == 25
    _check_masks(masks, (480, 640))
    boxes = np.array([mask.bbox for mask in masks])
    overlaps = _pairwise_box_iou(boxes)[np.triu_indices(len(masks), 1)]
    assert overlaps.max() <= 0.7

    # Each blob kept the candidate of its right-most point (highest predicted IoU).
    def blob(points: np.ndarray) -> np.ndarray:
        return np.round(points * [256 / 640, 256 / 480] / 64)

    grid = build_point_grid(6, (480, 640))
    for mask in masks:
        same_blob = grid[(blob(grid) == blob(np.array(mask.point))).all(axis=1)]
        assert len(same_blob) in (1, 2, 4) and mask.point[0] == same_blob[:, 0].max()
        assert mask.predicted_iou == pytest.approx(0.8 + 0.05 * mask.point[0] / 640, abs=1e-6)


def test_stub_filters_select_candidates(stub_predictor, embedding):
    generator = AutomaticMaskGenerator(
        stub_predictor,
        points_per_side=3,
        masks_per_point=3,
        box_nms_thresh=1.0,
        min_mask_region_area=0,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
    )
    everything = generator.run(embedding)
    assert everything.num_candidates == len(everything.masks) == 27
    by_radius = sorted({round(mask.stability_score, 3) for mask in everything.masks})
    assert len(by_radius) >= 3  # wider cones are more stable
    middle = float(np.median([mask.stability_score for mask in everything.masks]))
    for settings in ({"pred_iou_thresh": 0.75}, {"stability_score_thresh": middle}):
        generator = AutomaticMaskGenerator(
            stub_predictor,
            points_per_side=3,
            masks_per_point=3,
            box_nms_thresh=1.0,
            min_mask_region_area=0,
            **{"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, **settings},
        )
        masks = generator.generate(embedding)
        assert 0 < len(masks) < 27
        assert all(mask.predicted_iou > generator.pred_iou_thresh for mask in masks)
        assert all(mask.stability_score > generator.stability_score_thresh for mask in masks)


def test_stub_small_region_clean_up(stub_predictor, embedding):
    def components(mask: np.ndarray) -> int:
        return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1

    raw = AutomaticMaskGenerator(stub_predictor, points_per_side=6, min_mask_region_area=0)
    clean = AutomaticMaskGenerator(stub_predictor, points_per_side=6, min_mask_region_area=100)
    raw_masks, clean_masks = raw.generate(embedding), clean.generate(embedding)
    assert len(raw_masks) == len(clean_masks) == 25
    assert sum(components(mask.segmentation) > 1 for mask in raw_masks) >= 10  # islands
    assert sum(components(~mask.segmentation) > 1 for mask in raw_masks) >= 10  # holes
    _check_masks(clean_masks, (480, 640))
    for before, after in zip(raw_masks, clean_masks, strict=True):
        assert before.point == after.point
        assert components(after.segmentation) == 1
        assert components(~after.segmentation) == 1
        changed = np.count_nonzero(before.segmentation != after.segmentation)
        assert changed < 0.1 * before.area  # only the specks changed


def test_stub_empty_masks_are_dropped(stub_model, embedding, monkeypatch):
    def empty_decoder(prepared, points, *args):
        logits, iou = _blob_decoder(prepared, points, *args)
        return torch.full_like(logits, -0.05), iou

    install_stub_decoder(stub_model, empty_decoder, monkeypatch)
    generator = AutomaticMaskGenerator(Predictor(stub_model), points_per_side=2, **LOOSE)
    result = generator.run(embedding)
    assert result.num_candidates == 0 and result.masks == []


# -- the random-weight Ti model ---------------------------------------------------------------
def test_masks_are_the_predictors_best_mask_for_their_point(predictor, embedding):
    result = AutomaticMaskGenerator(predictor, points_per_side=4, **LOOSE).run(embedding)
    masks = result.masks
    assert result.num_points == 16 and 0 < len(masks) <= 16
    _check_masks(masks, (480, 640))
    timings = result.timings
    assert timings.encoder_seconds == 0 and timings.decode_seconds > 0
    parts = timings.decode_seconds + timings.filter_seconds + timings.upscale_seconds
    assert parts + timings.postprocess_seconds <= timings.total_seconds
    prompts = [Prompt.create([mask.point]) for mask in masks]
    for mask, expected in zip(masks, predictor.decode(embedding, prompts, True, True), strict=True):
        assert mask.predicted_iou == pytest.approx(expected.best_score, abs=1e-5)
        assert np.count_nonzero(mask.segmentation != expected.best_mask) <= 10


@pytest.mark.parametrize("masks_per_point", [1, 3])
def test_iou_filter_before_the_masks_keeps_the_straightforward_candidates(
    predictor, embedding, masks_per_point
):
    """The generator computes masks only for candidates past the IoU filter; the candidates,
    their scores and masks are those of decoding every candidate of every point in full and
    filtering after (about half the queries pass the threshold here)."""
    model = predictor.model
    points = build_point_grid(4, embedding.original_size)
    with torch.inference_mode():
        logits, iou = model.predict_masks(
            embedding.embeddings,
            torch.from_numpy(points)[None, :, None],
            torch.ones(1, 16, 1),
            True,
            *embedding.original_size,
        )
    iou, order = iou[0].sort(dim=1, descending=True, stable=True)
    iou, order = iou[:, :masks_per_point], order[:, :masks_per_point]
    threshold = float(iou[:, 0].median())
    keep = iou > threshold
    rows = torch.arange(16)[:, None].expand_as(order)[keep]
    kept_logits = logits[0][rows, order[keep]]
    stability = stability_score(kept_logits, 0.0, 0.1)
    settings = {**LOOSE, "pred_iou_thresh": threshold, "masks_per_point": masks_per_point}
    result = AutomaticMaskGenerator(predictor, points_per_side=4, **settings).run(embedding)
    assert 0 < result.num_candidates == len(rows) < 16 * masks_per_point
    assert len(result.masks) == len(rows)
    expected = predictor.upscale_logits(kept_logits, embedding.original_size) >= 0
    by_score = {round(float(score), 5): index for index, score in enumerate(iou[keep])}
    for mask in result.masks:
        index = by_score[round(mask.predicted_iou, 5)]
        assert mask.point == tuple(points[int(rows[index])].tolist())
        assert mask.stability_score == pytest.approx(float(stability[index]), abs=1e-3)
        assert np.count_nonzero(mask.segmentation != expected[index].numpy()) <= 10


def test_image_and_its_embedding_give_the_same_masks(predictor, embedding, reference_image):
    generator = AutomaticMaskGenerator(predictor, points_per_side=4, **LOOSE)
    from_embedding = generator.generate(embedding)
    result = generator.run(reference_image.copy())  # the same pixels: a cache hit
    assert result.timings.encoder_seconds == 0
    assert len(from_embedding) == len(result.masks) > 0
    for first, second in zip(from_embedding, result.masks, strict=True):
        assert first.point == second.point and first.predicted_iou == second.predicted_iou
        assert np.array_equal(first.segmentation, second.segmentation)


def test_batch_size_does_not_change_the_masks(predictor, embedding):
    one = AutomaticMaskGenerator(predictor, points_per_side=4, points_per_batch=1, **LOOSE)
    many = AutomaticMaskGenerator(predictor, points_per_side=4, points_per_batch=16, **LOOSE)
    first, second = one.generate(embedding), many.generate(embedding)
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert a.point == b.point
        assert a.predicted_iou == pytest.approx(b.predicted_iou, abs=1e-5)
        assert a.stability_score == pytest.approx(b.stability_score, abs=1e-3)
        assert np.count_nonzero(a.segmentation != b.segmentation) <= 10


@pytest.fixture(scope="module")
def loose_masks(predictor, embedding):
    return AutomaticMaskGenerator(predictor, points_per_side=5, **LOOSE).generate(embedding)


def test_raising_the_iou_threshold_only_drops_the_lowest_masks(predictor, embedding, loose_masks):
    threshold = float(np.median([mask.predicted_iou for mask in loose_masks]))
    high = AutomaticMaskGenerator(
        predictor, points_per_side=5, **{**LOOSE, "pred_iou_thresh": threshold}
    ).generate(embedding)
    assert 0 < len(high) < len(loose_masks)
    assert all(mask.predicted_iou > threshold for mask in high)
    # Dropped candidates rank last in the NMS, so the rest is unchanged (also with NMS on).
    assert [m.point for m in high] == [m.point for m in loose_masks[: len(high)]]
    with_nms = {**LOOSE, "box_nms_thresh": 0.7}
    nms_low = AutomaticMaskGenerator(predictor, points_per_side=5, **with_nms).run(embedding)
    nms_high = AutomaticMaskGenerator(
        predictor, points_per_side=5, **{**with_nms, "pred_iou_thresh": threshold}
    ).run(embedding)
    assert nms_low.num_after_nms < nms_low.num_candidates == len(loose_masks)
    assert 0 < len(nms_high.masks) <= len(nms_low.masks)
    assert [m.point for m in nms_high.masks] == [
        m.point for m in nms_low.masks[: len(nms_high.masks)]
    ]
    boxes = np.array([mask.bbox for mask in nms_low.masks])
    assert _pairwise_box_iou(boxes)[np.triu_indices(len(boxes), 1)].max(initial=0) <= 0.7


def test_raising_the_stability_threshold_never_adds_masks(predictor, embedding, loose_masks):
    # Without NMS: a dropped candidate could have suppressed others.
    threshold = float(np.median([mask.stability_score for mask in loose_masks]))
    high = AutomaticMaskGenerator(
        predictor, points_per_side=5, **{**LOOSE, "stability_score_thresh": threshold}
    ).generate(embedding)
    assert 0 < len(high) < len(loose_masks)
    assert all(mask.stability_score > threshold for mask in high)
    assert {m.point for m in high} <= {m.point for m in loose_masks}


def test_non_square_image(predictor, reference_image):
    crop = np.ascontiguousarray(reference_image[100:400, 50:550])  # 300 x 500
    result = AutomaticMaskGenerator(
        predictor, points_per_side=4, **{**LOOSE, "min_mask_region_area": 50}
    ).run(crop)
    assert result.timings.encoder_seconds > 0  # a new image goes through the encoder
    assert len(result.masks) > 0
    _check_masks(result.masks, (300, 500))
    grid = {tuple(point) for point in build_point_grid(4, (300, 500)).tolist()}
    assert {mask.point for mask in result.masks} <= grid
    assert all(mask.bbox[2] <= 500 and mask.bbox[3] <= 300 for mask in result.masks)


# -- output modes ----------------------------------------------------------------------------
def _same_masks_in_both_modes(predictor, embedding, **settings) -> int:
    binary = AutomaticMaskGenerator(predictor, **settings).generate(embedding)
    rle = AutomaticMaskGenerator(predictor, output_mode="coco_rle", **settings).generate(embedding)
    assert len(binary) == len(rle) > 0
    height, width = embedding.original_size
    for first, second in zip(binary, rle, strict=True):
        segmentation = second.segmentation
        assert set(segmentation) == {"size", "counts"} and segmentation["size"] == [height, width]
        assert json.loads(json.dumps(segmentation)) == segmentation  # plain JSON
        decoded = second.binary_mask()
        assert decoded.dtype == bool and decoded.shape == (height, width)
        np.testing.assert_array_equal(decoded, first.segmentation)
        assert first.binary_mask() is first.segmentation
        assert coco_mask.area(segmentation) == second.area == first.area
        assert second.bbox == first.bbox and second.point == first.point
        assert second.predicted_iou == first.predicted_iou
        assert second.stability_score == first.stability_score
    return len(binary)


def test_coco_rle_mode_gives_the_binary_masks(predictor, stub_predictor, embedding):
    # Blobs of 3 radii with holes and islands: clean-up and NMS (108 candidates, 25 places).
    stub = {"points_per_side": 6, "masks_per_point": 3, "min_mask_region_area": 100}
    assert _same_masks_in_both_modes(stub_predictor, embedding, **stub) > 25
    # The random-weight model's ragged masks at 1200x900 (several upscale chunks of 15 masks).
    ragged = {**LOOSE, "points_per_side": 4, "masks_per_point": 2, "min_mask_region_area": 50}
    larger = dataclasses.replace(embedding, original_size=(900, 1200))
    assert _same_masks_in_both_modes(predictor, larger, **ragged) > 15


@pytest.mark.slow
def test_coco_rle_peak_memory_does_not_grow_with_the_number_of_masks(ti_checkpoint):
    """Segment everything on a 12 MP image in a fresh process, every candidate kept (~22 masks
    of 12 MB each as arrays): with COCO RLE the generator's peak RSS growth stays below a bound
    of 16 bytes per image pixel (one upscale chunk of float32 logits, the clean-up's labels)."""
    height, width = 3000, 4000
    measured = run_everything_probe(
        ti_checkpoint,
        (height, width),
        points_per_side=3,
        output_mode="coco_rle",
        threads=2,
        masks_per_point=3,
        points_per_batch=3,  # small decoder activations, so the masks' memory is what is measured
        timeout=300,
    )
    if measured["peak_growth_bytes"] is None:
        pytest.skip("the peak RSS cannot be reset here (no /proc/self/clear_refs)")
    bound = 16 * height * width
    assert measured["masks"] * height * width > bound  # as (H, W) arrays they could not fit
    assert measured["peak_growth_bytes"] < bound, measured
    assert measured["stored_mask_bytes"] < measured["masks"] * height * width / 10

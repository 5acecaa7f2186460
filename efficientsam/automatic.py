"""Automatic "segment everything" masks: a grid of single-point prompts -> filtered masks (the
EfficientSAM notebook's pipeline: SAM's automatic mask generator without crops).

Pixel coordinates are (x, y) of the original image. Boxes are (x0, y0, x1, y1) pixel edges:
a box holds columns x0 .. x1 - 1 and rows y0 .. y1 - 1, so its width is x1 - x0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

import cv2
import numpy as np
import torch
from pycocotools import mask as coco_mask

from .predictor import ImageEmbedding, Predictor

UPSCALE_CHUNK_BYTES = 64 * 1024**2  # float32 logits upscaled at once (bounds the peak memory)
OUTPUT_MODES = ("binary_mask", "coco_rle")
OutputMode = Literal["binary_mask", "coco_rle"]


@dataclass(frozen=True, eq=False)
class AutomaticMask:
    """One mask found by :class:`AutomaticMaskGenerator`.

    segmentation: the mask at the original image size, (H, W) bool ("binary_mask" output mode)
    or a COCO RLE ``{"size": [H, W], "counts": str}`` ("coco_rle", ~KBs instead of H*W bytes);
    :meth:`binary_mask` gives the array in both modes. area: its pixel count; bbox
    (x0, y0, x1, y1) pixel edges of its tight box (width x1 - x0); predicted_iou: the decoder's
    raw IoU prediction; stability_score in [0, 1] on the low-res logits; point (x, y) pixels:
    the grid point that prompted it. Compared by identity (it holds an array).
    """

    segmentation: np.ndarray | dict
    area: int
    bbox: tuple[int, int, int, int]
    predicted_iou: float
    stability_score: float
    point: tuple[float, float]

    def binary_mask(self) -> np.ndarray:
        """The (H, W) bool mask: the segmentation itself, or its COCO RLE decoded (a new array,
        H*W bytes: decode one mask at a time to keep the memory low)."""
        if isinstance(self.segmentation, np.ndarray):
            return self.segmentation
        return np.ascontiguousarray(coco_mask.decode(self.segmentation)).view(bool)


@dataclass(frozen=True)
class GenerationTimings:
    """Seconds per stage of one :meth:`AutomaticMaskGenerator.run`.

    encoder: 0 when the embedding was given or came from the cache; decode: all decoder calls;
    filter: IoU/stability/empty filters, low-res boxes and the first NMS; upscale: the kept masks
    to the image size; postprocess: small-region clean-up, exact boxes, storing the masks in the
    output mode (COCO RLE encoding), final NMS and outputs.
    """

    encoder_seconds: float
    decode_seconds: float
    filter_seconds: float
    upscale_seconds: float
    postprocess_seconds: float
    total_seconds: float


@dataclass(frozen=True)
class GenerationResult:
    """Masks sorted by predicted IoU (highest first), with timings and how many survived each
    stage: num_points grid queries, num_candidates after the filters, num_after_nms after the
    low-res NMS (len(masks) is after clean-up and the final NMS)."""

    masks: list[AutomaticMask]
    timings: GenerationTimings
    num_points: int
    num_candidates: int
    num_after_nms: int


class AutomaticMaskGenerator:
    """Segment everything in an image with single-point prompts on a regular grid.

    Pipeline: each grid point is one positive single-point query, ``points_per_batch`` queries
    per decoder call (all sharing the image's
    :class:`~efficientsam.modeling.two_way_transformer.PreparedImage`); per query the
    ``masks_per_point`` candidates with the highest predicted IoU (the notebook keeps 1, SAM 3)
    are kept if predicted IoU > ``pred_iou_thresh`` and stability score >
    ``stability_score_thresh`` on the 256x256 low-res logits (an empty mask scores 0); greedy box
    NMS (higher predicted IoU first) on the low-res masks' boxes; only the kept masks are
    upscaled to the image size (bicubic, threshold 0), optionally cleaned of small islands and
    holes, measured (area, exact box) and stored in the output mode; a final NMS on the exact
    boxes removes the duplicates that upscaling and clean-up can create (as SAM does).

    Defaults follow the EfficientSAM "segment everything" notebook: a 32x32 grid, the best
    candidate per point, predicted IoU > 0.7, stability score > 0.9 (offset 1.0 around the
    logit threshold 0), box NMS at IoU 0.7 and a 100-pixel small-region clean-up (the
    notebook's ``min_area``; 0 disables it). Grid points are cell centres
    ((i + 0.5) * W / n, (j + 0.5) * H / n); the notebook uses i * W / n + 0.5.

    points_per_batch: queries per decoder call. Each query costs ~15-25 MiB of decoder
    activations on CPU (measured on Ti at 640x480: about +0.4 GiB peak at 16, +0.6 GiB at 32,
    +1.3 GiB at 64) and larger batches are not faster per query on CPU, so the default is 16.
    The low-res logits of every candidate that passes the filters (256 KiB each) are kept until
    the NMS, at most points_per_side**2 * masks_per_point of them.

    output_mode: "binary_mask" (default) returns (H, W) bool segmentations; "coco_rle" returns
    COCO RLE dicts (pycocotools) with the same masks, areas, boxes and scores. Masks reach the
    image size one bounded chunk at a time (``UPSCALE_CHUNK_BYTES`` of float32 logits: one mask
    at 12 MP), so with "coco_rle" the peak memory grows with the image's pixels, not with the
    number of masks times the pixels (~12 MB per kept mask at 12 MP with "binary_mask").

    Thread-safe: the generator holds only its settings; :meth:`run` returns its timings.
    """

    def __init__(
        self,
        predictor: Predictor,
        points_per_side: int = 32,
        points_per_batch: int = 16,
        pred_iou_thresh: float = 0.7,
        stability_score_thresh: float = 0.9,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        min_mask_region_area: int = 100,
        masks_per_point: int = 1,
        output_mode: OutputMode = "binary_mask",
        between_steps: Callable[[], None] | None = None,
    ) -> None:
        if points_per_side < 1:
            raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        for name, value in (
            ("pred_iou_thresh", pred_iou_thresh),
            ("stability_score_thresh", stability_score_thresh),
            ("box_nms_thresh", box_nms_thresh),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not stability_score_offset >= 0.0:
            raise ValueError(f"stability_score_offset must be >= 0, got {stability_score_offset}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")
        if not 1 <= masks_per_point <= 3:
            raise ValueError(f"masks_per_point must be 1, 2 or 3, got {masks_per_point}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        self.predictor = predictor
        self.points_per_side = int(points_per_side)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.min_mask_region_area = int(min_mask_region_area)
        self.masks_per_point = int(masks_per_point)
        self.output_mode = output_mode
        # called before each upscale chunk and each mask's clean-up: a server lets waiting
        # requests run there, or stops work past its deadline by raising
        self.between_steps = between_steps or (lambda: None)

    def generate(self, image_or_embedding: np.ndarray | ImageEmbedding) -> list[AutomaticMask]:
        """Masks of an HxWx3 uint8 RGB image (embedded through the predictor's cache) or of an
        :class:`ImageEmbedding`, sorted by predicted IoU (highest first)."""
        return self.run(image_or_embedding).masks

    def run(self, image_or_embedding: np.ndarray | ImageEmbedding) -> GenerationResult:
        """As :meth:`generate`, with per-stage timings and counts."""
        started = time.perf_counter()
        if isinstance(image_or_embedding, ImageEmbedding):
            embedding, encoder_seconds = image_or_embedding, 0.0
        else:
            embedding = self.predictor.embed(image_or_embedding)
            encoder_seconds = embedding.encoder_seconds
        size = embedding.original_size
        points = build_point_grid(self.points_per_side, size)
        with torch.inference_mode():
            candidates, decode_seconds, filter_seconds = self._decode_and_filter(embedding, points)
            tick = time.perf_counter()
            num_candidates = len(candidates.iou)
            candidates = candidates.select(self._low_res_nms(candidates, size))
            filter_seconds += _elapsed(tick, candidates.iou.device)
            stored, upscale_seconds, postprocess_seconds = self._full_size(candidates.logits, size)
        tick = time.perf_counter()
        results = self._finish(stored, candidates, points)
        postprocess_seconds += time.perf_counter() - tick
        timings = GenerationTimings(
            encoder_seconds=encoder_seconds,
            decode_seconds=decode_seconds,
            filter_seconds=filter_seconds,
            upscale_seconds=upscale_seconds,
            postprocess_seconds=postprocess_seconds,
            total_seconds=time.perf_counter() - started,
        )
        return GenerationResult(results, timings, len(points), num_candidates, len(candidates.iou))

    def _decode_and_filter(
        self, embedding: ImageEmbedding, points: np.ndarray
    ) -> tuple[_Candidates, float, float]:
        """Decode the grid in batches and keep the candidates that pass the IoU and stability
        filters. Returns them with the decode and filter seconds."""
        predictor = self.predictor
        model = predictor.model
        device = model.device
        threshold = float(model.mask_threshold)
        height, width = embedding.original_size
        tick = time.perf_counter()
        prepared = predictor.prepared_image(embedding)  # shared by every batch
        decode_seconds = _elapsed(tick, device)
        filter_seconds = 0.0
        kept: list[_Candidates] = []
        for start in range(0, len(points), self.points_per_batch):
            tick = time.perf_counter()
            batch = torch.from_numpy(points[start : start + self.points_per_batch]).to(device)
            labels = torch.ones((1, len(batch), 1), dtype=torch.int64, device=device)
            decoded = model.decode_tokens(  # float32, as the predictor's decoder
                prepared, batch[None, :, None, :], labels, True, height, width
            )
            decode_seconds += _elapsed(tick, device)

            tick = time.perf_counter()
            iou = decoded.iou_predictions[0]  # (Q, 3) float32
            iou, order = iou.sort(dim=1, descending=True, stable=True)
            iou, order = iou[:, : self.masks_per_point], order[:, : self.masks_per_point]
            keep = iou > self.pred_iou_thresh  # (Q, masks_per_point)
            queries = keep.any(dim=1).nonzero()[:, 0]  # the queries with a candidate left
            filter_seconds += _elapsed(tick, device)
            if len(queries) == 0:
                continue

            # Only the candidates that passed the IoU filter are upscaled to (256, 256) logits:
            # the IoU head does not depend on the masks, so this is the same selection as
            # decoding every candidate and filtering after.
            tick = time.perf_counter()
            low_res = model.mask_decoder.candidate_masks(decoded, queries, order[queries])
            decode_seconds += _elapsed(tick, device)

            tick = time.perf_counter()
            keep = keep[queries]
            rows = queries[:, None].expand_as(keep)[keep]
            iou = iou[queries][keep]
            logits = low_res[keep]  # (n, 256, 256)
            stability = stability_score(logits, threshold, self.stability_score_offset)
            keep = stability > self.stability_score_thresh  # an empty mask's score is 0
            kept.append(_Candidates(logits[keep], iou[keep], stability[keep], rows[keep] + start))
            del low_res, logits
            filter_seconds += _elapsed(tick, device)
        if not kept:  # no candidate passed the IoU filter
            scale = 2 ** len(model.mask_decoder.final_output_upscaling_layers)
            low_res_size = (scale * prepared.grid_size[0], scale * prepared.grid_size[1])
            empty = torch.zeros(0, device=device)
            logits = empty.new_zeros((0, *low_res_size))
            kept.append(_Candidates(logits, empty, empty, empty.long()))
        return _Candidates.concatenate(kept), decode_seconds, filter_seconds

    def _low_res_nms(self, candidates: _Candidates, size: tuple[int, int]) -> torch.Tensor:
        """Indices kept by NMS on the low-res masks' boxes scaled to the image's pixels."""
        height, width = size
        low_res_h, low_res_w = candidates.logits.shape[-2:]
        threshold = float(self.predictor.model.mask_threshold)
        boxes = masks_to_boxes(candidates.logits >= threshold).float()
        scale = boxes.new_tensor([width / low_res_w, height / low_res_h] * 2)
        return nms(boxes * scale, candidates.iou, self.box_nms_thresh)

    def _full_size(
        self, logits: torch.Tensor, size: tuple[int, int]
    ) -> tuple[_Stored, float, float]:
        """Low-res logits (K, h, w) -> the K masks at the image size (H, W), upscaled a bounded
        chunk at a time; each cleaned, measured and stored (:meth:`_store`) before the next
        chunk. Returns them with the upscale and post-processing seconds."""
        height, width = size
        threshold = float(self.predictor.model.mask_threshold)
        chunk = max(1, UPSCALE_CHUNK_BYTES // (4 * height * width))
        stored = _Stored([], [], [])
        upscale_seconds = postprocess_seconds = 0.0
        for start in range(0, len(logits), chunk):
            self.between_steps()
            tick = time.perf_counter()
            upscaled = self.predictor.upscale_logits(logits[start : start + chunk], size)
            masks = (upscaled >= threshold).cpu().numpy()  # (chunk, H, W)
            del upscaled
            upscale_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            for mask in masks:
                self.between_steps()
                self._store(mask, stored)
            del masks
            postprocess_seconds += time.perf_counter() - tick
        return stored, upscale_seconds, postprocess_seconds

    def _store(self, mask: np.ndarray, stored: _Stored) -> None:
        """Small-region clean-up of one (H, W) bool mask, then its area, exact box and the mask
        in the output mode, appended to ``stored``."""
        if self.min_mask_region_area > 0:
            mask, _ = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, _ = remove_small_regions(mask, self.min_mask_region_area, "islands")
        stored.areas.append(int(np.count_nonzero(mask)))
        stored.boxes.append(masks_to_boxes(torch.from_numpy(mask[None]))[0])
        if self.output_mode == "coco_rle":
            stored.segmentations.append(encode_coco_rle(mask))
        else:  # its own array: not a view that would keep the whole chunk alive
            stored.segmentations.append(mask.copy() if mask.base is not None else mask)

    def _finish(
        self, stored: _Stored, candidates: _Candidates, points: np.ndarray
    ) -> list[AutomaticMask]:
        """Final NMS on the exact boxes (drops empty masks), outputs."""
        iou = candidates.iou.cpu().numpy()
        stability = candidates.stability.cpu().numpy()
        point = points[candidates.point_index.cpu().numpy()]
        areas = np.array(stored.areas, dtype=np.int64)
        boxes = torch.stack(stored.boxes) if stored.boxes else torch.zeros(0, 4, dtype=torch.int64)
        not_empty = np.flatnonzero(areas > 0)
        order = nms(boxes[not_empty], torch.from_numpy(iou[not_empty]), self.box_nms_thresh)
        return [
            AutomaticMask(
                segmentation=stored.segmentations[i],
                area=int(areas[i]),
                bbox=tuple(int(v) for v in boxes[i].tolist()),
                predicted_iou=float(iou[i]),
                stability_score=float(stability[i]),
                point=(float(point[i, 0]), float(point[i, 1])),
            )
            for i in not_empty[order.numpy()]
        ]


@dataclass(frozen=True)
class _Candidates:
    """Masks still in the running: low-res logits (N, h, w), predicted IoU (N,), stability
    score (N,) and the index of their grid point (N,), all on the model's device."""

    logits: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    point_index: torch.Tensor

    @staticmethod
    def concatenate(parts: list[_Candidates]) -> _Candidates:
        names = [field.name for field in fields(_Candidates)]
        return _Candidates(*(torch.cat([getattr(part, name) for part in parts]) for name in names))

    def select(self, index: torch.Tensor) -> _Candidates:
        index = index.to(self.iou.device)
        return _Candidates(*(getattr(self, field.name)[index] for field in fields(self)))


@dataclass(frozen=True)
class _Stored:
    """The kept candidates at the image size, in candidate order: segmentations in the output
    mode, pixel counts and exact (x0, y0, x1, y1) boxes (int64 tensors of shape (4,))."""

    segmentations: list[np.ndarray | dict]
    areas: list[int]
    boxes: list[torch.Tensor]


def encode_coco_rle(mask: np.ndarray) -> dict:
    """(H, W) bool mask -> COCO RLE ``{"size": [H, W], "counts": str}`` (pycocotools'
    column-major compressed counts, as text so that it serialises to JSON; decode with
    ``pycocotools.mask.decode`` or :meth:`AutomaticMask.binary_mask`)."""
    rle = coco_mask.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def build_point_grid(points_per_side: int, size: tuple[int, int]) -> np.ndarray:
    """Cell centres of an n x n grid over an image of size (H, W) -> (n * n, 2) float32 (x, y)
    pixels, row by row (x varies fastest)."""
    height, width = size
    steps = (np.arange(points_per_side, dtype=np.float64) + 0.5) / points_per_side
    xs, ys = np.meshgrid(steps * width, steps * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """Stability of masks under a shift of the threshold: logits (..., h, w) -> (...) float32
    |logits > threshold + offset| / |logits > threshold - offset| (0 where both are empty)."""
    flat = logits.flatten(-2)
    intersections = (flat > threshold + offset).sum(dim=-1, dtype=torch.int32)
    unions = (flat > threshold - offset).sum(dim=-1, dtype=torch.int32)
    return torch.where(unions > 0, intersections / unions.clamp(min=1), 0.0).float()


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of boolean masks (N, h, w) -> (N, 4) int64 (x0, y0, x1, y1) pixel edges
    (columns x0 .. x1 - 1, rows y0 .. y1 - 1); (0, 0, 0, 0) for an empty mask."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, h, w), got {tuple(masks.shape)}")
    not_empty = masks.flatten(1).any(dim=1)
    rows = masks.any(dim=2).to(torch.uint8)  # (N, h)
    columns = masks.any(dim=1).to(torch.uint8)  # (N, w)
    height, width = masks.shape[1:]
    y0 = rows.argmax(dim=1)
    y1 = height - rows.flip(1).argmax(dim=1)
    x0 = columns.argmax(dim=1)
    x1 = width - columns.flip(1).argmax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(not_empty[:, None], boxes, 0)


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (N, 4) and (M, 4) as (x0, y0, x1, y1) edges -> (N, M) (0 for empty unions)."""
    first, second = first.float(), second.float()
    area_first = (first[:, 2:] - first[:, :2]).clamp(min=0).prod(dim=1)
    area_second = (second[:, 2:] - second[:, :2]).clamp(min=0).prod(dim=1)
    top_left = torch.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = torch.minimum(first[:, None, 2:], second[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    union = area_first[:, None] + area_second[None, :] - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-12), 0.0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: boxes (N, 4) (x0, y0, x1, y1), scores (N,) -> int64
    indices of the kept boxes, highest score first (ties: lower index first). A box is dropped
    when its IoU with a kept higher-scored box is > iou_threshold (1.0 keeps every box)."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.int64)
    order = np.argsort(-scores.detach().cpu().numpy(), kind="stable")
    overlaps = (box_iou(boxes, boxes) > iou_threshold).cpu().numpy()[order][:, order]
    suppressed = np.zeros(len(order), dtype=bool)
    kept = []
    for rank in range(len(order)):
        if not suppressed[rank]:
            kept.append(rank)
            suppressed |= overlaps[rank]
    return torch.from_numpy(order[kept].astype(np.int64))


def remove_small_regions(
    mask: np.ndarray, min_area: int, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill holes or remove islands smaller than min_area pixels (8-connected) of an (H, W) bool
    mask, as SAM's amg. Returns (new mask, changed). "islands" keeps the largest island when
    all are small (a mask never becomes empty); "holes" fills background regions, also one that
    touches the border."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = (mask != holes).astype(np.uint8)  # the holes are the regions of ~mask
    count, regions, stats, _ = cv2.connectedComponentsWithStats(working, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = sizes < min_area
    if not small.any():
        return mask, False
    if holes:
        fill = np.concatenate([[True], small])  # label 0 is the mask itself
    else:
        fill = np.concatenate([[False], ~small])
        if not fill.any():
            fill[int(np.argmax(sizes)) + 1] = True
    return fill[regions], True


def _elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started

"""LS annotations -> instance masks for fine-tuning (brush, bitmask, polygons; no rectangles)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.labelstudio.annotations import (
    annotated_task,
    chosen_annotation,
    region_mask,
    snapshot_hash,
)
from serving.labelstudio.label_config import parse_label_config
from serving.labelstudio.results import mask_results
from tests.http_fixtures import BRUSH_CONFIG, rectangle

CONFIG = parse_label_config(BRUSH_CONFIG)


def blob(height: int = 60, width: int = 80) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[10:40, 20:70] = True
    return mask


def test_every_mask_format_round_trips():
    for tag in ("BrushLabels", "BitmaskLabels", "PolygonLabels"):
        output = CONFIG.output.__class__(tag, "tag", "image", ("Object",))
        items = mask_results(blob(), output, "Object", 0.9)
        mask = region_mask(items[0])
        assert mask.shape == (60, 80)
        assert (mask & blob()).sum() / (mask | blob()).sum() > 0.9, tag
    assert region_mask(rectangle(10, 10, 20, 20)) is None  # boxes give no mask supervision


def annotation(annotation_id: int, items: list, **extra) -> dict:
    return {
        "id": annotation_id,
        "result": items,
        "updated_at": f"2026-01-0{annotation_id}",
        **extra,
    }


def test_the_annotation_chosen_per_task():
    brush = mask_results(blob(), CONFIG.output, "Object", 0.9)
    task = {
        "id": 7,
        "data": {"image": "/data/upload/1/a.png"},
        "annotations": [
            annotation(1, brush, ground_truth=True),
            annotation(2, brush + brush),
            annotation(3, brush * 3, was_cancelled=True),
        ],
    }
    assert chosen_annotation(task)["id"] == 1  # ground truth wins over the newer one
    task["annotations"][0]["ground_truth"] = False
    chosen = annotated_task(task, CONFIG)
    assert chosen.annotation_id == 2 and len(chosen.masks) == 2  # newest, not the skipped one
    boxes_only = {**task, "annotations": [annotation(4, [rectangle(1, 1, 5, 5)])]}
    assert annotated_task(boxes_only, CONFIG) is None
    assert annotated_task({**task, "annotations": []}, CONFIG) is None


def test_snapshot_hash_changes_with_the_data():
    brush = mask_results(blob(), CONFIG.output, "Object", 0.9)
    task = {"id": 7, "data": {"image": "x"}, "annotations": [annotation(1, brush)]}
    first = snapshot_hash([annotated_task(task, CONFIG)])
    assert first == snapshot_hash([annotated_task(task, CONFIG)])
    task["annotations"][0]["updated_at"] = "2026-02-01"
    assert snapshot_hash([annotated_task(task, CONFIG)]) != first


def test_undecodable_regions_skip_their_task_with_the_reason():
    from serving.labelstudio.annotations import AnnotationError, sync_annotations

    good = mask_results(blob(), CONFIG.output, "Object", 0.9)[0]
    bitmask = CONFIG.output.__class__("BitmaskLabels", "tag", "image", ("Object",))
    bad_items = {
        "short RLE": {**good, "value": {**good["value"], "rle": good["value"]["rle"][:-40]}},
        "no RLE": {**good, "value": {"brushlabels": ["Object"]}},
        "bitmask": {
            **mask_results(blob(), bitmask, "Object", 0.9)[0],
            "value": {"imageDataURL": "data:image/png;base64,bm90IGEgcG5n"},
        },
        "polygon": {**good, "type": "polygonlabels", "value": {"points": [[1, "x"], [2, 3]]}},
        "size": {**good, "original_width": 10**6, "original_height": 10**6},
    }
    for name, item in bad_items.items():
        with pytest.raises(AnnotationError):
            region_mask(item)
        task = {"id": 9, "data": {"image": "x"}, "annotations": [annotation(1, [good, item])]}
        kept, skipped = sync_annotations([task], CONFIG)
        assert kept == [] and skipped[0]["task"] == 9 and skipped[0]["reason"], name
    kept, skipped = sync_annotations(
        [{"id": 8, "data": {"image": "x"}, "annotations": [annotation(1, [good])]}], CONFIG
    )
    assert [t.task_id for t in kept] == [8] and skipped == []

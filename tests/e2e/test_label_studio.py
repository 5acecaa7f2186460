"""End to end against a real Label Studio 1.23.2 and the embedded backend (model in the server
process, no Redis) as a separate process.

Installs LS into a cached venv (~45 s the first time, $EFFICIENTSAM_LS_VENV or
~/.cache/efficientsam-e2e/ls-1.23.2), starts it on a free port with a fresh data dir, starts
``python -m backend`` with the random-weight Ti fixture, and drives what a user does: connect the
backend, smart keypoints (positive and negative), a smart rectangle, a smart brush stroke, and
"Retrieve predictions" (twice: no duplicates). Checks what LS returns and stores.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.e2e.conftest import (
    annotate_box,
    ask,
    embedded_deployment,
    keypoint,
    make_project,
    retrieve_predictions,
)
from tests.http_fixtures import decode_brush

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("embedded")
    with embedded_deployment(label_studio, log_dir, {"AUTOLABEL_POINTS_PER_SIDE": "4"}) as url:
        yield url


@pytest.fixture(scope="module")
def project(label_studio, backend):
    return make_project(label_studio, backend, "embedded")


def test_interactive_keypoints_positive_and_negative(label_studio, project):
    task_id = project["tasks"][0]
    first = ask(label_studio, project, task_id, [keypoint(32.8, 37.5)])
    (item,) = first["result"]
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["Object"]
    mask = decode_brush(item)
    assert mask.shape == (480, 640) and 0 < mask.mean() < 1
    negative = ask(label_studio, project, task_id, [keypoint(32.8, 37.5), keypoint(73, 65, False)])
    assert (decode_brush(negative["result"][0]) != mask).mean() > 0.01


def test_interactive_rectangle_and_brush(label_studio, project):
    task_id = project["tasks"][0]
    rect = {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {
            "x": 20,
            "y": 20,
            "width": 30,
            "height": 35,
            "rotation": 0,
            "rectanglelabels": ["Car"],
        },
        "id": "rect000001",
        "from_name": "tag3",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }
    boxed = ask(label_studio, project, task_id, [rect])
    assert boxed["result"][0]["value"]["brushlabels"] == ["Car"]
    assert decode_brush(boxed["result"][0]).shape == (480, 640)

    from label_studio_sdk.converter.brush import mask2rle

    stroke = np.zeros((480, 640), np.uint8)
    stroke[150:170, 150:300] = 255
    painted = ask(
        label_studio,
        project,
        task_id,
        [
            {
                "original_width": 640,
                "original_height": 480,
                "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(stroke), "brushlabels": ["Object"]},
                "id": "brush00001",
                "from_name": "tag",
                "to_name": "image",
                "type": "brushlabels",
                "origin": "manual",
            }
        ],
    )
    assert decode_brush(painted["result"][0]).shape == (480, 640)


def test_retrieve_predictions_boxes_and_automatic_without_duplicates(label_studio, project):
    scene, small = project["tasks"]
    annotate_box(label_studio, small)
    predictions = sorted(retrieve_predictions(label_studio, project), key=lambda p: p["task"])
    assert [p["task"] for p in predictions] == [scene, small]
    assert {p["model_version"] for p in predictions} == {project["version"]}
    automatic, boxed = predictions
    (item,) = boxed["result"]  # the rectangle became a mask with its label, at its size
    assert item["value"]["brushlabels"] == ["Car"]
    assert decode_brush(item).shape == (240, 320)
    # no rectangles: "segment everything" (random weights keep few masks, maybe none)
    assert all(r["value"]["brushlabels"] == ["Object"] for r in automatic["result"])
    assert all(decode_brush(r).shape == (480, 640) for r in automatic["result"])
    assert len(retrieve_predictions(label_studio, project)) == 2  # same version: no duplicates


def test_backend_record_and_versions(label_studio, project):
    record = label_studio.get(f"/api/ml/{project['ml']}").json()
    assert record["state"] in ("CO", "connected", "CONNECTED"), record
    versions = label_studio.get(f"/api/ml/{project['ml']}/versions").json()
    assert project["version"] in str(versions)

"""The job contract (serving/requests.py): requests built from LS's payloads, their JSON
through Redis and back, validation at the job boundary, the prompt in the image's pixels."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import pytest

from serving.jobs import JOBS, job_spec
from serving.labelstudio.context import parse_context
from serving.labelstudio.label_config import parse_label_config
from serving.requests import (
    AutolabelRequest,
    BoxSpec,
    FinetuneRequest,
    HousekeepingRequest,
    InvalidRequest,
    OutputSpec,
    PrewarmRequest,
    PromptSpec,
    SamiRequest,
    SegmentRequest,
    TaskSpec,
    autolabel_request,
    parse_request,
    segment_request,
)
from serving.serialization import JobSerializer
from tests.conftest import REPO_ROOT
from tests.http_fixtures import BRUSH_CONFIG, keypoint, rectangle

CONFIG = parse_label_config(BRUSH_CONFIG)
TASK = {"id": 7, "data": {"image": "/data/upload/1/a.png"}}
OUTPUT = {"tag": "BrushLabels", "name": "tag", "to_name": "image"}


def through_redis(request: msgspec.Struct) -> object:
    """What a worker reads: the request's JSON, written and read by the jobs' serializer."""
    return JobSerializer.loads(JobSerializer.dumps(msgspec.to_builtins(request)))


def test_a_click_becomes_a_segment_request_that_survives_the_trip():
    prompt = parse_context([rectangle(10, 20, 30, 40), keypoint(25, 50, positive=False)])
    request = segment_request("3", TASK, CONFIG, prompt, "efficientsam-ti-1")
    assert request.size == (640, 480)
    assert request.prompt == PromptSpec(points=[(160.0, 240.0)], labels=[0], box=(64, 96, 256, 288))
    assert request.output == OutputSpec(
        tag="BrushLabels", name="tag", to_name="image", labels=["Object", "Car"]
    )
    assert (request.task, request.image, request.label) == (7, "/data/upload/1/a.png", "Object")
    wire = through_redis(request)
    assert wire["prompt"]["points"] == [[160.0, 240.0]] and wire["size"] == [640, 480]
    assert parse_request(wire, SegmentRequest) == request


@pytest.mark.parametrize(
    "request_",
    [
        AutolabelRequest(
            project="3",
            task=TaskSpec(id=7, image="a.png", boxes=[BoxSpec(box=(1, 2, 3, 4), size=(8, 6))]),
            mode="boxes",
            points_per_side=16,
            output=OutputSpec(tag="PolygonLabels", name="p", to_name="image"),
            model_version="v",
            write_back=True,
        ),
        PrewarmRequest(project=None, task="7", image="a.png"),
        FinetuneRequest(project="3", trigger="start_training"),
        HousekeepingRequest(),
    ],
    ids=lambda request: type(request).__name__,
)
def test_every_request_comes_back_from_its_json(request_):
    assert parse_request(through_redis(request_), type(request_)) == request_


def test_a_task_with_rectangles_becomes_an_autolabel_request_with_boxes():
    annotation = {"id": 1, "result": [rectangle(10, 20, 30, 40, label="Truck")]}
    request = autolabel_request(
        "3", {**TASK, "annotations": [annotation]}, CONFIG, "auto", 0, "v", True
    )
    assert request.task == TaskSpec(
        id=7,
        image="/data/upload/1/a.png",
        boxes=[BoxSpec(box=(64.0, 96.0, 256.0, 288.0), size=(640, 480), label="Truck")],
    )
    assert (request.mode, request.write_back) == ("auto", True)
    assert parse_request(through_redis(request), AutolabelRequest) == request


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": [640, "480"]}, "Expected `int`, got `str` - at `$.size[1]`"),
        ({"size": [640, 0]}, "Expected `int` >= 1 - at `$.size[1]`"),
        ({"size": [640]}, "Expected `array` of length 2, got 1 - at `$.size`"),
        ({"prompt": {"points": [[1, 2, 3]]}}, "length 2, got 3 - at `$.prompt.points[0]`"),
        ({"image": None}, "Expected `str`, got `null` - at `$.image`"),
        ({"output": {"tag": "BrushLabels"}}, "missing required field `name` - at `$.output`"),
        ({"labels": ["Car"]}, "unknown field `labels`"),  # a typo: not ignored
    ],
)
def test_a_malformed_request_fails_with_what_and_where(change, message):
    wire = through_redis(
        SegmentRequest(
            image="a.png",
            size=(640, 480),
            prompt=PromptSpec(points=[(1, 2)], labels=[1]),
            output=OutputSpec(tag="BrushLabels", name="tag", to_name="image"),
        )
    )
    with pytest.raises(InvalidRequest) as failed:
        parse_request({**wire, **change}, SegmentRequest)
    assert str(failed.value).startswith("invalid SegmentRequest: ")
    assert message in str(failed.value)


def test_missing_fields_and_other_requests_are_refused():
    with pytest.raises(InvalidRequest, match="missing required field `image`"):
        parse_request({"task": 1}, PrewarmRequest)
    with pytest.raises(InvalidRequest, match="Invalid enum value 'all' - at `\\$.mode`"):
        parse_request({"task": {"image": "a"}, "output": OUTPUT, "mode": "all"}, AutolabelRequest)
    with pytest.raises(InvalidRequest, match="Expected `object`, got `array`"):
        parse_request([], FinetuneRequest)


def test_the_prompt_is_scaled_from_the_browsers_pixels_to_the_images():
    """(x, y) pixels: x scales with the widths, y with the heights, labels and order kept."""
    spec = PromptSpec(points=[(100.0, 30.0), (5.0, 60.0)], labels=[1, 0], box=(10, 20, 110, 220))
    prompt = spec.in_image((640, 480), (1280, 240))  # twice as wide, half as high
    np.testing.assert_allclose(prompt.points, [[200.0, 15.0], [10.0, 30.0]])
    assert prompt.labels.tolist() == [1, 0]
    assert prompt.box == (20.0, 10.0, 220.0, 110.0)
    unscaled = spec.in_image((640, 480), (640, 480))
    np.testing.assert_array_equal(unscaled.points, np.array(spec.points, np.float32))
    box = BoxSpec(box=(64, 48, 320, 240), size=(640, 480)).in_image((320, 960))
    assert len(box.points) == 0 and box.box == (32.0, 96.0, 160.0, 480.0)
    with pytest.raises(ValueError, match="at least one point or a box"):
        PromptSpec().in_image((640, 480), (640, 480))


def test_from_prompt_keeps_the_parsed_prompt():
    parsed = parse_context([keypoint(50, 25), keypoint(10, 90, positive=False)]).prompt
    back = PromptSpec.from_prompt(parsed).in_image((640, 480), (640, 480))
    np.testing.assert_array_equal(back.points, parsed.points)
    assert back.labels.tolist() == parsed.labels.tolist() == [1, 0] and back.box is None


def test_the_table_checks_the_request_type_on_the_calling_side():
    assert {name: spec.request for name, spec in JOBS.items()} == {
        "segment": SegmentRequest,
        "autolabel": AutolabelRequest,
        "prewarm": PrewarmRequest,
        "finetune": FinetuneRequest,
        "sami": SamiRequest,
        "housekeeping": HousekeepingRequest,
    }
    assert job_spec("finetune", FinetuneRequest(project="1")).queue == "train"
    with pytest.raises(TypeError, match="takes a SegmentRequest"):
        job_spec("segment", PrewarmRequest(image="a.png"))
    with pytest.raises(KeyError, match="no job 'schedule_training'"):
        job_spec("schedule_training", HousekeepingRequest())


def test_the_serving_core_imports_no_transport():
    """serving.jobs and serving.requests stand below serving.transports (no import circle)."""
    script = (
        "import sys, serving.requests, serving.jobs\n"
        "assert 'serving.transports' not in sys.modules, sorted(sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

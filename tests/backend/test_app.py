"""The HTTP protocol with the real model (random-weight Ti) and recorded LS payload shapes."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from backend.app import create_app
from serving.settings import Settings
from tests.conftest import REFERENCE_DIR, TI_CHECKPOINT
from tests.http_fixtures import (
    BRUSH_CONFIG,
    LEGACY_TOKEN,
    FileServer,
    brush,
    decode_brush,
    keypoint,
    png_bytes,
    predict_request,
    rectangle,
    wait_until_ready,
)

IMAGE_PATH = "/data/upload/1/86aa99e5-image_640x480.png"


@pytest.fixture(scope="module")
def server():
    files = FileServer()
    files.files[IMAGE_PATH] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    yield files
    files.close()


def _client(server, **overrides) -> TestClient:
    settings = Settings.from_env(
        {},
        checkpoint=TI_CHECKPOINT,
        label_studio_url=server.url,
        label_studio_api_key=LEGACY_TOKEN,
        device="cpu",
        **overrides,
    )
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(server):
    with _client(server, autolabel_mode="boxes") as test_client:
        wait_until_ready(test_client)
        yield test_client


def task(task_id: int = 1, image: str = IMAGE_PATH, **extra) -> dict:
    return {
        "id": task_id,
        "data": {"image": image},
        "annotations": [],
        "predictions": [],
        "drafts": [],
        "project": 1,
        **extra,
    }


def interactive(client, items, config=BRUSH_CONFIG, the_task=None):
    response = client.post(
        "/predict", json=predict_request([the_task or task()], {"result": items}, config)
    )
    return response


def test_health_setup_versions(client):
    health = client.get("/health").json()
    assert health["status"] == "UP" and health["model_class"] == "EfficientSam"
    setup = client.post(
        "/setup",
        json={
            "project": "1.1795532368",
            "schema": BRUSH_CONFIG,
            "hostname": "http://localhost:8080",
            "access_token": "x",
            "extra_params": None,
        },
    ).json()
    assert setup["model_version"] == health["model_version"]
    assert setup["model_version"].startswith("efficientsam-ti-")
    assert client.get("/versions").json() == {"versions": [setup["model_version"]]}


def test_keypoint_click_returns_a_brush_mask_at_the_image_size(client):
    response = interactive(client, [keypoint(32.8, 37.5, label="Car")])
    assert response.status_code == 200, response.text
    (entry,) = response.json()["results"]
    (item,) = entry["result"]
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["Car"]
    assert item["from_name"] == "tag" and item["to_name"] == "image"
    mask = decode_brush(item)
    assert mask.shape == (480, 640) and 0 < mask.mean() < 1
    assert entry["model_version"] == client.get("/health").json()["model_version"]
    assert entry["score"] == item["score"]


def test_negative_point_changes_the_mask(client):
    positive = decode_brush(
        interactive(client, [keypoint(32.8, 37.5)]).json()["results"][0]["result"][0]
    )
    with_negative = interactive(client, [keypoint(32.8, 37.5), keypoint(73, 65, positive=False)])
    changed = decode_brush(with_negative.json()["results"][0]["result"][0])
    assert (positive != changed).mean() > 0.01
    by_value_field = interactive(
        client, [keypoint(32.8, 37.5), keypoint(73, 65, positive=False, field="value.positive")]
    )
    np.testing.assert_array_equal(
        decode_brush(by_value_field.json()["results"][0]["result"][0]), changed
    )


def test_rectangle_and_brush_prompts(client):
    rect = interactive(client, [rectangle(20, 20, 30, 35, label="Truck")]).json()["results"][0]
    assert rect["result"][0]["value"]["brushlabels"] == ["Object"]  # Truck is not a brush label
    stroke = np.zeros((480, 640), bool)
    stroke[150:170, 150:300] = True
    painted = interactive(client, [brush(stroke, label="Car")]).json()["results"][0]
    assert painted["result"][0]["value"]["brushlabels"] == ["Car"]
    assert decode_brush(painted["result"][0]).shape == (480, 640)


def test_more_than_six_clicks_are_reported(client):
    clicks = [keypoint(10 + 10 * i, 20 + 5 * i) for i in range(8)]
    entry = interactive(client, clicks).json()["results"][0]
    assert "dropped 2 older click" in entry["info"]


def test_no_prompt_items_gives_an_empty_result(client):
    assert interactive(client, []).json() == {
        "results": [{"result": [], "model_version": client.get("/health").json()["model_version"]}]
    }


def test_polygon_output(client):
    config = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels")
    entry = interactive(client, [keypoint(32.8, 37.5)], config=config).json()["results"][0]
    assert entry["result"] and all(r["type"] == "polygonlabels" for r in entry["result"])


def test_image_smaller_than_the_browser_size_still_gives_the_browser_size(client, server):
    with Image.open(REFERENCE_DIR / "image_640x480.png") as image:
        small = np.asarray(image.convert("RGB").resize((320, 240)))
    server.files["/data/upload/1/small.png"] = png_bytes(small)
    entry = interactive(
        client, [keypoint(32.8, 37.5)], the_task=task(2, "/data/upload/1/small.png")
    ).json()
    assert decode_brush(entry["results"][0]["result"][0]).shape == (480, 640)


def test_batch_box_to_mask_and_bad_tasks(client, server):
    boxes = {
        "id": 11,
        "result": [rectangle(10, 10, 30, 30, label="Car"), rectangle(60, 50, 20, 30)],
        "was_cancelled": False,
    }
    tasks = [
        task(1, annotations=[boxes]),
        task(2),  # no rectangles
        task(3, "/data/upload/1/missing.png", predictions=[boxes]),  # image 404
        task(4, predictions=[{"id": 5, "result": [rectangle(40, 40, 20, 20)]}]),
    ]
    response = client.post("/predict", json=predict_request(tasks, None))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 4
    first = results[0]
    assert [r["value"]["brushlabels"] for r in first["result"]] == [["Car"], ["Object"]]
    assert all(decode_brush(r).shape == (480, 640) for r in first["result"])
    assert "result" not in results[1] and "no rectangles" in results[1]["skipped"]
    assert "result" not in results[2] and "404" in results[2]["skipped"]
    assert len(results[3]["result"]) == 1
    version = client.get("/health").json()["model_version"]
    assert {r["model_version"] for r in results} == {version}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "malformed JSON"),
        (b"[]", 400, "JSON object"),
        (b'{"tasks": []}', 400, "non-empty"),
    ],
)
def test_malformed_requests(client, body, status, message):
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status and message in response.json()["error"]


def test_bad_inputs_are_clear_4xx(client, server):
    bad_config = predict_request(
        [task()], {"result": [keypoint(5, 5)]}, "<View><Image name='i' value='$image'/></View>"
    )
    assert client.post("/predict", json=bad_config).status_code == 422
    assert "zero" in interactive(client, [rectangle(5, 5, 0, 10)]).json()["error"]
    assert interactive(client, [keypoint(500, 5)]).status_code == 422
    no_image = interactive(client, [keypoint(5, 5)], the_task={"id": 9, "data": {}})
    assert no_image.status_code == 422 and "data.image" in no_image.json()["error"]
    server.files["/data/upload/1/text.png"] = b"hello"
    not_image = interactive(client, [keypoint(5, 5)], the_task=task(10, "/data/upload/1/text.png"))
    assert not_image.status_code == 422 and "not a readable image" in not_image.json()["error"]
    two_tasks = client.post(
        "/predict", json=predict_request([task(), task(2)], {"result": [keypoint(5, 5)]})
    )
    assert two_tasks.status_code == 400
    assert client.get("/health").status_code == 200  # still serving


def test_absurd_sizes_and_task_shapes_are_4xx(client):
    huge = interactive(client, [keypoint(5, 5, width=10**9, height=480)])
    assert huge.status_code == 422 and "MAX_IMAGE_PIXELS" in huge.json()["error"]
    not_object = {"id": 9, "data": ["/data/upload/1/a.png"]}
    click = interactive(client, [keypoint(5, 5)], the_task=not_object)
    assert click.status_code == 422 and "'data' must be an object" in click.json()["error"]
    box = {"id": 3, "result": [rectangle(10, 10, 30, 30, width=10**9)], "was_cancelled": False}
    tasks = [not_object, task(2, annotations=[box]), task(3)]
    entries = client.post("/predict", json=predict_request(tasks, None)).json()["results"]
    assert "must be an object" in entries[0]["skipped"]
    assert "MAX_IMAGE_PIXELS" in entries[1]["skipped"]
    assert "no rectangles" in entries[2]["skipped"]  # the others are still answered
    assert client.get("/health").status_code == 200


def test_metrics_count_cache_hits(client):
    interactive(client, [keypoint(50, 50)])
    interactive(client, [keypoint(51, 50)])
    text = client.get("/metrics").text
    hits = [
        line
        for line in text.splitlines()
        if line.startswith('backend_embedding_cache_total{outcome="hit"}')
    ]
    assert hits and float(hits[0].split()[-1]) >= 1
    assert 'backend_request_seconds_count{route="/predict",status="200"}' in text
    assert "backend_decoder_seconds_count" in text


def test_webhook_answers_at_once(client, server):
    server.api["/api/projects/1"] = {"id": 1}  # control actions: for projects LS has
    started = time.monotonic()
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert response.status_code == 201 and response.json()["job"] == "finetune-p1"
    assert time.monotonic() - started < 1.0  # LS waits; the fine-tune runs in the background
    again = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
    assert again.json()["job"] == "finetune-p1"  # one fine-tune per project, never two
    for annotation_id in (1, 2, 2):
        response = client.post(
            "/webhook",
            json={
                "action": "ANNOTATION_CREATED",
                "project": {"id": 1},
                "annotation": {"id": annotation_id, "task": 1, "was_cancelled": False},
                "task": {"id": 1},
            },
        )
        assert response.status_code == 200
    assert response.json()["new_annotations"] == 2
    ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 1}})
    assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 400
    metrics = client.get("/metrics").text
    assert 'backend_webhook_events_total{action="ANNOTATION_CREATED"} 3.0' in metrics


def test_start_training_runs_sami_for_a_project_that_asks_for_it(client, server):
    """``extra_params`` {"train_mode": "sami"} on /setup (LS sends the backend record's): the
    project's "Start training" queues its SAMI run; another project keeps the fine-tune."""
    server.api["/api/projects/2"] = {"id": 2}
    server.api["/api/projects/4"] = {"id": 4}
    setup = {"schema": BRUSH_CONFIG, "extra_params": {"train_mode": "sami"}}
    assert client.post("/setup", json={**setup, "project": "2.1795532368"}).status_code == 200
    sami = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert sami.status_code == 201
    assert sami.json() == {"job": "sami-p2", "status": "queued", "project": "2", "mode": "sami"}
    other = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 4}})
    assert other.json()["job"] == "finetune-p4" and other.json()["mode"] == "finetune"


def test_basic_auth_on_every_route(server):
    with _client(server, basic_auth_user="ml", basic_auth_pass="s3cret") as client:
        good = "Basic " + base64.b64encode(b"ml:s3cret").decode()
        wait_until_ready(client, headers={"Authorization": good})
        for method, path in (
            ("get", "/health"),
            ("post", "/setup"),
            ("post", "/predict"),
            ("post", "/webhook"),
            ("get", "/metrics"),
            ("get", "/versions"),
        ):
            assert getattr(client, method)(path).status_code == 401, path
        bad = "Basic " + base64.b64encode(b"ml:wrong").decode()
        assert client.get("/health", headers={"Authorization": good}).status_code == 200
        assert client.get("/health", headers={"Authorization": bad}).status_code == 401
        assert client.get("/health", headers={"Authorization": "Basic !!!"}).status_code == 401
        anonymous = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}})
        assert anonymous.status_code == 401


def test_opening_a_task_prewarms_its_embedding(client, server):
    with Image.open(REFERENCE_DIR / "image_640x480.png") as image:
        flipped = np.asarray(image.convert("RGB"))[:, ::-1].copy()
    server.files["/data/upload/1/flipped.png"] = png_bytes(flipped)
    cache = client.app.state.service.transport.runtime.cache
    before = cache.stats().entries
    response = client.post(
        "/predict", json=predict_request([task(21, "/data/upload/1/flipped.png")], None)
    )
    assert "result" not in response.json()["results"][0]  # nothing to predict without boxes
    deadline = time.monotonic() + 30
    while cache.stats().entries == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cache.stats().entries == before + 1
    misses = cache.stats().misses
    interactive(client, [keypoint(40, 40)], the_task=task(21, "/data/upload/1/flipped.png"))
    assert cache.stats().misses == misses  # the click found the embedding ready

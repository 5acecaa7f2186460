"""Embedded mode: a click is served while "segment everything" runs (it does not wait for the
whole batch), and a batch task that runs past the request's budget stops with a reason."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from backend.app import create_app
from tests.conftest import REFERENCE_DIR
from tests.http_fixtures import (
    FileServer,
    keypoint,
    png_bytes,
    predict_request,
    readme_settings,
    wait_until_ready,
)

IMAGE = "/data/upload/1/image.png"


@pytest.fixture(scope="module")
def files():
    server = FileServer()
    server.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    with Image.open(REFERENCE_DIR / "image_640x480.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    for index in range(1, 4):  # other images: each batch task runs the encoder (~1 s)
        server.files[f"/data/upload/1/other{index}.png"] = png_bytes(np.roll(pixels, 40 * index, 1))
    yield server
    server.close()


def _client(files, **overrides) -> TestClient:
    return TestClient(create_app(readme_settings(files.url, **overrides)))


def _tasks(count: int, images: list[str] | None = None) -> list[dict]:
    images = images or [IMAGE] * count
    return [{"id": i + 1, "data": {"image": images[i]}, "annotations": []} for i in range(count)]


@pytest.mark.slow
def test_a_click_is_answered_while_segment_everything_runs(files):
    """One long batch task (a new image: encoder, then an 8x8 grid); a click sent meanwhile is
    answered long before that task ends (before: it waited for the task's whole model work)."""
    with _client(files, autolabel_points_per_side=8) as client:
        assert wait_until_ready(client).status_code == 200
        click = predict_request(_tasks(1), {"result": [keypoint(40, 40)]})
        assert client.post("/predict", json=click).status_code == 200  # embedding cached
        batch = {}

        def retrieve_predictions():
            tasks = _tasks(2, ["/data/upload/1/other1.png", "/data/upload/1/missing.png"])
            started = time.perf_counter()
            batch["response"] = client.post("/predict", json=predict_request(tasks, None))
            batch["seconds"] = time.perf_counter() - started

        thread = threading.Thread(target=retrieve_predictions)
        thread.start()
        time.sleep(0.5)  # the batch's encoder run has started
        started = time.perf_counter()
        response = client.post("/predict", json=click)
        click_seconds = time.perf_counter() - started
        assert response.status_code == 200 and response.json()["results"][0]["result"]
        thread.join(300)
        entries = batch["response"].json()["results"]
        assert "result" in entries[0] and "404" in entries[1]["skipped"], entries
        assert click_seconds < 0.5 * batch["seconds"], (click_seconds, batch["seconds"])


@pytest.mark.slow
def test_a_task_past_the_time_budget_stops_with_a_reason(files):
    with _client(files, batch_time_budget_seconds=1.0) as client:
        assert wait_until_ready(client).status_code == 200
        started = time.monotonic()
        response = client.post("/predict", json=predict_request(_tasks(3), None))
        seconds = time.monotonic() - started
        entries = response.json()["results"]
        assert response.status_code == 200 and len(entries) == 3
        assert all("result" not in e for e in entries), entries
        assert all("time budget" in e["skipped"] for e in entries)
        assert seconds < 6, seconds  # one encoder run at most past the 1.5 s hard limit
        assert client.post("/predict", json=predict_request(_tasks(1), None)).status_code == 200

"""The embedded backend exactly as README starts it: no settings but the checkpoint and LS's
address and key (no autolabel mode, no grid size), as a new user meets it."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from backend.app import create_app
from tests.conftest import REFERENCE_DIR
from tests.http_fixtures import (
    FileServer,
    predict_request,
    readme_settings,
    rectangle,
    wait_until_ready,
)

IMAGE = "/data/upload/1/image.png"


@pytest.fixture(scope="module")
def default_client():
    files = FileServer()
    files.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    with TestClient(create_app(readme_settings(files.url))) as client:
        assert wait_until_ready(client).status_code == 200
        yield client
    files.close()


def _task(task_id: int, annotations: list | None = None) -> dict:
    return {"id": task_id, "data": {"image": IMAGE}, "annotations": annotations or [], "project": 1}


@pytest.mark.slow
def test_retrieve_predictions_with_and_without_rectangles_under_the_defaults(default_client):
    """Tasks without rectangles are segmented everywhere (the default grid), tasks with
    rectangles get one mask per box; every entry carries /setup's version."""
    version = default_client.post("/setup", json={"project": "1.1795532368"}).json()
    boxes = {"id": 3, "result": [rectangle(10, 10, 30, 30)], "was_cancelled": False}
    response = default_client.post(
        "/predict", json=predict_request([_task(1), _task(2, [boxes])], None)
    )
    assert response.status_code == 200, response.text
    entries = response.json()["results"]
    assert all("result" in entry for entry in entries), entries
    assert len(entries[1]["result"]) == 1
    assert {entry["model_version"] for entry in entries} == {version["model_version"]}
    health = default_client.get("/health")
    assert health.status_code == 200 and health.json()["model_ready"] is True

"""MAX_JSON_CONTAINERS and MAX_TASKS_PER_REQUEST bound /predict as set (413, before any work)."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from backend.app import create_app
from serving.settings import Settings


@pytest.fixture
def client(redis_connection, redis_url):
    env = {"REDIS_URL": redis_url, "MAX_JSON_CONTAINERS": "20", "MAX_TASKS_PER_REQUEST": "3"}
    with TestClient(create_app(Settings.from_env(env))) as test_client:
        yield test_client


def tasks(count: int) -> dict:
    """A /predict body with ``count`` tasks: 2 + 2 * count JSON objects and arrays."""
    return {"tasks": [{"id": i, "data": {}} for i in range(count)]}


def test_a_body_with_more_json_containers_is_refused(client):
    response = client.post("/predict", json={**tasks(9), "label_config": ""})  # 20 containers
    assert response.status_code == 413 and "MAX_TASKS_PER_REQUEST" in response.json()["error"]
    response = client.post("/predict", json=tasks(10))  # 22 containers
    assert response.status_code == 413
    assert "more than 20 JSON objects and arrays" in response.json()["error"]


def test_a_request_with_more_tasks_is_refused(client):
    response = client.post("/predict", json=tasks(4))
    assert response.status_code == 413
    assert "4 tasks in one request; at most 3" in response.json()["error"]
    assert client.post("/predict", json=tasks(3)).status_code != 413

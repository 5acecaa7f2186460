"""Redis mode with Redis unreachable: every route answers a clear 503 with the reason, never a
500 (webhook recording, versions, setup, predict)."""

from __future__ import annotations

import base64
import socket

import pytest
from starlette.testclient import TestClient

from backend.app import create_app
from serving.settings import Settings
from tests.http_fixtures import keypoint, predict_request


@pytest.fixture
def client():
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = Settings.from_env(
        {}, redis_url=f"redis://127.0.0.1:{port}/0", basic_auth_user="ml", basic_auth_pass="pw"
    )
    auth = {"Authorization": "Basic " + base64.b64encode(b"ml:pw").decode()}
    with TestClient(create_app(settings), headers=auth) as test_client:
        yield test_client


def test_every_route_is_503_with_the_reason(client):
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 3},
        "annotation": {"id": 1, "task": 1, "was_cancelled": False},
    }
    task = {"id": 1, "data": {"image": "/data/upload/1/a.png"}}
    calls = [
        client.post("/webhook", json=event),
        client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 3}}),
        client.get("/versions"),
        client.get("/versions?project=3"),
        client.post("/setup", json={"project": "3.17"}),
        client.post("/predict", json=predict_request([task], None)),
        client.post("/predict", json=predict_request([task], {"result": [keypoint(5, 5)]})),
        client.get("/health"),
    ]
    for response in calls:
        assert response.status_code == 503, (response.request.url, response.text)
        body = response.json()
        assert "Redis" in (body.get("error") or body.get("reason")), body

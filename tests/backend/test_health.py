"""/health tells the truth: 200 only when a click would be served, else 503 with the reason."""

from __future__ import annotations

import time

from starlette.testclient import TestClient

from backend.app import create_app
from serving.settings import Settings
from tests.conftest import TI_CHECKPOINT


def test_a_model_that_failed_to_load_is_503_with_the_reason():
    # A CUDA device on a machine without one: the checkpoint is fine, loading the model fails.
    settings = Settings.from_env({}, checkpoint=TI_CHECKPOINT, device="cuda")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 60
        while (body := client.get("/health").json()).get("model_error") is None:
            assert time.monotonic() < deadline, body
            time.sleep(0.1)
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["status"] == "DOWN"
        assert "failed to load" in response.json()["reason"]

"""The Redis deployment's /health: the base version published but no worker on 'interactive'
means a click would wait and fail, so 503 with the reason (a load balancer or LS must know)."""

from __future__ import annotations

from starlette.testclient import TestClient

from backend.app import create_app
from serving.registry import ModelRegistry
from serving.serialization import JobSerializer
from serving.settings import Settings


def test_no_interactive_worker_is_503_even_with_a_published_version(
    redis_connection, redis_url, tmp_path
):
    ModelRegistry(tmp_path, redis_connection).publish_base({"version": "efficientsam-ti-00000000"})
    settings = Settings.from_env({}, redis_url=redis_url)
    with TestClient(create_app(settings)) as client:
        response = client.get("/health")
        body = response.json()
        assert response.status_code == 503, body
        assert body["status"] == "DOWN" and body["workers"]["interactive"] == 0
        assert "no worker serves the 'interactive' queue" in body["reason"]
        # /setup still answers with the published version: LS may connect before workers start
        setup = client.post("/setup", json={"project": "1.2"})
        assert setup.status_code == 200
        assert setup.json()["model_version"] == "efficientsam-ti-00000000"


def test_opening_a_task_queues_only_its_embedding(redis_connection, redis_url, tmp_path):
    """LS sends one task when the editor opens it: without rectangles that is a prewarm at the
    front of 'batch', never a whole segment-everything job ahead of the clicks that follow."""
    from rq import Queue

    from tests.http_fixtures import predict_request

    ModelRegistry(tmp_path, redis_connection).publish_base({"version": "efficientsam-ti-00000000"})
    settings = Settings.from_env({}, redis_url=redis_url)
    task = {"id": 4, "data": {"image": "/data/upload/1/a.png"}, "annotations": []}
    with TestClient(create_app(settings)) as client:
        response = client.post("/predict", json=predict_request([task], None))
    assert response.status_code == 200
    assert "result" not in response.json()["results"][0]
    jobs = Queue("batch", connection=redis_connection, serializer=JobSerializer).jobs
    assert [job.func_name for job in jobs] == ["serving.jobs.prewarm"]

"""The Redis deployment with real processes: ``python -m worker`` workers, the backend with
REDIS_URL, a worker killed mid-job, Redis going away and coming back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from rq.job import Job, JobStatus
from starlette.testclient import TestClient

from backend.app import create_app
from serving.requests import AutolabelRequest, OutputSpec, TaskSpec
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport
from tests.conftest import REPO_ROOT
from tests.http_fixtures import (
    LEGACY_TOKEN,
    decode_brush,
    keypoint,
    predict_request,
    rectangle,
)
from tests.redis_fixtures import IMAGE, WorkerProcesses, free_port, start_redis, wait_until

pytestmark = pytest.mark.slow


def worker_env(server) -> dict:
    return {"LABEL_STUDIO_URL": server.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN}


def task(task_id: int = 1, **extra) -> dict:
    return {"id": task_id, "data": {"image": IMAGE}, "project": 1, **extra}


def backend(redis_url: str, **overrides) -> TestClient:
    settings = Settings.from_env({}, redis_url=redis_url, interactive_wait_seconds=20, **overrides)
    return TestClient(create_app(settings))


def test_the_backend_never_imports_torch_in_redis_mode(redis_url):
    script = (
        "import sys\n"
        "from starlette.testclient import TestClient\n"
        "from backend.app import create_app\n"
        "from serving.settings import Settings\n"
        f"app = create_app(Settings.from_env({{}}, redis_url={redis_url!r}))\n"
        "with TestClient(app) as client:\n"
        "    client.get('/health'); client.post('/setup', json={'project': '1.2'})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_without_workers_the_backend_answers_503_with_a_reason(redis_connection, redis_url):
    with backend(redis_url) as client:
        setup = client.post("/setup", json={"project": "1.2", "schema": "<View/>"})
        assert setup.status_code == 503 and "no worker" in setup.json()["error"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "DOWN"


def test_clicks_and_batches_through_worker_processes(workers, redis_url, redis_connection, server):
    workers.start("--queues", "interactive,batch", env=worker_env(server))
    with backend(redis_url) as client:
        health = wait_until(
            lambda: (
                (r := client.get("/health")).status_code == 200 and r.json()["model_ready"] and r
            ),
            90,
            "a worker serving",
        ).json()
        assert health["transport"] == "redis" and health["workers"]["interactive"] == 1
        version = client.post("/setup", json={"project": "1.2"}).json()["model_version"]
        assert version == health["model_version"] and version.startswith("efficientsam-ti-")

        response = client.post(
            "/predict", json=predict_request([task()], {"result": [keypoint(50, 50, label="Car")]})
        )
        assert response.status_code == 200, response.text
        (entry,) = response.json()["results"]
        assert entry["model_version"] == version and "timings" not in entry
        assert decode_brush(entry["result"][0]).shape == (480, 640)
        assert entry["result"][0]["value"]["brushlabels"] == ["Car"]

        bad = client.post(
            "/predict",
            json=predict_request(
                [{"id": 2, "data": {"image": "/data/upload/1/missing.png"}}],
                {"result": [keypoint(5, 5)]},
            ),
        )
        assert bad.status_code == 404 and "404" in bad.json()["error"]

        boxes = [{"id": 1, "result": [rectangle(10, 10, 30, 30)]}]
        batch = client.post(
            "/predict", json=predict_request([task(3, annotations=boxes), task(4)], None)
        )
        results = batch.json()["results"]
        assert all("result" not in r and "queued as job" in r["skipped"] for r in results)
        again = client.post("/predict", json=predict_request([task(3, annotations=boxes)], None))
        assert again.json()["results"][0]["skipped"] == results[0]["skipped"]  # not queued twice
        metrics = client.get("/metrics").text
        assert "backend_decoder_seconds_count 1.0" in metrics


def test_a_job_of_a_killed_worker_is_retried_by_another(
    workers, redis_url, redis_connection, server
):
    first = workers.start("--queues", "batch", env=worker_env(server), name="doomed")
    settings = Settings.from_env(
        {}, redis_url=redis_url, batch_retries=1, batch_retry_delay_seconds=1
    )
    transport = QueueTransport(settings)
    wait_until(lambda: transport.directory.base(), 90, "the first worker's model")
    request = AutolabelRequest(
        project="1",
        task=TaskSpec(id=1, image=IMAGE),
        mode="everything",
        points_per_side=16,  # download + encoder + 256 queries, seconds: killed mid-way
        output=OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Object"]),
    )
    job_id = transport.submit("autolabel", request, "autolabel-kill-test")
    job = Job.fetch(job_id, connection=redis_connection, serializer=JobSerializer)
    wait_until(lambda: job.get_status() == JobStatus.STARTED, 60, "the job started", 0.02)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    workers.start("--queues", "batch", env=worker_env(server), name="rescuer")
    wait_until(lambda: job.get_status() == JobStatus.FINISHED, 120, "the retried job finished", 0.2)
    job.refresh()
    assert job.retries_left == 0  # the abandoned run used the one retry
    assert job.worker_name == "rescuer"
    result = job.return_value()
    assert isinstance(result["result"], list) and result["model_version"].startswith("efficientsam")


def test_redis_restart_gives_503_then_recovers_without_restarts(tmp_path, server):
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    private = start_redis(port, tmp_path)
    workers = WorkerProcesses(url, tmp_path / "models", tmp_path)
    try:
        workers.start("--queues", "interactive", env=worker_env(server))
        with backend(url) as client:
            wait_until(lambda: client.get("/health").status_code == 200, 90, "a worker serving")
            body = predict_request([task()], {"result": [keypoint(40, 40)]})
            assert client.post("/predict", json=body).status_code == 200
            private.terminate()
            private.wait()
            down = client.post("/predict", json=body)
            assert down.status_code == 503 and "Redis" in down.json()["error"]
            assert client.get("/health").status_code == 503
            assert client.post("/setup", json={"project": "1.1"}).status_code == 503
            private = start_redis(port, tmp_path)  # empty: no queues, no versions
            recovered = wait_until(
                lambda: (r := client.post("/predict", json=body)).status_code == 200 and r,
                60,
                "the backend serving again",
                0.5,
            )
            assert decode_brush(recovered.json()["results"][0]["result"][0]).shape == (480, 640)
    finally:
        workers.stop()
        private.terminate()
        private.wait()

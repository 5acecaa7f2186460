"""Control actions against a real Label Studio 1.23.2 (backend/control.py), embedded backend:

* basic auth on: connecting the project makes the backend put its basic auth header on LS's
  project webhook, so an annotation saved in LS reaches the backend (counted), and "Start
  training" reaches it too;
* basic auth off (LABEL_STUDIO_URL and key set): "Start training" for the project LS has is
  accepted, START_TRAINING for a project LS does not have is refused with 403."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import REFERENCE_DIR
from tests.e2e.conftest import LABEL_CONFIG, Processes, annotate_box, make_project, png

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USER, PASSWORD = "ml", "s3cret-pw"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def wait_ready(url: str, headers: dict | None = None, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.5)


def metric(url: str, line_start: str, headers: dict | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=5).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else 0.0


def start_training(label_studio: httpx.Client, ml: int) -> dict:
    """ "Start training" in LS; returns the backend record afterwards (its state)."""
    response = label_studio.post(f"/api/ml/{ml}/train", json={})
    assert response.status_code == 200, response.text
    return label_studio.get(f"/api/ml/{ml}").json()


@pytest.fixture
def processes(label_studio, tmp_path):
    """Starts an embedded backend with extra env; returns its URL (``start.logs``: log files)."""
    running = []

    def start(env: dict) -> str:
        log_dir = tmp_path / f"backend{len(running)}"
        log_dir.mkdir()
        process = Processes(label_studio, log_dir, {"TORCH_THREADS": "1", **env})
        running.append(process)
        return process.backend()

    start.logs = lambda: [log for p in running for _, log in p.started]
    yield start
    for process in running:
        process.stop()


def test_basic_auth_backend_gets_annotation_events_and_start_training(label_studio, processes):
    url = processes({"BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": PASSWORD})
    auth = {"Authorization": BASIC}
    wait_ready(url, auth)
    created = label_studio.post(
        "/api/projects", json={"title": "control", "label_config": LABEL_CONFIG}
    )
    assert created.status_code == 201, created.text
    project = created.json()["id"]
    image = png(Image.open(REFERENCE_DIR / "image_640x480.png"))
    imported = label_studio.post(
        f"/api/projects/{project}/import", files=[("file0", ("a.png", image, "image/png"))]
    )
    assert imported.status_code == 201, imported.text
    connected = label_studio.post(
        "/api/ml",
        json={
            "url": url,
            "project": project,
            "title": "efficientsam",
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": USER,
            "basic_auth_pass": PASSWORD,
        },
    )
    assert connected.status_code == 201, connected.text
    ml = connected.json()["id"]

    # the backend sets its header on the webhook LS created for it (no manual PATCH)
    deadline = time.monotonic() + 20
    while True:
        hooks = label_studio.get(f"/api/webhooks?project={project}").json()
        ours = [h for h in hooks if h["url"] == f"{url}/webhook"]
        if ours and ours[0]["headers"].get("Authorization") == BASIC:
            break
        assert time.monotonic() < deadline, hooks
        time.sleep(0.5)

    tasks = label_studio.get(f"/api/tasks?project={project}").json()
    task_id = (tasks["tasks"] if isinstance(tasks, dict) else tasks)[0]["id"]
    annotate_box(label_studio, task_id)  # LS sends ANNOTATION_CREATED with the header
    counted = 'backend_webhook_events_total{action="ANNOTATION_CREATED"}'
    accepted = 'backend_request_seconds_count{route="/webhook",status="200"}'
    deadline = time.monotonic() + 10
    while metric(url, counted, auth) < 1:
        assert time.monotonic() < deadline, "the annotation event did not reach the backend"
        time.sleep(0.3)
    assert metric(url, accepted, auth) == 1

    record = start_training(label_studio, ml)
    assert record["state"] != "ER", record
    assert metric(url, 'backend_request_seconds_count{route="/webhook",status="201"}', auth) == 1


def test_without_basic_auth_only_projects_label_studio_has(label_studio, processes):
    url = processes({})
    wait_ready(url)
    project = make_project(label_studio, url, "control-open")
    record = start_training(label_studio, project["ml"])
    assert record["state"] != "ER", record
    assert metric(url, 'backend_request_seconds_count{route="/webhook",status="201"}') == 1

    unknown = {"action": "START_TRAINING", "project": {"id": 987654}}
    refused = httpx.post(f"{url}/webhook", json=unknown, timeout=10)
    assert refused.status_code == 403, refused.text
    assert "project 987654 does not exist" in refused.json()["error"]
    time.sleep(0.5)
    (log,) = processes.logs()
    assert "refused START_TRAINING for project 987654 from 127.0.0.1" in log.read_text()

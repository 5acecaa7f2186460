"""End-to-end fixtures: a real Label Studio 1.23.2 (one per test session) and helpers to start
the backend and workers as real processes, create projects and drive what a user does."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import REFERENCE_DIR, REPO_ROOT, TI_CHECKPOINT

HARNESS = Path(__file__).parent / "ls_harness"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"
LS_USER, LS_PASSWORD = "admin@example.com", "Passw0rd!"  # the user start_ls.sh creates
LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image" smart="true">
    <Label value="Object" background="#FF0000"/>
    <Label value="Car" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Car" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, seconds: float, check=lambda r: r.status_code == 200) -> httpx.Response:
    deadline = time.monotonic() + seconds
    last: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if check(response):
                return response
            last = response.status_code
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {seconds} s: {last}")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    venv = Path(
        os.environ.get(
            "EFFICIENTSAM_LS_VENV", Path.home() / ".cache" / "efficientsam-e2e" / "ls-1.23.2"
        )
    )
    run_dir = tmp_path_factory.mktemp("ls")
    port = free_port()
    env = {
        **os.environ,
        "LS_VENV": str(venv),
        "RUN_DIR": str(run_dir),
        "LS_PORT": str(port),
        "LS_TOKEN": LS_TOKEN,
        "LS_USER": LS_USER,
        "LS_PASS": LS_PASSWORD,
        "LS_FRESH": "1",
    }
    subprocess.run(["bash", str(HARNESS / "install_ls.sh")], env=env, check=True, timeout=900)
    subprocess.run(["bash", str(HARNESS / "start_ls.sh")], env=env, check=True, timeout=300)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=300)
    yield client
    client.close()
    subprocess.run(["bash", str(HARNESS / "stop_ls.sh")], env=env, check=False, timeout=60)


class Processes:
    """``python -m backend`` / ``python -m worker`` as real processes (the commands of README
    and docker-compose.yml), with their logs printed when the fixture ends."""

    def __init__(self, label_studio: httpx.Client, log_dir: Path, env: dict | None = None):
        self.log_dir = log_dir
        self.env = {
            **os.environ,
            "LABEL_STUDIO_URL": str(label_studio.base_url).rstrip("/"),
            "LABEL_STUDIO_API_KEY": LS_TOKEN,
            "CHECKPOINT": str(TI_CHECKPOINT),
            "MODEL_DIR": str(log_dir / "models"),
            "DEVICE": "cpu",
            **(env or {}),
        }
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, module: str, *args: str) -> subprocess.Popen:
        log = self.log_dir / f"{module}-{len(self.started)}.log"
        with log.open("w") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append((process, log))
        return process

    def backend(self) -> str:
        port = free_port()
        self.start("backend", "--host", "127.0.0.1", "--port", str(port))
        return f"http://127.0.0.1:{port}"

    def run(self, module: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def stop(self) -> None:
        for process, _ in self.started:
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process, log in self.started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def embedded_deployment(
    label_studio: httpx.Client, log_dir: Path, env: dict, ready_seconds: float = 60
) -> Iterator[str]:
    """The embedded deployment as a process: ``python -m backend`` without REDIS_URL. Yields its
    URL once its model is ready."""
    processes = Processes(label_studio, log_dir, env)
    url = processes.backend()
    try:
        wait_for(
            f"{url}/health",
            ready_seconds,
            lambda r: r.status_code == 200 and r.json()["model_ready"],
        )
        yield url
    finally:
        processes.stop()


@contextmanager
def redis_deployment(
    label_studio: httpx.Client, log_dir: Path, redis_url: str, env: dict, worker_queues: list[str]
) -> Iterator[dict]:
    """The Redis deployment as processes: a backend and one worker per entry of
    ``worker_queues`` ("interactive,batch", "train"), on an own Redis db index flushed before and
    after. Yields ``{"url", "processes", "redis"}`` once the backend's model is ready."""
    import redis

    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    processes = Processes(label_studio, log_dir, {"REDIS_URL": redis_url, **env})
    url = processes.backend()
    for queues in worker_queues:
        processes.start("worker", "--queues", queues)
    try:
        wait_for(f"{url}/health", 120, lambda r: r.status_code == 200 and r.json()["model_ready"])
        yield {"url": url, "processes": processes, "redis": connection}
    finally:
        processes.stop()
        connection.flushdb()
        connection.close()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_project(label_studio: httpx.Client, backend_url: str, title: str) -> dict:
    """A project with a 640x480 and a 320x240 image, connected to the backend (interactive)."""
    created = label_studio.post(
        "/api/projects", json={"title": title, "label_config": LABEL_CONFIG}
    )
    assert created.status_code == 201, created.text
    project_id = created.json()["id"]
    picture = Image.open(REFERENCE_DIR / "image_640x480.png").convert("RGB")
    files = [
        ("file0", ("scene_640x480.png", png(picture), "image/png")),
        ("file1", ("small_320x240.png", png(picture.resize((320, 240))), "image/png")),
    ]
    imported = label_studio.post(
        f"/api/projects/{project_id}/import?return_task_ids=true", files=files
    )
    assert imported.status_code == 201, imported.text
    tasks = label_studio.get(f"/api/tasks?project={project_id}&page_size=10").json()
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    connected = label_studio.post(
        "/api/ml",
        json={"url": backend_url, "project": project_id, "title": title, "is_interactive": True},
    )
    assert connected.status_code == 201, connected.text
    ml = connected.json()
    assert ml["model_version"].startswith("efficientsam-ti-"), ml
    return {
        "id": project_id,
        "tasks": sorted(t["id"] for t in tasks),
        "ml": ml["id"],
        "version": ml["model_version"],
    }


def ask(label_studio: httpx.Client, project: dict, task_id: int, items: list) -> dict:
    response = label_studio.post(
        f"/api/ml/{project['ml']}/interactive-annotating",
        json={"task": task_id, "context": {"result": items}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def keypoint(x: float, y: float, positive: bool = True) -> dict:
    return {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.3, "labels": ["Object"], "keypointlabels": ["Object"]},
        "is_positive": positive,
        "id": f"kp{x}{y}"[:10],
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def annotate_box(label_studio: httpx.Client, task_id: int) -> None:
    """A human annotation with one Car rectangle on the 320x240 task."""
    item = {
        "original_width": 320,
        "original_height": 240,
        "image_rotation": 0,
        "value": {
            "x": 25,
            "y": 25,
            "width": 40,
            "height": 50,
            "rotation": 0,
            "rectanglelabels": ["Car"],
        },
        "id": "box0000001",
        "from_name": "tag3",
        "to_name": "image",
        "type": "rectanglelabels",
    }
    response = label_studio.post(
        f"/api/tasks/{task_id}/annotations", json={"result": [item], "lead_time": 1.0}
    )
    assert response.status_code == 201, response.text


def retrieve_predictions(label_studio: httpx.Client, project: dict) -> list[dict]:
    """Data Manager "Retrieve predictions" on all tasks; returns what LS has stored."""
    response = label_studio.post(
        f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert response.status_code == 200, response.text
    return stored_predictions(label_studio, project)


def stored_predictions(label_studio: httpx.Client, project: dict) -> list[dict]:
    stored = label_studio.get(f"/api/predictions?project={project['id']}").json()
    return stored["results"] if isinstance(stored, dict) else stored

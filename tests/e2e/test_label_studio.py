"""End to end against a real Label Studio 1.23.2 and the backend as a separate process.

Installs LS into a cached venv (~45 s the first time, $EFFICIENTSAM_LS_VENV or
~/.cache/efficientsam-e2e/ls-1.23.2), starts it on a free port with a fresh data dir, starts
``python -m backend`` with the random-weight Ti fixture, and drives what a user does: connect the
backend, smart keypoints (positive and negative), a smart rectangle, a smart brush stroke, and
"Retrieve predictions" (twice: no duplicates). Checks what LS returns and stores.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.backend.conftest import decode_brush
from tests.conftest import REFERENCE_DIR, TI_CHECKPOINT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HARNESS = Path(__file__).parent / "ls_harness"
LS_TOKEN = "0123456789abcdef0123456789abcdef01234567"
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


@pytest.fixture(scope="module")
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
        "LS_FRESH": "1",
    }
    subprocess.run(["bash", str(HARNESS / "install_ls.sh")], env=env, check=True, timeout=900)
    subprocess.run(["bash", str(HARNESS / "start_ls.sh")], env=env, check=True, timeout=300)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Token {LS_TOKEN}"}, timeout=300)
    yield client
    client.close()
    subprocess.run(["bash", str(HARNESS / "stop_ls.sh")], env=env, check=False, timeout=60)


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("backend") / "backend.log"
    env = {
        **os.environ,
        "LABEL_STUDIO_URL": str(label_studio.base_url).rstrip("/"),
        "LABEL_STUDIO_API_KEY": LS_TOKEN,
        "DEVICE": "cpu",
    }
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backend",
                "--checkpoint",
                str(TI_CHECKPOINT),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", 60, lambda r: r.status_code == 200 and r.json()["model_ready"])
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        print(log.read_text()[-3000:])


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def project(label_studio, backend):
    created = label_studio.post(
        "/api/projects", json={"title": "e2e", "label_config": LABEL_CONFIG}
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
        json={
            "url": backend,
            "project": project_id,
            "title": "efficientsam",
            "is_interactive": True,
        },
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


def ask(label_studio, project, task_id, items):
    response = label_studio.post(
        f"/api/ml/{project['ml']}/interactive-annotating",
        json={"task": task_id, "context": {"result": items}},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return body["data"]


def keypoint(x, y, positive=True):
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


def test_interactive_keypoints_positive_and_negative(label_studio, project):
    task_id = project["tasks"][0]
    first = ask(label_studio, project, task_id, [keypoint(32.8, 37.5)])
    (item,) = first["result"]
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["Object"]
    mask = decode_brush(item)
    assert mask.shape == (480, 640) and 0 < mask.mean() < 1
    negative = ask(label_studio, project, task_id, [keypoint(32.8, 37.5), keypoint(73, 65, False)])
    assert (decode_brush(negative["result"][0]) != mask).mean() > 0.01


def test_interactive_rectangle_and_brush(label_studio, project):
    task_id = project["tasks"][0]
    rect = {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {
            "x": 20,
            "y": 20,
            "width": 30,
            "height": 35,
            "rotation": 0,
            "rectanglelabels": ["Car"],
        },
        "id": "rect000001",
        "from_name": "tag3",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }
    boxed = ask(label_studio, project, task_id, [rect])
    assert boxed["result"][0]["value"]["brushlabels"] == ["Car"]
    assert decode_brush(boxed["result"][0]).shape == (480, 640)

    from label_studio_sdk.converter.brush import mask2rle

    stroke = np.zeros((480, 640), np.uint8)
    stroke[150:170, 150:300] = 255
    painted = ask(
        label_studio,
        project,
        task_id,
        [
            {
                "original_width": 640,
                "original_height": 480,
                "image_rotation": 0,
                "value": {"format": "rle", "rle": mask2rle(stroke), "brushlabels": ["Object"]},
                "id": "brush00001",
                "from_name": "tag",
                "to_name": "image",
                "type": "brushlabels",
                "origin": "manual",
            }
        ],
    )
    assert decode_brush(painted["result"][0]).shape == (480, 640)


def test_retrieve_predictions_box_to_mask_without_duplicates(label_studio, project):
    small_task = project["tasks"][1]
    annotation = label_studio.post(
        f"/api/tasks/{small_task}/annotations",
        json={
            "result": [
                {
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
            ],
            "lead_time": 1.0,
        },
    )
    assert annotation.status_code == 201, annotation.text

    def retrieve():
        response = label_studio.post(
            f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        assert response.status_code == 200, response.text
        stored = label_studio.get(f"/api/predictions?project={project['id']}").json()
        return stored["results"] if isinstance(stored, dict) else stored

    predictions = retrieve()
    assert [p["task"] for p in predictions] == [small_task]  # the other task has no boxes
    (prediction,) = predictions
    assert prediction["model_version"] == project["version"]
    (item,) = prediction["result"]
    assert item["value"]["brushlabels"] == ["Car"]
    mask = decode_brush(item)
    assert mask.shape == (240, 320)
    assert len(retrieve()) == 1  # same version: LS does not ask again, nothing duplicated


def test_backend_record_and_versions(label_studio, project):
    record = label_studio.get(f"/api/ml/{project['ml']}").json()
    assert record["state"] in ("CO", "connected", "CONNECTED"), record
    versions = label_studio.get(f"/api/ml/{project['ml']}/versions").json()
    assert project["version"] in str(versions)

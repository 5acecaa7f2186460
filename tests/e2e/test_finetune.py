"""End to end: annotations made in a real Label Studio 1.23.2 -> "Start training" -> a new version
is promoted and served -> LS re-predicts with it.

Redis deployment as in docker-compose.yml: ``python -m backend`` (REDIS_URL),
``python -m worker --queues interactive,batch`` and ``python -m worker --queues train``. The
project holds a seeded synthetic domain that random encoder weights can learn (one object of a
distinct colour per image on textured clutter, ``benchmarks/synthetic.py``); the
annotations are brush masks of those objects, saved through the LS API, which sends the
ANNOTATION_CREATED webhooks to the backend as it would for a person."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from benchmarks.synthetic import make_dataset
from tests.e2e.conftest import (
    LABEL_CONFIG,
    ask,
    png,
    redis_deployment,
    retrieve_predictions,
    stored_predictions,
)
from tests.http_fixtures import brush, decode_brush

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/10"
IMAGES = 16


@pytest.fixture(scope="module")
def deployment(label_studio, tmp_path_factory):
    env = {
        "TORCH_THREADS": "1",
        "AUTOLABEL_POINTS_PER_SIDE": "4",
        "TRAIN_MIN_TASKS": "4",
        "TRAIN_STEPS": "100",
    }
    log_dir = tmp_path_factory.mktemp("finetune")
    queues = ["interactive,batch", "train"]
    with redis_deployment(label_studio, log_dir, REDIS_URL, env, queues) as running:
        yield running


@pytest.fixture(scope="module")
def project(label_studio, deployment):
    samples = make_dataset(IMAGES, seed=7, prefix="e2e")
    created = label_studio.post(
        "/api/projects", json={"title": "finetune", "label_config": LABEL_CONFIG}
    )
    assert created.status_code == 201, created.text
    project_id = created.json()["id"]
    files = [
        (f"file{i}", (f"{s.image_id}.png", png(Image.fromarray(s.image)), "image/png"))
        for i, s in enumerate(samples)
    ]
    imported = label_studio.post(f"/api/projects/{project_id}/import", files=files)
    assert imported.status_code == 201, imported.text
    tasks = label_studio.get(f"/api/tasks?project={project_id}&page_size=100").json()
    tasks = sorted(tasks["tasks"] if isinstance(tasks, dict) else tasks, key=lambda t: t["id"])
    ml = label_studio.post(
        "/api/ml",
        json={
            "url": deployment["url"],
            "project": project_id,
            "title": "efficientsam",
            "is_interactive": True,
        },
    )
    assert ml.status_code == 201, ml.text
    return {
        "id": project_id,
        "ml": ml.json()["id"],
        "version": ml.json()["model_version"],
        "tasks": [t["id"] for t in tasks],
        "samples": {t["id"]: s for t, s in zip(tasks, samples, strict=True)},
    }


def test_start_training_promotes_a_version_that_is_served_and_used(
    label_studio, project, deployment
):
    for task_id, sample in project["samples"].items():
        saved = label_studio.post(
            f"/api/tasks/{task_id}/annotations",
            json={"result": [brush(sample.masks[0])], "lead_time": 3.0},
        )
        assert saved.status_code == 201, saved.text
    status = deployment["processes"].run("worker", "status")
    assert status.returncode == 0, status.stderr
    # the webhooks reached the backend and were counted for the periodic trigger
    new = deployment["redis"].scard(f"efficientsam:project:{project['id']}:new")
    assert new == IMAGES

    train = label_studio.post(f"/api/ml/{project['ml']}/train", json={})
    assert train.status_code == 200, train.text
    base = project["version"]
    deadline = time.monotonic() + 600
    while True:
        record = label_studio.get(f"/api/ml/{project['ml']}").json()  # LS calls /setup
        if record["model_version"] != base:
            break
        assert time.monotonic() < deadline, "no version was promoted"
        assert record["state"] != "ER", record
        time.sleep(3)
    version = record["model_version"]
    assert version == f"{base}+p{project['id']}-ft1"

    history = deployment["processes"].run("worker", "versions", "--project", str(project["id"]))
    assert history.returncode == 0 and "promoted" in history.stdout and version in history.stdout

    # every worker serves it at once: a click is answered by the new version
    task_id = project["tasks"][0]
    click = {
        "original_width": project["samples"][task_id].image.shape[1],
        "original_height": project["samples"][task_id].image.shape[0],
        "image_rotation": 0,
        "value": {
            "x": 50,
            "y": 50,
            "width": 0.5,
            "labels": ["Object"],
            "keypointlabels": ["Object"],
        },
        "is_positive": True,
        "id": "kp00000001",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    answer = ask(label_studio, project, task_id, [click])
    assert answer["model_version"] == version
    assert decode_brush(answer["result"][0]).shape == project["samples"][task_id].masks[0].shape

    # LS re-predicts with the new version: "Retrieve predictions" queues every task (none has a
    # prediction of it) and the worker writes them, stamped with the new version
    assert retrieve_predictions(label_studio, project) == []
    deadline = time.monotonic() + 300
    while len(predictions := stored_predictions(label_studio, project)) < IMAGES:
        assert time.monotonic() < deadline, f"{len(predictions)} of {IMAGES} predictions"
        time.sleep(1)
    assert {p["model_version"] for p in predictions} == {version}

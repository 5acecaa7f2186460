"""End to end: SAMI in the product, in a real Label Studio 1.23.2 with Redis workers.

An EfficientSAM-S (random weights: no real ones here) is served; the project asks for SAMI
runs through its ML backend record's ``extra_params`` (``{"train_mode": "sami"}``), sent by LS
on ``/setup``. "Start training" queues the ``sami`` job on ``train``: the S teaches a Ti student
(``SAMI_STUDENT``: the Ti fixture) on the project's images, the decoder fine-tune continues from
it on the brush annotations, and the result is promoted as
``efficientsam-ti-<8 hex>+p<project>-sami1``; a click is then answered by that version. The
gates are opened here (``SAMI_MIN_AGREEMENT=0``, ``SAMI_MIOU_MARGIN=-1``: random weights pass
no real threshold; the gates themselves are tested in tests/serving/test_sami_runs.py)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from PIL import Image

from benchmarks.random_weights import random_state_dict
from benchmarks.synthetic import make_dataset
from efficientsam.build import build_efficient_sam
from efficientsam.checkpoint import save_checkpoint
from tests.conftest import TI_CHECKPOINT
from tests.e2e.conftest import LABEL_CONFIG, ask, png, redis_deployment
from tests.http_fixtures import brush, decode_brush

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/14"
IMAGES = 8
ANNOTATED = 6


@pytest.fixture(scope="module")
def deployment(label_studio, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sami")
    teacher = build_efficient_sam("s")
    teacher.load_state_dict(random_state_dict(teacher, seed=2468))
    checkpoint = folder / "efficientsam_s_random.safetensors"
    save_checkpoint(teacher, checkpoint)
    env = {
        "CHECKPOINT": str(checkpoint),
        "SAMI_STUDENT": str(TI_CHECKPOINT),
        "SAMI_STEPS": "6",
        "SAMI_ALIGN_STEPS": "2",
        "SAMI_MIN_AGREEMENT": "0",
        "SAMI_MIOU_MARGIN": "-1",
        "TRAIN_STEPS": "20",
        "TRAIN_MIN_TASKS": "4",
        "TORCH_THREADS": "1",
        "AUTOLABEL_POINTS_PER_SIDE": "4",
    }
    with redis_deployment(
        label_studio, folder, REDIS_URL, env, ["interactive,batch", "train"]
    ) as d:
        yield d


@pytest.fixture(scope="module")
def project(label_studio, deployment):
    samples = make_dataset(IMAGES, seed=11, prefix="sami-e2e")
    created = label_studio.post(
        "/api/projects", json={"title": "sami", "label_config": LABEL_CONFIG}
    )
    assert created.status_code == 201, created.text
    project_id = created.json()["id"]
    files = [
        (f"file{i}", (f"{s.image_id}.png", png(Image.fromarray(s.image)), "image/png"))
        for i, s in enumerate(samples)
    ]
    assert label_studio.post(f"/api/projects/{project_id}/import", files=files).status_code == 201
    tasks = label_studio.get(f"/api/tasks?project={project_id}&page_size=100").json()
    tasks = sorted(tasks["tasks"] if isinstance(tasks, dict) else tasks, key=lambda t: t["id"])
    ml = label_studio.post(
        "/api/ml",
        json={
            "url": deployment["url"],
            "project": project_id,
            "title": "efficientsam",
            "is_interactive": True,
            "extra_params": {"train_mode": "sami"},
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


def test_start_training_in_sami_mode_promotes_a_ti_version_that_serves_clicks(
    label_studio, project, deployment
):
    base = project["version"]
    assert base.startswith("efficientsam-s-")
    for task_id in project["tasks"][:ANNOTATED]:  # two tasks stay unannotated: SAMI uses them
        sample = project["samples"][task_id]
        saved = label_studio.post(
            f"/api/tasks/{task_id}/annotations",
            json={"result": [brush(sample.masks[0])], "lead_time": 3.0},
        )
        assert saved.status_code == 201, saved.text

    train = label_studio.post(f"/api/ml/{project['ml']}/train", json={})
    assert train.status_code == 200, train.text
    redis = deployment["redis"]
    assert redis.hget("efficientsam:project-params", str(project["id"])) is not None
    stages = set()
    deadline = time.monotonic() + 900
    while True:
        metrics = httpx.get(f"{deployment['url']}/metrics").text
        for line in metrics.splitlines():  # labels in any order
            ours = 'mode="sami"' in line and f'project="{project["id"]}"' in line
            if line.startswith("backend_training_stage{") and ours:
                stages |= set(re.findall(r'stage="(\w+)"', line))
        record = label_studio.get(f"/api/ml/{project['ml']}").json()  # LS calls /setup
        if record["model_version"] != base:
            break
        assert time.monotonic() < deadline, f"no SAMI version was promoted; stages {stages}"
        assert record["state"] != "ER", record
        time.sleep(2)
    version = record["model_version"]
    assert re.fullmatch(rf"efficientsam-ti-[0-9a-f]{{8}}\+p{project['id']}-sami1", version)
    assert stages & {"sami", "align", "train", "evaluate", "done"}, stages

    history = deployment["processes"].run("worker", "versions", "--project", str(project["id"]))
    assert history.returncode == 0 and version in history.stdout
    assert "mask agreement with the teacher" in history.stdout

    task_id = project["tasks"][-1]  # an unannotated task
    sample = project["samples"][task_id]
    click = {
        "original_width": sample.image.shape[1],
        "original_height": sample.image.shape[0],
        "image_rotation": 0,
        "value": {"x": 50, "y": 50, "width": 0.5, "keypointlabels": ["Object"]},
        "is_positive": True,
        "id": "kp00000001",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    answer = ask(label_studio, project, task_id, [click])
    assert answer["model_version"] == version
    assert decode_brush(answer["result"][0]).shape == sample.masks[0].shape

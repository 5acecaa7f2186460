"""README's settings only (LS's address and key, the checkpoint: no grid size, no autolabel
mode) against a real Label Studio 1.23.2, in both deployments: "Retrieve predictions" on a task
with a rectangle (a mask per box) and one without (segment everything at the default grid),
then again after a promotion, every prediction stamped with the version /setup gave."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TI_CHECKPOINT
from tests.e2e.conftest import (
    Processes,
    annotate_box,
    make_project,
    redis_deployment,
    retrieve_predictions,
    stored_predictions,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/9"  # own db index, flushed before and after
README_ENV = {"DEVICE": "auto"}  # what README sets: LABEL_STUDIO_URL/_API_KEY, CHECKPOINT


def promote_a_fine_tune(model_dir: Path, project: int, base_version: str, redis=None) -> str:
    """What a train worker does at the end of a run that beat the served version: a version
    file of the changed tensors, then the promotion (disk, and Redis when given)."""
    import torch

    from efficientsam.checkpoint import load_state_dict_file
    from serving.registry import ModelRegistry

    state = load_state_dict_file(TI_CHECKPOINT)
    key = "mask_decoder.iou_token.weight"
    tensors = {key: state[key] + 0.01 * torch.ones_like(state[key])}
    registry = ModelRegistry(model_dir, redis)
    version = registry.store_version(str(project), base_version, tensors, {"parent": base_version})
    registry.promote(str(project), version, {"reason": "test"})
    return version


def check_retrieve(label_studio: httpx.Client, project: dict, version: str) -> None:
    """Both tasks end with exactly one prediction of ``version``: a Car mask for the boxed one,
    segment-everything's answer for the other. "Retrieve predictions" is pressed again while a
    task has none, as a user does (the embedded backend answers what fits in its time budget)."""
    deadline = time.monotonic() + 300
    while True:
        retrieve_predictions(label_studio, project)
        for _ in range(30):  # the Redis deployment writes them a little later
            stored = stored_predictions(label_studio, project)
            ours = [p for p in stored if p["model_version"] == version]
            if len(ours) >= len(project["tasks"]):
                break
            time.sleep(1)
        if len(ours) >= len(project["tasks"]) or time.monotonic() > deadline:
            break
    by_task = {p["task"]: p for p in ours}
    assert sorted(by_task) == project["tasks"] and len(ours) == len(project["tasks"]), ours
    boxed = by_task[project["tasks"][1]]
    assert [r["value"]["brushlabels"] for r in boxed["result"]] == [["Car"]]
    assert isinstance(by_task[project["tasks"][0]]["result"], list)
    assert len(retrieve_predictions(label_studio, project)) == len(stored)  # no duplicates


def run_scenario(label_studio: httpx.Client, url: str, title: str, model_dir: Path, redis=None):
    project = make_project(label_studio, url, title)
    annotate_box(label_studio, project["tasks"][1])  # the 320x240 task
    check_retrieve(label_studio, project, project["version"])
    version = promote_a_fine_tune(model_dir, project["id"], project["version"], redis)
    check_retrieve(label_studio, project, version)


def test_embedded_with_readme_settings(label_studio, tmp_path):
    processes = Processes(label_studio, tmp_path, README_ENV)
    url = processes.backend()
    try:
        wait_for(f"{url}/health", 90, lambda r: r.status_code == 200)
        run_scenario(label_studio, url, "defaults embedded", tmp_path / "models")
    finally:
        processes.stop()


def test_redis_with_readme_settings(label_studio, tmp_path):
    with redis_deployment(
        label_studio, tmp_path, REDIS_URL, README_ENV, ["interactive,batch"]
    ) as running:
        run_scenario(
            label_studio, running["url"], "defaults redis", tmp_path / "models", running["redis"]
        )

"""End to end against a real Label Studio 1.23.2 with the Redis deployment: ``python -m backend``
with REDIS_URL (no torch in it) and one ``python -m worker --queues interactive,batch`` process,
the commands of docker-compose.yml. Clicks go through the queue; "Retrieve predictions" is
answered at once and the worker writes the predictions through the LS API with the /setup
version, so a second retrieve adds nothing; the operator CLI sees it all."""

from __future__ import annotations

import time

import pytest

from tests.e2e.conftest import (
    annotate_box,
    ask,
    keypoint,
    make_project,
    redis_deployment,
    retrieve_predictions,
    stored_predictions,
    wait_for,
)
from tests.http_fixtures import decode_brush

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REDIS_URL = "redis://127.0.0.1:6379/11"  # own db index, flushed before and after


@pytest.fixture(scope="module")
def deployment(label_studio, tmp_path_factory):
    env = {"AUTOLABEL_POINTS_PER_SIDE": "4", "TORCH_THREADS": "2"}
    log_dir = tmp_path_factory.mktemp("redis-deployment")
    with redis_deployment(label_studio, log_dir, REDIS_URL, env, ["interactive,batch"]) as running:
        yield running


@pytest.fixture(scope="module")
def project(label_studio, deployment):
    return make_project(label_studio, deployment["url"], "redis")


def test_clicks_go_through_the_worker(label_studio, project, deployment):
    health = wait_for(f"{deployment['url']}/health", 5).json()
    assert health["transport"] == "redis" and health["model_version"] == project["version"]
    task_id = project["tasks"][0]
    first = ask(label_studio, project, task_id, [keypoint(32.8, 37.5)])
    mask = decode_brush(first["result"][0])
    assert mask.shape == (480, 640) and 0 < mask.mean() < 1
    negative = ask(label_studio, project, task_id, [keypoint(32.8, 37.5), keypoint(73, 65, False)])
    assert (decode_brush(negative["result"][0]) != mask).mean() > 0.01


def test_batch_is_answered_at_once_and_written_back_once(label_studio, project, deployment):
    scene, small = project["tasks"]
    annotate_box(label_studio, small)
    started = time.monotonic()
    assert retrieve_predictions(label_studio, project) == []  # nothing inline: all queued
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 120
    while len(predictions := stored_predictions(label_studio, project)) < 2:
        assert time.monotonic() < deadline, "the worker did not write both predictions"
        time.sleep(0.5)
    predictions.sort(key=lambda p: p["task"])
    assert [p["task"] for p in predictions] == [scene, small]
    assert {p["model_version"] for p in predictions} == {project["version"]}
    (item,) = predictions[1]["result"]
    assert item["value"]["brushlabels"] == ["Car"] and decode_brush(item).shape == (240, 320)
    assert all(decode_brush(r).shape == (480, 640) for r in predictions[0]["result"])

    ids = sorted(p["id"] for p in predictions)
    retrieve_predictions(label_studio, project)  # same version: LS asks for nothing
    time.sleep(3)  # anything queued by mistake would have been written by now
    assert sorted(p["id"] for p in stored_predictions(label_studio, project)) == ids

    processes = deployment["processes"]
    again = processes.run("worker", "autolabel", "--project", str(project["id"]))
    assert again.returncode == 0, again.stderr
    assert "0 autolabel job(s) queued" in again.stdout  # every task has this version already
    status = processes.run("worker", "status")
    assert status.returncode == 0, status.stderr
    assert project["version"] in status.stdout and "queue batch" in status.stdout
    assert "failed    0" in status.stdout.split("queue batch")[1].splitlines()[0]

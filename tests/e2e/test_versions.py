"""End to end: Label Studio 1.23.2's own version control picks the model version that is served.

A project of the embedded backend gets a promoted fine-tuned version (a version file written
with the registry, no training). With the ML backend's auto update switched off and a version
set on its record (``PATCH /api/ml/<id>``, what LS's API and SDK offer; the 1.23.2 web UI has
no control for it), ``/setup``, clicks and "Retrieve predictions" are served and stamped with
the picked version: the base (a roll-back from LS), then the fine-tune again."""

from __future__ import annotations

import time

import httpx
import pytest

from efficientsam.checkpoint import load_state_dict_file
from serving.registry import ModelRegistry
from tests.conftest import TI_CHECKPOINT
from tests.e2e.conftest import (
    Processes,
    ask,
    keypoint,
    make_project,
    retrieve_predictions,
    stored_predictions,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CACHE_SECONDS = 1.0


@pytest.fixture(scope="module")
def backend(label_studio, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("versions")
    env = {"AUTOLABEL_POINTS_PER_SIDE": "4", "VERSION_PICK_CACHE_SECONDS": str(CACHE_SECONDS)}
    processes = Processes(label_studio, log_dir, env)
    url = processes.backend()
    try:
        wait_for(f"{url}/health", 60, lambda r: r.status_code == 200 and r.json()["model_ready"])
        yield {"url": url, "model_dir": log_dir / "models"}
    finally:
        processes.stop()


def promote_a_fine_tune(model_dir, project: int, base: str) -> str:
    """A decoder-only version of the project, as a fine-tune would store and promote it."""
    weight = load_state_dict_file(TI_CHECKPOINT)["mask_decoder.iou_token.weight"]
    registry = ModelRegistry(model_dir)
    tensors = {"mask_decoder.iou_token.weight": weight * 0.5}
    version = registry.store_version(str(project), base, tensors, {"trigger": "e2e"})
    registry.promote(str(project), version)
    return version


def pick(label_studio: httpx.Client, backend: dict, project: dict, version: str | None) -> dict:
    """Auto update off with ``version`` on the ML backend record (None: auto update on)."""
    body = {"url": backend["url"], "project": project["id"]}
    body.update({"auto_update": True} if version is None else {"auto_update": False})
    if version is not None:
        body["model_version"] = version
    response = label_studio.patch(f"/api/ml/{project['ml']}", json=body)  # LS calls /setup
    assert response.status_code == 200, response.text
    time.sleep(CACHE_SECONDS + 0.2)  # the backend's cached look-up of the record expires
    return response.json()


def served(backend: dict, label_studio: httpx.Client, project: dict) -> tuple[str, str]:
    """(/setup's answer, a click's model_version) for the project."""
    setup = httpx.post(f"{backend['url']}/setup", json={"project": f"{project['id']}.0"})
    assert setup.status_code == 200, setup.text
    click = ask(label_studio, project, project["tasks"][0], [keypoint(32.8, 37.5)])
    assert click["result"], click
    return setup.json()["model_version"], click["model_version"]


def test_the_version_picked_in_label_studio_is_served_and_stamped(label_studio, backend):
    project = make_project(label_studio, backend["url"], "versions")
    base = project["version"]
    tuned = promote_a_fine_tune(backend["model_dir"], project["id"], base)
    record = label_studio.get(f"/api/ml/{project['ml']}").json()  # LS calls /setup
    assert record["model_version"] == tuned and record["auto_update"] is True
    assert served(backend, label_studio, project) == (tuned, tuned)
    listed = label_studio.get(f"/api/ml/{project['ml']}/versions").json()["versions"]
    assert listed == [base, tuned]  # LS's proxy of GET /versions (no project id sent)

    # roll back to the base from LS
    record = pick(label_studio, backend, project, base)
    assert record["model_version"] == base and record["auto_update"] is False
    assert served(backend, label_studio, project) == (base, base)
    predictions = retrieve_predictions(label_studio, project)
    assert len(predictions) == 2 and {p["model_version"] for p in predictions} == {base}
    assert label_studio.get(f"/api/ml/{project['ml']}").json()["model_version"] == base

    # and forward to the fine-tune again: new predictions of that version, nothing twice
    pick(label_studio, backend, project, tuned)
    assert served(backend, label_studio, project) == (tuned, tuned)
    retrieve_predictions(label_studio, project)
    predictions = retrieve_predictions(label_studio, project)
    versions = sorted(p["model_version"] for p in predictions)
    assert versions == [base, base, tuned, tuned]

    # auto update on again: LS follows the backend's current version
    assert pick(label_studio, backend, project, None)["model_version"] == tuned
    assert len(stored_predictions(label_studio, project)) == 4

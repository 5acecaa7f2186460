"""Model versions as Label Studio sees them: ``/versions``, the version picked in LS (its ML
backend record with auto update off, read from a stand-in for LS's API), versions that fail to
load. Redis mode through the registry's Redis copy (no worker needed), embedded mode with the
model."""

from __future__ import annotations

import pytest
from rq.job import Job
from starlette.testclient import TestClient

from backend.app import create_app
from serving.registry import ModelRegistry
from serving.serialization import JobSerializer
from serving.settings import Settings
from tests.conftest import TI_CHECKPOINT
from tests.http_fixtures import LEGACY_TOKEN, FileServer, keypoint, predict_request, rectangle
from tests.redis_fixtures import IMAGE
from tests.serving.test_registry import BASE, store_version


@pytest.fixture
def ls():
    """Stands in for LS's API: ``/api/projects/<id>/model-versions`` (auth checked)."""
    server = FileServer()
    yield server
    server.close()


def pick(ls: FileServer, project: int, version: str, auto_update: bool = False) -> None:
    """The project's ML backend record as ``GET /api/projects/<id>/model-versions?extended=true
    &include_live_models=true`` returns it (LS 1.23.2, trimmed)."""
    record = {"id": 1, "project": project, "title": "efficientsam", "state": "CO", "url": "x"}
    record.update(model_version=version, auto_update=auto_update)
    ls.api[f"/api/projects/{project}/model-versions"] = {"static": [], "live": [record]}


def redis_backend(redis_url: str, ls: FileServer | None, **overrides) -> TestClient:
    settings = Settings.from_env(
        {},
        redis_url=redis_url,
        label_studio_url=ls.url if ls else None,
        label_studio_api_key=LEGACY_TOKEN if ls else None,
        **{"version_pick_cache_seconds": 0, **overrides},
    )
    return TestClient(create_app(settings))


@pytest.fixture
def registry(redis_connection, tmp_path) -> ModelRegistry:
    """Project 3 promoted ft1 then ft2 (serving ft2), project 4 promoted ft1."""
    registry = ModelRegistry(tmp_path, redis_connection)
    registry.publish_base({"version": BASE})
    for project, count in (("3", 2), ("4", 1)):
        for number in range(1, count + 1):
            registry.promote(project, store_version(registry, project, number))
    return registry


def setup(client: TestClient, project: int = 3, **payload) -> str:
    response = client.post("/setup", json={"project": f"{project}.1795532368", **payload})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def test_versions_lists_the_base_and_every_promoted_version_in_redis_mode(registry, redis_url, ls):
    ft = {(p, n): f"{BASE}+p{p}-ft{n}" for p, n in ((3, 1), (3, 2), (4, 1))}
    registry.rollback("3", "base")  # a roll-back keeps the history listed
    with redis_backend(redis_url, ls) as client:
        assert client.get("/versions?project=3").json() == {"versions": [BASE, ft[3, 1], ft[3, 2]]}
        # LS 1.23.2 sends GET /versions without a project: every project's versions
        assert client.get("/versions").json()["versions"] == [BASE, ft[3, 1], ft[3, 2], ft[4, 1]]
        bad = client.get("/versions?project=abc")
        assert bad.status_code == 400 and "numeric" in bad.json()["error"]


def test_setup_and_batch_serve_the_version_picked_in_label_studio(registry, redis_url, ls):
    first, second, other = f"{BASE}+p3-ft1", f"{BASE}+p3-ft2", f"{BASE}+p4-ft1"
    with redis_backend(redis_url, ls) as client:
        assert setup(client) == second  # no record in LS: the current version
        pick(ls, 3, first, auto_update=True)
        assert setup(client) == second  # auto update on: LS takes what /setup says
        pick(ls, 3, first)
        assert setup(client) == first
        boxes = [{"id": 1, "result": [rectangle(10, 10, 30, 30)]}]
        tasks = [{"id": 7, "data": {"image": IMAGE}, "project": 3, "annotations": boxes}]
        request = {**predict_request(tasks, None), "project": "3.1795532368"}
        (entry,) = client.post("/predict", json=request).json()["results"]
        assert entry["model_version"] == first and "queued as job" in entry["skipped"]
        job_id = entry["skipped"].split("queued as job ")[1].split(":")[0]
        job = Job.fetch(job_id, connection=registry.redis, serializer=JobSerializer)
        assert job.args[0]["model_version"] == first  # the worker serves exactly this one
        pick(ls, 3, BASE)
        assert setup(client) == BASE  # a roll-back to the base from LS
        for foreign in (other, "efficientsam-ti-00000000", ""):
            pick(ls, 3, foreign)
            assert setup(client) == second  # not a version of project 3: the current one
    ls.api.clear()
    pick(ls, 3, first)
    asked = len(ls.requests)
    with redis_backend(redis_url, None) as client:  # /setup's host is not trusted by default
        assert setup(client, hostname=ls.url, access_token=LEGACY_TOKEN) == second
    assert len(ls.requests) == asked  # LS was not asked
    # LS's URL and token from /setup, when trusted (LABEL_STUDIO_TRUST_SETUP_HOST=1)
    with redis_backend(redis_url, None, label_studio_trust_setup_host=True) as client:
        assert setup(client, hostname=ls.url, access_token=LEGACY_TOKEN) == first


def test_the_picked_version_is_cached(registry, redis_url, ls):
    pick(ls, 3, f"{BASE}+p3-ft1")
    with redis_backend(redis_url, ls, version_pick_cache_seconds=60) as client:
        assert setup(client) == f"{BASE}+p3-ft1"
        pick(ls, 3, BASE)
        assert setup(client) == f"{BASE}+p3-ft1"
        asked = [path for path, _ in ls.requests if path.startswith("/api/projects/3/")]
        assert len(asked) == 1 and "include_live_models=true" in asked[0]
    ls.close()  # LS away: the current version, without waiting for it every time
    with redis_backend(redis_url, ls) as client:
        assert setup(client) == f"{BASE}+p3-ft2"


def test_a_version_that_failed_to_load_shows_in_health_and_metrics(registry, redis_url):
    broken = f"{BASE}+p3-ft2"
    registry.report_version_error(broken, "SafetensorError: header too large")
    with redis_backend(redis_url, None) as client:
        health = client.get("/health").json()
        assert health["version_errors"] == {broken: "SafetensorError: header too large"}
        metrics = client.get("/metrics").text
        assert f'backend_model_version_error{{version="{broken}"}} 1.0' in metrics
        registry.report_version_error(broken, None)  # it loaded after all
        assert "version_errors" not in client.get("/health").json()


@pytest.mark.slow
def test_embedded_setup_clicks_and_batches_serve_the_picked_version(server, tmp_path):
    from efficientsam.checkpoint import load_state_dict_file
    from serving.runtime import checkpoint_version

    base = checkpoint_version(load_state_dict_file(TI_CHECKPOINT))
    weight = load_state_dict_file(TI_CHECKPOINT)["mask_decoder.iou_token.weight"]
    registry = ModelRegistry(tmp_path)
    tuned = registry.store_version("1", base, {"mask_decoder.iou_token.weight": weight * 0.5}, {})
    registry.promote("1", tuned)
    settings = Settings.from_env(
        {},
        checkpoint=TI_CHECKPOINT,
        model_dir=tmp_path,
        label_studio_url=server.url,
        label_studio_api_key=LEGACY_TOKEN,
        device="cpu",
        version_pick_cache_seconds=0,
        autolabel_mode="boxes",
    )
    boxes = [{"id": 1, "result": [rectangle(10, 10, 30, 30)]}]
    task = {"id": 1, "data": {"image": IMAGE}, "project": 1, "annotations": boxes}
    with TestClient(create_app(settings)) as client:
        assert setup(client, 1) == tuned
        assert client.get("/versions").json()["versions"] == [base, tuned]
        for picked in (base, tuned):
            pick(server, 1, picked)
            assert setup(client, 1) == picked
            click = client.post(
                "/predict", json=predict_request([task], {"result": [keypoint(50, 50)]})
            )
            assert click.json()["results"][0]["model_version"] == picked
            (entry,) = client.post("/predict", json=predict_request([task], None)).json()["results"]
            assert entry["model_version"] == picked and entry["result"]

"""Control actions (START_TRAINING, annotation events, /setup extra_params) need a credential:
basic auth, or a project that the configured Label Studio has (backend/control.py).

The backend runs in Redis mode on the real Redis (own db index, no model needed); a 127.0.0.1
HTTP server stands in for LS's API (``GET /api/projects/<id>``, ``GET /api/webhooks``,
``PATCH /api/webhooks/<id>``, ``GET /api/projects/<id>/model-versions``)."""

from __future__ import annotations

import base64
import logging
import os
import socket
import time

import pytest
import redis
from rq import Queue
from starlette.testclient import TestClient

from backend.app import create_app
from backend.control import WebhookAuth
from serving.registry import ModelRegistry
from serving.settings import Settings
from tests.http_fixtures import LEGACY_TOKEN

REDIS_URL = os.environ.get("EFFICIENTSAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
CALLER = ("203.0.113.9", 40000)  # the address the test client's requests come from
AUTH = {"Authorization": "Basic " + base64.b64encode(b"ml:s3cret").decode()}
START = {"action": "START_TRAINING", "project": {"id": 7}}


def annotation(project: int, annotation_id: int = 1) -> dict:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": project},
        "annotation": {"id": annotation_id, "task": 1, "was_cancelled": False},
        "task": {"id": 1},
    }


@pytest.fixture
def connection(tmp_path):
    connection = redis.Redis.from_url(REDIS_URL)
    connection.flushdb()
    ModelRegistry(tmp_path, connection).publish_base({"version": "efficientsam-ti-test"})
    yield connection
    connection.flushdb()
    connection.close()


@pytest.fixture
def label_studio(file_server):
    """LS with project 7 (not 8)."""
    file_server.api["/api/projects/7"] = {"id": 7, "title": "seven"}
    return file_server


def backend(ls_url: str | None, **overrides) -> TestClient:
    settings = Settings.from_env(
        {},
        redis_url=REDIS_URL,
        label_studio_url=ls_url,
        label_studio_api_key=LEGACY_TOKEN if ls_url else None,
        **overrides,
    )
    return TestClient(create_app(settings), client=CALLER)


def queued_finetunes(connection) -> list[str]:
    return Queue("train", connection=connection).job_ids


def test_start_training_only_for_a_project_label_studio_has(connection, label_studio, caplog):
    with backend(label_studio.url) as client, caplog.at_level(logging.WARNING):
        refused = client.post("/webhook", json={**START, "project": {"id": 8}})
        assert refused.status_code == 403, refused.text
        assert "project 8 does not exist" in refused.json()["error"]
        assert queued_finetunes(connection) == []
        assert "refused START_TRAINING for project 8 from 203.0.113.9" in caplog.text

        for _ in range(2):
            accepted = client.post("/webhook", json=START)
            assert accepted.status_code == 201, accepted.text
    assert queued_finetunes(connection) == ["finetune-p7"]
    asked = [path for path, _ in label_studio.requests if path.startswith("/api/projects/")]
    assert asked == ["/api/projects/8", "/api/projects/7"]  # once per project: cached


def test_annotation_events_only_for_a_project_label_studio_has(connection, label_studio, caplog):
    with backend(label_studio.url) as client, caplog.at_level(logging.WARNING):
        refused = client.post("/webhook", json=annotation(8))
        assert refused.status_code == 403, refused.text
        recorded = client.post("/webhook", json=annotation(7))
        assert recorded.status_code == 200 and recorded.json()["new_annotations"] == 1
        state = client.app.state.service.transport.project_state
        assert state.new_annotations("8") == 0 and state.new_annotations("7") == 1
    assert "refused ANNOTATION_CREATED for project 8 from 203.0.113.9" in caplog.text


def test_extra_params_only_for_a_project_label_studio_has(connection, label_studio, caplog):
    params = {"autolabel_mode": "off", "points_per_side": 8}
    with backend(label_studio.url) as client, caplog.at_level(logging.WARNING):
        for project in ("8.1795532368", "7.1795532368"):
            response = client.post("/setup", json={"project": project, "extra_params": params})
            assert response.status_code == 200, response.text  # /setup itself still answers
        transport = client.app.state.service.transport
        assert transport.project_params("8") == {}  # ignored
        assert transport.project_params("7") == params
    assert "refused extra_params for project 8 from 203.0.113.9" in caplog.text


def test_without_label_studio_or_basic_auth_control_actions_are_refused(connection, caplog):
    with backend(None) as client, caplog.at_level(logging.WARNING):
        for payload in (START, annotation(7)):
            refused = client.post("/webhook", json=payload)
            assert refused.status_code == 403, refused.text
            error = refused.json()["error"]
            assert "LABEL_STUDIO_URL" in error and "BASIC_AUTH_USER" in error
        setup = client.post("/setup", json={"project": "7.1", "extra_params": {"x": 1}})
        assert setup.status_code == 200
        assert client.app.state.service.transport.project_params("7") == {}
        ignored = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 7}})
        assert ignored.status_code == 200  # not a control action: nothing changes
    assert queued_finetunes(connection) == []
    assert caplog.text.count("from 203.0.113.9") == 3


def test_label_studio_not_answering_is_503_and_asked_again(connection):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    with backend(closed) as client:
        for _ in range(2):
            response = client.post("/webhook", json=START)
            assert response.status_code == 503, response.text
            assert "cannot check project 7 with Label Studio" in response.json()["error"]
    assert queued_finetunes(connection) == []


def webhook_record(hook_id: int, url: str, headers: dict | None = None) -> dict:
    return {"id": hook_id, "project": 7, "url": url, "headers": headers or {}, "is_active": True}


def ml_record(url: str, user: str | None) -> dict:
    method = "BASIC_AUTH" if user else "NONE"
    return {"id": 1, "url": url, "auth_method": method, "basic_auth_user": user, "project": 7}


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_basic_auth_sets_the_header_on_label_studio_s_webhook(connection, label_studio, caplog):
    label_studio.api["/api/projects/7/model-versions"] = {
        "static": [],
        "live": [ml_record("http://backend:9090/", "ml"), ml_record("http://other:9090", None)],
    }
    label_studio.api["/api/webhooks"] = [
        webhook_record(3, "http://backend:9090/webhook", {"X-Trace": "1"}),
        webhook_record(4, "http://other:9090/webhook"),  # another backend: never our password
        webhook_record(5, "https://example.org/hook"),  # a user's webhook
    ]
    overrides = {"basic_auth_user": "ml", "basic_auth_pass": "s3cret"}
    with backend(label_studio.url, **overrides) as client, caplog.at_level(logging.INFO):
        anonymous = client.post("/webhook", json=START)
        assert anonymous.status_code == 401
        assert "refused /webhook from 203.0.113.9: no valid basic auth" in caplog.text
        for _ in range(3):  # LS calls /setup often: the webhook is set once
            setup = client.post("/setup", json={"project": "7.1795532368"}, headers=AUTH)
            assert setup.status_code == 200, setup.text
        wait_for(lambda: label_studio.patches)
        time.sleep(0.2)
        # with basic auth, any project: the caller holds the credential
        assert (
            client.post("/webhook", json={**START, "project": {"id": 8}}, headers=AUTH).status_code
            == 201
        )
    expected = {"X-Trace": "1", **AUTH}
    assert label_studio.patches == [("/api/webhooks/3", {"headers": expected})]
    assert label_studio.api["/api/webhooks"][0]["headers"] == expected
    assert "webhook(s) http://backend:9090/webhook now carry" in caplog.text


def test_the_webhook_label_studio_creates_after_setup_is_found(connection, label_studio):
    """LS calls /setup before it creates the backend's webhook: the backend keeps looking."""
    label_studio.api["/api/projects/7/model-versions"] = {"live": [ml_record("http://b:1", "ml")]}
    label_studio.api["/api/webhooks"] = []
    overrides = {"basic_auth_user": "ml", "basic_auth_pass": "s3cret"}
    with backend(label_studio.url, **overrides) as client:
        started = time.monotonic()
        setup = client.post("/setup", json={"project": "7.1795532368"}, headers=AUTH)
        assert setup.status_code == 200 and time.monotonic() - started < 1.0
        time.sleep(0.3)
        label_studio.api["/api/webhooks"].append(webhook_record(1, "http://b:1/webhook"))
        wait_for(lambda: label_studio.patches)
    assert label_studio.patches == [("/api/webhooks/1", {"headers": AUTH})]


def test_a_webhook_that_never_appears_is_logged_and_tried_again_later(label_studio, caplog):
    label_studio.api["/api/projects/7/model-versions"] = {"live": [ml_record("http://b:1", "ml")]}
    label_studio.api["/api/webhooks"] = []
    auth = WebhookAuth("ml", "s3cret", label_studio.url, LEGACY_TOKEN, tries=2, retry_seconds=0.05)
    auth.again_seconds = 0.5
    try:
        with caplog.at_level(logging.WARNING):
            auth.ensure("7")
            wait_for(lambda: "could not add the basic auth header" in caplog.text)
        asked = len(label_studio.requests)
        assert asked == 4  # two tries: the records and the webhooks each
        auth.ensure("7")  # a /setup right after: not yet
        time.sleep(0.3)
        assert len(label_studio.requests) == asked
        time.sleep(0.3)
        label_studio.api["/api/webhooks"].append(webhook_record(1, "http://b:1/webhook"))
        auth.ensure("7")  # a /setup after again_seconds: done now
        wait_for(lambda: label_studio.patches)
    finally:
        auth.close()
    assert label_studio.patches == [("/api/webhooks/1", {"headers": AUTH})]


@pytest.mark.parametrize("trusted", [False, True])
def test_without_label_studio_url_the_setup_host_is_used_only_when_trusted(label_studio, trusted):
    """No LABEL_STUDIO_URL: the webhook header goes through /setup's hostname and token only
    with LABEL_STUDIO_TRUST_SETUP_HOST (the first /setup caller must not pick the host)."""
    label_studio.api["/api/projects/7/model-versions"] = {"live": [ml_record("http://b:1", "ml")]}
    label_studio.api["/api/webhooks"] = [webhook_record(1, "http://b:1/webhook")]
    auth = WebhookAuth("ml", "s3cret", "", "", retry_seconds=0.05, trust_setup_host=trusted)
    try:
        auth.use_setup_credentials(label_studio.url, LEGACY_TOKEN)
        auth.ensure("7")
        if trusted:
            wait_for(lambda: label_studio.patches)
        else:
            time.sleep(0.3)
    finally:
        auth.close()
    expected = [("/api/webhooks/1", {"headers": AUTH})] if trusted else []
    assert label_studio.patches == expected

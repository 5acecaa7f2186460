"""Resources come from the app's lifespan: ``create_app`` builds nothing heavy, the embedded
start-up reads the checkpoint once, and a missing checkpoint stops ``python -m backend`` before
it listens."""

from __future__ import annotations

import subprocess
import sys

from starlette.testclient import TestClient

import efficientsam.build
import efficientsam.checkpoint
from backend.app import create_app
from serving.settings import Settings
from tests.conftest import REPO_ROOT, TI_CHECKPOINT
from tests.http_fixtures import wait_until_ready


def test_create_app_builds_nothing_and_the_lifespan_reads_the_checkpoint_once(monkeypatch):
    reads = []
    real = efficientsam.checkpoint.load_state_dict_file

    def counting(path):
        reads.append(path)
        return real(path)

    for module in (efficientsam.checkpoint, efficientsam.build):  # every way to read one
        monkeypatch.setattr(module, "load_state_dict_file", counting)
    settings = Settings.from_env({}, checkpoint=TI_CHECKPOINT, device="cpu")
    app = create_app(settings)
    assert app.state.service is None and reads == []  # nothing built before start-up
    with TestClient(app) as client:
        assert wait_until_ready(client).status_code == 200
        version = client.post("/setup", json={"project": "1"}).json()["model_version"]
        assert app.state.service.transport.name == "embedded"
    assert reads == [TI_CHECKPOINT]  # version and model from one read
    assert version.startswith("efficientsam-ti-")


def test_a_missing_checkpoint_stops_the_backend_before_it_listens(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "MODEL_DIR": str(tmp_path), "PORT": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "backend"],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "no checkpoint" in result.stderr and "MODEL_DIR" in result.stderr

"""Worker test fixtures: the real Redis (own db index, flushed around each test) and real
``python -m worker`` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.backend.conftest import FileServer
from tests.conftest import REFERENCE_DIR, REPO_ROOT, TI_CHECKPOINT

# Our own db index on the machine's Redis; RQ's own test suite does the same.
REDIS_URL = os.environ.get("EFFICIENTSAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
IMAGE = "/data/upload/1/image.png"


@pytest.fixture(scope="module")
def server():
    """Stands in for LS's file endpoint (auth checked) with the reference image at IMAGE."""
    files = FileServer()
    files.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    yield files
    files.close()


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
def redis_connection():
    connection = redis.Redis.from_url(REDIS_URL)
    try:
        connection.ping()
    except redis.ConnectionError as error:
        pytest.fail(f"the tests need Redis at {REDIS_URL}: {error}")
    connection.flushdb()
    yield connection
    connection.flushdb()
    connection.close()


class WorkerProcesses:
    """Starts ``python -m worker`` processes (the exact command of the README) and stops them."""

    def __init__(self, redis_url: str, model_dir: Path, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def start(
        self, *args: str, env: dict | None = None, name: str | None = None
    ) -> subprocess.Popen:
        name = name or f"worker-{len(self.processes)}"
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", *args, "--name", name],
            cwd=REPO_ROOT,
            env={
                **os.environ,
                "REDIS_URL": self.redis_url,
                "CHECKPOINT": str(TI_CHECKPOINT),
                "MODEL_DIR": str(self.model_dir),
                "DEVICE": "cpu",
                "TORCH_THREADS": "1",
                "WORKER_HEARTBEAT_SECONDS": "1",
                **(env or {}),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: RQ's forked scheduler goes with it
        )
        process.log_path = self.log_dir / f"{name}.log"
        self.processes.append(process)
        return process

    def log(self, process: subprocess.Popen) -> str:
        return process.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            with contextlib.suppress(ProcessLookupError):  # a killed worker's orphaned helpers
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def workers(redis_connection, redis_url, tmp_path):
    processes = WorkerProcesses(redis_url, tmp_path / "models", tmp_path)
    yield processes
    processes.stop()


def wait_until(condition, seconds: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {seconds} s")

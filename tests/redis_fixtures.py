"""Worker test fixtures: the real Redis (own db index, flushed around each test) and real
``python -m worker`` processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis

from tests.conftest import REFERENCE_DIR, REPO_ROOT, TI_CHECKPOINT
from tests.http_fixtures import LEGACY_TOKEN, FileServer

# Our own db index on the machine's Redis; RQ's own test suite does the same.
REDIS_URL = os.environ.get("EFFICIENTSAM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
IMAGE = "/data/upload/1/image.png"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server():
    """Stands in for LS's file endpoint (auth checked) with the reference image at IMAGE."""
    files = FileServer()
    files.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    yield files
    files.close()


class LabelStudioStub(FileServer):
    """FileServer + LS's predictions API as ``label-studio-sdk`` calls it (``GET
    /api/predictions/?task=N``, ``POST /api/predictions/``, legacy token): every prediction
    written is kept in ``predictions``. A write is recorded when it arrives and answered
    ``write_seconds`` later, so a job stays in flight in it; ``writing`` is set on each one."""

    def __init__(self, write_seconds: float = 0.0) -> None:
        super().__init__()
        self.predictions: list[dict] = []
        self.write_seconds = write_seconds
        self.writing = threading.Event()
        stub, lock = self, threading.Lock()

        class Handler(self.httpd.RequestHandlerClass):
            def _api(self) -> bool:
                """True for the predictions API, answered here (401 without the token)."""
                if urlsplit(self.path).path != "/api/predictions/":
                    return False
                if self.headers.get("Authorization") != f"Token {LEGACY_TOKEN}":
                    self._send(401, b'{"detail": "auth"}')
                    self.path = ""  # answered
                return True

            def do_GET(self):
                if not self._api():
                    return super().do_GET()
                if self.path:
                    task = int(parse_qs(urlsplit(self.path).query)["task"][0])
                    with lock:
                        found = [p for p in stub.predictions if p["task"] == task]
                    self._send(200, json.dumps(found).encode(), JSON)

            def do_POST(self):
                if not self._api():
                    return super().do_POST()
                if self.path:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    with lock:
                        prediction = {**body, "id": len(stub.predictions) + 1}
                        stub.predictions.append(prediction)
                    stub.writing.set()
                    time.sleep(stub.write_seconds)
                    self._send(201, json.dumps(prediction).encode(), JSON)

        self.httpd.RequestHandlerClass = Handler

    def counts(self) -> dict[int, int]:
        """Task id -> how many predictions were written for it."""
        counted: dict[int, int] = {}
        for prediction in list(self.predictions):
            counted[prediction["task"]] = counted.get(prediction["task"], 0) + 1
        return counted


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(port: int, directory, appendonly: bool = False) -> subprocess.Popen:
    """A private redis-server on 127.0.0.1:``port`` with its files in ``directory``; with
    ``appendonly`` every write is fsynced to the AOF, so a restart on the same directory keeps
    all data (queues, jobs, registries)."""
    process = subprocess.Popen(
        [
            shutil.which("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if appendonly else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_until(lambda: _pings(port), 10, "redis-server up")
    return process


def _pings(port: int) -> bool:
    try:
        return redis.Redis(port=port, socket_connect_timeout=0.2).ping()
    except redis.RedisError:
        return False


def wait_until(condition, seconds: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {seconds} s")

"""The Redis deployment over TLS with a password (``REDIS_URL=rediss://:password@host``), as
README's multi-machine instructions say: a private redis-server that accepts only TLS
connections with the password, a real ``python -m worker`` (and its forked RQ scheduler), and
the backend's transport."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import redis

from serving.requests import HousekeepingRequest
from serving.settings import Settings
from serving.transports import QueueTransport
from tests.conftest import self_signed_certificate
from tests.redis_fixtures import WorkerProcesses, free_port, wait_until

PASSWORD = "tls0password"


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server on 127.0.0.1 with TLS only (a self-signed certificate for 127.0.0.1) and a
    password; yields its ``rediss://`` URL."""
    cert, key = self_signed_certificate(tmp_path, "127.0.0.1", "IP:127.0.0.1")
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--tls-port", str(port)]
        + ["--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
        + ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        + ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
        + ["--requirepass", PASSWORD],
        stdout=subprocess.DEVNULL,
    )
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        wait_until(lambda: _pings(url), 10, "redis-server with TLS up")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def _pings(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        return False


@pytest.mark.slow
def test_workers_and_backend_over_tls_with_a_password(tls_redis, tmp_path):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(tls_redis.replace(PASSWORD, "wrong")).ping()
    with pytest.raises(redis.ConnectionError):  # plain text is not accepted
        redis.Redis.from_url(tls_redis.replace("rediss://", "redis://").split("?")[0]).ping()
    processes = WorkerProcesses(tls_redis, tmp_path / "models", tmp_path)
    try:
        worker = processes.start("--queues", "batch")
        transport = QueueTransport(Settings.from_env({}, redis_url=tls_redis))
        result = transport.call("housekeeping", HousekeepingRequest(), 120)
        assert set(result) == {"pruned_cache_entries", "republished_registry"}

        def scheduler_pids() -> set[int]:  # RQ's scheduler, forked by the worker, registered
            keys = transport.connection.keys("rq:scheduler:*")
            return {int(transport.connection.hget(k, "pid") or 0) for k in keys} - {0}

        pids = wait_until(scheduler_pids, 30, "the worker's scheduler registered over TLS")
        assert worker.pid not in pids and worker.poll() is None, processes.log(worker)
        transport.close()
    finally:
        processes.stop()

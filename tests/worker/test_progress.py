"""A fine-tune's progress reports are best effort: Redis going away mid-run (a fine-tune is
never retried once training started) must not fail the run."""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace

import redis

from serving.projects import RedisProjectState
from serving.training_run import Progress


def test_progress_survives_redis_going_away(caplog):
    with socket.socket() as probe:  # nothing listens there: every command fails
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    connection = redis.Redis(port=port, socket_connect_timeout=0.2)
    runtime = SimpleNamespace(project_state=RedisProjectState(connection, "efficientsam"))
    progress = Progress(runtime, "3")
    with caplog.at_level(logging.WARNING):
        progress("train", step=10, loss=0.5)  # raised redis.ConnectionError before
        progress.finish(result="promoted")
    assert progress.status["stage"] == "done" and progress.status["result"] == "promoted"
    assert "progress not reported (Redis)" in caplog.text

"""Workers ride out a Redis outage: ``python -m worker`` processes on a private redis-server (AOF,
fsync always) that is stopped for 3 s while a job is in flight and started again on the same
data. No worker exits, and every task of a "Retrieve predictions" gets exactly one prediction
in the Label Studio stand-in, also when a worker was SIGKILLed before the outage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from rq.job import Job, JobStatus
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler

from serving.requests import AutolabelRequest, BoxSpec, OutputSpec, TaskSpec, autolabel_job_id
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport
from tests.conftest import REFERENCE_DIR
from tests.http_fixtures import LEGACY_TOKEN
from tests.redis_fixtures import (
    IMAGE,
    LabelStudioStub,
    WorkerProcesses,
    free_port,
    start_redis,
    wait_until,
)

pytestmark = pytest.mark.slow

TASKS = 8
OUTAGE_SECONDS = 3.0
OUTPUT = OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Object"])


def autolabel_request(task_id: int, version: str) -> AutolabelRequest:
    """What "Retrieve predictions" queues for a task with one rectangle (backend/service.py)."""
    box = BoxSpec(box=(40 + task_id, 40, 300, 260), size=(640, 480), label="Object")
    return AutolabelRequest(
        project="1",
        task=TaskSpec(id=task_id, image=IMAGE, boxes=[box]),
        mode="boxes",
        points_per_side=8,
        output=OUTPUT,
        model_version=version,
        write_back=True,
    )


class PrivateRedis:
    """A private redis-server with an AOF (fsync always) that can go away and come back on it."""

    def __init__(self, directory: Path) -> None:
        self.port, self.directory = free_port(), directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = start_redis(self.port, directory, appendonly=True)

    def outage(self, seconds: float) -> None:
        self.process.terminate()
        self.process.wait()
        time.sleep(seconds)
        self.process = start_redis(self.port, self.directory, appendonly=True)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def scheduler_worker(connection: redis.Redis, processes: list) -> subprocess.Popen:
    """The worker process whose forked RQ scheduler holds the batch queue's lock."""
    holder = wait_until(lambda: connection.get(RQScheduler.get_locking_key("batch")), 10, "lock")
    pid = int(connection.hget(SCHEDULER_KEY_TEMPLATE % holder.decode(), "pid"))
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return next(p for p in processes if p.pid == parent)


def test_workers_ride_out_a_redis_outage_mid_job(tmp_path):
    """Two workers with a job each in flight when Redis goes away for 3 s; then the worker that
    runs RQ's scheduler SIGKILLed mid-job and another outage under the survivor's job."""
    labelstudio = LabelStudioStub(write_seconds=1.0)  # every job spends 1 s in its write
    labelstudio.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    (tmp_path / "redis").mkdir()
    private = PrivateRedis(tmp_path / "redis")
    workers = WorkerProcesses(private.url, tmp_path / "models", tmp_path)
    env = {"LABEL_STUDIO_URL": labelstudio.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN}
    try:
        processes = [workers.start("--queues", "batch", env=env) for _ in range(2)]
        settings = Settings.from_env(
            {}, redis_url=private.url, batch_retries=2, batch_retry_delay_seconds=1
        )
        transport = QueueTransport(settings)
        base = wait_until(
            lambda: transport.status()["workers"]["batch"] == 2 and transport.directory.base(),
            90,
            "2 workers listening",
            0.2,
        )

        def retrieve_predictions(tasks: range) -> list[str]:
            return [
                transport.submit(
                    "autolabel",
                    autolabel_request(t, base["version"]),
                    autolabel_job_id("1", t, base["version"]),
                )
                for t in tasks
            ]

        def each_written_once(tasks: range, job_ids: list[str]) -> None:
            wait_until(
                lambda: set(labelstudio.counts()) >= set(tasks), 60, f"predictions {tasks}", 0.2
            )
            wait_until(
                lambda: all(
                    Job.fetch(j, transport.connection, JobSerializer).get_status()
                    == JobStatus.FINISHED
                    for j in job_ids
                ),
                30,
                "every job finished",
                0.2,
            )
            assert labelstudio.counts() == dict.fromkeys(range(1, tasks.stop), 1)
            for process in processes:  # alive, and never left its work loop
                assert process.poll() is None, workers.log(process)
                assert "quitting" not in workers.log(process), workers.log(process)

        # 1. Redis goes away while a worker is in a write (the other in its job or idle).
        started = time.monotonic()
        job_ids = retrieve_predictions(range(1, TASKS + 1))
        wait_until(lambda: len(labelstudio.predictions) >= 2, 60, "a second write")
        private.outage(OUTAGE_SECONDS)
        each_written_once(range(1, TASKS + 1), job_ids)
        first = time.monotonic() - started

        # 2. The worker running RQ's scheduler is killed mid-job (its forked scheduler lives
        # on); Redis goes away under the survivor's job. The killed job is retried after its
        # retry delay, which takes a scheduler: the survivor's, once the orphan has let go.
        started = time.monotonic()
        doomed = scheduler_worker(transport.connection, processes)
        job_ids = retrieve_predictions(range(TASKS + 1, 2 * TASKS + 1))
        wait_until(
            lambda: any(
                (job := Job.fetch(j, transport.connection, JobSerializer)).get_status()
                == JobStatus.STARTED
                and job.worker_name == doomed.log_path.stem
                for j in job_ids
            ),
            30,
            "a job on the doomed worker",
            0.05,
        )
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.wait()
        processes.remove(doomed)
        writes = len(labelstudio.predictions)
        wait_until(lambda: len(labelstudio.predictions) > writes, 30, "the survivor in a write")
        private.outage(OUTAGE_SECONDS)
        each_written_once(range(TASKS + 1, 2 * TASKS + 1), job_ids)
        second = time.monotonic() - started
        assert first < 60 and second < 60, f"{first:.1f} s, {second:.1f} s"
    finally:
        workers.stop()
        private.close()
        labelstudio.close()

"""The RQ worker class that holds the model: jobs run in this process, never in a fork.

``ModelWorker`` is RQ's ``SimpleWorker`` (the job runs in the worker's main thread, so the model
is loaded once per process and CUDA is never forked) with three additions:

* the process's :class:`~worker.runtime.ModelRuntime` is installed for every job
  (``worker.jobs.use_runtime``), so job functions stay plain importable functions;
* a heartbeat thread keeps the job's execution alive in RQ's started-job registry with a short
  TTL (3 heartbeats) while it runs. A worker killed mid-job (SIGKILL, OOM, lost machine) stops
  beating; within seconds the execution expires and the next registry clean-up of any worker
  hands the job to RQ's retry (or the failed registry when no retries are left). RQ's own
  SimpleWorker would only notice after the job's whole timeout;
* registry clean-up runs every ``maintenance_seconds`` and the idle blocking pop is short, so
  that clean-up and a re-publish of the model registry after a Redis restart happen promptly.
"""

from __future__ import annotations

import logging
import threading

import redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.worker.base import WorkerStatus

from .jobs import use_runtime
from .runtime import ModelRuntime

logger = logging.getLogger(__name__)


class ModelWorker(SimpleWorker):
    """SimpleWorker + model runtime + short job heartbeats (see module docstring)."""

    max_connection_wait_time = 5.0  # reconnect to a restarted Redis within seconds

    def __init__(
        self,
        queues,
        runtime: ModelRuntime,
        heartbeat_seconds: int = 5,
        maintenance_seconds: int | None = None,
        **kwargs,
    ) -> None:
        self.heartbeat_seconds = max(1, int(heartbeat_seconds))
        kwargs.setdefault("worker_ttl", max(30, 6 * self.heartbeat_seconds))
        kwargs.setdefault("maintenance_interval", maintenance_seconds or 3 * self.heartbeat_seconds)
        super().__init__(queues, **kwargs)
        self.runtime = runtime
        self.stopping = False  # a SIGTERM/SIGINT asked this worker to stop

    def request_stop(self, signum, frame) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up regularly when idle, for registry clean-up and the Redis-restart check.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * self.heartbeat_seconds

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            self.runtime.registry.ensure_published()
            if not self.connection.exists(self.key):  # Redis restarted: be listed again
                self.register_birth()
        except (redis.RedisError, ValueError) as error:
            logger.warning("maintenance: %s", error)

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(job, execution, stop), name="job-heartbeat", daemon=True
        )
        beat.start()
        try:
            with use_runtime(self.runtime):
                self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            try:
                self.maintain_heartbeats(job, execution)
            except redis.RedisError as error:  # the job goes on; RQ retries if it expires
                logger.warning("job %s: heartbeat failed: %s", job.id, error)

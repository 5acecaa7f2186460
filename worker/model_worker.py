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
from rq.utils import now
from rq.worker.base import WorkerStatus

from .jobs import use_runtime
from .runtime import ModelRuntime

logger = logging.getLogger(__name__)


class ModelWorker(SimpleWorker):
    """SimpleWorker + model runtime + short job heartbeats (see module docstring)."""

    max_connection_wait_time = 5.0  # reconnect to a restarted Redis within seconds
    log_result_lifespan = False  # one line per job is enough ("Job OK"); clicks are many
    log_job_description = False

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
        self._heartbeat = _JobHeartbeat(self)

    def request_stop(self, signum, frame) -> None:
        self.stopping = True
        super().request_stop(signum, frame)

    @property
    def dequeue_timeout(self) -> int:
        # Wake up regularly when idle, for registry clean-up and the Redis-restart check.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return 3 * self.heartbeat_seconds

    # Two round trips fewer on every job's way from the queue to its result (a click's latency):
    # the worker heartbeat's three commands go out as one pipeline, and the job's last heartbeat
    # at its end is left to the heartbeat thread, which kept it fresh while the job ran.
    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        with self.connection.pipeline(transaction=False) as batched:
            super().heartbeat(timeout, batched)
            batched.execute()

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        job.ended_at = now()

    def run_maintenance_tasks(self) -> None:
        super().run_maintenance_tasks()
        try:
            self.runtime.republish()
            if not self.connection.exists(self.key):  # Redis restarted: be listed again
                self.register_birth()
        except (redis.RedisError, ValueError) as error:
            logger.warning("maintenance: %s", error)

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        self._heartbeat.watch(job, execution)
        try:
            with use_runtime(self.runtime):
                self.perform_job(job, queue, execution)
        finally:
            self._heartbeat.watch(None, None)
        self.set_state(WorkerStatus.IDLE)


class _JobHeartbeat:
    """One long-lived thread that beats for the job being run, if any (a thread per job would
    cost its start and join on every click)."""

    def __init__(self, worker: ModelWorker) -> None:
        self.worker = worker
        self._current: tuple | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)
        self._thread.start()

    def watch(self, job: Job | None, execution) -> None:
        with self._changed:
            self._current = (job, execution) if job is not None else None
            self._changed.notify()

    def _run(self) -> None:
        interval = self.worker.heartbeat_seconds
        while True:
            with self._changed:
                while self._current is None:
                    self._changed.wait()
                job, execution = self._current
                self._changed.wait(interval)  # woken early when the job ends
                if self._current is None or self._current[0] is not job:
                    continue
            try:
                self.worker.maintain_heartbeats(job, execution)
            except redis.RedisError as error:  # the job goes on; RQ retries it if it expires
                logger.warning("job %s: heartbeat failed: %s", job.id, error)

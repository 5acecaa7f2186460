"""The RQ worker class that holds the model: jobs run in this process, never in a fork
(:class:`ModelWorker`), and only the jobs of ``serving.jobs.JOBS`` (:func:`refusal`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from rq import SimpleWorker
from rq.job import Job
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.utils import now
from rq.worker.base import WorkerStatus
from rq.worker_registration import REDIS_WORKER_KEYS

from serving.jobs import JOBS, import_path, use_runtime
from serving.runtime import ModelRuntime
from serving.serialization import JobSerializer

logger = logging.getLogger(__name__)
T = TypeVar("T")

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)  # Redis unreachable, not a bad command
JOB_FUNCTIONS = frozenset(import_path(spec.function) for spec in JOBS.values())
CALLBACKS = ("success", "failure", "stopped")


def refusal(job: Job) -> str | None:
    """Why ``job`` must not run here, or None. Nothing is imported: a job's function and
    callbacks are import paths that RQ would import and call."""
    callbacks = [getattr(job, f"_{kind}_callback_name", None) for kind in CALLBACKS]
    if any(callbacks):  # this service sets none; RQ would import them even on failure
        return f"job {job.id} names callbacks {[c for c in callbacks if c]}"
    try:
        name, instance, kwargs = job.func_name, job.instance, job.kwargs
    except Exception:  # data that is not JSON: RQ's own path fails the job, loading nothing
        return None
    if name not in JOB_FUNCTIONS:
        return f"{name!r} is not a job of this service (serving.jobs.JOBS)"
    if instance is not None or kwargs:
        return f"{name!r} on an instance or with keyword arguments"
    return None


class Backoff:
    """Waits between attempts to reach Redis: 0.5 s, doubling, at most ``most`` seconds."""

    def __init__(self, most: float = 5.0, first: float = 0.5) -> None:
        self.most, self.first = most, first
        self.failures = 0
        self.since = 0.0  # time.monotonic() of the first failure of this outage

    def failed(self) -> float:
        """Count a failure; the seconds to wait before the next attempt."""
        if not self.failures:
            self.since = time.monotonic()
        self.failures += 1
        return min(self.first * 2 ** (self.failures - 1), self.most)

    def succeeded(self) -> float | None:
        """Count a success; the outage's length in seconds if it ended one, else None."""
        if not self.failures:
            return None
        self.failures = 0
        return time.monotonic() - self.since


def until_redis_answers(
    call: Callable[[], T], what: str, stop: Callable[[], bool] = lambda: False
) -> T:
    """``call()``, tried again with :class:`Backoff` waits while Redis cannot be reached; the
    outage is logged once and its end once. Re-raises the Redis error when ``stop()`` says to
    give up (a stop was requested)."""
    backoff = Backoff()
    while True:
        try:
            result = call()
        except REDIS_DOWN as error:
            if stop():
                raise
            wait = backoff.failed()
            if backoff.failures == 1:
                logger.warning("%s: Redis unreachable (%s); trying again, backing off", what, error)
            time.sleep(wait)
            continue
        outage = backoff.succeeded()
        if outage is not None:
            logger.info("%s: Redis is back (after %.1f s)", what, outage)
        return result


class ModelWorker(SimpleWorker):
    """RQ's ``SimpleWorker`` (the job runs in the worker's main thread, so the model loads once
    per process and CUDA is never forked) with these additions:

    * jobs, their meta and results are JSON (:class:`~serving.serialization.JobSerializer`);
    * only the functions of ``serving.jobs.JOBS`` run: a job naming any other function, or
      callbacks, or keyword arguments, fails with the reason, nothing of it imported or run;
    * the process's ``ModelRuntime`` is installed for every job (``serving.jobs.use_runtime``);
    * a heartbeat thread keeps the running job's execution alive with a short TTL (3 beats): a
      worker killed mid-job stops beating, the execution expires within seconds and the next
      registry clean-up of any worker hands the job to RQ's retry (RQ's own SimpleWorker would
      notice only after the job's whole timeout);
    * registry clean-up every ``maintenance_seconds`` and a short idle pop, so that clean-up and
      a re-publish of the model registry after a Redis restart happen promptly;
    * a Redis outage is ridden out, not a reason to quit: every Redis step of the loop and of a
      job's bookkeeping waits for Redis (:func:`until_redis_answers`) and goes on; a job that
      finished meanwhile gets its result recorded once Redis is back (it is not run again).
      After a Redis restart, abandoned jobs are looked for only once Redis has been up for a
      heartbeat TTL, so live workers beat their executions again first."""

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
        kwargs["serializer"] = JobSerializer  # never RQ's default, pickle
        super().__init__(queues, **kwargs)
        self.runtime = runtime
        self.stopping = False  # a SIGTERM/SIGINT asked this worker to stop
        self._restart_seen = None  # run_id of the last Redis restart logged
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

        def beat() -> None:
            with self.connection.pipeline(transaction=False) as batched:
                SimpleWorker.heartbeat(self, timeout, batched)
                batched.execute()

        self._until_redis_answers("heartbeat", beat)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        job.ended_at = now()

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()  # (re)starts the scheduler, cleans the registries
            self.runtime.republish()
            registered = self.connection.hexists(self.key, "birth") and (
                self.connection.sismember(REDIS_WORKER_KEYS, self.key)
            )
            if not registered:  # Redis restarted without its data: be listed again
                self.connection.delete(self.key)  # a heartbeat's leftover
                self.register_birth()
                self.set_state(self.get_state())
        except (redis.RedisError, ValueError) as error:  # tried again at the next round
            logger.warning("maintenance: %s", error)

    def clean_registries(self) -> None:
        # Right after a Redis restart every execution that ran through the downtime looks
        # expired; its worker beats it again within a heartbeat. Until then it is not abandoned.
        grace = self.get_heartbeat_ttl(None)
        server = self.connection.info("server")
        if server["uptime_in_seconds"] < grace:
            if self._restart_seen != server["run_id"]:
                self._restart_seen = server["run_id"]
                logger.info("Redis restarted: abandoned jobs are looked for after %d s", grace)
            return
        super().clean_registries()

    def perform_job(self, job: Job, queue: Queue, execution) -> bool:
        reason = refusal(job)
        if reason is None:
            return super().perform_job(job, queue, execution)
        # Failed as RQ fails a job that raised (recorded, moved to the failed registry), minus
        # the callbacks and the retries: nothing of it runs, now or later.
        logger.warning("job %s refused: %s", job.id, reason)
        self.prepare_job_execution(job, len(self.queues) == 1)
        job.retries_left = None
        self.handle_execution_ended(job, queue, 0)
        self.handle_job_failure(
            job,
            queue,
            queue.started_job_registry,
            exc_string=f"JobRefused: {reason}; refused without importing or running it",
            execution=execution,
        )
        return False

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self._until_redis_answers(f"job {job.id}", lambda: self.prepare_execution(job))
        self._heartbeat.watch(job, execution)
        try:
            with use_runtime(self.runtime):
                self.perform_job(job, queue, execution)
        finally:
            self._heartbeat.watch(None, None)
        self.set_state(WorkerStatus.IDLE)

    # -- riding out a Redis outage (see the class docstring) -------------------------------------
    def _until_redis_answers(self, what: str, call: Callable[[], T]) -> T:
        return until_redis_answers(
            call, f"worker {self.name}: {what}", lambda: self._stop_requested
        )

    def set_state(self, state: str, pipeline=None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline)
            return
        self._until_redis_answers("state", lambda: SimpleWorker.set_state(self, state))

    def check_for_suspension(self, burst: bool) -> None:
        self._until_redis_answers(
            "suspension check", lambda: SimpleWorker.check_for_suspension(self, burst)
        )

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        self._until_redis_answers(
            f"job {job.id} start",
            lambda: SimpleWorker.prepare_job_execution(self, job, remove_from_intermediate_queue),
        )

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry, execution) -> None:
        # The job ran (its prediction is written): record that, not a failure, once Redis is back.
        self._until_redis_answers(
            f"job {job.id} result",
            lambda: SimpleWorker.handle_job_success(
                self, job, queue, started_job_registry, execution
            ),
        )

    def handle_job_failure(self, job: Job, queue: Queue, *args, **kwargs) -> None:
        # RQ logs and drops a failure it cannot record; wait for Redis first (retries depend on it).
        self._until_redis_answers(f"job {job.id} failure", self.connection.ping)
        super().handle_job_failure(job, queue, *args, **kwargs)

    def set_shutdown_requested_date(self) -> None:
        with contextlib.suppress(*REDIS_DOWN):  # a signal handler: never raise for Redis
            super().set_shutdown_requested_date()

    def teardown(self) -> None:
        try:
            super().teardown()
        except REDIS_DOWN as error:
            logger.warning("worker %s: could not record its stop in Redis: %s", self.name, error)
            with contextlib.suppress(Exception):
                self.unsubscribe()

    def _start_scheduler(self, burst=False, logging_level=None, date_format=None, log_format=None):
        # RQ's own, with a scheduler that rides out Redis outages (it would exit on the first).
        formats = {"date_format": date_format, "log_format": log_format}
        self.scheduler = ModelScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            serializer=self.serializer,
            **{name: value for name, value in formats.items() if value is not None},
        )
        self.scheduler.acquire_locks(auto_start=not burst)
        if burst and self.scheduler.acquired_locks:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()


class ModelScheduler(RQScheduler):
    """RQ's scheduler process (moves jobs whose retry delay is over back to their queue) that
    rides out Redis outages, and stops, releasing its lock, when its worker is gone (a SIGKILLed
    worker's scheduler would hold the lock, so no other worker's could take over)."""

    def work(self) -> None:
        self._install_signal_handlers()
        worker_pid = os.getppid()

        def stop() -> bool:
            return self._stop_requested or os.getppid() != worker_pid

        def tick() -> None:
            if self.pid == 0:
                self.register_birth()
            if self.should_reacquire_locks:
                self.acquire_locks()
            self.heartbeat()
            self.enqueue_scheduled_jobs()

        while not stop():
            with contextlib.suppress(*REDIS_DOWN):  # raised only once stop() says so
                until_redis_answers(tick, "scheduler", stop)
            time.sleep(self.interval)
        orphaned = os.getppid() != worker_pid
        if orphaned:
            self.log.info("Scheduler: its worker is gone, stopping")
        self.log.info("Scheduler stopping, releasing locks for %s", ", ".join(self.acquired_locks))
        # An orphan hands its lock over even if Redis is away now (until the lock would expire).
        deadline = time.monotonic() + (self.interval + 60 if orphaned else 0)
        with contextlib.suppress(*REDIS_DOWN):
            until_redis_answers(
                self._release, "scheduler stop", lambda: time.monotonic() > deadline
            )

    def _release(self) -> None:
        self.release_locks()
        self.register_death()


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
        backoff = Backoff(most=interval)  # Redis away: beat again as soon as it is back
        wait = interval
        while True:
            with self._changed:
                while self._current is None:
                    self._changed.wait()
                job, execution = self._current
                self._changed.wait(wait)  # woken early when the job ends
                if self._current is None or self._current[0] is not job:
                    continue
            try:
                self.worker.maintain_heartbeats(job, execution)
            except redis.RedisError as error:  # the job goes on; RQ retries it if it expires
                wait = backoff.failed()
                if backoff.failures == 1:
                    logger.warning("job %s: heartbeat failed: %s; trying again", job.id, error)
                continue
            wait = interval
            outage = backoff.succeeded()
            if outage is not None:
                logger.info("job %s: heartbeat sent again (after %.1f s)", job.id, outage)

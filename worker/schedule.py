"""Periodic work of ``python -m worker cron`` (RQ's cron scheduler): the housekeeping job, and
the training check, which the cron process runs itself (it needs Redis, not a model)."""

from __future__ import annotations

import logging
import time

import msgspec
from redis import Redis
from rq import Queue, cron_job_registry
from rq.cron import CronJob, CronScheduler
from rq.defaults import DEFAULT_CRON_JOB_HISTORY_LIMIT, DEFAULT_CRON_JOB_HISTORY_TTL
from rq.job import Job

from serving.jobs import JOBS
from serving.requests import HousekeepingRequest, submit_sami, submit_training, train_mode
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport

logger = logging.getLogger(__name__)


class JsonCronJob(CronJob):
    """RQ's ``CronJob``, enqueued as JSON (:class:`~serving.serialization.JobSerializer`): RQ
    3.0's own always uses its default serializer, pickle. Same steps otherwise: the job, its
    place in the cron job's history and the registry, in one round trip."""

    def enqueue(self, connection: Redis) -> Job:
        queue = Queue(self.queue_name, connection=connection, serializer=JobSerializer)
        with connection.pipeline() as pipeline:
            job = queue.enqueue(
                self.func, args=self.args, kwargs=self.kwargs, **self.job_options, pipeline=pipeline
            )
            enqueued = job.enqueued_at.timestamp()
            pipeline.zadd(self.job_history_key, {job.id: enqueued})
            pipeline.zremrangebyrank(self.job_history_key, 0, -(DEFAULT_CRON_JOB_HISTORY_LIMIT + 1))
            pipeline.expire(self.job_history_key, DEFAULT_CRON_JOB_HISTORY_TTL)
            cron_job_registry.add(self.name, pipeline, enqueue_timestamp=enqueued)
            pipeline.execute()
        logger.info("enqueued %s on %s", self.func_name, self.queue_name)
        return job


class InProcessCronJob(CronJob):
    """A periodic call the cron process makes itself: nothing is queued. A failure is logged
    and the call made again at the next interval (as a failed job would be)."""

    def enqueue(self, connection: Redis) -> None:
        try:
            self.func(*self.args, **self.kwargs)
        except Exception:
            logger.exception("%s failed; next try in %s s", self.name, self.interval)


class JsonCronScheduler(CronScheduler):
    """RQ's cron scheduler whose jobs are :class:`JsonCronJob` (never pickled), plus calls made
    in this process (:class:`InProcessCronJob`)."""

    def __init__(self, connection: Redis, **kwargs) -> None:
        super().__init__(connection, **kwargs)
        self.serializer = JobSerializer

    def register(self, func, queue_name: str, **options) -> CronJob:
        cron_job = JsonCronJob(queue_name, func, **options)
        self._cron_jobs.append(cron_job)
        return cron_job

    def register_in_process(self, func, interval: int, name: str, args: tuple = ()) -> CronJob:
        """``func(*args)`` every ``interval`` seconds in this process (the first at start)."""
        cron_job = InProcessCronJob("", func, args=args, interval=interval, name=name)
        self._cron_jobs.append(cron_job)
        return cron_job


def queue_due_training(
    transport: QueueTransport, threshold: int, now: float | None = None
) -> dict[str, str | None]:
    """Queue a training run for every project with at least ``threshold`` annotations saved
    since its last run: the project's ``train_mode`` (its ``extra_params``: ``finetune``, the
    default, or ``sami``). A project whose params hold ``sami_every_hours`` > 0 also gets a
    SAMI run when its last one started longer ago than that (or never ran): SAMI learns from
    new images, annotated or not. A run already queued or running is not queued again.
    Returns project -> job id."""
    now = time.time() if now is None else now
    state = transport.project_state
    queued = {}
    known = set(state.projects()) | set(transport.params_projects())
    for project in sorted((p for p in known if p.isdigit()), key=int):  # not "None" params
        params = transport.project_params(project)
        count = state.new_annotations(project)
        if count >= threshold:
            mode = train_mode(params)
            queued[project] = submit_training(transport, project, mode, f"{count} new annotations")
            continue
        hours = params.get("sami_every_hours")
        if isinstance(hours, (int, float)) and not isinstance(hours, bool) and hours > 0:
            last = state.last_started(project, "sami")
            if last is None or now - last >= hours * 3600:
                trigger = f"every {hours} h"
                queued[project] = submit_sami(transport, project, trigger, False)
    if queued:
        logger.info("queued training runs for projects %s", ", ".join(queued))
    return queued


def register_periodic_jobs(scheduler: JsonCronScheduler, settings: Settings) -> None:
    """``housekeeping`` every ``HOUSEKEEPING_SECONDS`` (a job on its queue, ``batch``):
    shared-cache index pruning and a re-publish of the model registry if Redis lost it. The
    training check every ``TRAIN_CHECK_SECONDS``, in this process: a run on ``train`` for each
    project with ``TRAIN_MIN_NEW_ANNOTATIONS`` new annotations, and SAMI runs every
    ``sami_every_hours`` where a project asks for them (:func:`queue_due_training`)."""
    housekeeping = JOBS["housekeeping"]
    scheduler.register(
        housekeeping.function,
        queue_name=housekeeping.queue,
        args=(msgspec.to_builtins(HousekeepingRequest()),),
        interval=settings.housekeeping_seconds,
        job_timeout=120,
        name="housekeeping",
    )
    transport = QueueTransport(settings)
    scheduler.register_in_process(
        queue_due_training,
        settings.train_check_seconds,
        "schedule-training",
        (transport, settings.train_min_new_annotations),
    )

"""Periodic jobs, registered with RQ's cron scheduler by ``python -m worker cron``."""

from __future__ import annotations

import logging

from redis import Redis
from rq import Queue, cron_job_registry
from rq.cron import CronJob, CronScheduler
from rq.defaults import DEFAULT_CRON_JOB_HISTORY_LIMIT, DEFAULT_CRON_JOB_HISTORY_TTL
from rq.job import Job

from serving import jobs
from serving.serialization import JobSerializer
from serving.settings import Settings

logger = logging.getLogger(__name__)
HOUSEKEEPING_SECONDS = 300


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


class JsonCronScheduler(CronScheduler):
    """RQ's cron scheduler whose jobs are :class:`JsonCronJob` (never pickled)."""

    def __init__(self, connection: Redis, **kwargs) -> None:
        super().__init__(connection, **kwargs)
        self.serializer = JobSerializer

    def register(self, func, queue_name: str, **options) -> CronJob:
        cron_job = JsonCronJob(queue_name, func, **options)
        self._cron_jobs.append(cron_job)
        return cron_job


def register_periodic_jobs(scheduler: CronScheduler, settings: Settings) -> None:
    """``housekeeping`` every 5 minutes on ``batch``: shared-cache index pruning and a re-publish
    of the model registry if Redis lost it. ``schedule_training`` every ``TRAIN_CHECK_SECONDS``
    on ``train``: a fine-tune for each project with enough new annotations."""
    scheduler.register(
        jobs.housekeeping,
        queue_name="batch",
        args=({},),
        interval=HOUSEKEEPING_SECONDS,
        job_timeout=120,
        name="housekeeping",
    )
    scheduler.register(
        jobs.schedule_training,
        queue_name="train",
        args=({},),
        interval=settings.train_check_seconds,
        job_timeout=60,
        name="schedule-training",
    )

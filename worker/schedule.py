"""Periodic jobs, registered with RQ's cron scheduler by ``python -m worker cron``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from backend.settings import Settings

from . import jobs

if TYPE_CHECKING:
    from rq.cron import CronScheduler

HOUSEKEEPING_SECONDS = 300


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

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
    of the model registry if Redis lost it."""
    scheduler.register(
        jobs.housekeeping,
        queue_name="batch",
        args=({},),
        interval=HOUSEKEEPING_SECONDS,
        job_timeout=120,
        name="housekeeping",
    )

"""Operator commands behind ``python -m worker status | autolabel | prewarm`` (torch-free)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from serving.labelstudio.label_config import parse_label_config
from serving.labelstudio.tasks import image_url
from serving.registry import VersionDirectory
from serving.requests import PrewarmRequest, autolabel_job_id, autolabel_request
from serving.serialization import JobSerializer
from serving.settings import Settings
from serving.transports import QueueTransport

if TYPE_CHECKING:
    from redis import Redis

QUEUES = ("interactive", "batch", "train")


def queue_status(connection: Redis, settings: Settings, failures: int = 10) -> dict:
    """Queues (queued/running/finished/failed), workers (state, current job), recent failures
    with their reason, and the base model version the workers published."""
    from rq import Queue, Worker
    from rq.job import Job
    from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

    workers = Worker.all(connection=connection, serializer=JobSerializer)
    report: dict = {"queues": {}, "workers": [], "recent_failures": []}
    failed_ids: list[str] = []
    for name in QUEUES:
        queue = Queue(name, connection=connection, serializer=JobSerializer)
        failed = FailedJobRegistry(queue=queue)
        report["queues"][name] = {
            "queued": queue.count,
            "started": StartedJobRegistry(queue=queue).count,
            "finished": FinishedJobRegistry(queue=queue).count,
            "failed": failed.count,
            "workers": sum(1 for w in workers if name in w.queue_names()),
        }
        failed_ids += failed.get_job_ids(0, failures - 1)
    for worker in workers:
        report["workers"].append(
            {
                "name": worker.name,
                "state": worker.get_state(),
                "queues": worker.queue_names(),
                "job": worker.get_current_job_id(),
                "successful": worker.successful_job_count,
                "failed": worker.failed_job_count,
            }
        )
    for job in Job.fetch_many(failed_ids[:failures], connection, JobSerializer):
        if job is None:
            continue
        result = job.latest_result()
        reason = (result.exc_string or "").strip().splitlines()[-1:] if result else []
        report["recent_failures"].append(
            {"id": job.id, "reason": reason[0] if reason else "unknown", "meta": job.meta}
        )
    base = VersionDirectory(connection, settings.redis_key_prefix).base()
    report["model"] = base["version"] if base else None
    return report


def enqueue_project(
    connection: Redis, settings: Settings, project: int, function: str, mode: str | None = None
) -> list[str]:
    """Queue ``autolabel`` (tasks without a prediction of the current version) or ``prewarm``
    (every task) jobs for all tasks of an LS project; the same jobs and ids as the backend's
    "Retrieve predictions". Returns the job ids."""
    from serving.labelstudio.api import LabelStudioApi

    api = LabelStudioApi(settings.label_studio_url, settings.label_studio_api_key)
    config = parse_label_config(api.project(project).label_config)
    transport = QueueTransport(settings)
    project_key = str(project)
    version = transport.model_version(project_key)
    params = transport.project_params(project_key)
    mode = mode or params.get("autolabel_mode") or settings.autolabel_mode
    points = params.get("points_per_side") or settings.autolabel_points_per_side
    job_ids = []
    for task in api.tasks(project):
        if function == "prewarm":
            request = PrewarmRequest(
                project=project_key, task=task["id"], image=image_url(task, config)
            )
            job_ids.append(
                transport.submit("prewarm", request, f"prewarm-p{project}-t{task['id']}")
            )
            continue
        predictions = task.get("predictions") or []
        if any(p.get("model_version") == version for p in predictions if isinstance(p, dict)):
            continue  # LS's own rule: a task with a prediction of this version is done
        request = autolabel_request(
            project_key, task, config, mode, points, version, True, settings.max_image_pixels
        )
        if not request.task.boxes and mode == "boxes":
            continue
        job_ids.append(
            transport.submit(
                "autolabel",
                request,
                autolabel_job_id(project_key, task["id"], version),
                description=f"autolabel task {task['id']} of project {project} ({mode})",
            )
        )
    return [job_id for job_id in job_ids if job_id]


def wait_for_jobs(connection: Redis, job_ids: list[str], description: str) -> dict[str, str]:
    """Progress bar until every job has finished or failed for good; {job id: reason} of the
    failed ones (a job that is being retried counts as pending)."""
    from rq.job import Job, JobStatus
    from tqdm import tqdm

    pending = set(job_ids)
    failed: dict[str, str] = {}
    with tqdm(total=len(job_ids), desc=description, unit="task") as bar:
        while pending:
            for job_id, job in zip(
                list(pending), Job.fetch_many(list(pending), connection, JobSerializer), strict=True
            ):
                if job is None:  # expired: its result TTL passed
                    pending.discard(job_id)
                    bar.update(1)
                    continue
                state = job.get_status(refresh=False)
                if state == JobStatus.FINISHED:
                    result = job.return_value() or {}
                    if isinstance(result, dict) and "error" in result:
                        failed[job_id] = str(result["error"])
                elif state in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                    result = job.latest_result()
                    lines = (result.exc_string or "").strip().splitlines() if result else []
                    failed[job_id] = lines[-1] if lines else str(state)
                else:
                    continue
                pending.discard(job_id)
                bar.update(1)
                bar.set_postfix(failed=len(failed))
            if pending:
                time.sleep(0.5)
    return failed


def follow_training(
    connection: Redis, job_id: str, poll_seconds: float = 1.0, description: str = "fine-tune"
) -> dict:
    """Progress bar of a training job (its meta: stage, step/steps, loss) until it ends, one bar
    per stage (a SAMI run: images, sami, align, train); returns its result (or ``{"status":
    "failed", "reason": ...}``)."""
    from rq.job import Job, JobStatus
    from tqdm import tqdm

    job = Job.fetch(job_id, connection=connection, serializer=JobSerializer)
    stage = None
    bar = tqdm(desc=description, unit="step")
    try:
        while True:
            state = job.get_status()
            meta = job.get_meta()
            if meta.get("stage") != stage and meta.get("stage") in ("images", "sami", "align"):
                stage = meta.get("stage")
                bar.close()
                bar = tqdm(
                    desc=f"{description}: {stage}", unit="image" if stage == "images" else "step"
                )
            total = meta.get("steps") or meta.get("total")
            if total:
                bar.total = int(total)
                bar.n = int(meta.get("step", meta.get("done", 0)))
            bar.set_postfix(
                stage=meta.get("stage"),
                loss=round(float(meta.get("loss", 0.0)), 4),
                iou=round(float(meta.get("train_iou", 0.0)), 3),
            )
            bar.refresh()
            if state == JobStatus.FINISHED:
                return job.return_value() or {}
            if state in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                result = job.latest_result()
                lines = (result.exc_string or "").strip().splitlines() if result else []
                return {"status": "failed", "reason": lines[-1] if lines else str(state)}
            time.sleep(poll_seconds)
    finally:
        bar.close()

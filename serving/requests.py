"""The job requests the shells send to the serving core: built once on the calling side."""

from __future__ import annotations

import re

from serving.labelstudio.context import MAX_IMAGE_PIXELS
from serving.labelstudio.label_config import ProjectConfig
from serving.labelstudio.tasks import image_url, task_rectangles
from serving.transports import Transport


def output_request(config: ProjectConfig) -> dict:
    output = config.output
    return {
        "tag": output.tag,
        "name": output.name,
        "to_name": output.to_name,
        "labels": list(output.labels),
    }


def autolabel_request(
    project: str | None,
    task: dict,
    config: ProjectConfig,
    mode: str,
    points_per_side: int,
    version: str,
    write_back: bool,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> dict:
    """The ``serving.jobs.autolabel`` request for one LS task (see serving/jobs.py)."""
    boxes = task_rectangles(task, config.image_name, max_pixels)
    return {
        "project": project,
        "task": {
            "id": task.get("id"),
            "image": image_url(task, config),
            "boxes": [b.as_request() for b in boxes],
        },
        "mode": mode,
        "points_per_side": points_per_side,
        "output": output_request(config),
        "model_version": version,
        "write_back": write_back,
    }


def finetune_job_id(project: str) -> str:
    """At most one fine-tune per project queued or running ("Start training" twice: one job)."""
    return f"finetune-p{project}"


def submit_finetune(transport: Transport, project: str, trigger: str) -> str | None:
    """Queue the project's fine-tune on ``train`` (or find it already queued or running);
    returns the job id. ``trigger`` says why (recorded in the run's history)."""
    return transport.submit(
        "finetune",
        {"project": project, "trigger": trigger},
        "train",
        finetune_job_id(project),
        False,
        f"fine-tune project {project}",
    )


def autolabel_job_id(project: str | None, task_id: object, version: str) -> str:
    """One batch job per (project, task, version): a second "Retrieve predictions" or CLI run
    finds it queued or running and does not add another. (RQ ids allow letters, digits, _ and
    -: the ``+`` of fine-tuned versions becomes ``_``.)"""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"autolabel-p{project}-t{task_id}-{version}")

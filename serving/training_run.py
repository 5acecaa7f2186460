"""One fine-tuning run of a project, behind the ``finetune`` job (see ``serving.jobs.finetune``):
sync, split, embed, train, evaluate, promote or reject (:func:`run_finetune`). A queued run is
retried only for failures before training starts (:class:`Attempts`).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING

import redis

from serving.labelstudio.annotations import snapshot_hash, sync_annotations
from serving.labelstudio.images import ImageError
from serving.labelstudio.label_config import parse_label_config
from serving.runtime import checkpoint_version

if TYPE_CHECKING:
    from serving.runtime import ModelRuntime, ServedModel

logger = logging.getLogger(__name__)

METRICS = ("one_click_miou", "box_miou", "three_click_miou")
REPORTED_SKIPS = 20  # skipped tasks listed with their reason in the report (all are counted)


class TrainingAlreadyStarted(RuntimeError):
    """A retry of a fine-tune job whose earlier attempt had started training: never run twice."""


class Attempts:
    """The RQ job's attempts: retries are allowed only until training starts.

    When training starts, the job's remaining retries are set to 0 (in this process's job and in
    Redis, for a worker that dies mid-run and whose job RQ's clean-up re-enqueues) and a marker
    ``<prefix>:finetune:<job id>:training`` = the job's creation time is set; an attempt of the
    same job (same creation time) that finds it refuses to run. No job (embedded mode): no-op."""

    def __init__(self, job, prefix: str) -> None:
        self.job = job
        if job is not None:
            self.key = f"{prefix}:finetune:{job.id}:training"
            self.created = job.created_at.isoformat() if job.created_at else ""

    def check(self) -> None:
        """Raise :class:`TrainingAlreadyStarted` if an earlier attempt of this job trained."""
        if self.job is None:
            return
        marker = self.job.connection.get(self.key)
        if marker is not None and marker.decode() == self.created:
            self._no_more_retries()
            raise TrainingAlreadyStarted(
                f"job {self.job.id}: an earlier attempt started training; a fine-tune is never "
                "run twice by one job (the next trigger starts a new one)"
            )

    def training_started(self) -> None:
        if self.job is None:
            return
        self.job.connection.set(self.key, self.created, ex=30 * 24 * 3600)
        self._no_more_retries()

    def _no_more_retries(self) -> None:
        self.job.retries_left = 0
        self.job.connection.hset(self.job.key, "retries_left", 0)


def held_out_score(metrics: dict) -> float:
    """What the promotion gate compares: the mean of 1-click, box and 3-click held-out mIoU."""
    return float(statistics.fmean(metrics[name] for name in METRICS))


def promotion_decision(current: dict, candidate: dict, margin: float) -> tuple[bool, str]:
    """Promote only a candidate whose held-out score beats the served version's by ``margin``;
    the reason says why, with the numbers (recorded in the project's history)."""
    current_score, candidate_score = held_out_score(current), held_out_score(candidate)
    if candidate_score >= current_score + margin:
        return True, (
            f"held-out mIoU {candidate_score:.3f} beats {current_score:.3f} by "
            f"{candidate_score - current_score:.3f} (margin {margin})"
        )
    return False, (
        f"held-out mIoU {candidate_score:.3f} of the candidate is not above "
        f"{current_score:.3f} of the served version + margin {margin}"
    )


class Progress:
    """Reports a run's stage and numbers to the RQ job's meta, the project state (/metrics) and
    the log (every stage change; training every few steps)."""

    def __init__(self, runtime: ModelRuntime, project: str, mode: str = "finetune") -> None:
        from rq import get_current_job

        self.runtime = runtime
        self.project = project
        self.job = get_current_job()
        self.status: dict = {
            "running": True,
            "mode": mode,
            "stage": "starting",
            "started": time.time(),
        }
        self._last_log = 0.0
        self.mode = mode

    def mark_started(self) -> None:
        """Record when this mode last ran (after the job's attempt check: a refused retry is no
        start); the periodic SAMI trigger reads it (worker/schedule.py)."""
        try:
            self.runtime.project_state.mark_started(self.project, self.mode)
        except redis.RedisError as error:
            logger.warning("project %s: start not recorded (Redis): %s", self.project, error)

    def __call__(self, stage: str, **values) -> None:
        changed = stage != self.status.get("stage")
        self.status.update(values, stage=stage)
        try:  # best effort: a Redis outage must not fail a run (it is never retried once training)
            self.runtime.project_state.set_status(self.project, self.status)
            if self.job is not None:
                self.job.meta.update(self.status)
                self.job.save_meta()
        except redis.RedisError as error:
            logger.warning("project %s: progress not reported (Redis): %s", self.project, error)
        if changed or time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}
            logger.info("project %s: %s %s", self.project, stage, shown)

    def finish(self, **values) -> None:
        self("done", running=False, **values)


def run_finetune(runtime: ModelRuntime, project: str, trigger: str) -> dict:
    """sync (LS API) -> split by task -> embeddings (frozen encoder, shared cache) -> train
    (``efficientsam.training.FineTuner``) -> evaluate the served version and the candidate on the
    same held-out prompts -> promote (new version file + registry) or reject (reason recorded).
    Returns the run's summary (``status``: promoted / rejected / skipped).

    A task whose annotation cannot be decoded or whose image cannot be downloaded is skipped,
    its reason logged and listed in the report (``skipped_tasks``); the run goes on without it.
    The project's new-annotation count is forgotten only when the run succeeds (promoted,
    rejected or skipped for too little data), so a crashed run loses no trigger."""
    from efficientsam.training import (
        FineTuner,
        TrainingConfig,
        TrainingImage,
        evaluate,
        split_by_task,
    )

    settings = runtime.settings
    progress = Progress(runtime, project)
    attempts = Attempts(progress.job, settings.redis_key_prefix)
    attempts.check()
    progress.mark_started()
    started = time.perf_counter()
    runtime.project_state.training_started(project)  # saves from now on count for the next run
    progress("sync", trigger=trigger)
    api = runtime.labelstudio
    config = parse_label_config(api.project(int(project)).label_config)
    tasks, skipped = sync_annotations(api.annotated_tasks(int(project)), config)
    for entry in skipped:
        logger.warning("project %s: task %s skipped: %s", project, entry["task"], entry["reason"])
    masks = sum(len(t.masks) for t in tasks)
    too_few = skip_if_too_few_tasks(runtime, project, trigger, len(tasks), skipped, progress)
    if too_few is not None:
        return too_few
    train_ids, held_out_ids = split_by_task(
        [str(t.task_id) for t in tasks], settings.train_held_out_fraction, seed=0
    )
    current = runtime.served_model(project)
    start = current if settings.train_from == "current" else runtime.base
    lora = settings.train_lora_rank > 0

    progress("embed", tasks=len(tasks), masks=masks, train_tasks=len(train_ids))
    images = {}
    held_out_set = set(held_out_ids)
    for index, task in enumerate(tasks):
        try:
            loaded = runtime.load_image(task.image_url, task.task_id)
        except ImageError as error:
            logger.warning("project %s: task %s skipped: %s", project, task.task_id, error)
            skipped.append({"task": task.task_id, "reason": f"image: {error}"})
            continue
        embedding = runtime.embed(start, loaded)
        keep_pixels = lora or str(task.task_id) in held_out_set  # other encoders' embeddings
        images[str(task.task_id)] = TrainingImage(
            image_id=str(task.task_id),
            embedding=embedding.embeddings.detach().float().cpu(),
            masks=task.masks_at(loaded.size),
            image=loaded.array if keep_pixels else None,
        )
        progress("embed", done=index + 1, total=len(tasks))
    if len(images) < len(tasks):  # tasks whose image could not be had: split what is left
        if len(images) < max(2, settings.train_min_tasks):  # nothing trained yet: RQ retries
            raise RuntimeError(
                f"project {project}: the images of only {len(images)} of {len(tasks)} tasks "
                "could be downloaded: "
                + "; ".join(f"task {e['task']}: {e['reason']}" for e in skipped[-REPORTED_SKIPS:])
            )
        tasks = [t for t in tasks if str(t.task_id) in images]
        train_ids, held_out_ids = split_by_task(
            [str(t.task_id) for t in tasks], settings.train_held_out_fraction, seed=0
        )
        for task in tasks:  # a task that moved to the held-out side: its pixels too
            if str(task.task_id) in held_out_ids and images[str(task.task_id)].image is None:
                images[str(task.task_id)].image = runtime.load_image(
                    task.image_url, task.task_id
                ).array
        masks = sum(len(t.masks) for t in tasks)
    snapshot = snapshot_hash(tasks)

    attempts.training_started()  # from here on this job is never run again
    training_config = TrainingConfig(seed=0, lora_rank=settings.train_lora_rank)
    if settings.train_steps > 0:
        training_config.steps = settings.train_steps
    tuner = FineTuner(start.predictor.model, training_config)
    report = tuner.fit(
        [images[i] for i in train_ids],
        progress=lambda values: progress("train", **values),
    )
    changed = tuner.changed_tensors()

    progress("evaluate")
    held_out = [images[i] for i in held_out_ids]

    def served_metrics(served) -> dict:
        """Held-out means of a served version; its own encoder runs on the pixels when it is
        not the one whose embeddings were stored."""
        same_encoder = served.predictor.encoder_fingerprint == start.predictor.encoder_fingerprint
        return metrics_summary(
            evaluate(served.predictor.model, held_out, encode_images=not same_encoder)
        )

    current_metrics = served_metrics(current)
    # after earlier promotions: the released weights too, on the same prompts
    base_metrics = (
        current_metrics if current.version == runtime.base.version else served_metrics(runtime.base)
    )
    encoder_trained = any(key.startswith("image_encoder.") for key in changed)
    candidate_metrics = metrics_summary(
        evaluate(tuner.model, held_out, encode_images=encoder_trained)
    )
    current_score, candidate_score = (
        held_out_score(current_metrics),
        held_out_score(candidate_metrics),
    )
    promote, reason = promotion_decision(
        current_metrics, candidate_metrics, settings.train_promotion_margin
    )
    details = {
        "trigger": trigger,
        "parent": current.version,
        "data_snapshot": snapshot,
        "tasks": {"train": len(train_ids), "held_out": len(held_out_ids)},
        "masks": masks,
        "skipped_tasks": skips_report(skipped),
        "metrics": {
            "base": base_metrics,
            "current": current_metrics,
            "candidate": candidate_metrics,
        },
        "training": {"steps": report.steps, "seconds": round(report.seconds, 1)},
    }
    if promote:
        metadata = {
            "parent": current.version,
            "data_snapshot": snapshot,
            "metrics": details["metrics"],
            "config": report.config,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "trained": sorted({key.split(".", 1)[0] for key in changed}),
        }
        weights_version = None
        if start.standalone:  # from a SAMI student: the whole model, named after its weights
            changed = {k: v.detach().cpu() for k, v in tuner.model.state_dict().items()}
            metadata.update(standalone=True, teacher=(start.metadata or {}).get("teacher"))
            weights_version = checkpoint_version(changed)
        version = runtime.registry.store_version(
            project, runtime.base_version, changed, metadata, weights_version=weights_version
        )
        result = promote_unless_stale(runtime, project, version, current, details, reason)
    else:
        runtime.registry.reject(project, f"candidate of {current.version}", reason, details)
        result = {"status": "rejected", "reason": reason}
        logger.info("project %s: candidate rejected: %s", project, reason)
    runtime.project_state.training_succeeded(project)  # the outcome is recorded: forget the count
    seconds = time.perf_counter() - started
    progress.finish(
        result=result["status"],
        current_miou=current_score,
        candidate_miou=candidate_score,
        seconds=round(seconds, 1),
    )
    return {"project": project, **result, **details, "seconds": round(seconds, 1)}


def promote_unless_stale(
    runtime: ModelRuntime,
    project: str,
    version: str,
    current: ServedModel,
    details: dict,
    reason: str,
) -> dict:
    """Promote the stored candidate ``version`` if the project still serves ``current`` (the
    version it was measured against); else record it as rejected with why (another run of the
    project promoted meanwhile). Returns the result's status, version and reason."""
    from serving.registry import StaleCandidate

    replacing = None if current.version == runtime.base_version else current.version
    try:
        runtime.registry.promote(project, version, {**details, "reason": reason}, replacing)
    except StaleCandidate as error:
        reason = f"{error}: not promoted ({reason})"
        runtime.registry.reject(project, version, reason, details)
        logger.info("project %s: candidate %s rejected: %s", project, version, reason)
        return {"status": "rejected", "reason": reason}
    logger.info("project %s: promoted %s: %s", project, version, reason)
    return {"status": "promoted", "version": version, "reason": reason}


def skip_if_too_few_tasks(
    runtime: ModelRuntime,
    project: str,
    trigger: str,
    annotated: int,
    skipped: list[dict],
    progress: Progress,
    forget_count: bool = True,
) -> dict | None:
    """With fewer than ``TRAIN_MIN_TASKS`` (and 2) annotated tasks the run is skipped: the
    reason is recorded in the project's history, the trigger forgotten (``forget_count``), and
    the summary returned; else None."""
    needed = runtime.settings.train_min_tasks
    if annotated >= max(2, needed):
        return None
    reason = (
        f"{annotated} annotated task(s) with masks, {needed} needed "
        "(brush, bitmask or polygon regions; rectangles are not used)"
    )
    event = {"event": "skipped", "reason": reason, "trigger": trigger}
    runtime.registry.record(project, {**event, "skipped_tasks": skips_report(skipped)})
    if forget_count:
        runtime.project_state.training_succeeded(project)
    progress.finish(result="skipped", reason=reason)
    return {"project": project, "status": "skipped", "reason": reason}


def skips_report(skipped: list[dict]) -> dict:
    """The report's ``skipped_tasks``: how many, and the first few with their reason."""
    return {"count": len(skipped), "tasks": skipped[:REPORTED_SKIPS]}


def metrics_summary(metrics: dict) -> dict:
    """The means and the count (not the per-mask records) for the history and the metadata."""
    return {key: value for key, value in metrics.items() if key != "masks"}

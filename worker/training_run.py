"""One fine-tuning run of a project, behind the ``finetune`` job (see ``worker.jobs.finetune``).

sync (LS API) -> split by task -> embeddings (frozen encoder, shared cache) -> train
(``efficientsam.training.FineTuner``) -> evaluate the served version and the candidate on the
same held-out prompts -> promote (new version file + registry) or reject (reason recorded).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import TYPE_CHECKING

from backend.label_config import parse_label_config
from backend.results import resize_mask

from .annotations import annotated_task, snapshot_hash

if TYPE_CHECKING:
    from .runtime import ModelRuntime

logger = logging.getLogger(__name__)

METRICS = ("one_click_miou", "box_miou", "three_click_miou")


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

    def __init__(self, runtime: ModelRuntime, project: str) -> None:
        from rq import get_current_job

        self.runtime = runtime
        self.project = project
        self.job = get_current_job()
        self.status: dict = {"running": True, "stage": "starting", "started": time.time()}
        self._last_log = 0.0

    def __call__(self, stage: str, **values) -> None:
        changed = stage != self.status.get("stage")
        self.status.update(values, stage=stage)
        self.runtime.project_state.set_status(self.project, self.status)
        if self.job is not None:
            self.job.meta.update(self.status)
            self.job.save_meta()
        if changed or time.monotonic() - self._last_log > 10:
            self._last_log = time.monotonic()
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}
            logger.info("project %s: %s %s", self.project, stage, shown)

    def finish(self, **values) -> None:
        self("done", running=False, **values)


def run_finetune(runtime: ModelRuntime, project: str, trigger: str) -> dict:
    from efficientsam.training import (
        FineTuner,
        TrainingConfig,
        TrainingImage,
        evaluate,
        split_by_task,
    )

    settings = runtime.settings
    progress = Progress(runtime, project)
    started = time.perf_counter()
    runtime.project_state.training_started(project)  # saves from now on count for the next run
    progress("sync", trigger=trigger)
    api = runtime.labelstudio
    config = parse_label_config(api.project(int(project)).label_config)
    tasks = [t for t in (annotated_task(task, config) for task in api.tasks(int(project))) if t]
    masks = sum(len(t.masks) for t in tasks)
    if len(tasks) < max(2, settings.train_min_tasks):
        reason = (
            f"{len(tasks)} annotated task(s) with masks, {settings.train_min_tasks} needed "
            "(brush, bitmask or polygon regions; rectangles are not used)"
        )
        runtime.registry.record(project, {"event": "skipped", "reason": reason, "trigger": trigger})
        progress.finish(result="skipped", reason=reason)
        return {"project": project, "status": "skipped", "reason": reason}
    snapshot = snapshot_hash(tasks)
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
        loaded = runtime.load_image(task.image_url, task.task_id)
        embedding = runtime.embed(start, loaded)
        keep_pixels = lora or str(task.task_id) in held_out_set  # other encoders' embeddings
        images[str(task.task_id)] = TrainingImage(
            image_id=str(task.task_id),
            embedding=embedding.embeddings.detach().float().cpu(),
            masks=[resize_mask(m, loaded.size) for m in task.masks],
            image=loaded.array if keep_pixels else None,
        )
        progress("embed", done=index + 1, total=len(tasks))

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
        return _summary(evaluate(served.predictor.model, held_out, encode_images=not same_encoder))

    current_metrics = served_metrics(current)
    # after earlier promotions: the released weights too, on the same prompts
    base_metrics = (
        current_metrics if current.version == runtime.base.version else served_metrics(runtime.base)
    )
    encoder_trained = any(key.startswith("image_encoder.") for key in changed)
    candidate_metrics = _summary(evaluate(tuner.model, held_out, encode_images=encoder_trained))
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
        "metrics": {
            "base": base_metrics,
            "current": current_metrics,
            "candidate": candidate_metrics,
        },
        "training": {"steps": report.steps, "seconds": round(report.seconds, 1)},
    }
    if promote:
        version = runtime.registry.store_version(
            project,
            runtime.base_version,
            changed,
            {
                "parent": current.version,
                "data_snapshot": snapshot,
                "metrics": details["metrics"],
                "config": report.config,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "trained": sorted({key.split(".", 1)[0] for key in changed}),
            },
        )
        runtime.registry.promote(project, version, {**details, "reason": reason})
        result = {"status": "promoted", "version": version, "reason": reason}
        logger.info("project %s: promoted %s: %s", project, version, reason)
    else:
        runtime.registry.reject(project, f"candidate of {current.version}", reason, details)
        result = {"status": "rejected", "reason": reason}
        logger.info("project %s: candidate rejected: %s", project, reason)
    seconds = time.perf_counter() - started
    progress.finish(
        result=result["status"],
        current_miou=current_score,
        candidate_miou=candidate_score,
        seconds=round(seconds, 1),
    )
    return {"project": project, **result, **details, "seconds": round(seconds, 1)}


def _summary(metrics: dict) -> dict:
    """The means and the count (not the per-mask records) for the history and the metadata."""
    return {key: value for key, value in metrics.items() if key != "masks"}

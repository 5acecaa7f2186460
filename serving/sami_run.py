"""One SAMI run of a project, behind the ``sami`` job (``serving.jobs.sami``, :func:`run_sami`).

The project's served model is the teacher; a Ti student learns its embeddings on the project's
own task images (annotated or not, newest first, ``SAMI_MAX_IMAGES``): masked pretraining on
25% of the tokens, then unmasked alignment (``efficientsam.training.sami``). The decoder
fine-tune then continues from the student on the project's annotations ("SAMI-initialised
fine-tuning"), and the result is promoted as ``<its weights' version>+p<project>-sami<n>`` only
if it passes both held-out gates (:func:`sami_decision`). The version file holds the whole model
(``standalone``): a Ti encoder with the teacher's (fine-tuned) decoder, whose new encoder
fingerprint keeps its cached embeddings apart from every other version's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.labelstudio.annotations import snapshot_hash, sync_annotations
from serving.labelstudio.images import ImageError
from serving.labelstudio.label_config import parse_label_config
from serving.labelstudio.tasks import TaskError, image_url
from serving.runtime import VersionUnavailable, checkpoint_version
from serving.training_run import (
    Attempts,
    Progress,
    held_out_score,
    metrics_summary,
    promote_unless_stale,
    skip_if_too_few_tasks,
    skips_report,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from efficientsam.modeling import EfficientSam
    from serving.runtime import ModelRuntime, ServedModel
    from serving.settings import Settings

logger = logging.getLogger(__name__)

HELD_OUT_IMAGES = 32  # images of the agreement gate (held-out tasks, annotated ones first)
INPUT_SIDE = 1024  # images are kept as the model's input: 1024 x 1024 x 3 uint8 (3 MiB)


@dataclass(frozen=True)
class ImagePlan:
    """Which task images a SAMI run uses, by task id (newest first within each list).

    distil: the images the student learns from (never a held-out task); agreement: held-out
    images of the agreement gate (the annotated held-out tasks first); finetune: the annotated
    tasks the decoder trains on; evaluate: the annotated held-out tasks of the mIoU gate (the
    same split as the decoder fine-tune's)."""

    distil: list[int]
    agreement: list[int]
    finetune: list[int]
    evaluate: list[int]

    def needed(self) -> list[int]:
        """Every task whose image the run downloads, newest first."""
        ids = set(self.distil) | set(self.agreement) | set(self.finetune) | set(self.evaluate)
        return sorted(ids, reverse=True)


def plan_images(
    task_ids: list[int],
    annotated_ids: list[int],
    held_out_fraction: float,
    max_images: int,
    held_out_images: int = HELD_OUT_IMAGES,
) -> ImagePlan:
    """Split a project's tasks for a SAMI run: annotated and other tasks are split apart by
    ``split_by_task`` (a task never changes sides as the project grows); the student learns
    from the ``max_images`` newest tasks that are not held out."""
    from efficientsam.training import split_by_task

    annotated = sorted(set(annotated_ids), reverse=True)
    others = sorted(set(task_ids) - set(annotated), reverse=True)
    train_a, held_a = split_by_task([str(i) for i in annotated], held_out_fraction, seed=0)
    _, held_u = split_by_task([str(i) for i in others], held_out_fraction, seed=0)
    held = {int(i) for i in held_a} | {int(i) for i in held_u}
    newest = sorted(set(annotated) | set(others), reverse=True)
    return ImagePlan(
        distil=[i for i in newest if i not in held][:max_images],
        agreement=([int(i) for i in held_a] + [int(i) for i in held_u])[:held_out_images],
        finetune=[int(i) for i in train_a],
        evaluate=[int(i) for i in held_a],
    )


def sami_decision(
    current: dict, candidate: dict, agreement: float, settings: Settings
) -> tuple[bool, str]:
    """Promote only a candidate that passes both gates: its held-out mIoU is at least the
    served version's + ``SAMI_MIOU_MARGIN`` (a negative margin: it may lose that much), and
    its held-out mask agreement with the teacher is at least ``SAMI_MIN_AGREEMENT``. The
    reason gives both numbers against their thresholds."""
    current_score, candidate_score = held_out_score(current), held_out_score(candidate)
    needed_miou = current_score + settings.sami_miou_margin
    miou_ok = candidate_score >= needed_miou
    agreement_ok = agreement >= settings.sami_min_agreement
    reason = (
        f"held-out mIoU {candidate_score:.3f} against {current_score:.3f} of the served version "
        f"({'passes' if miou_ok else 'fails'}: >= {needed_miou:.3f} needed, SAMI_MIOU_MARGIN "
        f"{settings.sami_miou_margin}); mask agreement with the teacher {agreement:.3f} "
        f"({'passes' if agreement_ok else 'fails'}: >= {settings.sami_min_agreement} needed)"
    )
    return miou_ok and agreement_ok, reason


def _is_ti(model: EfficientSam) -> bool:
    from efficientsam.build import infer_variant

    return infer_variant(model.state_dict()).name == "ti"


def choose_teacher(runtime: ModelRuntime, project: str, current: ServedModel) -> ServedModel:
    """The served model, unless it is itself a SAMI student: then its teacher (the version
    recorded when it was trained, else the base)."""
    if not current.standalone:
        return current
    teacher_version = str((current.metadata or {}).get("teacher") or runtime.base.version)
    try:
        return runtime.served_model(project, teacher_version)
    except VersionUnavailable as error:
        logger.warning(
            "project %s: teacher %s unavailable (%s); the base teaches",
            project,
            teacher_version,
            error,
        )
        return runtime.base


def choose_student(runtime: ModelRuntime, current: ServedModel) -> tuple[EfficientSam, str]:
    """The Ti model the student starts from, and what it is (recorded in the version): the
    served SAMI student (a later run goes on from it), else ``SAMI_STUDENT``, else the base when
    it is a Ti, else ``efficient_sam_vitt.pt`` in MODEL_DIR, else random weights (seed 0)."""
    import torch

    from efficientsam.build import build_efficient_sam, load_model

    settings = runtime.settings
    device = runtime.base.predictor.model.device
    if current.standalone and _is_ti(current.predictor.model):
        return current.predictor.model, f"version {current.version}"
    if settings.sami_student is not None:
        model = load_model(settings.sami_student, device)
        if not _is_ti(model):
            raise ValueError(f"SAMI_STUDENT={settings.sami_student} is not an EfficientSAM-Ti")
        return model, f"checkpoint {settings.sami_student.name}"
    if _is_ti(runtime.base.predictor.model):
        return runtime.base.predictor.model, f"base {runtime.base.version}"
    released = settings.model_dir / "efficient_sam_vitt.pt"
    if released.is_file():
        return load_model(released, device), f"checkpoint {released.name}"
    logger.warning(
        "SAMI: no Ti checkpoint (SAMI_STUDENT, MODEL_DIR/efficient_sam_vitt.pt): the "
        "student starts from random weights"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_efficient_sam("ti")
    return model.to(device).eval(), "random weights (seed 0)"


@dataclass
class _Image:
    """A downloaded task image kept for the run: the model's input pixels, and the teacher's
    embedding (float16, only for distil/agreement images)."""

    pixels: np.ndarray
    target: torch.Tensor | None


def run_sami(
    runtime: ModelRuntime, project: str, trigger: str, takes_annotation_count: bool = True
) -> dict:
    """sync (LS API: the annotations and every task's image) -> plan (:func:`plan_images`) ->
    images and teacher embeddings (the shared cache) -> agreement of the student at init ->
    SAMI (masked, then aligned) -> agreement after -> the decoder fine-tune on the student's
    embeddings -> mIoU of the served version and of the candidate on the held-out tasks ->
    promote (:func:`sami_decision`) or reject, with the reason, in the project's history.
    Returns the run's summary (``status``: promoted / rejected / skipped).

    As in the decoder fine-tune: too few annotated tasks skip the run, a task whose image or
    annotation cannot be had is skipped and reported, the job is retried only until training
    starts, and the project's trigger count is forgotten only when the run ends (and only by
    a run that ``takes_annotation_count``: not the timed one of a fine-tune project)."""
    import torch

    from efficientsam.training import FineTuner, TrainingConfig, TrainingImage, evaluate
    from efficientsam.training.data import embed_image
    from efficientsam.training.sami import SamiConfig, SamiDistiller, held_out_metrics
    from efficientsam.utils import input_pixels

    settings = runtime.settings
    progress = Progress(runtime, project, mode="sami")
    attempts = Attempts(progress.job, settings.redis_key_prefix)
    attempts.check()
    progress.mark_started()
    started = time.perf_counter()
    if takes_annotation_count:
        runtime.project_state.training_started(project)
    progress("sync", trigger=trigger)
    api = runtime.labelstudio
    config = parse_label_config(api.project(int(project)).label_config)
    tasks, skipped = sync_annotations(api.annotated_tasks(int(project)), config)
    too_few = skip_if_too_few_tasks(
        runtime, project, trigger, len(tasks), skipped, progress, takes_annotation_count
    )
    if too_few is not None:
        return too_few
    annotated = {t.task_id: t for t in tasks}
    urls = {t.task_id: t.image_url for t in tasks}
    for task in api.tasks(int(project), fields="task_only"):
        if int(task["id"]) in urls:
            continue
        try:
            urls[int(task["id"])] = image_url(task, config)
        except TaskError as error:
            skipped.append({"task": task["id"], "reason": str(error)})
    plan = plan_images(
        list(urls), list(annotated), settings.train_held_out_fraction, settings.sami_max_images
    )

    current = runtime.served_model(project)
    teacher = choose_teacher(runtime, project, current)
    with_target = set(plan.distil) | set(plan.agreement)
    images: dict[int, _Image] = {}
    needed = plan.needed()
    progress("images", total=len(needed), teacher=teacher.version)
    for index, task_id in enumerate(needed):
        try:
            loaded = runtime.load_image(urls[task_id], task_id)
        except ImageError as error:
            logger.warning("project %s: task %s skipped: %s", project, task_id, error)
            skipped.append({"task": task_id, "reason": f"image: {error}"})
            continue
        target = None
        if task_id in with_target:  # the shared cache has it for every image clicked on
            embedding = runtime.embed(teacher, loaded).embeddings
            target = embedding.detach().to("cpu", torch.float16, copy=True)
        images[task_id] = _Image(input_pixels(loaded.array, INPUT_SIDE), target)
        progress("images", done=index + 1, total=len(needed))
    finetune_ids = [i for i in plan.finetune if i in images]
    evaluate_ids = [i for i in plan.evaluate if i in images]
    if not (finetune_ids and evaluate_ids):  # one side's images all failed: split what is left
        from efficientsam.training import split_by_task

        have = [str(i) for i in sorted(finetune_ids + evaluate_ids, reverse=True)]
        train_a, held_a = split_by_task(have, settings.train_held_out_fraction, seed=0)
        finetune_ids, evaluate_ids = [int(i) for i in train_a], [int(i) for i in held_a]
    distil_ids = [i for i in plan.distil if i in images]
    agreement_ids = [i for i in plan.agreement if i in images]
    if len(finetune_ids) + len(evaluate_ids) < max(2, settings.train_min_tasks) or not (
        evaluate_ids and finetune_ids and distil_ids and agreement_ids
    ):  # nothing trained yet: RQ retries the job
        raise RuntimeError(
            f"project {project}: too few images could be downloaded for a SAMI run "
            f"({len(distil_ids)} to learn from, {len(agreement_ids)} held out, "
            f"{len(finetune_ids)}+{len(evaluate_ids)} annotated): "
            + "; ".join(f"task {e['task']}: {e['reason']}" for e in skipped[-5:])
        )

    teacher_model = teacher.predictor.model
    student, student_init = choose_student(runtime, current)
    held_pixels = [images[i].pixels for i in agreement_ids]
    held_targets = [images[i].target for i in agreement_ids]
    progress("agreement", when="before", images=len(held_pixels))
    before = held_out_metrics(student.image_encoder, teacher_model, held_pixels, held_targets)
    attempts.training_started()  # from here on this job is never run again

    sami_config = SamiConfig(
        steps=settings.sami_steps,
        align_steps=settings.sami_align_steps,
        batch_size=settings.sami_batch_size,
        mask_ratio=settings.sami_mask_ratio,
        seed=0,
    )
    distiller = SamiDistiller(student, sami_config)
    runtime.yield_to_clicks([*distiller.encoder.blocks, *distiller.decoder.blocks])
    sami_report = distiller.fit(
        [images[i].pixels for i in distil_ids],
        [images[i].target for i in distil_ids],
        progress=lambda entry: progress(
            entry["stage"], step=entry["step"], steps=entry["steps"], loss=entry["loss"]
        ),
    )
    distilled = distiller.result_model(teacher_model).to(teacher_model.device)
    runtime.yield_to_clicks([*distilled.image_encoder.blocks, distilled.mask_decoder])
    del distiller
    progress("agreement", when="after", images=len(held_pixels))
    after = held_out_metrics(distilled.image_encoder, teacher_model, held_pixels, held_targets)
    logger.info(
        "project %s: SAMI held-out mask agreement with %s %.3f -> %.3f (%d images, %.0f s)",
        project,
        teacher.version,
        before["mask_agreement"],
        after["mask_agreement"],
        len(distil_ids),
        sami_report.sami_seconds + sami_report.align_seconds,
    )

    progress("embed", tasks=len(finetune_ids) + len(evaluate_ids))
    lora = settings.train_lora_rank > 0

    def training_image(task_id: int, keep_pixels: bool) -> TrainingImage:
        pixels = images[task_id].pixels
        return TrainingImage(
            image_id=str(task_id),
            embedding=embed_image(distilled, pixels),
            masks=annotated[task_id].masks_at((INPUT_SIDE, INPUT_SIDE)),
            image=pixels if keep_pixels else None,
        )

    train_images = [training_image(i, lora) for i in finetune_ids]
    held_out = [training_image(i, True) for i in evaluate_ids]
    training_config = TrainingConfig(seed=0, lora_rank=settings.train_lora_rank)
    if settings.train_steps > 0:
        training_config.steps = settings.train_steps
    tuner = FineTuner(distilled, training_config)
    finetune_report = tuner.fit(train_images, progress=lambda values: progress("train", **values))
    if lora:  # the fine-tune moved the encoder too: the gate measures the one that is served
        progress("agreement", when="after fine-tune", images=len(held_pixels))
        after = held_out_metrics(
            tuner.model.image_encoder, teacher_model, held_pixels, held_targets
        )

    progress("evaluate")
    current_metrics = metrics_summary(
        evaluate(current.predictor.model, held_out, encode_images=True)
    )
    base_metrics = (
        current_metrics
        if current.version == runtime.base.version
        else metrics_summary(evaluate(runtime.base.predictor.model, held_out, encode_images=True))
    )
    candidate_metrics = metrics_summary(evaluate(tuner.model, held_out, encode_images=True))
    promote, reason = sami_decision(
        current_metrics, candidate_metrics, after["mask_agreement"], settings
    )
    seconds_per_step = {
        "sami": sami_report.seconds_per_step("sami"),
        "align": sami_report.seconds_per_step("align"),
    }
    details = {
        "trigger": trigger,
        "mode": "sami",
        "parent": current.version,
        "teacher": teacher.version,
        "student_init": student_init,
        "data_snapshot": snapshot_hash([annotated[i] for i in finetune_ids + evaluate_ids]),
        "tasks": {"train": len(finetune_ids), "held_out": len(evaluate_ids)},
        "images": {"distil": len(distil_ids), "held_out": len(agreement_ids)},
        "skipped_tasks": skips_report(skipped),
        "metrics": {
            "base": base_metrics,
            "current": current_metrics,
            "candidate": candidate_metrics,
        },
        "agreement": {"before": before, "after": after},
        "sami": {
            "steps": sami_config.steps,
            "align_steps": sami_config.align_steps,
            "seconds": round(sami_report.sami_seconds + sami_report.align_seconds, 1),
            "seconds_per_step": seconds_per_step,
        },
        "training": {
            "steps": finetune_report.steps,
            "seconds": round(finetune_report.seconds, 1),
        },
    }
    if promote:
        state = {k: v.detach().cpu() for k, v in tuner.model.state_dict().items()}
        metadata = {
            **{k: details[k] for k in ("parent", "teacher", "student_init", "data_snapshot")},
            "method": "sami",
            "standalone": True,
            "metrics": details["metrics"],
            "agreement": details["agreement"],
            "sami": details["sami"],
            "config": {"sami": sami_report.config, "finetune": finetune_report.config},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "trained": [
                "image_encoder",
                *sorted(
                    {key.split(".", 1)[0] for key in tuner.changed_tensors()} - {"image_encoder"}
                ),
            ],
        }
        version = runtime.registry.store_version(
            project,
            runtime.base_version,
            state,
            metadata,
            kind="sami",
            weights_version=checkpoint_version(state),
        )
        result = promote_unless_stale(runtime, project, version, current, details, reason)
    else:
        runtime.registry.reject(project, f"SAMI candidate of {current.version}", reason, details)
        result = {"status": "rejected", "reason": reason}
        logger.info("project %s: SAMI candidate rejected: %s", project, reason)
    if takes_annotation_count:
        runtime.project_state.training_succeeded(project)
    seconds = time.perf_counter() - started
    progress.finish(
        result=result["status"],
        current_miou=held_out_score(current_metrics),
        candidate_miou=held_out_score(candidate_metrics),
        agreement=after["mask_agreement"],
        seconds=round(seconds, 1),
    )
    return {"project": project, **result, **details, "seconds": round(seconds, 1)}

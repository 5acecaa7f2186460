"""Job functions: the model work behind the backend, run by RQ workers or in the server process.

:data:`JOBS` is the only way in: a job name -> its function, request struct (serving/requests.py)
and queue (the contract: :class:`JobSpec`).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from serving.labelstudio.context import PromptError
from serving.labelstudio.images import ImageError
from serving.labelstudio.label_config import LabelConfigError, OutputControl
from serving.labelstudio.results import mask_results, resize_mask
from serving.requests import (
    AutolabelRequest,
    BoxSpec,
    ErrorResult,
    FinetuneRequest,
    HousekeepingRequest,
    HousekeepingResult,
    PrewarmRequest,
    PrewarmResult,
    SamiRequest,
    SegmentRequest,
    parse_request,
)
from serving.runtime import VersionUnavailable

if TYPE_CHECKING:
    from serving.runtime import ModelRuntime

logger = logging.getLogger(__name__)

_runtime: ContextVar[ModelRuntime | None] = ContextVar("efficientsam_runtime", default=None)
EXPECTED_ERRORS = (ImageError, PromptError, LabelConfigError, ValueError, VersionUnavailable)


class TaskFailed(RuntimeError):
    """A queued batch task that produced no prediction (the reason is the message)."""


@contextlib.contextmanager
def use_runtime(runtime: ModelRuntime) -> Iterator[None]:
    """Make ``runtime`` the one job functions use when none is passed (set by the worker)."""
    token = _runtime.set(runtime)
    try:
        yield
    finally:
        _runtime.reset(token)


def _resolve(runtime: ModelRuntime | None) -> ModelRuntime:
    runtime = runtime or _runtime.get()
    if runtime is None:
        raise RuntimeError("no model runtime: run jobs in `python -m worker` or pass runtime=")
    return runtime


def _error(error: Exception) -> dict:
    return msgspec.to_builtins(ErrorResult(error=str(error), status=getattr(error, "status", 422)))


def segment(payload: SegmentRequest | dict, runtime: ModelRuntime | None = None) -> dict:
    """One interactive prompt -> one LS prediction ``{"result", "score", "model_version",
    "timings", "info"?}`` with the best mask at the request's ``size``."""
    request = parse_request(payload, SegmentRequest)
    runtime = _resolve(runtime)
    started = time.perf_counter()
    size = request.size
    try:
        output = request.output.control()
        label = output.label_for(request.label)
        served = runtime.served_model(request.project, request.model_version)
        image = runtime.load_image(request.image, request.task)
        prompt = request.prompt.in_image(size, image.size)
    except EXPECTED_ERRORS as error:
        return _error(error)
    # One ambiguous click: 3 candidates, keep the best; boxes/several clicks: one mask.
    multimask = prompt.box is None and len(prompt.points) == 1
    (found,), embedding, decoder_seconds = runtime.segment(served, image, [prompt], multimask)
    entry = {
        "result": mask_results(resize_mask(found.mask, size), output, label, found.score),
        "score": round(found.score, 6),
        "model_version": served.version,
        "timings": {
            "encoder": 0.0 if embedding.from_cache else embedding.encoder_seconds,
            "decoder": decoder_seconds,
        },
    }
    entry["timings"]["job"] = time.perf_counter() - started  # all of it, RLE included
    dropped_items = request.dropped_items
    if found.dropped_points or dropped_items:
        entry["info"] = (
            f"EfficientSAM takes 6 prompt tokens: dropped {found.dropped_points} older click(s) "
            f"and {dropped_items} older rectangle(s)"
        )
    return entry


def prewarm(payload: PrewarmRequest | dict, runtime: ModelRuntime | None = None) -> dict:
    """Compute (or find) the embedding of a task's image, so the first click is fast."""
    request = parse_request(payload, PrewarmRequest)
    runtime = _resolve(runtime)
    try:
        served = runtime.served_model(request.project)
        image = runtime.load_image(request.image, request.task)
    except EXPECTED_ERRORS as error:
        return _error(error)
    embedding = runtime.embed(served, image)
    if not embedding.from_cache:
        logger.info("prewarmed task %s in %.2f s", request.task, embedding.encoder_seconds)
    result = PrewarmResult(
        task=request.task, cached=embedding.from_cache, encoder_seconds=embedding.encoder_seconds
    )
    return msgspec.to_builtins(result)


def autolabel(payload: AutolabelRequest | dict, runtime: ModelRuntime | None = None) -> dict:
    """A task's prediction without prompts: its rectangles as masks (boxes), or automatic masks
    (everything); ``auto`` picks boxes when the task has rectangles. Returns the prediction, or
    with ``write_back`` a summary of the prediction written to LS (none when the task already
    has one of that version); a failure then fails the job (TaskFailed: RQ retries it)."""
    request = parse_request(payload, AutolabelRequest)
    runtime = _resolve(runtime)
    task = request.task
    task_id = task.id
    mode = request.mode
    write_back = request.write_back
    started = time.perf_counter()
    try:
        output = request.output.control()
        served = runtime.served_model(request.project, request.model_version)
        if write_back and runtime.labelstudio.prediction_exists(task_id, served.version):
            return {"task": task_id, "status": "exists", "model_version": served.version}
        boxes = task.boxes
        if not boxes and mode == "boxes":
            return {"task": task_id, "skipped": "no rectangles to turn into masks"}
        image = runtime.load_image(task.image, task_id)
        if boxes and mode in ("boxes", "auto"):
            result, scores = _boxes_to_masks(runtime, served, image, boxes, output)
        else:
            result, scores = _automatic_masks(
                runtime, served, image, output, request.points_per_side
            )
    except EXPECTED_ERRORS as error:
        logger.warning("task %s: no prediction: %s", task_id, error)
        if write_back:  # a queued job: fail it, so RQ retries (bounded) and then reports it
            raise TaskFailed(f"task {task_id}: {error}") from error
        return {"task": task_id, **_error(error)}
    entry = {
        "result": result,
        "score": round(statistics.fmean(scores), 6) if scores else 0.0,
        "model_version": served.version,
    }
    seconds = time.perf_counter() - started
    if not write_back:
        return entry
    # Checked again right before the write: another worker may have run this job meanwhile (a
    # retry after this worker lost Redis for longer than a heartbeat TTL).
    if runtime.labelstudio.prediction_exists(task_id, served.version):
        return {"task": task_id, "status": "exists", "model_version": served.version}
    prediction = runtime.labelstudio.create_prediction(
        task_id, entry["result"], entry["score"], served.version
    )
    logger.info(
        "task %s: prediction %s with %d region(s), score %.3f, %.2f s",
        task_id,
        prediction,
        len(result),
        entry["score"],
        seconds,
    )
    return {
        "task": task_id,
        "status": "written",
        "prediction": prediction,
        "regions": len(result),
        "score": entry["score"],
        "model_version": served.version,
        "seconds": round(seconds, 3),
    }


def housekeeping(payload: HousekeepingRequest | dict, runtime: ModelRuntime | None = None) -> dict:
    """Periodic upkeep (``python -m worker cron``): forget shared-cache entries that expired and
    re-publish the model registry to Redis if it was lost."""
    parse_request(payload, HousekeepingRequest)
    runtime = _resolve(runtime)
    shared = getattr(runtime.cache, "shared", None)
    pruned = shared.prune_expired() if shared is not None else 0
    republished = runtime.republish()
    return msgspec.to_builtins(
        HousekeepingResult(pruned_cache_entries=pruned, republished_registry=republished)
    )


def _boxes_to_masks(runtime, served, image, boxes: list[BoxSpec], output: OutputControl):
    """One mask per rectangle, with the rectangle's label, at the rectangle's image size."""
    width, height = image.size
    prompts = [item.in_image(image.size) for item in boxes]
    # The decoder upscales every prompt's logits to the image at once (5 bytes a pixel):
    # boxes go in chunks of at most BOX_CHUNK_PIXELS mask pixels, each encoded, then dropped.
    chunk = max(1, runtime.settings.box_chunk_pixels // (width * height))
    result, scores = [], []
    for start in range(0, len(prompts), chunk):
        found, _, _ = runtime.segment(served, image, prompts[start : start + chunk], False)
        for segmentation, item in zip(found, boxes[start : start + chunk], strict=True):
            mask = resize_mask(segmentation.mask, item.size)
            label = output.label_for(item.label)
            result += mask_results(mask, output, label, segmentation.score)
            scores.append(segmentation.score)
    return result, scores


def _automatic_masks(runtime, served, image, output: OutputControl, points_per_side: int):
    """Segment everything; every mask gets the output control's first label. The masks come as
    COCO RLE and are decoded one at a time, so the peak memory is O(image pixels), not
    O(masks x pixels). They are at the downloaded image's size, which is the size LS shows."""
    masks = runtime.automatic_masks(served, image, points_per_side)
    label = output.label_for(None)
    result, scores = [], []
    for mask in masks:
        result += mask_results(mask.binary_mask(), output, label, mask.predicted_iou)
        scores.append(mask.predicted_iou)
    return result, scores


# -- fine-tuning ----------------------------------------------------------------------------------
def finetune(payload: FinetuneRequest | dict, runtime: ModelRuntime | None = None) -> dict:
    """Fine-tune the project's model on its annotations; promote the candidate only if it beats
    the version served now on held-out tasks by ``TRAIN_PROMOTION_MARGIN``.

    Returns a summary (``status``: promoted / rejected / skipped). Steps: a full sync of the
    project's annotations from the LS API (LS is the source of truth), a deterministic train /
    held-out split by task, embeddings from the frozen encoder (through the shared cache),
    training (``efficientsam.training``), the same held-out prompts for the served version and
    the candidate, then promotion (a new version under MODEL_DIR, announced to every worker and
    to /setup) or rejection with the reason, both recorded in the project's history. Progress
    goes to the RQ job's meta, the log and the backend's /metrics."""
    request = parse_request(payload, FinetuneRequest)
    runtime = _resolve(runtime)
    from serving.training_run import run_finetune

    return run_finetune(runtime, request.project, request.trigger)


def sami(payload: SamiRequest | dict, runtime: ModelRuntime | None = None) -> dict:
    """SAMI in the product: the project's served model teaches a Ti student on the project's
    images (masked pretraining on 25% of the tokens, then unmasked alignment), the decoder
    fine-tune continues from the student on the project's annotations, and the result is
    promoted (``...+p<project>-sami<n>``) only if it passes both held-out gates: mIoU against
    the served model (``SAMI_MIOU_MARGIN``) and mask agreement with the teacher
    (``SAMI_MIN_AGREEMENT``). Returns a summary like :func:`finetune`'s."""
    request = parse_request(payload, SamiRequest)
    runtime = _resolve(runtime)
    from serving.sami_run import run_sami

    return run_sami(runtime, request.project, request.trigger, request.takes_annotation_count)


# -- the table -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSpec:
    """A job: ``function(request, runtime=None) -> dict``, its request struct and its queue.

    The function takes its request (the struct, or the JSON of one from Redis, validated: a
    malformed one fails the job with InvalidRequest) and returns a JSON-serialisable dict (numpy
    arrays allowed: brush RLE). The runtime is ``runtime=`` (embedded) or the worker's
    (:func:`use_runtime`). Expected failures come back as an ``ErrorResult`` (``{"error",
    "status"}``: LS gets a clear 4xx/5xx; a queued ``autolabel`` raises TaskFailed instead, so RQ
    retries it); anything else fails the job. A request's ``model_version`` is served exactly,
    else it is an error: never another version's prediction."""

    function: Callable[..., dict]  # called with the request's JSON (and runtime= embedded)
    request: type[msgspec.Struct]
    queue: str  # interactive (clicks: first), batch, train


JOBS: dict[str, JobSpec] = {
    "segment": JobSpec(segment, SegmentRequest, "interactive"),
    "autolabel": JobSpec(autolabel, AutolabelRequest, "batch"),
    "prewarm": JobSpec(prewarm, PrewarmRequest, "batch"),
    "finetune": JobSpec(finetune, FinetuneRequest, "train"),
    "sami": JobSpec(sami, SamiRequest, "train"),
    "housekeeping": JobSpec(housekeeping, HousekeepingRequest, "batch"),
}


def job_spec(name: str, request: msgspec.Struct) -> JobSpec:
    """The table's entry for job ``name``, checked against ``request`` (the calling side)."""
    spec = JOBS.get(name)
    if spec is None:
        raise KeyError(f"no job {name!r}; the jobs are {', '.join(JOBS)}")
    if not isinstance(request, spec.request):
        raise TypeError(f"job {name!r} takes a {spec.request.__name__}, not {type(request)}")
    return spec


def import_path(function: Callable) -> str:
    """The name RQ records for a job function (``serving.jobs.segment``)."""
    return f"{function.__module__}.{function.__qualname__}"

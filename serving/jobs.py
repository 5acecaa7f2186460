"""Job functions: the model work behind the backend, run by RQ workers or in the server process.

Every function takes one JSON-serialisable ``request`` dict (built by ``backend/service.py``)
and returns a JSON-serialisable dict (numpy arrays allowed: brush RLE). The model runtime is the
``runtime`` argument (the embedded backend passes its own) or, in an RQ worker, the one the
worker process installed for the job (:func:`use_runtime`). Expected failures (an image that
cannot be had, a bad prompt) come back as ``{"error": message, "status": http status}`` so the
caller can answer Label Studio with a clear 4xx; anything else raises and fails the job.

Requests:

* ``segment``: ``{"project", "task", "image": url, "size": [w, h], "prompt": {"points":
  [[x, y], ...], "labels": [1|0, ...], "box": [x0, y0, x1, y1] | null} (pixels of size),
  "output": {"tag", "name", "to_name", "labels"}, "label", "dropped_items", "model_version"}``
  -> one LS prediction ``{"result", "score", "model_version", "info"?}`` with the best mask at
  ``size``.
* ``autolabel``: ``{"project", "task": {"id", "image", "boxes": [{"box", "size", "label"}]},
  "mode": "auto"|"boxes"|"everything", "points_per_side", "output", "model_version",
  "write_back": bool}`` -> the task's prediction (``write_back`` false), or, written to LS
  through the API (skipped when the task already has one of that version), a summary.
* ``prewarm``: ``{"project", "task", "image"}`` -> the image's embedding is computed and cached.

``model_version`` (what LS asked for: ``/setup``'s answer) is served exactly, whatever the
project's current version is by the time the job runs; a version that cannot be served is an
error with the reason (a failed, retried job for ``autolabel`` written back), never a prediction
of another version. Without it, the project's current version is served.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING

from serving.labelstudio.context import PromptError
from serving.labelstudio.images import ImageError
from serving.labelstudio.label_config import LabelConfigError, OutputControl
from serving.labelstudio.results import mask_results, resize_mask
from serving.runtime import VersionUnavailable

if TYPE_CHECKING:
    from serving.runtime import ModelRuntime

logger = logging.getLogger(__name__)

_runtime: ContextVar[ModelRuntime | None] = ContextVar("efficientsam_runtime", default=None)
EXPECTED_ERRORS = (ImageError, PromptError, LabelConfigError, ValueError, VersionUnavailable)
BOX_CHUNK_PIXELS = 16_000_000  # rectangles -> masks: at most this many mask pixels at once


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
    return {"error": str(error), "status": getattr(error, "status", 422)}


def _prompt(spec: dict, size: tuple[int, int], image_size: tuple[int, int]):
    """The request's prompt (pixels of ``size``) in pixels of the downloaded image."""
    from efficientsam.prompts import Prompt

    sx, sy = image_size[0] / size[0], image_size[1] / size[1]
    points = [[x * sx, y * sy] for x, y in spec.get("points") or []]
    box = spec.get("box")
    if box is not None:
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return Prompt.create(points or None, spec.get("labels") or None, box)


def segment(request: dict, runtime: ModelRuntime | None = None) -> dict:
    """One interactive prompt -> the best mask as LS result items (see module docstring)."""
    runtime = _resolve(runtime)
    started = time.perf_counter()
    try:
        output = OutputControl(**request["output"])
        label = output.label_for(request.get("label"))
        size = (int(request["size"][0]), int(request["size"][1]))
        served = runtime.served_model(request.get("project"), request.get("model_version"))
        image = runtime.load_image(request["image"], request.get("task"))
        prompt = _prompt(request["prompt"], size, image.size)
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
    dropped_items = int(request.get("dropped_items") or 0)
    if found.dropped_points or dropped_items:
        entry["info"] = (
            f"EfficientSAM takes 6 prompt tokens: dropped {found.dropped_points} older click(s) "
            f"and {dropped_items} older rectangle(s)"
        )
    return entry


def prewarm(request: dict, runtime: ModelRuntime | None = None) -> dict:
    """Compute (or find) the embedding of a task's image, so the first click is fast."""
    runtime = _resolve(runtime)
    try:
        served = runtime.served_model(request.get("project"))
        image = runtime.load_image(request["image"], request.get("task"))
    except EXPECTED_ERRORS as error:
        return _error(error)
    embedding = runtime.embed(served, image)
    if not embedding.from_cache:
        logger.info("prewarmed task %s in %.2f s", request.get("task"), embedding.encoder_seconds)
    return {
        "task": request.get("task"),
        "cached": embedding.from_cache,
        "encoder_seconds": embedding.encoder_seconds,
    }


def autolabel(request: dict, runtime: ModelRuntime | None = None) -> dict:
    """A task's prediction without prompts: its rectangles as masks (boxes), or automatic masks
    (everything); ``auto`` picks boxes when the task has rectangles. See module docstring."""
    runtime = _resolve(runtime)
    task = request["task"]
    task_id = task.get("id")
    mode = request.get("mode", "auto")
    write_back = bool(request.get("write_back"))
    started = time.perf_counter()
    try:
        output = OutputControl(**request["output"])
        served = runtime.served_model(request.get("project"), request.get("model_version"))
        if write_back and runtime.labelstudio.prediction_exists(task_id, served.version):
            return {"task": task_id, "status": "exists", "model_version": served.version}
        boxes = task.get("boxes") or []
        if not boxes and mode == "boxes":
            return {"task": task_id, "skipped": "no rectangles to turn into masks"}
        image = runtime.load_image(task["image"], task_id)
        if boxes and mode in ("boxes", "auto"):
            result, scores = _boxes_to_masks(runtime, served, image, boxes, output)
        else:
            result, scores = _automatic_masks(runtime, served, image, output, request)
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


def housekeeping(request: dict, runtime: ModelRuntime | None = None) -> dict:
    """Periodic upkeep (``python -m worker cron``): forget shared-cache entries that expired and
    re-publish the model registry to Redis if it was lost."""
    runtime = _resolve(runtime)
    shared = getattr(runtime.cache, "shared", None)
    pruned = shared.prune_expired() if shared is not None else 0
    republished = runtime.republish()
    return {"pruned_cache_entries": pruned, "republished_registry": republished}


def _boxes_to_masks(runtime, served, image, boxes: list[dict], output: OutputControl):
    """One mask per rectangle, with the rectangle's label, at the rectangle's image size."""
    from efficientsam.prompts import Prompt

    width, height = image.size
    prompts = []
    for item in boxes:
        box_width, box_height = item["size"]
        sx, sy = width / box_width, height / box_height
        x0, y0, x1, y1 = item["box"]
        prompts.append(Prompt.create(box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)))
    # The decoder upscales every prompt's logits to the image at once (5 bytes a pixel):
    # boxes go in chunks of at most BOX_CHUNK_PIXELS mask pixels, each encoded, then dropped.
    chunk = max(1, BOX_CHUNK_PIXELS // (width * height))
    result, scores = [], []
    for start in range(0, len(prompts), chunk):
        found, _, _ = runtime.segment(served, image, prompts[start : start + chunk], False)
        for segmentation, item in zip(found, boxes[start : start + chunk], strict=True):
            mask = resize_mask(segmentation.mask, tuple(item["size"]))
            label = output.label_for(item.get("label"))
            result += mask_results(mask, output, label, segmentation.score)
            scores.append(segmentation.score)
    return result, scores


def _automatic_masks(runtime, served, image, output: OutputControl, request: dict):
    """Segment everything; every mask gets the output control's first label. The masks come as
    COCO RLE and are decoded one at a time, so the peak memory is O(image pixels), not
    O(masks x pixels). They are at the downloaded image's size, which is the size LS shows."""
    masks = runtime.automatic_masks(served, image, int(request.get("points_per_side") or 0))
    label = output.label_for(None)
    result, scores = [], []
    for mask in masks:
        result += mask_results(mask.binary_mask(), output, label, mask.predicted_iou)
        scores.append(mask.predicted_iou)
    return result, scores


# -- fine-tuning ----------------------------------------------------------------------------------
def finetune(request: dict, runtime: ModelRuntime | None = None) -> dict:
    """Fine-tune the project's model on its annotations; promote the candidate only if it beats
    the version served now on held-out tasks by ``TRAIN_PROMOTION_MARGIN``.

    ``{"project", "trigger"}`` -> a summary (``status``: promoted / rejected / skipped). Steps:
    a full sync of the project's annotations from the LS API (LS is the source of truth), a
    deterministic train / held-out split by task, embeddings from the frozen encoder (through
    the shared cache), training (``efficientsam.training``), the same held-out prompts for the
    served version and the candidate, then promotion (a new version under MODEL_DIR, announced
    to every worker and to /setup) or rejection with the reason, both recorded in the project's
    history. Progress goes to the RQ job's meta, the log and the backend's /metrics."""
    runtime = _resolve(runtime)
    from serving.training_run import run_finetune

    return run_finetune(runtime, str(request["project"]), request.get("trigger", "manual"))


def schedule_training(request: dict, runtime: ModelRuntime | None = None) -> dict:
    """Periodic trigger (``python -m worker cron``): queue a fine-tune for every project with at
    least ``TRAIN_MIN_NEW_ANNOTATIONS`` annotations saved since its last run."""
    runtime = _resolve(runtime)
    from serving.requests import submit_finetune
    from serving.transports import QueueTransport

    threshold = runtime.settings.train_min_new_annotations
    transport = QueueTransport(runtime.settings)
    queued = {}
    for project in runtime.project_state.projects():
        count = runtime.project_state.new_annotations(project)
        if count >= threshold:
            queued[project] = submit_finetune(transport, project, f"{count} new annotations")
    if queued:
        logger.info("queued fine-tunes for projects %s", ", ".join(queued))
    return {"queued": queued, "threshold": threshold}

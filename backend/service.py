"""The segmentation work behind /predict, embedded in the server process.

``SegmentationService`` is what the routes see. This module's implementation holds the model
in-process (the embedded default: no Redis); the worker issue adds a transport that runs the
same functions in RQ workers. The model loads in a background thread at start-up; the version
string is computed before the server accepts requests (it only needs the checkpoint's tensors).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efficientsam.build import infer_variant, load_model, load_state_dict_file, tensors_fingerprint
from efficientsam.cache import InMemoryEmbeddingCache
from efficientsam.predictor import Predictor
from efficientsam.prompts import Prompt

from .context import InteractivePrompt, PromptError, parse_context, rectangle_box
from .images import ImageError, ImageLoader, LoadedImage
from .label_config import LabelConfigError, ProjectConfig, parse_label_config
from .metrics import Metrics
from .results import mask_results
from .settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_NAMES = (
    "efficient_sam_vitt.pt",
    "efficient_sam_vits.pt.zip",
    "efficient_sam_vits.pt",
    "efficient_sam_vitt.safetensors",
)


class ServiceError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status, message for LS."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def find_checkpoint(settings: Settings) -> Path:
    """The configured checkpoint, or a known file name under MODEL_DIR."""
    if settings.checkpoint is not None:
        return Path(settings.checkpoint)
    for name in DEFAULT_CHECKPOINT_NAMES:
        candidate = Path(settings.model_dir) / name
        if candidate.is_file():
            return candidate
    raise ServiceError(
        f"no checkpoint: pass --checkpoint PATH (or CHECKPOINT=...), or put one of "
        f"{', '.join(DEFAULT_CHECKPOINT_NAMES)} in MODEL_DIR={settings.model_dir}",
        500,
    )


def checkpoint_version(path: Path) -> str:
    """Deterministic version: variant + fingerprint of all weights, e.g. efficientsam-ti-1a2b3c4d."""
    state = load_state_dict_file(path)
    return f"efficientsam-{infer_variant(state).name}-{tensors_fingerprint(state)[:8]}"


@dataclass(frozen=True)
class BoxItem:
    box: tuple[float, float, float, float]  # pixels of ``size``
    size: tuple[int, int]  # (width, height) the box's percentages refer to
    label: str | None


def task_rectangles(task: dict, image_name: str) -> list[BoxItem]:
    """Rectangles of a task's latest annotation that has some, else of its latest prediction."""
    for source in ("annotations", "predictions"):
        entries = [e for e in task.get(source) or [] if isinstance(e, dict)]
        entries = [e for e in entries if not e.get("was_cancelled")]
        entries.sort(
            key=lambda e: (str(e.get("updated_at") or e.get("created_at") or ""), e.get("id") or 0),
            reverse=True,
        )
        for entry in entries:
            boxes = []
            for item in entry.get("result") or []:
                if not isinstance(item, dict) or item.get("type") != "rectanglelabels":
                    continue
                if item.get("to_name") not in (None, image_name):
                    continue
                width, height = item.get("original_width"), item.get("original_height")
                if not (
                    isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
                ):
                    continue
                value = item.get("value") or {}
                labels = value.get("rectanglelabels") or value.get("labels") or [None]
                boxes.append(
                    BoxItem(rectangle_box(value, width, height), (width, height), labels[0])
                )
            if boxes:
                return boxes
    return []


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) bool mask to size = (width, height)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    from PIL import Image

    return (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    )


class SegmentationService:
    """Embedded transport: model in this process, one computation at a time."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, loader: ImageLoader | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.checkpoint = find_checkpoint(settings)
        started = time.perf_counter()
        self.model_version = checkpoint_version(self.checkpoint)
        logger.info(
            "model version %s (%s, %.2f s)",
            self.model_version,
            self.checkpoint,
            time.perf_counter() - started,
        )
        self.loader = loader or ImageLoader(
            settings.label_studio_url,
            settings.label_studio_api_key,
            settings.max_download_bytes,
            settings.max_image_pixels,
            settings.download_timeout_seconds,
            settings.image_cache_bytes,
        )
        self.cache = InMemoryEmbeddingCache(settings.embedding_cache_bytes)
        self.metrics.watch_cache(self.cache.stats)
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        self._ready = threading.Event()
        # Every torch call (load, encoder, decoder, prewarm) runs on this one thread. PyTorch's
        # CPU parallelism (OpenMP) keeps a team of threads per calling thread; computing from
        # several request threads makes several teams spin against each other for the same
        # cores (measured: a 29 ms click became 37 ms). One thread also serialises the model.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-compute")
        self._prewarm_downloads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prewarm")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._compute.submit(self._load_model)

    def _load_model(self) -> None:
        import torch

        from efficientsam.utils import keep_freed_memory_for_reuse

        started = time.perf_counter()
        try:
            if self.settings.threads > 0:
                torch.set_num_threads(self.settings.threads)
            keep_freed_memory_for_reuse()
            model = load_model(self.checkpoint, device=self.settings.device)
            self.predictor = Predictor(model, cache=self.cache, precision=self.settings.precision)
            logger.info("model ready on %s in %.1f s", model.device, time.perf_counter() - started)
        except Exception as error:  # reported by /health and every /predict
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("model failed to load")
        finally:
            self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.predictor is not None

    def health(self) -> dict:
        device = str(self.predictor.model.device) if self.predictor else None
        return {
            "status": "UP",
            "model_class": "EfficientSam",
            "model_version": self.model_version,
            "model_ready": self.ready,
            "model_error": self.load_error,
            "device": device,
            "transport": "embedded",
        }

    def _require_predictor(self, wait_seconds: float = 60.0) -> Predictor:
        if not self._ready.wait(wait_seconds):
            raise ServiceError("the model is still loading; try again in a moment", 503)
        if self.predictor is None:
            raise ServiceError(f"the model failed to load: {self.load_error}", 503)
        return self.predictor

    def close(self) -> None:
        self._prewarm_downloads.shutdown(wait=False, cancel_futures=True)
        self._compute.shutdown(wait=False, cancel_futures=True)
        self.loader.close()

    # -- /predict ----------------------------------------------------------------------------
    def predict(self, request: dict) -> dict:
        """The /predict body -> ``{"results": [...]}`` (one entry per task, in order)."""
        tasks = request.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise ServiceError("'tasks' must be a non-empty list of task objects", 400)
        try:
            config = parse_label_config(request.get("label_config") or "")
        except LabelConfigError as error:
            raise ServiceError(str(error), 422) from error
        params = request.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        if context:
            if len(tasks) != 1:
                raise ServiceError("an interactive request must carry exactly one task", 400)
            return {"results": [self.interactive(tasks[0], context, config)]}
        return {"results": self.batch(tasks, config)}

    def _image(self, task: dict, config: ProjectConfig) -> LoadedImage:
        data = task.get("data") or {}
        url = data.get(config.image_data_key)
        if not url:
            raise ImageError(f"task {task.get('id')} has no data.{config.image_data_key}")
        return self.loader.load(url, task.get("id"))

    def interactive(self, task: dict, context: dict, config: ProjectConfig) -> dict:
        if not isinstance(context, dict):
            raise ServiceError("params.context must be an object", 400)
        try:
            prompt = parse_context(context.get("result") or [])
        except PromptError as error:
            self.metrics.predictions.labels("interactive", "bad_prompt").inc()
            raise ServiceError(str(error), 422) from error
        if prompt is None:
            return {"result": [], "model_version": self.model_version}
        predictor = self._require_predictor()
        try:
            image = self._image(task, config)
        except ImageError as error:
            self.metrics.predictions.labels("interactive", "image_error").inc()
            raise ServiceError(str(error), error.status) from error
        masks, scores, dropped_points = self._segment(predictor, image, [prompt])
        label = config.output.label_for(prompt.label)
        entry = {
            "result": mask_results(masks[0], config.output, label, scores[0]),
            "score": round(scores[0], 6),
            "model_version": self.model_version,
        }
        if dropped_points[0] or prompt.dropped_items:
            entry["info"] = (
                f"EfficientSAM takes 6 prompt tokens: dropped {dropped_points[0]} older click(s) "
                f"and {prompt.dropped_items} older rectangle(s)"
            )
        self.metrics.predictions.labels("interactive", "ok").inc()
        return entry

    def _segment(
        self, predictor: Predictor, image: LoadedImage, prompts: list[InteractivePrompt | BoxItem]
    ) -> tuple[list[np.ndarray], list[float], list[int]]:
        """Best mask per prompt at the prompt's (browser) size, its score, clicks dropped."""
        width, height = image.size
        model_prompts = []
        for item in prompts:
            if isinstance(item, BoxItem):
                sx, sy = width / item.size[0], height / item.size[1]
                x0, y0, x1, y1 = item.box
                model_prompts.append(Prompt.create(box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)))
            else:
                model_prompts.append(item.scaled_to(width, height))
        # One ambiguous click: 3 candidates, keep the best; boxes/several clicks: single mask.
        multimask = all(p.box is None and len(p.points) == 1 for p in model_prompts)

        def compute() -> tuple:
            embedding = predictor.embed(image.array, image.content_hash)
            return embedding, predictor.decode(
                embedding, model_prompts, multimask, return_best_only=True
            )

        embedding, predictions = self._compute.submit(compute).result()
        if not embedding.from_cache:
            self.metrics.encoder_seconds.observe(embedding.encoder_seconds)
        self.metrics.decoder_seconds.observe(predictions[0].decoder_seconds)
        masks = [
            resize_mask(p.best_mask, item.size)
            for p, item in zip(predictions, prompts, strict=True)
        ]
        return masks, [p.best_score for p in predictions], [p.dropped_points for p in predictions]

    def batch(self, tasks: list[dict], config: ProjectConfig) -> list[dict]:
        """Box-to-mask for tasks with rectangles. Entries without ``result`` are skipped by LS
        (nothing stored, asked again next time): tasks without rectangles, failed tasks and
        tasks left over when the time budget runs out."""
        deadline = time.monotonic() + self.settings.batch_time_budget_seconds
        entries = []
        for task in tasks:
            task_id = task.get("id")
            if time.monotonic() > deadline:
                entries.append(self._skipped("time budget of this request used up; retrieve again"))
                continue
            try:
                boxes = task_rectangles(task, config.image_name)
                if not boxes:
                    if len(tasks) == 1:
                        self.prewarm(task, config)  # the editor is opening it: get ready for clicks
                    entries.append(self._skipped("no rectangles to turn into masks"))
                    continue
                predictor = self._require_predictor()
                image = self._image(task, config)
                masks, scores, _ = self._segment(predictor, image, boxes)
                result = []
                for mask, score, box in zip(masks, scores, boxes, strict=True):
                    result += mask_results(
                        mask, config.output, config.output.label_for(box.label), score
                    )
                entries.append(
                    {
                        "result": result,
                        "score": round(statistics.fmean(scores), 6),
                        "model_version": self.model_version,
                    }
                )
                self.metrics.predictions.labels("batch", "ok").inc()
            except (ImageError, PromptError, ServiceError, LabelConfigError) as error:
                logger.warning("task %s: no prediction: %s", task_id, error)
                self.metrics.predictions.labels("batch", "error").inc()
                entries.append(self._skipped(str(error)))
        return entries

    def _skipped(self, reason: str) -> dict:
        return {"model_version": self.model_version, "skipped": reason}

    def prewarm(self, task: dict, config: ProjectConfig) -> None:
        """Compute the task image's embedding in the background (first click is then fast)."""
        if not self.ready:
            return

        def work() -> None:
            try:
                image = self._image(task, config)  # downloaded here, encoded on the compute thread
                embedding = self._compute.submit(
                    self.predictor.embed, image.array, image.content_hash
                ).result()
                if not embedding.from_cache:
                    self.metrics.encoder_seconds.observe(embedding.encoder_seconds)
                    logger.info(
                        "prewarmed task %s in %.2f s", task.get("id"), embedding.encoder_seconds
                    )
            except Exception as error:  # a background nicety: never fails a request
                logger.info("prewarm of task %s failed: %s", task.get("id"), error)

        self._prewarm_downloads.submit(work)

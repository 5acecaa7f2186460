"""The per-process model holder: base checkpoint, per-project fine-tuned versions, caches, images
(:class:`ModelRuntime`), which the job functions (``serving.jobs``) receive.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from serving.labelstudio.images import ImageLoader, LoadedImage
from serving.projects import MemoryProjectState, RedisProjectState
from serving.registry import ModelRegistry, RegistryError, VersionInfo
from serving.settings import Settings

if TYPE_CHECKING:
    import torch
    from redis import Redis

    from efficientsam.modeling import EfficientSam
    from efficientsam.predictor import ImageEmbedding, Predictor
    from efficientsam.prompts import Prompt

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CHECKPOINT_NAMES = (
    "efficient_sam_vitt.pt",
    "efficient_sam_vits.pt.zip",
    "efficient_sam_vits.pt",
    "efficient_sam_vitt.safetensors",
)


class VersionUnavailable(RuntimeError):
    """A model version this process cannot serve (unknown, another project's, failed to load);
    ``status`` is the HTTP status to report (409: not this project's, 503: cannot be loaded)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class ConfigurationError(Exception):
    """A configuration problem (no checkpoint); ``status`` is the HTTP status to report."""

    def __init__(self, message: str, status: int = 500) -> None:
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
    raise ConfigurationError(
        f"no checkpoint: pass --checkpoint PATH (or CHECKPOINT=...), or put one of "
        f"{', '.join(DEFAULT_CHECKPOINT_NAMES)} in MODEL_DIR={settings.model_dir}"
    )


def checkpoint_version(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Deterministic version of a checkpoint's tensors: variant + fingerprint of all weights,
    e.g. efficientsam-ti-1a2b3c4d."""
    from efficientsam.build import infer_variant
    from efficientsam.checkpoint import tensors_fingerprint

    return f"efficientsam-{infer_variant(state_dict).name}-{tensors_fingerprint(state_dict)[:8]}"


@dataclass(frozen=True)
class ServedModel:
    """The model a project is served with: its version string and a predictor on it.
    ``standalone``: a version whose file holds the whole model (a SAMI student: its encoder is
    not the base's variant), not tensors swapped into the base; ``metadata``: the version's."""

    version: str
    predictor: Predictor
    standalone: bool = False
    metadata: Mapping[str, object] | None = None


@dataclass(frozen=True)
class Segmentation:
    """Best mask of one prompt at the image's size: (H, W) bool, predicted IoU, clicks dropped."""

    mask: np.ndarray
    score: float
    dropped_points: int


class ModelRuntime:
    """Loads the base model, serves projects' versions, owns the caches and the image loader.

    One per process: an RQ worker holds one for its whole life (the model loads once, never a
    fork per job), the embedded backend one in the server process. ``compute``: how torch work
    is run (default: inline in the calling thread, as in a worker; the embedded backend passes
    its single compute thread, serving/compute.py). ``redis``: the shared embedding tier and the
    registry's Redis copy (None in the embedded mode).
    """

    def __init__(
        self,
        settings: Settings,
        redis: Redis | None = None,
        compute: Callable[[Callable[[], T]], T] | None = None,
        loader: ImageLoader | None = None,
        between_steps: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self._compute = compute or (lambda function: function())
        # called between the steps of long model work that no model hook covers (see
        # serving/compute.py): the embedded backend runs waiting clicks there
        self.between_steps = between_steps or (lambda: None)
        self.checkpoint = find_checkpoint(settings)
        self.loader = loader or settings.image_loader()
        self.registry = ModelRegistry(settings.model_dir, redis, settings.redis_key_prefix)
        self.project_state = (
            RedisProjectState(redis, settings.redis_key_prefix)
            if redis is not None
            else MemoryProjectState()
        )
        self.base_version: str | None = None
        self.base: ServedModel | None = None
        self.precision: str | None = None  # the resolved PRECISION, once load() ran
        self.cache = None
        self._versions: OrderedDict[str, ServedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._labelstudio = None
        self._checkpoint_tensors: dict[str, torch.Tensor] | None = None  # read, not yet loaded

    # -- start-up ------------------------------------------------------------------------------
    def read_checkpoint(self) -> str:
        """Read the base checkpoint (its only read: :meth:`load` builds the model from these
        tensors) and return its version."""
        from efficientsam.checkpoint import load_state_dict_file

        if self.base_version is None:
            self._checkpoint_tensors = load_state_dict_file(self.checkpoint)
            self.base_version = checkpoint_version(self._checkpoint_tensors)
        return self.base_version

    def load(self) -> ServedModel:
        """Load the base checkpoint (once), publish its version. Call through :meth:`compute`."""
        import torch

        from efficientsam.build import model_from_state_dict
        from efficientsam.cache import InMemoryEmbeddingCache
        from efficientsam.precision import choose_precision
        from efficientsam.predictor import Predictor
        from efficientsam.utils import keep_freed_memory_for_reuse

        if self.base is not None:
            return self.base
        started = time.perf_counter()
        if self.settings.threads > 0:
            torch.set_num_threads(self.settings.threads)
        keep_freed_memory_for_reuse()
        self.read_checkpoint()
        model = model_from_state_dict(
            self._checkpoint_tensors, self.settings.device, source=self.checkpoint
        )
        hot = InMemoryEmbeddingCache(self.settings.embedding_cache_bytes)
        if self.redis is not None:
            from serving.cache_redis import RedisEmbeddingCache, TieredEmbeddingCache

            shared = RedisEmbeddingCache(
                self.redis,
                self.settings.redis_key_prefix,
                self.settings.shared_cache_bytes,
                self.settings.shared_cache_ttl_seconds,
                self.settings.shared_cache_dtype,
            )
            self.cache = TieredEmbeddingCache(hot, shared, model.device)
        else:
            self.cache = hot
        choice = choose_precision(model, self.settings.precision)
        self.precision = choice.precision
        self.base = ServedModel(self.base_version, Predictor(model, self.cache, self.precision))
        # the model holds its own copies now; until here a failed load() is retried from them
        self._checkpoint_tensors = None
        self.registry.publish_base(
            {
                "version": self.base_version,
                "checkpoint": self.checkpoint.name,
                "device": str(model.device),
                "precision": self.precision,
                "precision_reason": choice.reason,
                "precision_check": choice.check.as_dict() if choice.check else None,
            }
        )
        self.registry.ensure_published()
        self.registry.publish_versions()
        logger.info(
            "model %s ready on %s in %.1f s",
            self.base_version,
            model.device,
            time.perf_counter() - started,
        )
        return self.base

    def compute(self, function: Callable[[], T]) -> T:
        """Run torch work the way this process wants it run (see class docstring)."""
        return self._compute(function)

    # -- versions ------------------------------------------------------------------------------
    def served_model(self, project: str | None, version: str | None = None) -> ServedModel:
        """The model for ``project``: exactly ``version`` when given (the base's, or one of the
        project's stored versions, loaded by name), else the project's promoted version (or the
        base). Never another version: anything that cannot be served raises
        :class:`VersionUnavailable` with the reason, and a version that fails to load is
        reported (log, registry: /health, /metrics). The registry is re-read (a stat) on every
        call, so a promotion or roll-back is served from the next job on, without a restart; a
        loaded version is the base model with its tensors swapped in (:func:`derived_model`)."""
        base = self.base or self.compute(self.load)
        if version is None:
            try:
                version = self.registry.current_version(project) or base.version
            except (RegistryError, OSError, ValueError) as error:
                raise VersionUnavailable(
                    f"the model registry of project {project} cannot be read: {error}"
                ) from error
        if version == base.version:
            return base
        with self._lock:
            served = self._versions.get(version)
            if served is not None:
                self._versions.move_to_end(version)
                return served
        try:
            info = self.registry.version_info(version)
        except (RegistryError, OSError, ValueError) as error:
            raise self._unavailable(version, error) from error
        owner = str(info.metadata.get("project"))
        if project is not None and owner != str(project):
            raise VersionUnavailable(
                f"model version {version} belongs to project {owner}, not {project}", 409
            )
        try:
            served = self.compute(lambda: self._load_version(info))
        except Exception as error:  # reported, never replaced by another version
            raise self._unavailable(version, error) from error
        self.registry.report_version_error(version, None)
        with self._lock:
            self._versions[version] = served
            while len(self._versions) > self.settings.loaded_versions:
                self._versions.popitem(last=False)
        return served

    def _unavailable(self, version: str, error: Exception) -> VersionUnavailable:
        """Log and report (registry: /health, /metrics) a version that cannot be loaded."""
        logger.error("cannot load model version %s: %s", version, error, exc_info=True)
        self.registry.report_version_error(version, f"{type(error).__name__}: {error}")
        return VersionUnavailable(f"model version {version} cannot be loaded: {error}")

    def _load_version(self, info: VersionInfo) -> ServedModel:
        """Base model + the version's tensors; modules with unchanged tensors are shared."""
        from safetensors.torch import load_file

        from efficientsam.predictor import Predictor

        if info.metadata.get("base") != self.base_version:
            raise RegistryError(
                f"version {info.version} was trained from {info.metadata.get('base')}, "
                f"but this worker serves {self.base_version}"
            )
        device = self.base.predictor.model.device
        tensors = load_file(str(info.path), device=str(device))
        standalone = bool(info.metadata.get("standalone"))
        if standalone:  # the whole model (e.g. a SAMI student): built from the file alone
            from efficientsam.build import model_from_state_dict

            model = model_from_state_dict(tensors, device, source=info.path)
            self.yield_to_clicks([*model.image_encoder.blocks, model.mask_decoder])
            logger.info("loaded %s (standalone, %d tensors)", info.version, len(tensors))
        else:
            model = derived_model(self.base.predictor.model, tensors)
            logger.info("loaded %s (%d tensors replaced)", info.version, len(tensors))
        predictor = Predictor(model, self.cache, self.precision)
        return ServedModel(info.version, predictor, standalone, info.metadata)

    def yield_to_clicks(self, modules) -> None:
        """Call :attr:`between_steps` before each of ``modules``' forward passes (torch
        modules): in the embedded backend, background work and training on a model that is not
        the base's (whose parts carry the same hooks) stand back for waiting clicks there too."""
        between_steps = self.between_steps

        def hook(module, args):  # a plain function: deep copies of the module share it
            between_steps()

        for module in modules:
            module.register_forward_pre_hook(hook)

    def republish(self) -> bool:
        """Re-publish the registry to Redis when Redis lost it (a restart); True if it did."""
        if not self.registry.ensure_published():
            return False
        self.registry.publish_versions()
        return True

    # -- work ----------------------------------------------------------------------------------
    def load_image(self, url: str, task_id: int | None = None) -> LoadedImage:
        """Download (bounded, cached per URL) and decode a task's image; I/O, no torch."""
        return self.loader.load(url, task_id)

    def embed(self, served: ServedModel, image: LoadedImage) -> ImageEmbedding:
        return self.compute(lambda: served.predictor.embed(image.array, image.content_hash))

    def segment(
        self, served: ServedModel, image: LoadedImage, prompts: list[Prompt], multimask: bool
    ) -> tuple[list[Segmentation], ImageEmbedding, float]:
        """Best mask per prompt (prompts in pixels of the image); embedding; decoder seconds."""

        def work():
            embedding = served.predictor.embed(image.array, image.content_hash)
            return embedding, served.predictor.decode(
                embedding, prompts, multimask, return_best_only=True
            )

        embedding, predictions = self.compute(work)
        segmentations = [
            Segmentation(p.best_mask, p.best_score, p.dropped_points) for p in predictions
        ]
        seconds = predictions[0].decoder_seconds if predictions else 0.0
        return segmentations, embedding, seconds

    def automatic_masks(self, served: ServedModel, image: LoadedImage, points_per_side: int):
        """ "Segment everything" masks of the image (``efficientsam.automatic``), best first,
        their segmentations as COCO RLE (``AutomaticMask.binary_mask()`` decodes one).
        ``points_per_side`` 0: the device's default grid (:func:`default_points_per_side`)."""
        from efficientsam.automatic import AutomaticMaskGenerator

        device_type = served.predictor.model.device.type
        cuda = device_type == "cuda"
        points_per_side = points_per_side or default_points_per_side(device_type)

        def work():
            embedding = served.predictor.embed(image.array, image.content_hash)
            generator = AutomaticMaskGenerator(  # COCO RLE: ~KBs per mask, not H*W bytes
                served.predictor,
                points_per_side=points_per_side,
                # on a CPU, 4 queries a decoder call (~0.1 s; per query no slower than 16): a
                # click waiting at the next checkpoint (serving/compute.py) waits that long
                points_per_batch=16 if cuda else 4,
                output_mode="coco_rle",
                between_steps=self.between_steps,
            )
            return generator.generate(embedding)

        return self.compute(work)

    @property
    def labelstudio(self):
        """The Label Studio API client (built on first use; needs LABEL_STUDIO_URL + key)."""
        if self._labelstudio is None:
            from serving.labelstudio.api import LabelStudioApi

            self._labelstudio = LabelStudioApi(
                self.settings.label_studio_url, self.settings.label_studio_api_key
            )
        return self._labelstudio

    def close(self) -> None:
        self.loader.close()


def default_points_per_side(device_type: str) -> int:
    """The "segment everything" grid when none is configured (``AUTOLABEL_POINTS_PER_SIDE=0``):
    32x32 on a GPU, 16x16 on a CPU, where one decoder query costs ~30 ms."""
    return 32 if device_type == "cuda" else 16


def derived_model(base: EfficientSam, tensors: dict) -> EfficientSam:
    """A model equal to ``base`` with ``tensors`` (state-dict keys) replaced. Top-level parts
    (image encoder, prompt encoder, mask decoder) without replaced tensors are the base's own
    modules (shared, not copied); so are cached embeddings when the encoder is unchanged (e.g. a
    decoder-only fine-tune): the embedding key holds the encoder's fingerprint."""
    import torch

    unknown = set(tensors) - set(base.state_dict())
    if unknown:
        raise RegistryError(f"unknown tensors in the version file: {sorted(unknown)[:5]}")
    model = copy.copy(base)  # shallow: the parts are replaced below, not mutated
    model._modules = dict(base._modules)
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        prefix = f"{part}."
        changed = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not changed:
            continue
        module = copy.deepcopy(getattr(base, part))
        with torch.no_grad():
            own = module.state_dict()
            for key, value in changed.items():
                own[key].copy_(value.to(own[key].dtype))
        model._modules[part] = module
    return model.eval()

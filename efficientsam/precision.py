"""Which precision the encoder runs in: the bfloat16/float16 fast mode only where the hardware
runs it natively, and only when, on a built-in image, its masks match float32's and it is faster.

``choose_precision(model, "auto")`` is what a server calls once at start-up (a few encoder
passes: ~3 s for Ti on a 2-core CPU); "float32", "bfloat16" and "float16" are taken as given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arrays import mask_iou
from .cache import InMemoryEmbeddingCache
from .checkpoint import tensors_fingerprint
from .modeling import EfficientSam
from .predictor import PRECISIONS, Predictor
from .prompts import Prompt

logger = logging.getLogger(__name__)
# checks on the built-in image, per (device, precision, the model's weights): a process
# that loads the same model again (a test suite, a reload) does not measure it again
_BUILTIN_CHECKS: dict[tuple, PrecisionCheck] = {}

PRECISION_CHOICES = ("auto", *PRECISIONS)
MIN_MEAN_IOU = 0.99  # best-mask IoU against float32, mean over the check's prompts
MIN_SPEEDUP = 1.25  # the fast mode must save at least this ratio of the encoder's time
CHECK_IMAGE_SIZE = (480, 640)  # (H, W) pixels


@dataclass(frozen=True)
class PrecisionCheck:
    """A fast mode measured against float32 on the built-in image.

    mean_iou / min_iou: best-mask IoU against float32 over ``prompts`` prompts;
    float32_seconds / fast_seconds: one encoder pass each, after a warm-up pass.
    """

    precision: str
    mean_iou: float
    min_iou: float
    prompts: int
    float32_seconds: float
    fast_seconds: float

    @property
    def speedup(self) -> float:
        return self.float32_seconds / self.fast_seconds if self.fast_seconds > 0 else 0.0

    @property
    def passed(self) -> bool:
        return self.mean_iou >= MIN_MEAN_IOU and self.speedup >= MIN_SPEEDUP

    def describe(self) -> str:
        return (
            f"{self.precision}: best-mask IoU vs float32 {self.mean_iou:.4f} mean "
            f"(>= {MIN_MEAN_IOU} needed), {self.min_iou:.4f} min over {self.prompts} prompts; "
            f"encoder {self.fast_seconds:.3f} s vs {self.float32_seconds:.3f} s float32 "
            f"({self.speedup:.2f}x, >= {MIN_SPEEDUP}x needed)"
        )

    def as_dict(self) -> dict:
        return {
            "precision": self.precision,
            "mean_iou": round(self.mean_iou, 5),
            "min_iou": round(self.min_iou, 5),
            "prompts": self.prompts,
            "float32_seconds": round(self.float32_seconds, 4),
            "fast_seconds": round(self.fast_seconds, 4),
            "speedup": round(self.speedup, 3),
            "passed": self.passed,
        }


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision to serve with, why, and the check behind it (None when none ran)."""

    precision: str
    reason: str
    check: PrecisionCheck | None = None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where unreadable)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def native_fast_precision(device: torch.device, flags: set[str] | None = None) -> str | None:
    """The fast mode the hardware computes natively, or None.

    CUDA: bfloat16 where supported, else float16. CPU: bfloat16 with AMX-BF16 tiles
    (``amx_bf16``; ``flags`` defaults to :func:`cpu_flags`). AVX-512 BF16 alone does not count:
    there torch's bfloat16 attention kernel is no faster than float32's (0.94-1.07x for the Ti
    encoder on a 2-core AMD EPYC), so the check would only cost start-up time.
    """
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        if "amx_bf16" in flags:
            return "bfloat16"
    return None


def builtin_check_image(size: tuple[int, int] = CHECK_IMAGE_SIZE) -> np.ndarray:
    """A deterministic (H, W, 3) uint8 RGB test image: a shaded background, rectangles and
    ellipses of flat colours with soft noise (objects with edges, as a photo has)."""
    height, width = size
    rng = np.random.default_rng(20231201)
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    image[..., 0] = 60 + 80 * columns / width
    image[..., 1] = 90 + 60 * rows / height
    image[..., 2] = 140 - 50 * columns / width
    for _ in range(6):
        x0, y0 = rng.uniform(0, 0.7) * width, rng.uniform(0, 0.7) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.3) * width, y0 + rng.uniform(0.1, 0.3) * height
        inside = (columns >= x0) & (columns < x1) & (rows >= y0) & (rows < y1)
        image[inside] = rng.uniform(0, 255, 3)
    for _ in range(6):
        cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
        rx, ry = rng.uniform(0.05, 0.2) * width, rng.uniform(0.05, 0.2) * height
        inside = ((columns - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2 <= 1
        image[inside] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def check_prompts(size: tuple[int, int] = CHECK_IMAGE_SIZE) -> list[Prompt]:
    """The check's prompts on an image of ``size`` (H, W): a 4x4 grid of single points, two
    boxes and two point sets with a negative point (pixels, (x, y))."""
    height, width = size
    prompts = [
        Prompt.create([((i + 0.5) * width / 4, (j + 0.5) * height / 4)])
        for j in range(4)
        for i in range(4)
    ]
    prompts.append(Prompt.create(box=(0.1 * width, 0.2 * height, 0.45 * width, 0.6 * height)))
    prompts.append(Prompt.create(box=(0.5 * width, 0.3 * height, 0.95 * width, 0.9 * height)))
    prompts.append(
        Prompt.create([(0.3 * width, 0.3 * height), (0.6 * width, 0.5 * height)], [1, 0])
    )
    prompts.append(
        Prompt.create(
            [
                (0.7 * width, 0.7 * height),
                (0.75 * width, 0.6 * height),
                (0.2 * width, 0.8 * height),
            ],
            [1, 1, 0],
        )
    )
    return prompts


def check_fast_precision(
    model: EfficientSam,
    precision: str,
    image: np.ndarray | None = None,
    prompts: list[Prompt] | None = None,
) -> PrecisionCheck:
    """Measure ``precision`` against float32 on ``image`` (default: the built-in one): the best
    masks of ``prompts`` (default: :func:`check_prompts`) and one timed encoder pass of each
    after a warm-up pass of each. The built-in check is measured once per process for the
    same device, precision and weights."""
    if precision not in PRECISIONS or precision == "float32":
        raise ValueError(f"not a fast mode: {precision!r}")
    if image is not None or prompts is not None:
        image = builtin_check_image() if image is None else image
        prompts = check_prompts(image.shape[:2]) if prompts is None else prompts
        return _measure(model, precision, image, prompts)
    memo_key = (model.device, precision, tensors_fingerprint(model.state_dict()))
    if memo_key not in _BUILTIN_CHECKS:
        _BUILTIN_CHECKS[memo_key] = _measure(
            model, precision, builtin_check_image(), check_prompts()
        )
    return _BUILTIN_CHECKS[memo_key]


def _measure(
    model: EfficientSam, precision: str, image: np.ndarray, prompts: list[Prompt]
) -> PrecisionCheck:
    """:func:`check_fast_precision`'s measurement itself."""
    predictors = {
        name: Predictor(model, InMemoryEmbeddingCache(64 * 1024**2), name, prepared_images=0)
        for name in ("float32", precision)
    }
    seconds: dict[str, float] = {}
    embeddings = {}
    for attempt in ("warm-up", "timed"):
        for name, predictor in predictors.items():
            embedding = predictor.embed(image, image_hash=f"precision-check-{attempt}")
            seconds[name] = embedding.encoder_seconds
            embeddings[name] = embedding
    masks = {
        name: [p.best_mask for p in predictor.decode(embeddings[name], prompts)]
        for name, predictor in predictors.items()
    }
    ious = [mask_iou(a, b) for a, b in zip(masks["float32"], masks[precision], strict=True)]
    return PrecisionCheck(
        precision,
        float(np.mean(ious)),
        float(np.min(ious)),
        len(ious),
        seconds["float32"],
        seconds[precision],
    )


def choose_precision(model: EfficientSam, requested: str) -> PrecisionChoice:
    """The precision to serve ``model`` with. "auto": the hardware's native fast mode when
    :func:`check_fast_precision` passes (IoU and speed-up), else float32; any other value is
    returned as requested. The choice and its numbers are logged."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {requested!r}")
    if requested != "auto":
        choice = PrecisionChoice(requested, "set by PRECISION")
    else:
        candidate = native_fast_precision(model.device)
        if candidate is None:
            choice = PrecisionChoice(
                "float32", f"no native bfloat16/float16 matmuls on {model.device.type}"
            )
        else:
            started = time.perf_counter()
            check = check_fast_precision(model, candidate)
            verdict = "passed" if check.passed else "failed"
            reason = (
                f"{verdict} the start-up check ({check.describe()}; "
                f"{time.perf_counter() - started:.1f} s)"
            )
            choice = PrecisionChoice(candidate if check.passed else "float32", reason, check)
    logger.info("precision %s -> %s: %s", requested, choice.precision, choice.reason)
    return choice

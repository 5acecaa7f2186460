"""Predictor: owns the image embedding of the current image and turns prompts into masks.

Two ways to use it:
* stateful, as SAM's predictor: ``set_image(image)`` then ``predict(points, labels, box)``;
* stateless, for servers with many threads: ``embedding = embed(image)`` then
  ``decode(embedding, prompts)``; the embedding object can be shared freely.
Embeddings go through an :class:`~efficientsam.cache.EmbeddingCache` keyed by the encoder's
weights fingerprint, the preprocessing/precision and the image content hash.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .arrays import image_content_hash, validate_rgb_image
from .cache import EmbeddingCache, EmbeddingKey, InMemoryEmbeddingCache
from .checkpoint import tensors_fingerprint
from .modeling import EfficientSam
from .modeling.two_way_transformer import PreparedImage
from .prompts import Prompt, fit_prompt, prompt_token_arrays
from .utils import bicubic_resize_matrix, image_to_tensor, tensor_version

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREPROCESSING_ID = "stretch1024-bilinear-noaa-imagenet"
# what each precision computes in another dtype (part of the embedding cache key: a new recipe
# gets a new key, so embeddings of the old one are never reused)
PRECISION_RECIPES = {
    "float32": "float32",
    "bfloat16": "bfloat16-blocks",
    "float16": "float16-blocks",
}


@dataclass(frozen=True)
class ImageEmbedding:
    """One image's encoder output. embeddings (1, 256, 64, 64); original_size (H, W) pixels."""

    embeddings: torch.Tensor
    original_size: tuple[int, int]
    key: EmbeddingKey
    from_cache: bool
    encoder_seconds: float


@dataclass(frozen=True)
class Prediction:
    """Masks for one prompt, candidates sorted by predicted IoU (best first).

    masks (K, H, W) bool at the original image size; scores (K,) raw predicted IoU;
    low_res_logits (K, 256, 256) float32; K = 3 (multimask), 1 (single mask or best only).
    """

    masks: np.ndarray
    scores: np.ndarray
    low_res_logits: np.ndarray
    dropped_points: int
    decoder_seconds: float

    @property
    def best_mask(self) -> np.ndarray:
        return self.masks[0]

    @property
    def best_score(self) -> float:
        return float(self.scores[0])


class Predictor:
    """Image -> embedding (through the cache) -> masks, scores, low-res logits.

    precision: "float32" (default, matches the reference), or the "bfloat16"/"float16" fast mode:
    the encoder's transformer blocks and neck run under autocast to that dtype (patch embedding,
    residual stream, norms' statistics and the decoder stay float32; see
    :mod:`efficientsam.precision` for the quality check that picks it; bfloat16 on CPU needs
    AMX, or at least AVX-512 BF16, to be faster). The cache is shared by
    whoever passes the same object; by default each predictor gets a 256 MiB in-memory LRU.
    The decoder's per-image work (:class:`PreparedImage`, ~10 MiB each) is kept for the
    ``prepared_images`` most recently decoded images, so repeated clicks on an image skip it.
    """

    def __init__(
        self,
        model: EfficientSam,
        cache: EmbeddingCache | None = None,
        precision: str = "float32",
        prepared_images: int = 4,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.model = model.eval()
        self.cache = cache if cache is not None else InMemoryEmbeddingCache(256 * 1024**2)
        self.precision = precision
        self._fingerprint: str | None = None
        self._fingerprint_state: tuple | None = None
        self._current: ImageEmbedding | None = None
        self._prepared: OrderedDict[tuple, PreparedImage] = OrderedDict()
        self._prepared_capacity = prepared_images
        self._prepared_lock = threading.Lock()
        self._resize: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    # -- identity --------------------------------------------------------------------------
    @property
    def encoder_fingerprint(self) -> str:
        """Hex digest of the image encoder's weights; recomputed only when they change."""
        tensors = self.model.image_encoder.state_dict()
        state = tuple((key, tensor_version(t)) for key, t in tensors.items())
        if (
            self._fingerprint is None
            or None in (v for _, v in state)
            or state != self._fingerprint_state
        ):
            self._fingerprint = tensors_fingerprint(tensors)
            self._fingerprint_state = state
        return self._fingerprint

    def embedding_key(self, image_hash: str) -> EmbeddingKey:
        return EmbeddingKey(
            self.encoder_fingerprint,
            f"{PREPROCESSING_ID}-{PRECISION_RECIPES[self.precision]}",
            image_hash,
        )

    def _decoder_state(self) -> tuple:
        """Changes whenever the weights behind a PreparedImage change (training, reload)."""
        tensors = [
            *self.model.mask_decoder.transformer.layers[0].parameters(),
            self.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
        ]
        return tuple(tensor_version(t) for t in tensors)

    def prepared_image(self, embedding: ImageEmbedding) -> PreparedImage:
        """The decoder's per-image inputs for ``embedding``, from a small LRU when possible."""
        state = self._decoder_state()
        key = (embedding.key, state)
        if None in state:  # inference-mode weights have no version: never reuse
            with torch.inference_mode():
                return self.model.prepare_image_embeddings(embedding.embeddings)
        with self._prepared_lock:
            prepared = self._prepared.get(key)
            if prepared is not None:
                self._prepared.move_to_end(key)
                return prepared
        with torch.inference_mode():
            prepared = self.model.prepare_image_embeddings(embedding.embeddings)
        if self._prepared_capacity > 0:
            with self._prepared_lock:
                self._prepared[key] = prepared
                while len(self._prepared) > self._prepared_capacity:
                    self._prepared.popitem(last=False)
        return prepared

    def _resize_matrices(
        self, low_res_size: tuple[int, int], size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bicubic resize matrices (rows (H, h), columns (W, w)) for the decoder's low-res masks,
        kept for the last few image sizes."""
        matrices = []
        for in_size, out_size in zip(low_res_size, size, strict=True):
            key = (int(in_size), int(out_size), self.model.device)
            with self._prepared_lock:
                matrix = self._resize.get(key)
                if matrix is not None:
                    self._resize.move_to_end(key)
            if matrix is None:
                matrix = bicubic_resize_matrix(key[0], key[1]).to(self.model.device)
                with self._prepared_lock:
                    self._resize[key] = matrix
                    while len(self._resize) > 8:
                        self._resize.popitem(last=False)
            matrices.append(matrix)
        return matrices[0], matrices[1]

    def upscale_logits(self, low_res: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bicubic resize of mask logits (..., h, w), e.g. the decoder's (..., 256, 256), to
        size (H, W) pixels -> logits (..., H, W); threshold at ``model.mask_threshold`` for masks.

        Same values as ``F.interpolate(mode="bicubic", align_corners=False)``, computed as two
        matmuls with cached matrices (see :func:`~efficientsam.utils.bicubic_resize_matrix`)."""
        rows, columns = self._resize_matrices(low_res.shape[-2:], size)
        rows, columns = rows.to(low_res.dtype), columns.to(low_res.dtype)
        return rows @ low_res @ columns.T

    # -- stateless API ---------------------------------------------------------------------
    def embed(self, image: np.ndarray, image_hash: str | None = None) -> ImageEmbedding:
        """Embeddings of an HxWx3 uint8 RGB image, from the cache when possible."""
        image = validate_rgb_image(image)
        key = self.embedding_key(image_hash or image_content_hash(image))
        size = (int(image.shape[0]), int(image.shape[1]))
        cached = self.cache.get(key)
        if cached is not None:
            return ImageEmbedding(cached.to(self.model.device), size, key, True, 0.0)
        started = time.perf_counter()
        with torch.inference_mode():
            embeddings = self.model.get_image_embeddings(
                image_to_tensor(image, self.model.device), PRECISIONS[self.precision]
            )
        seconds = _synchronised_elapsed(started, embeddings)
        self.cache.put(key, embeddings)
        return ImageEmbedding(embeddings, size, key, False, seconds)

    def decode(
        self,
        embedding: ImageEmbedding,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        return_best_only: bool = False,
    ) -> list[Prediction]:
        """Masks for several prompts on one image in one batched decoder call.

        Points outside the image are clamped to its border (the raw model would turn negative
        coordinates into padding-like -1 tokens).
        """
        if not prompts:
            return []
        height, width = embedding.original_size
        fitted = [fit_prompt(prompt) for prompt in prompts]
        points, labels = prompt_token_arrays(fitted, [(height, width)] * len(fitted))
        started = time.perf_counter()
        device = self.model.device
        prepared = self.prepared_image(embedding)
        with torch.inference_mode():  # the decoder runs in float32 in every precision
            low_res, iou = self.model.predict_masks(
                prepared,
                torch.from_numpy(points[None]).to(device),  # (1, Q, T, 2)
                torch.from_numpy(labels[None]).to(device),
                multimask_output,
                height,
                width,
            )
            low_res, iou = low_res[0].float(), iou[0].float()  # (Q, K, 256, 256), (Q, K)
            order = iou.argsort(dim=-1, descending=True)
            if return_best_only:
                order = order[:, :1]
            iou = iou.gather(1, order)
            low_res = low_res.gather(1, order[:, :, None, None].expand(-1, -1, *low_res.shape[2:]))
            logits = self.upscale_logits(low_res, (height, width))
            if logits.device.type == "cpu":
                # numpy's comparison: the same booleans without a torch op (on 2 busy cores
                # torch's parallel region for 300k values costs more than the comparison)
                masks_np = np.greater_equal(logits.numpy(), self.model.mask_threshold)
            else:
                masks = logits >= self.model.mask_threshold
        seconds = _synchronised_elapsed(started, logits)
        if logits.device.type != "cpu":
            masks_np = masks.cpu().numpy()
        iou_np, low_res_np = iou.cpu().numpy(), low_res.cpu().numpy()
        return [
            Prediction(masks_np[i], iou_np[i], low_res_np[i], fitted[i].dropped_points, seconds)
            for i in range(len(fitted))
        ]

    # -- stateful API ----------------------------------------------------------------------
    def set_image(self, image: np.ndarray, image_hash: str | None = None) -> ImageEmbedding:
        """Compute (or fetch from the cache) the embedding that ``predict`` will use."""
        self._current = self.embed(image, image_hash)
        return self._current

    def reset_image(self) -> None:
        self._current = None

    @property
    def is_image_set(self) -> bool:
        return self._current is not None

    @property
    def image_embedding(self) -> ImageEmbedding:
        if self._current is None:
            raise RuntimeError("no image set: call set_image(image) before predict()")
        return self._current

    def predict(
        self,
        points: Sequence[Sequence[float]] | np.ndarray | None = None,
        labels: Sequence[int] | np.ndarray | None = None,
        box: Sequence[float] | np.ndarray | None = None,
        multimask_output: bool = True,
        return_best_only: bool = False,
    ) -> Prediction:
        """Masks for one prompt on the current image.

        points (N, 2) (x, y) pixels of the original image, oldest click first; labels (N,)
        1 positive / 0 negative (default all positive); box (x0, y0, x1, y1) pixels.
        """
        embedding = self.image_embedding
        prompt = Prompt.create(points, labels, box)
        return self.decode(embedding, [prompt], multimask_output, return_best_only)[0]

    def predict_prompts(
        self,
        prompts: Sequence[Prompt],
        multimask_output: bool = True,
        return_best_only: bool = False,
    ) -> list[Prediction]:
        """Several prompts on the current image, one batched decoder call."""
        return self.decode(self.image_embedding, prompts, multimask_output, return_best_only)


def _synchronised_elapsed(started: float, tensor: torch.Tensor) -> float:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter() - started

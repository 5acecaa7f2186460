"""Image-embedding cache: keys, the interface other tiers implement, and an in-process LRU.

A key is (encoder weights fingerprint, preprocessing id, image content hash): embeddings made by
other encoder weights or another preprocessing/precision can never be returned for a new model.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class EmbeddingKey:
    """Identifies one image's embeddings under one encoder and preprocessing."""

    model_fingerprint: str
    preprocessing: str
    image_hash: str

    def __str__(self) -> str:
        return f"{self.model_fingerprint}:{self.preprocessing}:{self.image_hash}"


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_bytes: int


@runtime_checkable
class EmbeddingCache(Protocol):
    """What the predictor needs from a cache tier (in-process, Redis, ...)."""

    def get(self, key: EmbeddingKey) -> torch.Tensor | None: ...

    def put(self, key: EmbeddingKey, embeddings: torch.Tensor) -> None: ...


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class InMemoryEmbeddingCache:
    """Thread-safe LRU bounded in bytes (a Ti/S embedding is 256x64x64 float32 = 4 MiB).

    Tensors are kept on the device they were computed on, so a hit costs no transfer.
    """

    def __init__(self, max_bytes: int = 512 * 1024**2) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[EmbeddingKey, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: EmbeddingKey) -> torch.Tensor | None:
        with self._lock:
            embeddings = self._entries.get(key)
            if embeddings is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return embeddings

    def put(self, key: EmbeddingKey, embeddings: torch.Tensor) -> None:
        size = tensor_bytes(embeddings)
        with self._lock:
            if key in self._entries:
                self._bytes -= tensor_bytes(self._entries.pop(key))
            if size > self.max_bytes:
                return  # larger than the whole cache: not stored
            self._entries[key] = embeddings.detach()
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= tensor_bytes(evicted)
                self._evictions += 1

    def __contains__(self, key: EmbeddingKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits,
                self._misses,
                self._evictions,
                len(self._entries),
                self._bytes,
                self.max_bytes,
            )

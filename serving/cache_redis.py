"""Embedding caches shared by all workers: a Redis tier and the two-tier cache the runtime uses
(the in-process LRU, hot, float32 on the model's device, in front of Redis).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from efficientsam.cache import CacheStats, EmbeddingKey, InMemoryEmbeddingCache

if TYPE_CHECKING:
    import torch
    from redis import Redis

logger = logging.getLogger(__name__)

_MAGIC = b"ESE1"
_HEADER = struct.Struct("<4sB3xIII")  # magic, dtype code, pad, C, H, W
_DTYPES = {1: np.float16, 2: np.float32}
_CODES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2}

# KEYS: entry, LRU index (zset), sizes (hash), total bytes (string).
# ARGV: value, ttl seconds, now, max bytes.  Returns {total bytes, entries evicted}.
_PUT_SCRIPT = """
local size = string.len(ARGV[1])
local old = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
local total = redis.call('INCRBY', KEYS[4], size - old)
local evicted = 0
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 or oldest[1] == KEYS[1] then break end
  local freed = tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0')
  redis.call('DEL', oldest[1])
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('HDEL', KEYS[3], oldest[1])
  total = redis.call('DECRBY', KEYS[4], freed)
  evicted = evicted + 1
end
return {total, evicted}
"""


# KEYS: entry, LRU index, sizes, total bytes. Forget an entry whose value has expired.
_DROP_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local freed = tonumber(redis.call('HGET', KEYS[3], KEYS[1]) or '0')
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('HDEL', KEYS[3], KEYS[1])
redis.call('DECRBY', KEYS[4], freed)
return 1
"""


def encode_embedding(embeddings: torch.Tensor, dtype: str = "float16") -> bytes:
    """(1, C, H, W) or (C, H, W) float tensor -> header (magic, dtype, C, H, W) + the raw array,
    nothing executable. Values that do not fit float16 (|x| > 65504) are stored as float32
    instead of becoming inf."""
    array = embeddings.detach().float().cpu().numpy().reshape(embeddings.shape[-3:])
    target = np.dtype(np.float16 if dtype == "float16" else np.float32)
    if target == np.float16 and float(np.abs(array).max(initial=0.0)) > float(
        np.finfo(np.float16).max
    ):
        target = np.dtype(np.float32)
    channels, height, width = array.shape
    header = _HEADER.pack(_MAGIC, _CODES[target], channels, height, width)
    return header + np.ascontiguousarray(array, dtype=target).tobytes()


def decode_embedding(data: bytes) -> np.ndarray:
    """Bytes from :func:`encode_embedding` -> (1, C, H, W) float32 array; ValueError for bytes
    that are not such a value."""
    if len(data) < _HEADER.size:
        raise ValueError("not an embedding written by this cache")
    magic, code, channels, height, width = _HEADER.unpack_from(data)
    if magic != _MAGIC or code not in _DTYPES:
        raise ValueError("not an embedding written by this cache")
    array = np.frombuffer(data, dtype=_DTYPES[code], offset=_HEADER.size)
    if array.size != channels * height * width:
        raise ValueError("truncated embedding value")
    return array.reshape(1, channels, height, width).astype(np.float32)


class RedisEmbeddingCache:
    """The shared tier: one value per image embedding under ``<prefix>:embedding:<key>`` (key =
    encoder fingerprint, preprocessing/precision, image content hash, see ``efficientsam.cache``).
    ``get`` returns float32 CPU tensors.

    Values are :func:`encode_embedding`'s: float16 by default (half of float32's 4 MiB per image;
    on the Ti fixture best-mask IoU 0.9998 against float32, logits within 1e-3) or float32. A
    value that does not decode (corrupt or planted) is a miss and is dropped. Bounded to
    ``max_bytes`` with LRU eviction (a sorted set of last-use times and a hash of entry sizes,
    updated by one Lua script per write, so concurrent workers never push the total over the
    cap) and a TTL on every entry. The cap is ours, not Redis' ``maxmemory``: RQ's queues share
    the server and must never be evicted."""

    def __init__(
        self,
        connection: Redis,
        prefix: str = "efficientsam",
        max_bytes: int = 1024**3,
        ttl_seconds: int = 7 * 24 * 3600,
        dtype: str = "float16",
    ) -> None:
        self.connection = connection
        self.prefix = f"{prefix}:embedding"
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.dtype = dtype
        self._put = connection.register_script(_PUT_SCRIPT)
        self._drop = connection.register_script(_DROP_SCRIPT)
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._errors = 0

    def _keys(self, key: EmbeddingKey) -> list[str]:
        entry = f"{self.prefix}:{key}"
        return [entry, f"{self.prefix}s:lru", f"{self.prefix}s:sizes", f"{self.prefix}s:bytes"]

    def get(self, key: EmbeddingKey) -> torch.Tensor | None:
        import redis
        import torch

        entry, index, _, _ = self._keys(key)
        try:
            with self.connection.pipeline(transaction=False) as pipeline:
                pipeline.get(entry)
                pipeline.zadd(index, {entry: time.time()}, xx=True)  # touch: most recently used
                data = pipeline.execute()[0]
        except redis.RedisError as error:  # the shared tier is an optimisation: never fatal
            self._count("_errors")
            logger.warning("shared embedding cache unavailable: %s", error)
            return None
        if data is None:
            self._count("_misses")
            return None
        try:
            array = decode_embedding(data)
        except ValueError as error:  # corrupt or planted: never used, never executed
            self._count("_misses")
            logger.warning("shared embedding cache: dropped %s: %s", entry, error)
            with contextlib.suppress(redis.RedisError):
                self.connection.delete(entry)
                self._drop(keys=self._keys(key))  # its bytes back to the cap
            return None
        self._count("_hits")
        return torch.from_numpy(array)

    def put(self, key: EmbeddingKey, embeddings: torch.Tensor) -> None:
        import redis

        value = encode_embedding(embeddings, self.dtype)
        if len(value) > self.max_bytes:
            return
        try:
            _, evicted = self._put(
                keys=self._keys(key), args=[value, self.ttl_seconds, time.time(), self.max_bytes]
            )
        except redis.RedisError as error:
            self._count("_errors")
            logger.warning("shared embedding cache unavailable: %s", error)
            return
        if evicted:
            self._count("_evictions", int(evicted))

    def prune_expired(self, batch: int = 500) -> int:
        """Drop index entries whose value expired (TTL) and give their bytes back to the cap.
        Run periodically (``python -m worker cron``); returns how many were dropped."""
        index, sizes, total = (
            f"{self.prefix}s:lru",
            f"{self.prefix}s:sizes",
            f"{self.prefix}s:bytes",
        )
        dropped = 0
        start = 0
        while True:
            entries = self.connection.zrange(index, start, start + batch - 1)
            if not entries:
                return dropped
            with self.connection.pipeline(transaction=False) as pipeline:
                for entry in entries:
                    pipeline.exists(entry)
                alive = pipeline.execute()
            gone = [entry for entry, exists in zip(entries, alive, strict=True) if not exists]
            for entry in gone:  # re-checked atomically: a worker may have just put it again
                self._drop(keys=[entry, index, sizes, total])
            dropped += len(gone)
            start += len(entries) - len(gone)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def stats(self) -> CacheStats:
        """This process's hits/misses; entries and bytes of the shared tier (one round trip)."""
        try:
            entries = int(self.connection.zcard(f"{self.prefix}s:lru"))
            size = int(self.connection.get(f"{self.prefix}s:bytes") or 0)
        except Exception:  # stats must never fail a scrape
            entries = size = -1
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, entries, size, self.max_bytes
            )


class TieredEmbeddingCache:
    """In-process LRU (hot) in front of the shared Redis tier. A Redis hit is copied to the hot
    tier on ``device``; a put goes to both."""

    def __init__(
        self, hot: InMemoryEmbeddingCache, shared: RedisEmbeddingCache, device: object = "cpu"
    ) -> None:
        self.hot = hot
        self.shared = shared
        self.device = device

    def get(self, key: EmbeddingKey) -> torch.Tensor | None:
        embeddings = self.hot.get(key)
        if embeddings is not None:
            return embeddings
        embeddings = self.shared.get(key)
        if embeddings is None:
            return None
        embeddings = embeddings.to(self.device)
        self.hot.put(key, embeddings)
        return embeddings

    def put(self, key: EmbeddingKey, embeddings: torch.Tensor) -> None:
        self.hot.put(key, embeddings)
        self.shared.put(key, embeddings)

    def stats(self) -> CacheStats:
        return self.hot.stats()

"""The shared Redis embedding tier and the two-tier cache, against the real Redis."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from efficientsam.cache import EmbeddingKey, InMemoryEmbeddingCache
from serving.cache_redis import (
    RedisEmbeddingCache,
    TieredEmbeddingCache,
    decode_embedding,
    encode_embedding,
)

EMBEDDING_BYTES_FP16 = 256 * 64 * 64 * 2 + 20  # value + header


def key(index: int) -> EmbeddingKey:
    return EmbeddingKey("fingerprint", "stretch1024-float32", f"image{index}")


def embedding(seed: int) -> torch.Tensor:
    return torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(dtype):
    original = embedding(0) * 10
    decoded = decode_embedding(encode_embedding(original, dtype))
    assert decoded.shape == (1, 256, 64, 64) and decoded.dtype == np.float32
    tolerance = 1e-2 if dtype == "float16" else 0.0
    np.testing.assert_allclose(decoded, original.numpy(), atol=tolerance, rtol=1e-3)
    assert (
        len(encode_embedding(original, dtype))
        == 256 * 64 * 64 * (2 if dtype == "float16" else 4) + 20
    )


def test_values_beyond_float16_are_kept_as_float32():
    big = embedding(1) * 1e6
    decoded = decode_embedding(encode_embedding(big, "float16"))
    assert np.isfinite(decoded).all()
    np.testing.assert_allclose(decoded, big.numpy(), rtol=1e-6)


def test_corrupt_values_are_rejected():
    with pytest.raises(ValueError):
        decode_embedding(b"nonsense" * 10)
    with pytest.raises(ValueError):
        decode_embedding(encode_embedding(embedding(2))[:-10])


def test_get_put_and_lru_eviction_by_bytes(redis_connection):
    cache = RedisEmbeddingCache(redis_connection, "t", max_bytes=3 * EMBEDDING_BYTES_FP16)
    for index in range(3):
        cache.put(key(index), embedding(index))
    assert cache.get(key(0)) is not None  # 0 is now the most recently used
    cache.put(key(3), embedding(3))  # over the cap: the least recently used (1) goes
    assert cache.get(key(1)) is None
    assert all(cache.get(key(i)) is not None for i in (0, 2, 3))
    stats = cache.stats()
    assert stats.entries == 3 and stats.bytes == 3 * EMBEDDING_BYTES_FP16
    assert stats.hits == 4 and stats.misses == 1 and stats.evictions == 1
    assert int(redis_connection.get("t:embeddings:bytes")) <= cache.max_bytes


def test_concurrent_writers_never_exceed_the_cap(redis_connection):
    cap = 5 * EMBEDDING_BYTES_FP16
    caches = [RedisEmbeddingCache(redis_connection, "t", max_bytes=cap) for _ in range(4)]
    values = [embedding(i) for i in range(4)]

    def writer(index: int) -> None:
        for step in range(6):
            caches[index].put(key(index * 100 + step), values[index])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert int(redis_connection.get("t:embeddings:bytes")) <= cap
    assert redis_connection.zcard("t:embeddings:lru") == 5


def test_expired_entries_are_pruned_and_give_their_bytes_back(redis_connection):
    cache = RedisEmbeddingCache(redis_connection, "t", max_bytes=10**9, ttl_seconds=1)
    cache.put(key(0), embedding(0))
    cache.put(key(1), embedding(1))
    time.sleep(1.2)
    assert cache.get(key(0)) is None
    assert cache.prune_expired() == 2
    assert cache.stats().entries == 0 and cache.stats().bytes == 0


def test_an_unreachable_redis_is_a_miss_not_an_error():
    dead = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    cache = RedisEmbeddingCache(dead, "t")
    assert cache.get(key(0)) is None
    cache.put(key(0), embedding(0))  # no exception
    assert cache.stats().misses == 0  # errors are not misses


def test_tiered_cache_fills_the_hot_tier_from_redis(redis_connection):
    shared = RedisEmbeddingCache(redis_connection, "t", dtype="float32")
    first = TieredEmbeddingCache(InMemoryEmbeddingCache(10**9), shared)
    second = TieredEmbeddingCache(InMemoryEmbeddingCache(10**9), shared)  # another worker
    first.put(key(0), embedding(0))
    assert key(0) not in second.hot
    found = second.get(key(0))
    assert torch.equal(found, embedding(0)) and key(0) in second.hot
    hits = second.hot.stats().hits
    assert torch.equal(second.get(key(0)), found)
    assert second.hot.stats().hits == hits + 1  # now from the hot tier

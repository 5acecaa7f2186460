"""The in-memory embedding cache: byte bound, LRU order, counters, thread safety."""

from __future__ import annotations

import threading

import pytest
import torch

from efficientsam.cache import EmbeddingCache, EmbeddingKey, InMemoryEmbeddingCache

MIB = 1024**2


def _key(name: str, model: str = "m1") -> EmbeddingKey:
    return EmbeddingKey(model, "prep", name)


def _tensor(mib: int) -> torch.Tensor:
    return torch.zeros(mib * MIB // 4, dtype=torch.float32)


def test_implements_the_interface():
    assert isinstance(InMemoryEmbeddingCache(), EmbeddingCache)


def test_lru_eviction_by_bytes_and_counters():
    cache = InMemoryEmbeddingCache(max_bytes=10 * MIB)
    for name in "abc":
        cache.put(_key(name), _tensor(4))
    assert _key("a") not in cache and len(cache) == 2  # 12 MiB > 10 MiB: oldest went
    assert cache.get(_key("b")) is not None  # b is now the most recent
    cache.put(_key("d"), _tensor(4))
    assert _key("c") not in cache and _key("b") in cache
    assert cache.get(_key("a")) is None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 1, 2)
    assert stats.bytes == 8 * MIB and stats.entries == 2 and stats.max_bytes == 10 * MIB


def test_too_large_entries_are_not_stored_and_replacement_keeps_bytes_right():
    cache = InMemoryEmbeddingCache(max_bytes=3 * MIB)
    cache.put(_key("big"), _tensor(4))
    assert len(cache) == 0
    cache.put(_key("x"), _tensor(1))
    cache.put(_key("x"), _tensor(2))
    assert cache.stats().bytes == 2 * MIB and len(cache) == 1


def test_keys_of_other_models_never_match():
    cache = InMemoryEmbeddingCache()
    cache.put(_key("img", model="old-weights"), torch.ones(3))
    assert cache.get(_key("img", model="new-weights")) is None


def test_concurrent_use_keeps_the_bound():
    cache = InMemoryEmbeddingCache(max_bytes=8 * MIB)
    errors = []

    def worker(offset: int) -> None:
        try:
            for i in range(200):
                key = _key(f"{offset}-{i % 7}")
                if cache.get(key) is None:
                    cache.put(key, _tensor(1))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    stats = cache.stats()
    assert stats.bytes <= 8 * MIB and stats.entries == stats.bytes // MIB
    assert stats.hits + stats.misses == 8 * 200


def test_negative_bound_is_rejected():
    with pytest.raises(ValueError):
        InMemoryEmbeddingCache(max_bytes=-1)

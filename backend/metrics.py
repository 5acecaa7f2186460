"""Prometheus metrics of one app instance (own registry: no module-level global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

FAST_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5)
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "backend_request_seconds",
            "HTTP request latency by route",
            ["route", "status"],
            buckets=SLOW_BUCKETS,
            registry=self.registry,
        )
        self.encoder_seconds = Histogram(
            "backend_encoder_seconds",
            "image encoder time per image (cache misses)",
            buckets=SLOW_BUCKETS,
            registry=self.registry,
        )
        self.decoder_seconds = Histogram(
            "backend_decoder_seconds",
            "prompt encoder + mask decoder time per call",
            buckets=FAST_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "backend_predictions_total",
            "predictions by kind and outcome",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "backend_webhook_events_total",
            "webhook events by action",
            ["action"],
            registry=self.registry,
        )

    def watch_cache(self, stats: Callable[[], object]) -> None:
        """Export an embedding cache's counters (read at scrape time)."""
        self.registry.register(_CacheCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector:
    def __init__(self, stats: Callable[[], object]) -> None:
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        hits = CounterMetricFamily("backend_embedding_cache_hits", "embedding cache hits")
        hits.add_metric([], stats.hits)
        misses = CounterMetricFamily("backend_embedding_cache_misses", "embedding cache misses")
        misses.add_metric([], stats.misses)
        size = GaugeMetricFamily("backend_embedding_cache_bytes", "bytes held by the cache")
        size.add_metric([], stats.bytes)
        entries = GaugeMetricFamily("backend_embedding_cache_entries", "images in the cache")
        entries.add_metric([], stats.entries)
        yield from (hits, misses, size, entries)

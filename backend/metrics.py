"""Prometheus metrics of one app instance (own registry: no module-level global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

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
        self.embedding_cache = Counter(
            "backend_embedding_cache",
            "image embeddings found in a cache (hit) or computed by the encoder (miss), per "
            "prompt request",
            ["outcome"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "backend_webhook_events_total",
            "webhook events by action",
            ["action"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

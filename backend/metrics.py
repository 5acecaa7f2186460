"""Prometheus metrics of one app instance (own registry: no module-level global state)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

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

    def watch_training(self, statuses: Callable[[], dict[str, dict]]) -> None:
        """Export each project's fine-tuning status (read at scrape time from the shared state
        the training job writes: Redis, or this process in the embedded mode)."""
        self.registry.register(_TrainingCollector(statuses))

    def watch_versions(self, errors: Callable[[], dict[str, dict]]) -> None:
        """Export the model versions that failed to load lately (read at scrape time)."""
        self.registry.register(_VersionErrorCollector(errors))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TrainingCollector:
    FIELDS = {
        "step": "optimiser steps done in the running (or last) fine-tune",
        "steps": "optimiser steps planned",
        "epoch": "passes over the training masks so far (fractional)",
        "loss": "training loss (running mean)",
        "train_iou": "mask IoU on the training prompts (running mean)",
        "current_miou": "held-out mIoU (mean of 1-click, box, 3-click) of the version served",
        "candidate_miou": "held-out mIoU of the last candidate",
        "agreement": "held-out mask IoU with the teacher of the last SAMI candidate",
    }

    def __init__(self, statuses: Callable[[], dict[str, dict]]) -> None:
        self._statuses = statuses

    def collect(self):
        try:
            statuses = self._statuses()
        except Exception:  # a scrape never fails because Redis is away
            return
        families = {
            name: GaugeMetricFamily(f"backend_training_{name}", text, labels=["project"])
            for name, text in self.FIELDS.items()
        }
        running = GaugeMetricFamily(
            "backend_training_running", "1 while a fine-tune runs", labels=["project"]
        )
        stage = GaugeMetricFamily(
            "backend_training_stage",
            "the running (or last) training run's mode (finetune, sami) and stage (sync, "
            "images, sami, align, embed, train, evaluate, done): 1",
            labels=["project", "mode", "stage"],
        )
        for project, status in statuses.items():
            for name, family in families.items():
                if isinstance(status.get(name), (int, float)):
                    family.add_metric([project], float(status[name]))
            running.add_metric([project], 1.0 if status.get("running") else 0.0)
            if status.get("stage"):
                labels = [project, str(status.get("mode") or "finetune"), str(status["stage"])]
                stage.add_metric(labels, 1.0)
        yield from families.values()
        yield running
        yield stage


class _VersionErrorCollector:
    def __init__(self, errors: Callable[[], dict[str, dict]]) -> None:
        self._errors = errors

    def collect(self):
        family = GaugeMetricFamily(
            "backend_model_version_error",
            "1 for a model version that failed to load lately (requests for it fail; the "
            "reason is in /health and the worker log)",
            labels=["version"],
        )
        try:
            errors = self._errors()
        except Exception:  # a scrape never fails because Redis is away
            errors = {}
        for version in errors:
            family.add_metric([version], 1.0)
        yield family

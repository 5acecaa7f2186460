"""All backend configuration in one object, read from the environment (Label Studio's names)."""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from serving.labelstudio.images import ImageLoader
from serving.labelstudio.outbound import parse_allow

AUTOLABEL_MODES = ("auto", "boxes", "everything", "off")
QUEUE_NAMES = ("interactive", "batch", "train")  # in priority order


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Backend settings. Every field has an env variable (see ``ENV``); CLI flags override."""

    host: str = "0.0.0.0"
    port: int = 9090
    checkpoint: Path | None = None  # EfficientSAM .pt / .pt.zip / .safetensors
    model_dir: Path = Path("models")
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    precision: str = "float32"  # or the bfloat16/float16 fast mode
    threads: int = 0  # torch CPU threads; 0 = torch's default
    label_studio_url: str = ""  # e.g. http://localhost:8080
    label_studio_api_key: str = ""  # legacy token or personal access token (PAT)
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    redis_url: str = ""  # set: work goes to RQ workers (worker issue); unset: embedded
    embedding_cache_bytes: int = 512 * 1024**2
    image_cache_bytes: int = 256 * 1024**2
    max_download_bytes: int = 64 * 1024**2
    # LS sends tasks with their annotations and predictions (brush RLE; a 12 MP object's mask
    # is ~60 KB of JSON): 64 MiB holds ~1,000 of them. A larger body is refused (413) before
    # it is read. Parsing JSON takes up to ~12x its size (measured: a body of small ints).
    max_request_bytes: int = 64 * 1024**2
    max_image_pixels: int = 64_000_000
    download_timeout_seconds: float = 20.0  # per connect/read
    download_deadline_seconds: float = 60.0  # per image, redirects included
    # Hosts other than LS's that resolve to non-public addresses are refused; this opens
    # comma-separated host names (*.suffix too) and IPs/CIDRs, e.g. "minio.internal,10.0.0.0/8".
    outbound_allow: str = ""
    # Without LABEL_STUDIO_URL, use /setup's hostname + token as the LS host (off: any caller of
    # /setup could pick the host that relative image URLs are fetched from).
    label_studio_trust_setup_host: bool = False
    batch_time_budget_seconds: float = 60.0  # LS cuts /predict at 100 s
    version_pick_cache_seconds: float = 15.0  # how long LS's picked model version is cached
    log_level: str = "INFO"
    # Batch predictions ("Retrieve predictions"): boxes (rectangles -> masks), everything
    # (automatic masks), auto (boxes when the task has rectangles, else everything), off.
    autolabel_mode: str = "auto"
    autolabel_points_per_side: int = 0  # "segment everything" grid; 0: 32x32 on GPU, 16x16 on CPU
    # Redis/RQ (used when redis_url is set)
    redis_key_prefix: str = "efficientsam"  # our own keys; RQ keeps its "rq:" keys
    queues: str = "interactive,batch"  # what `python -m worker` takes, highest priority first
    interactive_wait_seconds: float = 30.0  # the backend waits this long for a click's job
    interactive_job_timeout: int = 60
    batch_job_timeout: int = 900
    train_job_timeout: int = 4 * 3600
    batch_retries: int = 2  # a failed batch task is retried this often, then reported
    batch_retry_delay_seconds: int = 10
    worker_heartbeat_seconds: int = 5  # a killed worker's job is retried within ~3 of these
    shared_cache_bytes: int = 1024**3  # embeddings in Redis, shared by all workers
    shared_cache_ttl_seconds: int = 7 * 24 * 3600
    shared_cache_dtype: str = "float16"  # float16 halves the bytes (measured: mask IoU 0.9998)
    # Fine-tuning (a project's annotations -> a new version of the model for that project)
    train_from: str = "base"  # start from the released weights, or "current": the project's version
    train_steps: int = 0  # optimiser steps; 0: the library's default
    train_lora_rank: int = 0  # > 0: LoRA on the image encoder's qkv/proj too (peft)
    train_held_out_fraction: float = 0.2  # tasks held out for the promotion decision
    train_min_tasks: int = 3  # annotated tasks needed before a fine-tune runs
    train_promotion_margin: float = 0.01  # held-out mIoU gain needed to promote a candidate
    train_min_new_annotations: int = 20  # the periodic trigger: new annotations since last run
    train_check_seconds: int = 300  # how often `python -m worker cron` looks at the projects

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user or self.basic_auth_pass)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from ``environ`` (default ``os.environ``), then ``overrides`` (not None)."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        types = typing.get_type_hints(cls)
        for name, variables in ENV.items():
            for variable in variables:
                raw = environ.get(variable)
                if raw is None or raw == "":
                    continue
                values[name] = _convert(types[name], raw, variable)
                break
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **overrides: object) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, got {self.port}")
        if self.precision not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"precision must be float32, bfloat16 or float16: {self.precision}")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise ValueError(f"LABEL_STUDIO_URL must be http(s)://..., got {self.label_studio_url}")
        if not self.download_deadline_seconds > 0:
            raise ValueError("DOWNLOAD_DEADLINE_SECONDS must be > 0")
        parse_allow(self.outbound_allow)
        if self.autolabel_mode not in AUTOLABEL_MODES:
            raise ValueError(
                f"AUTOLABEL_MODE must be one of {', '.join(AUTOLABEL_MODES)}: {self.autolabel_mode}"
            )
        if self.max_request_bytes < 64 * 1024:
            raise ValueError("MAX_REQUEST_BYTES must be at least 65536")
        if not 0 <= self.autolabel_points_per_side <= 64:
            raise ValueError("AUTOLABEL_POINTS_PER_SIDE must be 0 (automatic) to 64")
        if self.shared_cache_dtype not in ("float16", "float32"):
            raise ValueError(
                f"SHARED_CACHE_DTYPE must be float16 or float32: {self.shared_cache_dtype}"
            )
        if self.train_from not in ("current", "base"):
            raise ValueError(f"TRAIN_FROM must be current or base: {self.train_from}")
        if not 0 < self.train_held_out_fraction < 1:
            raise ValueError("TRAIN_HELD_OUT_FRACTION must be between 0 and 1")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            scheme = self.redis_url.split("://", 1)[0] if "://" in self.redis_url else "no scheme"
            raise ValueError(f"REDIS_URL must be redis://, rediss:// or unix://, got {scheme}")
        if not self.queue_names or set(self.queue_names) - set(QUEUE_NAMES):
            raise ValueError(f"queues must be some of {', '.join(QUEUE_NAMES)}: {self.queues}")

    def image_loader(self) -> ImageLoader:
        """An image loader with these settings' LS host, key, limits and outbound policy."""
        return ImageLoader(
            self.label_studio_url,
            self.label_studio_api_key,
            self.max_download_bytes,
            self.max_image_pixels,
            self.download_timeout_seconds,
            self.image_cache_bytes,
            download_deadline_seconds=self.download_deadline_seconds,
            outbound_allow=self.outbound_allow,
            trust_setup_host=self.label_studio_trust_setup_host,
        )

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.queues.split(",") if name.strip())


def _convert(kind: object, raw: str, variable: str) -> object:
    """An env string as the field's type (Path, int, float, bool, str; ``X | None`` as X)."""
    options = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    target = options[0]
    try:
        if target is bool:
            return _flag(raw)
        return target(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {target.__name__}") from None


# field -> env variables, first found wins (LS / label-studio-ml conventions first).
ENV: dict[str, tuple[str, ...]] = {
    "host": ("HOST",),
    "port": ("PORT",),
    "checkpoint": ("CHECKPOINT", "EFFICIENTSAM_CHECKPOINT"),
    "model_dir": ("MODEL_DIR",),
    "device": ("DEVICE",),
    "precision": ("PRECISION",),
    "threads": ("TORCH_THREADS",),
    "label_studio_url": ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST"),
    "label_studio_api_key": ("LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN"),
    "basic_auth_user": ("BASIC_AUTH_USER",),
    "basic_auth_pass": ("BASIC_AUTH_PASS",),
    "redis_url": ("REDIS_URL",),
    "embedding_cache_bytes": ("EMBEDDING_CACHE_BYTES",),
    "image_cache_bytes": ("IMAGE_CACHE_BYTES",),
    "max_download_bytes": ("MAX_DOWNLOAD_BYTES",),
    "max_request_bytes": ("MAX_REQUEST_BYTES",),
    "max_image_pixels": ("MAX_IMAGE_PIXELS",),
    "download_timeout_seconds": ("DOWNLOAD_TIMEOUT_SECONDS",),
    "download_deadline_seconds": ("DOWNLOAD_DEADLINE_SECONDS",),
    "outbound_allow": ("OUTBOUND_ALLOW",),
    "label_studio_trust_setup_host": ("LABEL_STUDIO_TRUST_SETUP_HOST",),
    "batch_time_budget_seconds": ("BATCH_TIME_BUDGET_SECONDS",),
    "version_pick_cache_seconds": ("VERSION_PICK_CACHE_SECONDS",),
    "log_level": ("LOG_LEVEL",),
    "autolabel_mode": ("AUTOLABEL_MODE",),
    "autolabel_points_per_side": ("AUTOLABEL_POINTS_PER_SIDE",),
    "redis_key_prefix": ("REDIS_KEY_PREFIX",),
    "queues": ("WORKER_QUEUES",),
    "interactive_wait_seconds": ("INTERACTIVE_WAIT_SECONDS",),
    "interactive_job_timeout": ("INTERACTIVE_JOB_TIMEOUT",),
    "batch_job_timeout": ("BATCH_JOB_TIMEOUT",),
    "train_job_timeout": ("TRAIN_JOB_TIMEOUT",),
    "batch_retries": ("BATCH_RETRIES",),
    "batch_retry_delay_seconds": ("BATCH_RETRY_DELAY_SECONDS",),
    "worker_heartbeat_seconds": ("WORKER_HEARTBEAT_SECONDS",),
    "shared_cache_bytes": ("SHARED_CACHE_BYTES",),
    "shared_cache_ttl_seconds": ("SHARED_CACHE_TTL_SECONDS",),
    "shared_cache_dtype": ("SHARED_CACHE_DTYPE",),
    "train_from": ("TRAIN_FROM",),
    "train_steps": ("TRAIN_STEPS",),
    "train_lora_rank": ("TRAIN_LORA_RANK",),
    "train_held_out_fraction": ("TRAIN_HELD_OUT_FRACTION",),
    "train_min_tasks": ("TRAIN_MIN_TASKS",),
    "train_promotion_margin": ("TRAIN_PROMOTION_MARGIN",),
    "train_min_new_annotations": ("TRAIN_MIN_NEW_ANNOTATIONS",),
    "train_check_seconds": ("TRAIN_CHECK_SECONDS",),
}

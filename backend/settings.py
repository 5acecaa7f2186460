"""All backend configuration in one object, read from the environment (Label Studio's names)."""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path


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
    max_image_pixels: int = 64_000_000
    download_timeout_seconds: float = 20.0
    batch_time_budget_seconds: float = 60.0  # LS cuts /predict at 100 s
    log_level: str = "INFO"

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
    "max_image_pixels": ("MAX_IMAGE_PIXELS",),
    "download_timeout_seconds": ("DOWNLOAD_TIMEOUT_SECONDS",),
    "batch_time_budget_seconds": ("BATCH_TIME_BUDGET_SECONDS",),
    "log_level": ("LOG_LEVEL",),
}

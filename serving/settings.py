"""All backend configuration in one object, read from the environment (Label Studio's names).

Each setting is declared once, as a field of :class:`Settings` made by :func:`setting`: its
default, its env variables (first found wins) and its help text. The shells' ``--help``, README's
table (``python -m serving.settings --markdown``) and :data:`ENV` are derived from it.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from serving.labelstudio.context import MAX_IMAGE_PIXELS
from serving.labelstudio.images import ImageLoader
from serving.labelstudio.outbound import parse_allow

AUTOLABEL_MODES = ("auto", "boxes", "everything", "off")
QUEUE_NAMES = ("interactive", "batch", "train")  # in priority order
PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # efficientsam.precision
SHARED_CACHE_DTYPES = ("float16", "float32")
TRAIN_FROM = ("base", "current")
MiB, GiB, HOUR, DAY = 1024**2, 1024**3, 3600, 24 * 3600


def setting(default: Any, *env: str, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A :class:`Settings` field: ``default``, its ``env`` variables (LS / label-studio-ml
    conventions first; the first one set wins), ``help`` (one line) and, for a few, ``choices``."""
    if not env:
        raise TypeError("a setting needs at least one env variable")
    return field(default=default, metadata={"env": env, "help": help, "choices": choices})


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    """Backend settings. Every field has env variables (``ENV``, :func:`setting`); flags win."""

    # -- the HTTP server and the model
    host: str = setting("0.0.0.0", "HOST", help="address the HTTP server listens on")
    port: int = setting(9090, "PORT", help="port the HTTP server listens on")
    checkpoint: Path | None = setting(
        None,
        "CHECKPOINT",
        "EFFICIENTSAM_CHECKPOINT",
        help="EfficientSAM weights (.pt, .pt.zip or .safetensors); unset: the first released "
        "file found in MODEL_DIR (efficient_sam_vitt.pt, efficient_sam_vits.pt.zip, ...)",
    )
    model_dir: Path = setting(
        Path("models"),
        "MODEL_DIR",
        help="where the checkpoint is looked for without CHECKPOINT; fine-tuned versions live here",
    )
    device: str = setting("auto", "DEVICE", help="cpu, cuda, cuda:N or auto")
    precision: str = setting(
        "auto",
        "PRECISION",
        help="encoder precision: auto (the bfloat16/float16 fast mode where the GPU, or a CPU "
        "with AMX, runs it natively and a start-up check on a built-in image passes: best-mask "
        "IoU vs float32 >= 0.99, >= 1.25x faster; else float32), float32, bfloat16 or float16",
        choices=PRECISIONS,
    )
    threads: int = setting(0, "TORCH_THREADS", help="torch CPU threads; 0: torch's default")
    log_level: str = setting("INFO", "LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")
    # -- Label Studio and HTTP security
    label_studio_url: str = setting(
        "",
        "LABEL_STUDIO_URL",
        "LABEL_STUDIO_HOST",
        help="Label Studio's address, e.g. http://localhost:8080 (relative image URLs, LS API)",
    )
    label_studio_api_key: str = setting(
        "",
        "LABEL_STUDIO_API_KEY",
        "LABEL_STUDIO_ACCESS_TOKEN",
        help="Label Studio legacy token or personal access token (PAT)",
    )
    basic_auth_user: str = setting(
        "", "BASIC_AUTH_USER", help="HTTP basic auth on every route: user (set both or neither)"
    )
    basic_auth_pass: str = setting("", "BASIC_AUTH_PASS", help="HTTP basic auth: password")
    label_studio_trust_setup_host: bool = setting(
        False,
        "LABEL_STUDIO_TRUST_SETUP_HOST",
        help="without LABEL_STUDIO_URL, use /setup's hostname and token as the LS host (off: "
        "any caller of /setup could pick the host that relative image URLs are fetched from)",
    )
    outbound_allow: str = setting(
        "",
        "OUTBOUND_ALLOW",
        help="hosts other than LS's that may resolve to non-public addresses (refused "
        "otherwise): comma-separated names (`*.suffix` too) and IPs/CIDRs, e.g. "
        "minio.internal,10.0.0.0/8",
    )
    version_pick_cache_seconds: float = setting(
        15.0,
        "VERSION_PICK_CACHE_SECONDS",
        help="how long the model version picked in LS (its ML backend record) is cached",
    )
    # -- limits: memory, downloads, requests
    embedding_cache_bytes: int = setting(
        512 * MiB, "EMBEDDING_CACHE_BYTES", help="image embeddings kept in this process"
    )
    image_cache_bytes: int = setting(
        256 * MiB, "IMAGE_CACHE_BYTES", help="downloaded (decoded) images kept in this process"
    )
    max_download_bytes: int = setting(64 * MiB, "MAX_DOWNLOAD_BYTES", help="largest image download")
    max_image_pixels: int = setting(
        MAX_IMAGE_PIXELS,
        "MAX_IMAGE_PIXELS",
        help="largest image (checked before decoding) and image size a prompt may claim",
    )
    download_timeout_seconds: float = setting(
        20.0, "DOWNLOAD_TIMEOUT_SECONDS", help="image download timeout per connect/read"
    )
    download_deadline_seconds: float = setting(
        60.0, "DOWNLOAD_DEADLINE_SECONDS", help="image download deadline, redirects included"
    )
    # LS sends tasks with their annotations and predictions (brush RLE; a 12 MP object's mask
    # is ~60 KB of JSON): 64 MiB holds ~1,000 of them.
    max_request_bytes: int = setting(
        64 * MiB,
        "MAX_REQUEST_BYTES",
        help="a larger request body is refused (413) before it is read; parsing JSON takes up "
        "to ~12x its size (at least 65536)",
    )
    # Each JSON object or array costs Python 60-250 bytes for 2 to 8 bytes of JSON.
    max_json_containers: int = setting(
        1_000_000,
        "MAX_JSON_CONTAINERS",
        help="a request body with more JSON objects and arrays is refused (413)",
    )
    max_tasks_per_request: int = setting(
        10_000,
        "MAX_TASKS_PER_REQUEST",
        help='a /predict with more tasks is refused (413); LS\'s "Retrieve predictions" sends '
        "every selected task at once",
    )
    # -- batch predictions ("Retrieve predictions")
    autolabel_mode: str = setting(
        "auto",
        "AUTOLABEL_MODE",
        help="boxes (rectangles -> masks), everything (automatic masks), auto (boxes when the "
        "task has rectangles, else everything) or off",
        choices=AUTOLABEL_MODES,
    )
    autolabel_points_per_side: int = setting(
        0,
        "AUTOLABEL_POINTS_PER_SIDE",
        help="segment-everything grid side (0 to 64); 0: 32 on GPU, 16 on CPU",
    )
    batch_time_budget_seconds: float = setting(
        60.0,
        "BATCH_TIME_BUDGET_SECONDS",
        help="embedded: a /predict starts no new task after this (LS cuts /predict at 100 s)",
    )
    box_chunk_pixels: int = setting(
        16_000_000,
        "BOX_CHUNK_PIXELS",
        help="rectangles -> masks: at most this many mask pixels at once (5 bytes a pixel)",
    )
    # -- Redis/RQ (used when redis_url is set)
    redis_url: str = setting(
        "",
        "REDIS_URL",
        help="redis://, rediss:// or unix://: work goes to `python -m worker` processes; "
        "empty: the model runs in the backend's process",
    )
    redis_key_prefix: str = setting(
        "efficientsam",
        "REDIS_KEY_PREFIX",
        help="prefix of our own Redis keys (RQ keeps its rq: keys)",
    )
    queues: str = setting(
        "interactive,batch",
        "WORKER_QUEUES",
        help="what `python -m worker` takes, highest priority first (interactive, batch, train)",
    )
    interactive_wait_seconds: float = setting(
        30.0, "INTERACTIVE_WAIT_SECONDS", help="the backend waits this long for a click's job"
    )
    interactive_job_timeout: int = setting(
        60, "INTERACTIVE_JOB_TIMEOUT", help="a click's job is stopped after this many seconds"
    )
    batch_job_timeout: int = setting(
        900,
        "BATCH_JOB_TIMEOUT",
        help="a batch-queue job (a task, prewarm) is stopped after this many seconds",
    )
    train_job_timeout: int = setting(
        4 * HOUR, "TRAIN_JOB_TIMEOUT", help="a fine-tune job is stopped after this many seconds"
    )
    batch_retries: int = setting(
        2, "BATCH_RETRIES", help="a failed batch task is retried this often, then reported"
    )
    batch_retry_delay_seconds: int = setting(
        10, "BATCH_RETRY_DELAY_SECONDS", help="seconds between a batch task's retries"
    )
    worker_heartbeat_seconds: int = setting(
        5,
        "WORKER_HEARTBEAT_SECONDS",
        help="worker heartbeat; a killed worker's job is retried within ~3 of these",
    )
    waited_result_ttl_seconds: int = setting(
        60,
        "WAITED_RESULT_TTL_SECONDS",
        help="Redis keeps the result of a job the backend waits for (a click) this long",
    )
    waited_failure_ttl_seconds: int = setting(
        DAY,
        "WAITED_FAILURE_TTL_SECONDS",
        help="Redis keeps a failed click job (`python -m worker status`) this long",
    )
    result_ttl_seconds: int = setting(
        DAY,
        "RESULT_TTL_SECONDS",
        help="Redis keeps a queued job's result (batch task, prewarm, fine-tune) this long",
    )
    failure_ttl_seconds: int = setting(
        7 * DAY,
        "FAILURE_TTL_SECONDS",
        help="Redis keeps a failed queued job and its reason (`python -m worker status`) this long",
    )
    shared_cache_bytes: int = setting(
        GiB, "SHARED_CACHE_BYTES", help="embeddings in Redis, shared by all workers"
    )
    shared_cache_ttl_seconds: int = setting(
        7 * DAY, "SHARED_CACHE_TTL_SECONDS", help="an embedding in Redis expires after this"
    )
    shared_cache_dtype: str = setting(
        "float16",
        "SHARED_CACHE_DTYPE",
        help="float16 halves the bytes (measured: mask IoU 0.9998) or float32",
        choices=SHARED_CACHE_DTYPES,
    )
    housekeeping_seconds: int = setting(
        300,
        "HOUSEKEEPING_SECONDS",
        help="how often `python -m worker cron` prunes the shared cache and re-publishes the "
        "model registry if Redis lost it",
    )
    # -- model versions
    loaded_versions: int = setting(
        4,
        "LOADED_VERSIONS",
        help="fine-tuned versions kept in memory per process (~4 MiB each, decoder only)",
    )
    version_error_seconds: float = setting(
        3600.0,
        "VERSION_ERROR_SECONDS",
        help="a version that failed to load is reported this long (/health, /metrics)",
    )
    # -- fine-tuning (a project's annotations -> a new version of the model for that project)
    train_from: str = setting(
        "base",
        "TRAIN_FROM",
        help="start from the released weights (base) or the project's version (current)",
        choices=TRAIN_FROM,
    )
    train_steps: int = setting(0, "TRAIN_STEPS", help="optimiser steps; 0: the library's default")
    train_lora_rank: int = setting(
        0, "TRAIN_LORA_RANK", help="> 0: LoRA on the image encoder's qkv/proj too (peft)"
    )
    train_held_out_fraction: float = setting(
        0.2,
        "TRAIN_HELD_OUT_FRACTION",
        help="tasks held out for the promotion decision (between 0 and 1)",
    )
    train_min_tasks: int = setting(
        3, "TRAIN_MIN_TASKS", help="annotated tasks needed before a fine-tune runs"
    )
    train_promotion_margin: float = setting(
        0.01,
        "TRAIN_PROMOTION_MARGIN",
        help="held-out mIoU gain needed to promote a candidate",
    )
    train_min_new_annotations: int = setting(
        20,
        "TRAIN_MIN_NEW_ANNOTATIONS",
        help="the periodic trigger: new annotations since the last run",
    )
    train_check_seconds: int = setting(
        300,
        "TRAIN_CHECK_SECONDS",
        help="how often `python -m worker cron` looks at the projects",
    )

    # -- SAMI (the served model teaches a Ti student on the project's images, then fine-tune)
    sami_student: Path | None = setting(
        None,
        "SAMI_STUDENT",
        help="Ti checkpoint a SAMI student starts from (a project served by a SAMI student "
        "goes on from that); unset: the base if it is a Ti, else efficient_sam_vitt.pt in "
        "MODEL_DIR, else random weights",
    )
    sami_steps: int = setting(
        400, "SAMI_STEPS", help="SAMI masked-pretraining steps (SAMI_BATCH_SIZE images each)"
    )
    sami_align_steps: int = setting(
        100, "SAMI_ALIGN_STEPS", help="unmasked alignment steps after the masked pretraining"
    )
    sami_batch_size: int = setting(2, "SAMI_BATCH_SIZE", help="images per SAMI step")
    sami_mask_ratio: float = setting(
        0.75, "SAMI_MASK_RATIO", help="share of the image tokens hidden from the student"
    )
    sami_max_images: int = setting(
        200, "SAMI_MAX_IMAGES", help="the project's newest task images a SAMI run learns from"
    )
    sami_min_agreement: float = setting(
        0.9,
        "SAMI_MIN_AGREEMENT",
        help="held-out mask IoU with the teacher a SAMI candidate needs to be promoted",
    )
    sami_miou_margin: float = setting(
        -0.02,
        "SAMI_MIOU_MARGIN",
        help="held-out mIoU a SAMI candidate may lose (< 0) against the served model",
    )

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
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be auto, float32, bfloat16 or float16: {self.precision}"
            )
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
        if self.shared_cache_dtype not in SHARED_CACHE_DTYPES:
            raise ValueError(
                f"SHARED_CACHE_DTYPE must be float16 or float32: {self.shared_cache_dtype}"
            )
        if self.train_from not in TRAIN_FROM:
            raise ValueError(f"TRAIN_FROM must be current or base: {self.train_from}")
        if not 0 < self.train_held_out_fraction < 1:
            raise ValueError("TRAIN_HELD_OUT_FRACTION must be between 0 and 1")
        if not 0 < self.sami_mask_ratio < 1:
            raise ValueError("SAMI_MASK_RATIO must be between 0 and 1")
        if self.sami_steps < 0 or self.sami_align_steps < 0:
            raise ValueError("SAMI_STEPS and SAMI_ALIGN_STEPS must be >= 0")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            scheme = self.redis_url.split("://", 1)[0] if "://" in self.redis_url else "no scheme"
            raise ValueError(f"REDIS_URL must be redis://, rediss:// or unix://, got {scheme}")
        if not self.queue_names or set(self.queue_names) - set(QUEUE_NAMES):
            raise ValueError(f"queues must be some of {', '.join(QUEUE_NAMES)}: {self.queues}")
        for name in POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{ENV[name][0]} must be > 0")

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
    target = _value_type(kind)
    try:
        if target is bool:
            return _flag(raw)
        return target(raw)
    except ValueError:
        raise ValueError(f"{variable}={raw!r} is not a valid {target.__name__}") from None


def _value_type(kind: object) -> type:
    """``X`` of a field's type ``X`` or ``X | None``."""
    options = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    return options[0]


SETTINGS: dict[str, Field] = {f.name: f for f in fields(Settings)}
# field -> env variables, first found wins (LS / label-studio-ml conventions first).
ENV: dict[str, tuple[str, ...]] = {name: f.metadata["env"] for name, f in SETTINGS.items()}
# Must be > 0: RQ keeps no result at all with a TTL of 0, and a cron interval of 0 would spin.
POSITIVE = (
    "waited_result_ttl_seconds",
    "waited_failure_ttl_seconds",
    "result_ttl_seconds",
    "failure_ttl_seconds",
    "housekeeping_seconds",
    "sami_batch_size",
    "sami_max_images",
)


def default_text(name: str) -> str:
    """A setting's default as written in env (bytes in MiB/GiB, long durations in h/days too)."""
    value = SETTINGS[name].default
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value)
    if name.endswith("_bytes") and value % MiB == 0:
        unit = ("GiB", GiB) if value % GiB == 0 else ("MiB", MiB)
        return f"{text} ({value // unit[1]} {unit[0]})"
    if name.endswith(("_seconds", "_timeout")) and value >= HOUR and value % HOUR == 0:
        unit = ("days", DAY) if value % DAY == 0 and value > DAY else ("h", HOUR)
        return f"{text} ({int(value // unit[1])} {unit[0]})"
    return text


def option_help(name: str) -> str:
    """``--help`` text of a setting: its help, env variables and default (argparse-escaped)."""
    variables = " or ".join(ENV[name])
    text = f"{SETTINGS[name].metadata['help']} (env {variables}; default: {default_text(name)})"
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, *names: str) -> None:
    """A ``--name-with-dashes`` option for each setting in ``names``: its type, choices and help
    from the declaration; ``dest`` is the field name and its default None (env, then the
    setting's default, apply)."""
    types = typing.get_type_hints(Settings)
    for name in names:
        kind = _value_type(types[name])
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=None if kind is str else kind,
            choices=SETTINGS[name].metadata["choices"] or None,
            help=option_help(name),
        )


def env_help(exclude: tuple[str, ...] = ()) -> str:
    """Every setting but ``exclude`` as an argparse epilog: env variables, default, help."""
    lines = ["environment (every setting; a flag wins over its variable):"]
    for name in SETTINGS:
        if name in exclude:
            continue
        lines.append(f"  {' or '.join(ENV[name])} (default: {default_text(name)})")
        lines += textwrap.wrap(
            SETTINGS[name].metadata["help"], 79, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
    return "\n".join(lines)


def markdown_table() -> str:
    """README's configuration table: env variables (first found wins), default, meaning."""
    rows = ["| env variable | default | meaning |", "|---|---|---|"]
    for name in SETTINGS:
        variables = " or ".join(f"`{variable}`" for variable in ENV[name])
        meaning = SETTINGS[name].metadata["help"].replace("|", "\\|")
        rows.append(f"| {variables} | {default_text(name)} | {meaning} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.settings [--markdown]``: every setting, as text or README's table."""
    parser = argparse.ArgumentParser(prog="python -m serving.settings", description=main.__doc__)
    parser.add_argument("--markdown", action="store_true", help="README's configuration table")
    args = parser.parse_args(argv)
    print(markdown_table() if args.markdown else env_help())
    return 0


if __name__ == "__main__":
    sys.exit(main())

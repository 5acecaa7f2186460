"""Settings from env vars (LS names), overrides, validation."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from serving.settings import ENV, SETTINGS, Settings, setting


def test_env_names_and_overrides():
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "http://ls:8080",
            "LABEL_STUDIO_API_KEY": "abc",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "p",
            "MODEL_DIR": "/models",
            "PORT": "9191",
            "EMBEDDING_CACHE_BYTES": "1000",
        },
        port=9292,
    )
    assert settings.label_studio_url == "http://ls:8080" and settings.label_studio_api_key == "abc"
    assert settings.basic_auth_enabled and settings.model_dir == Path("/models")
    assert settings.port == 9292 and settings.embedding_cache_bytes == 1000


def test_training_settings():
    defaults = Settings.from_env({})
    assert defaults.train_from == "base" and defaults.train_lora_rank == 0
    settings = Settings.from_env(
        {
            "TRAIN_FROM": "current",
            "TRAIN_STEPS": "50",
            "TRAIN_LORA_RANK": "4",
            "TRAIN_MIN_NEW_ANNOTATIONS": "5",
            "TRAIN_PROMOTION_MARGIN": "0.02",
        }
    )
    assert (settings.train_from, settings.train_steps, settings.train_lora_rank) == (
        "current",
        50,
        4,
    )
    assert settings.train_min_new_annotations == 5 and settings.train_promotion_margin == 0.02


def test_legacy_fallback_names():
    settings = Settings.from_env(
        {"LABEL_STUDIO_HOST": "http://h:1", "LABEL_STUDIO_ACCESS_TOKEN": "t"}
    )
    assert settings.label_studio_url == "http://h:1" and settings.label_studio_api_key == "t"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PORT": "x"}, "PORT='x'"),
        ({"BASIC_AUTH_USER": "u"}, "both"),
        ({"LABEL_STUDIO_URL": "ls:8080"}, "http"),
        ({"PRECISION": "int8"}, "precision"),
        ({"TRAIN_FROM": "latest"}, "TRAIN_FROM must be current or base"),
        ({"TRAIN_HELD_OUT_FRACTION": "1.5"}, "TRAIN_HELD_OUT_FRACTION"),
        ({"MAX_REQUEST_BYTES": "0"}, "MAX_REQUEST_BYTES"),
    ],
)
def test_bad_settings(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


# The env variables every setting had before each was declared with its field: none may change
# (deployments set them).
EXISTING_VARIABLES = {
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
# Values the settings' validation accepts for the fields whose type says too little.
SAMPLES = {
    "label_studio_url": "http://ls:8080",
    "redis_url": "redis://redis:6379/1",
    "queues": "train",
    "outbound_allow": "10.0.0.0/8",
}
PARTNERS = {
    "basic_auth_user": {"BASIC_AUTH_PASS": "p"},
    "basic_auth_pass": {"BASIC_AUTH_USER": "u"},
}


def sample(name: str) -> tuple[str, object]:
    """An env string for setting ``name`` other than its default, and the value it reads as."""
    default, choices = SETTINGS[name].default, SETTINGS[name].metadata["choices"]
    if name in SAMPLES:
        return SAMPLES[name], SAMPLES[name]
    if choices:
        other = next(choice for choice in choices if choice != default)
        return other, other
    if isinstance(default, bool):
        return "yes", True
    if isinstance(default, int):
        return str(default + 1), default + 1
    if isinstance(default, float):
        return str(default / 2), default / 2
    if name in ("checkpoint", "model_dir", "sami_student"):
        return "/somewhere/else", Path("/somewhere/else")
    return "x", "x"


def test_existing_env_names_and_aliases_are_kept():
    assert {name: ENV[name] for name in EXISTING_VARIABLES} == EXISTING_VARIABLES


def test_each_field_declares_its_variables_help_and_default():
    assert list(ENV) == [f.name for f in fields(Settings)]
    variables = [variable for names in ENV.values() for variable in names]
    assert len(variables) == len(set(variables)), "a variable read by two settings"
    for f in fields(Settings):
        assert f.metadata["env"] and all(re.fullmatch(r"[A-Z][A-Z0-9_]*", v) for v in ENV[f.name])
        assert f.metadata["help"].strip() and "\n" not in f.metadata["help"], f.name
    assert Settings() == Settings.from_env({})  # every default passes validation


@pytest.mark.parametrize("name", list(ENV))
def test_each_variable_of_each_setting_is_read(name):
    raw, value = sample(name)
    assert value != SETTINGS[name].default
    for variable in ENV[name]:
        settings = Settings.from_env({variable: raw, **PARTNERS.get(name, {})})
        assert getattr(settings, name) == value, variable


@pytest.mark.parametrize(
    ("name", "first", "value"),
    [
        ("checkpoint", "/first.pt", Path("/first.pt")),
        ("label_studio_url", "http://first:1", "http://first:1"),
        ("label_studio_api_key", "first", "first"),
    ],
)
def test_the_first_variable_set_wins_and_empty_ones_are_skipped(name, first, value):
    primary, alias = ENV[name]
    raw, alias_value = sample(name)
    assert getattr(Settings.from_env({alias: raw, primary: first}), name) == value
    assert getattr(Settings.from_env({primary: "", alias: raw}), name) == alias_value
    assert getattr(Settings.from_env({alias: raw}), name) == alias_value


def test_setting_needs_a_variable():
    with pytest.raises(TypeError, match="env variable"):
        setting(1, help="no variable")


def test_moved_knobs_keep_their_values():
    """Constants that became settings (RQ's TTLs, request bounds, caches) kept their values."""
    settings = Settings()
    assert (settings.waited_result_ttl_seconds, settings.waited_failure_ttl_seconds) == (
        60,
        24 * 3600,
    )
    assert (settings.result_ttl_seconds, settings.failure_ttl_seconds) == (24 * 3600, 7 * 86400)
    assert (settings.max_json_containers, settings.max_tasks_per_request) == (1_000_000, 10_000)
    assert (settings.loaded_versions, settings.version_error_seconds) == (4, 3600.0)
    assert (settings.box_chunk_pixels, settings.housekeeping_seconds) == (16_000_000, 300)


@pytest.mark.parametrize("variable", ["RESULT_TTL_SECONDS", "WAITED_RESULT_TTL_SECONDS"])
def test_a_ttl_of_zero_is_refused(variable):
    with pytest.raises(ValueError, match=f"{variable} must be > 0"):
        Settings.from_env({variable: "0"})

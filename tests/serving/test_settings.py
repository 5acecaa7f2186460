"""Settings from env vars (LS names), overrides, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.settings import Settings


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

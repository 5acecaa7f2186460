"""Model versions on disk and their copy in Redis."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from worker.registry import (
    ModelRegistry,
    RegistryError,
    VersionDirectory,
    fine_tune_version,
    project_id,
    read_safetensors_metadata,
)

BASE = "efficientsam-ti-1a2b3c4d"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7.1795532368", "7"),
        (7, "7"),
        ({"id": 12, "title": "x"}, "12"),
        (None, None),
        ("x", None),
        (True, None),
    ],
)
def test_project_id(value, expected):
    assert project_id(value) == expected


def store_version(registry: ModelRegistry, project: str, number: int) -> str:
    version = fine_tune_version(BASE, project, number)
    registry.versions_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"base": BASE, "project": project, "metrics": json.dumps({"box_miou": 0.5})}
    save_file(
        {"mask_decoder.iou_token.weight": torch.zeros(1, 256)},
        registry.version_path(version),
        metadata,
    )
    return version


def test_promote_reject_rollback_history(tmp_path):
    registry = ModelRegistry(tmp_path)
    assert registry.current_version("3") is None
    first, second = store_version(registry, "3", 1), store_version(registry, "3", 2)
    assert first == f"{BASE}+p3-ft1"
    registry.promote("3", first, {"metrics": {"box_miou": 0.5}})
    registry.reject("3", second, "box mIoU 0.40 < 0.50 + margin")
    assert registry.current_version("3") == first
    registry.promote("3", second)
    assert registry.current_version("3") == second
    assert registry.rollback("3")["current"] == first  # the one before
    assert registry.rollback("3", "base")["current"] is None
    state = registry.project_state("3")
    assert [e["event"] for e in state["history"]] == [
        "promoted",
        "rejected",
        "promoted",
        "rolled_back",
        "rolled_back",
    ]
    assert state["history"][1]["reason"].startswith("box mIoU") and state["promoted"] == 2
    assert registry.version_info(first).metadata["metrics"] == {"box_miou": 0.5}


def test_versions_of_other_projects_are_refused(tmp_path):
    registry = ModelRegistry(tmp_path)
    other = store_version(registry, "4", 1)
    with pytest.raises(RegistryError):
        registry.promote("3", other)
    with pytest.raises(RegistryError):
        registry.rollback("3", other)
    with pytest.raises(RegistryError):
        registry.version_info("efficientsam-ti-00000000+p3-ft9")
    with pytest.raises(RegistryError):
        registry.project_state("../etc")


def test_metadata_is_read_without_tensors(tmp_path):
    registry = ModelRegistry(tmp_path)
    version = store_version(registry, "5", 1)
    assert read_safetensors_metadata(registry.version_path(version))["base"] == BASE


def test_redis_copy_and_republish_after_a_flush(tmp_path, redis_connection):
    registry = ModelRegistry(tmp_path, redis_connection, "t")
    directory = VersionDirectory(redis_connection, "t")
    assert directory.current("3") is None  # no worker yet
    registry.publish_base({"version": BASE})
    assert directory.current("3") == BASE and directory.current(None) == BASE
    version = store_version(registry, "3", 1)
    registry.promote("3", version)
    assert directory.current("3") == version and directory.current("4") == BASE
    redis_connection.flushdb()  # a Redis restart without persistence
    assert directory.current("3") is None
    assert registry.ensure_published() is True
    assert directory.current("3") == version
    assert registry.ensure_published() is False
    registry.rollback("3", "base")
    assert directory.current("3") == BASE

"""Model versions on disk and their copy in Redis."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from serving.labelstudio.tasks import project_id
from serving.registry import (
    ModelRegistry,
    RegistryError,
    StaleCandidate,
    VersionDirectory,
    fine_tune_version,
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
    state = registry.version_history("3")
    assert [e["event"] for e in state["history"]] == [
        "promoted",
        "rejected",
        "promoted",
        "rolled_back",
        "rolled_back",
    ]
    assert state["history"][1]["reason"].startswith("box mIoU") and state["promoted"] == 2
    assert registry.version_info(first).metadata["metrics"] == {"box_miou": 0.5}


def test_a_candidate_measured_against_a_replaced_version_is_never_promoted(tmp_path):
    """Two runs of one project (a fine-tune and a SAMI run on two train workers) both measured
    against the base: the first promotes; the second, whose comparison is out of date, changes
    nothing and says why."""
    registry = ModelRegistry(tmp_path)
    first, second = store_version(registry, "3", 1), store_version(registry, "3", 2)
    registry.promote("3", first, replacing=None)
    with pytest.raises(StaleCandidate, match=f"changed during the run \\(to {re.escape(first)}"):
        registry.promote("3", second, replacing=None)
    state = registry.version_history("3")
    assert state["current"] == first and len(state["history"]) == 1
    registry.promote("3", second, replacing=first)  # measured against the current one: fine
    assert registry.current_version("3") == second


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
        registry.version_history("../etc")


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


def _run_processes(targets: list[tuple]) -> None:
    """Start one spawned process per (function, args), release them together, wait for all."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start = context.Event()
    processes = [
        context.Process(target=function, args=(*args, start)) for function, args in targets
    ]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0


@pytest.mark.slow
def test_history_updates_from_several_processes_are_never_lost(tmp_path):
    """Three processes appending events and one rolling back, all at once, on one project's
    history: every entry of every process is there, in each process's order."""
    from tests.worker import registry_writers

    writers, count = 3, 40
    _run_processes(
        [(registry_writers.record_events, (str(tmp_path), w, count)) for w in range(writers)]
        + [(registry_writers.roll_back, (str(tmp_path), count))]
    )
    history = ModelRegistry(tmp_path).version_history("3")["history"]
    assert len(history) == (writers + 1) * count
    for writer in range(writers):
        mine = [e["n"] for e in history if e.get("writer") == writer]
        assert mine == list(range(count))
    assert sum(e["event"] == "rolled_back" for e in history) == count


def test_concurrent_runs_never_overwrite_a_stored_version(tmp_path):
    """Runs storing versions of one project at once (each its own registry, as separate
    processes have) each get their own file: every name is returned once and its file holds
    the tensors and metadata of the run that got it."""
    import threading

    writers, count = 4, 25
    start, stored = threading.Barrier(writers), []

    def run(writer: int) -> None:
        registry = ModelRegistry(tmp_path)
        tensors = {"mask_decoder.iou_token.weight": torch.full((256, 1024), float(writer))}
        start.wait()
        for number in range(count):
            metadata = {"writer": writer, "n": number}
            stored.append((writer, number, registry.store_version("3", BASE, tensors, metadata)))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = [version for _, _, version in stored]
    assert len(names) == writers * count and len(set(names)) == len(names)
    registry = ModelRegistry(tmp_path)
    for writer, number, version in stored:
        metadata = registry.version_info(version).metadata
        assert (metadata["writer"], metadata["n"], metadata["version"]) == (writer, number, version)
    assert not [p for p in registry.versions_dir.iterdir() if not p.name.endswith(".safetensors")]


def test_the_redis_copy_is_republished_whenever_it_differs_from_the_disk(
    tmp_path, redis_connection
):
    """Not only after a restart (the marker key gone): a project key lost, overwritten or left
    over from a project the disk does not have, or the base description lost, is corrected."""
    registry = ModelRegistry(tmp_path, redis_connection, "t")
    directory = VersionDirectory(redis_connection, "t")
    registry.publish_base({"version": BASE})
    version = store_version(registry, "3", 1)
    registry.promote("3", version)
    assert registry.ensure_published() is False  # in step
    redis_connection.delete("t:model:project:3")
    assert directory.current("3") == BASE
    assert registry.ensure_published() is True and directory.current("3") == version
    redis_connection.set("t:model:project:3", f"{BASE}+p3-ft9")
    assert registry.ensure_published() is True and directory.current("3") == version
    redis_connection.set("t:model:project:8", f"{BASE}+p8-ft1")
    assert registry.ensure_published() is True and directory.current("8") == BASE
    redis_connection.delete("t:model:base")
    assert registry.ensure_published() is True and directory.current(None) == BASE
    assert registry.ensure_published() is False

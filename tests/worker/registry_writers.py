"""Functions that test_registry.py runs in separate processes (spawned: importable, light)."""

from __future__ import annotations

from pathlib import Path

from serving.registry import ModelRegistry


def record_events(model_dir: str, writer: int, count: int, start) -> None:
    """Append ``count`` events of ``writer`` to project 3's history, after ``start`` is set."""
    registry = ModelRegistry(Path(model_dir))
    start.wait()
    for number in range(count):
        registry.record("3", {"event": "note", "writer": writer, "n": number})


def roll_back(model_dir: str, count: int, start) -> None:
    """``count`` roll-backs of project 3 to the base (what the CLI does)."""
    registry = ModelRegistry(Path(model_dir))
    start.wait()
    for _ in range(count):
        registry.rollback("3", "base")

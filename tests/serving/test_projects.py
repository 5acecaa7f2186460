"""Per-project state from LS webhooks: the in-memory store and the Redis one behave alike."""

from __future__ import annotations

import pytest

from serving.labelstudio.tasks import annotation_events
from serving.projects import MemoryProjectState, RedisProjectState


def created(annotation_id: int, task: int = 1, cancelled: bool = False) -> dict:
    return {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 3},
        "annotation": {"id": annotation_id, "task": task, "was_cancelled": cancelled, "result": []},
        "task": {"id": task},
    }


def test_annotation_events_from_every_shape():
    events, deleted = annotation_events(created(5, task=9))
    assert events == [{"id": 5, "task": 9, "updated_at": None, "cancelled": False}] and not deleted
    bulk = {
        "action": "ANNOTATIONS_CREATED",
        "annotation": [{"id": 1, "task": {"id": 2}}, {"id": 3}],
    }
    assert [e["id"] for e in annotation_events(bulk)[0]] == [1, 3]
    assert annotation_events(bulk)[0][0]["task"] == 2
    assert annotation_events({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 4}]}) == (
        [],
        [4],
    )
    assert annotation_events({"action": "TASKS_CREATED", "tasks": []}) == ([], [])


@pytest.fixture(params=["memory", "redis"])
def state(request, redis_connection):
    if request.param == "memory":
        return MemoryProjectState()
    return RedisProjectState(redis_connection, "t")


def test_new_annotations_count_once_skip_cancelled_and_deletions(state):
    for payload in (created(1), created(1), created(2), created(3, cancelled=True)):
        count = state.record("3", *annotation_events(payload))
    assert count == 2  # annotation 1 saved twice counts once; the skipped task never counts
    assert state.record("3", *annotation_events(created(2, cancelled=True))) == 1  # now skipped
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}]}
    assert state.record("3", *annotation_events(deleted)) == 0
    state.record("4", *annotation_events(created(7)))
    assert state.projects() == ["3", "4"] and state.new_annotations("4") == 1
    state.training_started("4")
    state.training_succeeded("4")
    assert state.new_annotations("4") == 0
    state.record("4", *annotation_events(created(8)))
    assert state.new_annotations("4") == 1


def test_training_status(state):
    assert state.status("5") == {}
    state.set_status("5", {"stage": "train", "step": 3, "running": True})
    status = state.status("5")
    assert status["stage"] == "train" and status["step"] == 3 and "updated" in status
    assert "5" in state.statuses()


def test_the_count_is_forgotten_only_when_a_run_succeeds(state):
    """A run takes the ids counted when it starts; they still count while it runs and after it
    crashes (the next run takes them again), and are forgotten only when one succeeds. An
    annotation saved (again) while a run trains counts for the next run; a deleted one never."""
    for annotation_id in (1, 2, 3):
        state.record("6", *annotation_events(created(annotation_id)))
    state.training_started("6")
    assert state.new_annotations("6") == 3  # still counted while the run trains
    state.record("6", *annotation_events(created(4)))  # saved during the run
    state.record("6", *annotation_events(created(1)))  # updated during the run
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}]}
    assert state.record("6", *annotation_events(deleted)) == 3
    # the run crashed (no training_succeeded): a retry or the next run starts with all of them
    state.training_started("6")
    assert state.new_annotations("6") == 3
    state.record("6", *annotation_events(created(5)))
    state.training_succeeded("6")
    assert state.new_annotations("6") == 1  # 5, saved while the second run trained

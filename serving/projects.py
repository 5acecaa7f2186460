"""Per-project state shared by the backend and the workers: annotation events from LS webhooks,
new-annotation counts since the last fine-tune, and the training status (:class:`ProjectState`).
Two stores with one interface: :class:`RedisProjectState` (keys ``<prefix>:project:<id>:...``)
for the Redis deployment, :class:`MemoryProjectState` for the embedded one. Torch-free.
"""

from __future__ import annotations

import json
import threading
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from redis import Redis


class ProjectState(Protocol):
    """Per project: the ids of annotations created or updated since the last successful
    fine-tune, and the training status.

    The same annotation saved twice counts once, a skipped task (``was_cancelled``) never
    counts, and deleted annotations (``ANNOTATIONS_DELETED``) are removed. A run moves the ids
    it starts with aside (:meth:`training_started`: they still count) and forgets them only when
    it succeeds (:meth:`training_succeeded`): a crashed run loses no trigger, and annotations
    saved while a run trains count for the next one. Losing this state (a Redis flush, a
    restart) loses only the count: every run syncs all annotations from LS."""

    def record(self, project: str, events: list[dict], deleted: list[int]) -> int:
        """Store events; returns the project's count of new (non-cancelled) annotations."""

    def new_annotations(self, project: str) -> int: ...

    def projects(self) -> list[str]: ...

    def training_started(self, project: str) -> None:
        """A run starts: the ids counted now are its own (still counted until it succeeds);
        annotations recorded from now on count towards the next run."""

    def training_succeeded(self, project: str) -> None:
        """The run finished (promoted, rejected or skipped): forget the ids it started with."""

    def set_status(self, project: str, status: dict) -> None: ...

    def status(self, project: str) -> dict: ...

    def statuses(self) -> dict[str, dict]: ...

    def mark_started(self, project: str, mode: str, when: float | None = None) -> None:
        """A run of ``mode`` ("finetune", "sami") started at ``when`` (default now)."""

    def last_started(self, project: str, mode: str) -> float | None:
        """When the project's last run of ``mode`` started (epoch seconds), or None."""


class MemoryProjectState:
    """The embedded server's store (lost on restart: LS keeps the annotations)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._new: dict[str, set[int]] = {}
        self._running: dict[str, set[int]] = {}  # the ids a started run took
        self._status: dict[str, dict] = {}
        self._started: dict[tuple[str, str], float] = {}

    def record(self, project: str, events: list[dict], deleted: list[int]) -> int:
        with self._lock:
            new = self._new.setdefault(project, set())
            running = self._running.setdefault(project, set())
            for event in events:
                running.discard(event["id"])
                (new.discard if event["cancelled"] else new.add)(event["id"])
            for annotation_id in deleted:
                new.discard(annotation_id)
                running.discard(annotation_id)
            return len(new | running)

    def new_annotations(self, project: str) -> int:
        with self._lock:
            return len(self._new.get(project, set()) | self._running.get(project, set()))

    def projects(self) -> list[str]:
        with self._lock:
            return sorted(set(self._new) | set(self._status), key=int)

    def training_started(self, project: str) -> None:
        with self._lock:
            running = self._running.setdefault(project, set())
            running |= self._new.pop(project, set())

    def training_succeeded(self, project: str) -> None:
        with self._lock:
            self._running.pop(project, None)

    def set_status(self, project: str, status: dict) -> None:
        with self._lock:
            self._status[project] = {**status, "updated": time.time()}

    def status(self, project: str) -> dict:
        with self._lock:
            return dict(self._status.get(project, {}))

    def statuses(self) -> dict[str, dict]:
        with self._lock:
            return {project: dict(status) for project, status in self._status.items()}

    def mark_started(self, project: str, mode: str, when: float | None = None) -> None:
        with self._lock:
            self._started[(project, mode)] = time.time() if when is None else when

    def last_started(self, project: str, mode: str) -> float | None:
        with self._lock:
            return self._started.get((project, mode))


class RedisProjectState:
    """The Redis deployment's store, shared by the backend (webhooks) and the workers."""

    def __init__(self, connection: Redis, prefix: str = "efficientsam") -> None:
        self.connection = connection
        self.prefix = f"{prefix}:project"

    def _key(self, project: str, what: str) -> str:
        return f"{self.prefix}:{project}:{what}"

    def record(self, project: str, events: list[dict], deleted: list[int]) -> int:
        new_key, running_key = self._key(project, "new"), self._key(project, "running")
        with self.connection.pipeline() as pipeline:  # MULTI/EXEC: one step for the others
            pipeline.sadd(f"{self.prefix}s", project)
            for event in events:
                pipeline.srem(running_key, str(event["id"]))  # saved again: the next run's
                if event["cancelled"]:
                    pipeline.srem(new_key, str(event["id"]))
                else:
                    pipeline.sadd(new_key, str(event["id"]))
            for annotation_id in deleted:
                pipeline.srem(new_key, str(annotation_id))
                pipeline.srem(running_key, str(annotation_id))
            pipeline.sunion(new_key, running_key)
            return len(pipeline.execute()[-1])

    def new_annotations(self, project: str) -> int:
        return len(self.connection.sunion(self._key(project, "new"), self._key(project, "running")))

    def projects(self) -> list[str]:
        members = self.connection.smembers(f"{self.prefix}s")
        return sorted((m.decode() if isinstance(m, bytes) else m for m in members), key=int)

    def training_started(self, project: str) -> None:
        new_key, running_key = self._key(project, "new"), self._key(project, "running")
        with self.connection.pipeline() as pipeline:
            pipeline.sunionstore(running_key, [running_key, new_key])
            pipeline.delete(new_key)
            pipeline.execute()

    def training_succeeded(self, project: str) -> None:
        self.connection.delete(self._key(project, "running"))

    def set_status(self, project: str, status: dict) -> None:
        with self.connection.pipeline() as pipeline:
            pipeline.sadd(f"{self.prefix}s", project)
            pipeline.set(
                self._key(project, "training"), json.dumps({**status, "updated": time.time()})
            )
            pipeline.execute()

    def status(self, project: str) -> dict:
        raw = self.connection.get(self._key(project, "training"))
        return json.loads(raw) if raw else {}

    def statuses(self) -> dict[str, dict]:
        return {project: self.status(project) for project in self.projects()}

    def mark_started(self, project: str, mode: str, when: float | None = None) -> None:
        when = time.time() if when is None else when
        self.connection.set(self._key(project, f"started:{mode}"), repr(float(when)))

    def last_started(self, project: str, mode: str) -> float | None:
        raw = self.connection.get(self._key(project, f"started:{mode}"))
        return float(raw) if raw else None

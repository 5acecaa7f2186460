"""Model versions: the served base checkpoint and each project's fine-tuned versions, durable
under ``MODEL_DIR`` (:class:`ModelRegistry`) with a copy in Redis for the processes that serve
and route (:class:`VersionDirectory`: the backend never touches ``MODEL_DIR`` or torch). This
module imports neither torch nor RQ.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger(__name__)

_PROJECT = re.compile(r"^\d+$")
_UNCHANGED = object()


def redis_errors() -> tuple[type[Exception], ...]:
    """redis-py's error base class (imported lazily: the embedded mode needs no Redis)."""
    import redis

    return (redis.RedisError,)


class RegistryError(ValueError):
    """An unknown project or version, or a version that belongs to another project/base."""


class StaleCandidate(RegistryError):
    """A candidate measured against a version that is no longer the project's current one."""


def fine_tune_version(base_version: str, project: str, number: int, kind: str = "ft") -> str:
    """``<weights>+p<project>-<kind><number>``, e.g. ``efficientsam-ti-1a2b3c4d+p7-ft2`` (a
    fine-tune of that base) or ``efficientsam-ti-5e6f7a8b+p7-sami1`` (a SAMI model: the weights'
    own version, ``serving.runtime.checkpoint_version``; number:
    :meth:`ModelRegistry.store_version`)."""
    return f"{base_version}+p{project}-{kind}{number}"


@dataclass(frozen=True)
class VersionInfo:
    """One stored fine-tuned version (metadata only; the tensors stay on disk)."""

    version: str
    path: Path
    metadata: dict[str, Any]


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (no tensors, no torch)."""
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size < 100 * 1024**2:
            raise RegistryError(f"{path} is not a safetensors file")
        header = json.loads(handle.read(size))
    return dict(header.get("__metadata__") or {})


def _write_json_atomically(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(content, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


class ModelRegistry:
    """Versions on disk (durable) + their copy in Redis (for routing).

    ``MODEL_DIR`` (shared by all workers, e.g. one volume) holds
    ``versions/<version>.safetensors`` (the tensors a fine-tune changed, state-dict keys of the
    whole model; metadata: base and parent version, project, data snapshot hash, metrics, time)
    and ``projects/<project>.json`` (the current version, ``null`` = the base, and the history:
    promotions, rejections with the reason, roll-backs). History updates hold a file lock across
    processes; version files are linked into place exclusively, never overwritten.

    Redis keys under ``<prefix>:model``: ``:base`` (JSON of the base version, written by every
    worker at start-up), ``:project:<id>`` (current version), ``:versions`` (project -> its promoted
    versions, for ``/versions``), ``:errors`` (versions a worker failed to load). Workers
    re-publish the disk state whenever Redis's copy differs (at start-up and periodically:
    :meth:`ensure_published`), so Redis is never the only copy of a version. ``redis`` None:
    the embedded mode, disk only.
    """

    def __init__(
        self, model_dir: Path | str, redis: Redis | None = None, prefix: str = "efficientsam"
    ) -> None:
        self.model_dir = Path(model_dir)
        self.redis = redis
        self.prefix = f"{prefix}:model"
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._cache: dict[Path, tuple[tuple[int, int, int], dict]] = {}
        self._base_description: dict | None = None
        self._errors: dict[str, dict] = {}

    # -- paths ---------------------------------------------------------------------------------
    @property
    def versions_dir(self) -> Path:
        return self.model_dir / "versions"

    def version_path(self, version: str) -> Path:
        if "/" in version or version.startswith("."):
            raise RegistryError(f"bad version name {version!r}")
        return self.versions_dir / f"{version}.safetensors"

    def _project_path(self, project: str) -> Path:
        if not _PROJECT.match(str(project)):
            raise RegistryError(f"bad project id {project!r}")
        return self.model_dir / "projects" / f"{project}.json"

    # -- version history -------------------------------------------------------------------------
    def version_history(self, project: str) -> dict:
        """``{"current": version or None, "history": [...], "promoted": n}`` (cached by inode,
        mtime and size: every write is a new file, so another process's write is always seen)."""
        path = self._project_path(project)
        try:
            stat = path.stat()
            mtime = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return {"project": str(project), "current": None, "history": [], "promoted": 0}
        with self._lock:
            cached = self._cache.get(path)
            if cached and cached[0] == mtime:
                return json.loads(json.dumps(cached[1]))
        state = json.loads(path.read_text())
        with self._lock:
            self._cache[path] = (mtime, state)
        return json.loads(json.dumps(state))

    def current_version(self, project: str | None) -> str | None:
        """The project's promoted fine-tune, or None when it is served by the base model."""
        if project is None:
            return None
        return self.version_history(project)["current"]

    def projects(self) -> list[str]:
        folder = self.model_dir / "projects"
        if not folder.is_dir():
            return []
        return sorted((p.stem for p in folder.glob("*.json")), key=int)

    def promoted_versions(self, project: str | None = None) -> list[str]:
        """The versions ever promoted for ``project`` (every project's when None), oldest first
        per project: what LS's version list offers besides the base."""
        projects = [str(project)] if project is not None else self.projects()
        versions: list[str] = []
        for name in projects:
            for event in self.version_history(name)["history"]:
                version = event.get("version")
                if event.get("event") == "promoted" and version and version not in versions:
                    versions.append(version)
        return versions

    def version_info(self, version: str) -> VersionInfo:
        path = self.version_path(version)
        if not path.is_file():
            raise RegistryError(f"version {version} is not in {self.versions_dir}")
        metadata = read_safetensors_metadata(path)
        decoded = {}
        for key, value in metadata.items():
            try:
                decoded[key] = json.loads(value)
            except (TypeError, ValueError):
                decoded[key] = value
        return VersionInfo(version, path, decoded)

    @contextlib.contextmanager
    def _project_lock(self, project: str) -> Iterator[Path]:
        """Holds ``projects/<id>.json.lock`` (``fcntl.flock``, exclusive) and this object's thread
        lock: one read-modify-write of the project's file at a time, across processes (a CLI
        rollback and a train worker) and threads. Yields the project file's path."""
        path = self._project_path(project)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._write_lock, open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield path
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _update(self, project: str, change: Callable[[dict], tuple[dict, object]]) -> dict:
        """Under the project's lock: read its file, ``change(state)`` -> (event, current or
        ``_UNCHANGED``), append the event, write the file atomically; then update Redis."""
        with self._project_lock(project) as path:
            state = (
                json.loads(path.read_text())
                if path.exists()
                else {"project": str(project), "current": None, "history": [], "promoted": 0}
            )
            event, current = change(state)
            event = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}
            if current is not _UNCHANGED:
                event.setdefault("from", state["current"])
                state["current"] = current
            state["history"].append(event)
            if event.get("event") == "promoted":
                state["promoted"] = int(state.get("promoted", 0)) + 1
            _write_json_atomically(path, state)
            self._cache.pop(path, None)
            # published under the lock: Redis ends with the version of the last writer. The disk
            # is the record: a Redis failure here is repaired by ensure_published (workers'
            # maintenance), never a failed promotion.
            try:
                self._publish_project(str(project), state["current"])
            except redis_errors() as error:
                logger.warning("project %s: registry not copied to Redis yet: %s", project, error)
        return state

    def record(self, project: str, event: dict, current: object = _UNCHANGED) -> dict:
        """Append ``event`` to the project's history; set ``current`` (a version or None) when
        given; an event that changes the version records the one it replaced as ``from``.
        Safe across processes (file lock around the read-modify-write, atomic replace); Redis
        is updated after the disk."""
        return self._update(project, lambda state: (event, current))

    def store_version(
        self,
        project: str,
        base_version: str,
        tensors: dict,
        metadata: dict,
        kind: str = "ft",
        weights_version: str | None = None,
    ) -> str:
        """Write a fine-tune's changed tensors as the project's next version (``...+p<id>-ft<n>``,
        n = 1 + the highest n of the project's stored versions of that kind, or the next free
        number) and return its name. Metadata values
        are stored as JSON. Written to a temporary file, then linked to its name exclusively
        (``os.link`` fails on an existing name): a crash never leaves half a version, and a
        second run (another process) never overwrites a stored version, it takes the next n.

        A standalone version (metadata ``standalone``: the file holds the whole model, e.g. a
        SAMI student, :meth:`version_info`) is named after its own weights (``weights_version``);
        ``kind`` is ``ft`` or ``sami``, each numbered on its own."""
        from safetensors.torch import save_file

        number = self._next_number(project, kind)
        name_base = weights_version or base_version
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        header = {key: json.dumps(value) for key, value in metadata.items()}
        header.update({"base": json.dumps(base_version), "project": json.dumps(str(project))})
        with tempfile.TemporaryDirectory(dir=self.versions_dir, prefix=".store-") as folder:
            temporary = Path(folder) / "version.safetensors"
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            while True:
                version = fine_tune_version(name_base, project, number, kind)
                path = self.version_path(version)
                if not path.exists():  # the version name is in the header: write per name
                    save_file(tensors, str(temporary), {**header, "version": json.dumps(version)})
                    try:
                        os.link(temporary, path)
                        return version
                    except FileExistsError:  # taken meanwhile by another run
                        pass
                    temporary.unlink()
                number += 1

    def _next_number(self, project: str, kind: str) -> int:
        """1 + the highest n of the project's stored ``...+p<project>-<kind><n>`` versions."""
        pattern = re.compile(rf"\+p{re.escape(str(project))}-{re.escape(kind)}(\d+)$")
        numbers = [
            int(match.group(1))
            for path in self.versions_dir.glob(f"*+p{project}-{kind}*.safetensors")
            if (match := pattern.search(path.name[: -len(".safetensors")]))
        ]
        return max(numbers, default=0) + 1

    def promote(
        self,
        project: str,
        version: str,
        details: dict | None = None,
        replacing: object = _UNCHANGED,
    ) -> dict:
        """Make ``version`` the project's current one. ``replacing``: the version (None: the
        base) the candidate was measured against; if another process changed the project's
        version meanwhile (two runs of one project on two train workers), nothing changes and
        :class:`StaleCandidate` is raised: a candidate is never promoted over a version it was
        not compared with."""
        info = self.version_info(version)
        if str(info.metadata.get("project")) != str(project):
            raise RegistryError(f"version {version} was not trained for project {project}")
        event = {"event": "promoted", "version": version, **(details or {})}

        def change(state: dict) -> tuple[dict, object]:
            if replacing is not _UNCHANGED and state["current"] != replacing:
                raise StaleCandidate(
                    f"the project's version changed during the run (to "
                    f"{state['current'] or 'the base model'}); {version} was measured against "
                    f"{replacing or 'the base model'}"
                )
            return event, version

        state = self._update(project, change)
        self.publish_versions([str(project)])
        return state

    def reject(self, project: str, version: str, reason: str, details: dict | None = None) -> dict:
        event = {"event": "rejected", "version": version, "reason": reason, **(details or {})}
        return self.record(project, event)

    def rollback(self, project: str, to: str | None = None) -> dict:
        """Serve ``to`` (a version of this project, or None/"base" for the base model), or, when
        ``to`` is not given, the version that was current before the current one (read under
        the project's lock, so a promotion meanwhile is never rolled over)."""
        previous_one = to in (None, "")
        to = None if previous_one or to == "base" else to
        if to is not None and str(self.version_info(to).metadata.get("project")) != str(project):
            raise RegistryError(f"version {to} was not trained for project {project}")

        def change(state: dict) -> tuple[dict, object]:
            target = to
            if previous_one:
                previous = [
                    e.get("from")
                    for e in state["history"]
                    if e.get("event") in ("promoted", "rolled_back")
                    and e.get("version") == state["current"]
                ]
                target = previous[-1] if previous else None
            return {"event": "rolled_back", "version": target}, target

        return self._update(project, change)

    # -- Redis copy ----------------------------------------------------------------------------
    def publish_base(self, description: dict) -> None:
        """Called by every worker at start-up: the base version the backend reports (and again
        by :meth:`ensure_published` after a Redis restart)."""
        self._base_description = description
        if self.redis is not None:
            self.redis.set(f"{self.prefix}:base", json.dumps(description, sort_keys=True))

    def _publish_project(self, project: str, version: str | None) -> None:
        if self.redis is None:
            return
        key = f"{self.prefix}:project:{project}"
        if version is None:
            self.redis.delete(key)
        else:
            self.redis.set(key, version)

    def publish_all(self) -> int:
        """Copy every project's current version to Redis (and drop keys of projects the disk
        does not have); returns how many were set."""
        if self.redis is None:
            return 0
        count = 0
        projects = self.projects()
        for project in projects:
            current = self.version_history(project)["current"]
            self._publish_project(project, current)
            count += current is not None
        known = {f"{self.prefix}:project:{project}" for project in projects}
        for key in self.redis.scan_iter(match=f"{self.prefix}:project:*", count=1000):
            if (key.decode() if isinstance(key, bytes) else key) not in known:
                self.redis.delete(key)
        self.redis.set(f"{self.prefix}:published", str(time.time()))
        return count

    def _published_differs(self) -> bool:
        """Whether Redis's copy differs from the disk: any project's version (a key missing,
        stale or left over) or the base description missing (its content is each worker's
        own: workers of two checkpoints would take turns); one MGET and one SCAN."""
        expected = {
            f"{self.prefix}:project:{project}": self.version_history(project)["current"]
            for project in self.projects()
        }
        keys = list(expected)
        if self._base_description is not None and not self.redis.exists(f"{self.prefix}:base"):
            return True
        values = self.redis.mget(keys) if keys else []
        for key, value in zip(keys, values, strict=True):
            if (value.decode() if isinstance(value, bytes) else value) != expected[key]:
                return True
        present = {
            key.decode() if isinstance(key, bytes) else key
            for key in self.redis.scan_iter(match=f"{self.prefix}:project:*", count=1000)
        }
        return bool(present - {key for key, value in expected.items() if value is not None})

    def ensure_published(self) -> bool:
        """Re-publish when Redis's copy differs from the disk (a Redis restart without
        persistence, a flushed or overwritten key, a version promoted or rolled back by a
        process without Redis). True if it did."""
        if self.redis is None or not self._published_differs():
            return False
        if self._base_description is not None:
            self.publish_base(self._base_description)
        count = self.publish_all()
        logger.info("published the model registry to Redis (%d project versions)", count)
        return True

    def publish_versions(self, projects: list[str] | None = None) -> None:
        """Copy the promoted versions of ``projects`` (all when None) to Redis, for the
        backend's ``/versions`` in the Redis mode."""
        if self.redis is None:
            return
        projects = self.projects() if projects is None else projects
        lists = {project: json.dumps(self.promoted_versions(project)) for project in projects}
        if lists:
            self.redis.hset(f"{self.prefix}:versions", mapping=lists)

    def report_version_error(self, version: str, error: str | None) -> None:
        """Remember (``error``) or forget (None: it loaded) that ``version`` cannot be loaded:
        kept in this process and, with Redis, for the backend's /health and /metrics."""
        entry = {"error": error, "time": time.time()}
        with self._lock:
            if error is None:
                self._errors.pop(version, None)
            else:
                self._errors[version] = entry
        if self.redis is None:
            return
        if error is None:
            self.redis.hdel(f"{self.prefix}:errors", version)
        else:
            self.redis.hset(f"{self.prefix}:errors", version, json.dumps(entry))

    def version_errors(self, max_age_seconds: float) -> dict[str, dict]:
        """Versions that failed to load in the last ``max_age_seconds``: version -> ``{"error",
        "time"}`` (this process's; the Redis copy has every worker's)."""
        if self.redis is not None:
            return _recent_errors(self.redis.hgetall(f"{self.prefix}:errors"), max_age_seconds)
        with self._lock:
            return _recent_errors(dict(self._errors), max_age_seconds)


def _recent_errors(entries: dict, max_age_seconds: float) -> dict[str, dict]:
    recent = {}
    for version, entry in entries.items():
        version = version.decode() if isinstance(version, bytes) else version
        entry = json.loads(entry) if isinstance(entry, (bytes, str)) else entry
        if time.time() - float(entry.get("time", 0)) <= max_age_seconds:
            recent[version] = entry
    return recent


class VersionDirectory:
    """What the backend needs in Redis mode: the base version, each project's current and
    promoted versions, versions that failed to load; read from Redis (torch-free, no
    MODEL_DIR)."""

    def __init__(self, redis: Redis, prefix: str = "efficientsam") -> None:
        self.redis = redis
        self.prefix = f"{prefix}:model"

    def base(self) -> dict | None:
        raw = self.redis.get(f"{self.prefix}:base")
        return json.loads(raw) if raw else None

    def current(self, project: str | None) -> str | None:
        """The project's version, or the base's; None when no worker has published one yet."""
        keys = [f"{self.prefix}:base"]
        if project is not None:
            keys.append(f"{self.prefix}:project:{project}")
        values = self.redis.mget(keys)
        if len(values) > 1 and values[1]:
            return values[1].decode() if isinstance(values[1], bytes) else values[1]
        return json.loads(values[0])["version"] if values[0] else None

    def promoted_versions(self, project: str | None = None) -> list[str]:
        """Versions ever promoted for ``project`` (every project's when None), as the workers
        published them (:meth:`ModelRegistry.publish_versions`)."""
        key = f"{self.prefix}:versions"
        if project is not None:
            raw = self.redis.hget(key, str(project))
            return json.loads(raw) if raw else []
        lists = {
            (k.decode() if isinstance(k, bytes) else k): json.loads(v)
            for k, v in self.redis.hgetall(key).items()
        }
        versions: list[str] = []
        for name in sorted(lists, key=lambda k: int(k) if k.isdigit() else 0):
            versions += [v for v in lists[name] if v not in versions]
        return versions

    def version_errors(self, max_age_seconds: float) -> dict[str, dict]:
        """Versions some worker could not load lately: version -> ``{"error", "time"}``."""
        return _recent_errors(self.redis.hgetall(f"{self.prefix}:errors"), max_age_seconds)

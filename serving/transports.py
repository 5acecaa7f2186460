"""How the backend gets model work done: in this process (:class:`EmbeddedTransport`) or by RQ
workers through Redis (:class:`QueueTransport`). Both run the jobs of ``serving.jobs.JOBS``, by
name, on the JSON of the same request structs (serving/requests.py); the routes only see
:class:`Transport`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import msgspec

from serving.jobs import JobSpec, job_spec
from serving.projects import RedisProjectState
from serving.requests import InvalidRequest, Submitter
from serving.settings import Settings

logger = logging.getLogger(__name__)


class TransportError(Exception):
    """Work that could not be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class Transport(Submitter, Protocol):
    name: str
    project_state: object  # serving.projects.ProjectState: annotation events, training status

    def start(self) -> None: ...

    def close(self) -> None: ...

    def status(self) -> dict:
        """Health details; raises TransportError when no work can be done now."""

    def model_version(self, project: str | None) -> str:
        """The version serving ``project`` (what /setup returns and predictions carry)."""

    def versions(self, project: str | None) -> list[str]:
        """The base version and the versions ever promoted for ``project`` (for every project
        when None): what LS may ask for."""

    def version_errors(self) -> dict[str, dict]:
        """Versions that failed to load lately: version -> ``{"error", "time"}``."""

    def call(self, job: str, request: msgspec.Struct, timeout: float) -> dict:
        """Run job ``job`` (a name in ``serving.jobs.JOBS``) on ``request`` and wait for its
        result (at most ``timeout`` seconds)."""

    def project_params(self, project: str | None) -> dict: ...

    def set_project_params(self, project: str | None, params: dict) -> None: ...


class EmbeddedTransport:
    """The model in this process (no ``REDIS_URL``): job functions run in the request thread
    (or a background thread) and hand every torch call to one compute thread."""

    name = "embedded"

    def __init__(self, settings: Settings) -> None:
        from serving.compute import ComputeThread
        from serving.runtime import ModelRuntime

        self.settings = settings
        # Every torch call runs on this one thread (one OpenMP team, see serving/compute.py),
        # clicks first: batch work lets waiting clicks run at its checkpoints.
        self._compute = ComputeThread(isolation=_fresh_torch_state)
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background")
        from efficientsam.checkpoint import CheckpointError
        from serving.runtime import ConfigurationError

        started = time.perf_counter()
        try:
            self.runtime = ModelRuntime(
                settings, compute=self._compute.run, between_steps=self._compute.checkpoint
            )
            # the checkpoint's only read: the version now, the model from it on the compute thread
            self.base_version = self.runtime.read_checkpoint()
        except (CheckpointError, ConfigurationError, OSError) as error:
            raise TransportError(str(error), 500) from error
        logger.info(
            "model version %s (%s, %.2f s)",
            self.base_version,
            self.runtime.checkpoint,
            time.perf_counter() - started,
        )
        self._ready = threading.Event()
        self.load_error: str | None = None
        self._params: dict[str, dict] = {}
        # Fine-tunes run on their own thread: minutes of training must not hold the compute
        # thread (clicks stay available, slower while a fine-tune runs).
        self._training = ThreadPoolExecutor(max_workers=1, thread_name_prefix="training")
        self._pending: dict[str, object] = {}
        self._pending_lock = threading.Lock()
        self.project_state = self.runtime.project_state  # in memory: no Redis here

    def start(self) -> None:
        from serving.compute import URGENT

        def load() -> None:
            try:
                base = self.runtime.load()
                model = base.predictor.model
                # checkpoints: before every encoder block and decoder call (serving/compute.py)
                self._compute.attach([*model.image_encoder.blocks, model.mask_decoder])
            except Exception as error:  # reported by /health and every /predict
                self.load_error = f"{type(error).__name__}: {error}"
                logger.exception("model failed to load")
            finally:
                self._ready.set()

        self._compute.submit(load, URGENT)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.runtime.base is not None

    def close(self) -> None:
        self._training.shutdown(wait=False, cancel_futures=True)
        self._background.shutdown(wait=False, cancel_futures=True)
        self._compute.close()
        self.runtime.close()

    def status(self) -> dict:
        base = self.runtime.base
        body = {
            "transport": self.name,
            "model_ready": self.ready,
            "model_error": self.load_error,
            "device": str(base.predictor.model.device) if base else None,
        }
        if self.load_error:
            body["reason"] = f"the model failed to load: {self.load_error}"
        elif not self.ready:
            body["reason"] = "the model is still loading"
        return body

    def model_version(self, project: str | None) -> str:
        return self.runtime.registry.current_version(project) or self.base_version

    def versions(self, project: str | None) -> list[str]:
        return [self.base_version, *self.runtime.registry.promoted_versions(project)]

    def version_errors(self) -> dict[str, dict]:
        return self.runtime.registry.version_errors(self.settings.version_error_seconds)

    def _wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise TransportError("the model is still loading; try again in a moment", 503)
        if self.runtime.base is None:
            raise TransportError(f"the model failed to load: {self.load_error}", 503)

    def call(self, job: str, request: msgspec.Struct, timeout: float) -> dict:
        """Run the job function here; its model work goes first (``interactive``) or stops at
        a checkpoint once ``timeout`` seconds have passed (other queues: DeadlineExceeded)."""
        from serving.compute import BACKGROUND, URGENT, work_class
        from serving.labelstudio.images import caller_deadline

        spec = job_spec(job, request)
        if spec.queue == "interactive":
            self._wait_ready(max(timeout, 60.0))
            token = work_class.set((URGENT, None))
            download_token = None
        else:  # the time budget covers the wait, the download and the model work
            until = time.monotonic() + timeout
            self._wait_ready(timeout)
            token = work_class.set((BACKGROUND, until))
            download_token = caller_deadline.set(until)
        try:  # the request's JSON, as a worker gets it: validated by the job
            return spec.function(msgspec.to_builtins(request), runtime=self.runtime)
        except InvalidRequest as error:
            raise TransportError(f"the job failed: {error}", 500) from error
        finally:
            work_class.reset(token)
            if download_token is not None:
                caller_deadline.reset(download_token)

    def submit(
        self,
        job: str,
        request: msgspec.Struct,
        job_id: str | None = None,
        at_front: bool = False,
        description: str | None = None,
    ) -> str | None:
        spec = job_spec(job, request)
        if not self.ready and spec.queue != "train":  # a prewarm before the model is up: useless
            return None
        job_id = job_id or f"{job}-{time.time_ns()}"
        payload = msgspec.to_builtins(request)

        def work() -> None:
            try:
                spec.function(payload, runtime=self.runtime)
            except Exception:  # background work never fails a request; the log has it
                logger.exception("background %s failed", job)

        executor = self._training if spec.queue == "train" else self._background
        with self._pending_lock:  # request threads submit at once: one check-and-add at a time
            pending = self._pending.get(job_id)
            if pending is not None and not pending.done():
                return job_id  # already queued or running: not twice
            self._pending = {k: v for k, v in self._pending.items() if not v.done()}
            self._pending[job_id] = executor.submit(work)
        return job_id

    def project_params(self, project: str | None) -> dict:
        return dict(self._params.get(str(project), {}))

    def set_project_params(self, project: str | None, params: dict) -> None:
        self._params[str(project)] = dict(params)


def _fresh_torch_state():
    """Around a click run inline inside background work (serving/compute.py): none of that
    work's torch modes (autocast, inference mode) leak into it; the click sets its own."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.autocast("cpu", enabled=False))
    if torch.cuda.is_available():
        stack.enter_context(torch.autocast("cuda", enabled=False))
    return stack


class QueueTransport:
    """Jobs on RQ queues, run by ``python -m worker`` processes (``REDIS_URL`` set): the
    ``interactive`` / ``batch`` / ``train`` queues. In this mode the backend never imports
    torch (tests/worker/test_processes.py checks it)."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        import redis
        from rq import Queue

        from serving.registry import VersionDirectory
        from serving.serialization import JobSerializer

        self.settings = settings
        self.connection = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=2,
            socket_timeout=max(5.0, settings.interactive_wait_seconds + 5),
            health_check_interval=10,
        )
        self.queues = {
            name: Queue(name, connection=self.connection, serializer=JobSerializer)
            for name in ("interactive", "batch", "train")
        }
        self.directory = VersionDirectory(self.connection, settings.redis_key_prefix)
        self.project_state = RedisProjectState(self.connection, settings.redis_key_prefix)
        self._params_key = f"{settings.redis_key_prefix}:project-params"
        self._timeouts = {
            "interactive": settings.interactive_job_timeout,
            "batch": settings.batch_job_timeout,
            "train": settings.train_job_timeout,
        }

    def start(self) -> None:
        pass

    def close(self) -> None:
        self.connection.close()

    def _unavailable(self, error: Exception) -> TransportError:
        return TransportError(
            f"Redis at {self.settings.redis_url.split('@')[-1]} is unavailable ({error}); "
            "the backend recovers by itself once it is back",
            503,
        )

    def status(self) -> dict:
        import redis
        from rq import Worker

        from serving.serialization import JobSerializer

        try:
            self.connection.ping()
            workers = Worker.all(connection=self.connection, serializer=JobSerializer)
            lengths = {name: queue.count for name, queue in self.queues.items()}
        except redis.RedisError as error:
            raise self._unavailable(error) from error
        listening = {
            name: sum(1 for w in workers if name in w.queue_names()) for name in self.queues
        }
        body = {
            "transport": self.name,
            "model_ready": listening["interactive"] > 0,
            "workers": listening,
            "queued": lengths,
        }
        if not body["model_ready"]:
            body["reason"] = (
                "no worker serves the 'interactive' queue: start `python -m worker` "
                "(clicks would wait and fail)"
            )
        return body

    def model_version(self, project: str | None) -> str:
        import redis

        try:
            version = self.directory.current(project)
        except redis.RedisError as error:
            raise self._unavailable(error) from error
        if version is None:
            raise TransportError(
                "no model version yet: no worker has started (run `python -m worker`)", 503
            )
        return version

    def versions(self, project: str | None) -> list[str]:
        import redis

        try:
            base = self.directory.base()
            promoted = self.directory.promoted_versions(project)
            current = self.directory.current(project)
        except redis.RedisError as error:
            raise self._unavailable(error) from error
        versions = [base["version"]] if base else []
        for version in [*promoted, current]:
            if version and version not in versions:
                versions.append(version)
        return versions

    def version_errors(self) -> dict[str, dict]:
        import redis

        try:
            return self.directory.version_errors(self.settings.version_error_seconds)
        except redis.RedisError as error:
            raise self._unavailable(error) from error

    def call(self, job: str, request: msgspec.Struct, timeout: float) -> dict:
        import redis
        from rq.results import Result

        spec = job_spec(job, request)
        queue = spec.queue
        wait = max(1, math.ceil(timeout))
        try:
            queued = self.queues[queue].enqueue_call(
                spec.function,  # rq records its import path; workers run only the table's
                args=(msgspec.to_builtins(request),),
                description=job,  # not the repr of the request: cheaper on every click
                timeout=self._timeouts[queue],
                ttl=wait,  # not picked up in time: dropped, the caller has given up
                result_ttl=self.settings.waited_result_ttl_seconds,
                failure_ttl=self.settings.waited_failure_ttl_seconds,
            )
            result = queued.latest_result(timeout=wait)
        except redis.RedisError as error:
            raise self._unavailable(error) from error
        except ValueError as error:  # not JSON: never ours (see serving/serialization.py)
            raise TransportError(f"the worker's result is unreadable ({error})", 500) from error
        if result is None:
            with contextlib.suppress(Exception):  # best effort: it may have started meanwhile
                queued.cancel()
            raise TransportError(
                f"no worker answered within {wait} s ({self.queues[queue].count} job(s) "
                f"waiting on '{queue}'); are `python -m worker` processes running?",
                503,
            )
        if result.type != Result.Type.SUCCESSFUL:
            reason = (result.exc_string or "unknown error").strip().splitlines()[-1]
            raise TransportError(f"the worker failed: {reason}", 500)
        return result.return_value

    def submit(
        self,
        job: str,
        request: msgspec.Struct,
        job_id: str | None = None,
        at_front: bool = False,
        description: str | None = None,
    ) -> str | None:
        import redis
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        from serving.serialization import JobSerializer

        spec = job_spec(job, request)
        try:
            if job_id is None:
                return self._enqueue(spec, request, job_id, at_front, description)
            # The check and the enqueue under one lock per job id: two submits at once (two
            # "Start training" clicks, a click and the cron) never enqueue the job twice.
            with self.connection.lock(
                f"{self.settings.redis_key_prefix}:submit:{job_id}", 30, blocking_timeout=10
            ):
                try:
                    existing = Job.fetch(
                        job_id, connection=self.connection, serializer=JobSerializer
                    )
                    status = existing.get_status(refresh=False)
                    if status not in (
                        JobStatus.FINISHED,
                        JobStatus.FAILED,
                        JobStatus.CANCELED,
                        JobStatus.STOPPED,
                    ):
                        return job_id  # already queued or running: not twice
                    existing.delete()
                except NoSuchJobError:
                    pass
                return self._enqueue(spec, request, job_id, at_front, description)
        except redis.RedisError as error:
            raise self._unavailable(error) from error

    def _enqueue(
        self,
        spec: JobSpec,
        request: msgspec.Struct,
        job_id: str | None,
        at_front: bool,
        description: str | None,
    ) -> str:
        from rq import Retry

        retries = self.settings.batch_retries
        queued = self.queues[spec.queue].enqueue(
            spec.function,  # rq records its import path; workers run only the table's
            msgspec.to_builtins(request),
            job_id=job_id,
            at_front=at_front,
            description=description,
            job_timeout=self._timeouts[spec.queue],
            result_ttl=self.settings.result_ttl_seconds,
            failure_ttl=self.settings.failure_ttl_seconds,
            retry=(
                Retry(max=retries, interval=self.settings.batch_retry_delay_seconds)
                if retries > 0
                else None
            ),
        )
        return queued.id

    def project_params(self, project: str | None) -> dict:
        import json

        import redis

        try:
            raw = self.connection.hget(self._params_key, str(project))
        except redis.RedisError as error:
            raise self._unavailable(error) from error
        return json.loads(raw) if raw else {}

    def params_projects(self) -> list[str]:
        """The projects whose ``extra_params`` are stored (LS's /setup)."""
        import redis

        try:
            keys = self.connection.hkeys(self._params_key)
        except redis.RedisError as error:
            raise self._unavailable(error) from error
        return [k.decode() if isinstance(k, bytes) else k for k in keys]

    def set_project_params(self, project: str | None, params: dict) -> None:
        import json

        import redis

        try:
            self.connection.hset(self._params_key, str(project), json.dumps(params))
        except redis.RedisError as error:
            raise self._unavailable(error) from error


def configuration_error(settings: Settings) -> str | None:
    """What keeps the backend from starting, found without loading anything (None: nothing)."""
    if settings.redis_url:
        return None
    from serving.runtime import ConfigurationError, find_checkpoint

    try:
        find_checkpoint(settings)
    except ConfigurationError as error:
        return str(error)
    return None


def create_transport(settings: Settings) -> Transport:
    return QueueTransport(settings) if settings.redis_url else EmbeddedTransport(settings)

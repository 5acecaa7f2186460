"""What the routes do: Label Studio's requests in, job requests out, LS answers back.

:class:`SegmentationService` speaks LS's side (tasks, label configs, context prompts, batch rules,
model versions) and leaves the model work to a :class:`~serving.transports.Transport`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import CancelledError

import redis

from backend.control import ControlRefused, ProjectCheck, WebhookAuth, log_refusal
from backend.metrics import Metrics
from backend.picked import PickedVersions
from serving.labelstudio.context import (
    PromptError,
    parse_context,
)
from serving.labelstudio.label_config import LabelConfigError, ProjectConfig, parse_label_config
from serving.labelstudio.tasks import TaskError, annotation_events, project_id
from serving.requests import (
    AutolabelRequest,
    PrewarmRequest,
    autolabel_job_id,
    autolabel_request,
    segment_request,
    submit_training,
    train_mode,
)
from serving.settings import AUTOLABEL_MODES, Settings
from serving.transports import Transport, TransportError, create_transport

logger = logging.getLogger(__name__)

LS_PREDICT_TIMEOUT_SECONDS = 100  # LS 1.23's ML_TIMEOUT_PREDICT: it drops the answer after it


class ServiceError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status, message for LS."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class SegmentationService:
    """LS protocol on top of a transport: the embedded one (model in this process) or the RQ
    one (``python -m worker`` processes); both run the jobs of ``serving.jobs.JOBS`` on the same
    request structs (serving/requests.py)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        transport: Transport | None = None,
    ) -> None:
        """Creates the transport (unless given) and LS clients: call from the app's lifespan."""
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.transport = transport or create_transport(settings)
        self.metrics.watch_training(lambda: self.transport.project_state.statuses())
        self.metrics.watch_versions(lambda: self.transport.version_errors())
        self.picks = PickedVersions(
            settings.label_studio_url,
            settings.label_studio_api_key,
            settings.version_pick_cache_seconds,
            trust_setup_host=settings.label_studio_trust_setup_host,
        )
        self._ignored_picks: set[tuple[str | None, tuple[str, ...]]] = set()
        # control actions (backend/control.py): basic auth, else projects LS has
        self.projects = ProjectCheck(settings.label_studio_url, settings.label_studio_api_key)
        self.webhook_auth = (
            WebhookAuth(
                settings.basic_auth_user,
                settings.basic_auth_pass,
                settings.label_studio_url,
                settings.label_studio_api_key,
                trust_setup_host=settings.label_studio_trust_setup_host,
            )
            if settings.basic_auth_enabled
            else None
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self.transport.start()

    def close(self) -> None:
        self.transport.close()
        self.picks.close()
        self.projects.close()
        if self.webhook_auth is not None:
            self.webhook_auth.close()

    def allow_control(self, action: str, project: str | None, source: str | None) -> None:
        """Returns when ``action`` on ``project`` is allowed (basic auth on: the caller passed
        it; else the project exists on the configured LS); raises ServiceError (403/503) and
        logs the refusal with ``source`` (the caller's address) otherwise."""
        if self.settings.basic_auth_enabled:
            return
        try:
            if project is None:
                raise ControlRefused(f"{action} without a project id", 403)
            self.projects.require(project)
        except ControlRefused as error:
            log_refusal(action, project, source, str(error))
            raise ServiceError(str(error), error.status) from error

    def _guard(self, function, *args):
        """Call the transport (or the project state behind it): its failures become a
        ServiceError with their HTTP status (Redis unavailable: 503), never a 500."""
        try:
            return function(*args)
        except TransportError as error:
            raise ServiceError(str(error), error.status) from error
        except redis.RedisError as error:
            raise ServiceError(
                f"Redis is unavailable ({error}); the backend recovers by itself once it is back",
                503,
            ) from error
        except CancelledError as error:  # the server is shutting down: queued work dropped
            raise ServiceError("the backend is shutting down; try again", 503) from error

    # -- /health, /setup, /versions ------------------------------------------------------------
    def health(self) -> tuple[dict, int]:
        """(body, HTTP status): 200 while work can be done, 503 with the reason otherwise."""
        body = {"status": "UP", "model_class": "EfficientSam"}
        try:
            body.update(self.transport.status())
            errors = self.transport.version_errors()
            if errors:  # named whether or not other versions still serve
                body["version_errors"] = {version: e["error"] for version, e in errors.items()}
            if not body.get("model_ready"):  # a click would wait and fail: say so
                return {**body, "status": "DOWN"}, 503
            body["model_version"] = self.transport.model_version(None)
        except TransportError as error:
            return {**body, "status": "DOWN", "reason": str(error)}, error.status
        return body, 200

    def setup(self, payload: dict, source: str | None = None) -> dict:
        """LS connecting or refreshing a project; ``source`` is the caller's address.
        ``extra_params`` that would change the project's settings are applied only when
        :meth:`allow_control` allows them (else ignored, logged: /setup itself still answers)."""
        project = project_id(payload.get("project"))
        params = payload.get("extra_params")
        if isinstance(params, dict) and params != self._guard(
            self.transport.project_params, project
        ):
            try:
                self.allow_control("extra_params", project, source)
            except ServiceError:
                pass  # logged; the project keeps its settings
            else:
                self._guard(self.transport.set_project_params, project, params)
        hostname, token = payload.get("hostname"), payload.get("access_token")
        runtime = getattr(self.transport, "runtime", None)
        if runtime is not None:  # embedded: LS's own URL/token when none is configured
            runtime.loader.use_setup_credentials(hostname, token)
        self.picks.use_setup_credentials(hostname, token)
        if self.webhook_auth is not None:  # /setup passed basic auth: LS's webhook needs it too
            self.webhook_auth.use_setup_credentials(hostname, token)
            self.webhook_auth.ensure(project)
        return {"model_version": self.requested_version(project)}

    def requested_version(self, project: str | None) -> str:
        """The version LS asks for, which /setup returns and predictions are served and stamped
        with: the one picked in LS (the project's ML backend record with auto update off, see
        backend/picked.py) when it is the base or a promoted version of the project, else the
        project's current version."""
        current = self._guard(self.transport.model_version, project)
        picked = tuple(sorted(set(self.picks.picked(project))))
        if not picked or picked == (current,):
            return current
        usable = set(picked) & set(self._guard(self.transport.versions, project))
        if len(usable) == 1:
            return usable.pop()
        if (project, picked) not in self._ignored_picks:
            self._ignored_picks.add((project, picked))
            logger.warning(
                "project %s: Label Studio pins model version(s) %s, %s; serving %s",
                project,
                ", ".join(picked),
                "several of them known" if usable else "not a version of this project",
                current,
            )
        return current

    def versions(self, project: object = None) -> dict:
        """``{"versions": [...]}``: the base and the promoted versions of ``project`` (of every
        project when none is given: LS's ``GET /versions`` carries no project id)."""
        key = project_id(project)
        if project not in (None, "") and key is None:
            raise ServiceError(
                f"project must be a numeric Label Studio project id: {project!r}", 400
            )
        return {"versions": self._guard(self.transport.versions, key)}

    # -- /webhook ------------------------------------------------------------------------------
    def webhook(self, payload: dict, source: str | None = None) -> tuple[dict, int]:
        """LS's "Start training" and annotation events; answers at once (LS waits 1 s for
        events), never trains in the request. Both are control actions (:meth:`allow_control`,
        ``source`` is the caller's address). Returns (body, HTTP status)."""
        action = str(payload.get("action") or "")
        project = project_id(payload.get("project"))
        self.metrics.webhooks.labels(action or "unknown").inc()
        if action == "START_TRAINING":
            if project is None:
                raise ServiceError("START_TRAINING without a project id", 400)
            self.allow_control(action, project, source)
            # the project's extra_params {"train_mode": "sami"}: a SAMI run, else the fine-tune
            mode = train_mode(self._guard(self.transport.project_params, project))
            job = self._guard(submit_training, self.transport, project, mode, "start_training")
            return {"job": job, "status": "queued", "project": project, "mode": mode}, 201
        events, deleted = annotation_events(payload)
        if project is None or not (events or deleted):
            return {"status": "ignored", "action": action}, 200
        self.allow_control(action, project, source)
        count = self._guard(self.transport.project_state.record, project, events, deleted)
        return {"status": "recorded", "action": action, "new_annotations": count}, 200

    # -- /predict ----------------------------------------------------------------------------
    def predict(self, request: dict) -> dict:
        """The /predict body -> ``{"results": [...]}`` (one entry per task, in order)."""
        tasks = request.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise ServiceError("'tasks' must be a non-empty list of task objects", 400)
        most = self.settings.max_tasks_per_request
        if len(tasks) > most:
            raise ServiceError(
                f"{len(tasks)} tasks in one request; at most {most} (MAX_TASKS_PER_REQUEST): "
                "select fewer tasks",
                413,
            )
        try:
            config = parse_label_config(request.get("label_config") or "")
        except LabelConfigError as error:
            raise ServiceError(str(error), 422) from error
        project = project_id(request.get("project")) or project_id(tasks[0].get("project"))
        params = request.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        if context:
            if len(tasks) != 1:
                raise ServiceError("an interactive request must carry exactly one task", 400)
            return {"results": [self.interactive(project, tasks[0], context, config)]}
        return {"results": self.batch(project, tasks, config)}

    def _observe(self, entry: dict) -> None:
        timings = entry.pop("timings", None) or {}
        if timings.get("encoder"):
            self.metrics.encoder_seconds.observe(timings["encoder"])
            self.metrics.embedding_cache.labels("miss").inc()
        elif "encoder" in timings:
            self.metrics.embedding_cache.labels("hit").inc()
        if timings.get("decoder"):
            self.metrics.decoder_seconds.observe(timings["decoder"])

    def interactive(self, project: str | None, task: dict, context: dict, config) -> dict:
        if not isinstance(context, dict):
            raise ServiceError("params.context must be an object", 400)
        try:
            prompt = parse_context(context.get("result") or [], self.settings.max_image_pixels)
        except PromptError as error:
            self.metrics.predictions.labels("interactive", "bad_prompt").inc()
            raise ServiceError(str(error), 422) from error
        version = self.requested_version(project)
        if prompt is None:
            return {"result": [], "model_version": version}
        try:
            request = segment_request(project, task, config, prompt, version)
        except TaskError as error:
            raise ServiceError(str(error), error.status) from error
        entry = self._guard(
            self.transport.call, "segment", request, self.settings.interactive_wait_seconds
        )
        if "error" in entry:
            self.metrics.predictions.labels("interactive", "error").inc()
            raise ServiceError(entry["error"], int(entry.get("status") or 422))
        self._observe(entry)
        self.metrics.predictions.labels("interactive", "ok").inc()
        return entry

    def autolabel_mode(self, project: str | None) -> tuple[str, int]:
        """The project's batch mode and grid (backend record's extra_params, else env)."""
        params = self._guard(self.transport.project_params, project)
        mode = params.get("autolabel_mode", self.settings.autolabel_mode)
        if mode not in AUTOLABEL_MODES:
            mode = self.settings.autolabel_mode
        points = params.get("points_per_side", self.settings.autolabel_points_per_side)
        if not isinstance(points, int) or not 0 <= points <= 64:
            points = self.settings.autolabel_points_per_side
        return mode, points

    def batch(self, project: str | None, tasks: list[dict], config: ProjectConfig) -> list[dict]:
        """The "Retrieve predictions" request (``context`` null): one entry per task, in order.

        LS stores every entry that has a ``result`` as the version's prediction and never asks
        again for that task under that version; entries without ``result`` are asked for again
        next time. So: embedded, each task is predicted in the request (boxes or automatic
        masks, :meth:`autolabel_mode`) until the time budget is spent, and tasks without work,
        failed or left over get an entry without ``result`` (the reason in ``skipped``). Redis:
        every task becomes one ``autolabel`` job on ``batch`` (job id = project, task, version:
        never queued twice) and its entry has no ``result`` (LS gets the answer at once); the
        worker writes the prediction through the LS API with the same version, after checking
        that the task has none of it yet. A single task (the editor opening a task without
        predictions) never waits for automatic masks: its rectangles become masks at once
        (embedded) or in a job at the front of the queue (Redis); without rectangles only its
        embedding is computed, in the background (Redis: at the front of the queue), so that the
        first click is fast."""
        version = self.requested_version(project)
        mode, points_per_side = self.autolabel_mode(project)
        queued = self.transport.name != "embedded"
        started = time.monotonic()
        budget = self.settings.batch_time_budget_seconds
        deadline = started + budget  # no new task after it
        # ... and a task running past this stops (at a checkpoint of the model): LS gives up
        # on the whole request at LS_PREDICT_TIMEOUT_SECONDS.
        hard_deadline = started + max(budget, min(1.5 * budget, LS_PREDICT_TIMEOUT_SECONDS - 10))
        single = len(tasks) == 1
        entries = []
        for task in tasks:
            task_id = task.get("id")
            try:
                if mode == "off":
                    entries.append(self._skipped(version, "batch predictions are off (mode off)"))
                    continue
                request = autolabel_request(
                    project,
                    task,
                    config,
                    mode,
                    points_per_side,
                    version,
                    queued,
                    self.settings.max_image_pixels,
                )
                boxes = request.task.boxes
                prewarm = PrewarmRequest(project=project, task=task_id, image=request.task.image)
                automatic = not boxes and mode in ("auto", "everything")
                if not boxes and (single or not automatic):
                    if single:  # the editor opened a task: only its embedding, at the front of
                        # the queue, never a whole "segment everything" ahead of the clicks
                        self._guard(self.transport.submit, "prewarm", prewarm, None, True)
                    reason = (
                        "automatic masks are not computed for one task"
                        if automatic
                        else "no rectangles to turn into masks"
                    )
                    entries.append(self._skipped(version, reason))
                elif queued:
                    job = self._guard(
                        self.transport.submit,
                        "autolabel",
                        request,
                        autolabel_job_id(project, task_id, version),
                        single,
                        f"autolabel task {task_id} of project {project} ({mode})",
                    )
                    entries.append(
                        self._skipped(
                            version,
                            f"queued as job {job}: the workers write the prediction to "
                            "Label Studio",
                        )
                    )
                elif time.monotonic() > deadline:
                    entries.append(
                        self._skipped(
                            version, "time budget of this request used up; retrieve again"
                        )
                    )
                else:
                    remaining = hard_deadline - time.monotonic()
                    entries.append(self._autolabel_inline(request, version, remaining))
            except (PromptError, TaskError, ServiceError, LabelConfigError) as error:
                logger.warning("task %s: no prediction: %s", task_id, error)
                self.metrics.predictions.labels("batch", "error").inc()
                entries.append(self._skipped(version, str(error)))
        return entries

    def _autolabel_inline(self, request: AutolabelRequest, version: str, seconds: float) -> dict:
        """One task predicted in this request, stopped after ``seconds`` (no result then)."""
        from serving.compute import DeadlineExceeded

        try:
            entry = self._guard(self.transport.call, "autolabel", request, seconds)
        except DeadlineExceeded:
            entry = {"skipped": "time budget of this request used up; retrieve again"}
        if "error" in entry or "skipped" in entry:
            reason = entry.get("error") or entry.get("skipped")
            logger.warning("task %s: no prediction: %s", request.task.id, reason)
            self.metrics.predictions.labels("batch", "error").inc()
            return self._skipped(version, reason)
        self.metrics.predictions.labels("batch", "ok").inc()
        return entry

    @staticmethod
    def _skipped(version: str, reason: str) -> dict:
        return {"model_version": version, "skipped": reason}

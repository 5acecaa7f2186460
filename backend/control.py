"""Who may run control actions: ``START_TRAINING`` and annotation events on ``/webhook``,
``extra_params`` on ``/setup``. With basic auth on, holding it is enough (:class:`WebhookAuth`
gives LS's webhook the header); otherwise :class:`ProjectCheck` admits only projects that the
configured Label Studio has. Every refusal is logged with the caller's address and the reason.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from serving.labelstudio.images import ImageError, LabelStudioCredentials

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 2.0  # one LS API call (LS gives an event webhook 1 s, /setup 3 s)
KNOWN_SECONDS = 3600.0  # a project LS has: asked again after this
UNKNOWN_SECONDS = 60.0  # a project LS does not have: refused without asking for this long
MAX_CACHED_PROJECTS = 4096
DONE_SECONDS = 3600.0  # a project's webhook header is checked again after this


class ControlRefused(Exception):
    """A control action that is not allowed; ``status`` is the HTTP status (403 or 503)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


def log_refusal(action: str, project: str | None, source: str | None, reason: str) -> None:
    """The one log line of every refused control action (who asked, for what, why)."""
    logger.warning(
        "refused %s for project %s from %s: %s", action, project, source or "unknown", reason
    )


class ProjectCheck:
    """Whether a project exists on the configured LS: the check of control actions when basic
    auth is off.

    Asks ``LABEL_STUDIO_URL`` (+ ``LABEL_STUDIO_API_KEY``; never ``/setup``'s ``hostname``, which
    any caller chooses) with ``GET /api/projects/<id>``, cached per project (``known_seconds`` /
    ``unknown_seconds``). :meth:`require` raises ControlRefused: unknown project 403, LS not
    answering 503, no LS configured 403 for every project."""

    def __init__(
        self,
        label_studio_url: str,
        api_key: str,
        client: httpx.Client | None = None,
        known_seconds: float = KNOWN_SECONDS,
        unknown_seconds: float = UNKNOWN_SECONDS,
    ) -> None:
        self._client = client or httpx.Client(
            timeout=LOOKUP_TIMEOUT_SECONDS, follow_redirects=False
        )
        self.credentials = LabelStudioCredentials(label_studio_url, api_key, self._client)
        self.configured = bool(label_studio_url and api_key)
        self.known_seconds = known_seconds
        self.unknown_seconds = unknown_seconds
        self._cache: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def require(self, project: str) -> None:
        """Returns when ``project`` exists on LS; raises ControlRefused otherwise."""
        if not self.configured:
            raise ControlRefused(
                "control actions (training, annotation events, extra_params) are refused: set "
                "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (projects are then checked with "
                "Label Studio) or BASIC_AUTH_USER/BASIC_AUTH_PASS",
                403,
            )
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(project)
        if cached is None or now - cached[0] > (
            self.known_seconds if cached[1] else self.unknown_seconds
        ):
            cached = (now, self._exists(project))
            with self._lock:
                if len(self._cache) >= MAX_CACHED_PROJECTS:
                    self._cache.clear()
                self._cache[project] = cached
        if not cached[1]:
            raise ControlRefused(
                f"project {project} does not exist on the configured Label Studio "
                f"({self.credentials.url})",
                403,
            )

    def _exists(self, project: str) -> bool:
        url = f"{self.credentials.url}/api/projects/{project}"
        try:
            response = self._client.get(url, headers=self.credentials.header())
        except (httpx.HTTPError, ImageError) as error:
            raise ControlRefused(
                f"cannot check project {project} with Label Studio ({error}); try again", 503
            ) from error
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise ControlRefused(
                f"cannot check project {project} with Label Studio (HTTP "
                f"{response.status_code}); check LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY",
                503,
            )
        return True

    def close(self) -> None:
        self._client.close()


class WebhookAuth:
    """Makes LS's webhook for this backend carry the basic auth header.

    With ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` set every route needs them
    (``app.BasicAuthMiddleware``); LS sends them with its requests (the ML backend record's basic
    auth) but not with its event webhooks (annotations), so ``/setup`` calls :meth:`ensure`.
    LS creates the webhook ``<ML backend url>/webhook`` when the backend is connected (after the
    first ``/setup``). This finds the project's ML backend records that use this backend's basic
    auth user (``GET /api/projects/<id>/model-versions?extended=true&include_live_models=true``:
    LS's database only, no call back to the backend), their webhooks (``GET
    /api/webhooks?project=<id>``) and sets the header (``PATCH /api/webhooks/<id>``). Best
    effort, in the background: a few tries ``retry_seconds`` apart; a ``/setup`` after
    ``again_seconds`` (doubled after each failed round, at most an hour) tries again; once
    done, a ``/setup`` an hour later checks again (a backend connected anew, a new webhook)."""

    def __init__(
        self,
        user: str,
        password: str,
        label_studio_url: str,
        api_key: str,
        client: httpx.Client | None = None,
        tries: int = 5,
        retry_seconds: float = 1.0,
        again_seconds: float = 60.0,
        trust_setup_host: bool = False,
    ) -> None:
        self.user = user
        self.header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self._client = client or httpx.Client(
            timeout=LOOKUP_TIMEOUT_SECONDS, follow_redirects=False
        )
        self.credentials = LabelStudioCredentials(
            label_studio_url, api_key, self._client, trust_setup_host
        )
        self.tries = tries
        self.retry_seconds = retry_seconds
        self.again_seconds = again_seconds
        self._next: dict[str, float] = {}  # project -> when a /setup may start a round again
        self._failures: dict[str, int] = {}  # project -> failed rounds so far
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-auth")
        self._closed = False

    def use_setup_credentials(self, hostname: str | None, access_token: str | None) -> None:
        """Fall back to what LS's /setup sends when no LABEL_STUDIO_URL/API key is configured
        (/setup itself passed basic auth)."""
        self.credentials = self.credentials.or_setup(hostname, access_token)

    def ensure(self, project: str | None) -> None:
        """Start setting the header for ``project`` in the background (returns at once)."""
        if project is None or not self.credentials.url or self._closed:
            return
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(project, 0.0):
                return
            failures = self._failures.get(project, 0)
            self._next[project] = now + min(self.again_seconds * 2**failures, DONE_SECONDS)
        self._executor.submit(self._run, project)

    def _run(self, project: str) -> None:
        reason = "no attempt"
        for attempt in range(self.tries):
            if self._closed:
                return
            if attempt:
                time.sleep(self.retry_seconds)
            try:
                patched = self.sync(project)
            except (httpx.HTTPError, ImageError, ValueError, KeyError, TypeError) as error:
                reason = f"{type(error).__name__}: {error}"
                continue
            if patched is not None:
                with self._lock:
                    self._failures[project] = 0
                    self._next[project] = time.monotonic() + DONE_SECONDS
                if patched:
                    logger.info(
                        "project %s: Label Studio's webhook(s) %s now carry the backend's basic "
                        "auth (annotation events reach it)",
                        project,
                        ", ".join(patched),
                    )
                return
            reason = "no webhook of an ML backend record with this basic auth user yet"
        with self._lock:
            self._failures[project] = self._failures.get(project, 0) + 1
        logger.warning(
            "project %s: could not add the basic auth header to Label Studio's webhook (%s); "
            "annotation events are refused until it has it (PATCH /api/webhooks/<id> "
            '{"headers": {"Authorization": "Basic ..."}}); trying again at a later /setup',
            project,
            reason,
        )

    def sync(self, project: str) -> list[str] | None:
        """One attempt: the webhook URLs whose header was set now ([] when all had it), or
        None when LS has no webhook for this backend's records yet. Raises on LS errors."""
        base = self.credentials.url
        records = self._get(
            f"{base}/api/projects/{project}/model-versions",
            {"extended": "true", "include_live_models": "true", "limit": "1"},
        ).get("live")
        targets = {
            str(record["url"]).rstrip("/") + "/webhook"
            for record in records or []
            if isinstance(record, dict)
            and record.get("auth_method") == "BASIC_AUTH"
            and record.get("basic_auth_user") == self.user
            and record.get("url")
        }
        webhooks = [
            hook
            for hook in self._get(f"{base}/api/webhooks", {"project": project})
            if isinstance(hook, dict) and hook.get("url") in targets
        ]
        if not webhooks:
            return None
        patched = []
        for hook in webhooks:
            headers = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
            if headers.get("Authorization") == self.header:
                continue
            response = self._client.patch(
                f"{base}/api/webhooks/{int(hook['id'])}",
                json={"headers": {**headers, "Authorization": self.header}},
                headers=self.credentials.header(),
            )
            response.raise_for_status()
            patched.append(str(hook["url"]))
        return patched

    def _get(self, url: str, params: dict):
        response = self._client.get(url, params=params, headers=self.credentials.header())
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()

"""The model version a user picked for a project in Label Studio, read through LS's API.

LS never sends it (``/setup`` and ``/predict`` carry no version); the backend serves and stamps
the pick (``SegmentationService.requested_version``), so that what LS stores, filters on and
shows is one version.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx

from serving.labelstudio.images import ImageError, LabelStudioCredentials

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_SECONDS = 1.0


class PickedVersions:
    """Per project: the ``model_version`` of its LS ML backend records with auto update off.

    With auto update off LS keeps the record's version whatever ``/setup`` answers, so that
    version is the user's pick (set with ``PATCH /api/ml/<id> {"url", "project", "auto_update":
    false, "model_version": ...}``; LS 1.23.2's web UI has no control for it, the API and SDK
    do). Read from ``GET /api/projects/<id>/model-versions?extended=true&include_live_models=
    true``, LS's database only (~40 ms); ``GET /api/ml?project=<id>`` would call every backend's
    ``/health`` and ``/setup`` first, so a ``/setup`` using it would call itself through LS.
    Cached per project ``cache_seconds`` (``VERSION_PICK_CACHE_SECONDS``: LS gives ``/setup``
    3 s and calls it on every task opened); a failed look-up is cached too, logged, "no pick"."""

    def __init__(
        self,
        label_studio_url: str,
        api_key: str,
        cache_seconds: float = 15.0,
        client: httpx.Client | None = None,
        trust_setup_host: bool = False,
    ) -> None:
        self._client = client or httpx.Client(
            timeout=LOOKUP_TIMEOUT_SECONDS, follow_redirects=False
        )
        self.credentials = LabelStudioCredentials(
            label_studio_url, api_key, self._client, trust_setup_host
        )
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, list[str]]] = {}
        self._lock = threading.Lock()

    def use_setup_credentials(self, hostname: str | None, access_token: str | None) -> None:
        """What LS's /setup sends, when no LABEL_STUDIO_URL is configured and
        LABEL_STUDIO_TRUST_SETUP_HOST is on (else ignored)."""
        self.credentials = self.credentials.or_setup(hostname, access_token)

    def picked(self, project: str | None) -> list[str]:
        """The versions pinned for ``project`` (auto update off), usually one; [] when none,
        when no LS is known, or when LS cannot be asked (cached ``cache_seconds``)."""
        if project is None or not self.credentials.url:
            return []
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(project)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        versions = self._fetch(project)
        with self._lock:
            self._cache[project] = (now, versions)
        return versions

    def _fetch(self, project: str) -> list[str]:
        url = f"{self.credentials.url}/api/projects/{project}/model-versions"
        params = {"extended": "true", "include_live_models": "true", "limit": "1"}
        try:
            response = self._client.get(url, params=params, headers=self.credentials.header())
            response.raise_for_status()
            records = response.json().get("live") or []
        except (httpx.HTTPError, ImageError, ValueError, AttributeError) as error:
            logger.warning(
                "cannot read project %s's ML backend records from Label Studio (%s); serving "
                "its current model version",
                project,
                error,
            )
            return []
        return [
            str(record["model_version"])
            for record in records
            if isinstance(record, dict)
            and record.get("auto_update") is False
            and record.get("model_version")
        ]

    def close(self) -> None:
        self._client.close()

"""Task image URL -> RGB array: Label Studio URLs and credentials, bounded downloads through
the outbound policy (serving/labelstudio/outbound.py), a cache.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
import typing
from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import httpx
import numpy as np

from efficientsam.arrays import image_content_hash
from serving.labelstudio.outbound import (
    DeadlineExceeded,
    GuardedTransport,
    OutboundPolicy,
    OutboundRefused,
    Resolver,
    deadline,
    system_resolver,
)

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://", "gcs://")
MAX_REDIRECTS = 5
# A caller's own deadline (time.monotonic()) that caps DOWNLOAD_DEADLINE_SECONDS: the embedded
# backend sets it for a batch task predicted inside LS's request, so that a slow host cannot
# carry the request past LS's 100 s.
caller_deadline: ContextVar[float | None] = ContextVar("image_caller_deadline", default=None)


class ImageError(Exception):
    """An image that cannot be had; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoadedImage:
    """HxWx3 uint8 RGB (EXIF-oriented), its content hash, and where it came from."""

    array: np.ndarray
    content_hash: str
    url: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return int(self.array.shape[1]), int(self.array.shape[0])


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _looks_like_jwt(token: str) -> bool:
    pieces = token.split(".")
    return len(pieces) == 3 and all(pieces) and token.startswith("ey")


def _jwt_expiry(token: str) -> float | None:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return float(json.loads(base64.urlsafe_b64decode(payload))["exp"])
    except (ValueError, KeyError, IndexError, binascii.Error, TypeError):
        return None


class LabelStudioCredentials:
    """Builds the Authorization header for the LS host: a legacy token is sent as ``Token
    <key>``; a personal access token (a JWT) is exchanged at ``/api/token/refresh/`` for a
    short-lived access token, sent as ``Bearer`` and refreshed before it expires. The header goes
    only to the LS origin (scheme, host and port), also across redirects."""

    REFRESH_MARGIN_SECONDS = 30.0

    def __init__(
        self, url: str, api_key: str, client: httpx.Client, trust_setup_host: bool = False
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key.strip()
        self.trust_setup_host = trust_setup_host
        self._client = client
        self._ignored_setup_host = False
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()

    @property
    def is_personal_access_token(self) -> bool:
        return _looks_like_jwt(self.api_key)

    def is_label_studio_url(self, url: str) -> bool:
        return bool(self.url) and _origin(url) == _origin(self.url)

    def is_label_studio_host(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is the LS host (the outbound policy allows it anywhere)."""
        _, ls_host, ls_port = _origin(self.url)
        return bool(self.url) and (host.lower(), port) == (ls_host, ls_port)

    def or_setup(self, hostname: str | None, access_token: str | None) -> LabelStudioCredentials:
        """These credentials, or, when no LABEL_STUDIO_URL is configured and
        ``trust_setup_host`` is on, what LS's /setup sends (``hostname``, ``access_token``).
        Never by default: whoever called /setup first would pick the LS host."""
        if self.url or not hostname or not access_token:
            return self
        if not str(hostname).startswith(("http://", "https://")):
            return self
        if not self.trust_setup_host:
            if self._ignored_setup_host:
                return self
            self._ignored_setup_host = True
            logger.warning(
                "ignoring /setup's hostname %.200s: set LABEL_STUDIO_URL (or "
                "LABEL_STUDIO_TRUST_SETUP_HOST=1 to let /setup pick the Label Studio host)",
                hostname,
            )
            return self
        logger.info(
            "using Label Studio at %s (from /setup; set LABEL_STUDIO_URL to override)", hostname
        )
        return LabelStudioCredentials(str(hostname), str(access_token), self._client, True)

    def header(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if not self.is_personal_access_token:
            return {"Authorization": f"Token {self.api_key}"}
        with self._lock:
            if (
                self._access is None
                or time.time() > self._access_expires - self.REFRESH_MARGIN_SECONDS
            ):
                self._access, self._access_expires = self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def _exchange(self) -> tuple[str, float]:
        try:
            response = self._client.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self.api_key}
            )
        except httpx.HTTPError as error:
            raise ImageError(
                f"cannot reach Label Studio to refresh the token: {error}", 502
            ) from error
        if response.status_code != 200:
            raise ImageError(
                f"Label Studio refused the personal access token (HTTP {response.status_code}); "
                "check LABEL_STUDIO_API_KEY",
                502,
            )
        access = response.json().get("access", "")
        expiry = _jwt_expiry(access) or time.time() + 300
        return access, expiry


class ImageLoader:
    """Resolves, downloads, decodes and caches task images (LRU bounded in bytes).

    Downloads go through the outbound policy (``outbound_allow``: OUTBOUND_ALLOW's format;
    ``resolver``: host name -> addresses, injectable for tests), follow redirects by hand and
    end within ``download_deadline_seconds`` in total (redirects included); they are bounded in
    bytes, images in pixels (checked before decoding). EXIF orientation is applied, so arrays
    have the size the browser shows."""

    def __init__(
        self,
        label_studio_url: str = "",
        api_key: str = "",
        max_download_bytes: int = 64 * 1024**2,
        max_image_pixels: int = 64_000_000,
        timeout_seconds: float = 20.0,
        cache_bytes: int = 256 * 1024**2,
        *,
        download_deadline_seconds: float = 60.0,
        outbound_allow: str = "",
        trust_setup_host: bool = False,
        resolver: Resolver = system_resolver,
    ) -> None:
        policy = OutboundPolicy(
            outbound_allow,
            lambda host, port: self.credentials.is_label_studio_host(host, port),
            resolver,
        )
        self._client = httpx.Client(
            transport=GuardedTransport(policy),
            timeout=timeout_seconds,
            follow_redirects=False,
            trust_env=False,
        )
        self.credentials = LabelStudioCredentials(
            label_studio_url, api_key, self._client, trust_setup_host
        )
        self.max_download_bytes = max_download_bytes
        self.max_image_pixels = max_image_pixels
        self.download_deadline_seconds = download_deadline_seconds
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, LoadedImage] = OrderedDict()
        self._cache_size = 0
        self._lock = threading.Lock()

    def use_setup_credentials(self, hostname: str | None, access_token: str | None) -> None:
        """What LS's /setup sends, when no LABEL_STUDIO_URL is configured and
        LABEL_STUDIO_TRUST_SETUP_HOST is on (else ignored)."""
        self.credentials = self.credentials.or_setup(hostname, access_token)

    # -- URLs --------------------------------------------------------------------------------
    def resolve(self, url: str, task_id: int | None = None) -> str:
        """The absolute URL to fetch for a task's image reference: ``/data/upload/...``,
        ``/data/local-files/?d=...`` and other relative paths are LS URLs; cloud URLs
        (``CLOUD_SCHEMES``: ``s3://``, ``gs://`` ...) go through LS's presign endpoint for the
        task; ``http(s)://`` URLs and ``data:image/...;base64,`` URIs are used as they are;
        other schemes are refused."""
        if not isinstance(url, str) or not url.strip():
            raise ImageError("the task has no image URL")
        url = url.strip()
        if url.startswith("data:"):
            return url
        if url.startswith(CLOUD_SCHEMES):
            if task_id is None:
                raise ImageError(f"cannot presign {url}: no task id")
            self._require_label_studio(url)
            encoded = base64.urlsafe_b64encode(url.encode()).decode()
            return f"{self.credentials.url}/tasks/{task_id}/presign/?fileuri={quote(encoded)}"
        scheme = _scheme(url)
        if scheme in ("http", "https"):
            return url
        if scheme:
            _refuse_scheme(scheme)
        self._require_label_studio(url)
        return urljoin(self.credentials.url + "/", url.lstrip("/"))

    def _require_label_studio(self, url: str) -> None:
        if not self.credentials.url:
            raise ImageError(
                f"cannot download {url}: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY so the "
                "backend can reach Label Studio",
                422,
            )

    # -- loading -----------------------------------------------------------------------------
    def load(self, url: str, task_id: int | None = None) -> LoadedImage:
        resolved = self.resolve(url, task_id)
        with self._lock:
            cached = self._cache.get(resolved)
            if cached is not None:
                self._cache.move_to_end(resolved)
                return cached
        data = (
            self._data_uri(resolved) if resolved.startswith("data:") else self._download(resolved)
        )
        array = decode_image(data, self.max_image_pixels)
        image = LoadedImage(array, image_content_hash(array), resolved)
        self._remember(resolved, image)
        return image

    def _remember(self, key: str, image: LoadedImage) -> None:
        size = image.array.nbytes
        if size > self.cache_bytes:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = image
            self._cache_size += size
            while self._cache_size > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cache_size -= evicted.array.nbytes

    def _data_uri(self, uri: str) -> bytes:
        header, _, payload = uri.partition(",")
        if ";base64" not in header:
            raise ImageError("only base64 data: URIs are supported")
        if len(payload) * 3 // 4 > self.max_download_bytes:
            raise ImageError("image larger than the download limit", 413)
        try:
            return base64.b64decode(payload, validate=False)
        except binascii.Error as error:
            raise ImageError(f"bad base64 image data: {error}") from error

    def _download(self, url: str) -> bytes:
        """GET ``url`` through the outbound policy, following redirects by hand, within the
        download deadline; errors of hosts other than the LS host say only "download failed"."""
        started = time.monotonic()
        seconds = self.download_deadline_seconds
        if (cap := caller_deadline.get()) is not None:
            seconds = max(0.05, min(seconds, cap - started))
        with deadline(seconds) as until:
            for _ in range(MAX_REDIRECTS + 1):
                scheme = _scheme(url)
                if scheme not in ("http", "https"):
                    _refuse_scheme(scheme)
                from_ls = self.credentials.is_label_studio_url(url)
                try:
                    data, location = self._get(url, from_ls)
                except OutboundRefused as error:
                    raise ImageError(f"refused by the outbound policy: {error}", 422) from None
                except (httpx.HTTPError, DeadlineExceeded) as error:
                    if isinstance(error, DeadlineExceeded) or time.monotonic() >= until - 0.01:
                        raise ImageError(
                            f"image download failed: not done within the "
                            f"{seconds:.3g} s deadline "
                            f"(DOWNLOAD_DEADLINE_SECONDS, or the request's time budget): "
                            f"{_short(url)}",
                            422,
                        ) from None
                    if from_ls:
                        raise ImageError(
                            f"cannot download image from {_short(url)}: {error}", 502
                        ) from error
                    logger.info("image download from %s failed: %r", _short(url), error)
                    raise ImageError(f"image download failed: {_short(url)}", 422) from None
                if location is None:
                    logger.debug(
                        "downloaded %s (%d bytes) in %.2f s",
                        _short(url),
                        len(data),
                        time.monotonic() - started,
                    )
                    return data
                url = urljoin(url, location)
        raise ImageError(f"image download failed: too many redirects: {_short(url)}", 422)

    def _get(self, url: str, from_ls: bool) -> tuple[bytes, str | None]:
        """One GET: (body, None), or (b"", the redirect's location)."""
        headers = self.credentials.header() if from_ls else {}
        with self._client.stream("GET", url, headers=headers) as response:
            if response.is_redirect:
                return b"", response.headers.get("location", "")
            if response.status_code != 200:
                if from_ls:
                    raise ImageError(
                        f"image download failed: HTTP {response.status_code} from {_short(url)}",
                        404 if response.status_code == 404 else 502,
                    )
                logger.info("image download from %s: HTTP %d", _short(url), response.status_code)
                raise ImageError(f"image download failed: {_short(url)}", 422)
            declared = int(response.headers.get("content-length") or 0)
            if declared > self.max_download_bytes:
                raise ImageError(
                    f"image is {declared} bytes, over the {self.max_download_bytes} limit", 413
                )
            chunks, total = [], 0
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > self.max_download_bytes:
                    raise ImageError(f"image is over the {self.max_download_bytes}-byte limit", 413)
                chunks.append(chunk)
            return b"".join(chunks), None

    def close(self) -> None:
        self._client.close()


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:  # e.g. a broken IPv6 literal
        raise ImageError(f"not a valid URL: {url[:200]}") from None


def _refuse_scheme(scheme: str) -> typing.NoReturn:
    raise ImageError(
        f"refused by the outbound policy: {scheme[:20]}: URLs are not allowed (http, https, "
        "data: and cloud storage URIs only)",
        422,
    )


def _short(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"[:200] if parts.scheme else url[:200]


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB, EXIF orientation applied; pixel count checked first."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(
                    f"image is {width}x{height} = {width * height} pixels, over the "
                    f"{max_pixels} limit",
                    413,
                )
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ImageError(f"not a readable image: {error}") from error
    except OSError as error:  # truncated or corrupt file
        raise ImageError(f"corrupt image file: {error}") from error

"""Task image URL -> RGB array: Label Studio URLs and credentials, bounded downloads, a cache.

* ``/data/upload/...``, ``/data/local-files/?d=...`` and other relative paths are LS URLs.
* ``s3://``, ``gs://``, ``azure-blob://`` go through LS's presign endpoint for the task.
* ``http(s)://`` URLs are fetched as they are; ``data:image/...;base64,`` URIs are decoded.
* The LS credential goes only to the LS origin (scheme, host and port), also across redirects,
  which are followed by hand. A legacy token is sent as ``Token <key>``; a personal access token
  (a JWT) is exchanged at ``/api/token/refresh/`` for a short-lived access token, sent as
  ``Bearer`` and refreshed before it expires.
* Downloads are bounded in bytes and time, images in pixels (checked before decoding); EXIF
  orientation is applied, so arrays have the size the browser shows.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import quote, urljoin, urlsplit

import httpx
import numpy as np

from efficientsam.utils import image_content_hash

logger = logging.getLogger(__name__)

CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://", "gcs://")
MAX_REDIRECTS = 5


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
    """Builds the Authorization header for the LS host (legacy token or exchanged PAT)."""

    REFRESH_MARGIN_SECONDS = 30.0

    def __init__(self, url: str, api_key: str, client: httpx.Client) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key.strip()
        self._client = client
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()

    @property
    def is_personal_access_token(self) -> bool:
        return _looks_like_jwt(self.api_key)

    def is_label_studio_url(self, url: str) -> bool:
        return bool(self.url) and _origin(url) == _origin(self.url)

    def or_setup(self, hostname: str | None, access_token: str | None) -> LabelStudioCredentials:
        """These credentials, or, when no LABEL_STUDIO_URL is configured, what LS's /setup sends
        (``hostname``, ``access_token``)."""
        if self.url or not hostname or not access_token:
            return self
        if not str(hostname).startswith(("http://", "https://")):
            return self
        logger.info(
            "using Label Studio at %s (from /setup; set LABEL_STUDIO_URL to override)", hostname
        )
        return LabelStudioCredentials(str(hostname), str(access_token), self._client)

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
    """Resolves, downloads, decodes and caches task images (LRU bounded in bytes)."""

    def __init__(
        self,
        label_studio_url: str = "",
        api_key: str = "",
        max_download_bytes: int = 64 * 1024**2,
        max_image_pixels: int = 64_000_000,
        timeout_seconds: float = 20.0,
        cache_bytes: int = 256 * 1024**2,
        client: httpx.Client | None = None,
    ) -> None:
        self._client = client or httpx.Client(timeout=timeout_seconds, follow_redirects=False)
        self.credentials = LabelStudioCredentials(label_studio_url, api_key, self._client)
        self.max_download_bytes = max_download_bytes
        self.max_image_pixels = max_image_pixels
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, LoadedImage] = OrderedDict()
        self._cache_size = 0
        self._lock = threading.Lock()

    def use_setup_credentials(self, hostname: str | None, access_token: str | None) -> None:
        """Fall back to what LS's /setup sends when no LABEL_STUDIO_URL/API key is configured."""
        self.credentials = self.credentials.or_setup(hostname, access_token)

    # -- URLs --------------------------------------------------------------------------------
    def resolve(self, url: str, task_id: int | None = None) -> str:
        """The absolute URL to fetch for a task's image reference."""
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
        if url.startswith(("http://", "https://")):
            return url
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
        started = time.perf_counter()
        for _ in range(MAX_REDIRECTS + 1):
            headers = self.credentials.header() if self.credentials.is_label_studio_url(url) else {}
            try:
                with self._client.stream("GET", url, headers=headers) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise ImageError(
                            f"image download failed: HTTP {response.status_code} from {_short(url)}",
                            404 if response.status_code == 404 else 502,
                        )
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > self.max_download_bytes:
                        raise ImageError(
                            f"image is {declared} bytes, over the {self.max_download_bytes} limit",
                            413,
                        )
                    chunks, total = [], 0
                    for chunk in response.iter_bytes():
                        total += len(chunk)
                        if total > self.max_download_bytes:
                            raise ImageError(
                                f"image is over the {self.max_download_bytes}-byte limit", 413
                            )
                        chunks.append(chunk)
                    logger.debug(
                        "downloaded %s (%d bytes) in %.2f s",
                        _short(url),
                        total,
                        time.perf_counter() - started,
                    )
                    return b"".join(chunks)
            except httpx.HTTPError as error:
                raise ImageError(
                    f"cannot download image from {_short(url)}: {error}", 502
                ) from error
        raise ImageError(f"too many redirects for {_short(url)}", 502)

    def close(self) -> None:
        self._client.close()


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

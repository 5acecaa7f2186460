"""Backend test fixtures: an HTTP server standing in for LS's file and token endpoints, payloads."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

LEGACY_TOKEN = "0123456789abcdef0123456789abcdef01234567"
JSON_TYPE = "application/json"


def _jwt(payload: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}.signature"


PAT = _jwt({"token_type": "refresh", "exp": 9_999_999_999})


def png_bytes(array: np.ndarray, exif_orientation: int | None = None, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buffer, format="JPEG", exif=exif, quality=95)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


class FileServer:
    """Serves ``files`` (path -> bytes) like LS: /data/... needs Token <legacy> or Bearer <access>;
    /api/token/refresh/ exchanges the PAT; ``api`` (path without query -> JSON value) answers
    GET /api/... with the same auth; records every request's path and auth header.
    ``PATCH /api/webhooks/<id>`` (same auth) updates that webhook in ``api["/api/webhooks"]``
    like LS and is recorded in ``patches`` as (path, body)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.api: dict[str, object] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.patches: list[tuple[str, dict]] = []
        self.access_tokens: list[str] = []
        self.access_lifetime = 300
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append((self.path, self.headers.get("Authorization")))
                if self.path == "/api/token/refresh/" and body.get("refresh") == PAT:
                    access = _jwt(
                        {
                            "token_type": "access",
                            "n": len(server.access_tokens),
                            "exp": int(time.time()) + server.access_lifetime,
                        }
                    )
                    server.access_tokens.append(access)
                    self._send(200, json.dumps({"access": access}).encode())
                else:
                    self._send(401, b'{"detail": "bad token"}')

            def _authorised(self, auth: str | None) -> bool:
                allowed = {f"Token {LEGACY_TOKEN}"} | {f"Bearer {t}" for t in server.access_tokens}
                if auth in allowed:
                    return True
                self._send(401, b'{"detail": "auth"}')
                return False

            def do_PATCH(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append((self.path, self.headers.get("Authorization")))
                if not self._authorised(self.headers.get("Authorization")):
                    return
                for hook in server.api.get("/api/webhooks") or []:
                    if self.path == f"/api/webhooks/{hook['id']}":
                        hook.update(body)
                        server.patches.append((self.path, body))
                        self._send(200, json.dumps(hook).encode(), {"Content-Type": JSON_TYPE})
                        return
                self._send(404, b'{"detail": "Not found."}')

            def do_GET(self):
                auth = self.headers.get("Authorization")
                server.requests.append((self.path, auth))
                if self.path in server.redirects:
                    self._send(302, b"", {"Location": server.redirects[self.path]})
                    return
                protected = self.path.startswith(("/data/", "/tasks/", "/api/"))
                if protected and not self._authorised(auth):
                    return
                if self.path.split("?")[0] in server.api:
                    body = json.dumps(server.api[self.path.split("?")[0]]).encode()
                    self._send(200, body, {"Content-Type": JSON_TYPE})
                    return
                if self.path not in server.files:
                    self._send(404, b"not found")
                    return
                self._send(200, server.files[self.path], {"Content-Type": "image/png"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


@pytest.fixture
def second_server():
    server = FileServer()
    yield server
    server.close()


BRUSH_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object" background="#FF0000"/>
    <Label value="Car" background="#0000FF"/>
  </BrushLabels>
  <KeyPointLabels name="tag2" toName="image" smart="true">
    <Label value="Object" smart="true" background="#000000" showInline="true"/>
    <Label value="Car" smart="true" background="#000000" showInline="true"/>
  </KeyPointLabels>
  <RectangleLabels name="tag3" toName="image" smart="true">
    <Label value="Object" background="#000000" showInline="true"/>
    <Label value="Truck" background="#000000" showInline="true"/>
  </RectangleLabels>
</View>"""


def keypoint(
    x: float,
    y: float,
    width: int = 640,
    height: int = 480,
    positive: bool | None = True,
    label: str = "Object",
    field: str = "is_positive",
) -> dict:
    """A smart keypoint item as LS 1.23's editor sends it (recorded shape)."""
    item = {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.3125, "labels": [label], "keypointlabels": [label]},
        "id": "SgAMMlu3Rn",
        "from_name": "tag2",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    if positive is not None:
        if field == "is_positive":
            item["is_positive"] = positive
        else:
            item["value"]["positive"] = positive
    return item


def rectangle(
    x: float,
    y: float,
    w: float,
    h: float,
    width: int = 640,
    height: int = 480,
    rotation: float = 0,
    label: str = "Object",
) -> dict:
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": x,
            "y": y,
            "width": w,
            "height": h,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
        "id": "Rect000001",
        "from_name": "tag3",
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def brush(mask: np.ndarray, label: str = "Object") -> dict:
    from label_studio_sdk.converter.brush import mask2rle

    height, width = mask.shape
    return {
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": [label],
        },
        "id": "Brush00001",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "manual",
    }


def predict_request(tasks: list[dict], context: dict | None, config: str = BRUSH_CONFIG) -> dict:
    return {
        "tasks": tasks,
        "project": "1.1795532368",
        "label_config": config,
        "params": {"login": None, "password": None, "context": context},
    }


def decode_brush(item: dict) -> np.ndarray:
    """A brushlabels result -> (H, W) bool, asserting alpha 255 and the declared size."""
    from label_studio_sdk.converter.brush import decode_rle

    width, height = item["original_width"], item["original_height"]
    rgba = np.asarray(decode_rle(item["value"]["rle"]), np.uint8).reshape(height, width, 4)
    assert set(np.unique(rgba[:, :, 3]).tolist()) <= {0, 255}
    return rgba[:, :, 3] == 255


def wait_until_ready(client, seconds: float = 120.0, headers: dict | None = None):
    """Poll ``/health`` until it answers 200 (the embedded model loads in the background after
    start-up; /health is 503 until a click would be served). Returns the last response."""
    deadline = time.monotonic() + seconds
    while True:
        response = client.get("/health", headers=headers)
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def bomb_png(width: int, height: int, complete: bool = True) -> bytes:
    """A 1-bit grayscale PNG of ``width`` x ``height`` black pixels, written row by row (a few
    KB to deflate, ``width * height`` bytes once decoded to 8 bits); ``complete=False``: the
    header and the first rows only (a decoder sees the size, then a truncated file)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed pixels
    rows = height if complete else min(height, 16)
    data = b"".join(compressor.compress(row) for _ in range(rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    end = chunk(b"IEND", b"") if complete else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + end


def readme_settings(label_studio_url: str, **overrides):
    """The embedded backend as README starts it: LS's address and a legacy key, the random-weight
    checkpoint, nothing else (``overrides`` where a test needs more)."""
    from serving.settings import Settings
    from tests.conftest import TI_CHECKPOINT

    return Settings.from_env(
        {"LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN},
        checkpoint=TI_CHECKPOINT,
        **overrides,
    )

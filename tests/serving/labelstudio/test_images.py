"""Image URLs, LS credentials (legacy / PAT), limits, EXIF, cache."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from serving.labelstudio.images import ImageError, ImageLoader
from tests.http_fixtures import LEGACY_TOKEN, PAT, png_bytes

IMAGE = (np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)


def test_upload_path_with_legacy_token(file_server):
    file_server.files["/data/upload/1/a.png"] = png_bytes(IMAGE)
    loader = ImageLoader(file_server.url, LEGACY_TOKEN)
    image = loader.load("/data/upload/1/a.png", task_id=1)
    np.testing.assert_array_equal(image.array, IMAGE)
    assert image.size == (64, 48)
    assert file_server.requests == [("/data/upload/1/a.png", f"Token {LEGACY_TOKEN}")]
    loader.load("/data/upload/1/a.png", task_id=1)  # cached: no second download
    assert len(file_server.requests) == 1


def test_personal_access_token_is_exchanged_and_refreshed(file_server):
    file_server.files["/data/upload/1/a.png"] = png_bytes(IMAGE)
    file_server.files["/data/upload/1/b.png"] = png_bytes(IMAGE[::-1].copy())
    file_server.access_lifetime = 10  # shorter than the refresh margin: refresh every time
    loader = ImageLoader(file_server.url, PAT)
    loader.load("/data/upload/1/a.png")
    loader.load("/data/upload/1/b.png")
    paths = [path for path, _ in file_server.requests]
    assert paths == [
        "/api/token/refresh/",
        "/data/upload/1/a.png",
        "/api/token/refresh/",
        "/data/upload/1/b.png",
    ]
    assert file_server.requests[1][1] == f"Bearer {file_server.access_tokens[0]}"
    assert file_server.requests[3][1] == f"Bearer {file_server.access_tokens[1]}"


def test_access_token_reused_while_valid(file_server):
    for name in "abc":
        file_server.files[f"/data/upload/1/{name}.png"] = png_bytes(IMAGE)
    loader = ImageLoader(file_server.url, PAT)
    for name in "abc":
        loader.load(f"/data/upload/1/{name}.png")
    assert [p for p, _ in file_server.requests].count("/api/token/refresh/") == 1


def test_token_never_goes_to_another_host(file_server, second_server):
    second_server.files["/elsewhere.png"] = png_bytes(IMAGE)
    file_server.redirects["/data/upload/1/r.png"] = f"{second_server.url}/elsewhere.png"
    # The other host is on loopback too: only OUTBOUND_ALLOW lets the loader reach it.
    loader = ImageLoader(file_server.url, LEGACY_TOKEN, outbound_allow="127.0.0.1")
    np.testing.assert_array_equal(loader.load("/data/upload/1/r.png").array, IMAGE)
    assert second_server.requests == [("/elsewhere.png", None)]
    # A plain URL on another host: fetched without credentials.
    second_server.files["/plain.png"] = png_bytes(IMAGE)
    loader.load(f"{second_server.url}/plain.png")
    assert second_server.requests[-1] == ("/plain.png", None)


def test_cloud_uri_goes_through_presign(file_server):
    uri = "s3://bucket/key.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    path = f"/tasks/7/presign/?fileuri={encoded.replace('=', '%3D')}"
    file_server.files[path] = png_bytes(IMAGE)
    loader = ImageLoader(file_server.url, LEGACY_TOKEN)
    assert loader.load(uri, task_id=7).size == (64, 48)


def test_exif_orientation_is_applied(file_server):
    file_server.files["/data/upload/1/rot.jpg"] = png_bytes(IMAGE, exif_orientation=6)
    loader = ImageLoader(file_server.url, LEGACY_TOKEN)
    assert loader.load("/data/upload/1/rot.jpg").size == (48, 64)  # displayed portrait


def test_data_uri():
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE)).decode()
    assert ImageLoader().load(uri).size == (64, 48)


@pytest.mark.parametrize(
    ("setup", "status", "message"),
    [
        (
            lambda s: s.files.__setitem__("/data/upload/x.png", b"not an image"),
            422,
            "not a readable image",
        ),
        (lambda s: None, 404, "HTTP 404"),
        (
            lambda s: s.files.__setitem__(
                "/data/upload/x.png", png_bytes(np.zeros((300, 300, 3), np.uint8))
            ),
            413,
            "pixels",
        ),
        (
            lambda s: s.files.__setitem__("/data/upload/x.png", b"\x89PNG" + b"0" * 5000),
            413,
            "limit",
        ),
    ],
)
def test_bad_images(file_server, setup, status, message):
    setup(file_server)
    loader = ImageLoader(
        file_server.url, LEGACY_TOKEN, max_download_bytes=4000, max_image_pixels=50_000
    )
    with pytest.raises(ImageError, match=message) as error:
        loader.load("/data/upload/x.png")
    assert error.value.status == status


def test_wrong_token_and_missing_configuration(file_server):
    file_server.files["/data/upload/1/a.png"] = png_bytes(IMAGE)
    with pytest.raises(ImageError, match="HTTP 401"):
        ImageLoader(file_server.url, "wrong-token").load("/data/upload/1/a.png")
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        ImageLoader().load("/data/upload/1/a.png")
    loader = ImageLoader()
    loader.use_setup_credentials(file_server.url, LEGACY_TOKEN)  # what /setup hands over
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):  # ignored unless trusted
        loader.load("/data/upload/1/a.png")
    assert file_server.requests == [("/data/upload/1/a.png", "Token wrong-token")]
    loader = ImageLoader(trust_setup_host=True)  # LABEL_STUDIO_TRUST_SETUP_HOST=1
    loader.use_setup_credentials(file_server.url, LEGACY_TOKEN)
    assert loader.load("/data/upload/1/a.png").size == (64, 48)

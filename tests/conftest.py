"""Shared test fixtures: paths to ../shared, the random-weight Ti checkpoint, the reference image."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("EFFICIENTSAM_SHARED_DIR", REPO_ROOT.parent / "shared"))
FIXTURES_DIR = SHARED_DIR / "fixtures"
REFERENCE_DIR = FIXTURES_DIR / "efficientsam_ti_reference"
TI_CHECKPOINT = FIXTURES_DIR / "efficientsam_ti_random.pt"

# LS payload builders and local HTTP servers; Redis, worker processes and an LS API stand-in
pytest_plugins = ["tests.http_fixtures", "tests.redis_fixtures"]

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def self_signed_certificate(directory: Path, name: str, alt_name: str) -> tuple[Path, Path]:
    """``cert.pem`` and ``key.pem`` in ``directory``: a certificate for ``name`` with the subject
    alternative name ``alt_name`` (``DNS:host`` or ``IP:address``), valid a day, made by the
    openssl command; it is its own CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"]
        + ["-addext", f"subjectAltName={alt_name}"],
        check=True,
        capture_output=True,
    )
    return cert, key


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"missing shared fixture {path}; the shared/ folder must sit beside the repository "
            "(or set EFFICIENTSAM_SHARED_DIR)"
        )
    return path


@pytest.fixture(scope="session")
def ti_checkpoint() -> Path:
    return _require(TI_CHECKPOINT)


@pytest.fixture(scope="session")
def ti_model(ti_checkpoint):
    from efficientsam import load_model

    return load_model(ti_checkpoint)


@pytest.fixture(scope="session")
def reference_image() -> np.ndarray:
    from PIL import Image

    with Image.open(_require(REFERENCE_DIR / "image_640x480.png")) as image:
        return np.asarray(image.convert("RGB")).copy()


@pytest.fixture(scope="session")
def reference_embeddings(ti_model, reference_image) -> torch.Tensor:
    from efficientsam.utils import image_to_tensor

    with torch.inference_mode():
        return ti_model.get_image_embeddings(image_to_tensor(reference_image))

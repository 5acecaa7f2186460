"""One client's click through the embedded service: ``SegmentationService.predict`` on a cached
image (context parsing, job request, compute thread, decoder, brush RLE), no HTTP.

    python benchmarks/bench_predict_path.py [--calls 300]

Runs on older commits too (their ``backend.settings`` / ``tests.backend.conftest`` paths), so two
checkouts can be compared in alternating runs: ``cd CHECKOUT && PYTHONPATH=$PWD python ...``.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))
SHARED = Path(
    os.environ.get("EFFICIENTSAM_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")
)
CHECKPOINT = SHARED / "fixtures" / "efficientsam_ti_random.pt"
IMAGE = SHARED / "fixtures" / "efficientsam_ti_reference" / "image_640x480.png"
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>'
    '<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/>'
    "</KeyPointLabels></View>"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    try:  # this layout
        from serving.settings import Settings
        from tests.http_fixtures import LEGACY_TOKEN, FileServer, keypoint
    except ImportError:  # before the one-way layers (500545b and older)
        from backend.settings import Settings
        from tests.backend.conftest import LEGACY_TOKEN, FileServer, keypoint
    from backend.service import SegmentationService

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(IMAGE).convert("RGB"))).save(buffer, format="PNG")
    files = FileServer()
    files.files["/data/a.png"] = buffer.getvalue()
    settings = Settings.from_env(
        {"LABEL_STUDIO_URL": files.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN},
        checkpoint=CHECKPOINT,
    )
    service = SegmentationService(settings)
    service.start()
    service.transport._ready.wait(120)
    body = {
        "tasks": [{"id": 1, "data": {"image": "/data/a.png"}}],
        "label_config": CONFIG,
        "project": "1",
        "params": {"context": {"result": [keypoint(50, 50)]}},
    }
    for _ in range(10):  # the embedding cached, the decoder warm
        answer = service.predict(body)
    assert answer["results"][0].get("result"), answer
    seconds = []
    for _ in range(args.calls):
        started = time.perf_counter()
        service.predict(body)
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    print(
        f"{ROOT}: predict median {statistics.median(seconds) * 1000:.2f} ms, "
        f"p90 {seconds[int(len(seconds) * 0.9)] * 1000:.2f} ms over {args.calls} calls"
    )
    service.close()
    files.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run in a fresh process (``python -m tests.worker.autolabel_memory_probe H W N``): the embedded
service's "segment everything" autolabel job (``serving.jobs.autolabel``) on a synthetic HxW PNG
served by a file server on 127.0.0.1, with an N x N grid. Prints one JSON line: the job's
regions and the peak RSS growth of the job over the RSS before it (the image is embedded first
by a prewarm job, then the peak is reset, so the encoder's own peak is not counted).

The random-weight model's masks never pass the served generator's thresholds (predicted IoU >
0.7, stability > 0.9), so the decoder is replaced by one that returns a steep disc around each
query point (predicted IoU 0.9; neighbours' boxes do not overlap): one kept mask per grid point.
Everything else (download, cache, generator, upscale, clean-up, RLE, LS results) is real.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from benchmarks.efficientsam_bench import (
    current_rss_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    synthetic_image,
)
from serving import jobs
from serving.requests import AutolabelRequest, OutputSpec, PrewarmRequest, TaskSpec
from serving.runtime import ModelRuntime
from serving.settings import Settings
from tests.conftest import TI_CHECKPOINT
from tests.decoder_stubs import install_stub_decoder
from tests.http_fixtures import LEGACY_TOKEN, FileServer, png_bytes

IMAGE = "/data/upload/1/large.png"
OUTPUT = OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Object"])


def disc_decoder(prepared, points, labels, multimask_output, input_h, input_w, *args):
    """Stand-in for ``predict_masks``: for each query, 3 identical discs of radius 0.4 x the
    grid spacing (low-res pixels) around its point, logits 40 * (radius - distance) (stability
    ~0.99)."""
    xy = points[0, :, 0].float() * torch.tensor([256.0 / input_w, 256.0 / input_h])  # (Q, 2)
    columns = torch.unique(xy[:, 0])  # a batch holds neighbours of one row (x varies fastest)
    spacing = float(columns.diff().min()) if len(columns) > 1 else 2 * float(columns[0])
    radius = 0.4 * spacing
    grid = torch.arange(256, dtype=torch.float32) + 0.5
    distance = torch.hypot(
        grid[None, None, :] - xy[:, 0, None, None], grid[None, :, None] - xy[:, 1, None, None]
    )  # (Q, 256, 256)
    logits = (40 * (radius - distance))[:, None].expand(-1, 3, -1, -1)
    return logits[None], torch.full((1, len(xy), 3), 0.9)


def main(height: int, width: int, points_per_side: int) -> dict:
    torch.set_num_threads(2)
    files = FileServer()
    files.files[IMAGE] = png_bytes(synthetic_image(height, width))
    try:
        with tempfile.TemporaryDirectory() as models:
            settings = Settings.from_env(
                {},
                checkpoint=TI_CHECKPOINT,
                model_dir=models,
                label_studio_url=files.url,
                label_studio_api_key=LEGACY_TOKEN,
                device="cpu",
            )
            runtime = ModelRuntime(settings)
            runtime.load()
            install_stub_decoder(runtime.base.predictor.model, disc_decoder)
            jobs.prewarm(PrewarmRequest(project="1", task=1, image=IMAGE), runtime=runtime)
            request = AutolabelRequest(
                project="1",
                task=TaskSpec(id=1, image=IMAGE),
                mode="everything",
                points_per_side=points_per_side,
                output=OUTPUT,
            )
            reset = reset_peak_rss()
            before = current_rss_bytes()
            entry = jobs.autolabel(request, runtime=runtime)
            peak = peak_rss_bytes()
            runtime.close()
    finally:
        files.close()
    results = entry.get("result", [])
    return {
        "error": entry.get("error"),
        "regions": len(results),
        "sizes": sorted({(r["original_width"], r["original_height"]) for r in results}),
        "rle_bytes": sum(len(r["value"]["rle"]) for r in results),
        "peak_growth_bytes": peak - before if reset else None,
    }


if __name__ == "__main__":
    print(json.dumps(main(*(int(value) for value in sys.argv[1:4]))))

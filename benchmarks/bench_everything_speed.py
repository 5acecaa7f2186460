"""Segment everything per image (encoder + generator) as serving runs it, against decoding every
candidate in full (the generator before it filtered on predicted IoU first), in one run.

    python benchmarks/bench_everything_speed.py [--grids 16 32] [--repeats 3] [--threads 2]
        [--json benchmarks/results/everything-speed-cpu-2core.json]

Random-weight Ti fixture, the fixture's 640x480 image (shifted per run, so each run pays the
encoder), serving's generator settings on a CPU (4 queries a decoder call, COCO RLE output).
Per grid: the generator's wall time at the default thresholds (random weights: no candidate
passes the predicted-IoU filter, so no mask is computed: the best case), the same decoder calls
in full (``predict_masks`` on every batch: what the filter-after path paid for decoding), and at
16x16 the worst case where every candidate passes (thresholds 0: every mask is computed,
upscaled, cleaned and encoded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.efficientsam_bench import cpu_model  # noqa: E402
from efficientsam.automatic import AutomaticMaskGenerator, build_point_grid  # noqa: E402
from efficientsam.build import load_model  # noqa: E402
from efficientsam.predictor import Predictor  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
CHECKPOINT = SHARED / "efficientsam_ti_random.pt"
IMAGE = SHARED / "efficientsam_ti_reference" / "image_640x480.png"
POINTS_PER_BATCH = 4  # serving's CPU setting (serving/runtime.py automatic_masks)
ALL_PASS = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}


def full_decode_seconds(predictor: Predictor, image: np.ndarray, points_per_side: int) -> float:
    """Every batch of the grid through ``predict_masks`` (all candidates' masks), seconds."""
    embedding = predictor.embed(image)
    model = predictor.model
    prepared = predictor.prepared_image(embedding)
    points = build_point_grid(points_per_side, embedding.original_size)
    height, width = embedding.original_size
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(points), POINTS_PER_BATCH):
            batch = torch.from_numpy(points[start : start + POINTS_PER_BATCH])
            labels = torch.ones((1, len(batch), 1), dtype=torch.int64)
            model.predict_masks(prepared, batch[None, :, None, :], labels, True, height, width)
    return time.perf_counter() - started


def generator_run(predictor: Predictor, image: np.ndarray, grid: int, **thresholds) -> dict:
    generator = AutomaticMaskGenerator(
        predictor,
        points_per_side=grid,
        points_per_batch=POINTS_PER_BATCH,
        output_mode="coco_rle",
        **thresholds,
    )
    started = time.perf_counter()
    result = generator.run(image)
    seconds = time.perf_counter() - started
    timings = result.timings
    return {
        "seconds": seconds,
        "encoder_seconds": timings.encoder_seconds,
        "masks": len(result.masks),
        "candidates": result.num_candidates,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = Predictor(load_model(CHECKPOINT))
    base = np.asarray(Image.open(IMAGE).convert("RGB"))
    shift = iter(range(1, 10_000))

    def new_image() -> np.ndarray:  # other pixels: a new embedding, the encoder runs
        return np.ascontiguousarray(np.roll(base, 7 * next(shift), axis=1))

    generator_run(predictor, new_image(), 4)  # warm-up
    results: dict = {
        "machine": f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "points_per_batch": POINTS_PER_BATCH,
        "grids": {},
    }
    for grid in args.grids:
        runs, full = [], []
        for _ in range(args.repeats):  # alternating, so machine drift hits both alike
            runs.append(generator_run(predictor, new_image(), grid))
            full.append(full_decode_seconds(predictor, new_image(), grid))
        median = statistics.median(r["seconds"] for r in runs)
        encoder = statistics.median(r["encoder_seconds"] for r in runs)
        full_decode = statistics.median(full)
        entry = {
            "default_thresholds_seconds": round(median, 3),
            "encoder_seconds": round(encoder, 3),
            "masks_kept": runs[0]["masks"],
            "full_decode_seconds": round(full_decode, 3),
            "filter_after_estimate_seconds": round(encoder + full_decode, 3),
            "speedup_vs_filter_after": round((encoder + full_decode) / median, 2),
        }
        if grid == 16:
            worst = [
                generator_run(predictor, new_image(), grid, **ALL_PASS) for _ in range(args.repeats)
            ]
            entry["every_candidate_kept_seconds"] = round(
                statistics.median(r["seconds"] for r in worst), 3
            )
            entry["every_candidate_kept_masks"] = worst[0]["masks"]
        results["grids"][str(grid)] = entry
        print(grid, json.dumps(entry), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

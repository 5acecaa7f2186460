"""Segment everything on a 12 MP image: time and peak memory of the two output modes.

    python benchmarks/bench_everything_memory.py [--points-per-side 16] [--threads 2]
        [--json benchmarks/results/everything-memory-cpu-2core.json]

Each output mode runs in a fresh process (``python benchmarks/efficientsam_bench.py everything``): the
random-weight Ti model embeds a synthetic 4000x3000 image, the peak RSS is reset, then
``AutomaticMaskGenerator.run`` keeps every candidate (random weights pass no real threshold, so
IoU/stability filters and NMS are off: the worst case, points_per_side**2 masks at 12 MP).
Reported per mode: the generator's wall time and stage times, the masks kept, the bytes of the
stored masks, the RSS before it ran and its peak RSS growth over that. "binary_mask" holds a
12 MB array per mask; "coco_rle" holds compressed RLEs (the random model's ragged outlines make
them ~0.5 MB each; smooth real masks compress far more).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_workers import CHECKPOINT  # noqa: E402 (the shared fixture's path)

from benchmarks.efficientsam_bench import machine_description, run_everything_probe  # noqa: E402

MODES = ("binary_mask", "coco_rle")
MIB = 1024**2


def to_markdown(results: dict) -> str:
    height, width = results["image_size"]
    lines = [
        f"Machine: {results['machine']}. Segment everything on a {width}x{height} image, "
        f"{results['points_per_side']}x{results['points_per_side']} grid, every candidate kept "
        "(random-weight Ti); one fresh process per mode, peak RSS growth over the RSS after "
        "the image was embedded.",
        "",
        "| output mode | masks | generator wall | decode / upscale / post-process | stored masks "
        "| peak RSS growth |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        run = results[mode]
        lines.append(
            f"| {mode} | {run['masks']} | {run['seconds']:.1f} s | {run['decode_seconds']:.1f} / "
            f"{run['upscale_seconds']:.1f} / {run['postprocess_seconds']:.1f} s | "
            f"{run['stored_mask_bytes'] / MIB:.0f} MiB | {run['peak_growth_bytes'] / MIB:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    size = (args.height, args.width)
    results = {
        "machine": machine_description(torch.device("cpu")),
        "image_size": list(size),
        "points_per_side": args.points_per_side,
    }
    for mode in MODES:
        results[mode] = run_everything_probe(
            CHECKPOINT, size, args.points_per_side, mode, args.threads
        )
        print(json.dumps(results[mode]), flush=True)
    table = to_markdown(results)
    print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()

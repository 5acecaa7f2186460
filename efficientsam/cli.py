"""Command line: ``efficientsam predict`` (image + clicks/box -> mask PNGs) and ``efficientsam bench``
(runs ``benchmarks/efficientsam_bench.py`` of the source checkout).

Bad arguments or unreadable inputs print one line ``efficientsam: error: ...`` and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

EXIT_USAGE = 2
# The benchmark is not part of the installed library: it lives beside it in a source checkout.
BENCHMARK_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "efficientsam_bench.py"


class UsageError(Exception):
    """A problem with what the user asked for; reported on one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def _parse_point(text: str) -> tuple[float, float, int]:
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"point must be x,y or x,y,neg: {text!r}")
    try:
        x, y = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"point coordinates must be numbers: {text!r}") from None
    label = 1
    if len(parts) == 3:
        kind = parts[2].lower()
        if kind in ("neg", "negative", "0", "-"):
            label = 0
        elif kind not in ("pos", "positive", "1", "+"):
            raise argparse.ArgumentTypeError(f"point kind must be pos or neg: {text!r}")
    return x, y, label


def _parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"box must be x0,y0,x1,y1 numbers: {text!r}") from None
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box must be x0,y0,x1,y1: {text!r}")
    return values  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="efficientsam", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    predict = commands.add_parser("predict", help="segment an image from clicks and/or a box")
    predict.add_argument("image", type=Path, help="image file (PNG, JPEG, ...; EXIF-rotated)")
    predict.add_argument(
        "--checkpoint", type=Path, required=True, help=".pt, .pt.zip or .safetensors"
    )
    predict.add_argument(
        "--point",
        type=_parse_point,
        action="append",
        default=[],
        metavar="X,Y[,neg]",
        help="click in image pixels (x right, y down); repeat; ',neg' for a negative click",
    )
    predict.add_argument("--box", type=_parse_box, metavar="X0,Y0,X1,Y1", help="box in pixels")
    predict.add_argument("--out", type=Path, required=True, help="mask PNG to write (0/255)")
    predict.add_argument(
        "--overlay", type=Path, help="overlay PNG to write (default: <out>_overlay.png)"
    )
    predict.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    predict.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="float32 (default, exact) or the bfloat16/float16 fast mode",
    )

    bench = commands.add_parser("bench", help="run the speed/memory benchmark")
    bench.add_argument("--checkpoint", type=Path, help="Ti checkpoint (default: random weights)")
    bench.add_argument("--variants", default="ti,s", help="comma-separated: ti,s (default both)")
    bench.add_argument("--repeats", type=int, default=5, help="timed encoder runs (median)")
    bench.add_argument("--click-repeats", type=int, default=30, help="timed clicks (median)")
    bench.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    bench.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    bench.add_argument("--json", type=Path, help="also write the results as JSON here")
    bench.add_argument("--markdown", type=Path, help="also write the results table here")
    return parser


def load_rgb_image(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB, EXIF orientation applied (as a browser shows it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise UsageError(f"cannot read image {path}: {error}") from error


def write_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    path: Path,
    points: Sequence[tuple[float, float, int]],
    box: tuple[float, float, float, float] | None,
) -> None:
    """The image with the mask tinted blue, clicks as dots (green +, red -) and the box."""
    from PIL import Image, ImageDraw

    blended = image.astype(np.float32)
    tint = np.array([30, 144, 255], np.float32)
    blended[mask] = 0.45 * blended[mask] + 0.55 * tint
    overlay = Image.fromarray(blended.round().astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    radius = max(3, round(min(image.shape[:2]) / 120))
    for x, y, label in points:
        colour = (0, 220, 0) if label == 1 else (230, 0, 0)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline="white")
    if box is not None:
        draw.rectangle(box, outline=(255, 200, 0), width=max(2, radius // 2))
    overlay.save(path)


def run_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from .build import load_model
    from .checkpoint import CheckpointError
    from .predictor import Predictor
    from .utils import keep_freed_memory_for_reuse

    if not args.point and args.box is None:
        raise UsageError("give at least one --point or a --box")
    image = load_rgb_image(args.image)
    keep_freed_memory_for_reuse()
    started = time.perf_counter()
    try:
        model = load_model(args.checkpoint, device=args.device)
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    except RuntimeError as error:  # e.g. cuda requested but not available
        raise UsageError(f"cannot use device {args.device!r}: {error}") from error
    load_seconds = time.perf_counter() - started
    predictor = Predictor(model, precision=args.precision)
    embedding = predictor.set_image(image)
    points = [(x, y) for x, y, _ in args.point] or None
    labels = [label for _, _, label in args.point] or None
    prediction = predictor.predict(points, labels, args.box, return_best_only=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(prediction.best_mask.astype(np.uint8) * 255).save(args.out)
    overlay_path = args.overlay or args.out.with_name(f"{args.out.stem}_overlay.png")
    write_overlay(image, prediction.best_mask, overlay_path, args.point, args.box)

    height, width = image.shape[:2]
    print(
        f"image: {args.image} ({width}x{height}), model: EfficientSAM-{model.variant.upper()} "
        f"on {model.device}, {args.precision}"
    )
    print(
        f"score (predicted IoU): {prediction.best_score:.4f}; mask pixels: "
        f"{int(prediction.best_mask.sum())} of {width * height}"
    )
    if prediction.dropped_points:
        print(
            f"note: {prediction.dropped_points} older click(s) dropped (at most 6 prompt "
            f"tokens: the box's 2 corners and the most recent clicks are kept)"
        )
    print(
        f"times: load {load_seconds:.2f} s, encoder {embedding.encoder_seconds * 1000:.0f} ms, "
        f"decoder {prediction.decoder_seconds * 1000:.1f} ms"
    )
    print(f"wrote {args.out} and {overlay_path}")
    return 0


def load_benchmark() -> ModuleType:
    """The checkout's ``benchmarks/efficientsam_bench.py`` as a module; UsageError without it."""
    if not BENCHMARK_FILE.is_file():
        raise UsageError(
            f"the benchmark is not installed with the library ({BENCHMARK_FILE} is missing): "
            "run `python benchmarks/bench_efficientsam.py` in a source checkout"
        )
    spec = importlib.util.spec_from_file_location("efficientsam_bench", BENCHMARK_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(args: argparse.Namespace) -> int:
    variants = [v.strip().lower() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"ti", "s"}
    if unknown or not variants:
        raise UsageError(f"--variants takes ti and/or s, got {args.variants!r}")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"checkpoint not found: {args.checkpoint}")
    if args.repeats < 1 or args.click_repeats < 1 or args.threads < 1:
        raise UsageError("--repeats, --click-repeats and --threads must be >= 1")
    load_benchmark().run_benchmark(
        variants=variants,
        ti_checkpoint=args.checkpoint,
        repeats=args.repeats,
        click_repeats=args.click_repeats,
        threads=args.threads,
        device=args.device,
        json_path=args.json,
        markdown_path=args.markdown,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "predict":
            return run_predict(args)
        return run_bench(args)
    except UsageError as error:
        print(f"efficientsam: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""Command line: ``efficientsam predict`` (image + clicks/box -> mask PNGs), ``efficientsam bench``
(runs ``benchmarks/efficientsam_bench.py`` of the source checkout) and ``efficientsam sami``
(distils a teacher's image encoder into a Ti student).

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
        choices=("auto", "float32", "bfloat16", "float16"),  # precision.PRECISION_CHOICES
        help="float32 (default, exact), the bfloat16/float16 fast mode, or auto (the fast mode "
        "where the hardware runs it natively and a check on a built-in image passes)",
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

    sami = commands.add_parser("sami", help="distil a teacher encoder into a Ti student (SAMI)")
    sami.add_argument("--teacher", type=Path, required=True, help="teacher checkpoint (Ti or S)")
    sami.add_argument("--student", type=Path, required=True, help="Ti checkpoint to start from")
    sami.add_argument("--images", type=Path, required=True, help="folder of training images")
    sami.add_argument("--held-out", type=Path, help="folder of held-out images (default: --images)")
    sami.add_argument("--steps", type=int, required=True, help="masked-pretraining steps")
    sami.add_argument("--align-steps", type=int, default=20, help="unmasked alignment steps")
    sami.add_argument("--mask-ratio", type=float, default=0.75, help="share of tokens hidden")
    sami.add_argument("--batch-size", type=int, default=2, help="images per step")
    sami.add_argument("--seed", type=int, default=0)
    sami.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    sami.add_argument("--out", type=Path, required=True, help="result .safetensors to write")
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
    from .precision import choose_precision
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
    precision = choose_precision(model, args.precision).precision
    predictor = Predictor(model, precision=precision)
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
        f"on {model.device}, {precision}"
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(folder: Path) -> list[np.ndarray]:
    """The folder's PNG/JPEG files (sorted by name) as HxWx3 uint8 RGB arrays."""
    if not folder.is_dir():
        raise UsageError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UsageError(f"no .png/.jpg images in {folder}")
    return [load_rgb_image(path) for path in paths]


def format_sami_metrics(before: dict[str, float], after: dict[str, float]) -> str:
    """The metrics (of the held-out images, else of the training images) as a text table: one
    row per metric, before / after / change."""
    names = {
        "cosine": "per-token cosine",
        "centred_cosine": "centred cosine",
        "nmse": "normalised MSE",
        "mask_agreement": "mask agreement (IoU)",
    }
    lines = [f"{'metric':<22} {'before':>8} {'after':>8} {'change':>8}"]
    for key, label in names.items():
        change = after[key] - before[key]
        lines.append(f"{label:<22} {before[key]:>8.4f} {after[key]:>8.4f} {change:>+8.4f}")
    return "\n".join(lines)


def run_sami(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .build import load_model
    from .checkpoint import CheckpointError, save_checkpoint
    from .training.sami import SamiConfig, distil

    if args.out.suffix != ".safetensors":
        raise UsageError(f"--out must end in .safetensors, got {args.out}")
    try:
        config = SamiConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            mask_ratio=args.mask_ratio,
            align_steps=args.align_steps,
            seed=args.seed,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    images = load_image_folder(args.images)
    held_out = load_image_folder(args.held_out) if args.held_out else images
    try:
        teacher = load_model(args.teacher, device=args.device)
        student = load_model(args.student, device=args.device)
    except CheckpointError as error:
        raise UsageError(str(error)) from error
    except RuntimeError as error:
        raise UsageError(f"cannot use device {args.device!r}: {error}") from error
    if student.variant != "ti":
        raise UsageError(f"--student must be a Ti checkpoint, got {student.variant.upper()}")
    print(
        f"teacher: EfficientSAM-{teacher.variant.upper()} ({args.teacher}); student: "
        f"EfficientSAM-Ti ({args.student}); {len(images)} training images, {len(held_out)} "
        f"held-out{'' if args.held_out else ' (the training images: no --held-out given)'}"
    )
    bars: dict[str, tqdm] = {}

    def progress(entry: dict) -> None:
        stage = entry["stage"]
        if stage == "teacher":
            tqdm.write(f"teacher embeddings of {entry['images']} images (once each)")
            return
        if stage == "metrics":
            tqdm.write(f"held-out metrics of the student {entry['when']} training")
            return
        if stage not in bars:
            label = "SAMI (masked)" if stage == "sami" else "alignment"
            bars[stage] = tqdm(total=entry["steps"], desc=label, unit="step")
        bars[stage].set_postfix(loss=f"{entry['loss']:.4f}", refresh=False)
        bars[stage].update(entry["step"] - bars[stage].n)

    try:
        result = distil(teacher, student, images, held_out, config, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    save_checkpoint(result.model, args.out, result.metadata(str(args.teacher), str(args.student)))
    print(format_sami_metrics(result.before, result.after))
    print(
        f"seconds per step: SAMI {result.report.seconds_per_step('sami'):.2f}, "
        f"alignment {result.report.seconds_per_step('align'):.2f}"
    )
    print(f"wrote {args.out} (EfficientSAM-Ti: student encoder, teacher's decoder)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        if args.command == "predict":
            return run_predict(args)
        if args.command == "sami":
            return run_sami(args)
        return run_bench(args)
    except UsageError as error:
        print(f"efficientsam: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

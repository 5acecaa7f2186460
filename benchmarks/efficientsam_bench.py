"""Speed and memory benchmark (``efficientsam bench`` / ``benchmarks/bench_efficientsam.py``).

Measures, in one run and on one machine:
* the image encoder (1x3x1024x1024) with SDPA attention vs the reference's explicit
  softmax(QK^T)V, interleaved run by run so that machine drift hits both alike; median + ratio;
* a click on a cached embedding: 1 point, best mask upscaled to 640x480 (the Predictor path) vs
  the reference-style decoder (literal formulation, all 3 candidates upscaled, as upstream does);
* peak RSS of a fresh process that loads the model, encodes a 640x480 image and decodes a click,
  ours vs the reference-style attention/decoder;
* the optional fast mode (bfloat16 autocast on CPU; float16 and bfloat16 on CUDA): encoder
  speed-up and the IoU of its best masks against float32;
* on CUDA: encoder images/s at batch 1 and 8, and click latency.

The memory probes run this file as a script in a fresh process (``... efficientsam_bench.py rss``).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (the probes' fresh processes)
    sys.path.insert(0, str(ROOT))

from benchmarks.reference_model import reference_predict_masks  # noqa: E402
from efficientsam.arrays import mask_iou  # noqa: E402
from efficientsam.build import build_efficient_sam, load_model  # noqa: E402
from efficientsam.modeling import EfficientSam  # noqa: E402
from efficientsam.precision import (  # noqa: E402
    MIN_MEAN_IOU,
    MIN_SPEEDUP,
    builtin_check_image,
    check_prompts,
)
from efficientsam.predictor import Predictor  # noqa: E402
from efficientsam.prompts import Prompt  # noqa: E402
from efficientsam.utils import keep_freed_memory_for_reuse, resolve_device  # noqa: E402

PROBE_COMMAND = [sys.executable, str(Path(__file__).resolve())]  # + "rss" / "everything" ...

CLICK_IMAGE_SIZE = (480, 640)  # (H, W)
WARMUP = 2
CLICK_WARMUP = 5


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function: Callable[[], object], device: torch.device) -> float:
    _synchronise(device)
    started = time.perf_counter()
    function()
    _synchronise(device)
    return time.perf_counter() - started


def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def _model(variant: str, ti_checkpoint: Path | None, device: torch.device) -> EfficientSam:
    if variant == "ti" and ti_checkpoint is not None:
        return load_model(ti_checkpoint, device=device)
    # Timing does not depend on the weights' values: a freshly initialised model will do.
    return build_efficient_sam(variant).to(device).eval()


def _click_image(seed: int = 0) -> np.ndarray:
    height, width = CLICK_IMAGE_SIZE
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _click_points(count: int) -> list[tuple[float, float]]:
    height, width = CLICK_IMAGE_SIZE
    rng = np.random.default_rng(1)
    return [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(count)]


def bench_encoder(model: EfficientSam, repeats: int, device: torch.device) -> dict:
    """SDPA vs explicit attention, interleaved; median seconds and the ratio."""
    image = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)).to(device)
    encoder = model.image_encoder
    samples: dict[str, list[float]] = {"sdpa": [], "explicit": []}
    outputs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for run in range(WARMUP + repeats):
            for implementation in ("sdpa", "explicit"):
                encoder.set_attention_implementation(implementation)
                seconds = _timed(
                    lambda impl=implementation: outputs.__setitem__(
                        impl, model.get_image_embeddings(image)
                    ),
                    device,
                )
                if run >= WARMUP:
                    samples[implementation].append(seconds)
    encoder.set_attention_implementation("sdpa")
    sdpa, explicit = _median_ms(samples["sdpa"]), _median_ms(samples["explicit"])
    return {
        "encoder_ms": sdpa,
        "encoder_explicit_attention_ms": explicit,
        "encoder_speedup": round(explicit / sdpa, 2),
        "encoder_max_abs_diff_vs_explicit": float(
            (outputs["sdpa"] - outputs["explicit"]).abs().max()
        ),
    }


def bench_click(model: EfficientSam, repeats: int, device: torch.device) -> dict:
    """A click on a cached embedding, ours vs reference-style; medians in ms."""
    predictor = Predictor(model)
    predictor.set_image(_click_image())
    embeddings = predictor.image_embedding.embeddings
    height, width = CLICK_IMAGE_SIZE
    points = _click_points(CLICK_WARMUP + repeats)

    ours = []
    for index, point in enumerate(points):
        seconds = _timed(lambda p=point: predictor.predict([p], return_best_only=True), device)
        if index >= CLICK_WARMUP:
            ours.append(seconds)

    def reference_click(point: tuple[float, float]) -> np.ndarray:
        with torch.inference_mode():
            logits, iou = reference_predict_masks(
                model,
                embeddings,
                torch.tensor([[[point]]], device=device),
                torch.tensor([[[1]]], device=device),
                True,
                height,
                width,
                height,
                width,
            )
            best = int(iou[0, 0].argmax())
            return (logits[0, 0, best] >= 0).cpu().numpy()

    reference_repeats = max(1, min(repeats, 15))
    reference = []
    for index, point in enumerate(points[: CLICK_WARMUP + reference_repeats]):
        seconds = _timed(lambda p=point: reference_click(p), device)
        if index >= CLICK_WARMUP:
            reference.append(seconds)
    agreement = mask_iou(
        predictor.predict([points[0]], return_best_only=True).best_mask, reference_click(points[0])
    )
    click, baseline = _median_ms(ours), _median_ms(reference)
    return {
        "click_ms": click,
        "click_reference_style_ms": baseline,
        "click_speedup": round(baseline / click, 2),
        "click_mask_iou_vs_reference_style": round(agreement, 6),
    }


def bench_fast_mode(
    model: EfficientSam, precision: str, repeats: int, device: torch.device
) -> dict:
    """The fast mode's encoder (bfloat16/float16 blocks, float32 decoder: ``Predictor``'s
    precision) against float32 in the same run, interleaved; the first click (encoder + best
    mask of one point) of each; and the best-mask IoU against float32 on the built-in check
    image (``efficientsam.precision``: its 20 prompts + 20 random points)."""
    fast, exact = Predictor(model, precision=precision), Predictor(model)
    picture = builtin_check_image()
    point = [(0.5 * picture.shape[1], 0.5 * picture.shape[0])]
    encoder: dict[str, list[float]] = {"float32": [], precision: []}
    first_click: dict[str, list[float]] = {"float32": [], precision: []}
    for run in range(WARMUP + repeats):
        for name, predictor in (("float32", exact), (precision, fast)):
            started = time.perf_counter()
            embedding = predictor.embed(picture, image_hash=f"bench-fast-{run}")
            predictor.decode(embedding, [Prompt.create(point)], return_best_only=True)
            _synchronise(device)
            if run >= WARMUP:
                first_click[name].append(time.perf_counter() - started)
                encoder[name].append(embedding.encoder_seconds)
    prompts = check_prompts(picture.shape[:2]) + [Prompt.create([p]) for p in _click_points(20)]
    fast.set_image(picture)
    exact.set_image(picture)
    ious = [
        mask_iou(a.best_mask, b.best_mask)
        for a, b in zip(
            fast.predict_prompts(prompts, return_best_only=True),
            exact.predict_prompts(prompts, return_best_only=True),
            strict=True,
        )
    ]
    click = []
    for index, point in enumerate(_click_points(CLICK_WARMUP + 10)):
        seconds = _timed(lambda p=point: fast.predict([p], return_best_only=True), device)
        if index >= CLICK_WARMUP:
            click.append(seconds)
    encoder_ms, float32_encoder_ms = _median_ms(encoder[precision]), _median_ms(encoder["float32"])
    return {
        "recipe": "patch embedding float32, blocks + neck autocast, decoder float32",
        "encoder_ms": encoder_ms,
        "float32_encoder_ms_same_run": float32_encoder_ms,
        "encoder_speedup_vs_float32": round(float32_encoder_ms / encoder_ms, 2),
        "first_click_ms": _median_ms(first_click[precision]),
        "float32_first_click_ms_same_run": _median_ms(first_click["float32"]),
        "click_ms": _median_ms(click),
        "iou_prompts": len(ious),
        "best_mask_iou_vs_float32_mean": round(float(np.mean(ious)), 4),
        "best_mask_iou_vs_float32_min": round(float(np.min(ious)), 4),
        "passes_auto_check": bool(
            np.mean(ious) >= MIN_MEAN_IOU and float32_encoder_ms / encoder_ms >= MIN_SPEEDUP
        ),
    }


def bench_gpu_throughput(model: EfficientSam, device: torch.device, repeats: int) -> dict:
    """Encoder images/s at batch 1 and 8 (float32 and the autocast modes)."""
    results = {}
    for batch in (1, 8):
        images = torch.rand(batch, 3, 1024, 1024, device=device)
        for precision in ("float32", "float16", "bfloat16"):
            context = (
                torch.autocast("cuda", dtype=getattr(torch, precision))
                if precision != "float32"
                else torch.autocast("cuda", enabled=False)
            )
            samples = []
            with torch.inference_mode(), context:
                for run in range(WARMUP + repeats):
                    seconds = _timed(lambda imgs=images: model.get_image_embeddings(imgs), device)
                    if run >= WARMUP:
                        samples.append(seconds)
            results[f"encoder_images_per_s_batch{batch}_{precision}"] = round(
                batch / statistics.median(samples), 1
            )
    return results


def peak_rss_probe(variant: str, checkpoint: Path | None, baseline: bool, threads: int) -> dict:
    """Run in a fresh process: load + encode a 640x480 image + one click; peak RSS in bytes."""
    torch.set_num_threads(threads)
    keep_freed_memory_for_reuse()
    model = _model(variant, checkpoint, torch.device("cpu"))
    image = _click_image()
    point = _click_points(1)[0]
    height, width = CLICK_IMAGE_SIZE
    if baseline:
        model.image_encoder.set_attention_implementation("explicit")
        with torch.inference_mode():
            tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            embeddings = model.get_image_embeddings(tensor)
            reference_predict_masks(
                model,
                embeddings,
                torch.tensor([[[point]]]),
                torch.tensor([[[1]]]),
                True,
                height,
                width,
                height,
                width,
            )
    else:
        predictor = Predictor(model)
        predictor.set_image(image)
        predictor.predict([point], return_best_only=True)
    return {"peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    """This process's peak resident set size. VmHWM belongs to the current address space;
    getrusage's ru_maxrss would include the parent's peak inherited across fork + exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: /proc/self/clear_refs),
    so that :func:`peak_rss_bytes` measures from here on. False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    """This process's resident set size now (VmRSS); 0 where /proc is missing."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# Random weights predict IoU in ~[-0.5, 0.5] and weak logits: these keep every candidate (no NMS),
# the worst case for memory: points_per_side**2 * masks_per_point masks at the image size.
KEEP_EVERYTHING = {
    "pred_iou_thresh": 0.0,
    "stability_score_thresh": 0.0,
    "stability_score_offset": 0.1,
    "box_nms_thresh": 1.0,
}


def synthetic_image(height: int, width: int) -> np.ndarray:
    """An HxWx3 uint8 RGB image of gradients and 500-pixel squares (compresses well as PNG)."""
    rows = np.arange(height, dtype=np.int64)[:, None]
    columns = np.arange(width, dtype=np.int64)[None, :]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = columns * 255 // max(width - 1, 1)
    image[..., 1] = rows * 255 // max(height - 1, 1)
    image[..., 2] = ((columns // 500 + rows // 500) % 2) * 200
    return image


def everything_memory_probe(
    checkpoint: Path | None,
    size: tuple[int, int],
    points_per_side: int,
    masks_per_point: int,
    output_mode: str,
    threads: int,
    points_per_batch: int = 16,
) -> dict:
    """Run in a fresh process: segment everything on a synthetic (H, W) image with
    :data:`KEEP_EVERYTHING`. The image is embedded first, then the peak RSS is reset, so
    ``peak_growth_bytes`` is the generator's own peak over the RSS before it ran."""
    from efficientsam.automatic import AutomaticMaskGenerator

    torch.set_num_threads(threads)
    keep_freed_memory_for_reuse()
    predictor = Predictor(_model("ti", checkpoint, torch.device("cpu")))
    embedding = predictor.embed(synthetic_image(*size))
    generator = AutomaticMaskGenerator(
        predictor,
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        masks_per_point=masks_per_point,
        output_mode=output_mode,
        **KEEP_EVERYTHING,
    )
    reset = reset_peak_rss()
    before = current_rss_bytes()
    started = time.perf_counter()
    result = generator.run(embedding)
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    stored = sum(
        mask.segmentation.nbytes
        if isinstance(mask.segmentation, np.ndarray)
        else len(mask.segmentation["counts"])
        for mask in result.masks
    )
    timings = result.timings
    return {
        "output_mode": output_mode,
        "image_size": list(size),
        "points_per_side": points_per_side,
        "points_per_batch": points_per_batch,
        "masks_per_point": masks_per_point,
        "masks": len(result.masks),
        "seconds": round(seconds, 3),
        "decode_seconds": round(timings.decode_seconds, 3),
        "upscale_seconds": round(timings.upscale_seconds, 3),
        "postprocess_seconds": round(timings.postprocess_seconds, 3),
        "stored_mask_bytes": stored,
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "peak_growth_bytes": peak - before if reset else None,
    }


def run_everything_probe(
    checkpoint: Path | None,
    size: tuple[int, int],
    points_per_side: int,
    output_mode: str,
    threads: int,
    masks_per_point: int = 1,
    points_per_batch: int = 16,
    timeout: float = 3600,
) -> dict:
    """:func:`everything_memory_probe` in a fresh process (so that its peak RSS is its own);
    RuntimeError with the end of its stderr when it fails."""
    command = [*PROBE_COMMAND, "everything"]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    options = {
        "--height": size[0],
        "--width": size[1],
        "--points-per-side": points_per_side,
        "--points-per-batch": points_per_batch,
        "--masks-per-point": masks_per_point,
        "--output-mode": output_mode,
        "--threads": threads,
    }
    for name, value in options.items():
        command += [name, str(value)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if output.returncode != 0:
        raise RuntimeError(f"everything probe failed: {output.stderr[-2000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def _peak_rss(variant: str, checkpoint: Path | None, baseline: bool, threads: int) -> float:
    command = [
        *PROBE_COMMAND,
        "rss",
        "--variant",
        variant,
        "--threads",
        str(threads),
    ]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    if baseline:
        command.append("--baseline")
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    return round(json.loads(output.stdout.strip().splitlines()[-1])["peak_rss_bytes"] / 1024**3, 3)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's processor or machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (
        f"{cpu_model()}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"
    )


def to_markdown(results: dict) -> str:
    device = results["device"]
    lines = [
        f"Machine: {results['machine']}; float32 unless stated; medians "
        f"({results['repeats']} encoder runs, {results['click_repeats']} clicks).",
        "",
        "| measurement | "
        + " | ".join(f"EfficientSAM-{v.upper()}" for v in results["variants"])
        + " |",
        "|---|" + "---|" * len(results["variants"]),
    ]
    rows = [
        ("image encoder, 1x3x1024x1024 (SDPA attention)", "encoder_ms", " ms"),
        (
            "same model, explicit softmax(QK^T)V (reference-style)",
            "encoder_explicit_attention_ms",
            " ms",
        ),
        ("encoder speed-up", "encoder_speedup", "x"),
        ("click on cached embedding: 1 point, best mask at 640x480", "click_ms", " ms"),
        (
            "same click, reference-style decoder (3 masks upscaled)",
            "click_reference_style_ms",
            " ms",
        ),
        ("click speed-up", "click_speedup", "x"),
        ("peak RSS: load + encode 640x480 + 1 click", "peak_rss_gib", " GiB"),
        ("peak RSS, reference-style attention and decoder", "peak_rss_reference_style_gib", " GiB"),
    ]
    for label, key, unit in rows:
        values = [results["per_variant"][v].get(key) for v in results["variants"]]
        if all(value is None for value in values):
            continue
        cells = [("—" if value is None else f"{value}{unit}") for value in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for precision in ("bfloat16", "float16"):
        key = f"fast_mode_{precision}"
        if all(key in results["per_variant"][v] for v in results["variants"]):
            fast = [results["per_variant"][v][key] for v in results["variants"]]
            lines.append(
                f"| fast mode {precision} ({device}): encoder (vs float32 in the same run) | "
                + " | ".join(
                    f"{f['encoder_ms']} ms ({f['encoder_speedup_vs_float32']}x)" for f in fast
                )
                + " |"
            )
            lines.append(
                f"| fast mode {precision}: first click (encoder + best mask), vs float32 | "
                + " | ".join(
                    f"{f['first_click_ms']} ms vs {f['float32_first_click_ms_same_run']} ms"
                    for f in fast
                )
                + " |"
            )
            lines.append(
                f"| fast mode {precision}: click | "
                + " | ".join(f"{f['click_ms']} ms" for f in fast)
                + " |"
            )
            lines.append(
                f"| fast mode {precision}: best-mask IoU vs float32, mean / min | "
                + " | ".join(
                    f"{f['best_mask_iou_vs_float32_mean']} / {f['best_mask_iou_vs_float32_min']}"
                    for f in fast
                )
                + " |"
            )
            lines.append(
                f"| fast mode {precision}: passes PRECISION=auto's check (IoU, speed-up) | "
                + " | ".join(str(f["passes_auto_check"]).lower() for f in fast)
                + " |"
            )
    gpu_keys = sorted(
        {
            k
            for v in results["variants"]
            for k in results["per_variant"][v]
            if k.startswith("encoder_images_per_s")
        }
    )
    for key in gpu_keys:
        values = [results["per_variant"][v].get(key, "—") for v in results["variants"]]
        lines.append(f"| {key.replace('_', ' ')} | " + " | ".join(str(x) for x in values) + " |")
    return "\n".join(lines) + "\n"


def run_benchmark(
    variants: Sequence[str] = ("ti", "s"),
    ti_checkpoint: Path | None = None,
    repeats: int = 5,
    click_repeats: int = 30,
    threads: int = 2,
    device: str = "cpu",
    json_path: Path | None = None,
    markdown_path: Path | None = None,
) -> dict:
    """Run everything, print a markdown table, optionally save JSON/markdown; returns the dict."""
    torch.set_num_threads(threads)
    keep_freed_memory_for_reuse()
    torch_device = resolve_device(device)
    results: dict = {
        "machine": machine_description(torch_device),
        "device": torch_device.type,
        "variants": list(variants),
        "repeats": repeats,
        "click_repeats": click_repeats,
        "date": time.strftime("%Y-%m-%d"),
        "per_variant": {},
    }
    fast_precisions = ["bfloat16"] if torch_device.type == "cpu" else ["float16", "bfloat16"]
    steps_per_variant = 2 + len(fast_precisions) + (2 if torch_device.type == "cpu" else 1)
    progress = tqdm(total=steps_per_variant * len(variants), desc="benchmark", unit="step")
    for variant in variants:
        model = _model(variant, ti_checkpoint, torch_device)
        measured: dict = {}
        progress.set_postfix_str(f"{variant}: encoder")
        measured.update(bench_encoder(model, repeats, torch_device))
        progress.update()
        progress.set_postfix_str(f"{variant}: click")
        measured.update(bench_click(model, click_repeats, torch_device))
        progress.update()
        for precision in fast_precisions:
            progress.set_postfix_str(f"{variant}: {precision}")
            measured[f"fast_mode_{precision}"] = bench_fast_mode(
                model, precision, repeats, torch_device
            )
            progress.update()
        if torch_device.type == "cpu":
            checkpoint = ti_checkpoint if variant == "ti" else None
            progress.set_postfix_str(f"{variant}: peak RSS")
            measured["peak_rss_gib"] = _peak_rss(variant, checkpoint, False, threads)
            progress.update()
            measured["peak_rss_reference_style_gib"] = _peak_rss(variant, checkpoint, True, threads)
            progress.update()
        else:
            progress.set_postfix_str(f"{variant}: throughput")
            measured.update(bench_gpu_throughput(model, torch_device, repeats))
            progress.update()
        results["per_variant"][variant] = measured
        del model
    progress.close()
    table = to_markdown(results)
    print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    if markdown_path is not None:
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(table)
    return results


def _probe_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/efficientsam_bench.py")
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("rss", help="peak-RSS probe (run in a fresh process)")
    probe.add_argument("--variant", choices=("ti", "s"), required=True)
    probe.add_argument("--checkpoint", type=Path)
    probe.add_argument("--baseline", action="store_true", help="reference-style model path")
    probe.add_argument("--threads", type=int, default=2)
    everything = commands.add_parser(
        "everything", help="segment-everything memory probe (run in a fresh process)"
    )
    everything.add_argument("--checkpoint", type=Path)
    everything.add_argument("--height", type=int, default=3000)
    everything.add_argument("--width", type=int, default=4000)
    everything.add_argument("--points-per-side", type=int, default=16)
    everything.add_argument("--points-per-batch", type=int, default=16)
    everything.add_argument("--masks-per-point", type=int, default=1)
    everything.add_argument("--output-mode", choices=("binary_mask", "coco_rle"), required=True)
    everything.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "everything":
        result = everything_memory_probe(
            args.checkpoint,
            (args.height, args.width),
            args.points_per_side,
            args.masks_per_point,
            args.output_mode,
            args.threads,
            args.points_per_batch,
        )
    else:
        result = peak_rss_probe(args.variant, args.checkpoint, args.baseline, args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    _probe_main()

"""GPU figures for README in one run: encoder throughput and precision, click, segment
everything, fine-tune steps/s, queue hop; within a time budget, on CUDA or (smaller) on a CPU.

    python benchmarks/bench_gpu.py [--device cuda] [--out benchmarks/results/gpu-<device>.json]
        [--budget 480] [--quick] [--variants ti,s] [--only encoder,click,...]
        [--redis-url redis://127.0.0.1:6379/12] [--threads 0]

1. encoder: images/s of ``model.get_image_embeddings`` on (B, 3, 1024, 1024) at batch 1 and 8,
   in float32 and under the Predictor's own precision context (what ``PRECISION=bfloat16`` /
   ``float16`` serves), and the best-mask IoU of each precision against float32 for fixed clicks
   and boxes on a synthetic 640x480 image (``Predictor.embed`` + ``decode``).
2. click: ``serving.jobs.segment`` on a ``ModelRuntime`` in this process, on an image already
   in its image and embedding caches (decoder, best mask upscaled to 640x480, brush RLE).
3. everything: ``ModelRuntime.automatic_masks`` at 32x32 points, seconds per image after the
   encoder.
4. finetune: ``FineTuner.fit`` steps/s, the default decoder-only recipe, 4 samples a step.
5. queue_hop: ``bench_workers.queue_hop`` (a click job through RQ, JobSerializer and a real
   ``python -m worker`` process), with ``--redis-url`` or a private ``redis-server``; skipped
   with the reason when neither is there.
6. sami: SAMI distillation of an S teacher into a Ti student with the paper-size decoder
   (8 cross-attention blocks of width 512) at batch 32 (``efficientsam.training.sami``): the
   teacher's embedding images/s, masked-pretraining and alignment steps/s and images/s, and
   minutes per 1,000 images (teacher embeddings + one masked pass over them).

Every timing is a median over repeats after warm-up, with ``torch.cuda.synchronize`` around
each on CUDA. Weights are random (speed only). Writes the JSON to ``--out`` and the markdown
table beside it (``.md``), and prints the table. ``--quick``: tiny repeats, batch 1 and 2,
8x8 points, 2 fine-tune steps (the CPU smoke test). Exit status 1 when a figure failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_workers import (  # noqa: E402
    CHECKPOINT,
    IMAGE_HOST,
    click_request,
    queue_hop,
    serve_directory,
)

from efficientsam.arrays import mask_iou  # noqa: E402
from efficientsam.build import build_efficient_sam  # noqa: E402
from efficientsam.checkpoint import save_checkpoint  # noqa: E402
from efficientsam.predictor import PRECISIONS as DTYPES  # noqa: E402
from efficientsam.predictor import Predictor  # noqa: E402
from efficientsam.prompts import Prompt  # noqa: E402
from efficientsam.utils import keep_freed_memory_for_reuse  # noqa: E402
from serving.runtime import ModelRuntime  # noqa: E402
from serving.settings import Settings  # noqa: E402

FIGURES = ("encoder", "click", "everything", "finetune", "sami", "queue_hop")
NEEDS_SECONDS = {"queue_hop": 60.0}  # a worker process starts and loads the model
VARIANTS = ("ti", "s")
PRECISIONS = ("float32", "bfloat16", "float16")
IMAGE_SIZE = (480, 640)  # (H, W): the click image
WEIGHTS = "random weights: speed only (no real checkpoint is reachable; IoU compares precisions)"


@dataclass(frozen=True)
class Plan:
    """Repeats and sizes of one run (:data:`FULL` on a GPU, :data:`QUICK` for the CPU test)."""

    batches: tuple[int, ...] = (1, 8)
    encoder_warmup: int = 3
    encoder_repeats: int = 10
    click_warmup: int = 5
    clicks: int = 50
    points_per_side: int = 32
    everything_warmup: int = 1
    everything_repeats: int = 3
    finetune_images: int = 8
    finetune_warmup: int = 5
    finetune_steps: int = 30
    hop_clicks: int = 60  # blocks of 10 (bench_workers.queue_hop)
    sami_batch: int = 32  # images a SAMI step (the paper's scale: >= 32 on a GPU)
    sami_align_batch: int = 8  # images an alignment step (the whole encoder, unmasked)
    sami_decoder: tuple[int, int, int] = (8, 512, 16)  # depth, width, heads (the paper's)
    sami_warmup: int = 2
    sami_steps: int = 5


FULL = Plan()
QUICK = Plan(
    batches=(1, 2),
    encoder_warmup=0,
    encoder_repeats=1,
    click_warmup=1,
    clicks=3,
    points_per_side=8,
    everything_warmup=0,
    everything_repeats=1,
    finetune_images=2,
    finetune_warmup=1,
    finetune_steps=2,
    hop_clicks=20,
    sami_batch=2,
    sami_align_batch=1,
    sami_decoder=(2, 256, 8),
    sami_warmup=1,
    sami_steps=1,
)


class Budget:
    """A wall-clock budget for the whole run, in seconds."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def spent(self) -> float:
        return time.perf_counter() - self.started

    def skip_reason(self, what: str, needs: float = 0.0) -> str | None:
        """None while more than ``needs`` seconds are left, else why ``what`` is skipped."""
        left = self.seconds - self.spent()
        if left > needs:
            return None
        if left <= 0:
            return f"skipped: time budget of {self.seconds:g} s spent before {what}"
        return f"skipped: {left:.0f} s of the time budget left, {what} needs {needs:g} s"


@dataclass
class Bench:
    """What the figures share: device, plan, budget, checkpoints, the click image and its URL,
    one model runtime per (variant, precision), notes for the JSON."""

    device: torch.device
    plan: Plan
    budget: Budget
    variants: tuple[str, ...]
    folder: Path
    threads: int
    redis_url: str | None
    checkpoints: dict[str, Path] = field(default_factory=dict)
    image: np.ndarray | None = None
    image_url: str = ""
    runtimes: dict[tuple[str, str], ModelRuntime] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def precisions(self) -> dict[str, str | None]:
        """precision -> None when it is measured here, else the reason it is skipped."""
        skip = "skipped: float16 autocast is not a CPU configuration (measured on CUDA only)"
        return {
            p: (skip if p == "float16" and self.device.type == "cpu" else None) for p in PRECISIONS
        }

    def settings(self, variant: str, precision: str, **overrides: object) -> Settings:
        return Settings.from_env(
            {},
            checkpoint=self.checkpoints[variant],
            model_dir=self.folder / f"models-{variant}-{precision}",
            device=str(self.device),
            precision=precision,
            threads=self.threads,
            outbound_allow=IMAGE_HOST,  # the image server this script starts
            **overrides,
        )

    def runtime(self, variant: str, precision: str = "float32") -> ModelRuntime:
        """A loaded model runtime serving ``variant`` at ``precision`` (made once)."""
        key = (variant, precision)
        if key not in self.runtimes:
            runtime = ModelRuntime(self.settings(variant, precision))
            runtime.load()
            self.runtimes[key] = runtime
        return self.runtimes[key]

    def close(self) -> None:
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes.clear()


# -- helpers ---------------------------------------------------------------------------------
def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call, synchronised before and after on CUDA."""
    synchronise(device)
    started = time.perf_counter()
    result = function()
    synchronise(device)
    return time.perf_counter() - started, result


def repeat(
    function: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Seconds of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        timed(function, device)
    return [timed(function, device)[0] for _ in range(repeats)]


def milliseconds(samples: list[float]) -> dict:
    """Median and p95 of seconds, in ms; the count."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {
        "median_ms": round(statistics.median(samples) * 1000, 3),
        "p95_ms": round(p95 * 1000, 3),
        "repeats": len(samples),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def default_out(device: torch.device, quick: bool) -> Path:
    name = "cpu" if device.type == "cpu" else device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ("-quick" if quick else "")
    return ROOT / "benchmarks" / "results" / f"gpu-{slug}.json"


def synthetic_image(seed: int = 0) -> np.ndarray:
    """A 640x480 RGB image of smooth gradients with a few flat discs and rectangles."""
    height, width = IMAGE_SIZE
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack(
        [xs * 255 // width, ys * 255 // height, (xs + ys) * 255 // (height + width)], -1
    )
    for _ in range(6):
        colour = rng.integers(0, 256, 3)
        cx, cy, r = rng.uniform(60, width - 60), rng.uniform(60, height - 60), rng.uniform(25, 70)
        image[(xs - cx) ** 2 + (ys - cy) ** 2 < r**2] = colour
        x0, y0 = int(rng.uniform(0, width - 120)), int(rng.uniform(0, height - 90))
        image[y0 : y0 + int(rng.uniform(30, 90)), x0 : x0 + int(rng.uniform(40, 120))] = colour
    return image.astype(np.uint8)


def fixed_prompts() -> list[Prompt]:
    """6 single clicks, 2 two-click prompts and 4 boxes at fixed places of the 640x480 image."""
    clicks = [(80, 60), (320, 240), (560, 420), (150, 380), (500, 100), (250, 150)]
    boxes = [(40, 30, 260, 200), (300, 180, 600, 460), (100, 250, 330, 470), (380, 20, 620, 220)]
    return (
        [Prompt.create([point]) for point in clicks]
        + [Prompt.create([(200, 200), (240, 230)]), Prompt.create([(420, 300), (460, 340)])]
        + [Prompt.create(box=box) for box in boxes]
    )


def best_masks(predictor: Predictor, embedding, prompts: list[Prompt]) -> list[np.ndarray]:
    """The served answer per prompt: one click -> best of 3 candidates, else one mask."""
    return [
        predictor.decode(embedding, [p], p.box is None and len(p.points) == 1, True)[0].best_mask
        for p in prompts
    ]


def random_checkpoints(folder: Path, variants: tuple[str, ...]) -> tuple[dict[str, Path], str]:
    """Checkpoint per variant: Ti from the shared random-weight fixture when present, else (and
    S always) the builder's random initialisation (seeded), saved under ``folder``."""
    paths, sources = {}, []
    for variant in variants:
        if variant == "ti" and CHECKPOINT.exists():
            paths[variant] = CHECKPOINT
            sources.append(f"ti: fixture {CHECKPOINT.name}")
            continue
        torch.manual_seed(0)
        paths[variant] = folder / f"efficientsam_{variant}_random.pt"
        save_checkpoint(build_efficient_sam(variant), paths[variant])
        sources.append(f"{variant}: build_efficient_sam({variant!r}) initialisation, seed 0")
    return paths, "; ".join(sources)


def private_redis(folder: Path) -> tuple[subprocess.Popen | None, str | None]:
    """A throw-away ``redis-server`` on a free loopback port (no persistence), or None."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"redis://127.0.0.1:{port}/0"


def reachable(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


# -- figures ---------------------------------------------------------------------------------
def encoder_figure(bench: Bench) -> dict:
    """Images/s per variant, precision and batch; best-mask IoU of each precision vs float32."""
    plan, device = bench.plan, bench.device
    prompts = fixed_prompts()
    results = {}
    for variant in bench.variants:
        reference = bench.runtime(variant).base.predictor
        expected = best_masks(reference, reference.embed(bench.image), prompts)
        rows = {}
        for precision, skipped in bench.precisions().items():
            skipped = skipped or bench.budget.skip_reason(f"encoder {variant} {precision}")
            if skipped:
                rows[precision] = {"skipped": skipped}
                continue
            # the Predictor that PRECISION=<precision> serves (its embedding of the click image,
            # made below, is the one the click figure finds in the cache)
            predictor = bench.runtime(variant, precision).base.predictor
            row: dict = {"dtype": precision}
            for batch in plan.batches:
                images = torch.rand(
                    batch, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)
                )
                images = images.to(device)

                def encode(images=images, predictor=predictor):
                    # the Predictor's own precision recipe: what PRECISION= serves
                    with torch.inference_mode():
                        return predictor.model.get_image_embeddings(
                            images, DTYPES[predictor.precision]
                        )

                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                samples = repeat(encode, device, plan.encoder_warmup, plan.encoder_repeats)
                entry = {"batch": batch, "warmup": plan.encoder_warmup, **milliseconds(samples)}
                entry["images_per_s"] = round(batch / statistics.median(samples), 2)
                if device.type == "cuda":
                    entry["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
                row[f"batch_{batch}"] = entry
            if precision != "float32":
                found = best_masks(predictor, predictor.embed(bench.image), prompts)
                ious = [mask_iou(a, b) for a, b in zip(found, expected, strict=True)]
                row["best_mask_iou_vs_float32"] = {
                    "mean": round(float(np.mean(ious)), 4),
                    "min": round(float(np.min(ious)), 4),
                    "prompts": len(ious),
                }
            rows[precision] = row
        results[variant] = rows
    bench.notes["encoder"] = (
        "model.get_image_embeddings on (B, 3, 1024, 1024) float in [0, 1] (preprocessing, ViT, "
        "neck) inside torch.inference_mode in the Predictor's precision (for bfloat16/float16: "
        "the blocks and neck under autocast, patch embedding float32, as PRECISION= serves); IoU: best masks of the served Predictor at "
        "that precision (embed + decode, one click: best of 3 candidates) on a synthetic "
        "640x480 image against float32's, for 6 clicks, 2 two-click prompts and 4 boxes"
    )
    return results


def click_figure(bench: Bench) -> dict:
    """``serving.jobs.segment`` on a cached 640x480 image, per variant and precision."""
    from serving import jobs

    plan, device = bench.plan, bench.device
    rng = np.random.default_rng(2)
    results = {}
    for variant in bench.variants:
        rows = {}
        for precision, skipped in bench.precisions().items():
            skipped = skipped or bench.budget.skip_reason(f"click {variant} {precision}")
            if skipped:
                rows[precision] = {"skipped": skipped}
                continue
            runtime = bench.runtime(variant, precision)
            first = jobs.segment(click_request(bench.image_url, 320, 240), runtime=runtime)
            if "error" in first:
                raise RuntimeError(f"segment failed: {first['error']}")
            points = rng.uniform([10, 10], [630, 470], (plan.click_warmup + plan.clicks, 2))
            job, decoder = [], []
            for index, (x, y) in enumerate(points):
                request = click_request(bench.image_url, float(x), float(y))
                seconds, entry = timed(
                    lambda r=request, rt=runtime: jobs.segment(r, runtime=rt), device
                )
                if entry["timings"]["encoder"] != 0.0:
                    raise RuntimeError("the click image was not cached")
                if index >= plan.click_warmup:
                    job.append(seconds)
                    decoder.append(entry["timings"]["decoder"])
            rows[precision] = {
                "dtype": precision,
                "batch": 1,
                "warmup": plan.click_warmup,
                **milliseconds(job),
                "decoder_median_ms": round(statistics.median(decoder) * 1000, 3),
            }
        results[variant] = rows
    bench.notes["click"] = (
        "serving.jobs.segment called in this process on a serving.runtime.ModelRuntime (no "
        "Redis, no HTTP hop to the backend): one positive click, size 640x480, BrushLabels. The "
        "image comes once from a 127.0.0.1 HTTP server this script starts (OUTBOUND_ALLOW="
        "127.0.0.1) and is then in the runtime's image cache, its embedding in the embedding "
        "cache, as for clicks on an opened task; timed: the whole job (request parsing, cache "
        "look-ups, decoder on 3 candidates, the best one upscaled to 640x480 and thresholded, "
        "LS brush RLE). decoder_median_ms: the job's own decoder timing (decoder + upscale)"
    )
    return results


def everything_figure(bench: Bench) -> dict:
    """``ModelRuntime.automatic_masks`` (the served "segment everything") after the encoder."""
    plan, device = bench.plan, bench.device
    points = plan.points_per_side
    results = {}
    for variant in bench.variants:
        skipped = bench.budget.skip_reason(f"segment everything {variant}")
        if skipped:
            results[variant] = {"skipped": skipped}
            continue
        runtime = bench.runtime(variant)
        served = runtime.base
        image = runtime.load_image(bench.image_url)
        runtime.embed(served, image)  # cached from here on: the figure excludes the encoder
        masks: list = []

        def run(runtime=runtime, served=served, image=image, masks=masks):
            masks[:] = runtime.automatic_masks(served, image, points)

        samples = repeat(run, device, plan.everything_warmup, plan.everything_repeats)
        results[variant] = {
            "dtype": "float32",
            "points_per_side": points,
            "queries": points * points,
            "queries_per_decoder_call": 16 if device.type == "cuda" else 4,
            "warmup": plan.everything_warmup,
            "repeats": len(samples),
            "seconds_per_image": round(statistics.median(samples), 3),
            "masks_kept": len(masks),
        }
    bench.notes["everything"] = (
        "ModelRuntime.automatic_masks (AutomaticMaskGenerator as served: COCO RLE, 16 queries a "
        "decoder call on CUDA, 4 on a CPU, default thresholds) on the 640x480 image with its "
        "embedding cached: seconds per image after the encoder (add the encoder's batch-1 time "
        "for a new image). Random weights keep few or no masks at the default thresholds, so "
        "the per-mask upscale and clean-up that real weights add are mostly not in it"
    )
    return results


def finetune_figure(bench: Bench) -> dict:
    """Steps/s of the default fine-tune (decoder + prompt embeddings, 4 samples a step), Ti."""
    from benchmarks.synthetic import make_dataset
    from efficientsam.training import FineTuner, TrainingConfig, TrainingImage, embed_image

    plan, device = bench.plan, bench.device
    variant = "ti" if "ti" in bench.variants else bench.variants[0]
    model = bench.runtime(variant).base.predictor.model
    samples = make_dataset(plan.finetune_images, seed=1, prefix="bench")
    images = [TrainingImage(s.image_id, embed_image(model, s.image), s.masks) for s in samples]
    # as serving/training_run.py builds it (TrainingConfig(seed=0, ...)), logging every step
    config = TrainingConfig(seed=0, steps=plan.finetune_warmup + plan.finetune_steps, log_every=1)
    ends: list[float] = []

    def progress(entry: dict) -> None:
        synchronise(device)
        ends.append(time.perf_counter())

    report = FineTuner(model, config).fit(images, progress=progress)
    durations = np.diff(ends)[plan.finetune_warmup - 1 :]
    bench.notes["finetune"] = (
        f"efficientsam.training.FineTuner.fit with TrainingConfig(seed=0) (the served recipe: "
        f"decoder + prompt embeddings, encoder frozen, {config.batch_size} samples a step) on "
        f"{len(images)} synthetic images embedded once beforehand; per-step wall times after "
        f"{plan.finetune_warmup} warm-up step(s). {variant} only: the trained part is the same "
        "for Ti and S (the decoder and prompt encoder have the same shapes)"
    )
    return {
        variant: {
            "dtype": "float32",
            "batch": config.batch_size,
            "warmup": plan.finetune_warmup,
            "repeats": len(durations),
            "median_ms": round(float(np.median(durations)) * 1000, 3),
            "steps_per_s": round(1 / float(np.median(durations)), 3),
            "samples_per_s": round(config.batch_size / float(np.median(durations)), 3),
            "trainable_parameters": report.trainable_parameters,
        }
    }


def sami_figure(bench: Bench) -> dict:
    """SAMI at the paper's scale: S teacher (random weights) -> Ti student, one stage at a time
    (the step times do not depend on the weights)."""
    from benchmarks.random_weights import random_model
    from benchmarks.synthetic import make_dataset
    from efficientsam.training.sami import SamiConfig, SamiDistiller, teacher_embeddings

    plan, device = bench.plan, bench.device
    depth, width, heads = plan.sami_decoder
    teacher = random_model("s", seed=1).to(device)
    student = random_model("ti", seed=2).to(device)
    count = max(plan.sami_batch, plan.sami_align_batch)
    images = [s.image for s in make_dataset(count, seed=2, prefix="sami")]
    synchronise(device)
    started = time.perf_counter()
    targets = teacher_embeddings(teacher, images)
    synchronise(device)
    teacher_per_s = len(images) / (time.perf_counter() - started)
    result: dict = {
        "teacher": "s",
        "student": "ti",
        "decoder": {"depth": depth, "width": width, "heads": heads},
        "teacher_images_per_s": round(teacher_per_s, 3),
    }
    for stage, batch in (("sami", plan.sami_batch), ("align", plan.sami_align_batch)):
        steps = plan.sami_warmup + plan.sami_steps
        config = SamiConfig(
            steps=steps if stage == "sami" else 0,
            align_steps=steps if stage == "align" else 0,
            batch_size=batch,
            decoder_depth=depth,
            decoder_width=width,
            decoder_heads=heads,
            warmup_steps=1,
        )
        ends: list[float] = []

        def progress(entry: dict, ends: list[float] = ends) -> None:
            synchronise(device)
            ends.append(time.perf_counter())

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            SamiDistiller(student, config).fit(images, targets, progress=progress)
        except torch.cuda.OutOfMemoryError as error:
            result[stage] = {"batch": batch, "error": f"out of memory: {error}"[:300]}
            torch.cuda.empty_cache()
            continue
        durations = np.diff(ends)[plan.sami_warmup - 1 :]
        step = float(np.median(durations))
        result[stage] = {
            "batch": batch,
            "repeats": len(durations),
            "median_s": round(step, 4),
            "steps_per_s": round(1 / step, 3),
            "images_per_s": round(batch / step, 3),
            "peak_gpu_memory_gib": (
                round(torch.cuda.max_memory_allocated(device) / 1024**3, 2)
                if device.type == "cuda"
                else None
            ),
        }
    if "images_per_s" in result.get("sami", {}):
        seconds = 1000 / teacher_per_s + 1000 / result["sami"]["images_per_s"]
        result["minutes_per_1000_images"] = round(seconds / 60, 2)
    bench.notes["sami"] = (
        "efficientsam.training.sami.SamiDistiller.fit, S teacher -> Ti student (random weights), "
        f"decoder {depth} x {width} ({heads} heads), 75% of the tokens masked; per-step wall "
        f"times after {plan.sami_warmup} warm-up step(s); minutes per 1,000 images = the "
        "teacher's embeddings of 1,000 images + one masked-pretraining pass over them"
    )
    return result


def queue_hop_figure(bench: Bench) -> dict:
    """``bench_workers.queue_hop`` against a real worker process, when Redis is there."""
    try:
        import redis
        import rq  # noqa: F401 (the worker's)
    except ImportError as error:
        return {"skipped": f"skipped: {error} (the queue hop needs redis and rq)"}
    process, url = None, bench.redis_url
    if url is None:
        process, url = private_redis(bench.folder)
        if url is None:
            return {"skipped": "skipped: no --redis-url given and no redis-server on PATH"}
    try:
        deadline = time.monotonic() + 10
        while not reachable(url):
            if process is None or time.monotonic() > deadline:
                shown = re.sub(r"//[^@/]*@", "//", url)  # without a password
                return {"skipped": f"skipped: no Redis at {shown}"}
            time.sleep(0.1)
        variant = "ti" if "ti" in bench.variants else bench.variants[0]
        settings = bench.settings(variant, "float32", redis_url=url)
        settings = settings.with_overrides(model_dir=bench.folder / "models-hop")
        connection = redis.Redis.from_url(url)
        connection.flushdb()
        try:
            measured = queue_hop(settings, connection, bench.image_url, bench.plan.hop_clicks)
        finally:
            connection.flushdb()
            connection.close()
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=10)
    bench.notes["queue_hop"] = (
        f"benchmarks/bench_workers.py queue_hop: the {variant} float32 click job (cached "
        "640x480 image) in this process and through RQ (QueueTransport: JobSerializer, queue "
        "'interactive', one `python -m worker` process on the same device), alternating in "
        "blocks of 10; hop_overhead_median_ms: each queued call's round trip minus the job's "
        "own time inside the worker. Redis: "
        + ("a private redis-server started by this script" if process else "--redis-url")
    )
    return {variant: {"dtype": "float32", "batch": 1, **measured}}


FIGURE_FUNCTIONS: dict[str, Callable[[Bench], dict]] = {
    "encoder": encoder_figure,
    "click": click_figure,
    "everything": everything_figure,
    "finetune": finetune_figure,
    "queue_hop": queue_hop_figure,
    "sami": sami_figure,
}


# -- report ----------------------------------------------------------------------------------
def _cell(entry: dict | None, render: Callable[[dict], str]) -> str:
    if entry is None:
        return "—"
    if "skipped" in entry or "error" in entry:
        return "skipped" if "skipped" in entry else "error"
    return render(entry)


def to_markdown(results: dict) -> str:
    """The README table of a run's JSON."""
    variants = results["variants"]
    figures = results["figures"]
    machine = results["machine"]
    lines = [
        f"{machine['device_name']}, torch {machine['torch']}"
        + (f" (CUDA {machine['cuda']})" if machine.get("cuda") else "")
        + f", {results['date']}; {results['weights'].split(' (')[0]}; medians after warm-up"
        + (" (--quick)" if results["quick"] else "")
        + ".",
        "",
        "| measurement | " + " | ".join(f"EfficientSAM-{v.upper()}" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]

    def row(label: str, figure: str, pick: Callable[[dict], dict | None], render) -> None:
        data = figures.get(figure, {})
        if "skipped" in data or "error" in data:
            cells = [_cell(data, render)] * len(variants)
        else:
            cells = [_cell(pick(data[v]) if v in data else None, render) for v in variants]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    batches = results["plan"]["batches"]
    for precision in PRECISIONS:
        for batch in batches:
            row(
                f"encoder images/s, batch {batch}, {precision}",
                "encoder",
                lambda d, p=precision, b=batch: (
                    d.get(p) if "skipped" in d.get(p, {}) else d.get(p, {}).get(f"batch_{b}")
                ),
                lambda e: f"{e['images_per_s']:g}",
            )
    for precision in PRECISIONS[1:]:
        row(
            f"best-mask IoU vs float32, {precision}, mean / min",
            "encoder",
            lambda d, p=precision: (
                d.get(p)
                if "skipped" in d.get(p, {})
                else d.get(p, {}).get("best_mask_iou_vs_float32")
            ),
            lambda e: f"{e['mean']:.4f} / {e['min']:.4f}",
        )
    for precision in PRECISIONS:
        row(
            f"click on a cached 640x480 image (segment job), {precision}: median / p95",
            "click",
            lambda d, p=precision: d.get(p),
            lambda e: f"{e['median_ms']:.1f} / {e['p95_ms']:.1f} ms",
        )
    points = results["plan"]["points_per_side"]
    row(
        f"segment everything {points}x{points}, after the encoder",
        "everything",
        lambda d: d,
        lambda e: f"{e['seconds_per_image']:.2f} s per image",
    )
    row(
        "fine-tune (decoder only, 4 samples a step)",
        "finetune",
        lambda d: d,
        lambda e: f"{e['steps_per_s']:.2f} steps/s",
    )
    sami = figures.get("sami", {})
    for stage, label in (("sami", "masked pretraining"), ("align", "alignment")):
        entry = sami.get(stage) if "skipped" not in sami and "error" not in sami else sami
        text = _cell(entry, lambda e: f"{e['images_per_s']:.2f} images/s (batch {e['batch']})")
        lines.append(
            f"| SAMI {label}, S teacher -> Ti student | {text} |" + " |" * (len(variants) - 1)
        )
    if sami.get("minutes_per_1000_images") is not None:
        lines.append(
            f"| SAMI minutes per 1,000 images (teacher + one masked pass) | "
            f"{sami['minutes_per_1000_images']:.1f} |" + " |" * (len(variants) - 1)
        )
    row(
        "queue hop (click job through RQ minus the job), median",
        "queue_hop",
        lambda d: d,
        lambda e: f"{e['hop_overhead_median_ms']:.1f} ms",
    )
    reasons = sorted(
        {
            f"{name}: {entry.get('skipped') or entry.get('error')}"
            for name, entry in _flatten(figures)
            if "skipped" in entry or "error" in entry
        }
    )
    if reasons:
        lines += ["", *(f"- {reason}" for reason in reasons)]
    return "\n".join(lines) + "\n"


def _flatten(figures: dict, prefix: str = ""):
    """(dotted name, dict) for every dict in the figures' tree."""
    for name, value in figures.items():
        if isinstance(value, dict):
            yield f"{prefix}{name}", value
            yield from _flatten(value, f"{prefix}{name}.")


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/gpu-*)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    parser.add_argument("--quick", action="store_true", help="tiny repeats (CPU smoke test)")
    parser.add_argument("--variants", default="ti,s")
    parser.add_argument("--only", default=",".join(FIGURES), help="figures to run")
    parser.add_argument("--redis-url", help="default: a private redis-server, if on PATH")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    for name, allowed in (("variants", VARIANTS), ("only", FIGURES)):
        unknown = set(getattr(args, name).split(",")) - set(allowed)
        if unknown:
            parser.error(f"--{name}: unknown {sorted(unknown)} (choose from {', '.join(allowed)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    keep_freed_memory_for_reuse()
    out = args.out or default_out(device, args.quick)
    folder = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    bench = Bench(
        device=device,
        plan=QUICK if args.quick else FULL,
        budget=budget,
        variants=tuple(args.variants.split(",")),
        folder=folder,
        threads=args.threads,
        redis_url=args.redis_url,
    )
    bench.checkpoints, weights = random_checkpoints(folder, bench.variants)
    bench.image = synthetic_image()
    (folder / "images").mkdir()
    Image.fromarray(bench.image).save(folder / "images" / "click.png")
    server, base_url = serve_directory(folder / "images")
    bench.image_url = f"{base_url}/click.png"
    results: dict = {
        "benchmark": "gpu",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "device": str(device),
            "device_name": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        },
        "weights": f"{WEIGHTS}; {weights}",
        "quick": args.quick,
        "variants": list(bench.variants),
        "plan": asdict(bench.plan),
        "budget_seconds": args.budget,
        "figures": {},
    }
    failed = False
    try:
        for name in FIGURES:
            if name not in args.only.split(","):
                results["figures"][name] = {"skipped": "skipped: not in --only"}
                continue
            skipped = budget.skip_reason(name, NEEDS_SECONDS.get(name, 0.0))
            if skipped:
                results["figures"][name] = {"skipped": skipped}
                continue
            started = time.perf_counter()
            print(f"[{budget.spent():6.1f} s] {name} ...", flush=True)
            try:
                figure = FIGURE_FUNCTIONS[name](bench)
            except Exception as error:  # one figure's failure never loses the others
                traceback.print_exc()
                figure = {"error": f"{type(error).__name__}: {error}"}
                failed = True
            results["figures"][name] = {
                "device": device_name(device),
                "torch": torch.__version__,
                "seconds": round(time.perf_counter() - started, 1),
                **figure,
            }
    finally:
        bench.close()
        server.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    results["notes"] = bench.notes
    results["elapsed_seconds"] = round(budget.spent(), 1)
    table = to_markdown(results)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')} in {results['elapsed_seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Redis/RQ deployment benchmarks: queue-hop overhead, batch throughput, segment everything.

    python benchmarks/bench_workers.py [--redis-url redis://127.0.0.1:6379/12] [--clicks 60]
        [--images 24] [--json benchmarks/results/workers-cpu-2core.json]

1. Queue hop: the same interactive ``segment`` job (a cached image, one click, best mask as LS
   brush RLE) called in this process (``serving.jobs.segment`` with a runtime here) and through
   RQ (``QueueTransport.call``: enqueue on ``interactive``, a ``python -m worker`` process runs
   it, the result comes back through Redis); calls alternate; medians and their difference.
2. Batch throughput: box-to-mask ``autolabel`` jobs for distinct images (each needs the
   encoder) drained by 1 worker (2 torch threads) and by 2 workers (1 thread each); images/min.
3. Segment everything: ``AutomaticMaskGenerator`` time per image at 16x16 and 32x32 points.
4. Shared cache dtype: best-mask IoU and logit difference of float16-stored embeddings.

Uses its own Redis db index (flushed before and after) and the random-weight Ti fixture.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serving.requests import (  # noqa: E402
    AutolabelRequest,
    BoxSpec,
    OutputSpec,
    PromptSpec,
    SegmentRequest,
    TaskSpec,
)

SHARED = Path(os.environ.get("EFFICIENTSAM_SHARED_DIR", ROOT.parent / "shared"))
CHECKPOINT = SHARED / "fixtures" / "efficientsam_ti_random.pt"
IMAGE = SHARED / "fixtures" / "efficientsam_ti_reference" / "image_640x480.png"
OUTPUT = OutputSpec(tag="BrushLabels", name="tag", to_name="image", labels=["Object"])
IMAGE_HOST = "127.0.0.1"  # serve_directory's host: OUTBOUND_ALLOW must name it


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files without a log line per request."""

    def log_message(self, *args) -> None:
        pass


def serve_directory(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``directory`` over HTTP on a free 127.0.0.1 port; the server and its base URL."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def start_worker(
    redis_url: str,
    queues: str,
    threads: int,
    name: str,
    device: str = "cpu",
    checkpoint: Path = CHECKPOINT,
) -> subprocess.Popen:
    """A ``python -m worker`` process; images from 127.0.0.1 allowed (the benchmark's server)."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "CHECKPOINT": str(checkpoint),
        "MODEL_DIR": tempfile.mkdtemp(prefix="bench-models-"),
        "DEVICE": device,
        "TORCH_THREADS": str(threads),
        "OUTBOUND_ALLOW": IMAGE_HOST,
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "--queues", queues, "--name", name],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        process.wait(timeout=30)


def wait_for_workers(connection, count: int) -> None:
    from rq import Worker

    deadline = time.monotonic() + 120
    while len(Worker.all(connection=connection)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not start")
        time.sleep(0.2)


def click_request(url: str, x: float, y: float) -> SegmentRequest:
    return SegmentRequest(
        project="1",
        task=1,
        image=url,
        size=(640, 480),
        prompt=PromptSpec(points=[(x, y)], labels=[1]),
        output=OUTPUT,
        label="Object",
    )


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def queue_hop(settings, connection, url: str, clicks: int) -> dict:
    """The same click job (the image at ``url``) in this process and through RQ to a worker
    process on ``settings.device``; medians in ms (see module docstring)."""
    import torch

    from serving import jobs
    from serving.runtime import ModelRuntime
    from serving.transports import QueueTransport

    torch.set_num_threads(2)
    runtime = ModelRuntime(settings)
    runtime.load()
    transport = QueueTransport(settings)
    worker = start_worker(
        settings.redis_url, "interactive", 2, "hop", settings.device, settings.checkpoint
    )
    try:
        wait_for_workers(connection, 1)
        warm = click_request(url, 100, 100)
        for _ in range(5):  # both sides: image downloaded and encoded, decoder warm
            jobs.segment(warm, runtime=runtime)
            transport.call("segment", warm, 60)
        rng = np.random.default_rng(0)
        points = rng.uniform([10, 10], [630, 470], (clicks, 2))
        local, queued, inside = [], [], []
        # Blocks of 10 clicks, alternating: the same clicks in-process, then through RQ. Blocks,
        # not single alternation: this process's idle OpenMP threads spin for a while after an
        # in-process call and would slow the worker down (a backend in Redis mode runs no torch).
        for start in range(0, clicks, 10):
            block = [click_request(url, float(x), float(y)) for x, y in points[start : start + 10]]
            for samples, call in (
                (local, lambda request: jobs.segment(request, runtime=runtime)),
                (queued, lambda request: transport.call("segment", request, 60)),
            ):
                call(block[0])  # the first call after a switch is not counted
                for request in block[1:]:
                    started = time.perf_counter()
                    entry = call(request)
                    samples.append(time.perf_counter() - started)
                    if samples is queued:
                        inside.append(entry["timings"]["job"])
        return {
            "in_process_median_ms": median_ms(local),
            "through_rq_median_ms": median_ms(queued),
            "difference_of_medians_ms": round(median_ms(queued) - median_ms(local), 2),
            # The hop itself, free of the compute's run-to-run noise: each queued call's round
            # trip minus the time the same job function took inside the worker.
            "hop_overhead_median_ms": median_ms(
                [q - j for q, j in zip(queued, inside, strict=True)]
            ),
            "clicks_counted": len(local),
        }
    finally:
        stop([worker])
        runtime.close()


def batch_throughput(settings, connection, base_url: str, images: int, workers: int) -> dict:
    from serving.transports import QueueTransport
    from worker.operations import wait_for_jobs

    connection.flushdb()
    threads = 2 // workers
    processes = [
        start_worker(settings.redis_url, "batch", threads, f"b{i}") for i in range(workers)
    ]
    try:
        wait_for_workers(connection, workers)
        transport = QueueTransport(settings)
        time.sleep(1.0)  # let the workers settle
        started = time.perf_counter()
        ids = []
        for index in range(images):
            boxes = [
                BoxSpec(box=(64, 48, 320, 240), size=(640, 480), label="Object"),
                BoxSpec(box=(300, 200, 600, 460), size=(640, 480), label="Object"),
            ]
            task = TaskSpec(id=index, image=f"{base_url}/image{index}.png", boxes=boxes)
            request = AutolabelRequest(project="1", task=task, mode="boxes", output=OUTPUT)
            ids.append(transport.submit("autolabel", request, f"bench-{workers}-{index}"))
        failed = wait_for_jobs(connection, ids, f"{workers} worker(s)")
        seconds = time.perf_counter() - started
        if failed:
            raise RuntimeError(f"batch jobs failed: {failed}")
        return {
            "workers": workers,
            "torch_threads_each": threads,
            "images": images,
            "seconds": round(seconds, 2),
            "images_per_minute": round(images / seconds * 60, 1),
        }
    finally:
        stop(processes)


def segment_everything(reference: np.ndarray) -> dict:
    import torch

    from efficientsam import load_model
    from efficientsam.automatic import AutomaticMaskGenerator
    from efficientsam.predictor import Predictor

    torch.set_num_threads(2)
    predictor = Predictor(load_model(CHECKPOINT))
    embedding = predictor.embed(reference)
    results = {"encoder_seconds": round(embedding.encoder_seconds, 2)}
    for points in (16, 32):
        run = AutomaticMaskGenerator(predictor, points_per_side=points).run(embedding)
        results[f"{points}x{points}"] = {
            "decoder_queries": run.num_points,
            "seconds_after_encoder": round(run.timings.total_seconds, 2),
            "decode_seconds": round(run.timings.decode_seconds, 2),
            "masks_kept": len(run.masks),
        }
    return results


def shared_cache_dtype(reference: np.ndarray) -> dict:
    import torch

    from efficientsam import load_model
    from efficientsam.arrays import mask_iou
    from efficientsam.predictor import ImageEmbedding, Predictor
    from efficientsam.prompts import Prompt
    from serving.cache_redis import decode_embedding, encode_embedding

    predictor = Predictor(load_model(CHECKPOINT))
    exact = predictor.embed(reference)
    stored = torch.from_numpy(decode_embedding(encode_embedding(exact.embeddings, "float16")))
    key = exact.key.__class__(exact.key.model_fingerprint, "float16-copy", exact.key.image_hash)
    rounded = ImageEmbedding(stored, exact.original_size, key, True, 0.0)
    rng = np.random.default_rng(1)
    ious, logits = [], []
    for index in range(40):
        x, y = rng.uniform([20, 20], [620, 460])
        prompt = (
            Prompt.create([[x, y]])
            if index % 2
            else Prompt.create(box=(x - 60, y - 40, x + 80, y + 60))
        )
        a = predictor.decode(exact, [prompt], prompt.box is None)[0]
        b = predictor.decode(rounded, [prompt], prompt.box is None)[0]
        ious.append(mask_iou(a.masks[0], b.masks[0]))
        logits.append(float(np.abs(a.low_res_logits - b.low_res_logits).max()))
    return {
        "prompts": 40,
        "best_mask_iou_mean": round(float(np.mean(ious)), 5),
        "best_mask_iou_min": round(float(np.min(ious)), 5),
        "max_abs_logit_difference": round(max(logits), 5),
        "bytes_per_embedding": {"float16": 2 * 256 * 64 * 64, "float32": 4 * 256 * 64 * 64},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--clicks", type=int, default=60)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import redis

    from serving.settings import Settings

    settings = Settings.from_env(
        {},
        redis_url=args.redis_url,
        checkpoint=CHECKPOINT,
        device="cpu",
        threads=2,
        outbound_allow=IMAGE_HOST,
    )
    connection = redis.Redis.from_url(args.redis_url)
    connection.flushdb()
    reference = np.asarray(Image.open(IMAGE).convert("RGB"))
    folder = Path(tempfile.mkdtemp(prefix="bench-images-"))
    Image.fromarray(reference).save(folder / "reference.png")
    rng = np.random.default_rng(0)
    for index in range(args.images):
        noisy = np.clip(reference.astype(np.int16) + rng.integers(-20, 20, reference.shape), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(noisy.astype(np.uint8)).save(buffer, format="PNG")
        (folder / f"image{index}.png").write_bytes(buffer.getvalue())
    server, base_url = serve_directory(folder)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no GPU",
    }
    try:
        results["queue_hop"] = queue_hop(
            settings, connection, f"{base_url}/reference.png", args.clicks
        )
        print(json.dumps(results["queue_hop"], indent=2))
        results["batch_throughput"] = [
            batch_throughput(settings, connection, base_url, args.images, workers)
            for workers in (1, 2)
        ]
        print(json.dumps(results["batch_throughput"], indent=2))
        results["segment_everything"] = segment_everything(reference)
        print(json.dumps(results["segment_everything"], indent=2))
        results["shared_cache_float16"] = shared_cache_dtype(reference)
        print(json.dumps(results["shared_cache_float16"], indent=2))
    finally:
        server.shutdown()
        connection.flushdb()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

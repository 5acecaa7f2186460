"""Click latency in the embedded backend while other model work runs (median, p95).

Builds the embedded service as ``python -m backend`` does (random-weight Ti fixture, default
settings, a local file server standing in for LS's /data endpoint) and has ``--clients``
threads click continuously on an image whose embedding is cached, through
``SegmentationService.predict`` (the /predict route without the HTTP hop), in three phases:

* idle: nothing else runs;
* batch: a "Retrieve predictions" of ``--batch-tasks`` tasks on new images (encoder + segment
  everything at the default grid) runs in the same process;
* fine-tune: a fine-tune's training runs in the same process, on the embedded transport's
  training thread (``FineTuner.fit`` on synthetic data, as ``serving.training_run`` calls it).

Run it on two commits to compare (the code under test is whatever ``backend``/``worker`` import):

    python benchmarks/bench_click_load.py [--clients 8] [--seconds 20] [--json out.json]

Throughput on an idle server (8 clients x 25 cached clicks: clicks/s and p95):

    python benchmarks/bench_click_load.py --clients 8 --clicks-per-client 25 --idle-only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.http_fixtures import LEGACY_TOKEN, FileServer, keypoint  # noqa: E402

SHARED = Path(os.environ.get("EFFICIENTSAM_SHARED_DIR", ROOT.parent / "shared"))
CHECKPOINT = SHARED / "fixtures" / "efficientsam_ti_random.pt"
IMAGE = SHARED / "fixtures" / "efficientsam_ti_reference" / "image_640x480.png"
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="tag2" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
</View>"""


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _request(tasks: list[dict], context: dict | None) -> dict:
    return {
        "tasks": tasks,
        "project": "1.1",
        "label_config": CONFIG,
        "params": {"context": context},
    }


def _percentiles(samples: list[float]) -> dict:
    ordered = sorted(samples)
    return {
        "clicks": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 1) if ordered else None,
        "p95_ms": round(1000 * ordered[int(0.95 * (len(ordered) - 1))], 1) if ordered else None,
    }


def clicks_while(
    service, clients: int, busy: threading.Event, seconds: float, clicks_each: int = 0
) -> list[float]:
    """Latencies (s) of clicks by ``clients`` threads while ``busy`` is set (at most seconds;
    ``clicks_each`` > 0: each client stops after that many clicks)."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        done = 0
        while busy.is_set() and time.monotonic() < deadline:
            if clicks_each and done >= clicks_each:
                break
            done += 1
            x, y = rng.uniform(10, 90, 2)
            body = _request([{"id": 1, "data": {"image": "/data/click.png"}}], {"result": []})
            body["params"]["context"]["result"] = [keypoint(float(x), float(y))]
            started = time.perf_counter()
            service.predict(body)
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase, at most")
    parser.add_argument("--batch-tasks", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=15)
    parser.add_argument(
        "--points-per-side", type=int, default=16, help="the batch's grid (16: the CPU default)"
    )
    parser.add_argument(
        "--clicks-per-client",
        type=int,
        default=0,
        help="idle phase: each client clicks this many times (0: for --seconds / 2); the "
        "report gives clicks/s over the phase's wall time",
    )
    parser.add_argument("--idle-only", action="store_true", help="skip the batch/train phases")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from backend.service import SegmentationService
    from serving.settings import Settings

    files = FileServer()
    pixels = np.asarray(Image.open(IMAGE).convert("RGB"))
    files.files["/data/click.png"] = _png(pixels)
    for index in range(args.batch_tasks):
        files.files[f"/data/new{index}.png"] = _png(np.roll(pixels, 37 * (index + 1), 1))
    settings = Settings.from_env(
        {"LABEL_STUDIO_URL": files.url, "LABEL_STUDIO_API_KEY": LEGACY_TOKEN},
        checkpoint=CHECKPOINT,
        autolabel_points_per_side=args.points_per_side,  # explicit: older commits needed it
    )
    service = SegmentationService(settings)
    service.start()
    transport = service.transport
    transport._ready.wait(120)
    busy = threading.Event()
    busy.set()
    clicks_while(service, 1, busy, 0)  # nothing: warm-up below
    body = _request([{"id": 1, "data": {"image": "/data/click.png"}}], {"result": []})
    body["params"]["context"]["result"] = [keypoint(50, 50)]
    for _ in range(5):
        service.predict(body)  # embedding cached, decoder warm
    results: dict = {"clients": args.clients}

    started = time.perf_counter()
    idle_seconds = 600.0 if args.clicks_per_client else args.seconds / 2
    idle = clicks_while(service, args.clients, busy, idle_seconds, args.clicks_per_client)
    wall = time.perf_counter() - started
    results["idle"] = _percentiles(idle)
    results["idle"].update({"clicks_per_client": args.clicks_per_client, "seconds": round(wall, 2)})
    results["idle"]["clicks_per_s"] = round(len(idle) / wall, 1)
    if args.idle_only:
        return _finish(results, service, files, args.json)

    batch_busy = threading.Event()
    batch_busy.set()
    batch_info: dict = {}

    def run_batch() -> None:
        tasks = [
            {"id": 10 + i, "data": {"image": f"/data/new{i}.png"}} for i in range(args.batch_tasks)
        ]
        started = time.perf_counter()
        entries = service.predict(_request(tasks, None))["results"]
        batch_info["seconds"] = round(time.perf_counter() - started, 1)
        batch_info["with_result"] = sum("result" in e for e in entries)
        batch_busy.clear()

    thread = threading.Thread(target=run_batch)
    thread.start()
    results["batch"] = _percentiles(clicks_while(service, args.clients, batch_busy, args.seconds))
    thread.join()
    results["batch"].update(batch_info)

    train_busy = threading.Event()
    train_busy.set()
    train_info: dict = {}

    def run_training() -> None:
        from benchmarks.synthetic import make_dataset
        from efficientsam.training import FineTuner, TrainingConfig, TrainingImage

        predictor = transport.runtime.base.predictor
        samples = make_dataset(4, seed=3)
        images = [
            TrainingImage(
                s.image_id,
                transport.runtime.compute(lambda s=s: predictor.embed(s.image).embeddings),
                s.masks,
            )
            for s in samples
        ]
        tuner = FineTuner(predictor.model, TrainingConfig(steps=args.train_steps, seed=0))
        started = time.perf_counter()
        tuner.fit(images)
        train_info["seconds_per_step"] = round(
            (time.perf_counter() - started) / args.train_steps, 3
        )
        train_busy.clear()

    # the embedded transport's own training thread, as a fine-tune job runs there
    future = transport._training.submit(run_training)
    time.sleep(0.5)
    results["finetune"] = _percentiles(
        clicks_while(service, args.clients, train_busy, args.seconds * 3)
    )
    future.result()
    results["finetune"].update(train_info)
    for phase in ("batch", "finetune"):
        results[phase]["p95_over_idle_p95"] = round(
            results[phase]["p95_ms"] / results["idle"]["p95_ms"], 2
        )
    return _finish(results, service, files, args.json)


def _finish(results: dict, service, files, json_path: Path | None) -> int:
    results["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    service.close()
    files.close()
    print(json.dumps(results, indent=2))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One client's click through the embedded service: ``SegmentationService.predict`` on a cached
image (context parsing, job request, compute thread, decoder, brush RLE), no HTTP; optionally
where each millisecond goes, and the backend alone over real HTTP.

    python benchmarks/bench_predict_path.py [--calls 300]
    python benchmarks/bench_predict_path.py --breakdown --http [--calls 200] [--json OUT.json]
    python benchmarks/bench_predict_path.py --breakdown --http --compare /work/main --rounds 4 \\
        [--json benchmarks/results/click-breakdown-cpu-2core.json]

* ``--breakdown``: every stage of the served click is timed where it runs (the functions of the
  checkout under test are wrapped with timers: label config, context, job request, job dispatch,
  compute-thread hand-off, embedding lookup, decoder transformer, bicubic upscale, the rest of
  ``Predictor.decode`` (sort, threshold, copies), brush RLE, result items, metrics), plus
  stand-alone timings of the pieces no function boundary isolates (threshold, tensor -> numpy,
  orjson of the answer, an empty compute-thread round trip). Medians of ``--calls`` clicks.
* ``--http``: the backend alone: the app (``backend.app.create_app``) served by uvicorn on
  127.0.0.1, an httpx client posting LS's /predict payload (a smart keypoint, as LS 1.23 sends
  it) and reading the whole answer (RLE as JSON ints); alternated with in-process
  ``service.predict`` calls, so the HTTP overhead is their difference.
* ``--compare CHECKOUT``: runs this script ``--rounds`` times in each of the current directory's
  checkout and CHECKOUT, alternating (subprocesses, each importing its own checkout), and reports
  per-stage medians over the rounds and new/old ratios (the machine is shared: compare ratios).

Runs on older commits too (their ``backend.settings`` / ``tests.backend.conftest`` paths), so two
checkouts can be compared in alternating runs: ``cd CHECKOUT && PYTHONPATH=$PWD python ...``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
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

# -- stage timers ------------------------------------------------------------------------------
_click: dict[str, float] = defaultdict(float)  # this click's seconds per stage
_clicks: dict[str, list[float]] = defaultdict(list)  # per stage: one sum per click


def _wrap(owner, name: str, stage: str) -> bool:
    """Time every call of ``owner.name`` into ``stage`` (a no-op when this checkout has none)."""
    original = getattr(owner, name, None)
    if original is None:
        return False
    is_static = isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _click[stage] += time.perf_counter() - started

    setattr(owner, name, staticmethod(timed) if is_static else timed)
    return True


def _instrument(service) -> list[str]:
    import backend.service as service_module
    import serving.jobs as jobs
    import serving.labelstudio.results as results
    from efficientsam.modeling import EfficientSam
    from efficientsam.predictor import Predictor

    try:
        from serving.runtime import ModelRuntime
    except ImportError:  # older layouts
        ModelRuntime = None
    wrapped = []
    targets = [
        (service_module, "parse_label_config", "label_config"),
        (service_module, "parse_context", "context"),
        (type(service), "requested_version", "version"),
        (service_module, "segment_request", "job_request"),
        (type(service), "_observe", "metrics"),
        (service.transport, "call", "transport_call"),
        (jobs, "parse_request", "job_parse"),
        (ModelRuntime, "served_model", "served_model"),
        (ModelRuntime, "load_image", "image_lookup"),
        # the runtime holds ComputeThread.run bound (serving/runtime.py): wrap its reference
        (getattr(service.transport, "runtime", None), "_compute", "compute_run"),
        (Predictor, "embed", "embedding_lookup"),
        (Predictor, "decode", "decode"),
        (Predictor, "prepared_image", "prepared_image"),
        (EfficientSam, "predict_masks", "decoder"),
        (Predictor, "upscale_logits", "upscale"),
        (Predictor, "upscale_masks", "upscale"),  # a fused upscale + threshold, where it exists
        (jobs, "resize_mask", "resize_mask"),
        (jobs, "mask_results", "mask_results"),
        (results, "brush_rle", "rle"),
    ]
    for owner, name, stage in targets:
        if owner is not None and _wrap(owner, name, stage):
            wrapped.append(stage)
    spec = jobs.JOBS["segment"]
    function = spec.function

    def segment(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            _click["job"] += time.perf_counter() - started

    import dataclasses

    jobs.JOBS["segment"] = dataclasses.replace(spec, function=segment)
    wrapped.append("job")
    return wrapped


def _timed_click(service, body) -> float:
    _click.clear()
    started = time.perf_counter()
    service.predict(body)
    total = time.perf_counter() - started
    _click["total"] = total
    for stage, seconds in _click.items():
        _clicks[stage].append(seconds)
    return total


def _median_ms(values) -> float | None:
    return round(1000 * statistics.median(values), 3) if len(values) else None


def _breakdown(wrapped: list[str]) -> dict:
    """Per-stage medians (ms) and the derived remainders (each a median of per-click values)."""
    n = len(_clicks["total"])

    def column(stage: str) -> np.ndarray:
        values = _clicks.get(stage)
        return np.asarray(values if values and len(values) == n else [0.0] * n)

    stages = {stage: _median_ms(_clicks[stage]) for stage in sorted(_clicks)}
    derived = {
        # predict minus what it calls: request checks, dict lookups, the answer
        "service_other": column("total")
        - column("transport_call")
        - column("label_config")
        - column("context")
        - column("version")
        - column("job_request")
        - column("metrics"),
        # transport.call minus the job: job_spec, msgspec to_builtins, work_class
        "dispatch": column("transport_call") - column("job"),
        # the job minus its parts: entry dict, label lookups, prompt to pixels
        "job_other": column("job")
        - column("job_parse")
        - column("served_model")
        - column("image_lookup")
        - column("compute_run")
        - column("resize_mask")
        - column("mask_results"),
        # ComputeThread.run minus the work: submit, heap, condition variable, future, closure
        "compute_handoff": column("compute_run") - column("embedding_lookup") - column("decode"),
        # decode minus the decoder and the upscale: prompt arrays, sort/gather, threshold, copies
        "decode_other": column("decode")
        - column("prepared_image")
        - column("decoder")
        - column("upscale"),
        "results_other": column("mask_results") - column("rle"),
    }
    return {
        "clicks": n,
        "stages_ms": stages,
        "derived_ms": {name: _median_ms(values) for name, values in derived.items()},
        "wrapped": wrapped,
    }


def _micro(service, body, calls: int) -> dict:
    """Stand-alone timings of pieces inside functions (same process, after the clicks)."""
    import orjson
    import torch

    out: dict[str, float | None] = {}
    logits = torch.randn(480, 640)
    masks = logits >= 0.0

    def median(function, repeat: int = calls) -> float:
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            function()
            samples.append(time.perf_counter() - started)
        return _median_ms(samples)

    out["threshold_480x640"] = median(lambda: logits >= 0.0)
    out["tensor_to_numpy_480x640"] = median(lambda: masks.cpu().numpy())
    answer = service.predict(body)
    option = orjson.OPT_SERIALIZE_NUMPY
    out["orjson_answer"] = median(lambda: orjson.dumps(answer, option=option))
    out["answer_json_bytes"] = len(orjson.dumps(answer, option=option))
    compute = getattr(service.transport, "_compute", None)
    if compute is not None:
        from serving.compute import URGENT, work_class

        token = work_class.set((URGENT, None))
        try:
            out["compute_roundtrip_noop"] = median(lambda: compute.run(lambda: None))
        finally:
            work_class.reset(token)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(settings):
    """The app under uvicorn on 127.0.0.1 (its lifespan builds the service): (server, url)."""
    import uvicorn

    from backend.app import create_app

    app = create_app(settings)
    port = _free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return server, thread, app, f"http://127.0.0.1:{port}"


def run(args) -> dict:
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
    server = None
    if args.http:
        server, thread, app, url = _serve(settings)
        service = app.state.service
    else:
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
    report: dict = {"checkout": str(ROOT), "calls": args.calls}
    try:
        import torch

        report["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    wrapped = _instrument(service) if args.breakdown else []
    seconds, http_seconds = [], []
    client = None
    if server is not None:
        import httpx

        client = httpx.Client(base_url=url, timeout=60)
        payload = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        for _ in range(5):
            client.post("/predict", content=payload, headers=headers).raise_for_status()
    for _ in range(args.calls):
        seconds.append(_timed_click(service, body))
        if client is not None:  # alternated: the same load on both
            started = time.perf_counter()
            response = client.post("/predict", content=payload, headers=headers)
            response.read()
            http_seconds.append(time.perf_counter() - started)
            response.raise_for_status()
    report["predict_median_ms"] = _median_ms(seconds)
    report["predict_p90_ms"] = round(1000 * sorted(seconds)[int(len(seconds) * 0.9)], 3)
    if args.breakdown:
        report["breakdown"] = _breakdown(wrapped)
        report["micro_ms"] = _micro(service, body, args.calls)
    if client is not None:
        report["http_predict_median_ms"] = _median_ms(http_seconds)
        report["http_predict_p90_ms"] = round(
            1000 * sorted(http_seconds)[int(len(http_seconds) * 0.9)], 3
        )
        report["http_overhead_ms"] = round(
            report["http_predict_median_ms"] - report["predict_median_ms"], 3
        )
        report["http_answer_bytes"] = len(response.content)
        client.close()
        server.should_exit = True
        thread.join(30)
    else:
        service.close()
    files.close()
    return report


def _print(report: dict) -> None:
    print(
        f"{report['checkout']}: predict median {report['predict_median_ms']:.2f} ms, "
        f"p90 {report['predict_p90_ms']:.2f} ms over {report['calls']} calls"
    )
    if "http_predict_median_ms" in report:
        print(
            f"  HTTP /predict (uvicorn, httpx) median {report['http_predict_median_ms']:.2f} ms, "
            f"p90 {report['http_predict_p90_ms']:.2f} ms; overhead over in-process "
            f"{report['http_overhead_ms']:.2f} ms; answer {report['http_answer_bytes']} bytes"
        )
    breakdown = report.get("breakdown")
    if breakdown:
        print("  stages (median ms per click):")
        for stage, ms in breakdown["stages_ms"].items():
            print(f"    {stage:18s} {ms:8.3f}")
        print("  remainders (median ms per click):")
        for stage, ms in breakdown["derived_ms"].items():
            print(f"    {stage:18s} {ms:8.3f}")
        print("  stand-alone:")
        for name, value in report["micro_ms"].items():
            print(f"    {name:24s} {value}")


def _flatten(report: dict) -> dict[str, float]:
    flat = {}
    for key in ("predict_median_ms", "http_predict_median_ms", "http_overhead_ms"):
        if report.get(key) is not None:
            flat[key] = report[key]
    breakdown = report.get("breakdown") or {}
    for group in ("stages_ms", "derived_ms"):
        for stage, ms in (breakdown.get(group) or {}).items():
            if ms is not None:
                flat[f"{group[:-3]}.{stage}"] = ms
    for name, value in (report.get("micro_ms") or {}).items():
        if value is not None:
            flat[f"micro.{name}"] = value
    return flat


def compare(args) -> dict:
    """Alternating subprocess runs in the current checkout (new) and ``args.compare`` (old)."""
    checkouts = {"new": ROOT, "old": Path(args.compare).resolve()}
    runs: dict[str, list[dict]] = {"new": [], "old": []}
    child = [sys.executable, str(Path(__file__).resolve()), "--calls", str(args.calls)]
    child += ["--breakdown"] * args.breakdown + ["--http"] * args.http
    with tempfile.TemporaryDirectory() as directory:
        for round_index in range(args.rounds):
            order = ["old", "new"] if round_index % 2 else ["new", "old"]
            for name in order:
                out = Path(directory) / f"{name}-{round_index}.json"
                env = {**os.environ, "PYTHONPATH": str(checkouts[name])}
                subprocess.run(
                    [*child, "--json", str(out)], cwd=checkouts[name], env=env, check=True
                )
                runs[name].append(json.loads(out.read_text()))
                print(
                    f"round {round_index + 1} {name}: predict {runs[name][-1]['predict_median_ms']}"
                    f" ms, HTTP {runs[name][-1].get('http_predict_median_ms')} ms",
                    flush=True,
                )
    table = {}
    flats = {name: [_flatten(r) for r in reports] for name, reports in runs.items()}
    keys = sorted(set().union(*(f.keys() for f in flats["new"] + flats["old"])))
    for key in keys:
        row = {}
        for name in ("old", "new"):
            values = [f[key] for f in flats[name] if key in f]
            row[name] = round(statistics.median(values), 3) if values else None
        if row["old"] and row["new"] is not None and row["old"] > 0.05:
            row["new/old"] = round(row["new"] / row["old"], 3)
        table[key] = row
    return {
        "compare": {name: str(path) for name, path in checkouts.items()},
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "median_over_rounds": table,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--breakdown", action="store_true", help="time every stage of a click")
    parser.add_argument("--http", action="store_true", help="also /predict over HTTP (uvicorn)")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--compare", help="another checkout: alternate runs, report ratios")
    parser.add_argument("--rounds", type=int, default=4, help="runs per checkout (--compare)")
    args = parser.parse_args(argv)
    if args.compare:
        from benchmarks.efficientsam_bench import cpu_model

        report = compare(args)
        report["machine"] = {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cpus": os.cpu_count(),
        }
        print(
            f"{'measurement (ms, median over rounds)':44s} {'old':>9s} {'new':>9s} {'new/old':>8s}"
        )
        for key, row in report["median_over_rounds"].items():
            print(
                f"{key:44s} {row['old'] if row['old'] is not None else '-':>9} "
                f"{row['new'] if row['new'] is not None else '-':>9} {row.get('new/old', ''):>8}"
            )
    else:
        report = run(args)
        _print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

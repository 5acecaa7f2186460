"""Interactive click latency through a real Label Studio 1.23.2 (median, p95).

Starts LS (cached venv, see tests/e2e/ls_harness), our backend (random-weight Ti fixture, CPU) and
a trivial backend that answers every /predict at once with a precomputed copy of what our backend
answered for that same click (the LS-only floor: LS's own request handling, the HTTP hops, the
same JSON).
Each gets its own project with the same 640x480 image; clicks alternate between the two so
machine drift hits both alike. Also measures the first click on images the backend has not seen.

    python benchmarks/bench_ls_click.py [--clicks 40] [--new-images 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "e2e" / "ls_harness"
SHARED = Path(os.environ.get("EFFICIENTSAM_SHARED_DIR", ROOT.parent / "shared"))
CHECKPOINT = SHARED / "fixtures" / "efficientsam_ti_random.pt"
IMAGE = SHARED / "fixtures" / "efficientsam_ti_reference" / "image_640x480.png"
TOKEN = "0123456789abcdef0123456789abcdef01234567"
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
</View>"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def floor_backend(port: int) -> tuple[ThreadingHTTPServer, dict]:
    """A backend that does no work: it replays ``answer["body"]`` (set before each click to what
    our backend answered for that same click, so LS handles JSON of the same size)."""
    answer = {"body": '{"results": [{"result": []}]}'}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _reply(self, body: str) -> None:
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._reply('{"status": "UP"}')

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/setup":
                self._reply('{"model_version": "floor"}')
            elif self.path == "/predict":
                self._reply(answer["body"])
            else:
                self._reply("{}")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, answer


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_project(ls: httpx.Client, backend_url: str, images: list[bytes]) -> dict:
    project = ls.post("/api/projects", json={"title": backend_url, "label_config": CONFIG}).json()
    files = [(f"f{i}", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    ls.post(f"/api/projects/{project['id']}/import", files=files).raise_for_status()
    tasks = ls.get(f"/api/tasks?project={project['id']}&page_size=100").json()
    tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
    ml = ls.post(
        "/api/ml",
        json={
            "url": backend_url,
            "project": project["id"],
            "title": "bench",
            "is_interactive": True,
        },
    )
    ml.raise_for_status()
    return {"ml": ml.json()["id"], "tasks": sorted(t["id"] for t in tasks)}


def keypoint_item(x: float, y: float) -> dict:
    return {
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.3, "labels": ["Object"], "keypointlabels": ["Object"]},
        "is_positive": True,
        "id": "kp00000001",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def click(ls: httpx.Client, project: dict, task: int, x: float, y: float) -> float:
    item = keypoint_item(x, y)
    started = time.perf_counter()
    response = ls.post(
        f"/api/ml/{project['ml']}/interactive-annotating",
        json={"task": task, "context": {"result": [item]}},
    )
    elapsed = time.perf_counter() - started
    body = response.json()
    if response.status_code != 200 or "errors" in body or not body["data"]["result"]:
        raise RuntimeError(f"click failed: {response.status_code} {str(body)[:300]}")
    return elapsed


def summary(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "n": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=40)
    parser.add_argument("--new-images", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    venv = Path(
        os.environ.get(
            "EFFICIENTSAM_LS_VENV", Path.home() / ".cache" / "efficientsam-e2e" / "ls-1.23.2"
        )
    )
    run_dir = Path(tempfile.mkdtemp(prefix="bench-ls-"))
    ls_port, our_port, floor_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "LS_VENV": str(venv),
        "RUN_DIR": str(run_dir),
        "LS_PORT": str(ls_port),
        "LS_TOKEN": TOKEN,
        "LS_FRESH": "1",
    }
    subprocess.run(["bash", str(HARNESS / "install_ls.sh")], env=env, check=True)
    subprocess.run(["bash", str(HARNESS / "start_ls.sh")], env=env, check=True)
    ls_url = f"http://127.0.0.1:{ls_port}"
    backend = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "backend",
            "--checkpoint",
            str(CHECKPOINT),
            "--host",
            "127.0.0.1",
            "--port",
            str(our_port),
            "--device",
            "cpu",
            "--log-level",
            "WARNING",
        ],
        env={**os.environ, "LABEL_STUDIO_URL": ls_url, "LABEL_STUDIO_API_KEY": TOKEN},
    )
    floor, floor_answer = floor_backend(floor_port)
    try:
        for _ in range(120):
            try:
                if httpx.get(f"http://127.0.0.1:{our_port}/health").json()["model_ready"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        picture = Image.open(IMAGE).convert("RGB")
        rng = np.random.default_rng(0)
        fresh = [
            png_bytes(
                Image.fromarray(
                    np.clip(
                        np.asarray(picture, np.int16) + rng.integers(-20, 20, (480, 640, 3)), 0, 255
                    ).astype(np.uint8)
                )
            )
            for _ in range(args.new_images)
        ]
        ls = httpx.Client(base_url=ls_url, headers={"Authorization": f"Token {TOKEN}"}, timeout=300)
        ours = make_project(ls, f"http://127.0.0.1:{our_port}", [png_bytes(picture), *fresh])
        baseline = make_project(ls, f"http://127.0.0.1:{floor_port}", [png_bytes(picture)])

        first_clicks = [click(ls, ours, task, 40, 40) for task in ours["tasks"][1:]]
        click(ls, ours, ours["tasks"][0], 50, 50)  # encode the benchmark image once
        task = ls.get(f"/api/tasks/{ours['tasks'][0]}").json()
        direct = httpx.Client(base_url=f"http://127.0.0.1:{our_port}", timeout=60)

        def replay(x: float, y: float) -> None:
            """Make the floor answer exactly what our backend answers for this click."""
            body = {
                "tasks": [task],
                "label_config": CONFIG,
                "params": {"context": {"result": [keypoint_item(x, y)]}},
            }
            floor_answer["body"] = direct.post("/predict", json=body).text

        points = rng.uniform(5, 95, (args.clicks + 5, 2))
        floor_samples, our_samples = [], []
        for index, (x, y) in enumerate(points):
            replay(x, y)
            floor_time = click(ls, baseline, baseline["tasks"][0], x, y)
            our_time = click(ls, ours, ours["tasks"][0], x, y)
            if index >= 5:  # the first 5 are warm-up
                floor_samples.append(floor_time)
                our_samples.append(our_time)
        results = {
            "floor_trivial_backend": summary(floor_samples),
            "cached_image_click": summary(our_samples),
            "first_click_new_image": summary(first_clicks),
        }
        results["cached_minus_floor_median_ms"] = round(
            results["cached_image_click"]["median_ms"]
            - results["floor_trivial_backend"]["median_ms"],
            1,
        )
        results["machine"] = f"{os.cpu_count()} CPUs, Label Studio 1.23.2 (sqlite), backend on CPU"
        print(json.dumps(results, indent=2))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        backend.terminate()
        backend.wait(timeout=30)
        floor.shutdown()
        subprocess.run(["bash", str(HARNESS / "stop_ls.sh")], env=env, check=False)


if __name__ == "__main__":
    main()

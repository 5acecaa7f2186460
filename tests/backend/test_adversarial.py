"""An adversarial corpus against a real backend process (embedded model, uvicorn on 127.0.0.1).

Every bad input gets a 4xx JSON message (or, in a batch, an entry without ``result`` that says
why; or an empty result when nothing in it is a prompt) within a few seconds; the process's
peak RSS (VmHWM) grows by less than 300 MiB over the whole corpus, and clicks are still served
afterwards. Images come from a 127.0.0.1 FileServer that is the configured LS host. (SSRF
targets and slow downloads are in the outbound-policy tests.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from PIL import Image

from tests.conftest import REFERENCE_DIR, TI_CHECKPOINT
from tests.http_fixtures import (
    BRUSH_CONFIG,
    LEGACY_TOKEN,
    FileServer,
    bomb_png,
    brush,
    keypoint,
    png_bytes,
    predict_request,
    rectangle,
)
from tests.redis_fixtures import free_port
from tests.serving.labelstudio.test_rle_decode import rle_bomb

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
IMAGE = "/data/upload/1/image.png"
LARGE = "/data/upload/1/large.png"  # 2000 x 1500
MAX_REQUEST_BYTES = 16 * 1024**2  # the corpus runs with a lower cap than the default 64 MiB
RSS_GROWTH_LIMIT = 300 * 1024**2
SECONDS_PER_REQUEST = 10.0


@pytest.fixture(scope="module")
def files():
    server = FileServer()
    server.files[IMAGE] = (REFERENCE_DIR / "image_640x480.png").read_bytes()
    server.files["/data/upload/1/text.png"] = b"this is not an image"
    server.files["/data/upload/1/empty.png"] = b""
    server.files["/data/upload/1/truncated.png"] = server.files[IMAGE][:3000]
    server.files["/data/upload/1/bomb.png"] = bomb_png(100_000, 100_000, complete=False)
    server.files["/data/upload/1/big.png"] = bomb_png(12_000, 12_000)  # 144 MP in 18 KB
    with Image.open(REFERENCE_DIR / "image_640x480.png") as image:
        large = np.asarray(image.convert("RGB").resize((2000, 1500)))
    server.files[LARGE] = png_bytes(large)
    yield server
    server.close()


@pytest.fixture(scope="module")
def backend(files, tmp_path_factory):
    """``python -m backend`` with the random-weight Ti model; yields (base URL, pid)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        PYTHONPATH=str(REPO),
        CHECKPOINT=str(TI_CHECKPOINT),
        DEVICE="cpu",
        TORCH_THREADS="1",
        HOST="127.0.0.1",
        PORT=str(port),
        LABEL_STUDIO_URL=files.url,
        LABEL_STUDIO_API_KEY=LEGACY_TOKEN,
        MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
        AUTOLABEL_MODE="boxes",
        LOG_LEVEL="WARNING",
    )
    log = (tmp_path_factory.mktemp("adversarial") / "backend.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "backend"], cwd=REPO, env=env, stdout=log, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, "the backend exited; see its log"
            assert time.monotonic() < deadline, "the backend did not become ready"
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def task(task_id: int = 1, image: object = IMAGE, **extra) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": [], "project": 1, **extra}


def click(items: list, the_task: dict | None = None, config: object = BRUSH_CONFIG) -> dict:
    return predict_request([the_task or task()], {"result": items}, config)


def kp(**value) -> dict:
    item = keypoint(10, 10)
    item["value"] = {**item["value"], **value}
    return item


def sized(item: dict, width: object, height: object = 480) -> dict:
    return {**item, "original_width": width, "original_height": height}


def brush_item(rle: object, width: int = 640, height: int = 480) -> dict:
    item = brush(np.ones((2, 2), bool))
    return {**item, "original_width": width, "original_height": height, "value": {"rle": rle}}


def rect(**value) -> dict:
    item = rectangle(10, 10, 20, 20)
    item["value"] = {**item["value"], **value}
    return item


def nested(depth: int) -> bytes:
    return b'{"tasks": ' + b"[" * depth + b"]" * depth + b"}"


STROKE = brush(np.pad(np.ones((20, 40), bool), ((100, 360), (100, 500))))["value"]["rle"]
BOXES = {"id": 7, "result": [rectangle(10, 10, 30, 30)]}


@dataclass(frozen=True)
class Case:
    name: str
    body: object  # bytes, or a JSON-able value
    # "skipped": no batch entry has a result; "empty": []; "ok": the first label; "ignored"
    expect: str = "4xx"
    route: str = "/predict"
    match: str = ""  # in the error message (or in every skipped reason)


def image_case(name: str, file: str, match: str = "image") -> Case:
    """A click on the task whose image is ``file`` on the LS host."""
    return Case(name, click([keypoint(5, 5)], task(image=f"/data/upload/1/{file}")), match=match)


CORPUS = [
    # -- the body itself
    Case("malformed JSON", b"{not json", match="malformed JSON"),
    Case("empty body", b"", match="JSON object"),
    Case("JSON array", b"[]", match="JSON object"),
    Case("JSON string", b'"tasks"', match="JSON object"),
    Case("NaN literal", b'{"tasks": [NaN]}', match="malformed JSON"),
    Case("1e999 (infinity)", b'{"tasks": [{"id": 1e999}]}', match="malformed JSON"),
    Case("invalid UTF-8", b'{"tasks": "\xff\xfe"}', match="malformed JSON"),
    Case("nested 100,000 deep", nested(100_000), match="malformed JSON"),
    Case("nested 1,020 deep", nested(1_020), match="tasks"),
    Case("1.5 million empty objects", b'{"tasks": [' + b"{}," * 1_500_000 + b"{}]}", match="JSON"),
    Case("/setup not JSON", b"<xml/>", route="/setup", match="malformed JSON"),
    Case("/webhook array", b"[1, 2]", route="/webhook", match="JSON object"),
    # -- /predict's shape
    Case("no tasks", {"label_config": BRUSH_CONFIG}, match="tasks"),
    Case("tasks an object", {"tasks": {"id": 1}}, match="tasks"),
    Case("tasks a string", {"tasks": "1,2,3"}, match="tasks"),
    Case("tasks empty", {"tasks": []}, match="tasks"),
    Case("task not an object", {"tasks": [1, 2]}, match="tasks"),
    Case("10,001 tasks", {"tasks": [{}] * 10_001}, match="at most 10000"),
    Case("no label config", {"tasks": [task()]}, match="empty label config"),
    Case("label config a list", {**click([]), "label_config": ["<View/>"]}, match="string"),
    Case(
        "label config 2 MB",
        click([], config="<View>" + " " * 2 * 1024**2 + "</View>"),
        match="longer",
    ),
    Case(
        "billion laughs",
        click(
            [],
            config='<!DOCTYPE View [<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY a{i} "{"&a;" * 10}">' for i in range(1, 2))
            + ']><View><Image name="image" value="$image"/>'
            '<BrushLabels name="t" toName="image"><Label value="&a1;"/></BrushLabels></View>',
        ),
        match="DTD",
    ),
    Case("malformed XML config", click([], config="<View><Image"), match="cannot parse"),
    Case(
        "config without image",
        click([], config="<View><Text name='t' value='$t'/></View>"),
        match="Image",
    ),
    Case("context a list", predict_request([task()], [keypoint(5, 5)]), match="context"),
    Case("result a string", predict_request([task()], {"result": "keypoint"}), match="list"),
    Case("result items not objects", click([1, "two", None]), match="object"),
    Case(
        "interactive with 2 tasks",
        predict_request([task(), task(2)], {"result": [keypoint(5, 5)]}),
        match="exactly one",
    ),
    Case(
        "5,000 keypoints", click([keypoint(i % 100, 50) for i in range(5_000)]), match="at most 500"
    ),
    # -- items: wrong types, absurd numbers
    Case("value not an object", click([{**keypoint(5, 5), "value": [5, 5]}]), match="value"),
    Case(
        "value missing",
        click([{k: v for k, v in keypoint(5, 5).items() if k != "value"}]),
        match="value",
    ),
    Case("x a string", click([kp(x="10")]), match="finite number"),
    Case("x a boolean", click([kp(x=True)]), match="finite number"),
    Case("x null", click([kp(x=None)]), match="finite number"),
    Case(
        "x a 1,010-deep list",
        orjson.dumps(click([kp(x="DEEP")])).replace(b'"DEEP"', b"[" * 1010 + b"]" * 1010),
        match="finite number",
    ),
    Case("x negative", click([kp(x=-50)]), match="outside"),
    Case("x 1e200", click([kp(x=1e200)]), match="outside"),
    Case("x 1e308", click([kp(x=1e308)]), match="finite number"),
    Case("y 101.5 %", click([kp(y=101.5)]), match="outside"),
    Case("width 0", click([sized(keypoint(5, 5), 0)]), match="original_width"),
    Case("width negative", click([sized(keypoint(5, 5), -640)]), match="original_width"),
    Case("width a float", click([sized(keypoint(5, 5), 640.5)]), match="original_width"),
    Case("width a string", click([sized(keypoint(5, 5), "640")]), match="original_width"),
    Case("width a list", click([sized(keypoint(5, 5), [640])]), match="original_width"),
    Case("width 10^12", click([sized(keypoint(5, 5), 10**12)]), match="MAX_IMAGE_PIXELS"),
    Case("sizes disagree", click([keypoint(5, 5), sized(keypoint(5, 5), 641)]), match="disagree"),
    Case("rectangle width 0", click([rect(width=0)]), match="zero"),
    Case("rectangle height negative", click([rect(height=-20)]), match="zero"),
    Case("rectangle width 1e200", click([rect(width=1e200)]), match="larger than the image"),
    Case("rectangle rotation a string", click([rect(rotation="90deg")]), match="rotation"),
    Case("rectangle outside", click([rect(x=100, y=100)]), match="outside"),
    # -- brush strokes
    Case("rle a string", click([brush_item("0,0,0")]), match="rle"),
    Case("rle empty", click([brush_item([])]), match="rle"),
    Case("rle of strings", click([brush_item(["0"] * 10)]), match="0..255"),
    Case("rle values over 255", click([brush_item([0, 0, 0, 4, 999, 1, 2, 3])]), match="0..255"),
    Case("rle truncated", click([brush_item(STROKE[: len(STROKE) // 2])]), match="middle of a run"),
    Case("rle of another size", click([brush_item(STROKE, 641)]), match="claims"),
    Case(
        "rle bomb 1 GiB for 1x1",
        click([brush_item(rle_bomb(2**30, 2**16), 1, 1)]),
        match="claims 1073741824",
    ),
    Case("empty stroke", click([brush(np.zeros((480, 640), bool))]), match="empty"),
    Case(
        "8000x8000 stroke, image 404",
        click(
            [brush_item(rle_bomb(256_000_000, 3907), 8000, 8000)],
            task(image="/data/upload/1/none.png"),
        ),
        match="404",
    ),
    # -- tasks and images
    Case(
        "data a string",
        click([keypoint(5, 5)], {"id": 1, "data": "image.png"}),
        match="'data' must be an object",
    ),
    Case("data without image", click([keypoint(5, 5)], {"id": 1, "data": {}}), match="data.image"),
    Case("image URL a number", click([keypoint(5, 5)], task(image=12)), match="data.image"),
    image_case("image 404", "none.png", "404"),
    image_case("image not an image", "text.png"),
    image_case("image empty", "empty.png"),
    image_case("image truncated", "truncated.png"),
    image_case("PNG claiming 100k x 100k", "bomb.png"),
    image_case("PNG 12000 x 12000 in 18 KB", "big.png", "limit"),
    # -- ignored input: nothing to do, an empty result
    Case("unknown item types only", click([{**keypoint(5, 5), "type": "ellipselabels"}]), "empty"),
    Case(
        "labels of the wrong type: the first label",
        predict_request(
            [
                task(10, annotations=[{"id": 7, "result": [rect(rectanglelabels={"a": 1})]}]),
                task(11, predictions=[{"id": 8, "result": [rect(rectanglelabels=5)]}]),
            ],
            None,
        ),
        "ok",
    ),
    # -- webhooks of the wrong shape: ignored (LS does not read the answer), never a 500
    Case(
        "webhook ids of every type",
        {
            "action": "ANNOTATIONS_CREATED",
            "project": {"id": 1},
            "annotation": [{"id": [1]}, {"id": "7"}, {"id": 1e300}, {"id": True}, 5, "x"],
        },
        "ignored",
        route="/webhook",
    ),
    Case(
        "webhook deletions not objects",
        {"action": "ANNOTATIONS_DELETED", "project": 1, "annotations": "1,2"},
        "ignored",
        route="/webhook",
    ),
    Case("webhook action a list", {"action": ["START_TRAINING"]}, "ignored", route="/webhook"),
    Case(
        "START_TRAINING project a list",
        {"action": "START_TRAINING", "project": [1]},
        route="/webhook",
        match="project",
    ),
    # -- batches: every bad task gets an entry without result, with the reason
    Case(
        "batch of bad tasks",
        predict_request(
            [
                {"id": 1, "data": ["x"], "annotations": [BOXES]},
                task(2, annotations=[{"id": 3, "result": [sized(rectangle(5, 5, 9, 9), 10**9)]}]),
                task(3, annotations=[{"id": 4, "result": [rect(width="wide")]}]),
                task(4, image="/data/upload/1/bomb.png", annotations=[BOXES]),
                task(5, image="/data/upload/1/truncated.png", annotations=[BOXES]),
                task(6, annotations=[{"id": 5, "result": [rect(width=0)]}]),
                task(7, annotations="none"),
                task(
                    9, annotations=[{"id": 6, "result": [{**rectangle(5, 5, 9, 9), "value": [5]}]}]
                ),
                task(12, annotations=[{"id": 9, "result": "rectangles"}]),
                task(8),
            ],
            None,
        ),
        "skipped",
    ),
]


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    body = case.body if isinstance(case.body, bytes) else orjson.dumps(case.body)
    return client.post(case.route, content=body, headers={"Content-Type": "application/json"})


def test_the_corpus_is_refused_clearly_with_bounded_memory(backend):
    url, pid = backend
    assert len(CORPUS) >= 50
    with httpx.Client(base_url=url, timeout=60) as client:
        warm = _send(client, Case("click", click([keypoint(30, 40)])))
        assert warm.status_code == 200 and warm.json()["results"][0]["result"]
        baseline = peak_rss(pid)
        failures = []
        for case in CORPUS:
            started = time.monotonic()
            response = _send(client, case)
            seconds = time.monotonic() - started
            problem = _problem(case, response, seconds)
            if problem:
                failures.append(f"{case.name}: {problem}")
        growth = peak_rss(pid) - baseline
        print(f"{len(CORPUS)} cases, peak RSS growth {growth / 1024**2:.0f} MiB")
        after = _send(client, Case("click", click([keypoint(60, 60)])))
    assert not failures, "\n".join(failures)
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / 1024**2:.0f} MiB"
    assert after.status_code == 200 and after.json()["results"][0]["result"]


def _problem(case: Case, response: httpx.Response, seconds: float) -> str | None:
    if seconds > SECONDS_PER_REQUEST:
        return f"took {seconds:.1f} s"
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}, not JSON: {response.text[:200]}"
    if case.expect == "4xx":
        if not 400 <= response.status_code < 500 or "error" not in body:
            return f"HTTP {response.status_code}: {str(body)[:300]}"
        if case.match not in body["error"]:
            return f"message {body['error'][:300]!r} lacks {case.match!r}"
    elif case.expect == "skipped":
        entries = body.get("results") or []
        if response.status_code != 200 or not entries:
            return f"HTTP {response.status_code}: {str(body)[:300]}"
        if any("result" in entry or not entry.get("skipped") for entry in entries):
            return f"an entry has a result or no reason: {str(entries)[:300]}"
    elif case.expect == "ignored":
        if response.status_code != 200 or body.get("status") != "ignored":
            return f"HTTP {response.status_code}: {str(body)[:300]}"
    elif case.expect == "ok":
        labels = [r["value"].get("brushlabels") for e in body["results"] for r in e["result"]]
        if response.status_code != 200 or not labels or set(map(tuple, labels)) != {("Object",)}:
            return f"HTTP {response.status_code}: {str(body)[:300]}"
    elif response.status_code != 200 or body["results"][0]["result"] != []:
        return f"HTTP {response.status_code}: {str(body)[:300]}"
    return None


def _raw(url: str, request: bytes, body_chunks: int = 0) -> bytes:
    """Send ``request`` (headers) and up to ``body_chunks`` MiB of body; the server's answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(request)
        try:
            for _ in range(body_chunks):
                sock.sendall(b"1\r\n \r\n" if b"chunked" in request else b" " * 1024**2)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b"}" in answer:
                break
        return answer


def test_a_declared_length_over_the_cap_is_refused_before_reading(backend):
    url, _ = backend
    started = time.monotonic()
    answer = _raw(
        url,
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000000\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"MAX_REQUEST_BYTES" in answer
    assert time.monotonic() - started < 5


def test_a_chunked_body_is_cut_at_the_cap(backend):
    """No Content-Length: the server reads up to the cap and answers 413 (1 GiB would follow)."""
    url, pid = backend
    before = peak_rss(pid)
    body = iter([b" " * 1024**2] * 1024)  # httpx streams an iterator chunked
    with httpx.Client(base_url=url, timeout=60) as client:
        response = client.post("/predict", content=body)
    assert response.status_code == 413 and "MAX_REQUEST_BYTES" in response.json()["error"]
    assert peak_rss(pid) - before < 4 * MAX_REQUEST_BYTES


def test_many_rectangles_on_a_large_image_are_decoded_in_chunks(backend):
    """60 rectangles on a 2000 x 1500 image: all at once, the decoder's full-size logits and
    masks took 60 x 3 MP x 5 bytes (~900 MB); in chunks of 16 MP of masks, a few dozen MB.
    (Bitmask output: the random-weight model's ragged masks are 1.5 MB of brush RLE each.)"""
    url, pid = backend
    boxes = [
        rectangle(1 + 9.5 * (i % 10), 1 + 16 * (i // 10), 8, 14, width=2000, height=1500)
        for i in range(60)
    ]
    the_task = task(1, LARGE, annotations=[{"id": 1, "result": boxes}])
    config = BRUSH_CONFIG.replace("BrushLabels", "BitmaskLabels")
    warm_task = task(1, LARGE, annotations=[{"id": 1, "result": boxes[:1]}])
    with httpx.Client(base_url=url, timeout=120) as client:
        warm = client.post("/predict", content=orjson.dumps(predict_request([warm_task], None)))
        assert warm.status_code == 200  # the image's download, decode and embedding
        before = peak_rss(pid)
        response = client.post(
            "/predict", content=orjson.dumps(predict_request([the_task], None, config))
        )
    growth = peak_rss(pid) - before
    assert response.status_code == 200, response.text[:300]
    (entry,) = response.json()["results"]
    assert len(entry["result"]) == 60
    assert growth < RSS_GROWTH_LIMIT, f"peak RSS grew by {growth / 1024**2:.0f} MiB"
    print(f"60 rectangles on 2000 x 1500: peak RSS growth {growth / 1024**2:.0f} MiB")

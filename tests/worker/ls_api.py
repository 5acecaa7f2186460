"""A stand-in for the parts of Label Studio's API that a fine-tune reads, on 127.0.0.1.

``GET /api/projects/<id>/`` (the label config), ``GET /api/tasks/?project=&fields=&page=&page_size=``
(Django REST framework's page-number pagination: ``{"tasks", "total", ...}``, 404 past the last
page; ``fields=all`` with annotations and predictions, otherwise neither, as LS 1.23's
``TaskListAPI`` does), ``GET /api/tasks/<id>/annotations/`` and files under ``/data/``. Every
request needs ``Token <LEGACY_TOKEN>``. Records each request's path and the bytes it answered;
``failures[path prefix] = n`` answers the next n matching requests with 500 (-1: all of them).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from tests.http_fixtures import LEGACY_TOKEN


class LabelStudioApiServer:
    def __init__(self) -> None:
        self.label_configs: dict[int, str] = {}
        self.tasks: list[dict] = []  # with "project", "data", "annotations", "predictions"
        self.files: dict[str, bytes] = {}
        self.failures: dict[str, int] = {}
        self.requests: list[tuple[str, int]] = []  # (path with query, bytes answered)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                with server._lock:
                    server.requests.append((self.path, len(body)))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, value) -> None:
                self._send(status, json.dumps(value).encode(), "application/json")

            def do_GET(self):
                url = urlsplit(self.path)
                if self.headers.get("Authorization") != f"Token {LEGACY_TOKEN}":
                    return self._json(
                        401, {"detail": "Authentication credentials were not provided."}
                    )
                if server._fail(url.path):
                    return self._json(500, {"detail": "server error"})
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                if match := re.fullmatch(r"/api/projects/(\d+)/?", url.path):
                    project = int(match[1])
                    if project not in server.label_configs:
                        return self._json(404, {"detail": "Not found."})
                    return self._json(
                        200, {"id": project, "label_config": server.label_configs[project]}
                    )
                if url.path.rstrip("/") == "/api/tasks":
                    return self._json(*server._task_page(query))
                if match := re.fullmatch(r"/api/tasks/(\d+)/annotations/?", url.path):
                    task = server._task(int(match[1]))
                    if task is None:
                        return self._json(404, {"detail": "Not found."})
                    return self._json(200, task.get("annotations") or [])
                if url.path in server.files:
                    return self._send(200, server.files[url.path], "image/png")
                return self._json(404, {"detail": "Not found."})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _fail(self, path: str) -> bool:
        with self._lock:
            for prefix, left in self.failures.items():
                if path.startswith(prefix) and left != 0:
                    self.failures[prefix] = left - 1 if left > 0 else left
                    return True
        return False

    def _task(self, task_id: int) -> dict | None:
        return next((t for t in self.tasks if t["id"] == task_id), None)

    def _task_page(self, query: dict) -> tuple[int, dict]:
        tasks = [t for t in self.tasks if str(t.get("project")) == query.get("project")]
        page, size = int(query.get("page") or 1), int(query.get("page_size") or 100)
        chosen = tasks[(page - 1) * size : page * size]
        if page > 1 and not chosen:
            return 404, {"detail": "Invalid page."}
        shown = []
        for task in chosen:
            annotations = task.get("annotations") or []
            row = {
                **{k: v for k, v in task.items() if k not in ("annotations", "predictions")},
                "total_annotations": sum(not a.get("was_cancelled") for a in annotations),
                "cancelled_annotations": sum(bool(a.get("was_cancelled")) for a in annotations),
                "total_predictions": len(task.get("predictions") or []),
            }
            if query.get("fields") == "all":
                row["annotations"] = annotations
                row["predictions"] = task.get("predictions") or []
            shown.append(row)
        return 200, {
            "tasks": shown,
            "total": len(tasks),
            "total_annotations": sum(r["total_annotations"] for r in shown),
            "total_predictions": sum(r["total_predictions"] for r in shown),
        }

    def answered(self, prefix: str) -> list[tuple[str, int]]:
        with self._lock:
            return [r for r in self.requests if r[0].startswith(prefix)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

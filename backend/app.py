"""The HTTP app: Label Studio's ML-backend protocol on top of a SegmentationService."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import time

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from backend.metrics import Metrics
from backend.service import SegmentationService, ServiceError
from serving.settings import Settings

logger = logging.getLogger(__name__)


class FastJSONResponse(JSONResponse):
    """orjson: ~10x faster than json for the long integer lists of brush RLE masks."""

    def render(self, content: object) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(message: str, status: int) -> JSONResponse:
    return FastJSONResponse({"error": message, "status": status}, status_code=status)


CONTROL_PATHS = ("/setup", "/webhook")  # refusals there are logged with the caller's address


def client_address(scope: Scope) -> str | None:
    """The caller's IP address (the proxy's, behind one)."""
    client = scope.get("client")
    return client[0] if client else None


class BasicAuthMiddleware:
    """HTTP basic auth on every route (constant-time comparison), when configured."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self._expected = f"{user}:{password}".encode()

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value[:6].lower() == b"basic ":
                try:
                    supplied = base64.b64decode(value[6:].strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                return hmac.compare_digest(supplied, self._expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        if scope.get("path") in CONTROL_PATHS:
            logger.warning(
                "refused %s from %s: no valid basic auth", scope["path"], client_address(scope)
            )
        response = JSONResponse(
            {"error": "authentication required", "status": 401},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="efficientsam"'},
        )
        await response(scope, receive, send)


async def _json_body(request: Request, settings: Settings) -> dict:
    """The request's JSON object, read at most ``MAX_REQUEST_BYTES`` far: a larger
    ``Content-Length`` is refused before reading, a body without one (chunked) when it passes
    the limit (413); so is one with more than ``MAX_JSON_CONTAINERS`` objects and arrays."""
    limit = settings.max_request_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ServiceError("invalid Content-Length header", 400)
        if int(declared) > limit:
            raise ServiceError(_too_large(limit), 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServiceError(_too_large(limit), 413)
    containers = settings.max_json_containers
    if body.count(b"{") + body.count(b"[") > containers:  # an upper bound (strings too)
        raise ServiceError(
            f"request body has more than {containers} JSON objects and arrays "
            "(MAX_JSON_CONTAINERS)",
            413,
        )
    try:
        payload = orjson.loads(body or b"null")
    except orjson.JSONDecodeError as error:
        raise ServiceError(f"malformed JSON: {error}", 400) from error
    if not isinstance(payload, dict):
        raise ServiceError("the request body must be a JSON object", 400)
    return payload


def _too_large(limit: int) -> str:
    return f"request body is larger than {limit} bytes (MAX_REQUEST_BYTES)"


def create_app(settings: Settings, service: SegmentationService | None = None) -> Starlette:
    """The ASGI app; builds nothing heavy. Its lifespan creates the service (the transport: the
    model in this process, or the Redis queues; LS clients) unless one is given, starts it and
    closes it at shutdown. Routes reach it as ``app.state.service``."""
    metrics = service.metrics if service is not None else Metrics()

    def current(request: Request) -> SegmentationService:
        return request.app.state.service

    async def health(request: Request) -> Response:
        body, status = await run_in_threadpool(current(request).health)
        return FastJSONResponse(body, status_code=status)

    async def setup(request: Request) -> Response:
        payload = await _json_body(request, settings)
        source = client_address(request.scope)
        return FastJSONResponse(await run_in_threadpool(current(request).setup, payload, source))

    async def predict(request: Request) -> Response:
        payload = await _json_body(request, settings)
        return FastJSONResponse(await run_in_threadpool(current(request).predict, payload))

    async def webhook(request: Request) -> Response:
        payload = await _json_body(request, settings)
        source = client_address(request.scope)
        body, status = await run_in_threadpool(current(request).webhook, payload, source)
        return FastJSONResponse(body, status_code=status)

    async def versions(request: Request) -> Response:
        project = request.query_params.get("project")
        return FastJSONResponse(await run_in_threadpool(current(request).versions, project))

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    def timed(route: str, endpoint):
        async def wrapper(request: Request) -> Response:
            started = time.perf_counter()
            try:
                response = await endpoint(request)
            except ServiceError as error:
                response = error_response(str(error), error.status)
            except Exception:  # never a traceback to LS; the log has it
                logger.exception("%s failed", route)
                response = error_response("internal error; see the backend log", 500)
            metrics.request_seconds.labels(route, str(response.status_code)).observe(
                time.perf_counter() - started
            )
            return response

        return wrapper

    routes = [
        Route("/", timed("/health", health), methods=["GET"]),
        Route("/health", timed("/health", health), methods=["GET"]),
        Route("/setup", timed("/setup", setup), methods=["POST"]),
        Route("/predict", timed("/predict", predict), methods=["POST"]),
        Route("/webhook", timed("/webhook", webhook), methods=["POST"]),
        Route("/versions", timed("/versions", versions), methods=["GET", "POST"]),
        Route("/metrics", timed("/metrics", metrics_route), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        started = time.perf_counter()
        # reads the checkpoint (embedded) or connects to Redis: off the event loop
        resource = service or await run_in_threadpool(SegmentationService, settings, metrics)
        app.state.service = resource
        resource.start()
        logger.info(
            "%s transport ready in %.2f s (%s)",
            resource.transport.name,
            time.perf_counter() - started,
            "basic auth on" if settings.basic_auth_enabled else "no auth",
        )
        try:
            yield
        finally:
            resource.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    if settings.basic_auth_enabled:
        app.add_middleware(
            BasicAuthMiddleware, user=settings.basic_auth_user, password=settings.basic_auth_pass
        )
    app.state.service = None  # set by the lifespan
    app.state.settings = settings
    return app

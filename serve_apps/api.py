"""The HTTP face of one use-case: a FastAPI app over an :class:`~serve_apps.ingress.IngressCore`.

``build_api(core)`` is what each ingress replica serves (``UseCaseIngress`` returns it from
``__serve_build_asgi_app__``) and what the unit tests drive directly, without Ray.

Every request passes :class:`Guard` first, a plain ASGI middleware that

- gives it a request id (``X-Request-ID`` header, which Serve's proxy sets, else a new one);
- applies the route's body limit *before* anything parses the body: a ``Content-Length``
  above it, or a chunked body that grows past it, is a 413 and the rest is never read;
- turns any uncaught exception into a JSON 500;
- counts every response in ``unirank_requests{route, status}`` and every error response in
  ``unirank_errors{route, kind}`` (the kind the handler named, else ``http_<status>``), and
  logs it with ``task_type``, ``route`` and ``request_id``.

Every error body is an :class:`~serve_apps.schemas.ErrorBody` (summary, the first
``MAX_FIELD_ERRORS`` field errors, their total count, the request id).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.schemas import (
    MAX_FIELD_ERRORS,
    ErrorBody,
    Event,
    EventAck,
    ProfileAck,
    ProfileUpdate,
    RankRequest,
    RankResponse,
)

if TYPE_CHECKING:
    from serve_apps.ingress import IngressCore

logger = logging.getLogger("ray.serve")
ROUTES = ("/rank", "/events", "/profile", "/version", "/healthz", "/docs", "/openapi.json")
MAX_REQUEST_ID = 128


class RequestError(Exception):
    """A 4xx answer naming the offending field."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class Unavailable(Exception):
    """A dependency (ranker, feature store) failed and there is no fallback: a 503."""

    def __init__(self, reason: str, message: str | None = None):
        super().__init__(message or reason)
        self.reason, self.message = reason, message or reason


def error_response(
    status: int, message: str, fields: list[dict], request_id: str | None, total: int | None = None
) -> JSONResponse:
    """An ErrorBody with at most MAX_FIELD_ERRORS fields; ``total`` = how many there were."""
    total = len(fields) if total is None else total
    if total > MAX_FIELD_ERRORS:
        message = f"{message}: {total} field errors, the first {MAX_FIELD_ERRORS} listed"
    body = ErrorBody(
        error=message, fields=fields[:MAX_FIELD_ERRORS], error_count=total, request_id=request_id
    )
    return JSONResponse(status_code=status, content=body.model_dump())


def fail(request: Request, status: int, kind: str, message: str, fields: list[dict] | None = None):
    """An error response for this request, its kind noted for the Guard's metrics and log."""
    request.state.error_kind, request.state.error_message = kind, message
    return error_response(status, message, fields or [], request.state.request_id)


def route_of(scope: dict) -> str:
    """The route tag: the path under the application's prefix, ``other`` if unknown (bounded
    cardinality whatever clients send)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path if path in ROUTES else "other"


def _request_id(scope: dict) -> str:
    for k, v in scope.get("headers", ()):
        if k == b"x-request-id" and (text := _printable_id(v.decode("latin-1"))) is not None:
            return text
    return uuid.uuid4().hex


class Guard:
    """Request id, body limit before parsing, JSON 500s, per-route metrics and logs."""

    def __init__(self, app, core: IngressCore):
        self.app, self.core = app, core

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        state["request_id"] = _request_id(scope)
        route = route_of(scope)
        status = {"code": 500, "started": False}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        async def reply(code: int, kind: str, message: str, field: str | None = None):
            state["error_kind"], state["error_message"] = kind, message
            fields = [{"field": field, "message": message}] if field else []
            resp = error_response(code, message, fields, state["request_id"])
            await resp(scope, receive, send_status)

        try:
            limit = self.core.body_limit(route)
            body, problem = await _read_body(scope, receive, limit)
            if problem is not None:
                await reply(*problem)
            else:
                await self.app(scope, _replay(body, receive), send_status)
        except Exception as exc:  # noqa: BLE001 - a JSON 500, logged and counted
            logger.exception(
                "task_type=%s route=%s request_id=%s internal error",
                self.core.name,
                route,
                state["request_id"],
            )
            if not status["started"]:
                await reply(500, "internal", f"internal error: {type(exc).__name__}")
        finally:
            self.core.record(
                route,
                status["code"],
                state.get("request_id", ""),
                (time.perf_counter() - t0) * 1e3,
                state.get("error_kind"),
                state.get("error_message"),
            )


async def _read_body(scope, receive, limit: int) -> tuple[bytes, tuple | None]:
    """The whole body, or a (status, kind, message, field) problem as soon as it exceeds
    ``limit`` (from Content-Length, else while the chunks arrive)."""
    for k, v in scope.get("headers", ()):
        if k == b"content-length":
            if not v.isdigit():
                return b"", (400, "bad_request", "Content-Length is not a number", "body")
            if int(v) > limit:
                return b"", (
                    413,
                    "body_too_large",
                    f"body is {int(v)} bytes, limit {limit}",
                    "body",
                )
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", (400, "disconnected", "client disconnected", None)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", (413, "body_too_large", f"body exceeds the limit of {limit} bytes", "body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when the client goes away

    return replay


def _validation_fields(exc: RequestValidationError) -> list[dict]:
    fields = []
    for e in exc.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            at = f" at position {loc[0]}" if loc else ""
            err = (e.get("ctx") or {}).get("error", "")
            fields.append({"field": "body", "message": f"invalid JSON{at}: {err}".rstrip(": ")})
        else:
            fields.append({"field": ".".join(loc) or "body", "message": e.get("msg", "invalid")})
    return fields


def _printable_id(text: object) -> str | None:
    ok = isinstance(text, str) and 0 < len(text) <= MAX_REQUEST_ID
    return text if ok and text.isascii() and text.isprintable() else None


def _body_request_id(body: Any) -> str | None:
    return _printable_id(body.get("request_id") if isinstance(body, dict) else None)


def build_api(core: IngressCore) -> FastAPI:
    """The use-case's FastAPI app (routes close over ``core``)."""
    api = FastAPI(
        title="unirank ranking API",
        description="One multi-task ranking model; one application per use-case.",
        version="1",
    )
    api.add_middleware(Guard, core=core)
    errors = {413: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        rid = _body_request_id(exc.body)
        if rid is not None:
            request.state.request_id = rid
        fields = _validation_fields(exc)
        request.state.error_kind = "validation"
        request.state.error_message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:3])
        return error_response(422, "invalid request", fields, request.state.request_id)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return fail(request, exc.status_code, f"http_{exc.status_code}", str(exc.detail))

    @api.get("/healthz")
    async def healthz() -> dict:
        return await core.healthz()

    @api.get("/version", responses={503: {"model": ErrorBody}})
    async def version(request: Request):
        try:
            return await core.version()
        except Exception as exc:  # noqa: BLE001 - the ranker is unreachable: say so, as JSON
            logger.warning("task_type=%s /version failed: %r", core.name, exc)
            return fail(request, 503, "ranker_unavailable", f"ranker unavailable: {exc!r}"[:300])

    @api.post("/events", response_model=EventAck, responses=errors)
    async def events(event: Event, request: Request):
        try:
            return await core.events(event)
        except RequestError as exc:
            fields = [{"field": exc.field, "message": exc.message}] if exc.field else []
            return fail(request, exc.status, "validation", exc.message, fields)
        except Unavailable as exc:
            return fail(request, 503, exc.reason, exc.message)

    @api.post("/profile", response_model=ProfileAck, responses=errors)
    async def profile(update: ProfileUpdate, request: Request):
        try:
            return await core.put_profile(update)
        except Unavailable as exc:
            return fail(request, 503, exc.reason, exc.message)

    @api.post("/rank", response_model=RankResponse, responses=errors)
    async def rank(req: RankRequest, request: Request):
        rid = req.request_id or request.state.request_id
        request.state.request_id = rid
        try:
            return await core.rank(req, rid)
        except RequestError as exc:
            fields = [{"field": exc.field, "message": exc.message}] if exc.field else []
            return fail(request, exc.status, "validation", exc.message, fields)
        except Unavailable as exc:
            return fail(request, 503, exc.reason, exc.message)

    return api

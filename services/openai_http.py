"""The HTTP plumbing of the OpenAI door: per-request context (auth, request id, log line), error bodies, and
the uvicorn server embedded in the engine's event loop.

Why a pure ASGI middleware for auth: it runs in the request's own task before routing, so the context
variables it sets (``principal_var``, ``token_var``, ``request_id_var``) are seen by the endpoint, by the
generation front door and by a streaming body alike — the same contract the gRPC interceptors give servicers.
Why our own socket: binding it ourselves gives the real port at once (``:0`` in tests) and a typed
``BIND_FAILED`` instead of uvicorn's ``sys.exit`` inside a task; and uvicorn must not take over SIGTERM/SIGINT,
which belong to the engine's drain (``run_until_signal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.registry.errors import FailedPrecondition, InvalidArgument, LoraplexError, NotFound, Unauthenticated
from loraplex.services.auth import TokenAuthority, principal_var, token_var
from loraplex.services.errors import http_error
from loraplex.services.logs import new_request_id, request_id_var
from loraplex.services.server import MAX_MESSAGE_BYTES, check_exposure

log = logging.getLogger("loraplex.http")

PUBLIC_PATHS = frozenset({"/health"})  # probes work without a token, like gRPC health
MAX_REQUEST_ID = 128
MAX_BODY_BYTES = MAX_MESSAGE_BYTES  # the same cap as a gRPC message


def error_response(exc: BaseException, param: str | None = None) -> JSONResponse:
    """The OpenAI error body and HTTP status for ``exc`` (``INTERNAL`` ones are logged with their traceback)."""
    request_id = request_id_var.get()
    status, body = http_error(exc, request_id, param)
    if status >= 500 and not isinstance(exc, LoraplexError):
        log.error("unhandled error", exc_info=exc)
    headers = {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Domain errors, body validation (FastAPI's 422 becomes OpenAI's 400) and routing errors as OpenAI bodies."""

    async def domain(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(location) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid request body')}"
        return error_response(InvalidArgument(message), param)

    async def routing(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        return plain_error(exc.status_code, str(exc.detail), exc.headers)

    app.add_exception_handler(LoraplexError, domain)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(StarletteHTTPException, routing)


class RequestContext:
    """ASGI middleware: request id (honoured and echoed), bearer auth, one structured log line per request."""

    def __init__(self, app: ASGIApp, authority: TokenAuthority) -> None:
        self.app = app
        self.authority = authority

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        request_id = _request_id(headers)
        reset_id = request_id_var.set(request_id)
        started = time.perf_counter()
        status_box = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            if scope["path"] not in PUBLIC_PATHS:
                try:
                    self._authenticate(headers)
                except Unauthenticated as exc:
                    await error_response(exc)(scope, receive, send_with_id)
                    return
            declared = next((v for k, v in headers if k == "content-length"), "0")
            if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                await _too_large()(scope, receive, send_with_id)
                return
            try:
                await self.app(scope, _limited(receive), send_with_id)
            except Exception as exc:  # a bug: INTERNAL with the request id, traceback logged, details not sent
                if status_box[0]:
                    raise  # the response already started; the server closes the connection
                await error_response(exc)(scope, receive, send_with_id)
        finally:
            log.info(
                "http done",
                extra={
                    "method": scope.get("method", "?"),
                    "path": scope.get("path", "?"),
                    "status": status_box[0],
                    "ms": round((time.perf_counter() - started) * 1e3, 2),
                },
            )
            request_id_var.reset(reset_id)

    def _authenticate(self, headers: list[tuple[str, str]]) -> None:
        """The same rules as gRPC (one ``TokenAuthority``; several Authorization headers are ambiguous)."""
        values = [v for k, v in headers if k == "authorization"]
        principal_var.set(self.authority.authenticate_headers(values))
        authorization = values[0] if values else None
        token_var.set(authorization.partition(" ")[2].strip() if authorization else "")


def plain_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An OpenAI error body for HTTP-level failures (wrong method, body too large) outside the domain table."""
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "INVALID_ARGUMENT"}}
    return JSONResponse(body, status_code=status, headers=headers)


def _too_large() -> JSONResponse:
    return plain_error(413, f"request body over {MAX_BODY_BYTES} bytes")


def _limited(receive: Receive) -> Receive:
    """``receive`` that refuses (413) a body growing past ``MAX_BODY_BYTES`` without a Content-Length to check."""
    seen = [0]

    async def wrapped() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > MAX_BODY_BYTES:
                raise StarletteHTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
        return message

    return wrapped


def _request_id(headers: list[tuple[str, str]]) -> str:
    """The caller's ``x-request-id`` when it is one sane value, else a fresh one (as the gRPC interceptor does)."""
    values = [v for k, v in headers if k == "x-request-id"]
    if len(values) == 1 and 0 < len(values[0]) <= MAX_REQUEST_ID and values[0].isprintable():
        return values[0]
    return new_request_id()


def json_body(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status_code=status, media_type="application/json")


# ---- the embedded server ---------------------------------------------------------------------------------
class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Leave SIGTERM/SIGINT to the engine: it drains both doors in order (``run_until_signal``)."""
        yield


class HttpServer:
    """uvicorn serving one ASGI app as a task in the running loop, on a socket bound up front."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self._server = server
        self._task = task
        self.port = port

    @classmethod
    async def start(cls, app: ASGIApp, listen: str, authority: TokenAuthority, *, insecure: bool) -> HttpServer:
        check_exposure(listen, authority, insecure)
        sock = bind(listen)
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # loraplex configures logging; uvicorn must not replace it
            access_log=False,  # RequestContext logs one structured line per request
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="loraplex-http")
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # raises what stopped it
                raise FailedPrecondition(f"HTTP server on {listen} stopped during start-up", reason="BIND_FAILED")
            await asyncio.sleep(0.01)
        return cls(server, task, sock.getsockname()[1])

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight responses finish within ``grace``, then cancel the rest (aborting them)."""
        if self._task.done():
            return
        self._server.config.timeout_graceful_shutdown = max(1, round(grace))
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace + 5.0)
        except TimeoutError:
            log.error("HTTP server did not stop in time; cancelling it")
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def bind(listen: str) -> socket.socket:
    """A listening TCP socket for ``HOST:PORT`` (``[v6]:PORT`` too); ``BIND_FAILED`` when it cannot be bound."""
    host, sep, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or not host:
        raise InvalidArgument(f"--http-listen must be HOST:PORT, got {listen!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port_text)))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(f"cannot bind {listen}: {exc}", reason="BIND_FAILED") from exc
    return sock

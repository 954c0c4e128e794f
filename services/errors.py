"""Domain errors → gRPC status with a ``google.rpc.ErrorInfo``: the one table and the one interceptor.

Why an interceptor: every RPC, unary or streaming, of both services gets the same translation, request-id
logging and timing without a decorator on each method. Domain code raises ``loraplex.registry.errors`` types;
anything else is a bug and becomes INTERNAL with its traceback logged (never leaked to the client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from loraplex.registry import errors
from loraplex.services.logs import new_request_id, request_id_var

log = logging.getLogger("loraplex.rpc")

ERROR_DOMAIN = "loraplex.dev"


def status_code_for(exc: errors.LoraplexError) -> grpc.StatusCode:
    """The status each domain class declares in its ``code`` (see ``loraplex.registry.errors``)."""
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


def to_rpc_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    """Build the rich ``google.rpc.Status`` sent in the ``grpc-status-details-bin`` trailer."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    numeric = getattr(code_pb2, code.name)
    return status_pb2.Status(code=numeric, message=message, details=[detail])


def describe(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str, str, dict[str, str]]:
    """(status code, message, ErrorInfo reason, ErrorInfo metadata) for any exception.

    Only an error's public ``message`` is sent. Its ``detail`` (a driver's or botocore's text, naming database
    hosts, DSNs, S3 URLs) stays in the server log (``log_detail``); the message then carries the request id so
    an operator can find that log line.
    """
    if isinstance(exc, errors.LoraplexError):
        meta = dict(exc.metadata)
        meta.setdefault("request_id", request_id)
        message = f"{exc.message} (request id {request_id})" if exc.detail else exc.message
        return status_code_for(exc), message, exc.reason, meta
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (request id {request_id})",
        "INTERNAL",
        {"request_id": request_id},
    )


def log_detail(exc: BaseException, where: str) -> None:
    """Log what ``describe`` keeps from the caller (the current request id is on the line)."""
    detail = getattr(exc, "detail", "")
    if detail:
        log.warning("%s failed: %s", where, detail, extra={"error": type(exc).__name__})


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """Abort the RPC with the mapped status; raises (as ``context.abort`` does)."""
    from grpc_status import rpc_status

    request_id = request_id_var.get()
    code, message, reason, meta = describe(exc, request_id)
    status = rpc_status.to_status(to_rpc_status(code, message, reason, meta))
    await context.abort(status.code, status.details, status.trailing_metadata)


class InFlight:
    """The RPC handler tasks in progress, so a drain can wait for them and then end the rest with a typed error."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ending = False

    def __len__(self) -> int:
        return len(self.tasks)

    async def wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def end_all(self) -> int:
        """Cancel every handler still running; the interceptor turns that into UNAVAILABLE ``SHUTTING_DOWN``."""
        self.ending = True
        for task in list(self.tasks):
            task.cancel()
        return len(self.tasks)


def shutting_down_error() -> errors.Unavailable:
    return errors.Unavailable("the server is shutting down; retry on another replica", reason="SHUTTING_DOWN")


def _method_name(details: grpc.HandlerCallDetails) -> str:
    return str(getattr(details, "method", "?"))


def _request_id_from(details: grpc.HandlerCallDetails) -> str:
    for key, value in getattr(details, "invocation_metadata", None) or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return new_request_id()


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Maps exceptions to statuses and logs one structured line per RPC (method, code, ms, request id).

    Every handler runs as a tracked task of ``in_flight``: a drain that cancels it gets UNAVAILABLE
    ``SHUTTING_DOWN`` sent to the client instead of a bare cancellation.
    """

    def __init__(self, in_flight: InFlight | None = None) -> None:
        self.in_flight = in_flight if in_flight is not None else InFlight()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = _method_name(handler_call_details)
        request_id = _request_id_from(handler_call_details)
        if handler.unary_unary or handler.stream_unary:
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                token = request_id_var.set(request_id)
                started = time.perf_counter()
                task = self._track()
                try:
                    result = await inner(request, context)
                    _log_done(method, "OK", started)
                    return result
                except asyncio.CancelledError:
                    if not self._ending(task):
                        raise
                    await _fail(method, shutting_down_error(), context, started)
                except Exception as exc:
                    await _fail(method, exc, context, started)
                finally:
                    self.in_flight.tasks.discard(task)
                    request_id_var.reset(token)

            factory = (
                grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
            )
            return factory(unary, handler.request_deserializer, handler.response_serializer)

        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            token = request_id_var.set(request_id)
            started = time.perf_counter()
            task = self._track()
            try:
                produced = inner_stream(request, context)
                if hasattr(produced, "__aiter__"):
                    async for item in produced:
                        yield item
                else:  # a handler that streams with ``context.write`` (e.g. health Watch)
                    await produced
                _log_done(method, "OK", started)
            except asyncio.CancelledError:
                if not self._ending(task):
                    raise
                await _fail(method, shutting_down_error(), context, started)
            except Exception as exc:
                await _fail(method, exc, context, started)
            finally:
                self.in_flight.tasks.discard(task)
                request_id_var.reset(token)

        factory = (
            grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
        )
        return factory(streaming, handler.request_deserializer, handler.response_serializer)


    def _track(self) -> asyncio.Task[Any] | None:
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.tasks.add(task)
        return task

    def _ending(self, task: asyncio.Task[Any] | None) -> bool:
        """A cancellation that came from the drain (not from the client going away): answer it, typed."""
        if not self.in_flight.ending or task is None:
            return False
        task.uncancel()
        return True


def _log_done(method: str, code: str, started: float, reason: str = "") -> None:
    log.info(
        "rpc done",
        extra={"method": method, "code": code, "reason": reason, "ms": round((time.perf_counter() - started) * 1e3, 2)},
    )


async def _fail(method: str, exc: Exception, context: grpc.aio.ServicerContext[Any, Any], started: float) -> None:
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    if _is_abort(exc):
        _log_done(method, str(context.code() or "ABORTED"), started)
        raise exc
    code, _, reason, _ = describe(exc, request_id_var.get())
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", method, exc_info=exc)
    log_detail(exc, method)
    _log_done(method, code.name, started, reason)
    await abort_with(context, exc)


def _is_abort(exc: BaseException) -> bool:
    """``context.abort`` raises an internal exception type; let it pass through untouched."""
    return type(exc).__name__ == "AbortError" or isinstance(exc, grpc.RpcError)


# The HTTP door (OpenAI-compatible API) maps the same domain errors by their gRPC code.
HTTP_STATUS_FOR_CODE: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
}
_OPENAI_ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
}


def http_error(exc: BaseException, request_id: str, param: str | None = None) -> tuple[int, dict[str, object]]:
    """(HTTP status, OpenAI error body) for any exception, from the same table as the gRPC statuses.

    ``code`` is the ErrorInfo reason, so HTTP and gRPC clients see the same machine-readable cause.
    """
    code, message, reason, meta = describe(exc, request_id)
    log_detail(exc, "HTTP request")
    status = HTTP_STATUS_FOR_CODE.get(code.name, 500)
    error_type = _OPENAI_ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    field = param if param is not None else meta.get("field")
    return status, {"error": {"message": message, "type": error_type, "param": field, "code": reason}}

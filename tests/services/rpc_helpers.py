"""Helpers for asserting on gRPC failures: status code, ErrorInfo reason and domain."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]


def failure_of(exc: grpc.aio.AioRpcError) -> RpcFailure:
    reason = domain = ""
    metadata: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
    return RpcFailure(exc.code(), exc.details() or "", reason, domain, metadata)


async def expect_failure(call: Awaitable[Any], code: grpc.StatusCode, reason: str | None = None) -> RpcFailure:
    """Await ``call``; it must fail with ``code`` (and ``reason``, when given) and a loraplex ErrorInfo."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        failure = failure_of(exc)
    else:
        raise AssertionError(f"expected {code.name}, but the call succeeded")
    assert failure.code == code, f"expected {code.name}, got {failure.code.name}: {failure.message}"
    assert failure.domain == "loraplex.dev", f"no loraplex ErrorInfo on {failure}"
    assert failure.reason and failure.reason == failure.reason.upper(), failure
    if reason is not None:
        assert failure.reason == reason, f"expected reason {reason}, got {failure.reason}: {failure.message}"
    return failure

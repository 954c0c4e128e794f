"""Bearer tokens bound to namespaces and scopes, checked by one interceptor.

A tokens file (JSON) lists who may do what::

    {"tokens": [{"name": "ci", "token": "s3cret", "namespaces": ["acme"], "scopes": ["read", "write"]},
                {"name": "ops", "sha256": "<hex of the token>", "namespaces": ["*"], "scopes": ["admin"]}]}

Scopes nest: admin ⊇ write ⊇ read. ``*`` grants every namespace. With no tokens configured, auth is off and
every caller is a full-access anonymous principal — allowed only on loopback unless ``--insecure``.
Why a context variable for the principal: servicers ask ``require(namespace, scope)`` without plumbing.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from loraplex.registry.errors import InvalidArgument, PermissionDenied, Unauthenticated

SCOPE_LEVEL = {"read": 1, "write": 2, "admin": 3}
# Health checks and reflection stay open so load balancers and grpcurl work without a token.
PUBLIC_SERVICE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    name: str
    namespaces: frozenset[str]
    level: int
    tenant: str | None = None  # fair-share tenant for the engine's scheduler; None = the adapter's namespace

    def can(self, namespace: str, scope: str) -> bool:
        ns_ok = "*" in self.namespaces or namespace in self.namespaces
        return ns_ok and self.level >= SCOPE_LEVEL[scope]

    @property
    def readable_namespaces(self) -> frozenset[str] | None:
        """None means every namespace."""
        return None if "*" in self.namespaces else self.namespaces


ANONYMOUS = Principal("anonymous", frozenset({"*"}), SCOPE_LEVEL["admin"])
principal_var: contextvars.ContextVar[Principal] = contextvars.ContextVar("loraplex_principal", default=ANONYMOUS)
token_var: contextvars.ContextVar[str] = contextvars.ContextVar("loraplex_token", default="")


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal


class TokenAuthority:
    """Maps presented bearer tokens to principals (constant-time compare on sha256 digests)."""

    def __init__(self, entries: Iterable[_Entry]):
        self._entries = tuple(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def disabled(cls) -> TokenAuthority:
        return cls(())

    @classmethod
    def from_file(cls, path: str | Path | None) -> TokenAuthority:
        if not path:
            return cls.disabled()
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read tokens file {path}: {exc}") from exc
        return cls.from_document(doc)

    @classmethod
    def from_document(cls, doc: Any) -> TokenAuthority:
        if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
            raise InvalidArgument('tokens file must be an object with a "tokens" list')
        entries = []
        for i, item in enumerate(doc["tokens"]):
            if not isinstance(item, dict):
                raise InvalidArgument(f"tokens[{i}] must be an object")
            scopes = item.get("scopes", [])
            namespaces = item.get("namespaces", [])
            if not scopes or any(s not in SCOPE_LEVEL for s in scopes):
                raise InvalidArgument(f"tokens[{i}].scopes must be a non-empty subset of {sorted(SCOPE_LEVEL)}")
            if not namespaces or not all(isinstance(n, str) and n for n in namespaces):
                raise InvalidArgument(f"tokens[{i}].namespaces must be a non-empty list of names or '*'")
            if isinstance(item.get("token"), str) and item["token"]:
                digest = hashlib.sha256(item["token"].encode()).digest()
            elif isinstance(item.get("sha256"), str) and len(item["sha256"]) == 64:
                digest = bytes.fromhex(item["sha256"])
            else:
                raise InvalidArgument(f"tokens[{i}] needs a 'token' or a 64-hex 'sha256'")
            level = max(SCOPE_LEVEL[s] for s in scopes)
            tenant = item.get("tenant")
            if tenant is not None and (not isinstance(tenant, str) or not tenant):
                raise InvalidArgument(f"tokens[{i}].tenant must be a non-empty string when set")
            name = str(item.get("name", f"token-{i}"))
            entries.append(_Entry(digest, Principal(name, frozenset(namespaces), level, tenant)))
        return cls(entries)

    def authenticate_headers(self, values: Sequence[str]) -> Principal:
        """The principal for all the ``authorization`` values one call carried (gRPC metadata or HTTP headers).

        More than one is refused even when auth is off: which one wins would differ between proxies, servers and
        the registry the engine forwards the token to, so two values are ambiguous credentials, never "last wins".
        """
        if len(values) > 1:
            raise Unauthenticated(
                f"{len(values)} authorization headers sent: ambiguous credentials; send exactly one",
                reason="AMBIGUOUS_CREDENTIALS",
            )
        return self.authenticate(values[0] if values else None)

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        presented = hashlib.sha256(token.strip().encode()).digest()
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, presented):
                return entry.principal
        raise Unauthenticated("unknown bearer token")


def require(namespace: str, scope: str) -> Principal:
    """Raise PERMISSION_DENIED unless the current caller holds ``scope`` on ``namespace``."""
    principal = principal_var.get()
    if not principal.can(namespace, scope):
        raise PermissionDenied(
            f"{principal.name} may not {scope} namespace {namespace!r}",
            metadata={"namespace": namespace, "scope": scope},
        )
    return principal


def require_admin() -> Principal:
    principal = principal_var.get()
    if principal.level < SCOPE_LEVEL["admin"]:
        raise PermissionDenied(f"{principal.name} lacks the admin scope", metadata={"scope": "admin"})
    return principal


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates each call and stores the principal (and raw token, for forwarding) in context vars.

    Runs inside ``ErrorInterceptor``'s wrapper is not possible for rejected calls (no handler yet), so a failed
    authentication returns a handler that raises the typed error; the error interceptor maps it.
    """

    def __init__(self, authority: TokenAuthority):
        self._authority = authority

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = str(getattr(handler_call_details, "method", ""))
        if method.startswith(PUBLIC_SERVICE_PREFIXES):
            return await continuation(handler_call_details)
        values = [
            value if isinstance(value, str) else value.decode(errors="replace")
            for key, value in getattr(handler_call_details, "invocation_metadata", None) or ()
            if key == "authorization"
        ]
        authorization = values[0] if len(values) == 1 else None
        try:
            principal = self._authority.authenticate_headers(values)
        except Unauthenticated as exc:
            return _rejecting_handler(await continuation(handler_call_details), exc)
        principal_var.set(principal)
        token_var.set(authorization.partition(" ")[2].strip() if authorization else "")
        return await continuation(handler_call_details)


def _rejecting_handler(handler: grpc.RpcMethodHandler[Any, Any], exc: Exception) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as ``handler`` that fails with ``exc`` before touching the request."""

    async def reject_unary(request: Any, context: Any) -> Any:
        raise exc

    async def reject_stream(request: Any, context: Any) -> Any:
        raise exc
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            reject_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            reject_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            reject_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        reject_stream, handler.request_deserializer, handler.response_serializer
    )

"""Container health check: exit 0 only when the server's gRPC health service answers SERVING.

Why a script and not ``grpc_health_probe``: that binary would have to be downloaded into the image, while both
images already carry ``grpcio-health-checking`` (a core dependency). Both services report NOT_SERVING while
starting (the engine until its model is loaded and warmed up) and again while draining on SIGTERM, so this
check is what compose's ``service_healthy`` conditions and orchestrators' readiness probes should wait on.

Usage: ``python healthcheck.py [HOST:PORT] [SERVICE]``; SERVICE empty (the default) = the whole server.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
TIMEOUT_S = 4.0


def check(address: str, service: str = "", timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, what to print) for one Check call against ``address``."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return False, f"{address}: health check failed: {code.name if code else exc}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: Sequence[str]) -> int:
    if len(argv) > 3:
        print("usage: healthcheck.py [HOST:PORT] [SERVICE]", file=sys.stderr)
        return 2
    address = argv[1] if len(argv) > 1 else DEFAULT_ADDRESS
    service = argv[2] if len(argv) > 2 else ""
    healthy, message = check(address, service)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

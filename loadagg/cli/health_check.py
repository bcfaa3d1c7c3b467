"""`loadagg health`: one grpc.health.v1 Check, as a container HEALTHCHECK or a script would run it.

There is no grpc_health_probe binary in the image, so the image probes itself with this. Kubernetes does not
need it (its native `grpc:` probes call the same health service).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from loadagg.client.channels import ChannelSecurity, sync_channel
from loadagg.common import DEFAULT_PORT, env


def default_target() -> str:
    """LOADAGG_TARGET when set, else the aggregator of this host as `serve` binds it (LOADAGG_HOST when that
    is one address rather than all of them, else 127.0.0.1; LOADAGG_PORT, else the default port): right inside its
    container."""
    host = env("HOST") or ""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    return env("TARGET") or f"{host}:{env('PORT') or DEFAULT_PORT}"


DEFAULT_TIMEOUT_S = 3.0  # a container probe's answer; the image's HEALTHCHECK allows 5 s


@dataclass(frozen=True, slots=True)
class HealthResult:
    serving: bool
    message: str


def check_health(target: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_S,
                 security: ChannelSecurity | None = None) -> HealthResult:
    """Ask `target`'s health service about `service` ("" = the server as a whole); TLS when `security` says so
    (health needs no token)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # the `server` extra (grpcio-health-checking)

    what = f"service {service!r}" if service else "the server"
    try:
        with sync_channel(target, security) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.NOT_FOUND:
            return HealthResult(False, f"NOT_FOUND: {target} does not know {what} (check --service)")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return HealthResult(False, f"DEADLINE_EXCEEDED: {target} did not answer within {timeout:g} s")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return HealthResult(False, f"UNIMPLEMENTED: {target} serves no grpc.health.v1.Health")
        return HealthResult(False, f"{code.name}: cannot check {target}: {error.details()}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthResult(reply.status == health_pb2.HealthCheckResponse.SERVING, f"{status}: {what} at {target}")

"""Shared-token authentication: which service needs which token, and the (constant-time) check.

Agents (AgentLink) and routers (every other loadagg service: LoadAggregator, and whatever joins it
later) have separate tokens, so a leaked router token cannot claim dp ranks. Health and reflection
stay open: orchestrator probes and `grpcurl list` carry no token, and neither reveals any load.
A service left without a token (empty string) is open.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from loadagg.common import AUTHORIZATION

AGENT_SERVICE = "loadagg.v1.AgentLink"
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


def service_of(method: str) -> str:
    """'/pkg.Service/Method' -> 'pkg.Service'."""
    return method[1:].split("/", 1)[0]


class TokenPolicy:
    def __init__(self, agent_token: str = "", router_token: str = "") -> None:
        self._tokens = {"agent": agent_token.encode(), "router": router_token.encode()}

    @property
    def enabled(self) -> bool:
        return any(self._tokens.values())

    def role(self, service: str) -> str | None:
        """'agent', 'router', or None for a service that needs no token."""
        if service in OPEN_SERVICES:
            return None
        role = "agent" if service == AGENT_SERVICE else "router"
        return role if self._tokens[role] else None

    def http_problem(self, authorization: str | None) -> str | None:
        """The same check for the HTTP gateway's /v1/loads (the router token; /metrics stays open like health)."""
        return self.problem("loadagg.v1.LoadAggregator", [] if authorization is None else [(AUTHORIZATION,
                                                                                            authorization)])

    def problem(self, service: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """Why a call to `service` with `metadata` is not authenticated, or None when it is."""
        role = self.role(service)
        if role is None:
            return None
        values = [v for k, v in (metadata or ()) if k == AUTHORIZATION]
        flag = "--token" if role == "agent" else "--token / LoadClient(..., security=ChannelSecurity(token=...))"
        if not values:
            return (f"{service} requires the {role} token: send metadata 'authorization: Bearer <token>' "
                    f"({flag}; the aggregator's --{role}-token)")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, presented = value.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "authorization metadata must be 'Bearer <token>'"
        if not hmac.compare_digest(presented.strip().encode(), self._tokens[role]):
            return f"the {role} token presented for {service} is not valid"
        return None


def http_middleware(policy: TokenPolicy):
    """aiohttp middleware: /v1/loads answers 401 (with the reason) unless the router token is presented."""
    from aiohttp import web

    from loadagg.server.errors import Unauthenticated, http_body, http_status

    @web.middleware
    async def check_token(request, handler):
        if request.path != "/metrics":
            problem = policy.http_problem(request.headers.get("Authorization"))
            if problem is not None:
                error = Unauthenticated(problem)
                return web.json_response(http_body(error), status=http_status(error),
                                         headers={"WWW-Authenticate": 'Bearer realm="loadagg"'})
        return await handler(request)

    return check_token

"""How the agent dials the aggregator: plaintext or TLS / mutual TLS, a shared token, keepalive.

Kept apart from the agent's logic (and from the aggregator's code: the agent shares `loadagg.v1` and `loadagg.common`)
so every secure-link setting lives in one frozen dataclass built once from flags and LOADAGG_* vars.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from loadagg.common import (
    AUTHORIZATION,
    DEFAULT_KEEPALIVE_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    MIN_PING_INTERVAL_S,
    TlsClient,
    keepalive_options,
)


@dataclass(frozen=True, slots=True)
class LinkSecurity(TlsClient):
    """The agent's link to the aggregator: the agent token and TLS (common.TlsClient), and keepalive."""

    keepalive_s: float = DEFAULT_KEEPALIVE_S  # ping the aggregator this often; a silent one is dropped and redialled

    def __post_init__(self) -> None:
        TlsClient.__post_init__(self)
        if self.keepalive_s < 0 or 0 < self.keepalive_s < MIN_PING_INTERVAL_S:
            raise ValueError(f"keepalive_s must be 0 (pings off) or at least {MIN_PING_INTERVAL_S:g}: the aggregator "
                             f"refuses pings more often than every {MIN_PING_INTERVAL_S:g} s and would drop the link")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()

    def options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [*keepalive_options(self.keepalive_s, DEFAULT_KEEPALIVE_TIMEOUT_S)]
        if self.keepalive_s:
            options.append(("grpc.keepalive_permit_without_calls", 1))  # keep pinging while no round runs
        options += self.name_options()
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(**self.pem_files())

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.uses_tls:
            return grpc.aio.secure_channel(target, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(target, options=self.options())

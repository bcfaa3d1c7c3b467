"""How the agent dials the aggregator: plaintext or TLS / mutual TLS, a shared token, keepalive.

Kept apart from the agent's logic (and from the aggregator's code: the agent shares `loadagg.v1` and `loadagg.common`)
so every secure-link setting lives in one frozen dataclass built once from flags and LOADAGG_* vars.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from loadagg.common import (
    AUTHORIZATION,
    DEFAULT_KEEPALIVE_S,
    DEFAULT_KEEPALIVE_TIMEOUT_S,
    MIN_PING_INTERVAL_S,
    keepalive_options,
    read_pem,
)


@dataclass(frozen=True, slots=True)
class LinkSecurity:
    """TLS files (PEM paths), the agent token, and keepalive of the link to the aggregator."""

    token: str = field(default="", repr=False)  # sent as `authorization: Bearer <token>`
    tls: bool = False  # TLS with the system's trusted roots (implied by tls_ca / tls_cert)
    tls_ca: str = ""  # CA that signed the aggregator's certificate
    tls_cert: str = ""  # this agent's client certificate, for mutual TLS
    tls_key: str = ""
    tls_server_name: str = ""  # expected name in the aggregator's certificate, if not the target host
    keepalive_s: float = DEFAULT_KEEPALIVE_S  # ping the aggregator this often; a silent one is dropped and redialled

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together (the agent's client certificate and its key)")
        if self.keepalive_s < 0 or 0 < self.keepalive_s < MIN_PING_INTERVAL_S:
            raise ValueError(f"keepalive_s must be 0 (pings off) or at least {MIN_PING_INTERVAL_S:g}: the aggregator "
                             f"refuses pings more often than every {MIN_PING_INTERVAL_S:g} s and would drop the link")
        if self.token and any(c in self.token for c in "\r\n"):
            raise ValueError("the token must be a single line")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()

    def options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = [*keepalive_options(self.keepalive_s, DEFAULT_KEEPALIVE_TIMEOUT_S)]
        if self.keepalive_s:
            options.append(("grpc.keepalive_permit_without_calls", 1))  # keep pinging while no round runs
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            private_key=read_pem(self.tls_key, "--tls-key") if self.tls_key else None,
            certificate_chain=read_pem(self.tls_cert, "--tls-cert") if self.tls_cert else None,
        )

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.uses_tls:
            return grpc.aio.secure_channel(target, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(target, options=self.options())

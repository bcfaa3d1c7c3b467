"""How the agent dials the aggregator: plaintext or TLS / mutual TLS, a shared token, keepalive.

Kept apart from the agent's logic (and from the aggregator's code: the agent only shares `loadagg.v1`)
so every secure-link setting lives in one frozen dataclass built once from flags and LOADAGG_* vars.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

AUTHORIZATION = "authorization"


def env(name: str, default: str | None = None) -> str | None:
    """LOADAGG_<NAME> from the environment (how containers configure the agent), else `default`. The agent's
    one reader of its variables: config.py and cli.py import it from here."""
    return os.environ.get(f"LOADAGG_{name}", default)


def env_flag(name: str) -> bool:
    """LOADAGG_<NAME> as a switch: 1/true/yes/on (any case) is on; anything else, or unset, is off."""
    return (env(name, "") or "").strip().lower() in ("1", "true", "yes", "on")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {what} {path!r}: {error.strerror}") from None


@dataclass(frozen=True, slots=True)
class LinkSecurity:
    """TLS files (PEM paths), the agent token, and keepalive of the link to the aggregator."""

    token: str = field(default="", repr=False)  # sent as `authorization: Bearer <token>`
    tls: bool = False  # TLS with the system's trusted roots (implied by tls_ca / tls_cert)
    tls_ca: str = ""  # CA that signed the aggregator's certificate
    tls_cert: str = ""  # this agent's client certificate, for mutual TLS
    tls_key: str = ""
    tls_server_name: str = ""  # expected name in the aggregator's certificate, if not the target host
    keepalive_s: float = 20.0  # ping the aggregator this often; a silent one is dropped and redialled

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together (the agent's client certificate and its key)")
        if self.keepalive_s < 0 or 0 < self.keepalive_s < 5:
            raise ValueError("keepalive_s must be 0 (pings off) or at least 5: the aggregator refuses pings more "
                             "often than every 5 s and would drop the link")
        if self.token and any(c in self.token for c in "\r\n"):
            raise ValueError("the token must be a single line")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.tls_ca or self.tls_cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()

    def options(self) -> list[tuple[str, int | str]]:
        options: list[tuple[str, int | str]] = []
        if self.keepalive_s:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.ping_timeout_ms", 10_000),  # what newer gRPC cores actually wait for an ack
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),  # keep pinging while no round runs
                ("grpc.http2.min_time_between_pings_ms", int(self.keepalive_s * 1000)),
            ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca") if self.tls_ca else None,
            private_key=_read(self.tls_key, "--tls-key") if self.tls_key else None,
            certificate_chain=_read(self.tls_cert, "--tls-cert") if self.tls_cert else None,
        )

    def channel(self, target: str) -> grpc.aio.Channel:
        if self.uses_tls:
            return grpc.aio.secure_channel(target, self.credentials(), options=self.options())
        return grpc.aio.insecure_channel(target, options=self.options())


def add_link_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("secure link to the aggregator")
    g.add_argument("--token", default=None,  # read from the environment later, so --help never prints it
                   help="shared agent token (the aggregator's --agent-token) [LOADAGG_AGENT_TOKEN]")
    g.add_argument("--tls", action="store_true", default=env_flag("TLS"),
                   help="use TLS, trusting the system's CAs (implied by --tls-ca/--tls-cert) [LOADAGG_TLS]")
    g.add_argument("--tls-ca", default=env("TLS_CA", ""), help="CA certificate (PEM) of the aggregator [LOADAGG_TLS_CA]")
    g.add_argument("--tls-cert", default=env("TLS_CERT", ""),
                   help="this agent's certificate (PEM), for mutual TLS [LOADAGG_TLS_CERT]")
    g.add_argument("--tls-key", default=env("TLS_KEY", ""), help="key of --tls-cert (PEM) [LOADAGG_TLS_KEY]")
    g.add_argument("--tls-server-name", default=env("TLS_SERVER_NAME", ""),
                   help="name to expect in the aggregator's certificate [LOADAGG_TLS_SERVER_NAME]")
    g.add_argument("--keepalive-s", type=float, default=env("KEEPALIVE_S", "20"),
                   help="keepalive ping interval; 0 turns pings off [LOADAGG_KEEPALIVE_S]")


def link_security_from_args(args: argparse.Namespace) -> LinkSecurity:
    return LinkSecurity(
        token=args.token if args.token is not None else env("AGENT_TOKEN", ""), tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_server_name=args.tls_server_name, keepalive_s=args.keepalive_s,
    )

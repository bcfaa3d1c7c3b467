"""Server-side security settings: shared tokens (agents, routers) and TLS / mutual TLS.

Both are optional and independent: a token without TLS stops accidents (a stray agent claiming ranks,
an unknown router) on a trusted network; TLS keeps the token and the loads private on an untrusted one;
mutual TLS (`tls_client_ca`) refuses any peer without a certificate signed by that CA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from loadagg.common import read_pem


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Tokens are kept out of repr (and so out of logs)."""

    agent_token: str = field(default="", repr=False)  # AgentLink callers must send it
    router_token: str = field(default="", repr=False)  # LoadAggregator (router-facing) callers must send it
    tls_cert: str = ""  # PEM path of this server's certificate chain
    tls_key: str = ""
    tls_client_ca: str = ""  # set: mutual TLS, every client needs a certificate signed by this CA

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
        for name, token in (("agent", self.agent_token), ("router", self.router_token)):
            if any(c in token for c in "\r\n"):
                raise ValueError(f"the {name} token must be a single line")
            if token != token.strip():  # callers' tokens are trimmed: this one could never match
                raise ValueError(f"the {name} token starts or ends with whitespace; remove it")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """None for plaintext; raises ValueError naming the flag whose file cannot be read."""
        if not self.tls:
            return None
        key_pair = (read_pem(self.tls_key, "--tls-key"), read_pem(self.tls_cert, "--tls-cert"))
        client_ca = read_pem(self.tls_client_ca, "--tls-client-ca") if self.tls_client_ca else None
        return grpc.ssl_server_credentials([key_pair], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def describe(self) -> str:
        tls = "mutual TLS" if self.tls_client_ca else "TLS" if self.tls else "plaintext"
        tokens = [n for n, t in (("agents", self.agent_token), ("routers", self.router_token)) if t]
        return f"{tls}, token auth for {' and '.join(tokens) or 'nobody'}"

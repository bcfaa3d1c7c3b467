"""Resource limits of the aggregator: gRPC message size, streams per connection, agent links and keepalive
(which is also how a hung or vanished peer is eventually dropped), the size of an answer, and the HTTP
gateway's connections and idle timeout."""

from __future__ import annotations

from dataclasses import dataclass

from loadagg.common import DEFAULT_KEEPALIVE_S, DEFAULT_KEEPALIVE_TIMEOUT_S, MIN_PING_INTERVAL_S, keepalive_options

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_bytes: int = 4 * MIB  # largest request / agent message accepted (RESOURCE_EXHAUSTED beyond)
    max_concurrent_streams: int = 0  # per client connection; 0 = gRPC's default (no limit)
    max_agent_links: int = 1024  # AgentLink streams open at once (RESOURCE_EXHAUSTED beyond)
    # Calls received but not yet picked up by the server loop. gRPC's defaults (1000 soft, 3000 hard) CANCEL
    # the rest of a burst: 10,000 routers asking at once lost 7,000 answers. Beyond this, gRPC cancels.
    max_pending_calls: int = 20_000
    keepalive_s: float = DEFAULT_KEEPALIVE_S  # ping idle peers this often; 0 = off
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S  # a peer not answering a ping in time is disconnected
    # The largest answer (every rank, every section): what a gRPC client accepts by default. Each rank's load
    # is refused at report time when it is larger than its share, so no answer can grow past it.
    max_answer_bytes: int = 4 * MIB
    # HTTP gateway: connections open at once (also capped at half the open-files limit, the rest kept for gRPC),
    # and how long a connection may sit without a complete request (idle keep-alive or half-sent alike).
    http_max_connections: int = 512
    http_idle_timeout_s: float = 15.0
    max_http_streams: int = 256  # GET /v1/loads/watch streams open at once (429 RESOURCE_EXHAUSTED beyond)
    # A stream whose client reads nothing for this long (its buffers full) is dropped, never buffered on.
    http_stream_send_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_concurrent_streams < 0:
            raise ValueError("max_concurrent_streams must be >= 0 (0: no limit)")
        if self.max_pending_calls < 1:
            raise ValueError("max_pending_calls must be >= 1")
        if self.max_agent_links < 1:
            raise ValueError("max_agent_links must be >= 1")
        if self.keepalive_s < 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("keepalive_s must be >= 0 and keepalive_timeout_s > 0")
        if self.max_answer_bytes < 64 * 1024:
            raise ValueError(f"max_answer_bytes must be >= 65536, got {self.max_answer_bytes}")
        if self.http_max_connections < 1 or self.http_idle_timeout_s <= 0:
            raise ValueError("http_max_connections must be >= 1 and http_idle_timeout_s > 0")
        if self.max_http_streams < 0 or self.http_stream_send_timeout_s <= 0:
            raise ValueError("max_http_streams must be >= 0 (0: no streams) and http_stream_send_timeout_s > 0")

    def server_options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default on Linux: a second aggregator on the same port would start
            # without a word and the kernel would split agents and routers between the two.
            ("grpc.so_reuseport", 0),
            # Agents ping every 20 s by default; accept pings down to every 5 s without calling it abuse.
            ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_PING_INTERVAL_S * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.server.max_pending_requests", self.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", self.max_pending_calls),
        ]
        if self.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        return options + keepalive_options(self.keepalive_s, self.keepalive_timeout_s)

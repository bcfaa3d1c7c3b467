"""Resource limits of the aggregator's gRPC server: message size, streams per connection, agent links,
and keepalive (which is also how a hung or vanished peer is eventually dropped)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_bytes: int = 4 * MIB  # largest request / agent message accepted (RESOURCE_EXHAUSTED beyond)
    max_concurrent_streams: int = 0  # per client connection; 0 = gRPC's default (no limit)
    max_agent_links: int = 1024  # AgentLink streams open at once (RESOURCE_EXHAUSTED beyond)
    # Calls received but not yet picked up by the server loop. gRPC's defaults (1000 soft, 3000 hard) CANCEL
    # the rest of a burst: 10,000 routers asking at once lost 7,000 answers. Beyond this, gRPC cancels.
    max_pending_calls: int = 20_000
    keepalive_s: float = 20.0  # ping idle peers this often; 0 = off
    keepalive_timeout_s: float = 10.0  # a peer that does not answer a ping in time is disconnected

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

    def server_options(self) -> list[tuple[str, int]]:
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            # gRPC sets SO_REUSEPORT by default on Linux: a second aggregator on the same port would start
            # without a word and the kernel would split agents and routers between the two.
            ("grpc.so_reuseport", 0),
            # Agents ping every 20 s by default; accept pings down to every 5 s without calling it abuse.
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.server.max_pending_requests", self.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", self.max_pending_calls),
        ]
        if self.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        if self.keepalive_s:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.http2.ping_timeout_ms", int(self.keepalive_timeout_s * 1000)),  # the ack wait newer cores use
                # Keep pinging an idle stream (an agent between rounds sends no data): without these,
                # gRPC stops after 2 pings or waits 5 minutes between them, and a hung peer goes unnoticed.
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.http2.min_time_between_pings_ms", int(self.keepalive_s * 1000)),
            ]
        return options


def add_server_flags(p: argparse.ArgumentParser) -> None:
    from loadagg.server.config import env, env_int  # config.py imports this module

    g = p.add_argument_group("limits")
    g.add_argument("--max-message-bytes", type=int, default=env_int("MAX_MESSAGE_BYTES", 4 * MIB),
                   help="largest message accepted [LOADAGG_MAX_MESSAGE_BYTES]")
    g.add_argument("--max-concurrent-streams", type=int, default=env_int("MAX_CONCURRENT_STREAMS", 0),
                   help="concurrent RPCs per client connection, 0: no limit [LOADAGG_MAX_CONCURRENT_STREAMS]")
    g.add_argument("--max-agent-links", type=int, default=env_int("MAX_AGENT_LINKS", 1024),
                   help="agent streams open at once [LOADAGG_MAX_AGENT_LINKS]")
    g.add_argument("--max-pending-calls", type=int, default=env_int("MAX_PENDING_CALLS", 20_000),
                   help="calls queued before the server picks them up; gRPC cancels the excess of a burst "
                        "[LOADAGG_MAX_PENDING_CALLS]")
    g.add_argument("--keepalive-s", type=float, default=env("KEEPALIVE_S", "20"),
                   help="ping peers this often; an unanswered ping drops the peer; 0: off [LOADAGG_KEEPALIVE_S]")
    g.add_argument("--keepalive-timeout-s", type=float, default=env("KEEPALIVE_TIMEOUT_S", "10"),
                   help="how long a ping may go unanswered [LOADAGG_KEEPALIVE_TIMEOUT_S]")


def limits_from_args(args: argparse.Namespace) -> LimitsConfig:
    return LimitsConfig(
        max_message_bytes=args.max_message_bytes,
        max_concurrent_streams=args.max_concurrent_streams,
        max_agent_links=args.max_agent_links,
        max_pending_calls=args.max_pending_calls,
        keepalive_s=args.keepalive_s,
        keepalive_timeout_s=args.keepalive_timeout_s,
    )

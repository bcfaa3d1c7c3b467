"""The `loadagg` command's flags and how they become config: every default comes from the config dataclass field
(or a constant of loadagg.common), overridden by its LOADAGG_* variable, overridden by the flag."""

from __future__ import annotations

import argparse

from loadagg.client.channels import ChannelSecurity
from loadagg.common import (
    DEFAULT_TARGET,
    add_tls_client_flags,
    env,
    env_bool,
    env_choice,
    env_float,
    env_int,
    tls_client_args,
)
from loadagg.common import field_default as default
from loadagg.server.config import MODE_NAMES, AggregatorConfig
from loadagg.server.limits import LimitsConfig
from loadagg.server.security import SecurityConfig

NO_HTTP = -1  # --http-port: serve no HTTP (AggregatorConfig.http_port None)


def non_negative_int(text: str) -> int:
    """argparse type for flags that fill an unsigned proto field (or count something): an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_target_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=env("TARGET", DEFAULT_TARGET), help="aggregator HOST:PORT [LOADAGG_TARGET]")


def add_serve_flags(s: argparse.ArgumentParser) -> None:
    """`loadagg serve`: AggregatorConfig, SecurityConfig and LimitsConfig as flags."""
    c = AggregatorConfig
    s.add_argument("--host", default=env("HOST", default(c, "host")), help="bind address [LOADAGG_HOST]")
    s.add_argument("--port", type=int, default=env_int("PORT", default(c, "port")), help="gRPC port [LOADAGG_PORT]")
    s.add_argument("--dp-size", type=int, default=env_int("DP_SIZE", default(c, "dp_size")),
                   help="expected dp ranks [LOADAGG_DP_SIZE]")
    s.add_argument("--mode", choices=MODE_NAMES, default=env_choice("MODE", default(c, "mode"), MODE_NAMES),
                   help="how concurrent GetLoads share rounds [LOADAGG_MODE]")
    s.add_argument("--round-timeout-ms", type=int, default=env_int("ROUND_TIMEOUT_MS", default(c, "round_timeout_ms")),
                   help="a round ends at this deadline even if ranks are missing [LOADAGG_ROUND_TIMEOUT_MS]")
    s.add_argument("--grace-s", type=float, default=env_float("GRACE_S", default(c, "grace_s")),
                   help="SIGTERM: time for in-flight calls [LOADAGG_GRACE_S]")
    http_port = default(c, "http_port")
    s.add_argument("--http-port", type=int, default=env_int("HTTP_PORT", NO_HTTP if http_port is None else http_port),
                   help="serve sglang-compatible GET /v1/loads and /metrics on this port; -1: no HTTP, "
                        "0: any free port [LOADAGG_HTTP_PORT]")
    s.add_argument("--sglang-compat", action=argparse.BooleanOptionalAction,
                   default=env_bool("SGLANG_COMPAT", default(c, "sglang_compat")),
                   help="also answer sglang.grpc.scheduler.SglangScheduler/GetLoads [LOADAGG_SGLANG_COMPAT]")
    s.add_argument("--vllm-compat", action=argparse.BooleanOptionalAction,
                   default=env_bool("VLLM_COMPAT", default(c, "vllm_compat")),
                   help="also answer vllm.grpc.engine.VllmEngine/GetLoads [LOADAGG_VLLM_COMPAT]")
    s.add_argument("--watch-interval-ms", type=int,
                   default=env_int("WATCH_INTERVAL_MS", default(c, "default_watch_interval_ms")),
                   help="WatchLoads interval when a watcher asks for 0 [LOADAGG_WATCH_INTERVAL_MS]")
    s.add_argument("--min-watch-interval-ms", type=int,
                   default=env_int("MIN_WATCH_INTERVAL_MS", default(c, "min_watch_interval_ms")),
                   help="shortest WatchLoads interval accepted [LOADAGG_MIN_WATCH_INTERVAL_MS]")
    s.add_argument("--hello-timeout-ms", type=int, default=env_int("HELLO_TIMEOUT_MS", default(c, "hello_timeout_ms")),
                   help="an agent link that says no hello this soon is closed [LOADAGG_HELLO_TIMEOUT_MS]")
    s.add_argument("--forget-rank-after-s", type=float,
                   default=env_float("FORGET_RANK_AFTER_S", default(c, "forget_rank_after_s")),
                   help="drop the last-known load of a rank that has had no agent this long "
                        "[LOADAGG_FORGET_RANK_AFTER_S]")
    _add_security_flags(s)
    _add_limit_flags(s)


def _add_security_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (tokens are read from the environment when the flag is absent)")
    g.add_argument("--agent-token", default=None,
                   help="agents must send 'authorization: Bearer <token>' [LOADAGG_AGENT_TOKEN]")
    g.add_argument("--router-token", default=None,
                   help="GetLoads/WatchLoads callers must send 'authorization: Bearer <token>' [LOADAGG_ROUTER_TOKEN]")
    c = SecurityConfig
    g.add_argument("--tls-cert", default=env("TLS_CERT", default(c, "tls_cert")),
                   help="server certificate chain (PEM) [LOADAGG_TLS_CERT]")
    g.add_argument("--tls-key", default=env("TLS_KEY", default(c, "tls_key")),
                   help="key of --tls-cert (PEM) [LOADAGG_TLS_KEY]")
    g.add_argument("--tls-client-ca", default=env("TLS_CLIENT_CA", default(c, "tls_client_ca")),
                   help="require client certificates signed by this CA: mutual TLS [LOADAGG_TLS_CLIENT_CA]")


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    c = LimitsConfig
    g = p.add_argument_group("limits")
    g.add_argument("--max-message-bytes", type=int,
                   default=env_int("MAX_MESSAGE_BYTES", default(c, "max_message_bytes")),
                   help="largest message accepted [LOADAGG_MAX_MESSAGE_BYTES]")
    g.add_argument("--max-concurrent-streams", type=int,
                   default=env_int("MAX_CONCURRENT_STREAMS", default(c, "max_concurrent_streams")),
                   help="concurrent RPCs per client connection, 0: no limit [LOADAGG_MAX_CONCURRENT_STREAMS]")
    g.add_argument("--max-agent-links", type=int, default=env_int("MAX_AGENT_LINKS", default(c, "max_agent_links")),
                   help="agent streams open at once [LOADAGG_MAX_AGENT_LINKS]")
    g.add_argument("--max-pending-calls", type=int,
                   default=env_int("MAX_PENDING_CALLS", default(c, "max_pending_calls")),
                   help="calls queued before the server picks them up; gRPC cancels the excess of a burst "
                        "[LOADAGG_MAX_PENDING_CALLS]")
    g.add_argument("--keepalive-s", type=float, default=env_float("KEEPALIVE_S", default(c, "keepalive_s")),
                   help="ping peers this often; an unanswered ping drops the peer; 0: off [LOADAGG_KEEPALIVE_S]")
    g.add_argument("--keepalive-timeout-s", type=float,
                   default=env_float("KEEPALIVE_TIMEOUT_S", default(c, "keepalive_timeout_s")),
                   help="how long a ping may go unanswered [LOADAGG_KEEPALIVE_TIMEOUT_S]")
    g.add_argument("--max-answer-bytes", type=int, default=env_int("MAX_ANSWER_BYTES", default(c, "max_answer_bytes")),
                   help="largest answer; a rank's load above its share (this over dp_size) is refused "
                        "[LOADAGG_MAX_ANSWER_BYTES]")
    g.add_argument("--http-max-connections", type=int,
                   default=env_int("HTTP_MAX_CONNECTIONS", default(c, "http_max_connections")),
                   help="HTTP gateway connections open at once (at most half the open-files limit); more get 503 "
                        "[LOADAGG_HTTP_MAX_CONNECTIONS]")
    g.add_argument("--http-idle-timeout-s", type=float,
                   default=env_float("HTTP_IDLE_TIMEOUT_S", default(c, "http_idle_timeout_s")),
                   help="close an HTTP connection without a complete request this long (idle or half-sent) "
                        "[LOADAGG_HTTP_IDLE_TIMEOUT_S]")
    g.add_argument("--max-http-streams", type=int, default=env_int("MAX_HTTP_STREAMS", default(c, "max_http_streams")),
                   help="HTTP /v1/loads/watch streams open at once; more get 429 [LOADAGG_MAX_HTTP_STREAMS]")
    g.add_argument("--http-stream-send-timeout-s", type=float,
                   default=env_float("HTTP_STREAM_SEND_TIMEOUT_S", default(c, "http_stream_send_timeout_s")),
                   help="drop an HTTP watch stream whose client has read nothing for this long "
                        "[LOADAGG_HTTP_STREAM_SEND_TIMEOUT_S]")


def aggregator_config_from_args(args: argparse.Namespace) -> AggregatorConfig:
    return AggregatorConfig(
        host=args.host,
        port=args.port,
        dp_size=args.dp_size,
        mode=args.mode,
        round_timeout_ms=args.round_timeout_ms,
        grace_s=args.grace_s,
        http_port=None if args.http_port < 0 else args.http_port,
        sglang_compat=args.sglang_compat,
        vllm_compat=args.vllm_compat,
        default_watch_interval_ms=args.watch_interval_ms,
        min_watch_interval_ms=args.min_watch_interval_ms,
        hello_timeout_ms=args.hello_timeout_ms,
        forget_rank_after_s=args.forget_rank_after_s,
        security=SecurityConfig(
            agent_token=args.agent_token if args.agent_token is not None else env("AGENT_TOKEN", ""),
            router_token=args.router_token if args.router_token is not None else env("ROUTER_TOKEN", ""),
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
        ),
        limits=LimitsConfig(
            max_message_bytes=args.max_message_bytes,
            max_concurrent_streams=args.max_concurrent_streams,
            max_agent_links=args.max_agent_links,
            max_pending_calls=args.max_pending_calls,
            keepalive_s=args.keepalive_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
            max_answer_bytes=args.max_answer_bytes,
            http_max_connections=args.http_max_connections,
            http_idle_timeout_s=args.http_idle_timeout_s,
            max_http_streams=args.max_http_streams,
            http_stream_send_timeout_s=args.http_stream_send_timeout_s,
        ),
    )


def add_client_flags(p: argparse.ArgumentParser, *, token: bool = True) -> None:
    """TLS / mutual TLS and the router token of a command that calls the aggregator (ChannelSecurity)."""
    g = p.add_argument_group("secure channel (the token is read from the environment when the flag is absent)")
    if token:
        g.add_argument("--token", default=None,
                       help="router token (the aggregator's --router-token) [LOADAGG_ROUTER_TOKEN]")
    # CLIENT_: in the aggregator's own container LOADAGG_TLS_CERT/KEY are the server's (what `serve` reads),
    # and `loadagg health` (the image's HEALTHCHECK) runs there too.
    add_tls_client_flags(g, ChannelSecurity, cert_env="CLIENT_TLS_CERT", key_env="CLIENT_TLS_KEY")


def channel_security_from_args(args: argparse.Namespace) -> ChannelSecurity:
    return ChannelSecurity(**tls_client_args(args, "ROUTER_TOKEN"))

"""AggregatorConfig: every setting of the aggregator and its one default (loadagg.cli.flags builds it from flags and
LOADAGG_* variables)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loadagg.common import DEFAULT_PORT, DEFAULT_WATCH_INTERVAL_MS
from loadagg.server.limits import LimitsConfig
from loadagg.server.registry import DEFAULT_FORGET_RANK_AFTER_S
from loadagg.server.security import SecurityConfig

__all__ = ["DEFAULT_WATCH_INTERVAL_MS", "MODE_NAMES", "AggregatorConfig"]

MODE_NAMES = ("watching", "queueing")


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    dp_size: int = 1
    mode: str = "watching"  # or "queueing" (sglang's old behaviour, for comparison)
    round_timeout_ms: int = 500  # a round ends at this deadline even if a rank never answers
    hello_timeout_ms: int = 10_000  # an agent must say hello this soon after connecting
    grace_s: float = 5.0  # SIGTERM: time for in-flight calls to finish
    default_watch_interval_ms: int = DEFAULT_WATCH_INTERVAL_MS
    aggregator_id: str = ""
    security: SecurityConfig = field(default_factory=SecurityConfig)  # tokens, TLS (loadagg/security.py)
    limits: LimitsConfig = field(default_factory=LimitsConfig)  # message size, streams, keepalive (limits.py)
    min_watch_interval_ms: int = 10  # WatchLoads asking for less (but not 0) gets INVALID_ARGUMENT
    http_port: int | None = None  # sglang-compatible GET /v1/loads and /metrics; None = no HTTP; 0 = any free port
    sglang_compat: bool = True  # also answer sglang.grpc.scheduler.SglangScheduler/GetLoads on the gRPC port
    vllm_compat: bool = True  # also answer vllm.grpc.engine.VllmEngine/GetLoads on the gRPC port
    forget_rank_after_s: float = DEFAULT_FORGET_RANK_AFTER_S  # a rank with no agent this long loses its snapshot

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        if self.mode not in MODE_NAMES:
            raise ValueError(f"mode must be 'watching' or 'queueing', got {self.mode!r}")
        if self.round_timeout_ms < 1:
            raise ValueError("round_timeout_ms must be >= 1")
        if self.hello_timeout_ms < 1:  # (0 closed every agent link at once, blaming the agent)
            raise ValueError(f"hello_timeout_ms must be >= 1, got {self.hello_timeout_ms}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in 0..65535, got {self.http_port}")
        if self.forget_rank_after_s <= 0:
            raise ValueError(f"forget_rank_after_s must be > 0, got {self.forget_rank_after_s}")
        if self.min_watch_interval_ms < 1 or self.default_watch_interval_ms < self.min_watch_interval_ms:
            raise ValueError("watch intervals: need 1 <= min_watch_interval_ms <= default_watch_interval_ms")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

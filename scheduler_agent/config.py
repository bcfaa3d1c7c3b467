"""AgentConfig: every setting of a scheduler agent and its one default (cli.py builds it from flags and LOADAGG_*
variables)."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field

from loadagg.common import DEFAULT_TARGET
from scheduler_agent.channel import LinkSecurity

__all__ = ["ENGINE_STREAM_MODES", "AgentConfig", "default_instance_id"]

ENGINE_STREAM_MODES = ("auto", "off")  # grpc:// engines: SMG's load records when the stream has them, or GetLoads only


def default_instance_id() -> str:
    """Made once per agent and kept: its reconnects reuse it and so replace the old link instead of conflicting.

    The random part keeps two agents apart that share a hostname and a pid (containers on the host's
    network are each pid 1): with the same id they would keep replacing each other's link."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    aggregator: str = DEFAULT_TARGET
    dp_ranks: tuple[int, ...] = (0,)
    dp_size: int = 0  # 0: accept the aggregator's dp_size
    # The source's dp rank r is the aggregator's rank r + rank_offset: several engines, each numbering its own
    # ranks from 0, fill one cluster's ranks (engine A ranks 0..3, engine B with offset 4 as 4..7).
    rank_offset: int = 0
    instance_id: str = field(default_factory=default_instance_id)
    source: str = "simulator"
    model: str = ""
    seed: int | None = None
    collect_latency_ms: float = 0.0  # simulator: how long answering a collect takes
    push_interval_ms: int = 0  # 0: only answer collect rounds
    push_refresh_ms: int = 0  # re-push an unchanged rank after this long; 0: only changes are pushed
    # Push sources: changes within this window after the first go out in one report (0: each at once).
    push_coalesce_ms: float = 2.0
    # sglang: its load feed (ZMQ) by hand, tcp://HOST:BASEPORT (rank r at BASEPORT + r), when /server_info
    # cannot tell; "off" polls /v1/loads only; "" (auto): the feed /server_info advertises, if any.
    sglang_load_endpoint: str = ""
    # A feed rank silent this long is read through /v1/loads until its frames resume (sglang re-sends an
    # unchanged stat every second).
    feed_silence_ms: int = 3000
    # How often the figures the feed lacks (token usage, throughputs, cache hit rate, sections) are read.
    detail_interval_ms: int = 1000
    # sglang-shm: the snapshot file (empty: the one /dev/shm/sglang_loads_*.shm) and the watch cadence.
    shm_path: str = ""
    shm_watch_ms: float = 2.0
    # gRPC engines: read SMG's load records on SubscribeKvEvents ("auto") or only poll GetLoads ("off"); a
    # stream silent this long (about two idle heartbeats) makes its ranks stale and GetLoads takes over.
    engine_stream: str = "auto"
    stream_silence_ms: int = 11000
    # Engine sources (sglang, vllm): where the engine listens (http://... or grpc://...).
    engine_url: str = ""
    engine_timeout_ms: int = 0  # 0: a share of the aggregator's round deadline (from Welcome)
    engine_api_key: str = field(default="", repr=False)  # the engine's --api-key (HTTP engines), as a Bearer token
    # Serve the dp ranks the engine reports (dp_ranks, when given, restricts them); dp_size 0 takes the engine's.
    ranks_from_engine: bool = False
    # Ask the engine again this often; when its ranks changed (restarted with another DP), say hello anew. 0: never.
    rediscover_interval_s: float = 30.0
    gpu: str = "auto"  # NVML telemetry: "auto" (when NVML is there), "on" (say loudly when it is not), "off"
    gpu_devices: str = ""  # "RANK=DEV[,DEV];..." NVML indices or UUIDs; empty: split visible devices over ranks
    backoff_initial_ms: int = 100
    backoff_max_ms: int = 5_000
    security: LinkSecurity = field(default_factory=LinkSecurity)  # TLS, token, keepalive of the link

    def __post_init__(self) -> None:
        if not self.dp_ranks and not self.ranks_from_engine:
            raise ValueError("an agent must serve at least one dp rank")
        if any(r < 0 for r in self.dp_ranks):
            raise ValueError(f"dp ranks must be >= 0, got {list(self.dp_ranks)}")
        if len(set(self.dp_ranks)) != len(self.dp_ranks):  # every aggregator would refuse the hello, forever
            raise ValueError(f"dp ranks repeat a rank: {list(self.dp_ranks)}; give each rank once")
        if self.rank_offset < 0:
            raise ValueError(f"rank_offset must be >= 0, got {self.rank_offset}")
        if self.dp_size and any(r + self.rank_offset >= self.dp_size for r in self.dp_ranks):
            shifted = f" (+ rank_offset {self.rank_offset})" if self.rank_offset else ""
            raise ValueError(f"dp ranks {list(self.dp_ranks)}{shifted} do not fit dp_size={self.dp_size}")
        if self.collect_latency_ms < 0:
            raise ValueError("collect_latency_ms must be >= 0")
        if not 1 <= self.backoff_initial_ms <= self.backoff_max_ms:
            raise ValueError("backoff must satisfy 1 <= backoff_initial_ms <= backoff_max_ms")
        if any(c in self.engine_api_key for c in "\r\n"):
            raise ValueError("the engine API key must be a single line")
        if min(self.push_interval_ms, self.push_refresh_ms, self.engine_timeout_ms) < 0:
            raise ValueError("push_interval_ms, push_refresh_ms and engine_timeout_ms must be >= 0")
        if 0 < self.push_interval_ms < 10:  # each push reads the engine: 1 ms would poll it a thousand times a second
            raise ValueError("push_interval_ms must be 0 (no pushes) or at least 10")
        if self.rediscover_interval_s < 0:
            raise ValueError("rediscover_interval_s must be >= 0")
        if not 0 <= self.push_coalesce_ms <= 1000:
            raise ValueError(f"push_coalesce_ms must be in 0..1000, got {self.push_coalesce_ms}")
        if min(self.feed_silence_ms, self.detail_interval_ms, self.stream_silence_ms) < 50:
            raise ValueError("feed_silence_ms, detail_interval_ms and stream_silence_ms must be at least 50")
        if not 0.5 <= self.shm_watch_ms <= 1000:
            raise ValueError(f"shm_watch_ms must be in 0.5..1000, got {self.shm_watch_ms}")
        if self.engine_stream not in ENGINE_STREAM_MODES:
            raise ValueError(f"engine_stream must be auto or off, got {self.engine_stream!r}")
        if self.gpu not in ("auto", "on", "off"):
            raise ValueError(f"gpu must be auto, on or off, got {self.gpu!r}")

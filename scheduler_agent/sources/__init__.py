"""Load sources the agent can read from; `build_source` picks one from the agent's config."""

from __future__ import annotations

from urllib.parse import urlsplit

from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import EngineRanks, LoadSource, SourceError
from scheduler_agent.sources.inprocess import CallbackSource, PublishedSource
from scheduler_agent.sources.simulator import SimulatedSource

SOURCE_NAMES = ("simulator", "sglang", "sglang-shm", "vllm", "tokenspeed")
ENGINE_SOURCES = ("sglang", "sglang-shm", "vllm", "tokenspeed")
DEFAULT_ENGINE_URLS = {"sglang": "http://127.0.0.1:30000", "vllm": "http://127.0.0.1:8000",
                       "tokenspeed": "grpc://127.0.0.1:30000"}


def engine_endpoint(source: str, url: str) -> tuple[str, str]:
    """("http", base URL) or ("grpc", HOST:PORT) for an engine URL; ValueError saying what is wrong."""
    url = url or DEFAULT_ENGINE_URLS[source]
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc:
        if source == "tokenspeed":
            raise ValueError(f"TokenSpeed is read over gRPC (its SMG servicer): give --engine-url grpc://HOST:PORT, "
                             f"not {url!r}")
        return "http", url.rstrip("/")
    if parts.scheme == "grpc" and parts.netloc and parts.path in ("", "/"):
        return "grpc", parts.netloc
    raise ValueError(f"engine URL {url!r} must look like http://HOST:PORT or grpc://HOST:PORT")


def _engine_source(config: AgentConfig) -> LoadSource:
    timeout = config.engine_timeout_ms / 1000 or None
    kind, where = engine_endpoint(config.source, config.engine_url)
    if kind == "grpc":
        from scheduler_agent.sources.engine_grpc import EngineGrpcSource

        polling = EngineGrpcSource(where, config.source, timeout)
        if config.engine_stream == "off":
            return polling
        from scheduler_agent.sources.smg_stream import SmgStreamSource

        return SmgStreamSource(polling, config.stream_silence_ms / 1000)
    if config.source == "sglang":
        from scheduler_agent.sources.sglang_http import SglangHttpSource

        http = SglangHttpSource(where, timeout, api_key=config.engine_api_key)
        if config.sglang_load_endpoint == "off":
            return http
        from scheduler_agent.sources.sglang_feed import SglangFeedSource

        return SglangFeedSource(http, config.sglang_load_endpoint, silence_s=config.feed_silence_ms / 1000,
                                detail_interval_s=config.detail_interval_ms / 1000)
    from scheduler_agent.sources.vllm_metrics import VllmMetricsSource

    return VllmMetricsSource(where, timeout, api_key=config.engine_api_key)


def _with_gpu(config: AgentConfig, source: LoadSource) -> LoadSource:
    if config.gpu == "off":
        return source
    from scheduler_agent.sources.gpu import NvmlTelemetry, WithGpuTelemetry, parse_gpu_devices

    return WithGpuTelemetry(source, NvmlTelemetry(required=config.gpu == "on"), parse_gpu_devices(config.gpu_devices))


def _shm_source(config: AgentConfig) -> LoadSource:
    from scheduler_agent.sources.sglang_shm import SglangShmSource

    return SglangShmSource(config.shm_path, config.shm_watch_ms / 1000)


def build_source(config: AgentConfig) -> LoadSource:
    if config.source == "simulator":
        source: LoadSource = SimulatedSource(seed=config.seed, collect_latency_ms=config.collect_latency_ms)
        # The simulator invents its own GPU figures: real telemetry only when asked for.
        return _with_gpu(config, source) if config.gpu == "on" else source
    if config.source == "sglang-shm":
        return _with_gpu(config, _shm_source(config))
    if config.source in ENGINE_SOURCES:
        return _with_gpu(config, _engine_source(config))
    raise ValueError(f"unknown source {config.source!r}; choose one of: {', '.join(SOURCE_NAMES)}")


__all__ = [
    "CallbackSource", "EngineRanks", "LoadSource", "PublishedSource", "SimulatedSource", "SourceError",
    "build_source", "engine_endpoint", "SOURCE_NAMES", "ENGINE_SOURCES",
]

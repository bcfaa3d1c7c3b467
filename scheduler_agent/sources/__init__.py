"""Load sources the agent can read from; `build_source` picks one from the agent's config."""

from __future__ import annotations

from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import LoadSource, SourceError
from scheduler_agent.sources.simulator import SimulatedSource

SOURCE_NAMES = ("simulator",)


def build_source(config: AgentConfig) -> LoadSource:
    if config.source == "simulator":
        return SimulatedSource(seed=config.seed, collect_latency_ms=config.collect_latency_ms)
    raise ValueError(f"unknown source {config.source!r}; choose one of: {', '.join(SOURCE_NAMES)}")


__all__ = ["LoadSource", "SimulatedSource", "SourceError", "build_source", "SOURCE_NAMES"]

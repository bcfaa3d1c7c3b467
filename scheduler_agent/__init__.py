"""GPU-side scheduler agent for loadagg: reads a scheduler's per-rank load and streams it to the aggregator."""

from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources import LoadSource, SimulatedSource, SourceError, build_source

__all__ = ["AgentConfig", "LoadSource", "SchedulerAgent", "SimulatedSource", "SourceError", "build_source"]

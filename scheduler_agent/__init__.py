"""GPU-side scheduler agent for loadagg: reads a scheduler's per-rank load and streams it to the aggregator.

Embedding it in a Python scheduler (no HTTP hop):

    agent = SchedulerAgent(AgentConfig(aggregator="10.0.0.5:50051", dp_ranks=(0, 1), dp_size=8))
    task = asyncio.create_task(agent.run())
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=12, num_waiting_reqs=3))

A scheduler with a blocking main loop runs it on a thread of its own instead:

    agent = BackgroundAgent(AgentConfig(...)).start()
    agent.publish(RankLoad(dp_rank=0, num_running_reqs=12))   # from the scheduler's thread
    agent.stop()
"""

from loadagg.v1 import loadagg_pb2 as _pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.background import BackgroundAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources import (
    CallbackSource,
    LoadSource,
    PublishedSource,
    SimulatedSource,
    SourceError,
    build_source,
)

__all__ = [
    "AgentConfig", "BackgroundAgent", "CallbackSource", "GpuDevice", "GpuMetrics", "LoadSource", "PublishedSource",
    "RankLoad",
    "SchedulerAgent", "SimulatedSource", "SourceError", "build_source",
]

# The contract's messages a scheduler fills in, re-exported so embedding needs one import.
RankLoad = _pb.RankLoad
GpuMetrics = _pb.GpuMetrics
GpuDevice = _pb.GpuDevice

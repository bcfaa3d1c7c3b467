"""Run in-process SchedulerAgents for a test and end them (and only them) afterwards."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from loadagg.v1 import loadagg_pb2 as pb
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import LoadSource


def agent_config(port: int, **overrides) -> AgentConfig:
    settings = {"aggregator": f"127.0.0.1:{port}", "instance_id": "engine-agent", "backoff_initial_ms": 20,
                "backoff_max_ms": 200}
    settings.update(overrides)
    return AgentConfig(**settings)


@contextlib.asynccontextmanager
async def running(*agents: SchedulerAgent) -> AsyncIterator[list[SchedulerAgent]]:
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        yield list(agents)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def engine_agent(port: int, source: LoadSource, **overrides) -> SchedulerAgent:
    """An agent in front of an engine: ranks (and dp_size) from the engine unless given."""
    overrides.setdefault("dp_ranks", ())
    overrides.setdefault("ranks_from_engine", True)
    return SchedulerAgent(agent_config(port, **overrides), source)


async def get_loads(channel, **request) -> pb.GetLoadsResponse:
    return await pb_grpc.LoadAggregatorStub(channel).GetLoads(pb.GetLoadsRequest(**request), timeout=10)


CACHED = {"freshness": pb.FRESHNESS_CACHED, "max_staleness_ms": 10_000}


async def cached_until(channel, rank: int, running: int, tries: int = 500) -> pb.GetLoadsResponse:
    """FRESHNESS_CACHED answers until `rank` shows `running` requests (or tries run out): the last one."""
    for _ in range(tries):
        answer = await get_loads(channel, **CACHED)
        if any(load.dp_rank == rank and load.num_running_reqs == running for load in answer.loads):
            break
        await asyncio.sleep(0.01)
    return answer

"""A hand-driven agent on a real AgentLink stream: pushes the figures a test sets, answers rounds with them."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
from conftest import wait_for
from raw_agent import RawAgent

from loadagg.v1 import loadagg_pb2 as pb


class DrivenAgent:
    """A hand-driven agent (real AgentLink stream): pushes what the test says, answers rounds with the same."""

    def __init__(self, agent: RawAgent, ranks: list[int]) -> None:
        self.agent = agent
        self.running = {rank: 1 for rank in ranks}
        self.writing = asyncio.Lock()
        self.rounds_answered = 0
        self.task = asyncio.create_task(self._answer_rounds())

    def loads(self) -> list[pb.RankLoad]:
        now = time.time_ns() // 1_000_000
        return [pb.RankLoad(dp_rank=rank, timestamp_ms=now, num_running_reqs=running, num_waiting_reqs=0)
                for rank, running in self.running.items()]

    async def _answer_rounds(self) -> None:
        while True:
            collect = await self.agent.next_collect(timeout=3600)
            async with self.writing:
                await self.agent.report(collect.round_id, self.loads())
            self.rounds_answered += 1

    async def push(self, **running: int) -> None:
        """Push every rank (changed or not): `push(r0=5)` sets rank 0's running requests to 5 first."""
        for key, value in running.items():
            self.running[int(key[1:])] = value
        async with self.writing:
            await self.agent.report(0, self.loads())


@pytest.fixture(name="driven")
async def driven_fixture():
    """`agent = await driven(aggregator, ranks)`: a DrivenAgent, linked, its first push stored."""
    agents: list[DrivenAgent] = []

    async def start(aggregator, ranks: list[int]) -> DrivenAgent:
        raw = RawAgent(aggregator.port, f"driven-{len(agents)}", ranks, aggregator.config.dp_size)
        await raw.connect()
        agent = DrivenAgent(raw, ranks)
        agents.append(agent)
        await agent.push()
        await wait_for(lambda: all(aggregator.registry.snapshot(r) for r in ranks), what="first push stored")
        return agent

    yield start
    for agent in agents:
        agent.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await agent.task
        await agent.agent.close()

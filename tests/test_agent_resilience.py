"""An agent keeps its link through trouble of its own making or its aggregator's: a congested link while
collects keep coming, a redeploy that changed the engine's and the aggregator's DP size, and two agents
that were given the same instance id."""

from __future__ import annotations

import asyncio

import grpc
from conftest import free_port, wait_for
from engines import SglangHttpEngine

from loadagg.client.load_client import AsyncLoadClient
from loadagg.v1 import loadagg_pb2_grpc as pb_grpc
from scheduler_agent import agent as agent_module
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources import build_source
from scheduler_agent.sources.simulator import SimulatedSource


class _SlowSends:
    """The agent's side of a congested link: after the hello, every message takes 0.3 s to leave."""

    def __init__(self, real) -> None:
        self._real = real
        self.sent = 0

    def __getattr__(self, name):
        return getattr(self._real, name)

    async def send_serialized_message(self, data: bytes):
        self.sent += 1
        if self.sent > 1:
            await asyncio.sleep(0.3)
        return await self._real.send_serialized_message(data)


async def test_a_slow_write_is_never_cancelled_with_the_link(start_aggregator, monkeypatch):
    """Answers pile up behind a slow write; the agent drops the oldest waiting ones, not the one writing
    (cancelling a grpc.aio write cancels the whole stream, and the agent used to stop for good)."""

    class SlowStub(pb_grpc.AgentLinkStub):
        def __init__(self, channel) -> None:
            super().__init__(channel)
            connect = self.Connect

            def slow_connect(*args, **kwargs):
                call = connect(*args, **kwargs)
                call._cython_call = _SlowSends(call._cython_call)
                return call

            self.Connect = slow_connect

    monkeypatch.setattr(agent_module.pb_grpc, "AgentLinkStub", SlowStub)
    agg = await start_aggregator(dp_size=1, round_timeout_ms=30)
    agent = SchedulerAgent(AgentConfig(aggregator=f"127.0.0.1:{agg.port}", dp_ranks=(0,), instance_id="slow"),
                           SimulatedSource(seed=1))
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.connected.wait(), 10)
        async with AsyncLoadClient(f"127.0.0.1:{agg.port}") as client:
            for _ in range(8):  # 8 rounds of 30 ms: collects arrive faster than the link lets answers out
                await client.get_loads(freshness="new_round")
        await asyncio.sleep(1.0)
        assert agent.collects_received == 8
        assert not task.done() and agent.connects == 1 and agg.registry.live_ranks() == {0}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_refused_agent_asks_its_engine_again_before_redialing(start_aggregator):
    """Redeploy: the aggregator comes back with dp_size 2 and the engine with DP 2 while the agent runs. The
    hello with the old ranks is refused; the agent re-reads the engine at once instead of retrying forever."""
    port = free_port()
    engine = SglangHttpEngine(dp_size=4)
    await engine.start()
    agg = await start_aggregator(dp_size=4, port=port)
    config = AgentConfig(aggregator=f"127.0.0.1:{port}", dp_ranks=(), ranks_from_engine=True, source="sglang",
                         engine_url=engine.url, gpu="off", instance_id="redeployed", backoff_max_ms=300)
    agent = SchedulerAgent(config, build_source(config))
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2, 3}, timeout=20, what="linked with 4 ranks")
        await agg.stop(0)
        engine.dp_size = 2
        agg = await start_aggregator(dp_size=2, port=port)
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=20, what="linked again with 2 ranks")
        assert agent.last_refusal is not None and agent.last_refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "dp ranks [2, 3] are outside [0, 2)" in agent.last_refusal.details() and agent.dp_ranks == (0, 1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.stop()


async def test_an_engine_that_shrinks_keeps_its_agent_serving_the_ranks_it_still_runs(start_aggregator, caplog):
    """An aggregator of dp_size 4; the engine goes from DP 4 to DP 2. The agent follows it and keeps serving
    ranks 0 and 1: the engine's apparent size is no cluster size, so the hello no longer claims it (it did,
    and the aggregator refused the whole agent, ranks 0 and 1 included, for as long as it ran)."""
    engine = SglangHttpEngine(dp_size=4)
    await engine.start()
    agg = await start_aggregator(dp_size=4)
    config = AgentConfig(aggregator=f"127.0.0.1:{agg.port}", dp_ranks=(), ranks_from_engine=True, source="sglang",
                         engine_url=engine.url, gpu="off", instance_id="shrinking", backoff_max_ms=300,
                         rediscover_interval_s=0.2)
    agent = SchedulerAgent(config, build_source(config))
    task = asyncio.create_task(agent.run())
    try:
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1, 2, 3}, timeout=20, what="linked with 4 ranks")
        engine.dp_size = 2
        await wait_for(lambda: agg.registry.live_ranks() == {0, 1}, timeout=20, what="linked again with 2 ranks")
        assert agent.last_refusal is None and agent.dp_size == 0
        # The agent warns when it reads the welcome, which may come a moment after the aggregator took its ranks.
        await wait_for(lambda: "the engine shows dp_size 2, the aggregator serves 4" in caplog.text, timeout=10,
                       what="the agent's warning on its welcome")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.stop()


async def test_two_agents_sharing_an_instance_id_back_off_instead_of_flapping(start_aggregator, caplog):
    """A replaced link ends with ABORTED (naming the newer link), so each agent backs off: the two links
    flap at most a few times, and the aggregator's log names the cause."""
    agg = await start_aggregator(dp_size=8)
    target = f"127.0.0.1:{agg.port}"
    agents = [SchedulerAgent(AgentConfig(aggregator=target, dp_ranks=(0, 1, 2, 3), rank_offset=offset,
                                         instance_id="node-1", backoff_initial_ms=200, backoff_max_ms=2000),
                             SimulatedSource(seed=offset)) for offset in (0, 4)]
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    try:
        await asyncio.sleep(3.0)
        assert all(agent.connects >= 1 for agent in agents)  # each linked, and each was replaced...
        assert sum(agent.connects for agent in agents) <= 12  # ...but backed off (~8 expected): redialling at once, ~60
        assert all(agent.last_refusal is None for agent in agents)  # ABORTED is an outage to retry, not a refusal
        logged = caplog.text
        assert "ABORTED: a newer link of instance 'node-1'" in logged  # what the replaced agent was told
        assert "if these are two agents, give each its own --instance-id" in logged  # the aggregator's warning
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_default_instance_ids_differ_between_agents_of_one_host():
    assert AgentConfig().instance_id != AgentConfig().instance_id

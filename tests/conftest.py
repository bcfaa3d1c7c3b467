"""Shared fixtures: an in-process aggregator on a free loopback port, in-process and real-process agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from loadagg.server.aggregator import Aggregator
from loadagg.server.config import AggregatorConfig
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.simulator import SimulatedSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def start_aggregator() -> AsyncIterator[Callable[..., asyncio.Future]]:
    """`agg = await start_aggregator(dp_size=4, mode="watching")`: a real grpc.aio server on 127.0.0.1:<free>."""
    started: list[Aggregator] = []

    async def start(**overrides) -> Aggregator:
        config = AggregatorConfig(**{"host": "127.0.0.1", "port": 0, **overrides})
        aggregator = Aggregator(config)
        await aggregator.start()
        started.append(aggregator)
        return aggregator

    yield start
    for aggregator in started:
        await aggregator.stop(grace=0.5)


@pytest.fixture
async def start_agents() -> AsyncIterator[Callable[..., asyncio.Future]]:
    """`agents = await start_agents(agg, ranks=[[0], [1]], collect_latency_ms=20)`: in-process agents, linked."""
    tasks: list[asyncio.Task] = []

    async def start(aggregator: Aggregator, ranks: list[list[int]], collect_latency_ms: float = 0.0,
                    wait: bool = True) -> list[SchedulerAgent]:
        agents = []
        for i, group in enumerate(ranks):
            config = AgentConfig(
                aggregator=f"127.0.0.1:{aggregator.port}",
                dp_ranks=tuple(group),
                dp_size=aggregator.config.dp_size,
                instance_id=f"test-agent-{group[0]}-{i}",
                seed=i,
                collect_latency_ms=collect_latency_ms,
                backoff_initial_ms=20,
                backoff_max_ms=200,
            )
            agent = SchedulerAgent(config, SimulatedSource(seed=i, collect_latency_ms=collect_latency_ms))
            tasks.append(asyncio.create_task(agent.run()))
            agents.append(agent)
        if wait:
            await wait_for(lambda: all(a.connected.is_set() for a in agents), what="agents to link")
            expected = {r for group in ranks for r in group}
            await wait_for(lambda: expected <= aggregator.registry.live_ranks(), what="ranks registered")
        return agents

    yield start
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[int], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def open_channel(port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()


class Processes:
    """Real child processes started by a test; all ended (only these) when the test ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, **kwargs) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                                stdout=kwargs.pop("stdout", subprocess.PIPE),
                                stderr=kwargs.pop("stderr", subprocess.STDOUT), text=True, **kwargs)
        self.procs.append(proc)
        return proc

    def agent(self, port: int, ranks: list[int], dp_size: int, *extra: str) -> subprocess.Popen:
        args = ["scheduler_agent", "--aggregator", f"127.0.0.1:{port}", "--dp-size", str(dp_size), *extra]
        for rank in ranks:
            args += ["--dp-rank", str(rank)]
        return self.start(*args)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # also resumes nothing: SIGKILL ends a SIGSTOPped process too
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def processes() -> Processes:
    procs = Processes()
    yield procs
    procs.cleanup()

"""`loadagg demo`: an aggregator plus N simulated agent processes on loopback, with loads refreshing live.

A swarm of simulated routers (a child process, `loadagg.cli.swarm`) asks the aggregator all the while, and the view
shows what that costs the engines: router calls/s, rounds/s, callers per round and the engine reads saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from loadagg.cli.render import to_table
from loadagg.cli.swarm import DEFAULT_INTERVAL_MS, DEFAULT_ROUTERS, SwarmConfig
from loadagg.client.load_client import AsyncLoadClient
from loadagg.common import field_default
from loadagg.server.config import AggregatorConfig


@dataclass(frozen=True, slots=True)
class DemoConfig:
    dp_size: int = 4
    agents: int = 4
    port: int = 0  # 0: any free port
    collect_latency_ms: float = 20.0
    interval_s: float = 1.0
    duration_s: float = 0.0  # 0: until Ctrl-C
    mode: str = field_default(AggregatorConfig, "mode")
    routers: int = DEFAULT_ROUTERS  # simulated routers (0: none)
    router_interval_ms: int = DEFAULT_INTERVAL_MS

    def __post_init__(self) -> None:
        if not 1 <= self.agents <= self.dp_size:
            raise ValueError(f"--agents must be in 1..dp_size ({self.dp_size}), got {self.agents}")
        SwarmConfig("", self.routers, self.router_interval_ms)  # ValueError naming the flag out of bounds


def split_ranks(dp_size: int, agents: int) -> list[list[int]]:
    """Rank groups, one per agent process, dealt round-robin (one sglang server may hold several dp ranks)."""
    return [list(range(dp_size))[i::agents] for i in range(agents)]


def spawn_agents(config: DemoConfig, port: int) -> list[subprocess.Popen]:
    procs = []
    for i, ranks in enumerate(split_ranks(config.dp_size, config.agents)):
        # Through with_parent, as the swarm: it ends with the demo even when the demo is killed (SIGKILL).
        cmd = [sys.executable, "-m", "loadagg.cli.with_parent", str(os.getpid()), "scheduler_agent",
               "--aggregator", f"127.0.0.1:{port}",
               "--dp-size", str(config.dp_size), "--seed", str(i), "--instance-id", f"demo-agent-{i}",
               "--collect-latency-ms", str(config.collect_latency_ms), "--log-level", "WARNING"]
        for rank in ranks:
            cmd += ["--dp-rank", str(rank)]
        # The demo's agents are plaintext simulators whatever LOADAGG_* (TLS, source, offset...) this shell has.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOADAGG_")}
        procs.append(subprocess.Popen(cmd, env=env))
    return procs


def spawn_swarm(config: DemoConfig, port: int) -> list[subprocess.Popen]:
    """The simulated routers' process (none with --routers 0)."""
    if not config.routers:
        return []
    cmd = [sys.executable, "-m", "loadagg.cli.with_parent", str(os.getpid()), "loadagg.cli.swarm",
           "--target", f"127.0.0.1:{port}",
           "--routers", str(config.routers), "--interval-ms", str(config.router_interval_ms)]
    return [subprocess.Popen(cmd)]


async def run_demo(config: DemoConfig, out=sys.stdout) -> int:
    """Run the local cluster; returns how many refreshes were shown."""
    from loadagg.cli.coalescing import coalescing, describe, read_metrics  # prometheus-client: the server extra
    from loadagg.server.aggregator import Aggregator  # the `server` extra; DemoConfig stays importable without it

    aggregator = Aggregator(AggregatorConfig(host="127.0.0.1", port=config.port, dp_size=config.dp_size,
                                             mode=config.mode, http_port=0))
    port = await aggregator.start()
    procs = spawn_swarm(config, port) + spawn_agents(config, port)  # the swarm ends first
    routers = (f"{config.routers} simulated routers asking every {config.router_interval_ms} ms"
               if config.routers else "no simulated routers")
    metrics_url = f"http://127.0.0.1:{aggregator.http_port}/metrics"
    reading = None
    shown = 0
    started = time.monotonic()
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # end the agent processes too, however the demo is stopped
        loop.add_signal_handler(sig, stop.set)
    try:
        async with AsyncLoadClient(f"127.0.0.1:{port}") as client:
            while not stop.is_set() and (not config.duration_s or time.monotonic() - started < config.duration_s):
                response = (await client.get_loads(allow_stale=True)).response
                live = len(aggregator.registry.live_ranks())
                before, reading = reading, read_metrics(aggregator.metrics.exposition().decode())
                out.write(
                    f"{clear}loadagg demo: aggregator 127.0.0.1:{port} ({metrics_url}), {live}/{config.dp_size} "
                    f"ranks linked from {config.agents} agent processes, {routers} (Ctrl-C to stop)\n"
                    f"{describe(coalescing(reading, before))}\n{to_table(response)}\n\n"
                )
                out.flush()
                shown += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), config.interval_s)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.poll() is None:
                proc.kill()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await aggregator.stop(grace=1.0)
    return shown

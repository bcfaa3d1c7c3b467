"""Simulated routers: N callers, each asking GetLoads every interval, as a fleet of routers would.

`loadagg demo` runs them in a child process (`python -m loadagg.cli.swarm`) so the coalescing shows: hundreds of
routers asking every 50 ms cost the engines one read per round, not one per router call. Bounded: each router
has at most one call in flight and never catches up on missed ticks; the demo starts it through
`loadagg.cli.with_parent`, so that it ends with the demo.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
from dataclasses import dataclass

import grpc

from loadagg.client import AsyncLoadClient, RetryPolicy
from loadagg.common import run

DEFAULT_ROUTERS = 200
DEFAULT_INTERVAL_MS = 50
MAX_ROUTERS = 5000
MIN_INTERVAL_MS = 10
CONNECTIONS = 8  # routers share this many channels (a router fleet's hosts); gRPC multiplexes the calls


@dataclass(frozen=True, slots=True)
class SwarmConfig:
    target: str
    routers: int = DEFAULT_ROUTERS
    interval_ms: int = DEFAULT_INTERVAL_MS

    def __post_init__(self) -> None:
        if not 0 <= self.routers <= MAX_ROUTERS:
            raise ValueError(f"--routers must be in 0..{MAX_ROUTERS}, got {self.routers}")
        if self.interval_ms < MIN_INTERVAL_MS:
            raise ValueError(f"--router-interval-ms must be at least {MIN_INTERVAL_MS}, got {self.interval_ms}")


@dataclass
class SwarmStats:
    calls: int = 0
    errors: int = 0


async def _router(client: AsyncLoadClient, period: float, stats: SwarmStats) -> None:
    loop = asyncio.get_running_loop()
    next_at = loop.time() + random.uniform(0, period)  # spread the fleet over the interval
    while True:
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await client.get_loads()
            stats.calls += 1
        except grpc.RpcError:
            stats.errors += 1
        next_at = max(next_at + period, loop.time())  # a slow answer skips ticks: no backlog of calls


async def run_swarm(config: SwarmConfig, stop: asyncio.Event, stats: SwarmStats | None = None) -> SwarmStats:
    """Run the routers until `stop` is set."""
    stats = stats if stats is not None else SwarmStats()
    retry = RetryPolicy(attempts=3, max_backoff_s=0.5)  # a router rides out a blip, never a storm of retries
    clients = [AsyncLoadClient(config.target, timeout=2.0, retry=retry)
               for _ in range(min(CONNECTIONS, config.routers))]
    routers = [asyncio.create_task(_router(clients[i % len(clients)], config.interval_ms / 1000, stats))
               for i in range(config.routers)]
    try:
        await stop.wait()
    finally:
        for task in routers:
            task.cancel()
        await asyncio.gather(*routers, return_exceptions=True)
        for client in clients:
            await client.close()
    return stats


async def _main(config: SwarmConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C reaches the whole process group: end quietly
        loop.add_signal_handler(sig, stop.set)
    await run_swarm(config, stop)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadagg.cli.swarm", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="aggregator HOST:PORT")
    p.add_argument("--routers", type=int, default=DEFAULT_ROUTERS, help="simulated routers")
    p.add_argument("--interval-ms", type=int, default=DEFAULT_INTERVAL_MS, help="each router asks this often")
    args = p.parse_args(argv)
    try:
        config = SwarmConfig(args.target, args.routers, args.interval_ms)
    except ValueError as error:
        p.error(str(error))
    run(_main(config))


if __name__ == "__main__":
    main()

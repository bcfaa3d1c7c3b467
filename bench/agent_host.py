"""Child: several scheduler agents (the real SchedulerAgent) in one process, each with its own AgentLink stream.

`python -m bench.agent_host --aggregator 127.0.0.1:P --dp-size 1024 --first-rank 0 --agents 16
--ranks-per-agent 8 --collect-latency-ms 0 --source canned` links 16 agents serving ranks 0..127 and prints
{"ready": true} once all are linked. "stats" answers the collects they received and source reads
(how many times the "schedulers" were asked).

Sources: `simulator` is scheduler_agent's SimulatedSource; `canned` re-stamps snapshots built once by the
simulator, so big fan-in runs measure the aggregator rather than the simulator's Python on 2 shared cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import time
from collections.abc import Sequence

from bench.child import emit, own_usage, run, serve_until_quit
from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.agent import SchedulerAgent
from scheduler_agent.config import AgentConfig
from scheduler_agent.sources.base import LoadSource
from scheduler_agent.sources.simulator import SimulatedSource


class CannedSource(LoadSource):
    """Snapshots made once by the simulator, re-stamped with the current time on every read."""

    name = "canned"

    def __init__(self, seed: int, collect_latency_ms: float) -> None:
        self.simulator = SimulatedSource(seed=seed)
        self.collect_latency = collect_latency_ms / 1000
        self.loads: dict[int, pb.RankLoad] = {}
        self.reads = 0

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        self.reads += 1
        if self.collect_latency:
            await asyncio.sleep(self.collect_latency)
        now = time.time_ns() // 1_000_000
        for rank in ranks:
            load = self.loads.get(rank)
            if load is None:
                load = self.loads[rank] = self.simulator.snapshot(rank)
            load.timestamp_ms = now
        return {rank: self.loads[rank] for rank in ranks}


def build_agents(args: argparse.Namespace) -> list[SchedulerAgent]:
    agents = []
    for i in range(args.agents):
        first = args.first_rank + i * args.ranks_per_agent
        ranks = tuple(range(first, first + args.ranks_per_agent))
        seed = args.seed + first
        source = (CannedSource(seed, args.collect_latency_ms) if args.source == "canned"
                  else SimulatedSource(seed=seed, collect_latency_ms=args.collect_latency_ms))
        config = AgentConfig(aggregator=args.aggregator, dp_ranks=ranks, dp_size=args.dp_size,
                             instance_id=f"bench-agent-{first}", seed=seed, gpu="off",
                             collect_latency_ms=args.collect_latency_ms, push_interval_ms=args.push_interval_ms,
                             backoff_initial_ms=50, backoff_max_ms=500)
        agents.append(SchedulerAgent(config, source))
    return agents


async def main(args: argparse.Namespace) -> None:
    agents = build_agents(args)
    gc.freeze()  # as scheduler-agent does once its agent is built
    tasks = [asyncio.create_task(agent.run()) for agent in agents]
    deadline = time.monotonic() + 60
    while not all(agent.connected.is_set() for agent in agents):
        if time.monotonic() > deadline:
            emit({"ready": False, "error": "agents did not link within 60 s"})
            return
        await asyncio.sleep(0.02)
    emit({"ready": True, "pid": os.getpid(), "agents": len(agents)})

    def stats() -> dict:
        return {
            "collects_received": sum(a.collects_received for a in agents),
            "reports_sent": sum(a.reports_sent for a in agents),
            "source_reads": sum(a.source.reads for a in agents),
            "pushes_sent": sum(getattr(a, "pushes_sent", 0) for a in agents),
            **own_usage(),
        }

    await serve_until_quit({"stats": stats}, tasks)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--aggregator", required=True)
    parser.add_argument("--dp-size", type=int, required=True)
    parser.add_argument("--first-rank", type=int, default=0)
    parser.add_argument("--agents", type=int, default=1)
    parser.add_argument("--ranks-per-agent", type=int, default=1)
    parser.add_argument("--collect-latency-ms", type=float, default=0.0)
    parser.add_argument("--source", choices=("simulator", "canned"), default="simulator")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--push-interval-ms", type=int, default=0, help="also push changed ranks this often")
    logging.basicConfig(level=logging.ERROR)
    run(main(parser.parse_args()))

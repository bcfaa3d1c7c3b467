"""SimulatedSource: plausible, changing per-rank loads for demos, tests and benchmarks.

Each rank follows a seeded random walk (requests arrive and finish, the KV cache fills and drains),
so two runs with the same seed produce the same sequence. `collect_latency_ms` makes answering take
as long as a busy scheduler would.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from loadagg.v1 import loadagg_pb2 as pb
from scheduler_agent.sources.base import LoadSource

GIB = 1 << 30


@dataclass
class _RankState:
    rng: random.Random
    max_tokens: int
    max_running: int
    running: int = 0
    waiting: int = 0
    cache_hit: float = 0.5
    accept_length: float = 3.0
    lora_used: int = 0
    demand: float = 5.0  # mean arrivals per tick, drifting

    def step(self) -> None:
        """One scheduler tick: demand drifts, requests arrive, some finish, the rest queue."""
        rng = self.rng
        self.demand = min(12.0, max(0.5, self.demand + rng.uniform(-0.8, 0.8)))
        arrivals = rng.randint(0, int(2 * self.demand))
        finished = sum(1 for _ in range(self.running) if rng.random() < 0.12)
        self.running -= finished
        self.waiting += arrivals
        admitted = min(self.waiting, self.max_running - self.running)
        self.waiting -= admitted
        self.running += admitted
        self.cache_hit = min(0.95, max(0.05, self.cache_hit + rng.uniform(-0.05, 0.05)))
        self.accept_length = min(4.0, max(1.5, self.accept_length + rng.uniform(-0.2, 0.2)))
        self.lora_used = min(8, max(0, self.lora_used + rng.choice((-1, 0, 0, 1))))


class SimulatedSource(LoadSource):
    name = "simulator"

    def __init__(self, seed: int | None = None, collect_latency_ms: float = 0.0) -> None:
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.collect_latency = collect_latency_ms / 1000
        self._ranks: dict[int, _RankState] = {}
        self.reads = 0

    def _state(self, rank: int) -> _RankState:
        state = self._ranks.get(rank)
        if state is None:
            rng = random.Random(self.seed * 100_003 + rank)
            state = _RankState(rng, max_tokens=rng.choice((131_072, 262_144)), max_running=64)
            state.running = rng.randint(0, 32)
            state.demand = rng.uniform(2.0, 9.0)
            self._ranks[rank] = state
        return state

    def snapshot(self, rank: int) -> pb.RankLoad:
        s = self._state(rank)
        s.step()
        used = min(s.max_tokens, s.running * s.rng.randint(800, 2400))
        usage = used / s.max_tokens
        throughput = s.running * 45.0 * (1.0 - 0.4 * usage)
        graph_gb = 1.6
        return pb.RankLoad(
            dp_rank=rank,
            timestamp_ms=time.time_ns() // 1_000_000,
            num_running_reqs=s.running,
            num_waiting_reqs=s.waiting,
            num_total_reqs=s.running + s.waiting,
            num_used_tokens=used,
            num_total_tokens=s.max_tokens,
            max_total_num_tokens=s.max_tokens,
            num_waiting_uncached_tokens=int(s.waiting * 700 * (1 - s.cache_hit)),
            token_usage=round(usage, 4),
            gen_throughput=round(throughput, 1),
            cache_hit_rate=round(s.cache_hit, 4),
            utilization=round(s.running / s.max_running, 4),
            max_running_requests=s.max_running,
            memory=pb.MemoryMetrics(weight_gb=15.3, kv_cache_gb=41.0, graph_gb=graph_gb, token_capacity=s.max_tokens),
            gpu=pb.GpuMetrics(
                devices=[
                    pb.GpuDevice(
                        index=rank,
                        name="Simulated GPU",
                        memory_used_bytes=int((15.3 + 41.0 + graph_gb) * GIB),
                        memory_total_bytes=80 * GIB,
                        utilization=round(min(1.0, 0.2 + s.running / s.max_running), 3),
                        temperature_c=float(45 + s.running // 8),
                        power_w=round(120 + 2.2 * s.running, 1),
                        power_limit_w=700.0,
                    )
                ]
            ),
            spec=pb.SpeculativeMetrics(accept_length=round(s.accept_length, 3),
                                       accept_rate=round((s.accept_length - 1) / 3, 4)),
            lora=pb.LoraMetrics(slots_used=s.lora_used, slots_total=8, utilization=s.lora_used / 8),
            disagg=pb.DisaggMetrics(mode="null"),
            queues=pb.QueueMetrics(waiting=s.waiting, grammar=0, paused=0, retracted=0),
        )

    async def read(self, ranks: Sequence[int]) -> dict[int, pb.RankLoad]:
        self.reads += 1
        if self.collect_latency:
            await asyncio.sleep(self.collect_latency)
        return {rank: self.snapshot(rank) for rank in ranks}
